"""The `electra` objective: replaced-token detection with a generator sharing the embeddings."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_config
from helpers import run_head_test, serve_in_fresh_process
from kerasllm_plugins.electra import sample_tokens

import kerasllm
from kerasllm.data import build_dataset, split_heldout
from kerasllm.tokenizers import special_tokens

ELECTRA = {"objectives": [{"name": "electra"}]}


def electra_model(tokenizer, options=None, **sections):
    config = tiny_config(objectives=[{"name": "electra", "options": options or {}}], **sections)
    return kerasllm.build_model(config, tokenizer)


@pytest.fixture(scope="module")
def trained(tokenizer, documents):
    """A tiny ELECTRA trained for 100 steps: (model, held-out metrics before, after, a batch)."""
    examples = tf.data.Dataset.from_tensor_slices({"text": documents})
    return run_head_test(tiny_config(**ELECTRA), tokenizer, examples, steps=100)


def test_generator_and_discriminator_losses_fall(trained):
    _, before, after, _ = trained
    print("before", before, "after", after)
    # The generator learns the masked LM: from ln(1000) ≈ 6.9 towards the unigram entropy.
    assert before["electra_generator_loss"] > 6.5
    assert after["electra_generator_loss"] < before["electra_generator_loss"] - 0.5, after
    assert after["electra_generator_accuracy"] > before["electra_generator_accuracy"] + 0.05
    # The discriminator starts at ln 2 and, in 100 steps, reaches the entropy of
    # the base rate of replaced tokens (a generator this small has learned the
    # unigram distribution, so its samples are only told apart by context).
    assert before["electra_discriminator_loss"] > 0.65
    assert after["electra_discriminator_loss"] < before["electra_discriminator_loss"] - 0.2
    rate = after["electra_replaced_fraction"]
    assert 0.1 < rate < 0.16
    base_rate_entropy = -rate * np.log(rate) - (1 - rate) * np.log(1 - rate)
    assert after["electra_discriminator_loss"] < base_rate_entropy + 0.01, (after, base_rate_entropy)
    # The total is the generator's loss + 50 × the discriminator's.
    np.testing.assert_allclose(
        after["electra_loss"],
        after["electra_generator_loss"] + 50 * after["electra_discriminator_loss"], rtol=1e-4)


def test_discriminator_detects_random_replacements(trained, tokenizer, documents):
    """Early in training the generator is close to uniform, and the discriminator
    learns to spot tokens out of place: replace the selected tokens of held-out
    text with uniformly random ones (the official code's `uniform_generator`) and
    it ranks them above the originals. Real text without `mask_positions` goes
    to the discriminator uncorrupted."""
    model = trained[0]
    examples = tf.data.Dataset.from_tensor_slices({"text": documents})
    _, heldout = split_heldout(examples, 0.1)
    random = np.random.default_rng(0)
    labels, scores = [], []
    for x, y in build_dataset(model, heldout, 64, 32).take(4):
        original = y["electra"]["token_ids"].numpy()
        corrupted = original.copy()
        selected = x["mask_positions"].numpy(), y["electra"]["weights"].numpy() > 0
        rows = np.repeat(np.arange(len(original))[:, None], selected[0].shape[1], 1)
        rows, positions = rows[selected[1]], selected[0][selected[1]]
        corrupted[rows, positions] = random.integers(5, tokenizer.vocabulary_size(), len(rows))
        text = {"token_ids": tf.constant(corrupted, tf.int32),
                "padding_mask": x["padding_mask"], "segment_ids": x["segment_ids"]}
        predictions = model(text)["electra"]
        assert set(predictions) == {"discriminator_logits"}
        real = y["electra"]["token_weights"].numpy() > 0
        labels.append((corrupted != original)[real])
        scores.append(predictions["discriminator_logits"].numpy()[real])
    labels, scores = np.concatenate(labels), np.concatenate(scores)
    assert labels.sum() > 500
    auc = detection_auc(labels, scores)
    print("random-replacement AUC", auc)
    assert auc > 0.7


def detection_auc(labels, scores):
    """Probability that a replaced token scores above an original one."""
    ranks = np.argsort(np.argsort(scores)) + 1
    replaced = labels.sum()
    return (ranks[labels].sum() - replaced * (replaced + 1) / 2) / (
        replaced * (len(labels) - replaced))


def test_corruption_statistics(trained, tokenizer, documents):
    """On the corpus: 15% of the selectable tokens selected, 85% of those shown
    to the generator as [MASK] and 15% unchanged; after sampling, tokens change
    only at selected positions, and a selection keeps its original token as
    often as the generator's softmax gives that token."""
    model = trained[0]
    head = model.get_head("electra")
    tokens = special_tokens(tokenizer)
    specials = [tokens.pad, tokens.start, tokens.end, tokens.mask]
    examples = tf.data.Dataset.from_tensor_slices({"text": documents})
    counts = dict.fromkeys(["real", "selectable", "selected", "mask", "unchanged", "other",
                            "replaced", "kept", "expected_kept", "kept_variance"], 0.0)
    corrupt = tf.function(lambda x: head.transform_inputs(x, training=True))
    for x, y in build_dataset(model, examples, 64, 32):
        targets = y["electra"]
        original = targets["token_ids"].numpy()
        real = targets["token_weights"].numpy() > 0
        weights = targets["weights"].numpy() > 0
        positions = x["mask_positions"].numpy()
        rows = np.repeat(np.arange(len(original))[:, None], positions.shape[1], 1)
        rows, positions = rows[weights], positions[weights]
        np.testing.assert_array_equal(targets["ids"].numpy()[weights], original[rows, positions])
        masked_input = x["token_ids"].numpy()[rows, positions]
        selectable = real & ~np.isin(original, specials)
        # Each row selects round(15%) of its selectable tokens (BERT's budget).
        np.testing.assert_array_equal(weights.sum(1),
                                      np.floor(0.15 * selectable.sum(1) + 0.5))
        counts["real"] += real.sum()
        counts["selectable"] += selectable.sum()
        counts["selected"] += len(rows)
        counts["mask"] += (masked_input == tokens.mask).sum()
        counts["unchanged"] += (masked_input == original[rows, positions]).sum()
        counts["other"] += ((masked_input != tokens.mask)
                            & (masked_input != original[rows, positions])).sum()

        transformed = corrupt(x)
        corrupted = transformed["token_ids"].numpy()
        selected = np.zeros_like(real)
        selected[rows, positions] = True
        # Only selected tokens change; specials and padding never do.
        np.testing.assert_array_equal(corrupted[~selected], original[~selected])
        replaced = corrupted != original
        assert (replaced.sum(1) <= selected.sum(1)).all()
        counts["replaced"] += replaced.sum()
        counts["kept"] += (selected & ~replaced).sum()
        probabilities = tf.nn.softmax(transformed["electra_generator_logits"]).numpy()
        p_original = np.take_along_axis(probabilities, targets["ids"].numpy()[..., None],
                                        -1)[..., 0][weights]
        counts["expected_kept"] += p_original.sum()
        counts["kept_variance"] += (p_original * (1 - p_original)).sum()
    assert counts["selectable"] >= 100_000, counts
    # Rounding each row's budget: 15% ± 1 point on rows of 32.
    assert abs(counts["selected"] / counts["selectable"] - 0.15) < 0.01, counts
    assert abs(counts["mask"] / counts["selected"] - 0.85) < 0.01, counts
    assert abs(counts["unchanged"] / counts["selected"] - 0.15) < 0.01, counts
    assert counts["other"] == 0  # random_token_rate 0: no random tokens
    assert counts["replaced"] + counts["kept"] == counts["selected"]
    # A trained generator samples the original token now and then (a few percent);
    # the number kept matches the softmax's expectation within 4 standard deviations.
    assert counts["kept"] > 100
    assert abs(counts["kept"] - counts["expected_kept"]) < 4 * np.sqrt(counts["kept_variance"]), \
        counts
    print({key: int(value) for key, value in counts.items()},
          counts["selected"] / counts["real"], counts["replaced"] / counts["real"])


def test_samples_follow_the_softmax():
    probabilities = np.array([0.6, 0.3, 0.1, 0.0])
    logits = tf.constant(np.log(np.maximum(probabilities, 1e-30)), tf.float32)
    logits = tf.tile(logits[None, None], [1000, 100, 1])
    samples = sample_tokens(logits, tf.constant([3, 4])).numpy()
    assert samples.shape == (1000, 100)
    frequencies = np.bincount(samples.ravel(), minlength=4) / samples.size
    np.testing.assert_allclose(frequencies, probabilities, atol=0.005)
    np.testing.assert_array_equal(samples, sample_tokens(logits, tf.constant([3, 4])))
    assert (samples != sample_tokens(logits, tf.constant([3, 5])).numpy()).any()


def test_labels_are_corrupted_not_equal_original(tokenizer):
    keras.utils.set_random_seed(0)
    model = electra_model(tokenizer)
    head = model.get_head("electra")
    sampled = 100
    # The generator samples token 100 everywhere (its output bias dominates).
    bias = np.zeros(head.generator_head._bias.shape, "float32")
    bias[sampled] = 1e4
    head.generator_head._bias.assign(bias)
    original = np.array([[2, 10, 11, 12, sampled, 14, 15, 16, 3, 0, 0, 0],
                         [2, 20, 21, 22, 23, 3, 2, 30, 31, 3, 0, 0]], "int32")
    padding_mask = np.array([[1] * 9 + [0] * 3, [1] * 6 + [2] * 4 + [0] * 2], "int32")
    positions = np.array([[1, 4, 7, 0], [3, 7, 0, 0]], "int32")
    weights = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], "float32")
    masked = original.copy()
    masked[0, 1] = masked[0, 4] = masked[1, 3] = masked[1, 7] = special_tokens(tokenizer).mask
    x = {"token_ids": masked, "padding_mask": padding_mask, "segment_ids": np.zeros_like(masked),
         "mask_positions": positions, "mask_weights": weights}
    y = {"ids": np.take_along_axis(original, positions, 1) * (weights > 0), "weights": weights,
         "token_ids": original, "token_weights": (padding_mask > 0).astype("float32")}
    predictions = model(x)["electra"]
    expected = original.copy()
    expected[0, [1, 4, 7]] = sampled  # row 0, position 7 was kept as-is for the generator
    expected[1, [3, 7]] = sampled
    np.testing.assert_array_equal(predictions["corrupted_token_ids"], expected)
    labels = np.zeros_like(original, "float32")
    labels[0, [1, 7]] = labels[1, [3, 7]] = 1.0  # position 4 sampled its original: not replaced
    np.testing.assert_array_equal(head.replaced(y, predictions), labels)
    assert predictions["generator_logits"].shape == (2, 4, tokenizer.vocabulary_size())
    assert predictions["discriminator_logits"].shape == (2, 12)

    # The total loss, by hand: mean cross-entropy over selections + 50 × mean
    # sigmoid cross-entropy over real tokens (the generator back to its own
    # samples, so that neither term dwarfs the other).
    assert head.discriminator_weight == 50
    head.generator_head._bias.assign(np.zeros_like(bias))
    predictions = model(x)["electra"]
    labels = head.replaced(y, predictions).numpy()
    assert labels.sum() >= 4
    logits = predictions["generator_logits"].numpy().astype("float64")
    log_softmax = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
        -1, keepdims=True)) - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(log_softmax, y["ids"][..., None], -1)[..., 0]
    generator = -(picked * weights).sum() / weights.sum()
    z = predictions["discriminator_logits"].numpy().astype("float64")
    bce = np.maximum(z, 0) - z * labels + np.log1p(np.exp(-np.abs(z)))
    real = y["token_weights"]
    discriminator = (bce * real).sum() / real.sum()
    np.testing.assert_allclose(head.compute_loss(y, predictions),
                               generator + 50 * discriminator, rtol=1e-5)
    np.testing.assert_allclose(model.compute_loss(x, {"electra": y}, {"electra": predictions}),
                               generator + 50 * discriminator, rtol=1e-5)
    heavier = electra_model(tokenizer, {"discriminator_weight": 10})
    assert heavier.get_head("electra").discriminator_weight == 10


