"""The tf.data pipeline: packing, document isolation, seeds, sharding, multi-task mixing."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_config

import kerasllm
from kerasllm.data import build_dataset, mix, mixing_rates, padding_fraction
from kerasllm.model import HEADS_PRESENT


@pytest.fixture
def model(tokenizer):
    return kerasllm.build_model(tiny_config(objectives=[{"name": "clm"}],
                                            model={"kind": "decoder"}), tokenizer)


def document_stream(tokenizer, documents):
    """Each document's ids wrapped as the pipeline wraps them: [CLS] ... [SEP]."""
    return [[tokenizer.cls_token_id, *np.asarray(tokenizer(text)).tolist(), tokenizer.sep_token_id]
            for text in documents]


def rows_of(model, examples, **options):
    rows = []
    for x, _ in build_dataset(model, examples, 8, 32, **options):
        rows += list(zip(x["token_ids"].numpy(), x["padding_mask"].numpy()))
    return rows


def test_packing_keeps_every_token_in_order(model, tokenizer, documents):
    wrapped = document_stream(tokenizer, documents[:40])
    assert max(map(len, wrapped)) > 32  # long documents continue on the next rows
    rows = rows_of(model, tf.data.Dataset.from_tensor_slices({"text": documents[:40]}))
    stream = [token for ids, mask in rows for token, real in zip(ids, mask) if real]
    assert stream == [token for document in wrapped for token in document]
    # Only the very last row is padded.
    assert all(mask.all() for _, mask in rows[:-1]) and not rows[-1][1].all()


def test_padding_mask_numbers_the_documents_of_each_row(model, tokenizer, documents):
    texts = ["first document here", "second", "the third and last one"]
    lengths = [len(document) for document in document_stream(tokenizer, texts)]
    (ids, mask), = rows_of(model, tf.data.Dataset.from_tensor_slices({"text": texts}))
    expected = np.repeat([1, 2, 3], lengths)
    np.testing.assert_array_equal(mask[:len(expected)], expected)
    assert (mask[len(expected):] == 0).all()


