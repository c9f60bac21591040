"""The `regression` head: a real-valued target, scaled from the data, learnt well
beyond predicting the mean; Pearson and Spearman against scipy's definitions."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasllm
from conftest import tiny_config
from helpers import assert_keras_round_trip, serve_in_fresh_process
from kerasllm.data import build_dataset, split_heldout
from kerasllm.evaluation import evaluate
from kerasllm.jobs import complete_head_options
from kerasllm.plugins import get_registry
from kerasllm_plugins.builtin import pydoc_topics, stdlib_docstrings

CHUNK_WORDS = 6
CHUNKS = 4


@pytest.fixture(scope="module")
def mixtures():
    """Texts of four six-word chunks, each from the language reference or from
    library docstrings; the target is 10 × the reference's share (0, 2.5, ..., 10)."""
    def chunks(documents):
        words = " ".join(documents).split()
        return [" ".join(words[i:i + CHUNK_WORDS]) for i in range(0, len(words), CHUNK_WORDS)]

    reference, library = chunks(pydoc_topics()), chunks(stdlib_docstrings())
    rng = np.random.default_rng(0)
    texts, targets = [], []
    for _ in range(1500):
        from_reference = rng.random(CHUNKS) < rng.random()
        texts.append(" ".join(
            reference[rng.integers(len(reference))] if chosen else
            library[rng.integers(len(library))] for chosen in from_reference))
        targets.append(10.0 * from_reference.mean())
    return tf.data.Dataset.from_tensor_slices(
        {"text": texts, "label": np.array(targets, "float32")})


def test_regression_beats_the_mean(tokenizer, mixtures, tmp_path):
    config = kerasllm.load_config(tiny_config(
        objectives=[], head={"name": "regression", "options": {"representation": "first_token"}}))
    training, heldout = split_heldout(mixtures, 0.2)
    config = complete_head_options(config, get_registry(), [(training, None)])
    targets = np.array([e["label"] for e in training.as_numpy_iterator()], "float64")
    assert config.head.options["label_mean"] == pytest.approx(targets.mean())
    assert config.head.options["label_scale"] == pytest.approx(targets.std())

    keras.utils.set_random_seed(0)
    model = kerasllm.build_model(config, tokenizer)
    batches = build_dataset(model, training, 16, 32, shuffle_buffer=1024, seed=0, repeat=True)
    model.fit(batches, steps_per_epoch=250, epochs=1, verbose=0)

    scores = evaluate(model, heldout)
    truth = np.array([e["label"] for e in heldout.as_numpy_iterator()], "float64")
    variance = truth.var()  # the mean squared error of predicting the mean
    assert scores["regression_pearson"] > 0.6, scores
    assert scores["regression_spearman"] > 0.6, scores
    assert scores["regression_mean_squared_error"] < 0.6 * variance, (scores, variance)

    texts = [e["text"].decode() for e in heldout.take(8).as_numpy_iterator()]
    predictions = model.predict(texts)
    assert all(isinstance(value, float) for value in predictions)
    x, _ = next(iter(build_dataset(model, heldout, 8, 32)))
    np.testing.assert_allclose(predictions, model(x)["regression"], rtol=1e-5)
    assert_keras_round_trip(model, x, tmp_path)


def test_loss_is_the_standardized_squared_error(tokenizer):
    config = tiny_config(objectives=[], head={"name": "regression", "options": {
        "label_mean": 3.0, "label_scale": 2.0}})
    head = kerasllm.build_model(config, tokenizer).heads[0]
    predictions = np.array([1.0, 3.0, 6.0], "float32")
    values = np.array([3.0, 3.0, 2.0], "float32")
    expected = np.mean(((predictions - values) / 2.0) ** 2)
    np.testing.assert_allclose(float(head.compute_loss({"values": values}, predictions)),
                               expected, rtol=1e-6)


def test_label_scale_must_be_positive(tokenizer):
    config = tiny_config(objectives=[], head={"name": "regression",
                                              "options": {"label_scale": 0.0}})
    with pytest.raises(kerasllm.ConfigError, match="head.options: invalid value for task "
                       "head 'regression': label_scale must be > 0, got 0.0"):
        kerasllm.build_model(config, tokenizer)


def test_sentence_pairs_are_inferred_and_served_in_the_targets_units(tokenizer, tmp_path):
    from kerasllm_plugins.regression import Regression

    pairs = tf.data.Dataset.from_tensor_slices(
        {"text": ["a", "b"], "text_pair": ["c", "d"], "label": [1.0, 3.0]})
    assert Regression.infer_options(pairs, {}) == {
        "pairs": True, "label_mean": 2.0, "label_scale": 1.0}
    # Untrained, with targets far from 0 so that de-standardizing shows.
    keras.utils.set_random_seed(0)
    model = kerasllm.build_model(tiny_config(objectives=[], head={
        "name": "regression", "options": {"label_mean": 30.0, "label_scale": 8.0,
                                          "pairs": True}}), tokenizer)
    # An untrained head predicts nearly the mean; a wider one spreads the
    # predictions well beyond the 1e-5 they are compared to.
    dense = model.get_head("regression").output_dense
    dense.kernel.assign(np.random.default_rng(0).normal(size=dense.kernel.shape))
    examples = [{"text": "The pass statement does nothing.", "text_pair": "It is a no-op."},
                {"text": "", "text_pair": "only the second segment"},
                {"text": "a long first text " * 20, "text_pair": "and a long second " * 20}]
    request = {key: np.array([e[key] for e in examples], object) for key in examples[0]}
    _, (served,) = serve_in_fresh_process(model, tmp_path, [("serving_default", request)])
    assert set(served) == {"value"} and served["value"].dtype == np.float32
    assert served["value"].shape == (3,)
    np.testing.assert_allclose(served["value"], model.predict(examples), rtol=0, atol=1e-5)
    assert np.ptp(served["value"]) > 0.01