def test_token_embedding_is_shared(trained, tokenizer, examples):
    model = trained[0]
    head = model.get_head("electra")
    backbone = model.backbone
    assert head.embedding is backbone.embedding
    assert head.generator_head.token_embedding is backbone.token_embedding
    table = backbone.token_embedding.embeddings
    assert sum(weight is table for weight in model.trainable_weights) == 1
    assert len({id(w) for w in model.trainable_weights}) == len(model.trainable_weights)
    # The generator owns no vocabulary table of its own.
    own = [w for w in head.weights if all(w is not b for b in backbone.weights)]
    assert not [w for w in own if len(w.shape) == 2 and tokenizer.vocabulary_size() in w.shape]
    # Both losses train the shared table; the generator loss does not reach the
    # discriminator's blocks (the samples are discrete).
    x, y = next(iter(build_dataset(model, examples.take(16), 8, 32)))
    with tf.GradientTape(persistent=True) as tape:
        predictions = model(x, training=True)["electra"]
        generator, discriminator = head.losses(y["electra"], predictions)
    block = backbone.decoder_stack[0][0].attention.query.kernel
    for loss in (generator, discriminator):  # sparse gradients: IndexedSlices
        assert np.abs(tf.convert_to_tensor(tape.gradient(loss, table))).sum() > 0
    assert tape.gradient(generator, block) is None
    assert np.abs(tape.gradient(discriminator, block)).sum() > 0


