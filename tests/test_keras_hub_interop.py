"""keras-hub backbones imported into kerasllm give keras-hub's outputs.

Randomly initialised keras-hub backbones (no preset downloads) whose every
weight, biases and norm parameters included, is replaced by noise, so that a
wrong mapping cannot hide behind zeros and ones.
"""

import keras
import keras_hub
import numpy as np
import pytest

from kerasllm.errors import KerasLLMError
from kerasllm.hf import CheckpointError
from kerasllm.keras_hub_interop import from_keras_hub

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def bert_tokenizer():
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(20)]
    return keras_hub.models.BertTokenizer(vocabulary=vocabulary)


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    vocabulary = {"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3, "Ġ": 4}
    return keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=["a b"])


def randomize(backbone, seed):
    rng = np.random.default_rng(seed)
    for weight in backbone.weights:
        weight.assign(rng.normal(0.0, 0.5, weight.shape).astype("float32"))
    return backbone


def padded_inputs(vocabulary_size, lengths, width, num_segments=0, seed=0):
    """A batch of ``len(lengths)`` rows of ``width`` tokens, row ``i`` real up to ``lengths[i]``."""
    rng = np.random.default_rng(seed)
    shape = (len(lengths), width)
    inputs = {
        "token_ids": rng.integers(0, vocabulary_size, shape).astype("int32"),
        "padding_mask": (np.arange(width)[None] < np.array(lengths)[:, None]).astype("int32"),
    }
    if num_segments:
        inputs["segment_ids"] = rng.integers(0, num_segments, shape).astype("int32")
    return inputs


def max_difference(expected, got, padding_mask):
    real = padding_mask.astype(bool)
    return float(np.abs(np.asarray(expected) - np.asarray(got))[real].max())


BERT_CONFIGS = [
    # Heads of hidden_dim // num_heads = 7: 5 does not divide 36.
    dict(vocabulary_size=50, num_layers=2, num_heads=5, hidden_dim=36, intermediate_dim=52,
         max_sequence_length=20, num_segments=2),
    dict(vocabulary_size=40, num_layers=1, num_heads=4, hidden_dim=60, intermediate_dim=24,
         max_sequence_length=16, num_segments=3),
]

GPT2_CONFIGS = [
    dict(vocabulary_size=50, num_layers=2, num_heads=5, hidden_dim=36, intermediate_dim=52,
         max_sequence_length=20),
    dict(vocabulary_size=40, num_layers=3, num_heads=4, hidden_dim=60, intermediate_dim=24,
         max_sequence_length=16),
]


@pytest.mark.parametrize("config,width", zip(BERT_CONFIGS, (13, 7)))
def test_bert_outputs_match(config, width, bert_tokenizer):
    backbone = randomize(keras_hub.models.BertBackbone(**config), seed=1)
    model = from_keras_hub(backbone, tokenizer=bert_tokenizer)
    x = padded_inputs(config["vocabulary_size"], [width, width - 4, 2], width,
                      config["num_segments"])
    expected, got = backbone(x), model(x)
    assert set(got) == {"sequence_output", "pooled_output"}
    assert max_difference(expected["sequence_output"], got["sequence_output"],
                          x["padding_mask"]) <= TOLERANCE
    assert np.abs(expected["pooled_output"] - got["pooled_output"]).max() <= TOLERANCE


@pytest.mark.parametrize("config,width", zip(GPT2_CONFIGS, (13, 7)))
def test_gpt2_outputs_match(config, width, gpt2_tokenizer):
    backbone = randomize(keras_hub.models.GPT2Backbone(**config), seed=2)
    model = from_keras_hub(backbone, tokenizer=gpt2_tokenizer)
    x = padded_inputs(config["vocabulary_size"], [width, 3, width - 2], width)
    got = model(x)
    assert set(got) == {"sequence_output"}
    assert max_difference(backbone(x), got["sequence_output"], x["padding_mask"]) <= TOLERANCE


