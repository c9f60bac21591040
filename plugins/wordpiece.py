"""WordPiece (BERT) tokenizer: trained with keras-hub, run as Hugging Face's BERT tokenizer."""

import keras_hub

import kerasllm
from kerasllm.tokenizer_layers import WordPieceTokenizer, bert_normalize

RESERVED_TOKENS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
SPECIAL_TOKENS = {"pad": "[PAD]", "start": "[CLS]", "end": "[SEP]", "unknown": "[UNK]",
                  "mask": "[MASK]"}


class WordPiece(kerasllm.TokenizerFactory):
    """A :class:`kerasllm.tokenizer_layers.WordPieceTokenizer` that packs ``[CLS] … [SEP]``.

    ``lowercase`` lower-cases and strips accents, as BERT uncased does.
    """

    @classmethod
    def train(cls, texts, vocabulary_size, lowercase):
        # Learn from the text as the tokenizer normalizes it (keras-hub's trainer
        # would case-fold with NFKC instead).
        normalized = texts.batch(1024).map(
            lambda batch: bert_normalize(batch, lowercase, strip_accents=lowercase))
        vocabulary = keras_hub.tokenizers.compute_word_piece_vocabulary(
            normalized, vocabulary_size, reserved_tokens=RESERVED_TOKENS,
        )
        return _tokenizer(vocabulary, lowercase)

    @classmethod
    def load(cls, path, lowercase):
        with open(path, encoding="utf-8") as handle:
            vocabulary = [line.rstrip("\n") for line in handle if line.rstrip("\n")]
        missing = [token for token in RESERVED_TOKENS if token not in vocabulary]
        if missing:
            raise ValueError(f"vocabulary {path} lacks the special tokens {missing}")
        return _tokenizer(vocabulary, lowercase)

    @classmethod
    def save_vocabulary(cls, tokenizer, path):
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(f"{token}\n" for token in tokenizer.get_vocabulary())


def _tokenizer(vocabulary, lowercase):
    return WordPieceTokenizer(vocabulary, lowercase=lowercase, special_tokens=SPECIAL_TOKENS,
                              add_start=True, add_end=True)


@kerasllm.hookimpl
def kerasllm_tokenizers():
    return {"wordpiece": WordPiece}
