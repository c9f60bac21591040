"""The `classification` head: single texts and pairs, label names, multi-label,
class weights; fine-tunes on real tasks and beats the majority class."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasllm
from conftest import tiny_config
from helpers import assert_keras_round_trip
from kerasllm import metrics
from kerasllm.data import build_dataset, split_heldout
from kerasllm.evaluation import evaluate
from kerasllm.jobs import complete_head_options
from kerasllm.plugins import get_registry
from kerasllm_plugins.builtin import pydoc_topics, stdlib_docstrings


def paragraphs(documents, limit):
    found = [p.strip() for d in documents for p in d.split("\n\n") if len(p.split()) >= 8]
    return found[:limit]


@pytest.fixture(scope="module")
def sources():
    """Language-reference paragraphs against library docstring paragraphs."""
    return paragraphs(pydoc_topics(), 600), paragraphs(stdlib_docstrings(), 600)


@pytest.fixture(scope="module")
def labelled(sources):
    reference, library = sources
    texts = reference + library
    labels = [0] * len(reference) + [1] * len(library)
    order = np.random.default_rng(0).permutation(len(texts))
    return tf.data.Dataset.from_tensor_slices({
        "text": [texts[i] for i in order], "label": np.array(labels)[order].astype("int32")})


def fine_tune(config, tokenizer, examples, steps=120, batch_size=16):
    keras.utils.set_random_seed(0)
    model = kerasllm.build_model(config, tokenizer)
    training, heldout = split_heldout(examples, 0.2)
    batches = build_dataset(model, training, batch_size, 32, shuffle_buffer=1024, seed=0,
                            repeat=True)
    model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
    return model, heldout


@pytest.mark.parametrize("representation", ["pooled", "first_token"])
def test_classification_beats_majority(tokenizer, labelled, representation, tmp_path):
    config = tiny_config(objectives=[], head={
        "name": "classification",
        "options": {"num_classes": 2, "representation": representation}})
    model, heldout = fine_tune(config, tokenizer, labelled)
    eval_batches = build_dataset(model, heldout, 64, 32).cache()
    result = model.evaluate(eval_batches, verbose=0, return_dict=True)
    labels = np.concatenate([y["classification"]["labels"] for _, y in eval_batches])
    majority = max(labels.mean(), 1 - labels.mean())
    assert result["classification_accuracy"] > majority + 0.15, (result, majority)
    x, _ = next(iter(eval_batches))
    assert model(x)["classification"].shape == (len(x["token_ids"]), 2)
    assert_keras_round_trip(model, x, tmp_path)


def test_label_names_are_learnt_from_the_data_saved_and_predicted(tokenizer, sources,
                                                                   tmp_path):
    reference, library = sources
    texts = reference[:300] + library[:300]
    names = ["reference"] * 300 + ["library"] * 300
    order = np.random.default_rng(1).permutation(len(texts))
    examples = tf.data.Dataset.from_tensor_slices({
        "text": [texts[i] for i in order], "label": [names[i] for i in order]})
    config = kerasllm.load_config(tiny_config(objectives=[], head={"name": "classification"}))
    config = complete_head_options(config, get_registry(), [(examples, None)])
    assert config.head.options == {"labels": ["library", "reference"]}
    model, heldout = fine_tune(config, tokenizer, examples)

    scores = evaluate(model, heldout)
    assert scores["classification_accuracy"] > 0.8, scores
    answers = model.predict([text for text in texts[:20]])
    assert {answer["label"] for answer in answers} <= {"library", "reference"}
    for answer in answers:
        assert answer["label"] == ["library", "reference"][answer["label_id"]]
        assert answer["score"] == pytest.approx(max(answer["probabilities"]))
        assert sum(answer["probabilities"]) == pytest.approx(1.0)
    model.save(tmp_path / "model.keras")
    restored = kerasllm.load_model(tmp_path / "model.keras")
    reloaded = restored.predict(texts[:20])
    assert [answer["label"] for answer in reloaded] == [answer["label"] for answer in answers]
    np.testing.assert_allclose([answer["probabilities"] for answer in reloaded],
                               [answer["probabilities"] for answer in answers], atol=1e-6)


def test_an_unknown_label_name_fails_naming_it(tokenizer):
    config = tiny_config(objectives=[], head={
        "name": "classification", "options": {"labels": ["no", "yes"]}})
    model = kerasllm.build_model(config, tokenizer)
    examples = tf.data.Dataset.from_tensor_slices(
        {"text": ["a b c", "d e f"], "label": ["yes", "maybe"]})
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"a label is not one of the "
                       r"labels of this head \(no, yes\).*Unknown:\] \[maybe\]"):
        list(build_dataset(model, examples, 2, 16))


def test_sentence_pairs_are_packed_with_segments_and_learnt(tokenizer, sources):
    """The label is the source of the second text; the first, from either source at
    random, is a distractor: the head must read past the separator."""
    reference, library = sources
    rng = np.random.default_rng(2)
    texts, pairs, labels = [], [], []
    for _ in range(1200):
        first, second = rng.integers(2, size=2)
        pick = [reference, library]
        texts.append(" ".join(pick[first][rng.integers(len(pick[first]))].split()[:12]))
        pairs.append(pick[second][rng.integers(len(pick[second]))])
        labels.append(int(second))
    examples = tf.data.Dataset.from_tensor_slices(
        {"text": texts, "text_pair": pairs, "label": np.array(labels, "int32")})
    config = tiny_config(objectives=[], head={"name": "classification",
                                              "options": {"num_classes": 2}})
    model = kerasllm.build_model(config, tokenizer)
    x, _ = next(iter(build_dataset(model, examples, 4, 32)))
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    for ids, segments, mask in zip(x["token_ids"].numpy(), x["segment_ids"].numpy(),
                                   x["padding_mask"].numpy()):
        assert ids[0] == cls and list(ids).count(sep) == 2 and mask.all()
        first_sep = list(ids).index(sep)
        assert (segments[:first_sep + 1] == 0).all() and (segments[first_sep + 1:] == 1).all()

    model, heldout = fine_tune(config, tokenizer, examples, steps=200)
    scores = evaluate(model, heldout)
    assert scores["classification_accuracy"] > 0.65, scores


def test_multi_label(tokenizer, sources):
    """Two labels that may co-occur: the source, and whether the text shows a call."""
    reference, library = sources
    texts = reference + library
    examples = []
    for index, text in enumerate(texts):
        labels = ["reference" if index < len(reference) else "library"]
        if "(" in " ".join(text.split()[:20]):
            labels.append("call")
        examples.append((text, labels))
    order = np.random.default_rng(3).permutation(len(examples))
    dataset = tf.data.Dataset.from_tensor_slices({
        "text": [examples[i][0] for i in order],
        "label": tf.ragged.constant([examples[i][1] for i in order])})
    config = kerasllm.load_config(tiny_config(objectives=[], head={
        "name": "classification", "options": {"multi_label": True}}))
    config = complete_head_options(config, get_registry(), [(dataset, None)])
    assert config.head.options["labels"] == ["call", "library", "reference"]
    model, heldout = fine_tune(config, tokenizer, dataset, steps=200)

    x, y = next(iter(build_dataset(model, dataset.take(4), 4, 32)))
    expected = [[int(name in examples[i][1]) for name in ["call", "library", "reference"]]
                for i in order[:4]]
    np.testing.assert_array_equal(y["classification"]["labels"], expected)

    scores = evaluate(model, heldout)
    truth = np.array([[int(name in labels) for name in ["call", "library", "reference"]]
                      for labels in (example["label"] for example in
                                     heldout.as_numpy_iterator())])
    most_common = (truth.mean(axis=0) > 0.5).astype(int)  # the same label set for all
    baseline = metrics.multilabel_scores(truth, np.tile(most_common, (len(truth), 1)))
    assert scores["classification_micro_f1"] > baseline["micro_f1"] + 0.1, (scores, baseline)
    answer = model.predict(texts[0])
    assert set(answer["labels"]) <= {"call", "library", "reference"}
    assert answer["labels"] == [name for name, p in zip(["call", "library", "reference"],
                                                         answer["probabilities"]) if p > 0.5]


def test_class_weights_weight_the_cross_entropy(tokenizer):
    weights = [0.2, 1.0, 3.0]
    config = tiny_config(objectives=[], head={"name": "classification", "options": {
        "num_classes": 3, "class_weights": weights}})
    head = kerasllm.build_model(config, tokenizer).heads[0]
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(8, 3)).astype("float32")
    labels = rng.integers(3, size=8).astype("int32")
    log_probabilities = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    per_example = -log_probabilities[np.arange(8), labels]
    example_weights = np.array(weights)[labels]
    # As torch.nn.CrossEntropyLoss(weight=...): sum(w_i * loss_i) / sum(w_i).
    expected = (per_example * example_weights).sum() / example_weights.sum()
    loss = head.compute_loss({"labels": labels}, logits)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def test_multi_label_loss_is_binary_cross_entropy(tokenizer):
    config = tiny_config(objectives=[], head={"name": "classification", "options": {
        "num_classes": 3, "multi_label": True, "class_weights": [1.0, 2.0, 0.5]}})
    head = kerasllm.build_model(config, tokenizer).heads[0]
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(6, 3)).astype("float32")
    labels = rng.integers(2, size=(6, 3)).astype("float32")
    probabilities = 1 / (1 + np.exp(-logits))
    per_class = -(labels * np.log(probabilities) + (1 - labels) * np.log(1 - probabilities))
    expected = (per_class * np.array([1.0, 2.0, 0.5])).mean()
    np.testing.assert_allclose(float(head.compute_loss({"labels": labels}, logits)),
                               expected, rtol=1e-5)


@pytest.mark.parametrize(("options", "message"), [
    ({}, "give num_classes, or labels"),
    ({"num_classes": 1}, "num_classes must be an integer >= 2, got 1"),
    ({"labels": ["a", "a"]}, "labels must be a list of distinct class names"),
    ({"labels": ["a", "b"], "num_classes": 3}, r"num_classes \(3\) differs from the number "
                                               r"of labels \(2\)"),
    ({"num_classes": 2, "class_weights": [1.0]}, "class_weights must be 2 weights >= 0"),
    ({"num_classes": 2, "threshold": 1.5}, "threshold must be between 0 and 1"),
])
def test_bad_options_are_refused(tokenizer, options, message):
    config = tiny_config(objectives=[], head={"name": "classification", "options": options})
    with pytest.raises(kerasllm.ConfigError, match="head.options: invalid value for task "
                       f"head 'classification': {message}"):
        kerasllm.build_model(config, tokenizer)


def test_pooled_representation_needs_a_pooler(tokenizer):
    config = tiny_config(model={"pooler": False}, objectives=[], head={
        "name": "classification", "options": {"num_classes": 3, "representation": "pooled"}})
    with pytest.raises(kerasllm.ConfigError, match="needs model.pooler: true; or use "
                       "representation: first_token"):
        kerasllm.build_model(config, tokenizer)


@pytest.mark.parametrize(("model", "expected"), [
    ({}, "pooled"), ({"pooler": False}, "first_token"),
    ({"kind": "decoder", "num_segments": 0}, "last_token")])
def test_the_default_representation_fits_the_backbone(tokenizer, model, expected):
    config = tiny_config(model=model, objectives=[],
                         head={"name": "classification", "options": {"num_classes": 2}})
    assert kerasllm.build_model(config, tokenizer).heads[0].representation == expected


def test_last_token_is_the_last_real_token(tokenizer):
    """A decoder's classifier reads the last real token of each row, whatever its padding."""
    config = tiny_config(model={"kind": "decoder", "num_segments": 0}, objectives=[],
                         head={"name": "classification", "options": {"num_classes": 2}})
    model = kerasllm.build_model(config, tokenizer)
    examples = tf.data.Dataset.from_tensor_slices(
        {"text": ["a short one", "a somewhat longer text than the other"], "label": [0, 1]})
    x, _ = next(iter(build_dataset(model, examples, 2, 16)))
    head = model.heads[0]
    sequence_output = model.backbone(x)["sequence_output"]
    last = x["padding_mask"].numpy().sum(axis=1) - 1
    expected = head.output_dense(tf.stack([sequence_output[i, last[i]] for i in range(2)]))
    np.testing.assert_allclose(model(x)["classification"], expected, rtol=1e-5, atol=1e-6)
