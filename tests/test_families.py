"""Architecture families against Hugging Face transformers: import, parity, refusals.

Each reference model (tests/hf_models.py) is saved with ``save_pretrained``,
imported with ``kerasllm.from_hf`` and run on padded batches of odd lengths;
hidden states and logits must agree to 1e-4 at every real position.
"""

import json

import numpy as np
import pytest
from hf_models import CONFIGS, padded_batch, reference_model, save, tokenizer, torch, torch_ids

import kerasllm
from kerasllm.hf import CheckpointError, from_hf

TOLERANCE = 1e-4


def max_difference(ours, reference, mask):
    return float(np.abs(np.asarray(ours) - np.asarray(reference))[mask.astype(bool)].max())


def compare_encoder_or_decoder(model, reference, length=11, lengths=(11, 7, 4)):
    token_ids, padding_mask = padded_batch(reference.config.vocab_size, length, lengths)
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    if "segment_ids" in model.backbone.input_keys:
        segments = reference.config.type_vocab_size
        inputs["segment_ids"] = (np.arange(length)[None] * segments // length).repeat(3, 0) \
            .astype("int32")
    with torch.no_grad():
        expected = reference(
            input_ids=torch_ids(token_ids), attention_mask=torch_ids(padding_mask),
            token_type_ids=torch_ids(inputs["segment_ids"]) if "segment_ids" in inputs else None,
            output_hidden_states=True)
    outputs = model.backbone(inputs)
    differences = {"sequence_output": max_difference(
        outputs["sequence_output"], expected.hidden_states[-1], padding_mask)}
    if getattr(expected, "pooler_output", None) is not None:
        differences["pooled_output"] = float(np.abs(
            outputs["pooled_output"] - expected.pooler_output.numpy()).max())
    if model.heads:
        head = model.heads[0].name
        if head == "mlm":  # logits at every position, not only masked ones
            inputs["mask_positions"] = np.tile(np.arange(length, dtype="int32"), (3, 1))
        # A base GPT-2 has no LM head module, but its logits are tied ones.
        logits = expected.logits if hasattr(expected, "logits") else \
            expected.hidden_states[-1] @ reference.get_input_embeddings().weight.detach().T
        differences["logits"] = max_difference(model(inputs)[head], logits, padding_mask)
    return differences


def compare_encoder_decoder(model, reference):
    vocabulary_size = reference.config.vocab_size
    token_ids, padding_mask = padded_batch(vocabulary_size, 13, (13, 9, 5))
    decoder_ids, decoder_mask = padded_batch(vocabulary_size, 7, (7, 7, 3), seed=1)
    with torch.no_grad():
        expected = reference(
            input_ids=torch_ids(token_ids), attention_mask=torch_ids(padding_mask),
            decoder_input_ids=torch_ids(decoder_ids),
            decoder_attention_mask=torch_ids(decoder_mask), output_hidden_states=True)
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask,
              "decoder_token_ids": decoder_ids, "decoder_padding_mask": decoder_mask}
    outputs = model.backbone(inputs)
    return {
        "encoder_sequence_output": max_difference(
            outputs["encoder_sequence_output"], expected.encoder_last_hidden_state,
            padding_mask),
        "sequence_output": max_difference(
            outputs["sequence_output"], expected.decoder_hidden_states[-1], decoder_mask),
        "logits": max_difference(model(inputs)["clm"], expected.logits, decoder_mask),
    }


EXPECTED_HEADS = {"bert-mlm": ["mlm"], "bert-base": [], "roberta-mlm": ["mlm"],
                  "roberta-base": [], "gpt2-base": ["clm"]}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_imported_checkpoint_matches_transformers(name, tmp_path):
    reference = reference_model(name)
    model = from_hf(save(reference, tmp_path / name), tokenizer=tokenizer())
    assert [head.name for head in model.heads] == EXPECTED_HEADS.get(name, ["clm"])
    if model.backbone.kind == "encoder_decoder":
        differences = compare_encoder_decoder(model, reference)
    else:
        differences = compare_encoder_or_decoder(model, reference)
    print(name, differences)
    assert max(differences.values()) <= TOLERANCE, differences


