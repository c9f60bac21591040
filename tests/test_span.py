"""The `span` objective: T5's span corruption, its statistics, layouts, training, saving."""

import math
import re

import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_config
from helpers import assert_keras_round_trip, run_head_test
from kerasllm_plugins.span import noise_mask

import kerasllm
from kerasllm.data import _pretraining_rows, build_dataset
from kerasllm.tokenizer_layers import WordPieceTokenizer
from kerasllm.tokenizers import sentinel_ids

SENTINELS = [f"<extra_id_{i}>" for i in range(100)]  # as many as T5's vocabulary has
SPAN = [{"name": "span"}]
T5 = {"family": "t5"}
GPT2 = {"family": "gpt2"}


@pytest.fixture(scope="module")
def vocabulary(tokenizer):
    """conftest's WordPiece vocabulary (the 5 BERT specials first) with 100
    sentinels appended, where T5's vocabulary has them."""
    return tokenizer.get_vocabulary() + SENTINELS


@pytest.fixture(scope="module")
def t5_tokenizer(vocabulary):
    """T5's packing: no start token, each document closed by the end token."""
    return WordPieceTokenizer(vocabulary, lowercase=True, special_tokens={
        "pad": "[PAD]", "end": "[SEP]", "unknown": "[UNK]", "mask": "[MASK]"}, add_end=True)


@pytest.fixture(scope="module")
def bert_tokenizer(vocabulary):
    """BERT's packing, ``[CLS] … [SEP]``, for the decoder-only prefix LM."""
    return WordPieceTokenizer(vocabulary, lowercase=True, special_tokens={
        "pad": "[PAD]", "start": "[CLS]", "end": "[SEP]", "unknown": "[UNK]",
        "mask": "[MASK]"}, add_start=True, add_end=True)


def span_model(tokenizer, model=T5, length=32, **options):
    return kerasllm.build_model(tiny_config(
        model={**model, "max_sequence_length": length}, data={"sequence_length": length},
        objectives=[{"name": "span", "options": options}]), tokenizer)


