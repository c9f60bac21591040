"""The tokenizer contract: the plugin base class and the special tokens kerasllm relies on.

The tokenizer layers themselves (WordPiece, byte-level BPE, SentencePiece) are in
:mod:`kerasllm.tokenizer_layers`.
"""

import dataclasses


class TokenizerFactory:
    """Trains or loads a tokenizer; subclass it in a ``kerasllm_tokenizers`` plugin.

    Every method returns or takes a keras-hub tokenizer layer: it runs inside
    tf.data and is saved with the model, vocabulary included. kerasllm reads its
    special tokens through :func:`special_tokens`, so the layer needs the
    attributes ``start_token_id`` and ``end_token_id`` (or keras-hub BERT's
    ``cls_token_id`` / ``sep_token_id``), ``pad_token_id`` and ``mask_token_id``
    (``None`` when absent: padding then uses the end token, and masked-LM
    objectives refuse the tokenizer), and ``add_start`` / ``add_end``, whether a
    packed sequence begins and ends with those tokens (default: whenever the
    token exists). The layers of :mod:`kerasllm.tokenizer_layers`
    (``WordPieceTokenizer``, ``BytePairTokenizer``, ``SentencePieceTokenizer``)
    have them all.

    ``tokenizer.options`` in the config are passed to ``train`` or ``load`` as
    keyword arguments, so their signatures document the options; raise
    ``ValueError`` for a bad value and kerasllm reports it with the config key.
    """

    @classmethod
    def train(cls, texts, vocabulary_size, lowercase, sentinels=0):
        """Learn a vocabulary of ``vocabulary_size`` tokens from ``texts``, a
        ``tf.data.Dataset`` of strings. A trained vocabulary holds the pad, start,
        end, unknown and mask tokens, and ``sentinels`` tokens
        ``<extra_id_0>``, ``<extra_id_1>``, … (:func:`sentinel_ids`) for span
        corruption."""
        raise NotImplementedError

    @classmethod
    def load(cls, path, lowercase):
        """Load a vocabulary: a directory ``save`` wrote, or the tokenizer's usual
        file (e.g. ``vocab.txt``, a SentencePiece ``.model``)."""
        raise NotImplementedError

    @classmethod
    def save(cls, tokenizer, directory):
        """Write the tokenizer's vocabulary into ``directory`` (it exists), so
        that ``load(directory)`` restores the same tokenizer."""
        raise NotImplementedError


SENTINEL_TOKEN = "<extra_id_{}>"


def sentinel_ids(tokenizer):
    """Ids of ``<extra_id_0>``, ``<extra_id_1>``, … up to the first one missing."""
    vocabulary = tokenizer.get_vocabulary()
    index = {token: i for i, token in enumerate(vocabulary)}
    ids = []
    while SENTINEL_TOKEN.format(len(ids)) in index:
        ids.append(index[SENTINEL_TOKEN.format(len(ids))])
    return ids


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


# === For tokenizer plugins: reserved tokens, training text ========================

# Trained vocabularies begin with these roles' tokens, in this order, then the sentinels.
SPECIAL_ROLES = ("pad", "start", "end", "unknown", "mask")
# The special tokens of trained SentencePiece and byte-level BPE vocabularies, by role:
# RoBERTa's names (WordPiece keeps BERT's [PAD], [CLS], [SEP], [UNK], [MASK]).
DEFAULT_SPECIAL_TOKENS = {"pad": "<pad>", "start": "<s>", "end": "</s>", "unknown": "<unk>",
                          "mask": "<mask>"}


def sentinel_tokens(count):
    """``<extra_id_0>`` … ``<extra_id_{count - 1}>``."""
    return [SENTINEL_TOKEN.format(i) for i in range(count)]


def reserved_tokens(tokens, sentinels=0):
    """The tokens a trained vocabulary begins with, in id order: the special tokens
    (``tokens``: role → token) in :data:`SPECIAL_ROLES` order, then ``sentinels``
    sentinel tokens."""
    return [tokens[role] for role in SPECIAL_ROLES] + sentinel_tokens(sentinels)


def find_reserved_tokens(vocabulary, tokens, where):
    """The reserved tokens that ``vocabulary`` (tokens) holds: the special tokens
    (``tokens``: role → token), then the sentinels up to the first one missing.

    Raises ``ValueError`` naming ``where`` if a special token is missing.
    """
    present = set(vocabulary)
    missing = [token for token in tokens.values() if token not in present]
    if missing:
        roles = ", ".join(f"{role} {token}" for role, token in tokens.items())
        raise ValueError(
            f"{where} lacks the special tokens {missing}; kerasllm needs {roles}: add them "
            "to the vocabulary, or load a Hugging Face tokenizer directory with tokenizer.name: hf")
    count = 0
    while SENTINEL_TOKEN.format(count) in present:
        count += 1
    return reserved_tokens(tokens, count)


def text_iterator(texts, batch_size=1024):
    """The strings of ``texts``, a ``tf.data.Dataset`` of strings, as Python ``str``:
    for trainers that run outside TensorFlow (sentencepiece, tokenizers)."""
    for batch in texts.batch(batch_size).as_numpy_iterator():
        for text in batch:
            # Those trainers take str; one stray byte should not end a long training run.
            yield text.decode("utf-8", errors="replace")


def token_strings(tokenizer, size):
    """Each id's token as the vocabulary writes it, ``""`` for ids past the
    vocabulary (a model's table may be larger): a numpy array, for serving graphs
    that answer with tokens (``tf.gather(tf.constant(strings), ids)``)."""
    import numpy as np

    vocabulary = list(tokenizer.get_vocabulary())
    return np.array(vocabulary + [""] * (size - len(vocabulary)), object)