def test_without_packing_each_row_holds_one_document(model, tokenizer, documents):
    examples = tf.data.Dataset.from_tensor_slices({"text": documents[:40]})
    rows = rows_of(model, examples, packing=False)
    wrapped = document_stream(tokenizer, documents[:40])
    assert len(rows) == sum(-(-len(document) // 32) for document in wrapped)
    assert all(set(mask) <= {0, 1} for _, mask in rows)
    stream = [token for ids, mask in rows for token, real in zip(ids, mask) if real]
    assert stream == [token for document in wrapped for token in document]
    packed = padding_fraction(build_dataset(model, examples, 8, 32))
    unpacked = padding_fraction(build_dataset(model, examples, 8, 32, packing=False))
    assert packed < 0.01 < unpacked


def test_attention_stays_within_each_packed_document(tokenizer):
    model = kerasllm.build_model(tiny_config(), tokenizer)  # a bidirectional encoder
    rng = np.random.default_rng(0)
    token_ids = rng.integers(5, 900, (1, 32)).astype("int32")
    documents = np.repeat([[1, 2, 3]], [10, 12, 10], axis=1).astype("int32")
    inputs = {"token_ids": token_ids, "padding_mask": documents,
              "segment_ids": np.zeros_like(token_ids)}
    changed = token_ids.copy()
    changed[:, 10:22] = rng.integers(5, 900, 12)  # the second document only
    before = model.backbone(inputs)["sequence_output"].numpy()
    after = model.backbone({**inputs, "token_ids": changed})["sequence_output"].numpy()
    np.testing.assert_allclose(after[:, :10], before[:, :10], atol=1e-6)
    np.testing.assert_allclose(after[:, 22:], before[:, 22:], atol=1e-6)
    assert np.abs(after[:, 10:22] - before[:, 10:22]).max() > 1e-3


def test_causal_lm_never_predicts_across_documents(model, tokenizer):
    texts = ["first document here", "second one"]
    x, y = next(iter(build_dataset(model, tf.data.Dataset.from_tensor_slices({"text": texts}),
                                   8, 32)))
    documents = x["padding_mask"].numpy()[0]
    weights = y["clm"]["weights"].numpy()[0]
    boundary = np.flatnonzero(np.diff(documents))[0]  # the first document's [SEP]
    assert weights[boundary] == 0 and weights[:boundary].all()
    assert weights[boundary + 1:(documents == 2).sum() + boundary].all()
    assert weights[documents == 0].sum() == 0


def test_shuffling_follows_the_seed_and_resuming_skips_exactly(model, examples):
    def batches(seed, skip=0, take=6):
        dataset = build_dataset(model, examples, 8, 32, shuffle_buffer=256, seed=seed,
                                repeat=True).skip(skip).take(take)
        return [x["token_ids"].numpy() for x, _ in dataset]

    first = batches(3)
    for a, b in zip(first, batches(3)):
        np.testing.assert_array_equal(a, b)
    assert any((a != b).any() for a, b in zip(first, batches(4)))
    for a, b in zip(first[2:], batches(3, skip=2, take=4)):
        np.testing.assert_array_equal(a, b)


def test_each_worker_reads_its_own_share(model, examples):
    def rows(pipelines, index):
        context = tf.distribute.InputContext(pipelines, index, 1)
        dataset = build_dataset(model, examples, 8, 32, packing=False, input_context=context)
        return sorted(tuple(row) for x, _ in dataset for row in x["token_ids"].numpy())

    first, second = rows(2, 0), rows(2, 1)
    assert abs(len(first) - len(second)) < 0.2 * len(first)
    assert sorted(first + second) == rows(1, 0)  # every row read once, by one worker


def test_an_encoder_decoder_needs_an_objective_that_makes_decoder_inputs(tokenizer, examples):
    model = kerasllm.build_model(tiny_config(objectives=[{"name": "clm"}], model={
        "kind": "encoder_decoder", "num_segments": 0}), tokenizer)
    with pytest.raises(kerasllm.ConfigError, match="such as `span`"):
        build_dataset(model, examples, 8, 32)


def test_mixing_rates():
    assert mixing_rates([100, 300], 1.0) == pytest.approx([0.25, 0.75])
    assert mixing_rates([100, 400], 2.0) == pytest.approx([1 / 3, 2 / 3])
    assert mixing_rates([1, 10**6], 1e6) == pytest.approx([0.5, 0.5], abs=1e-4)


def test_multi_task_batches_train_each_head_on_its_own_data(tokenizer, documents):
    labelled = tf.data.Dataset.from_tensor_slices(
        {"text": documents[:64], "label": [i % 2 for i in range(64)]})
    config = tiny_config(
        objectives=[{"name": "mlm"}],
        heads=[{"name": "classification", "weight": 0.5, "options": {"num_classes": 2},
                "data": {"source": "iterable", "options": {"items": []}}}])
    model = kerasllm.build_model(config, tokenizer)
    mlm, classification = model.heads
    plain = tf.data.Dataset.from_tensor_slices({"text": documents})
    batches = mix(model, [
        ([mlm], build_dataset(model, plain, 8, 32, heads=[mlm], repeat=True)),
        ([classification], build_dataset(model, labelled, 8, 32, heads=[classification],
                                         repeat=True)),
    ], [0.75, 0.25], seed=0)
    present = np.array([y[HEADS_PRESENT].numpy() for _, y in batches.take(400)])
    assert present.shape == (400, 8, 2)  # a row per example, so batches split whole
    assert (present == present[:, :1]).all()
    present = present[:, 0]
    assert set(map(tuple, present)) == {(1.0, 0.0), (0.0, 1.0)}
    assert abs(present[:, 0].mean() - 0.75) < 0.06

    # A batch counts for its own head only: in the loss and in the metrics.
    keras.utils.set_random_seed(0)
    (x, y), = batches.filter(lambda x, y: y[HEADS_PRESENT][0, 1] > 0).take(1)
    predictions = model(x)
    total = model.compute_loss(x, y, predictions)
    expected = 0.5 * classification.compute_loss(y["classification"], predictions["classification"])
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    model.compute_metrics(x, y, predictions)
    assert mlm.accuracy.count.numpy() == 0 and classification.accuracy.count.numpy() == 8
    history = model.fit(batches, steps_per_epoch=20, epochs=1, verbose=0)
    assert {"mlm_loss", "classification_loss", "mlm_accuracy",
            "classification_accuracy"} <= set(history.history)


def test_a_prefix_attends_both_ways_in_a_decoder(tokenizer):
    model = kerasllm.build_model(tiny_config(objectives=[{"name": "clm"}],
                                             model={"kind": "decoder"}), tokenizer)
    rng = np.random.default_rng(0)
    token_ids = rng.integers(5, 900, (1, 16)).astype("int32")
    prefix = np.array([[-1] * 6 + [1] * 10], "int32")  # 6 prefix tokens, then causal
    changed = token_ids.copy()
    changed[0, 5] = (token_ids[0, 5] + 1) % 900  # the last prefix token

    def outputs(ids, mask):
        return model.backbone({"token_ids": ids, "padding_mask": mask,
                               "segment_ids": np.zeros_like(ids)})["sequence_output"].numpy()

    # Causal: position 0 does not see position 5; as a prefix it does.
    np.testing.assert_allclose(outputs(changed, np.ones_like(prefix))[:, :5],
                               outputs(token_ids, np.ones_like(prefix))[:, :5], atol=1e-6)
    assert np.abs(outputs(changed, prefix)[:, :5] - outputs(token_ids, prefix)[:, :5]).max() > 1e-3
    # The targets after the prefix still cannot see the future.
    later = token_ids.copy()
    later[0, 12] = (token_ids[0, 12] + 1) % 900
    np.testing.assert_allclose(outputs(later, prefix)[:, :12], outputs(token_ids, prefix)[:, :12],
                               atol=1e-6)


def test_pretrain_mixes_an_objective_and_a_task_head_with_its_own_data(
        tokenizer, documents, tmp_path):
    from kerasllm.jobs import pretrain

    vocabulary = tmp_path / "vocab.txt"
    vocabulary.write_text("".join(f"{token}\n" for token in tokenizer.get_vocabulary()))
    reviews = [{"text": text, "label": int("return" in text)} for text in documents[:40]]
    lines = []
    config = tiny_config(
        tokenizer={"vocabulary": str(vocabulary)},
        data={"source": "iterable", "options": {"items": documents},
              "mixing_temperature": 2.0, "eval_batches": 2},
        heads=[{"name": "classification", "options": {"num_classes": 2},
                "data": {"source": "iterable", "options": {"items": reviews}}}],
        training={"steps": 20, "steps_per_epoch": 10, "checkpoint_every": 10,
                  "output": str(tmp_path / "run")})
    result = pretrain(config, verbose=0, log=lines.append)
    # Every twentieth example is held out; rates ∝ √size at temperature 2.
    sizes = [len(documents) - -(-len(documents) // 20), 40 - 2]
    rates = [size ** 0.5 / sum(s ** 0.5 for s in sizes) for size in sizes]
    assert (f"Mixing mlm {rates[0]:.1%} ({sizes[0]} examples), classification "
            f"{rates[1]:.1%} ({sizes[1]} examples)") in lines
    assert {"mlm_loss", "mlm_accuracy", "classification_loss",
            "classification_accuracy"} <= set(result["end"])
    assert result["step"] == 20
    assert any(line.startswith("Held-out padding:") for line in lines)
