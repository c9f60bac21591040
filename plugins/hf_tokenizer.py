"""The tokenizer of a Hugging Face checkpoint, loaded through :func:`kerasllm.hf_tokenizer.load_hf_tokenizer`."""

import json
import pathlib

import keras

import kerasllm
from kerasllm.hf_tokenizer import load_hf_tokenizer

# What save writes: the layer's Keras config, which holds the whole vocabulary.
SAVED_FILE = "kerasllm_tokenizer.json"
TRAINABLE = ("wordpiece", "sentencepiece", "byte_level_bpe")


class HuggingFace(kerasllm.TokenizerFactory):
    """Any Hugging Face tokenizer directory (BERT, GPT-2, RoBERTa, T5, Llama): the
    kerasllm layer that gives ``transformers``' ids, special tokens and packing.

    ``tokenizer.vocabulary`` names the directory (``from_hf`` configs do);
    ``lowercase`` is ignored: the tokenizer files say whether it lowercases.
    ``save`` writes the layer's config (``kerasllm_tokenizer.json``), which ``load``
    reads back as the identical tokenizer. No options.
    """

    @classmethod
    def train(cls, texts, vocabulary_size, lowercase, sentinels=0):
        raise ValueError("hf tokenizers are loaded, not trained: set tokenizer.vocabulary to a "
                         "Hugging Face tokenizer directory, or train a vocabulary with "
                         f"tokenizer.name: {', '.join(TRAINABLE)}")

    @classmethod
    def load(cls, path, lowercase):
        path = pathlib.Path(path)
        saved = path / SAVED_FILE
        if saved.is_file():
            config = json.loads(saved.read_text(encoding="utf-8"))
            return keras.saving.deserialize_keras_object(config, safe_mode=True)
        return load_hf_tokenizer(path)  # its errors are ValueErrors that name the directory

    @classmethod
    def save(cls, tokenizer, directory):
        config = keras.saving.serialize_keras_object(tokenizer)
        (pathlib.Path(directory) / SAVED_FILE).write_text(json.dumps(config), encoding="utf-8")


@kerasllm.hookimpl
def kerasllm_tokenizers():
    return {"hf": HuggingFace}
