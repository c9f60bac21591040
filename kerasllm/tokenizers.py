"""The tokenizer contract: the plugin base class and the special tokens kerasllm relies on.

The tokenizer layers themselves (WordPiece, byte-level BPE, SentencePiece) are in
:mod:`kerasllm.tokenizer_layers`.
"""

import dataclasses


class TokenizerFactory:
    """Trains or loads a tokenizer; subclass it in a ``kerasllm_tokenizers`` plugin.

    Both methods return a keras-hub tokenizer layer: it runs inside tf.data and is
    saved with the model, vocabulary included. kerasllm reads its special tokens
    through :func:`special_tokens`, so the layer needs the attributes
    ``start_token_id`` and ``end_token_id`` (or keras-hub BERT's ``cls_token_id`` /
    ``sep_token_id``), ``pad_token_id`` and ``mask_token_id`` (``None`` when absent:
    padding then uses the end token, and masked-LM objectives refuse the
    tokenizer), and ``add_start`` / ``add_end``, whether a packed sequence begins
    and ends with those tokens (default: whenever the token exists). The layers
    of :mod:`kerasllm.tokenizer_layers` (``WordPieceTokenizer``, ``BytePairTokenizer``,
    ``SentencePieceTokenizer``) have them all.
    """

    @classmethod
    def train(cls, texts, vocabulary_size, lowercase):
        """Learn a vocabulary from ``texts``, a ``tf.data.Dataset`` of strings."""
        raise NotImplementedError

    @classmethod
    def load(cls, path, lowercase):
        """Load the vocabulary file at ``path``."""
        raise NotImplementedError

    @classmethod
    def save_vocabulary(cls, tokenizer, path):
        """Write the tokenizer's vocabulary so that ``load(path)`` restores it."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Token ids for packing. ``pad`` is never ``None``: without a pad token it is the end token."""

    pad: int
    start: int | None
    end: int | None
    mask: int | None
    add_start: bool
    add_end: bool


def special_tokens(tokenizer):
    """The :class:`SpecialTokens` of a kerasllm or keras-hub tokenizer."""
    start = _first_attribute(tokenizer, "start_token_id", "cls_token_id")
    end = _first_attribute(tokenizer, "end_token_id", "sep_token_id")
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        # GPT-2 and Llama have no pad token. Padded positions are masked out of
        # attention and losses, so any id serves; the end token is the usual choice.
        pad = end
    if pad is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an end token; "
                         "kerasllm pads sequences with one of them")
    return SpecialTokens(
        pad=pad, start=start, end=end, mask=getattr(tokenizer, "mask_token_id", None),
        add_start=getattr(tokenizer, "add_start", start is not None),
        add_end=getattr(tokenizer, "add_end", end is not None),
    )


def _first_attribute(tokenizer, *names):
    for name in names:
        if getattr(tokenizer, name, None) is not None:
            return getattr(tokenizer, name)
    return None