def test_sharded_checkpoint(tmp_path):
    reference = reference_model("llama-gqa")
    directory = save(reference, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    model = from_hf(directory, tokenizer=tokenizer())
    assert max(compare_encoder_or_decoder(model, reference).values()) <= TOLERANCE


def test_bfloat16_checkpoint_is_widened(tmp_path):
    reference = reference_model("gpt2-lm").to(torch.bfloat16)
    model = from_hf(save(reference, tmp_path / "bf16"), tokenizer=tokenizer())
    differences = compare_encoder_or_decoder(model, reference.float())
    assert max(differences.values()) <= TOLERANCE


def test_untied_t5_v1_1_checkpoint_with_its_own_output_matrix(tmp_path):
    """Checkpoints written before transformers 5 keep T5 v1.1's lm_head.weight and
    say tie_word_embeddings: false (transformers 5 itself always ties)."""
    from safetensors.numpy import load_file, save_file

    reference = reference_model("t5-v1_1")
    directory = save(reference, tmp_path / "t5")
    tensors = load_file(directory / "model.safetensors")
    output_matrix = np.random.default_rng(0).normal(size=tensors["shared.weight"].shape)
    tensors["lm_head.weight"] = output_matrix.astype("float32")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config.pop("scale_decoder_outputs", None)
    config["tie_word_embeddings"] = False
    (directory / "config.json").write_text(json.dumps(config))

    model = from_hf(directory, tokenizer=tokenizer())
    assert not model.backbone.tie_embeddings and not model.backbone.scale_logits
    token_ids, padding_mask = padded_batch(90, 9, (9, 6))
    decoder_ids, decoder_mask = padded_batch(90, 5, (5, 5), seed=1)
    with torch.no_grad():
        expected = reference(
            input_ids=torch_ids(token_ids), attention_mask=torch_ids(padding_mask),
            decoder_input_ids=torch_ids(decoder_ids), output_hidden_states=True)
    logits = model({"token_ids": token_ids, "padding_mask": padding_mask,
                    "decoder_token_ids": decoder_ids, "decoder_padding_mask": decoder_mask})
    hidden = expected.decoder_hidden_states[-1].numpy()
    assert max_difference(logits["clm"], hidden @ output_matrix.T, decoder_mask) <= TOLERANCE


def test_headless_import_returns_backbone_outputs_and_refuses_to_train(tmp_path):
    model = from_hf(save(reference_model("bert-base"), tmp_path / "bert"), tokenizer=tokenizer())
    token_ids, padding_mask = padded_batch(83, 5, (5,))
    outputs = model({"token_ids": token_ids, "padding_mask": padding_mask,
                     "segment_ids": np.zeros_like(token_ids)})
    assert set(outputs) == {"sequence_output", "pooled_output"}
    with pytest.raises(ValueError, match="no objectives and no task head"):
        model.compute_loss(y={}, y_pred={})


def test_new_task_head_on_an_imported_backbone(tmp_path):
    """The checkpoint's MLM head is dropped when the user asks for another head;
    the backbone still matches the reference."""
    reference = reference_model("bert-mlm")
    model = from_hf(save(reference, tmp_path / "bert"), tokenizer=tokenizer(),
                    head={"name": "classification", "options": {
                        "num_classes": 3, "representation": "first_token"}})
    assert [head.name for head in model.heads] == ["classification"]
    model.heads = []  # compare the backbone alone
    assert compare_encoder_or_decoder(model, reference)["sequence_output"] <= TOLERANCE


def test_converted_model_saves_and_reloads(tmp_path):
    reference = reference_model("llama-gqa")
    model = from_hf(save(reference, tmp_path / "llama"), tokenizer=tokenizer())
    model.save(tmp_path / "model.keras")
    restored = kerasllm.load_model(tmp_path)
    token_ids, padding_mask = padded_batch(97, 9, (9, 4))
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    np.testing.assert_array_equal(restored(inputs)["clm"], model(inputs)["clm"])


# === Refusals: never a silent partial load ===


def modify_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("name,changes,field", [
    ("gpt2-lm", {"scale_attn_by_inverse_layer_idx": True}, "'scale_attn_by_inverse_layer_idx'"),
    ("llama-gqa", {"hidden_act": "gelu"}, "'hidden_act' = 'gelu'"),
    ("llama-gqa", {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                       "rope_theta": 1e4}}, "'rope_parameters.rope_type'"),
    ("llama-gqa", {"attention_bias": True, "mlp_bias": False}, "'mlp_bias'"),
    ("t5", {"feed_forward_proj": "gated-silu"}, "'feed_forward_proj' = 'gated-silu'"),
    ("bert-base", {"position_embedding_type": "relative_key"}, "'position_embedding_type'"),
    ("gpt2-lm", {"model_type": "bart"}, "model_type 'bart' is not supported"),
])
def test_unsupported_config_field_is_named(name, changes, field, tmp_path):
    directory = modify_config(save(reference_model(name), tmp_path / name), **changes)
    with pytest.raises(CheckpointError, match="config.json") as error:
        from_hf(directory, tokenizer=tokenizer())
    assert field in str(error.value)


def test_unrepresentable_tensor_is_named(tmp_path):
    """BertForPreTraining has an NSP head kerasllm's import does not carry."""
    from transformers import BertConfig, BertForPreTraining

    reference = BertForPreTraining(BertConfig(**CONFIGS["bert-mlm"][2]))
    with pytest.raises(CheckpointError, match="tensor 'cls.seq_relationship.bias' has no place"):
        from_hf(save(reference, tmp_path / "bert"), tokenizer=tokenizer())