def test_gpt2_logits_through_the_tied_embedding(gpt2_tokenizer):
    backbone = randomize(keras_hub.models.GPT2Backbone(**GPT2_CONFIGS[0]), seed=3)
    model = from_keras_hub(backbone, tokenizer=gpt2_tokenizer, objectives=[{"name": "clm"}])
    x = padded_inputs(50, [9, 5], 9)
    expected = backbone.token_embedding(backbone(x), reverse=True)
    sequence_output = model.backbone(x)["sequence_output"]
    assert max_difference(expected, model.backbone.logits(sequence_output),
                          x["padding_mask"]) <= TOLERANCE
    # The clm objective adds no weights: it projects through the imported embedding.
    assert max_difference(expected, model(x)["clm"], x["padding_mask"]) <= TOLERANCE


def test_a_task_head_starts_fresh_on_the_imported_backbone(bert_tokenizer):
    backbone = randomize(keras_hub.models.BertBackbone(**BERT_CONFIGS[1]), seed=4)
    model = from_keras_hub(backbone, tokenizer=bert_tokenizer,
                           head={"name": "classification", "options": {"num_classes": 3}})
    x = padded_inputs(40, [7, 4], 7, num_segments=3)
    assert model(x)["classification"].shape == (2, 3)
    assert max_difference(backbone(x)["sequence_output"],
                          model.backbone(x)["sequence_output"], x["padding_mask"]) <= TOLERANCE


def test_refuses_other_backbones(bert_tokenizer):
    with pytest.raises(CheckpointError, match=r"kerasllm imports keras_hub.models.BertBackbone, "
                                              r"keras_hub.models.GPT2Backbone; got a .*Sequential"):
        from_keras_hub(keras.Sequential(name="other"), tokenizer=bert_tokenizer)


def test_requires_the_tokenizer():
    backbone = keras_hub.models.GPT2Backbone(**GPT2_CONFIGS[0])
    with pytest.raises(KerasLLMError, match=r"give the backbone's tokenizer, e.g. "
                                            r"tokenizer=keras_hub.models.GPT2Tokenizer"):
        from_keras_hub(backbone)


def test_refuses_a_tokenizer_larger_than_the_embedding(bert_tokenizer):
    backbone = keras_hub.models.BertBackbone(**{**BERT_CONFIGS[0], "vocabulary_size": 10})
    with pytest.raises(CheckpointError, match="the tokenizer has 25 tokens but the backbone "
                                              "embeds only 10"):
        from_keras_hub(backbone, tokenizer=bert_tokenizer)


def with_config(backbone, **changes):
    """``backbone``, its ``get_config`` reporting ``changes``: what a keras-hub
    version with other fields, or a backbone whose weights disagree with its
    config, would look like."""
    config = {**backbone.get_config(), **changes}
    backbone.get_config = lambda: dict(config)
    return backbone


def test_refuses_a_config_field_it_cannot_represent(gpt2_tokenizer):
    backbone = with_config(keras_hub.models.GPT2Backbone(**GPT2_CONFIGS[0]),
                           layer_norm_epsilon=1e-6)
    with pytest.raises(CheckpointError, match=r"keras-hub GPT2Backbone 'gpt2_backbone\w*': "
                                              r"config field 'layer_norm_epsilon' = 1e-06 is not "
                                              "supported"):
        from_keras_hub(backbone, tokenizer=gpt2_tokenizer)


def test_refuses_a_weight_of_the_wrong_shape(bert_tokenizer):
    backbone = with_config(keras_hub.models.BertBackbone(**BERT_CONFIGS[0]), intermediate_dim=53)
    with pytest.raises(CheckpointError, match=r"tensor 'transformer_layer_0/"
                                              r"feedforward_intermediate_dense/kernel' has shape "
                                              r"\(36, 52\), which does not fit "
                                              r"'block_0/feed_forward/intermediate/kernel' "
                                              r"\(36, 53\)"):
        from_keras_hub(backbone, tokenizer=bert_tokenizer)


def test_refuses_a_weight_left_over(gpt2_tokenizer):
    backbone = with_config(keras_hub.models.GPT2Backbone(**GPT2_CONFIGS[0]), num_layers=1)
    with pytest.raises(CheckpointError, match=r"tensor 'transformer_layer_1/"
                                              r"feedforward_intermediate_dense/bias' has no "
                                              "place in the kerasllm model"):
        from_keras_hub(backbone, tokenizer=gpt2_tokenizer)
