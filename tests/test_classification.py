"""The `classification` head: fine-tunes on a real task and beats the majority class."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasllm
from conftest import tiny_config
from helpers import assert_keras_round_trip
from kerasllm.data import build_dataset, split_heldout
from kerasllm_plugins.builtin import pydoc_topics, stdlib_docstrings


def paragraphs(documents, limit):
    found = [p.strip() for d in documents for p in d.split("\n\n") if len(p.split()) >= 8]
    return found[:limit]


@pytest.fixture(scope="module")
def labelled():
    """Language-reference paragraphs (0) against library docstring paragraphs (1)."""
    reference, library = paragraphs(pydoc_topics(), 600), paragraphs(stdlib_docstrings(), 600)
    texts = reference + library
    labels = [0] * len(reference) + [1] * len(library)
    order = np.random.default_rng(0).permutation(len(texts))
    return tf.data.Dataset.from_tensor_slices({
        "text": [texts[i] for i in order], "label": np.array(labels)[order].astype("int32")})


@pytest.mark.parametrize("representation", ["pooled", "first_token"])
def test_classification_beats_majority(tokenizer, labelled, representation, tmp_path):
    keras.utils.set_random_seed(0)
    config = tiny_config(objectives=[], head={
        "name": "classification",
        "options": {"num_classes": 2, "representation": representation}})
    model = kerasllm.build_model(config, tokenizer)
    training, heldout = split_heldout(labelled, 0.2)
    batches = build_dataset(model, training, 16, 32, shuffle_buffer=1024, seed=0, repeat=True)
    eval_batches = build_dataset(model, heldout, 64, 32).cache()
    model.fit(batches, steps_per_epoch=120, epochs=1, verbose=0)
    result = model.evaluate(eval_batches, verbose=0, return_dict=True)
    labels = np.concatenate([y["classification"]["labels"] for _, y in eval_batches])
    majority = max(labels.mean(), 1 - labels.mean())
    assert result["classification_accuracy"] > majority + 0.15, (result, majority)
    x, _ = next(iter(eval_batches))
    assert model(x)["classification"].shape == (len(x["token_ids"]), 2)
    assert_keras_round_trip(model, x, tmp_path)


def test_pooled_representation_needs_a_pooler(tokenizer):
    config = tiny_config(model={"pooler": False}, objectives=[],
                         head={"name": "classification", "options": {"num_classes": 3}})
    with pytest.raises(kerasllm.ConfigError, match="needs model.pooler: true"):
        kerasllm.build_model(config, tokenizer)
