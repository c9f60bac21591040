"""WordPiece (BERT) tokenizer: trained with keras-hub, run with tensorflow-text ops."""

import keras_hub

import kerasllm

RESERVED_TOKENS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]


class WordPiece(kerasllm.TokenizerFactory):
    """A ``keras_hub.models.BertTokenizer`` over a trained or loaded vocabulary."""

    @classmethod
    def train(cls, texts, vocabulary_size, lowercase):
        vocabulary = keras_hub.tokenizers.compute_word_piece_vocabulary(
            texts.batch(1024), vocabulary_size, lowercase=lowercase,
            reserved_tokens=RESERVED_TOKENS,
        )
        return keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=lowercase)

    @classmethod
    def load(cls, path, lowercase):
        with open(path, encoding="utf-8") as handle:
            vocabulary = [line.rstrip("\n") for line in handle if line.rstrip("\n")]
        missing = [token for token in RESERVED_TOKENS if token not in vocabulary]
        if missing:
            raise ValueError(f"vocabulary {path} lacks the special tokens {missing}")
        return keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=lowercase)

    @classmethod
    def save_vocabulary(cls, tokenizer, path):
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(f"{token}\n" for token in tokenizer.get_vocabulary())


@kerasllm.hookimpl
def kerasllm_tokenizers():
    return {"wordpiece": WordPiece}