def test_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    directory = save(reference_model("gpt2-lm"), tmp_path / "gpt2")
    tensors = load_file(directory / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor 'transformer.h.1.mlp.c_fc.bias' \(for "
                                              r"'block_1/feed_forward/intermediate/bias'\) is "
                                              "missing"):
        from_hf(directory, tokenizer=tokenizer())


def test_directory_without_weights(tmp_path):
    directory = save(reference_model("gpt2-lm"), tmp_path / "gpt2")
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        from_hf(directory, tokenizer=tokenizer())


# === End to end: checkpoint with tokenizer files → CLI convert → generate text ===


def test_convert_command_and_text_generation_match_transformers(tmp_path):
    """A GPT-2 checkpoint with its byte-level BPE files goes through `kerasllm
    convert`; the saved model generates the same text as transformers."""
    import subprocess
    import sys

    from hf_fixtures import _byte_level_bpe, corpus_lines, reference
    from transformers import GPT2Config, GPT2LMHeadModel

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines()[:3000]))
    directory = _byte_level_bpe(tmp_path, corpus)["gpt2"]
    hf_tokenizer = reference(directory)
    end = hf_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    reference_model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(hf_tokenizer), n_embd=48, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=end, eos_token_id=end)).eval()
    reference_model.save_pretrained(directory)

    result = subprocess.run(
        [sys.executable, "-m", "kerasllm.cli", "convert", "--from-hf", str(directory),
         "--out", str(tmp_path / "converted")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "gpt2 decoder: 2 layers, hidden 48" in result.stdout
    assert "heads: clm" in result.stdout
    model = kerasllm.load_model(tmp_path / "converted")

    prompts = ["The return statement", "Built-in functions are", "A"]
    texts = model.generate(prompts, max_new_tokens=10)
    for prompt, text in zip(prompts, texts):
        ids = hf_tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = reference_model.generate(ids, max_new_tokens=10, do_sample=False,
                                                pad_token_id=end)
        assert text == hf_tokenizer.decode(expected[0], skip_special_tokens=True)


def test_convert_command_reports_an_unsupported_checkpoint(tmp_path):
    import subprocess
    import sys

    directory = modify_config(save(reference_model("gpt2-lm"), tmp_path / "gpt2"),
                              activation_function="swish")
    result = subprocess.run(
        [sys.executable, "-m", "kerasllm.cli", "convert", "--from-hf", str(directory),
         "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"kerasllm: error: {directory / 'config.json'}: config field 'activation_function' = "
        "'swish' is not supported (kerasllm can represent: 'gelu_new', 'gelu_pytorch_tanh', "
        "'gelu', 'relu')")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_text_generation_with_sentencepiece_tokenizers_matches_transformers(family, tmp_path):
    """Llama's prompt starts with <s>; T5's encoder input ends with </s>; both as
    transformers tokenizes and generates."""
    from hf_fixtures import _llama, _t5, corpus_lines, reference

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines()[:3000]))
    directory = (_llama if family == "llama" else _t5)(tmp_path, corpus)[family]
    hf_tokenizer = reference(directory)
    name = "llama-gqa" if family == "llama" else "t5"
    model_class, config_class, arguments = CONFIGS[name]
    arguments = {**arguments, "vocab_size": len(hf_tokenizer),
                 "eos_token_id": hf_tokenizer.eos_token_id}
    torch.manual_seed(0)
    import transformers

    reference_model = getattr(transformers, model_class)(
        getattr(transformers, config_class)(**arguments)).eval()
    reference_model.save_pretrained(directory)
    model = from_hf(directory)

    prompts = ["The return statement", "A"]
    texts = model.generate(prompts, max_new_tokens=8)
    for prompt, text in zip(prompts, texts):
        ids = hf_tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = reference_model.generate(ids, max_new_tokens=8, do_sample=False,
                                                use_cache=family != "t5")
        if family == "t5":
            expected = expected[:, 1:]
        assert text == hf_tokenizer.decode(expected[0], skip_special_tokens=True)


def test_untied_base_checkpoint_imports_headless_and_refuses_to_generate(tmp_path):
    from transformers import LlamaConfig, LlamaModel

    reference = LlamaModel(LlamaConfig(**CONFIGS["llama-gqa"][2])).eval()
    model = from_hf(save(reference, tmp_path / "llama"), tokenizer=tokenizer())
    assert model.heads == []
    assert compare_encoder_or_decoder(model, reference)["sequence_output"] <= TOLERANCE
    with pytest.raises(ValueError, match="no trained output projection"):
        model.generate([[5, 6, 7]])


def test_a_differing_copy_of_a_tied_weight_is_refused(tmp_path):
    """transformers may save a tied weight twice; a copy that differs is a separate
    weight kerasllm would drop, so the import stops."""
    from safetensors.numpy import load_file, save_file

    directory = save(reference_model("gpt2-lm"), tmp_path / "gpt2")
    tensors = load_file(directory / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    from_hf(directory, tokenizer=tokenizer())  # an equal copy imports
    tensors["lm_head.weight"][0, 0] += 1.0
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="tensor 'lm_head.weight' differs from "
                                              "'transformer.wte.weight'"):
        from_hf(directory, tokenizer=tokenizer())
