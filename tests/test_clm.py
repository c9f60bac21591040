"""The `clm` objective: next-token loss against a reference, training, saving."""

import numpy as np
import pytest

import kerasllm
from conftest import tiny_config
from helpers import assert_keras_round_trip, run_head_test
from kerasllm.data import build_dataset

DECODER = {"model": {"kind": "decoder", "norm_first": True, "num_segments": 0, "pooler": False,
                     "activation": "gelu_approximate", "layer_norm_epsilon": 1e-5},
           "objectives": [{"name": "clm"}]}


def test_clm_loss_is_next_token_cross_entropy(tokenizer, examples):
    model = kerasllm.build_model(tiny_config(**DECODER), tokenizer)
    x, y = next(iter(build_dataset(model, examples.skip(3), 4, 32)))
    logits = model(x)["clm"].numpy().astype("float64")
    token_ids, mask = x["token_ids"].numpy(), x["padding_mask"].numpy()
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    losses = [-log_probs[b, t, token_ids[b, t + 1]]
              for b in range(len(token_ids)) for t in range(token_ids.shape[1] - 1)
              if mask[b, t + 1]]
    loss = model.compute_loss(x, y, model(x))
    np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-5)


def test_clm_trains_logs_and_round_trips(tokenizer, examples, tmp_path):
    model, before, after, x = run_head_test(tiny_config(**DECODER), tokenizer, examples)
    assert after["clm_accuracy"] > before["clm_accuracy"] + 0.05
    assert_keras_round_trip(model, x, tmp_path)


def test_clm_needs_a_decoder(tokenizer):
    with pytest.raises(kerasllm.ConfigError, match="needs model.kind: decoder"):
        kerasllm.build_model(tiny_config(objectives=[{"name": "clm"}]), tokenizer)
