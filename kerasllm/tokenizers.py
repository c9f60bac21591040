"""The base class of tokenizer plugins, and the special tokens kerasllm relies on."""

import dataclasses


class TokenizerFactory:
    """Trains or loads a tokenizer; subclass it in a ``kerasllm_tokenizers`` plugin.

    Both methods return a keras-hub tokenizer layer (it runs inside tf.data and is
    saved with the model, vocabulary included) that has the attributes
    ``pad_token_id``, ``cls_token_id`` (sequence start), ``sep_token_id``
    (sequence end) and ``mask_token_id`` (may be ``None`` if the tokenizer has no
    mask token; masked-LM objectives then refuse it).
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
    pad: int
    start: int
    end: int
    mask: int | None


def special_tokens(tokenizer):
    return SpecialTokens(
        pad=tokenizer.pad_token_id,
        start=tokenizer.cls_token_id,
        end=tokenizer.sep_token_id,
        mask=getattr(tokenizer, "mask_token_id", None),
    )