def test_generator_sizes(tokenizer):
    head = electra_model(tokenizer).get_head("electra")
    # A quarter of the width (the official code's default); the backbone's head
    # size (16) and intermediate ratio (2) kept; as deep as the backbone.
    assert (head.generator_hidden_dim, head.generator_num_heads,
            head.generator_intermediate_dim, head.generator_num_layers) == (8, 1, 16, 2)
    assert head.generator_projection is not None
    wide = electra_model(tokenizer, {"generator_hidden_dim": 32, "generator_num_layers": 1})
    head = wide.get_head("electra")
    assert (head.generator_num_heads, head.generator_intermediate_dim) == (2, 64)
    assert head.generator_projection is None and len(head.generator_blocks) == 1


def test_generator_attention_stays_within_documents(tokenizer):
    keras.utils.set_random_seed(0)
    head = electra_model(tokenizer).get_head("electra")
    # Larger attention outputs, so that what a token attends to shows in the logits.
    for block in head.generator_blocks:
        for kernel in (block.attention.value.kernel, block.attention.output_projection.kernel):
            kernel.assign(kernel * 30)
    second = np.arange(40, 50)
    token_ids = np.stack([np.concatenate([np.arange(100, 110), second]),
                          np.concatenate([np.arange(200, 210), second])]).astype("int32")
    positions = np.array([[12, 15], [12, 15]], "int32")

    def logits(padding_mask):
        return head.generate({"token_ids": token_ids, "padding_mask": padding_mask,
                              "segment_ids": np.zeros_like(token_ids),
                              "mask_positions": positions}).numpy()

    packed = logits(np.array([[1] * 10 + [2] * 10] * 2, "int32"))
    np.testing.assert_allclose(packed[0], packed[1], atol=1e-5)
    one_document = logits(np.ones((2, 20), "int32"))
    assert np.abs(one_document[0] - one_document[1]).max() > 1e-3


