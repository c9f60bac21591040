"""Byte-level BPE (GPT-2, RoBERTa) tokenizer: trained with Hugging Face ``tokenizers``,
run in graph by :class:`kerasllm.tokenizer_layers.BytePairTokenizer`."""

import json
import pathlib

import tokenizers

import kerasllm
from kerasllm.hf_tokenizer import BYTE_CHARACTERS
from kerasllm.tokenizer_layers import BytePairTokenizer
from kerasllm.tokenizers import (
    DEFAULT_SPECIAL_TOKENS,
    find_reserved_tokens,
    reserved_tokens,
    text_iterator,
)

VOCABULARY_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
MERGES_HEADER = "#version: 0.2"  # the first line of the merges.txt that tokenizers writes


class ByteLevelBPE(kerasllm.TokenizerFactory):
    """A :class:`kerasllm.tokenizer_layers.BytePairTokenizer` that packs ``<s> … </s>``.

    GPT-2's pipeline: bytes as 256 base tokens (no unknown text), GPT-2's
    pre-tokenization regex, no prefix space. The vocabulary begins ``<pad> <s>
    </s> <unk> <mask>``, then the sentinels ``<extra_id_0>`` …, found whole in the
    raw text as ``tokenizers`` finds its special tokens. ``lowercase`` lower-cases
    each text as ``tokenizers``' ``Lowercase`` normalizer does (the layer does the
    same in graph). ``save`` writes ``vocab.json`` and ``merges.txt``; ``load``
    reads a directory holding them (or one of the two files).
    """

    @classmethod
    def train(cls, texts, vocabulary_size, lowercase, sentinels=0, min_frequency=2):
        """Learn ``vocabulary_size`` tokens, fewer only if the text runs out of pairs.

        Args:
            min_frequency: a pair merges only if it occurs at least this often.
        """
        return from_tokenizers(
            train_tokenizers(texts, vocabulary_size, lowercase, sentinels, min_frequency))

    @classmethod
    def load(cls, path, lowercase):
        path = pathlib.Path(path)
        directory = path.parent if path.name in (VOCABULARY_FILE, MERGES_FILE) else path
        missing = [name for name in (VOCABULARY_FILE, MERGES_FILE)
                   if not (directory / name).is_file()]
        if missing:
            raise ValueError(f"byte_level_bpe: {directory} lacks {' and '.join(missing)}; give "
                             f"the directory that training saved, or one with {VOCABULARY_FILE} "
                             f"and {MERGES_FILE} (GPT-2's files)")
        try:
            vocabulary = json.loads((directory / VOCABULARY_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{directory / VOCABULARY_FILE} is not valid JSON: {error}") from None
        lines = (directory / MERGES_FILE).read_text(encoding="utf-8").split("\n")
        merges = [line for line in lines if line and not line.startswith("#version")]
        return _tokenizer(vocabulary, merges, lowercase, str(directory))

    @classmethod
    def save(cls, tokenizer, directory):
        directory = pathlib.Path(directory)
        (directory / VOCABULARY_FILE).write_text(
            json.dumps(tokenizer.vocabulary, ensure_ascii=False), encoding="utf-8")
        (directory / MERGES_FILE).write_text(
            "\n".join([MERGES_HEADER, *tokenizer.merges]) + "\n", encoding="utf-8")


def train_tokenizers(texts, vocabulary_size, lowercase, sentinels=0, min_frequency=2):
    """The ``tokenizers.Tokenizer`` that :meth:`ByteLevelBPE.train` trains and converts."""
    reserved = reserved_tokens(DEFAULT_SPECIAL_TOKENS, sentinels)
    smallest = len(reserved) + len(BYTE_CHARACTERS) + 1
    if vocabulary_size < smallest:
        raise ValueError(f"byte-level BPE needs {len(BYTE_CHARACTERS)} byte tokens and "
                         f"{len(reserved)} special tokens and sentinels: vocabulary_size must be "
                         f"at least {smallest}, got {vocabulary_size}")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    if lowercase:
        tokenizer.normalizer = tokenizers.normalizers.Lowercase()
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocabulary_size, min_frequency=min_frequency, special_tokens=reserved,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(text_iterator(texts), trainer=trainer)
    return tokenizer


def from_tokenizers(tokenizer):
    """The :class:`BytePairTokenizer` that tokenizes as ``tokenizer`` (from :func:`train_tokenizers`)."""
    pipeline = json.loads(tokenizer.to_str())
    lowercase = (pipeline["normalizer"] or {}).get("type") == "Lowercase"
    return _tokenizer(pipeline["model"]["vocab"], pipeline["model"]["merges"], lowercase,
                      "the trained vocabulary")


def _tokenizer(vocabulary, merges, lowercase, where):
    missing = [c for c in BYTE_CHARACTERS if c not in vocabulary]
    if missing:
        raise ValueError(f"{where} lacks the byte tokens {missing[:5]}…; byte-level BPE needs "
                         "all 256 (train with byte_level_bpe, or use GPT-2's files)")
    reserved = find_reserved_tokens(vocabulary, DEFAULT_SPECIAL_TOKENS, where)
    try:
        return BytePairTokenizer(vocabulary, merges, lowercase=lowercase,
                                 special_tokens=DEFAULT_SPECIAL_TOKENS, add_start=True,
                                 add_end=True, added_tokens=reserved)
    except ValueError as error:  # e.g. ids that are not 0 … n-1
        raise ValueError(f"{where}: {error}") from None


@kerasllm.hookimpl
def kerasllm_tokenizers():
    return {"byte_level_bpe": ByteLevelBPE}
