"""The `multiple_choice` head: picks which language-reference section a paragraph
comes from, on held-out paragraphs, well above chance; shapes, errors, saving."""

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf
from pydoc_data.topics import topics

import kerasllm
from conftest import tiny_config
from helpers import assert_keras_round_trip, serve_in_fresh_process
from kerasllm.data import build_dataset
from kerasllm.evaluation import evaluate

NUM_CHOICES = 4
SECTIONS = NUM_CHOICES
SEQUENCE_LENGTH = 32
STEPS = 250


def section_paragraphs(count):
    """(paragraph, section title) of the ``count`` pydoc-topic sections with the most
    paragraphs. Paragraphs found in several sections ("Compound statements" repeats
    the ``try`` section's) are left out: their title would be ambiguous."""
    titles = collections.defaultdict(set)
    for document in topics.values():
        title, *paragraphs = document.split("\n\n")
        for paragraph in paragraphs:
            paragraph = " ".join(paragraph.split())
            if len(paragraph.split()) >= 8:
                titles[paragraph].add(title.split("\n")[0].strip())
    pairs = sorted((paragraph, *found) for paragraph, found in titles.items() if len(found) == 1)
    largest = {title for title, _ in collections.Counter(t for _, t in pairs).most_common(count)}
    return [(paragraph, title) for paragraph, title in pairs if title in largest]


def questions(pairs, rng):
    """Each paragraph with the titles of all the sections as its choices, in a
    random order: the choices alone tell nothing but which section is largest."""
    titles = sorted({title for _, title in pairs})
    examples = []
    for paragraph, title in pairs:
        choices = [titles[i] for i in rng.permutation(len(titles))]
        examples.append({"text": paragraph, "choices": choices, "label": choices.index(title)})
    return examples


def as_dataset(examples):
    return tf.data.Dataset.from_tensor_slices({
        "text": [example["text"] for example in examples],
        "choices": [example["choices"] for example in examples],
        "label": np.array([example["label"] for example in examples], "int32")})


def mc_config(**options):
    return tiny_config(
        objectives=[], model={"max_sequence_length": SEQUENCE_LENGTH},
        data={"sequence_length": SEQUENCE_LENGTH},
        training={"steps": STEPS, "learning_rate": 0.003},
        head={"name": "multiple_choice", "options": {"num_choices": NUM_CHOICES, **options}})


@pytest.fixture(scope="module")
def task():
    pairs = section_paragraphs(SECTIONS)
    rng = np.random.default_rng(0)
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    heldout = len(pairs) // 5
    return questions(pairs[heldout:], rng), questions(pairs[:heldout], rng)


@pytest.fixture(scope="module")
def trained(tokenizer, task):
    training, _ = task
    keras.utils.set_random_seed(0)
    model = kerasllm.build_model(mc_config(representation="first_token"), tokenizer)
    batches = build_dataset(model, as_dataset(training), 16, SEQUENCE_LENGTH,
                            shuffle_buffer=1024, seed=0, repeat=True)
    model.fit(batches, steps_per_epoch=STEPS, epochs=1, verbose=0)
    return model


@pytest.fixture(scope="module")
def heldout_batches(trained, task):
    """The first 20 held-out examples in batches of 8, 8 and 4."""
    _, heldout = task
    return build_dataset(trained, as_dataset(heldout[:20]), 8, SEQUENCE_LENGTH).cache()


def test_beats_chance_and_the_choices_alone_on_heldout_paragraphs(trained, task):
    training, heldout = task
    # The best guess from the choices alone: the title most often right in training.
    right = collections.Counter(example["choices"][example["label"]] for example in training)
    from_choices = np.mean([
        max(range(NUM_CHOICES), key=lambda i: right[example["choices"][i]]) == example["label"]
        for example in heldout])
    accuracy = evaluate(trained, as_dataset(heldout))["multiple_choice_accuracy"]
    chance = 1 / NUM_CHOICES
    assert accuracy > chance + 0.15 and accuracy > from_choices + 0.1, (
        accuracy, chance, from_choices)


def test_keras_metrics_weigh_every_example_once(trained, heldout_batches):
    """evaluate's loss and accuracy are the means over examples, batches of
    unequal size included."""
    result = trained.evaluate(heldout_batches, verbose=0, return_dict=True)
    scores = np.concatenate([trained(x)["multiple_choice"] for x, _ in heldout_batches])
    labels = np.concatenate([y["multiple_choice"]["labels"] for _, y in heldout_batches])
    log_probabilities = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
    cross_entropy = -log_probabilities[np.arange(len(labels)), labels].mean()
    np.testing.assert_allclose(result["multiple_choice_loss"], cross_entropy, rtol=1e-5)
    np.testing.assert_allclose(result["multiple_choice_accuracy"],
                               np.mean(scores.argmax(axis=1) == labels), rtol=1e-6)