def t5_random_spans_helper(inputs_length, noise_density=0.15, mean_noise_span_length=3.0):
    """t5/data/preprocessors.py's ``random_spans_helper`` (one extra token per
    span in inputs and targets), verbatim but for the verbose/0.5 special cases."""
    def lengths(tokens_length):
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        return (num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1)

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inputs_length, targets_length = lengths(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def split(inputs, targets, sentinels):
    """A row's real encoder inputs and targets (end tokens dropped) → (kept
    spans, noise spans), checking that sentinels come in order, one per span."""
    sentinel_index = {token: i for i, token in enumerate(sentinels)}
    kept, noise = [[]], []
    for token in inputs:
        if token in sentinel_index:
            assert sentinel_index[token] == len(kept) - 1
            kept.append([])
        else:
            kept[-1].append(token)
    for token in targets:
        if token in sentinel_index:
            assert sentinel_index[token] == len(noise)
            noise.append([])
        else:
            noise[-1].append(token)
    assert len(noise) == len(kept) - 1
    return kept, noise


def merge(kept, noise):
    """Undo the corruption: the kept spans with the noise spans put back."""
    row = list(kept[0])
    for span, after in zip(noise, kept[1:]):
        row += span + after
    return row


def real_parts(x, y, row, tokens_end):
    """Encoder inputs and targets of one row, without padding and end tokens."""
    inputs = x["token_ids"][row][x["padding_mask"][row] > 0]
    targets = y["ids"][row][y["weights"][row] > 0]
    assert inputs[-1] == tokens_end and targets[-1] == tokens_end
    return list(inputs[:-1]), list(targets[:-1])


def composition_cdf(items, parts):
    """CDF of one part's size when ``items`` are cut into ``parts`` non-empty
    parts at uniformly random places: P(size = l) = C(items-l-1, parts-2) / C(items-1, parts-1)."""
    pmf = [math.comb(items - size - 1, parts - 2) / math.comb(items - 1, parts - 1)
           for size in range(1, items - parts + 2)]
    return np.cumsum(pmf)


def ks_distance(samples, cdf):
    sizes = np.sort(samples)
    empirical = np.searchsorted(sizes, np.arange(1, len(cdf) + 1), side="right") / len(sizes)
    return np.abs(empirical - cdf).max()


# === Lengths ====================================================================

def test_row_and_target_lengths_are_t5s(t5_tokenizer):
    head = span_model(t5_tokenizer, length=512).heads[0]
    # T5's span-corruption task: 568 raw tokens → 512 inputs, 114 targets.
    assert head.row_length(512) == 568
    assert head._shapes(568)[:2] == (512, 114)
    for sequence_length in range(16, 513, 3):
        tokens_length, targets_length = t5_random_spans_helper(sequence_length)
        assert head.row_length(sequence_length) == tokens_length
        assert head._shapes(tokens_length)[:2] == (sequence_length, targets_length)
    # At noise_density 0.5 targets and inputs tie: T5 trims the row by a token.
    head = span_model(t5_tokenizer, length=512, noise_density=0.5, mean_span_length=8.0).heads[0]
    for sequence_length in range(16, 513, 3):
        tokens_length, targets_length = t5_random_spans_helper(sequence_length, 0.5, 8.0)
        assert head.row_length(sequence_length) == tokens_length
        # T5 takes one off its targets length for the trimmed token; the exact
        # length can be shorter (a span fewer).
        noise = round(tokens_length * 0.5)
        spans = round(noise / 8)
        assert noise + spans + 1 <= targets_length
        assert head._shapes(tokens_length) == (sequence_length, noise + spans + 1, spans)


# === Statistics and reconstruction on the corpus =================================

def test_corruption_statistics_and_reconstruction(t5_tokenizer, examples):
    """T5's noise on ≥100k tokens of the corpus; every row rebuilt exactly."""
    model = span_model(t5_tokenizer, length=512)
    end = t5_tokenizer.end_token_id
    sentinels = sentinel_ids(t5_tokenizer)
    raw = _pretraining_rows(model, examples, model.heads, 512, True).batch(64)
    prepared = build_dataset(model, examples, 64, 512)
    tokens = noise_tokens = spans = 0
    noise_sizes, kept_sizes, middle = [], [], np.zeros((2, 2))
    for rows, (x, y) in zip(raw, prepared):
        y = {key: value.numpy() for key, value in y["span"].items()}
        x = {key: value.numpy() for key, value in x.items()}
        assert x["token_ids"].shape[1] == 512 and y["ids"].shape[1] == 114
        for i, (row, mask) in enumerate(zip(rows["token_ids"].numpy(),
                                            rows["padding_mask"].numpy())):
            original = list(row[mask > 0])
            assert not set(original) & set(sentinels)
            kept, noise = split(*real_parts(x, y, i, end), sentinels)
            assert merge(kept, noise) == original
            n = len(original)
            # The definition, row by row: round(n·density) noise tokens (at
            # least 1) in round(noise/mean) spans; kept tokens first, noise last.
            expected_noise = min(max(round(0.15 * n), 1), n - 1)
            assert sum(map(len, noise)) == expected_noise
            assert len(noise) == max(round(expected_noise / 3), 1)
            assert all(kept[:-1]) and all(noise) and kept[-1] == []
            tokens += n
            noise_tokens += sum(map(len, noise))
            spans += len(noise)
            is_noise = np.concatenate([[0] * len(k) + [1] * len(s) for k, s in
                                       zip(kept, noise)])
            quarter = n // 4
            middle += [[is_noise[quarter:2 * quarter].sum(), quarter],
                       [is_noise[2 * quarter:3 * quarter].sum(), quarter]]
            if n == 568:  # full rows: 85 noise tokens in 28 spans, 483 kept
                noise_sizes += map(len, noise)
                kept_sizes += map(len, kept[:-1])
    assert tokens >= 100_000, tokens
    # Each row rounds n·0.15 to a whole token: at most 0.5/568 (0.0009) off.
    assert abs(noise_tokens / tokens - 0.15) < 0.001, noise_tokens / tokens
    # round(85 / 3) = 28 spans of mean 85/28 = 3.036; rounding moves the mean
    # by at most 1.5/28 = 0.054 from 3.0.
    assert abs(noise_tokens / spans - 3.0) < 0.055, noise_tokens / spans
    # Noise is spread along the row. Near the ends it is not 0.15 (a row opens
    # with kept tokens and closes with noise), so compare the second and third
    # quarters: ~5.4k noise tokens each, in spans of 3, a standard error of
    # about 0.0035.
    for noise_count, positions in middle:
        assert abs(noise_count / positions - 0.15) < 0.015, middle
    # Span sizes follow T5's random segmentation exactly: one part of a
    # uniformly random composition. Kolmogorov-Smirnov at α = 0.001 (spans of a
    # row sum to a constant, so they are negatively correlated and vary less
    # than independent draws: the bound is conservative).
    for sizes, items in ((noise_sizes, 85), (kept_sizes, 483)):
        assert len(sizes) >= 5000
        assert ks_distance(sizes, composition_cdf(items, 28)) < 1.95 / math.sqrt(len(sizes))
    assert np.mean(kept_sizes) == pytest.approx(483 / 28)


# === Structure on hand-made rows ==================================================

def hand_made_rows():
    """Three rows of 34 tokens (the row length for 32 inputs): two full, one
    of two documents padded after 20 tokens."""
    token_ids = np.arange(200, 302).reshape(3, 34).astype("int32")
    padding_mask = np.ones((3, 34), "int32")
    padding_mask[2, 12:20] = 2
    padding_mask[2, 20:] = 0
    token_ids[2, 20:] = 0
    return {"token_ids": tf.constant(token_ids), "padding_mask": tf.constant(padding_mask),
            "segment_ids": tf.zeros((3, 34), tf.int32), "document": tf.constant([0, 1, 2])}


def expected_corruption(row, noise, sentinels, end):
    """T5's noise_span_to_unique_sentinel / nonnoise_span_to_unique_sentinel, by hand."""
    inputs, targets, span = [], [], -1
    for i, token in enumerate(row):
        if noise[i] and (i == 0 or not noise[i - 1]):
            span += 1
            inputs.append(sentinels[span])
            targets.append(sentinels[span])
        (targets if noise[i] else inputs).append(token)
    return inputs + [end], targets + [end]


def test_noise_mask_follows_the_definition():
    lengths = tf.constant([568, 568, 300, 20, 2, 1])
    for seed in range(5):
        mask = noise_mask(lengths, 568, 28, 0.15, 3.0, tf.constant([seed, 7])).numpy()
        for n, row in zip(lengths.numpy(), mask):
            assert not row[n:].any()
            # T5 corrupts at least one token of a row; a one-token row keeps it.
            noise = min(max(round(0.15 * n), 1), n - 1) if n >= 2 else 0
            assert row.sum() == noise
            starts = row[:n] & ~np.concatenate([[False], row[:n - 1]])
            assert starts.sum() == (max(round(noise / 3), 1) if noise else 0)
            if n >= 2:  # kept tokens first, noise last
                assert not row[0] and row[n - 1]


def test_encoder_decoder_layout(t5_tokenizer):
    model = span_model(t5_tokenizer)
    head, pad, end = model.heads[0], t5_tokenizer.pad_token_id, t5_tokenizer.end_token_id
    features = hand_made_rows()
    seed = tf.constant([3, 4])
    x, y = head.prepare(features, seed)
    x, y = {k: v.numpy() for k, v in x.items()}, {k: v.numpy() for k, v in y.items()}
    assert head.row_length(32) == 34
    assert x["token_ids"].shape == x["padding_mask"].shape == (3, 32)
    assert x["decoder_token_ids"].shape == y["ids"].shape == y["weights"].shape == (3, 8)
    assert "segment_ids" not in x
    # The same stateless draw as the pipeline's.
    noise = noise_mask(tf.constant([34, 34, 20]), 34, 2, 0.15, 3.0, seed).numpy()
    sentinels = sentinel_ids(t5_tokenizer)
    for i, n in enumerate([34, 34, 20]):
        inputs, targets = expected_corruption(
            features["token_ids"][i, :n].numpy().tolist(), noise[i], sentinels, end)
        assert x["token_ids"][i].tolist() == inputs + [pad] * (32 - len(inputs))
        assert x["padding_mask"][i].tolist() == [1] * len(inputs) + [0] * (32 - len(inputs))
        assert y["ids"][i].tolist() == targets + [pad] * (8 - len(targets))
        assert y["weights"][i].tolist() == [1] * len(targets) + [0] * (8 - len(targets))
    # Full rows fill the inputs exactly; the padded row (3 noise tokens, 1 span) does not.
    assert x["padding_mask"].sum(1).tolist() == [32, 32, 20 - 3 + 1 + 1]
    # The decoder reads the targets shifted right behind the pad token.
    assert (x["decoder_token_ids"][:, 0] == pad).all()
    np.testing.assert_array_equal(x["decoder_token_ids"][:, 1:], y["ids"][:, :-1])
    np.testing.assert_array_equal(x["decoder_padding_mask"], y["weights"])


def test_prefix_lm_layout(bert_tokenizer):
    model = span_model(bert_tokenizer, GPT2)
    head, pad, end = model.heads[0], bert_tokenizer.pad_token_id, bert_tokenizer.end_token_id
    assert head.variant == "prefix_lm"
    features = hand_made_rows()
    row_length = head.row_length(32)  # inputs + targets: n + 2·spans + 2 ≤ 32
    assert row_length == 28
    features = {key: value[:, :row_length] if key != "document" else value
                for key, value in features.items()}
    x, y = head.prepare(features, tf.constant([3, 4]))
    x, y = {k: v.numpy() for k, v in x.items()}, {k: v.numpy() for k, v in y.items()}
    noise = noise_mask(tf.constant([28, 28, 20]), 28, 1, 0.15, 3.0, tf.constant([3, 4])).numpy()
    sentinels = sentinel_ids(bert_tokenizer)
    for i, n in enumerate([28, 28, 20]):
        inputs, targets = expected_corruption(
            features["token_ids"][i, :n].numpy().tolist(), noise[i], sentinels, end)
        sequence = inputs + targets
        assert x["token_ids"][i].tolist() == sequence + [pad] * (32 - len(sequence))
        # The inputs are a prefix attending both ways (-1), the targets causal (1).
        assert x["padding_mask"][i].tolist() == (
            [-1] * len(inputs) + [1] * len(targets) + [0] * (32 - len(sequence)))
        # The loss covers the targets only, each predicted from the token before it.
        weights = y["weights"][i].astype(bool)
        assert weights.sum() == len(targets)
        assert y["ids"][i][weights].tolist() == targets
        assert weights[len(inputs) - 1] and not weights[:len(inputs) - 1].any()
    assert (x["segment_ids"] == 0).all()


def test_with_clm_the_decoder_predicts_the_same_targets(t5_tokenizer, examples):
    """clm on an encoder–decoder reads span's decoder inputs: its labels are the targets."""
    model = kerasllm.build_model(tiny_config(model=T5, objectives=SPAN + [{"name": "clm"}]),
                                 t5_tokenizer)
    x, y = next(iter(build_dataset(model, examples, 8, 32)))
    np.testing.assert_array_equal(y["clm"]["ids"][:, :-1], y["span"]["ids"][:, :-1])
    assert np.isfinite(model.compute_loss(x, y, model(x)).numpy())


# === Training and saving ===========================================================

def test_t5_encoder_decoder_trains_and_round_trips(t5_tokenizer, examples, tmp_path):
    # T5's preset scales the tied output by hidden_dim ** -0.5 over embeddings
    # initialised at 0.02: the first logits are tiny and learning starts slowly
    # at conftest's 0.002 (-0.5 nats in 60 steps); 0.01 gives -1.8 in 40.
    model, before, after, x = run_head_test(
        tiny_config(model=T5, objectives=SPAN, training={"learning_rate": 0.01}),
        t5_tokenizer, examples, steps=40)
    assert after["span_accuracy"] > before["span_accuracy"] + 0.05
    restored = assert_keras_round_trip(model, x, tmp_path)
    assert restored.get_head("span").variant == "encoder_decoder"


def test_decoder_prefix_lm_trains_and_round_trips(bert_tokenizer, examples, tmp_path):
    config = tiny_config(model=GPT2, objectives=[
        {"name": "span", "options": {"noise_density": 0.3, "mean_span_length": 2.0}}])
    model, before, after, x = run_head_test(config, bert_tokenizer, examples, steps=40)
    assert after["span_accuracy"] > before["span_accuracy"] + 0.05
    restored = assert_keras_round_trip(model, x, tmp_path)
    assert restored.get_head("span").noise_density == 0.3


# === Options and errors ============================================================

def test_other_density_and_span_length(t5_tokenizer):
    head = span_model(t5_tokenizer, length=128, noise_density=0.5,
                      mean_span_length=8.0).heads[0]
    n = head.row_length(128)
    noise, spans = head.counts(n)
    assert (noise, spans) == (round(0.5 * n), round(round(0.5 * n) / 8))
    mask = noise_mask(tf.constant([n]), n, spans, 0.5, 8.0, tf.constant([0, 0])).numpy()
    assert mask.sum() == noise


def test_too_few_sentinels(tokenizer, t5_tokenizer):
    # conftest's tokenizer has none; 32 inputs can have 2 spans.
    with pytest.raises(kerasllm.ConfigError, match=r"can have 2 noise spans.*has 0 .*"
                       r"train the tokenizer with `tokenizer.sentinels: 2`"):
        kerasllm.build_model(tiny_config(model=T5, objectives=SPAN), tokenizer)
    # 1024 inputs: 1137 raw tokens, 171 of them noise, in 57 spans; 2048: 114 > 100.
    assert span_model(t5_tokenizer, length=1024).heads[0].row_length(1024) == 1137
    with pytest.raises(kerasllm.ConfigError, match=r"has 100 .*`tokenizer.sentinels: 114`"):
        span_model(t5_tokenizer, length=2048)


@pytest.mark.parametrize("options,message", [
    ({"noise_density": 0.0}, "noise_density must be between 0 and 1 (exclusive), got 0.0"),
    ({"noise_density": 1.0}, "noise_density must be between 0 and 1 (exclusive), got 1.0"),
    ({"noise_density": -0.2}, "noise_density must be between 0 and 1"),
    ({"mean_span_length": 0.5}, "mean_span_length must be at least 1, got 0.5"),
    ({"variant": "prefix"}, "variant must be one of encoder_decoder, prefix_lm; got 'prefix'"),
    ({"variant": "prefix_lm"}, "variant 'prefix_lm' needs model.kind: decoder, but the model "
                               "is encoder_decoder"),
    ({"mean_span_lenght": 3}, "unknown option 'mean_span_lenght' for objective 'span' in "
                              "objectives[0].options; allowed: mean_span_length, "
                              "noise_density, variant"),
])
def test_bad_options(t5_tokenizer, options, message):
    with pytest.raises(kerasllm.ConfigError, match=rf"^(objectives\[0\].options: invalid "
                       rf"value for objective 'span': )?{re.escape(message)}"):
        span_model(t5_tokenizer, **options)


def test_needs_an_encoder_decoder_or_a_decoder(t5_tokenizer):
    with pytest.raises(kerasllm.ConfigError, match="needs model.kind: decoder, but the model "
                       "is an encoder"):
        span_model(t5_tokenizer, {})
    with pytest.raises(kerasllm.ConfigError, match="variant 'encoder_decoder' needs model.kind: "
                       "encoder_decoder, but the model is decoder"):
        span_model(t5_tokenizer, GPT2, variant="encoder_decoder")


# === Determinism ====================================================================

def test_same_seed_same_batches_new_draws_per_batch(t5_tokenizer, examples):
    model = span_model(t5_tokenizer)

    def batches():
        return [(x, y) for x, y in build_dataset(model, examples.take(12), 8, 32, seed=5)]

    first, again = batches(), batches()
    for (x1, y1), (x2, y2) in zip(first, again):
        for key in x1:
            np.testing.assert_array_equal(x1[key], x2[key])
        np.testing.assert_array_equal(y1["span"]["ids"], y2["span"]["ids"])
    # The seed is all that varies the draw: the same rows under another batch
    # index or another run seed are corrupted differently.
    head, features = model.heads[0], hand_made_rows()
    a, _ = head.prepare(features, tf.constant([0, 0]))
    for other in ([0, 0], [0, 1], [1, 0]):
        b, _ = head.prepare(features, tf.constant(other))
        assert (a["token_ids"].numpy() == b["token_ids"].numpy()).all() == (other == [0, 0])
