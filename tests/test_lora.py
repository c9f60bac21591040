"""LoRA adapters and freezing: a fresh adapter is exact, only what should train
trains, merging is exact, and adapters and frozen flags survive saving."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_config
from helpers import assert_keras_round_trip

import kerasllm
from kerasllm.data import build_dataset
from kerasllm.lora import (LoRAEinsumDense, count_parameters, load_lora_weights, lora_projections,
                           merge_lora, save_lora_weights)

LORA = {"rank": 4, "alpha": 8.0}
DECODER = {"kind": "decoder", "num_segments": 0}
T5 = {"family": "t5", "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "intermediate_dim": 64,
      "max_sequence_length": 32, "dropout": 0.0}


def lora_model(tokenizer, lora=LORA, model=None, **sections):
    return kerasllm.build_model(
        tiny_config(model={**(model or {}), "lora": lora}, **sections), tokenizer)




def values(model):
    return {weight.path: weight.numpy() for weight in model.weights}


def copy_base_weights(source, target):
    """Every weight of ``target`` but the adapters, from ``source``, by path."""
    sources = {weight.path: weight for weight in source.weights}
    adapters = {id(v) for p in lora_projections(target) for v in p.adapter_variables}
    for weight in target.weights:
        if id(weight) not in adapters:
            weight.assign(sources[weight.path])


def randomize_adapters(model):
    """B = 0 makes every adapter a no-op; give them values to compare against."""
    rng = np.random.default_rng(0)
    for projection in lora_projections(model):
        projection.lora_b.assign(rng.normal(0, 0.2, projection.lora_b.shape))


def backbone_inputs(model, length=12):
    rng = np.random.default_rng(1)
    return {key: (np.ones((2, length), "int32") if "padding_mask" in key else
                  np.zeros((2, length), "int32") if key == "segment_ids" else
                  rng.integers(5, 900, (2, length)).astype("int32"))
            for key in model.backbone.input_keys}


@pytest.fixture(scope="module")
def mlm_batches(tokenizer, documents):
    """Three MLM training batches, shared by the file's MLM models (the batches
    depend on the tokenizer and the objective, not on LoRA or freezing)."""
    model = kerasllm.build_model(tiny_config(), tokenizer)
    examples = tf.data.Dataset.from_tensor_slices({"text": documents})
    return build_dataset(model, examples, 8, 32, seed=0).take(3).cache().repeat()


@pytest.fixture(scope="module")
def trained(tokenizer, mlm_batches):
    """An MLM model with LoRA (query and value, rank 4) after three steps, its
    weights before them, and a batch."""
    keras.utils.set_random_seed(0)
    # No warm-up and a high rate: three steps move B well away from zero.
    model = lora_model(tokenizer, training={"learning_rate": 0.01, "warmup_steps": 0})
    before = values(model)
    model.fit(mlm_batches, steps_per_epoch=3, epochs=1, verbose=0)
    return model, before, next(iter(mlm_batches))[0]


def test_a_fresh_adapter_leaves_the_base_model_unchanged(tokenizer, mlm_batches, tmp_path):
    base = kerasllm.build_model(tiny_config(), tokenizer)
    base.save_weights(tmp_path / "base.weights.h5")
    model = lora_model(tokenizer)
    # A weights file saved without LoRA loads into the base weights, by layer path.
    model.load_weights(tmp_path / "base.weights.h5")
    x = next(iter(mlm_batches))[0]
    np.testing.assert_array_equal(model(x)["mlm"], base(x)["mlm"])
    for projection in lora_projections(model):
        assert not np.any(projection.lora_b.numpy())
        # PEFT's kaiming_uniform(a=sqrt(5)): U(±1/sqrt(fan_in)), fan_in = hidden_dim.
        a = projection.lora_a.numpy()
        assert 0.8 / np.sqrt(32) < np.abs(a).max() <= 1 / np.sqrt(32)


def test_only_the_adapters_and_the_head_train(trained):
    model, before, _ = trained
    after = values(model)
    adapters = {v.path for p in lora_projections(model) for v in p.adapter_variables}
    backbone = {weight.path for weight in model.backbone.weights}
    head = set(after) - backbone
    assert len(adapters) == 8  # query and value, lora_a and lora_b, in 2 blocks
    for path in after:
        changed = not np.array_equal(after[path], before[path])
        assert changed == (path in adapters | head), path
    assert {v.path for v in model.optimizer._trainable_variables} == adapters | head
    # rank * (inputs + outputs) per adapted projection, plus the MLM head: its
    # dense transform, layer norm and output bias (the output matrix is the
    # frozen, tied token embedding).
    vocabulary = model.backbone.vocabulary_size
    assert count_parameters(model) == {
        "trainable": 2 * 2 * 4 * (32 + 32) + (32 * 32 + 32) + 2 * 32 + vocabulary,
        "total": sum(v.size for v in after.values())}


def test_the_selected_blocks_and_projections_get_adapters(tokenizer):
    model = lora_model(tokenizer, lora={**LORA, "targets": ["key", "output"], "layers": [-1]})
    key, output = lora_projections(model)
    assert (key.path, output.path) == ("block_1/attention/key", "block_1/attention/output")
    # The output projection contracts heads and head_dim: A is (heads, head_dim, rank).
    assert output.lora_a.shape == (2, 16, 4) and output.lora_b.shape == (4, 32)
    head = (32 * 32 + 32) + 2 * 32 + model.backbone.vocabulary_size
    assert count_parameters(model)["trainable"] == 2 * 4 * (32 + 32) + head


def test_the_merged_model_computes_what_the_trained_one_does(trained):
    model, _, x = trained
    assert all(np.abs(p.lora_b.numpy()).max() > 0.01 for p in lora_projections(model))
    merged = merge_lora(model)
    assert merged.config.model.lora is None and not lora_projections(merged)
    assert merged.tokenizer is model.tokenizer
    np.testing.assert_allclose(merged(x)["mlm"], model(x)["mlm"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_config", [DECODER, T5], ids=["decoder", "t5"])
def test_merging_is_exact_for_decoders_and_encoder_decoders(model_config, tokenizer):
    # Adapters set by hand (training them would only add minutes): every
    # projection, so the output projection's (heads, head_dim) contraction and
    # T5's cross-attention are merged too.
    model = lora_model(tokenizer, lora={**LORA, "targets": ["query", "key", "value", "output"]},
                       model=model_config, objectives=[])
    randomize_adapters(model)
    if model_config is T5:
        assert any("cross_attention" in p.path for p in lora_projections(model))
    merged = merge_lora(model)
    x = backbone_inputs(model)
    expected, got = model.backbone(x), merged.backbone(x)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-5, rtol=0)


def test_lora_dropout_applies_in_training_only(tokenizer):
    outputs = {}
    for rate in (0.0, 0.5):
        model = lora_model(tokenizer, lora={**LORA, "dropout": rate})
        randomize_adapters(model)
        x = backbone_inputs(model)
        outputs[rate] = [model.backbone(x, training=training)["sequence_output"].numpy()
                         for training in (True, False, False)]
    training, inference, again = outputs[0.5]
    assert np.abs(training - inference).max() > 1e-3
    np.testing.assert_array_equal(inference, again)
    # The model itself has no dropout here: without LoRA's, training is inference.
    np.testing.assert_array_equal(outputs[0.0][0], outputs[0.0][1])


def test_lora_weights_load_into_a_fresh_model(trained, tokenizer, tmp_path):
    model, _, x = trained
    path = tmp_path / "adapter.npz"
    save_lora_weights(model, path)
    assert os.listdir(tmp_path) == ["adapter.npz"]  # the temporary file was renamed
    fresh = lora_model(tokenizer)
    copy_base_weights(model, fresh)
    assert not np.allclose(fresh(x)["mlm"], model(x)["mlm"])
    load_lora_weights(fresh, path)
    np.testing.assert_array_equal(fresh(x)["mlm"], model(x)["mlm"])


@pytest.mark.parametrize("lora, message", [
    ({**LORA, "targets": ["query", "key"]},
     r"adapter.npz lacks the model's LoRA variable 'block_0/attention/key/lora_a' \(4 missing\)"
     r": the file was saved from a model with other model.lora targets or layers"),
    ({**LORA, "layers": [0]},
     r"adapter.npz holds 'block_1/attention/query/lora_a', which is not a LoRA variable of "
     r"the model \(4 such\)"),
    ({**LORA, "rank": 2},
     r"adapter.npz: 'block_0/attention/query/lora_a' has shape \(32, 4\), the model's \(32, 2\)"
     r": saved with model.lora.rank 4, the model has 2"),
    ({**LORA, "alpha": 16.0},
     r"adapter.npz was trained with model.lora.alpha 8.0, the model has 16.0"),
])
def test_a_mismatched_lora_weights_file_is_refused(trained, tokenizer, tmp_path, lora, message):
    path = tmp_path / "adapter.npz"
    save_lora_weights(trained[0], path)
    other = lora_model(tokenizer, lora=lora)
    before = values(other)
    with pytest.raises(kerasllm.KerasLLMError, match=message):
        load_lora_weights(other, path)
    assert all(np.array_equal(v, before[k]) for k, v in values(other).items())


def test_lora_functions_refuse_a_model_or_file_without_adapters(trained, tokenizer, tmp_path):
    plain = kerasllm.build_model(tiny_config(), tokenizer)
    for function in (merge_lora, lambda model: save_lora_weights(model, tmp_path / "a.npz")):
        with pytest.raises(kerasllm.KerasLLMError, match="the model has no LoRA adapters"):
            function(plain)
    with pytest.raises(kerasllm.KerasLLMError, match="LoRA weights file not found: .*a.npz"):
        load_lora_weights(trained[0], tmp_path / "a.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(kerasllm.KerasLLMError, match=r"other.npz is not a LoRA weights file "
                                                     r"\(no 'lora_config' entry\)"):
        load_lora_weights(trained[0], tmp_path / "other.npz")


def test_keras_round_trip_keeps_the_adapters_and_what_is_frozen(trained, tmp_path):
    model, _, x = trained
    restored = assert_keras_round_trip(model, x, tmp_path)
    assert all(isinstance(p, LoRAEinsumDense) for p in lora_projections(restored))
    assert {w.path: w.trainable for w in restored.weights} == {
        w.path: w.trainable for w in model.weights}


def test_frozen_embeddings_and_first_layers_stay_fixed(tokenizer, mlm_batches, tmp_path):
    # No pooler: MLM gives it no gradient, so it would stay unchanged unfrozen.
    model = kerasllm.build_model(tiny_config(
        model={"tie_embeddings": False, "pooler": False},
        training={"freeze_embeddings": True, "freeze_layers": 1}), tokenizer)
    before = values(model)
    model.fit(mlm_batches, steps_per_epoch=3, epochs=1, verbose=0)
    after = values(model)
    x = next(iter(mlm_batches))[0]
    # The untied output projection is the LM's, not an input embedding.
    output_projection = "embedding/token_embedding/reverse_embeddings"
    frozen = {path for path in after
              if path.startswith(("embedding/", "block_0/")) and path != output_projection}
    for path in after:
        assert np.array_equal(after[path], before[path]) == (path in frozen), path
    assert {v.path for v in model.optimizer._trainable_variables} == set(after) - frozen
    restored = assert_keras_round_trip(model, x, tmp_path)
    assert {w.path: w.trainable for w in restored.weights} == {
        w.path: w.trainable for w in model.weights}


def test_freeze_layers_freezes_the_first_blocks_of_each_stack(tokenizer):
    model = kerasllm.build_model(tiny_config(model=T5, objectives=[],
                                             training={"freeze_layers": 1}), tokenizer)
    trainable = {w.path.split("/")[0] for w in model.trainable_weights}
    assert trainable >= {"encoder_block_1", "block_1"}
    assert not trainable & {"encoder_block_0", "block_0"}


@pytest.mark.parametrize("sections, message", [
    ({"model": {"lora": {"targets": ["query", "keys"]}}},
     "unknown LoRA target 'keys' in model.lora.targets[1]; known: query, key, value, output"),
    ({"model": {"lora": {"rank": 0}}}, "model.lora.rank must be > 0, got 0"),
    ({"model": {"lora": {"dropout": 1.0}}}, "model.lora.dropout must be in [0, 1), got 1.0"),
    ({"training": {"freeze_layers": 3}},
     "training.freeze_layers (3) exceeds model.num_layers (2); freeze at most 2 blocks"),
    ({"model": {**T5, "num_decoder_layers": 1}, "objectives": [],
      "training": {"freeze_layers": 2}},
     "training.freeze_layers (2) exceeds model.num_decoder_layers (1)"),
])
def test_invalid_settings_are_config_errors(sections, message):
    with pytest.raises(kerasllm.ConfigError) as error:
        kerasllm.load_config(tiny_config(**sections))
    assert str(error.value).startswith(message)


def test_an_out_of_range_lora_layer_names_the_key_and_the_depth(tokenizer):
    with pytest.raises(ValueError, match=r"model.lora.layers: block -3 is out of range for a "
                                         r"stack of 2 layers; use 0 to 1, or -1 to -2"):
        lora_model(tokenizer, lora={**LORA, "layers": [0, -3]})
