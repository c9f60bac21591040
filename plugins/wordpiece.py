"""WordPiece (BERT) tokenizer: trained with keras-hub, run as Hugging Face's BERT tokenizer."""

import pathlib

import keras_hub

import kerasllm
from kerasllm.tokenizer_layers import WordPieceTokenizer, bert_normalize
from kerasllm.tokenizers import find_reserved_tokens, reserved_tokens

SPECIAL_TOKENS = {"pad": "[PAD]", "start": "[CLS]", "end": "[SEP]", "unknown": "[UNK]",
                  "mask": "[MASK]"}
VOCABULARY_FILE = "vocab.txt"


class WordPiece(kerasllm.TokenizerFactory):
    """A :class:`kerasllm.tokenizer_layers.WordPieceTokenizer` that packs ``[CLS] … [SEP]``.

    The vocabulary begins ``[PAD] [CLS] [SEP] [UNK] [MASK]``, then the sentinels
    ``<extra_id_0>`` …; like Hugging Face's BERT tokenizer, the layer finds these
    tokens whole in the raw text. ``lowercase`` lower-cases and strips accents, as
    BERT uncased does. ``save`` writes ``vocab.txt``; ``load`` reads a directory
    holding one, or the file itself. No options.
    """

    @classmethod
    def train(cls, texts, vocabulary_size, lowercase, sentinels=0):
        # keras-hub's trainer is tf-text's: it reaches about vocabulary_size tokens,
        # not exactly (it searches for a count threshold that gives the size).
        reserved = reserved_tokens(SPECIAL_TOKENS, sentinels)
        # Learn from the text as the tokenizer normalizes it (keras-hub's trainer
        # would case-fold with NFKC instead).
        normalized = texts.batch(1024).map(
            lambda batch: bert_normalize(batch, lowercase, strip_accents=lowercase))
        vocabulary = keras_hub.tokenizers.compute_word_piece_vocabulary(
            normalized, vocabulary_size, reserved_tokens=reserved)
        return _tokenizer(vocabulary, lowercase, reserved)

    @classmethod
    def load(cls, path, lowercase):
        path = pathlib.Path(path)
        file = path / VOCABULARY_FILE if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"wordpiece: no {VOCABULARY_FILE} in {path}; give the directory "
                             f"that training saved, or a {VOCABULARY_FILE} file (one token a line)")
        with open(file, encoding="utf-8") as handle:
            vocabulary = [line.rstrip("\n") for line in handle if line.rstrip("\n")]
        reserved = find_reserved_tokens(vocabulary, SPECIAL_TOKENS, f"vocabulary {file}")
        return _tokenizer(vocabulary, lowercase, reserved)

    @classmethod
    def save(cls, tokenizer, directory):
        with open(pathlib.Path(directory) / VOCABULARY_FILE, "w", encoding="utf-8") as handle:
            handle.writelines(f"{token}\n" for token in tokenizer.get_vocabulary())


def _tokenizer(vocabulary, lowercase, reserved):
    return WordPieceTokenizer(vocabulary, lowercase=lowercase, special_tokens=SPECIAL_TOKENS,
                              add_start=True, add_end=True, added_tokens=reserved)


@kerasllm.hookimpl
def kerasllm_tokenizers():
    return {"wordpiece": WordPiece}