def test_rotary_pre_norm_encoder(tokenizer, examples):
    model = electra_model(tokenizer, model={
        "position_embedding": "rotary", "norm": "rms", "norm_first": True,
        "activation": "silu", "gated_feed_forward": True, "use_bias": False})
    head = model.get_head("electra")
    assert head.generator_norm is not None
    assert all(block.rotary_theta == 10000.0 for block in head.generator_blocks)
    x, y = next(iter(build_dataset(model, examples.take(16), 8, 32)))
    loss = head.compute_loss(y["electra"], model(x, training=True)["electra"])
    assert np.isfinite(loss.numpy()) and loss > 6


def test_inference_mode_round_trip_and_real_text(trained, tmp_path):
    model, _, _, x = trained
    head = model.get_head("electra")
    state = head.seed_generator.state.numpy().copy()
    first = model(x)
    # Inference mode corrupts reproducibly and leaves the training draws alone.
    keras.tree.map_structure(np.testing.assert_array_equal, first, model(x))
    np.testing.assert_array_equal(head.seed_generator.state.numpy(), state)
    corrupted = first["electra"]["corrupted_token_ids"].numpy()
    assert (corrupted != x["token_ids"].numpy()).any()
    # Training mode draws from the seed stream: new samples on every call.
    draws = [model(x, training=True)["electra"]["corrupted_token_ids"].numpy()
             for _ in range(2)]
    assert (draws[0] != draws[1]).any()

    model.save(tmp_path / "model.keras")
    restored = kerasllm.load_model(tmp_path / "model.keras")
    assert restored.config == model.config
    keras.tree.map_structure(np.testing.assert_array_equal, restored(x), model(x))

    # Real text (no mask_positions): the discriminator scores it uncorrupted.
    text = {key: x[key] for key in model.backbone.input_keys}
    scores = restored(text)["electra"]
    assert set(scores) == {"discriminator_logits"}
    assert scores["discriminator_logits"].shape == x["token_ids"].shape


