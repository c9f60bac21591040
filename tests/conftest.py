"""Shared fixtures: a tiny vocabulary and configs small enough for CPU tests."""

import copy
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras_hub  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasllm_plugins.builtin import pydoc_topics  # noqa: E402

SPECIAL_TOKENS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]

TINY_CONFIG = {
    "model": {"num_layers": 2, "num_heads": 2, "hidden_dim": 32, "intermediate_dim": 64,
              "max_sequence_length": 32, "dropout": 0.0},
    "data": {"sequence_length": 32, "batch_size": 8},
    "objectives": [{"name": "mlm"}],
    "training": {"steps": 100, "steps_per_epoch": 10, "checkpoint_every": 10,
                 "learning_rate": 0.002, "warmup_steps": 10},
}


# The files that take minutes (fresh processes, clusters of workers), collected
# first: pytest-xdist's --dist loadfile hands files out in collection order, and a
# long file handed out last keeps one worker busy while the other idles.
SLOW_FILES = ("test_export.py", "test_training.py", "test_distribute.py", "test_finetune.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)  # stable: each file's tests keep their order


def tiny_config(**sections):
    """TINY_CONFIG with whole sections replaced or merged: tiny_config(model={"kind": ...})."""
    config = copy.deepcopy(TINY_CONFIG)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


@pytest.fixture(scope="session")
def documents():
    """Real text: the language-reference topics that ship with Python."""
    return pydoc_topics()


@pytest.fixture(scope="session")
def tokenizer(documents):
    """A WordPiece tokenizer trained on the pydoc topics (about 1,000 tokens)."""
    vocabulary = keras_hub.tokenizers.compute_word_piece_vocabulary(
        tf.data.Dataset.from_tensor_slices(documents).batch(64), 1000, lowercase=True,
        reserved_tokens=SPECIAL_TOKENS,
    )
    return keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)


@pytest.fixture
def examples(documents):
    return tf.data.Dataset.from_tensor_slices({"text": documents})
