"""The `distill` objective: the loss against a numpy reference, training, the
frozen teacher, saving, errors."""

import shutil
import zipfile

import h5py
import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from conftest import SPECIAL_TOKENS, tiny_config

import kerasllm
from helpers import serve_in_fresh_process
from kerasllm.data import build_dataset, split_heldout

STUDENT = {"num_layers": 1, "hidden_dim": 16, "num_heads": 2, "intermediate_dim": 32,
           "pooler": False}


@pytest.fixture(scope="module")
def corpus(documents):
    return tf.data.Dataset.from_tensor_slices({"text": documents})


@pytest.fixture(scope="module")
def teacher_path(tokenizer, corpus, tmp_path_factory):
    """A tiny encoder trained with mlm for 60 steps, saved."""
    keras.utils.set_random_seed(0)
    teacher = kerasllm.build_model(tiny_config(), tokenizer)
    training, _ = split_heldout(corpus, 0.1)
    teacher.fit(build_dataset(teacher, training, 8, 32, shuffle_buffer=512, seed=0, repeat=True),
                steps_per_epoch=60, epochs=1, verbose=0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.keras"
    teacher.save(path)
    return path


def student(tokenizer, teacher, objective="mlm", model=STUDENT, **options):
    keras.utils.set_random_seed(1)
    if objective == "distill":
        objectives = [{"name": "distill", "options": {"teacher": str(teacher), **options}}]
    else:
        objectives = [{"name": objective}]
    return kerasllm.build_model(tiny_config(model=model, objectives=objectives), tokenizer)


def eval_batches(model, corpus, seed=0):
    _, heldout = split_heldout(corpus, 0.1)
    return build_dataset(model, heldout, 8, 32, shuffle_buffer=256, seed=seed).take(4).cache()


def saved_weights(path):
    """Names of the model's arrays in a ``.keras`` file (the optimizer's left out)."""
    with zipfile.ZipFile(path) as archive, h5py.File(
            archive.open("model.weights.h5"), "r") as weights:
        names = []
        weights.visititems(lambda name, item: names.append(name) if isinstance(
            item, h5py.Dataset) and not name.startswith("optimizer/") else None)
    return names


def test_student_learns_from_a_frozen_unsaved_teacher(tokenizer, corpus, teacher_path, tmp_path):
    model = student(tokenizer, teacher_path, "distill")
    head = model.get_head("distill")
    teacher = head.teacher.model
    teacher_weights = [w.copy() for w in teacher.get_weights()]
    batches = eval_batches(model, corpus)
    before = model.evaluate(batches, verbose=0, return_dict=True)
    training, _ = split_heldout(corpus, 0.1)
    model.fit(build_dataset(model, training, 8, 32, shuffle_buffer=512, seed=0, repeat=True),
              steps_per_epoch=60, epochs=1, verbose=0)
    after = model.evaluate(batches, verbose=0, return_dict=True)
    assert after["distill_loss"] < before["distill_loss"] - 0.5, (before, after)
    assert after["distill_kl"] < before["distill_kl"], (before, after)  # closer to the teacher
    assert after["distill_mlm_loss"] < before["distill_mlm_loss"], (before, after)  # hard labels

    # The teacher is never trained, nor part of the student's weights or file.
    for old, new in zip(teacher_weights, teacher.get_weights()):
        np.testing.assert_array_equal(old, new)
    plain = student(tokenizer, teacher_path)
    assert len(model.weights) == len(plain.weights)
    assert not {id(w) for w in teacher.weights} & {id(w) for w in model.weights}
    model.save(tmp_path / "student.keras")
    plain.save(tmp_path / "plain.keras")
    assert len(saved_weights(tmp_path / "student.keras")) == len(
        saved_weights(tmp_path / "plain.keras")) == len(model.weights)

    # Reloading rebuilds the teacher from its file, student weights restored.
    x, _ = next(iter(batches))
    restored = kerasllm.load_model(tmp_path / "student.keras")
    for key, value in model(x)["distill"].items():
        np.testing.assert_array_equal(restored(x)["distill"][key], value)
    # ... and needs it.
    moved = tmp_path / "elsewhere.keras"
    shutil.copy(teacher_path, moved)
    model = student(tokenizer, moved, "distill")
    model.save(tmp_path / "orphan.keras")
    moved.unlink()
    with pytest.raises(kerasllm.ConfigError, match="teacher model not found: .*elsewhere.keras"):
        kerasllm.load_model(tmp_path / "orphan.keras")


def test_loss_matches_a_numpy_reference(tokenizer, corpus, teacher_path):
    temperature, soft_weight = 3.0, 0.7
    model = student(tokenizer, teacher_path, "distill", temperature=temperature,
                    soft_weight=soft_weight)
    head = model.get_head("distill")
    x, y = next(iter(eval_batches(model, corpus)))
    predictions = model(x)["distill"]
    # The teacher saw the student's inputs, masks included.
    teacher = kerasllm.load_model(teacher_path)
    np.testing.assert_allclose(predictions["teacher_logits"], teacher(x)["mlm"], atol=1e-5)

    def log_softmax(logits):
        logits = logits - logits.max(-1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

    student_logits = predictions["logits"].numpy().astype(np.float64)
    teacher_logits = predictions["teacher_logits"].numpy().astype(np.float64)
    ids, weights = y["distill"]["ids"].numpy(), y["distill"]["weights"].numpy()
    p = log_softmax(teacher_logits / temperature)
    q = log_softmax(student_logits / temperature)
    kl = (np.exp(p) * (p - q)).sum(-1)
    kl = (kl * weights).sum() / weights.sum()
    hard = -np.take_along_axis(log_softmax(student_logits), ids[..., None], -1)[..., 0]
    hard = (hard * weights).sum() / weights.sum()
    assert kl > 0.01
    np.testing.assert_allclose(head.kl(y["distill"], predictions), kl, rtol=1e-5)
    np.testing.assert_allclose(
        head.compute_loss(y["distill"], predictions),
        (1 - soft_weight) * hard + soft_weight * temperature ** 2 * kl, rtol=1e-5)


def test_soft_weight_zero_is_the_plain_objective(tokenizer, corpus, teacher_path):
    model = student(tokenizer, teacher_path, "distill", soft_weight=0.0)
    plain = student(tokenizer, teacher_path)
    plain.backbone.set_weights(model.backbone.get_weights())
    plain.get_head("mlm").lm_head.set_weights(
        model.get_head("distill").objective.lm_head.get_weights())
    batches, plain_batches = eval_batches(model, corpus), eval_batches(plain, corpus)
    # The same masks: distill prepares through its own copy of mlm.
    for (x, y), (plain_x, plain_y) in zip(batches, plain_batches):
        tf.nest.map_structure(np.testing.assert_array_equal, x, plain_x)
        tf.nest.map_structure(np.testing.assert_array_equal, y["distill"], plain_y["mlm"])
    result = model.evaluate(batches, verbose=0, return_dict=True)
    expected = plain.evaluate(plain_batches, verbose=0, return_dict=True)
    np.testing.assert_allclose(result["distill_loss"], expected["mlm_loss"], rtol=1e-6)
    np.testing.assert_allclose(result["distill_mlm_accuracy"], expected["mlm_accuracy"])


def test_a_causal_teacher_copied_into_its_student_has_zero_kl(tokenizer, corpus, tmp_path):
    config = {"kind": "decoder", "num_segments": 0}
    keras.utils.set_random_seed(2)
    teacher = kerasllm.build_model(
        tiny_config(model=config, objectives=[{"name": "clm"}]), tokenizer)
    teacher.save(tmp_path / "clm.keras")
    model = kerasllm.build_model(tiny_config(model=config, objectives=[
        {"name": "distill", "options": {"teacher": str(tmp_path / "clm.keras")}}]), tokenizer)
    model.backbone.set_weights(teacher.backbone.get_weights())
    x, y = next(iter(eval_batches(model, corpus)))
    predictions = model(x)["distill"]
    assert predictions["logits"].shape == (*x["token_ids"].shape, tokenizer.vocabulary_size())
    # Next-token targets at every position, teacher and student aligned.
    assert abs(float(model.get_head("distill").kl(y["distill"], predictions))) < 1e-5
    # The loss is then the hard term alone, weighted by 1 - soft_weight (0.5).
    np.testing.assert_allclose(
        model.compute_loss(x, y, model(x)),
        0.5 * teacher.compute_loss(x, {"clm": y["distill"]}, teacher(x)), rtol=1e-5)


def test_an_exported_student_serves_its_embedding_without_the_teacher(tokenizer, teacher_path,
                                                                     tmp_path):
    from kerasllm.task_inputs import pack_texts

    model = student(tokenizer, teacher_path, "distill")
    texts = ["The pass statement does nothing.", "", "for loops iterate " * 20]
    path, (served,) = serve_in_fresh_process(model, tmp_path, [
        ("serving_default", {"text": np.array(texts, object)})])
    assert set(served) == {"embedding"}
    # No pooler: the mean of the final hidden states over the real tokens.
    rows = pack_texts({"text": tf.constant(texts)}, tokenizer, 32)
    hidden = model.backbone({key: rows[key] for key in model.backbone.input_keys})
    mask = rows["padding_mask"].numpy()[..., None]
    expected = (hidden["sequence_output"].numpy() * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(served["embedding"], expected, rtol=0, atol=1e-5)
    # The teacher's weights stay out of the SavedModel as out of the .keras file.
    teacher_size = sum(w.size for w in model.get_head("distill").teacher.model.get_weights())
    saved = tf.train.load_checkpoint(str(path / "variables" / "variables"))
    assert sum(np.prod(shape) for shape in saved.get_variable_to_shape_map().values()) \
        < teacher_size


def test_errors(tokenizer, teacher_path, tmp_path):
    with pytest.raises(kerasllm.ConfigError, match="teacher model not found: .*missing"):
        student(tokenizer, tmp_path / "missing", "distill")
    with pytest.raises(kerasllm.ConfigError, match="temperature must be a number > 0"):
        student(tokenizer, teacher_path, "distill", temperature=0)
    with pytest.raises(kerasllm.ConfigError, match=r"soft_weight must be in \[0, 1\]"):
        student(tokenizer, teacher_path, "distill", soft_weight=1.5)
    with pytest.raises(kerasllm.ConfigError, match="objectives\\[0\\].options.teacher"):
        kerasllm.build_model(tiny_config(objectives=[{"name": "distill"}]), tokenizer)

    other = keras_hub.models.BertTokenizer(
        vocabulary=SPECIAL_TOKENS + [f"w{i}" for i in range(40)])
    small = kerasllm.build_model(tiny_config(), other)
    small.save(tmp_path / "other_vocabulary.keras")
    with pytest.raises(kerasllm.ConfigError, match=(
            f"different vocabulary \\(45 tokens\\) from the student's tokenizer "
            f"\\({tokenizer.vocabulary_size()} tokens\\)")):
        student(tokenizer, tmp_path / "other_vocabulary.keras", "distill")

    classifier = kerasllm.build_model(tiny_config(objectives=[{"name": "nsp"}]), tokenizer)
    classifier.save(tmp_path / "nsp.keras")
    with pytest.raises(kerasllm.ConfigError, match="token-prediction objective .* it has 'nsp'"):
        student(tokenizer, tmp_path / "nsp.keras", "distill")

    with pytest.raises(kerasllm.ConfigError, match="set model.kind: encoder"):
        student(tokenizer, teacher_path, "distill", model={"kind": "decoder", "pooler": False})

    longer = student(tokenizer, teacher_path, "distill",
                     model={**STUDENT, "max_sequence_length": 64})
    with pytest.raises(ValueError, match="longer than the teacher's max_sequence_length"):
        build_dataset(longer, tf.data.Dataset.from_tensor_slices({"text": ["a b"]}), 2, 64)
