"""The `mlm` objective: BERT masking statistics, training, saving."""

import numpy as np
import tensorflow as tf

import kerasllm
from conftest import tiny_config
from helpers import assert_keras_round_trip, run_head_test
from kerasllm.data import build_dataset
from kerasllm.tokenizers import special_tokens


def masked_batches(tokenizer, examples, sequence_length=128):
    model = kerasllm.build_model(tiny_config(
        model={"max_sequence_length": sequence_length},
        data={"sequence_length": sequence_length}), tokenizer)
    return build_dataset(model, examples, 64, sequence_length)


def test_masking_statistics_match_bert(tokenizer, examples):
    tokens = special_tokens(tokenizer)
    specials = [tokens.pad, tokens.start, tokens.end, tokens.mask]
    selectable = selected = masked = unchanged = 0
    for x, y in masked_batches(tokenizer, examples):
        token_ids = x["token_ids"].numpy()
        padding = x["padding_mask"].numpy().astype(bool)
        positions = x["mask_positions"].numpy()
        weights = y["mlm"]["weights"].numpy().astype(bool)
        originals = y["mlm"]["ids"].numpy()
        rows = np.repeat(np.arange(len(token_ids))[:, None], positions.shape[1], 1)
        rows, positions, originals = rows[weights], positions[weights], originals[weights]
        restored = token_ids.copy()
        restored[rows, positions] = originals
        # Special and padding tokens are never selected.
        assert padding[rows, positions].all()
        assert not np.isin(originals, specials).any()
        selectable += (padding & ~np.isin(restored, specials)).sum()
        selected += len(originals)
        now = token_ids[rows, positions]
        masked += (now == tokens.mask).sum()
        unchanged += (now == originals).sum()
    assert selectable >= 100_000
    assert abs(selected / selectable - 0.15) <= 0.01, selected / selectable
    assert abs(masked / selected - 0.8) <= 0.02
    assert abs(unchanged / selected - 0.1) <= 0.02
    random = selected - masked - unchanged
    assert abs(random / selected - 0.1) <= 0.02


def test_masks_are_redrawn_each_time_an_example_is_seen(tokenizer, examples):
    batches = masked_batches(tokenizer, examples.take(8), 64)
    first = [x["mask_positions"].numpy() for x, _ in batches]
    second = [x["mask_positions"].numpy() for x, _ in batches]
    assert any((a != b).any() for a, b in zip(first, second))


def test_mlm_trains_logs_and_round_trips(tokenizer, examples, tmp_path):
    # 100 steps: with BERT's 0.02-stddev initialisation, accuracy leaves its
    # first plateau (predicting nothing useful) between steps 50 and 80.
    model, before, after, x = run_head_test(tiny_config(), tokenizer, examples, steps=100)
    assert after["mlm_accuracy"] > before["mlm_accuracy"] + 0.05
    # Logits only at the masked positions.
    assert model(x)["mlm"].shape == (*x["mask_positions"].shape, tokenizer.vocabulary_size())
    assert_keras_round_trip(model, x, tmp_path)


def test_mlm_with_clm_in_one_model_is_rejected(tokenizer):
    import pytest

    with pytest.raises(kerasllm.ConfigError, match="needs model.kind: decoder"):
        kerasllm.build_model(tiny_config(objectives=[{"name": "mlm"}, {"name": "clm"}]), tokenizer)


def test_selection_rate_option(tokenizer, examples):
    model = kerasllm.build_model(tiny_config(
        objectives=[{"name": "mlm", "options": {"selection_rate": 0.3}}]), tokenizer)
    x, y = next(iter(build_dataset(model, examples, 64, 32)))
    selected = y["mlm"]["weights"].numpy().sum()
    selectable = (x["padding_mask"].numpy().sum() - 2 * 64)  # minus [CLS] and [SEP]
    assert abs(selected / selectable - 0.3) < 0.03
    assert tf.reduce_max(x["mask_positions"]).numpy() < 32