def test_each_pair_is_a_backbone_row(trained, heldout_batches, task, tmp_path):
    _, heldout = task
    x, y = next(iter(heldout_batches))
    assert x["token_ids"].shape == (8, NUM_CHOICES, SEQUENCE_LENGTH)
    assert y["multiple_choice"]["labels"].shape == (8,)
    head = trained.get_head("multiple_choice")
    assert head.transform_inputs(x)["token_ids"].shape == (8 * NUM_CHOICES, SEQUENCE_LENGTH)
    # [CLS] paragraph [SEP] title [SEP], the title in segment 1.
    tokenizer = trained.tokenizer
    pair = x["token_ids"][1, 2].numpy()
    ends = np.flatnonzero(pair == tokenizer.token_to_id("[SEP]"))
    assert pair[0] == tokenizer.token_to_id("[CLS]") and len(ends) == 2
    np.testing.assert_array_equal(pair[ends[0] + 1:ends[1]],
                                  np.asarray(tokenizer(heldout[1]["choices"][2])))
    np.testing.assert_array_equal(x["segment_ids"][1, 2, ends[0] + 1:ends[1] + 1], 1)
    # Each (example, choice) score is the backbone's and the classifier's on that
    # pair alone: the trained head reads the first token, a new one the pooler.
    keras.utils.set_random_seed(1)
    pooled = kerasllm.build_model(mc_config(), tokenizer)
    for model, represent in [(trained, lambda outputs: outputs["sequence_output"][:, 0]),
                             (pooled, lambda outputs: outputs["pooled_output"])]:
        scores = model(x)["multiple_choice"].numpy()
        assert scores.shape == (8, NUM_CHOICES)
        classifier = model.get_head("multiple_choice").output_dense
        for example, choice in [(0, 0), (1, 2), (7, 3)]:
            alone = {key: x[key][example:example + 1, choice] for key in model.backbone.input_keys}
            score = classifier(represent(model.backbone(alone)))
            np.testing.assert_allclose(scores[example, choice], score[0, 0], rtol=1e-4, atol=1e-5)
    assert_keras_round_trip(trained, x, tmp_path)


def test_predict_names_the_chosen_choice(trained, heldout_batches, task):
    _, heldout = task
    inputs = [{"text": example["text"], "choices": example["choices"]} for example in heldout[:8]]
    answers = trained.predict(inputs)
    x, _ = next(iter(heldout_batches))
    probabilities = tf.nn.softmax(trained(x)["multiple_choice"]).numpy()
    assert len(answers) == 8
    for answer, example, expected in zip(answers, inputs, probabilities):
        np.testing.assert_allclose(answer["probabilities"], expected, rtol=1e-4, atol=1e-6)
        assert answer["label"] == expected.argmax()
        assert answer["choice"] == example["choices"][answer["label"]]
        assert answer["score"] == pytest.approx(expected.max(), rel=1e-4)


def test_serving_answers_as_predict_does(trained, heldout_batches, task, tmp_path):
    _, heldout = task
    inputs = [{"text": example["text"], "choices": example["choices"]} for example in heldout[:8]]
    inputs.append({"text": "", "choices": ["", "pass", "del", "with"]})
    x, _ = next(iter(heldout_batches))
    pairs = {key: x[key].numpy().reshape(8 * NUM_CHOICES, SEQUENCE_LENGTH)
             for key in trained.backbone.input_keys}
    _, (served, from_ids) = serve_in_fresh_process(trained, tmp_path, [
        ("serving_default", {"text": np.array([i["text"] for i in inputs], object),
                             "choices": np.array([i["choices"] for i in inputs], object)}),
        ("serve_token_ids", pairs)])
    answers = trained.predict(inputs)
    assert served["probabilities"].shape == (9, NUM_CHOICES)
    assert served["choice_ids"].dtype == np.int32 and served["score"].dtype == np.float32
    np.testing.assert_allclose(served["probabilities"], [a["probabilities"] for a in answers],
                               rtol=0, atol=1e-5)
    assert served["choice_ids"].tolist() == [a["label"] for a in answers]
    assert [t.decode() for t in served["choice_text"]] == [a["choice"] for a in answers]
    np.testing.assert_allclose(served["score"], [a["score"] for a in answers], rtol=0, atol=1e-5)
    # One pair per row: an example's logits, softmaxed, are its probabilities.
    assert set(from_ids) == {"logits"} and from_ids["logits"].shape == (8 * NUM_CHOICES,)
    np.testing.assert_allclose(
        tf.nn.softmax(from_ids["logits"].reshape(8, NUM_CHOICES)), served["probabilities"][:8],
        rtol=0, atol=1e-5)


def test_a_wrong_number_of_choices_fails_naming_the_field(trained):
    three = {"text": "The pass statement does nothing.", "choices": ["pass", "del", "with"]}
    four = {**three, "choices": three["choices"] + ["for"]}
    # The message names the field, then the example (1) and its count (3).
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"choices must hold num_choices=4 .* do not:\] \[1\] \[3\]"):
        trained.predict([four, three])
    # A data source of fixed-length lists fails before training starts.
    fixed = tf.data.Dataset.from_tensor_slices({"text": [three["text"]],
                                                "choices": [three["choices"]]})
    with pytest.raises(ValueError, match="'choices' holds 3 strings per example, but the head "
                                         "has num_choices=4"):
        build_dataset(trained, fixed, 1, SEQUENCE_LENGTH)


def test_a_label_outside_the_choices_fails(trained):
    examples = as_dataset([{"text": "The pass statement does nothing.",
                            "choices": ["pass", "del", "with", "for"], "label": 4}])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"label must be a choice index in \[0, 4\).* are not:\] \[0\] \[4\]"):
        list(build_dataset(trained, examples, 1, SEQUENCE_LENGTH))


@pytest.mark.parametrize("num_choices, message", [
    (None, "give num_choices"), (1, "num_choices must be an integer >= 2, got 1"),
    ("4", "num_choices must be an integer >= 2, got '4'")])
def test_num_choices_is_checked(tokenizer, num_choices, message):
    config = mc_config()
    config["head"]["options"]["num_choices"] = num_choices
    with pytest.raises(kerasllm.ConfigError, match=f"head.options: .*{message}"):
        kerasllm.build_model(config, tokenizer)


def test_num_choices_is_inferred_from_the_training_examples(task):
    from kerasllm_plugins.multiple_choice import MultipleChoice

    training, _ = task
    assert MultipleChoice.infer_options(as_dataset(training), {}) == {"num_choices": 4}
    assert MultipleChoice.infer_options(as_dataset(training), {"num_choices": 5}) == {
        "num_choices": 5}