def test_serving_scores_each_token_of_real_text(trained, tokenizer, tmp_path):
    from kerasllm.task_inputs import pack_texts

    model = trained[0]
    texts = ["The pass statement does nothing.", "", "for loops iterate " * 20]
    rows = {key: value.numpy() for key, value in pack_texts(
        {"text": tf.constant(texts)}, tokenizer, model.config.data.sequence_length).items()}
    request = {key: rows[key] for key in model.backbone.input_keys}
    _, (served, from_ids) = serve_in_fresh_process(model, tmp_path, [
        ("serving_default", {"text": np.array(texts, object)}), ("serve_token_ids", request)])
    logits = model(request)["electra"]["discriminator_logits"].numpy()
    real = rows["padding_mask"] > 0
    expected = np.where(real, 1 / (1 + np.exp(-logits)), 0)
    vocabulary = np.array(tokenizer.get_vocabulary(), object)
    for outputs in (served, from_ids):
        assert outputs["replaced_probabilities"].dtype == np.float32
        np.testing.assert_allclose(outputs["replaced_probabilities"], expected, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(outputs["tokens"].astype(str),
                                      np.where(real, vocabulary[rows["token_ids"]], ""))
    assert served["tokens"][0, 0] == b"[CLS]" and set(served["tokens"][1]) <= {b"[CLS]",
                                                                                 b"[SEP]", b""}
    assert served["embedding"].shape == (3, model.backbone.hidden_dim)


def test_prepare_is_deterministic(tokenizer, examples):
    model = electra_model(tokenizer)

    def first_batch(seed):
        return next(iter(build_dataset(model, examples.take(16), 16, 32, seed=seed)))

    one, two = first_batch(7), first_batch(7)
    keras.tree.map_structure(np.testing.assert_array_equal, one, two)
    assert set(one[0]) == {"token_ids", "padding_mask", "segment_ids", "mask_positions",
                           "mask_weights"}
    assert (first_batch(8)[0]["mask_positions"].numpy()
            != one[0]["mask_positions"].numpy()).any()


@pytest.mark.parametrize("sections, message", [
    ({"model": {"kind": "decoder"}}, "needs model.kind: encoder"),
    ({"model": {"position_embedding": "relative"}}, r"relative \(T5\) position bias"),
    ({"options": {"discriminator_weight": 0}}, "discriminator_weight must be positive"),
    ({"options": {"generator_hidden_dim": 10, "generator_num_heads": 4}},
     r"generator_hidden_dim \(10\) must be divisible by generator_num_heads \(4\)"),
    ({"options": {"generator_num_layers": -1}}, "generator_num_layers must be a positive"),
    ({"options": {"mask_token_rate": 0.9, "random_token_rate": 0.2}},
     r"mask_token_rate \+ random_token_rate must be <= 1"),
    ({"options": {"selection_rate": 1.5}}, r"selection_rate must be in \[0, 1\]"),
    ({"model": {"position_embedding": "rotary"},
      "options": {"generator_hidden_dim": 6, "generator_num_heads": 2}},
     "rotary positions need an even generator head size, got 3"),
])
def test_errors(tokenizer, sections, message):
    options = sections.pop("options", {})
    with pytest.raises(kerasllm.ConfigError, match=message):
        electra_model(tokenizer, options, **sections)
