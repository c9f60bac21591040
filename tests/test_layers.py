"""The Transformer layer set: attention numerics, masks, serialization."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasllm
from kerasllm.embeddings import RelativePositionBias, TextEmbedding
from kerasllm.layers import Attention, FeedForward, TransformerBlock, apply_rotary, attention_core


def reference_attention(query, key, value, padding_mask, causal):
    """Plain numpy scaled dot-product attention; key/value heads repeated for GQA."""
    groups = query.shape[2] // key.shape[2]
    key, value = np.repeat(key, groups, axis=2), np.repeat(value, groups, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(query.shape[-1])
    allowed = padding_mask[:, None, None, :].astype(bool)
    if causal:
        length = query.shape[1]
        allowed = allowed & np.tril(np.ones((length, length), bool))[None, None]
    scores = np.where(allowed, scores, -1e9)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, value)


def make_backbone(causal, norm_first=False, num_segments=2, pooler=None):
    keras.utils.set_random_seed(1)
    return kerasllm.Backbone(
        vocabulary_size=97, num_layers=2, num_heads=3, hidden_dim=24, intermediate_dim=40,
        max_sequence_length=20, kind="decoder" if causal else "encoder",
        num_segments=num_segments, norm_first=norm_first, dropout=0.0, pooler=pooler,
    )


def core(query, key, value, padding_mask, seed, causal, rate, head_major=False):
    """attention_core with the mask built as the layers build it; ``key`` and
    ``value`` position-major, passed head-major (as the cache holds them) with
    ``head_major``."""
    length = query.shape[1]
    allowed = padding_mask.astype(bool)[:, None, :]
    if causal:
        allowed = allowed & np.tril(np.ones((length, length), bool))[None]
    if head_major:
        key, value = (np.transpose(tensor, [0, 2, 1, 3]) for tensor in (key, value))
    return attention_core(query, key, value, allowed, None, seed,
                          float(1 / np.sqrt(query.shape[-1])), rate, head_major)


def inputs(token_ids, padding_mask):
    token_ids = np.asarray(token_ids, "int32")
    return {"token_ids": token_ids, "padding_mask": np.asarray(padding_mask, "int32"),
            "segment_ids": np.zeros_like(token_ids)}


@pytest.mark.parametrize("head_major", [False, True])
@pytest.mark.parametrize("causal,kv_heads", [(False, 6), (True, 6), (True, 2), (False, 1)])
def test_attention_core_matches_numpy_reference(causal, kv_heads, head_major):
    rng = np.random.default_rng(0)
    query = rng.normal(size=(2, 7, 6, 5)).astype("float32")
    key, value = (rng.normal(size=(2, 7, kv_heads, 5)).astype("float32") for _ in range(2))
    padding_mask = np.array([[1] * 7, [1] * 4 + [0] * 3], "int32")
    got = core(query, key, value, padding_mask, tf.constant([0, 0]), causal, 0.0, head_major)
    expected = reference_attention(query, key, value, padding_mask, causal)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_attention_dropout_is_seeded_and_scaled():
    rng = np.random.default_rng(0)
    query, key, value = (rng.normal(size=(4, 16, 2, 8)).astype("float32") for _ in range(3))
    mask = np.ones((4, 16), "int32")
    first = core(query, key, value, mask, tf.constant([1, 2]), False, 0.5)
    again = core(query, key, value, mask, tf.constant([1, 2]), False, 0.5)
    other = core(query, key, value, mask, tf.constant([3, 4]), False, 0.5)
    np.testing.assert_array_equal(first.numpy(), again.numpy())
    assert np.abs(first.numpy() - other.numpy()).max() > 1e-3
    # Inverted dropout keeps the expectation: the mean over many seeds approaches
    # the undropped output.
    mean = np.mean([
        core(query, key, value, mask, tf.constant([s, 0]), False, 0.5).numpy()
        for s in range(200)
    ], axis=0)
    exact = reference_attention(query, key, value, mask, False)
    assert np.abs(mean - exact).mean() < 0.05


def test_attention_core_is_xla_compiled():
    assert attention_core._jit_compile
    rng = np.random.default_rng(0)
    args = [rng.normal(size=(1, 4, 1, 2)).astype("float32")] * 3
    hlo = attention_core.experimental_get_compiler_ir(
        *args, np.ones((1, 4, 4), bool), None, tf.constant([0, 0]), 1.0, 0.0, False)(
            stage="hlo")
    assert "softmax" in hlo.lower() or "exponential" in hlo.lower()


def test_attention_in_a_compiled_step_keeps_the_step_inputs_as_parameters():
    # Inside a whole-step compilation (training.jit_compile) the compiled core is
    # a nested function; an op in it whose gradient needs a tensor's value made
    # XLA take every step input as a compile-time constant and recompile each step.
    layer = Attention(num_heads=4, num_key_value_heads=2, causal=True, dropout=0.1)
    layer.build((2, 8, 16))
    hidden = np.random.default_rng(0).normal(size=(2, 8, 16)).astype("float32")

    @tf.function(jit_compile=True)
    def step(hidden, padding_mask):
        with tf.GradientTape() as tape:
            tape.watch(hidden)
            loss = tf.reduce_sum(layer(hidden, padding_mask, training=True) ** 2)
        return tape.gradient(loss, [hidden, *layer.trainable_variables])

    hlo = step.experimental_get_compiler_ir(hidden, np.ones((2, 8), "int32"))(stage="hlo")
    entry = hlo[hlo.index("ENTRY"):]
    assert re.search(r"= f32\[2,8,16\]\{[^}]*\} parameter\(", entry)
    assert re.search(r"= s32\[2,8\]\{[^}]*\} parameter\(", entry)
    assert not re.search(r"= f32\[2,8,16\]\{[^}]*\} constant\(", entry)


@pytest.mark.parametrize("causal,norm_first", [(False, False), (True, True), (True, False)])
def test_padding_does_not_change_real_positions(causal, norm_first):
    backbone = make_backbone(causal, norm_first)
    tokens = [[5, 17, 33, 8, 61, 2]]
    short = backbone(inputs(tokens, [[1] * 6]))
    padded_tokens = [tokens[0] + [44, 90, 3, 12]]  # arbitrary ids in the padding
    padded = backbone(inputs(padded_tokens, [[1] * 6 + [0] * 4]))
    np.testing.assert_allclose(
        padded["sequence_output"][:, :6], short["sequence_output"], atol=1e-5)
    if not causal:
        np.testing.assert_allclose(padded["pooled_output"], short["pooled_output"], atol=1e-5)


def test_causal_outputs_ignore_future_tokens():
    backbone = make_backbone(causal=True, norm_first=True)
    tokens = np.array([[5, 17, 33, 8, 61, 2, 9, 10]])
    changed = tokens.copy()
    changed[0, 5] = 70
    mask = np.ones_like(tokens)
    before = backbone(inputs(tokens, mask))["sequence_output"].numpy()
    after = backbone(inputs(changed, mask))["sequence_output"].numpy()
    np.testing.assert_allclose(after[:, :5], before[:, :5], atol=1e-6)
    assert np.abs(after[:, 5:] - before[:, 5:]).min(axis=-1).max() > 0


def test_encoder_outputs_see_later_tokens():
    backbone = make_backbone(causal=False)
    tokens = np.array([[5, 17, 33, 8, 61, 2]])
    changed = tokens.copy()
    changed[0, 5] = 70
    mask = np.ones_like(tokens)
    before = backbone(inputs(tokens, mask))["sequence_output"].numpy()
    after = backbone(inputs(changed, mask))["sequence_output"].numpy()
    assert np.abs(after[:, 0] - before[:, 0]).max() > 1e-4


def test_segment_ids_are_optional_and_change_outputs():
    without = make_backbone(causal=False, num_segments=0)
    assert "segment_ids" not in without.input_keys
    out = without({"token_ids": np.array([[5, 6, 7]], "int32"),
                   "padding_mask": np.ones((1, 3), "int32")})
    assert out["sequence_output"].shape == (1, 3, 24)
    backbone = make_backbone(causal=False)
    base = inputs([[5, 6, 7]], [[1, 1, 1]])
    other = {**base, "segment_ids": np.array([[0, 1, 1]], "int32")}
    difference = backbone(base)["sequence_output"] - backbone(other)["sequence_output"]
    assert np.abs(difference).max() > 1e-4


def test_pre_ln_has_final_norm_and_post_ln_embedding_norm():
    pre = make_backbone(causal=True, norm_first=True, pooler=False)
    post = make_backbone(causal=False, norm_first=False)
    assert pre.get_layer("final_norm") is not None
    assert pre.get_layer("embedding").norm is None
    assert post.get_layer("embedding").norm is not None
    assert "pooled_output" not in pre.output


@pytest.mark.parametrize("layer,args", [
    (Attention(4, 2, causal=True, rotary_theta=500.0, dropout=0.1), ((2, 5, 24),)),
    (FeedForward(40, "silu", gated=True, use_bias=False), ((2, 5, 24),)),
    (RelativePositionBias(3, 16, 40, bidirectional=False), ((2, 5, 24),)),
    (TransformerBlock(3, 40, activation="relu", causal=True, cross_attention=True,
                      norm="rms", norm_first=True, dropout=0.1), ((2, 5, 24), (2, 7, 24))),
    (TextEmbedding(97, 24, 20, 2, normalize=False, dropout=0.1, position_offset=2,
                   tie_weights=False), ((2, 5), (2, 5))),
])
def test_layer_config_round_trip(layer, args):
    layer.build(*args)
    restored = layer.__class__.from_config(layer.get_config())
    assert restored.get_config() == layer.get_config()


@pytest.mark.parametrize("causal", [False, True])
def test_backbone_keras_round_trip(tmp_path, causal):
    backbone = make_backbone(causal, norm_first=causal)
    batch = inputs([[5, 17, 33, 8, 0, 0]], [[1, 1, 1, 1, 0, 0]])
    backbone.save(tmp_path / "backbone.keras")
    restored = keras.saving.load_model(tmp_path / "backbone.keras", safe_mode=True)
    assert restored.get_config() == backbone.get_config()
    for name in backbone.output:
        np.testing.assert_array_equal(restored(batch)[name], backbone(batch)[name])


def test_evaluation_does_not_advance_the_dropout_seed_stream():
    # A resumed run evaluates before training; drawing seeds there would shift
    # every later dropout mask away from the uninterrupted run's.
    layer = Attention(3, dropout=0.1)
    hidden = np.random.default_rng(0).normal(size=(2, 5, 24)).astype("float32")
    layer(hidden, np.ones((2, 5), "int32"))
    state = layer.seed_generator.state.numpy().copy()
    layer(hidden, np.ones((2, 5), "int32"), training=False)
    np.testing.assert_array_equal(layer.seed_generator.state.numpy(), state)
    layer(hidden, np.ones((2, 5), "int32"), training=True)
    assert (layer.seed_generator.state.numpy() != state).any()


def test_rotary_matches_numpy_reference():
    """Half-split RoPE: feature i rotates with feature i + d/2 by position * theta^(-2i/d)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 5, 2, 8)).astype("float32")
    positions = np.arange(3, 8)
    got = apply_rotary(tf.constant(x), tf.constant(positions), 500.0).numpy()
    frequencies = 500.0 ** (-np.arange(0, 8, 2) / 8)
    angles = positions[:, None] * frequencies[None]
    cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
    first, second = x[..., :4], x[..., 4:]
    expected = np.concatenate([first * cos - second * sin, second * cos + first * sin], -1)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_rotary_attention_depends_only_on_relative_position():
    layer = Attention(2, rotary_theta=10000.0, scale_scores=True)
    layer.build((1, 4, 16))
    rng = np.random.default_rng(0)
    query = rng.normal(size=(1, 1, 2, 8)).astype("float32")
    key = rng.normal(size=(1, 1, 2, 8)).astype("float32")

    def score(query_position, key_position):
        q = apply_rotary(tf.constant(query), tf.constant([query_position]), 10000.0)
        k = apply_rotary(tf.constant(key), tf.constant([key_position]), 10000.0)
        return tf.reduce_sum(q * k).numpy()

    assert score(7, 3) == pytest.approx(score(24, 20), abs=1e-4)
    assert abs(score(7, 3) - score(7, 5)) > 1e-3


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (64, 256)])
def test_relative_buckets_match_transformers_t5(bidirectional, num_buckets, max_distance):
    """Same buckets as Hugging Face's T5 for every distance, boundary distances included."""
    torch = pytest.importorskip("torch")
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = np.arange(-400, 401)
    expected = T5Attention._relative_position_bucket(
        torch.tensor(relative), bidirectional=bidirectional, num_buckets=num_buckets,
        max_distance=max_distance).numpy()
    layer = RelativePositionBias(1, num_buckets, max_distance, bidirectional=bidirectional)
    np.testing.assert_array_equal(layer.bucket(tf.constant(relative)).numpy(), expected)


def test_dropout_drops_at_its_rate_and_rescales_what_it_keeps():
    from kerasllm.layers import Dropout

    layer = Dropout(0.25, seed=3)
    ones = np.ones((400, 250), "float32")
    first = np.asarray(layer(ones, training=True))
    assert np.mean(first == 0) == pytest.approx(0.25, abs=0.005)  # 100,000 draws: 3.6 sigma
    np.testing.assert_allclose(first[first != 0], 1 / 0.75, rtol=1e-6)
    assert np.mean(first) == pytest.approx(1.0, abs=0.01)
    # Each call draws a new mask from the seed stream; evaluation drops nothing.
    assert np.mean(np.asarray(layer(ones, training=True)) != first) > 0.3
    np.testing.assert_array_equal(layer(ones, training=False), ones)
    # The same seed gives the same masks.
    np.testing.assert_array_equal(Dropout(0.25, seed=3)(ones, training=True), first)
