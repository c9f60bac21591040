"""Import Hugging Face transformers checkpoints (BERT, RoBERTa, GPT-2, Llama, T5).

A checkpoint directory as ``save_pretrained`` writes it: ``config.json``, the
weights in ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) and the tokenizer files. The weights are read
with ``safetensors`` into TensorFlow, never with torch.

The flow: the source config becomes a kerasllm ``model`` config (a family
preset plus sizes), refusing the first field kerasllm cannot represent; a
table per family names, for every kerasllm weight, the source tensor and the
reshape it needs (nanoGPT's ``from_pretrained`` style); the import fails,
naming the tensor, if a source tensor is left over or a kerasllm weight is
missing, so a load is never partial.
"""

import json
import pathlib

import numpy as np

from kerasllm.errors import KerasLLMError

# Buffers some transformers versions save that hold no learned values.
_BUFFERS = ("position_ids", ".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


class CheckpointError(KerasLLMError):
    """A checkpoint kerasllm cannot read or represent; the message names the
    file, config field or tensor."""


def from_hf(path, *, objectives=None, head=None, tokenizer=None):
    """A :class:`kerasllm.KerasLLMModel` from a Hugging Face checkpoint directory.

    The language-model head of the checkpoint comes along when it has one
    (``*ForMaskedLM`` → ``mlm``; ``*ForCausalLM``, ``GPT2LMHeadModel``,
    ``T5ForConditionalGeneration`` or tied embeddings → ``clm``); a base model
    without one is imported headless (``model(inputs)`` returns the backbone's
    outputs). Give ``objectives`` (a list of objective configs) or ``head`` (a
    task-head config) to put new heads on the imported backbone instead, e.g.
    for fine-tuning. ``tokenizer``: a kerasllm/keras-hub tokenizer, or a directory
    of Hugging Face tokenizer files; default: the checkpoint directory's.

    Examples:
    ```python
    model = kerasllm.from_hf("checkpoints/gpt2")
    model.generate(["The meaning of"], max_new_tokens=20)
    classifier = kerasllm.from_hf(
        "checkpoints/bert", head={"name": "classification", "options": {"num_classes": 2}})
    ```
    """
    from kerasllm.builder import build_model

    path = pathlib.Path(path)
    source = _read_json(path / "config.json")
    family, model_config = translate_config(source, path / "config.json")
    model_config["family"] = family
    tensors = _TensorFiles(path)
    prefix, lm_objective = _layout(family, tensors, model_config)
    if model_config["kind"] == "encoder":  # *ForMaskedLM checkpoints have no pooler
        model_config["pooler"] = f"{prefix}pooler.dense.weight" in tensors.names
    if objectives is None and head is None:
        objectives = [{"name": lm_objective}] if lm_objective else []
    config = {
        "model": model_config,
        "tokenizer": {"name": "hf", "vocabulary": str(path)},
        "data": {"sequence_length": min(512, model_config["max_sequence_length"]
                                        - model_config.get("position_offset", 0))},
        "objectives": objectives or [],
        "head": head,
        "training": {"output": f"runs/{path.name}"},
    }
    if tokenizer is None or isinstance(tokenizer, (str, pathlib.Path)):
        from kerasllm.hf_tokenizer import load_hf_tokenizer

        tokenizer = load_hf_tokenizer(tokenizer or path)
    model = build_model(config, tokenizer)
    backbone_table, head_tables = _TABLES[family](model.backbone, prefix)
    lm_table = {f"{lm_objective}/{target}": source
                for target, source in head_tables.get(lm_objective, {}).items()}
    # Weights that keep their fresh initialisation: new heads, and the output
    # projection of an untied checkpoint saved without one (a base model).
    targets = {w.path: w for w in model.backbone.weights}
    if backbone_table.get(_OUTPUT_MATRIX, (None,))[0] not in tensors.names:
        targets.pop(_OUTPUT_MATRIX, None)
    for model_head in model.heads:
        if model_head.name == lm_objective:
            targets.update({w.path: w for w in model_head.weights})
    table = {**backbone_table, **lm_table}
    used = {table[target][0] for target in targets if target in table}
    unused_ok = _check_tied_copies(family, prefix, tensors, used, path)
    if lm_objective not in {h.name for h in model.heads}:
        unused_ok |= {name for name, _ in lm_table.values()}
    assign_weights(targets, table, tensors, path, unused_ok)
    return model


# The untied output projection: a base checkpoint may lack it (it then starts fresh).
_OUTPUT_MATRIX = "embedding/token_embedding/reverse_embeddings"


def translate_config(source, where):
    """``(family, kerasllm model config)`` from a transformers config dict."""
    model_type = source.get("model_type")
    if model_type not in _TRANSLATIONS:
        raise CheckpointError(
            f"{where}: model_type '{model_type}' is not supported; kerasllm imports "
            f"{', '.join(sorted(_TRANSLATIONS))}")
    return _TRANSLATIONS[model_type](_Fields(source, where))


class _Fields:
    """Reads a transformers config, refusing values kerasllm cannot represent."""

    def __init__(self, source, where):
        self.source, self.where = source, where

    def get(self, name, default=None):
        return self.source.get(name, default)

    def require(self, name, allowed, default=None):
        """The value of ``name``; CheckpointError naming the field unless allowed."""
        value = self.source.get(name, default)
        if value not in allowed:
            shown = ", ".join(repr(a) for a in allowed)
            raise CheckpointError(
                f"{self.where}: config field '{name}' = {value!r} is not supported "
                f"(kerasllm can represent: {shown})")
        return value


def _bert(fields, family="bert"):
    from kerasllm.presets import family_preset

    fields.require("position_embedding_type", ["absolute"], "absolute")
    fields.require("is_decoder", [False], False)
    fields.require("add_cross_attention", [False], False)
    activation = {"gelu": "gelu", "gelu_new": "gelu_approximate", "relu": "relu"}
    act = fields.require("hidden_act", list(activation))
    config = family_preset(family)
    offset = fields.get("pad_token_id", 1) + 1 if family == "roberta" else 0
    config.update(
        num_layers=fields.get("num_hidden_layers"), num_heads=fields.get("num_attention_heads"),
        hidden_dim=fields.get("hidden_size"), intermediate_dim=fields.get("intermediate_size"),
        max_sequence_length=fields.get("max_position_embeddings"), position_offset=offset,
        vocabulary_size=fields.get("vocab_size"), num_segments=fields.get("type_vocab_size"),
        activation=activation[act], layer_norm_epsilon=fields.get("layer_norm_eps"),
        dropout=fields.get("hidden_dropout_prob", 0.1),
    )
    return family, config


def _gpt2(fields):
    from kerasllm.presets import family_preset

    fields.require("scale_attn_by_inverse_layer_idx", [False], False)
    fields.require("add_cross_attention", [False], False)
    activation = {"gelu_new": "gelu_approximate", "gelu_pytorch_tanh": "gelu_approximate",
                  "gelu": "gelu", "relu": "relu"}
    act = fields.require("activation_function", list(activation), "gelu_new")
    hidden = fields.get("n_embd")
    config = family_preset("gpt2")
    config.update(
        num_layers=fields.get("n_layer"), num_heads=fields.get("n_head"), hidden_dim=hidden,
        intermediate_dim=fields.get("n_inner") or 4 * hidden,
        max_sequence_length=fields.get("n_positions"), vocabulary_size=fields.get("vocab_size"),
        activation=activation[act], layer_norm_epsilon=fields.get("layer_norm_epsilon", 1e-5),
        scale_scores=fields.get("scale_attn_weights", True),
        tie_embeddings=fields.get("tie_word_embeddings", True),
        dropout=fields.get("resid_pdrop", 0.1),
    )
    return "gpt2", config


def _llama(fields):
    from kerasllm.presets import family_preset

    fields.require("hidden_act", ["silu"])
    fields.require("rope_scaling", [None])
    rope = fields.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(
            f"{fields.where}: config field 'rope_parameters.rope_type' = "
            f"{rope['rope_type']!r} is not supported (kerasllm can represent: 'default')")
    bias = fields.require("attention_bias", [False, True], False)
    fields.require("mlp_bias", [bias], False)
    config = family_preset("llama")
    config.update(
        num_layers=fields.get("num_hidden_layers"), num_heads=fields.get("num_attention_heads"),
        num_key_value_heads=fields.get("num_key_value_heads"),
        head_dim=fields.get("head_dim"), hidden_dim=fields.get("hidden_size"),
        intermediate_dim=fields.get("intermediate_size"),
        max_sequence_length=fields.get("max_position_embeddings"),
        vocabulary_size=fields.get("vocab_size"), use_bias=bias,
        rotary_theta=float(rope.get("rope_theta", fields.get("rope_theta", 10000.0))),
        layer_norm_epsilon=fields.get("rms_norm_eps"),
        tie_embeddings=fields.get("tie_word_embeddings", False),
        dropout=fields.get("attention_dropout", 0.0),
    )
    return "llama", config


def _t5(fields):
    from kerasllm.presets import family_preset

    projection = fields.require("feed_forward_proj", ["relu", "gated-gelu"], "relu")
    fields.require("is_encoder_decoder", [True], True)
    family = "t5" if projection == "relu" else "t5_v1_1"
    config = family_preset(family)
    config.update(
        num_layers=fields.get("num_layers"),
        num_decoder_layers=fields.get("num_decoder_layers") or fields.get("num_layers"),
        num_heads=fields.get("num_heads"), head_dim=fields.get("d_kv"),
        hidden_dim=fields.get("d_model"), intermediate_dim=fields.get("d_ff"),
        max_sequence_length=fields.get("n_positions", 512),
        vocabulary_size=fields.get("vocab_size"),
        relative_buckets=fields.get("relative_attention_num_buckets", 32),
        relative_max_distance=fields.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=fields.get("layer_norm_epsilon", 1e-6),
        # transformers 5 always ties T5's output projection and says whether to
        # scale in `scale_decoder_outputs`; earlier versions used an untied head
        # (a saved lm_head.weight) as the sign not to scale.
        tie_embeddings=fields.get("tie_word_embeddings", True),
        scale_logits=fields.get("scale_decoder_outputs",
                                fields.get("tie_word_embeddings", True) is not False),
        dropout=fields.get("dropout_rate", 0.1),
    )
    return family, config


_TRANSLATIONS = {
    "bert": _bert,
    "roberta": lambda fields: _bert(fields, "roberta"),
    "gpt2": _gpt2,
    "llama": _llama,
    "t5": _t5,
}


# === Weight tables: kerasllm weight path → (source tensor name, transform) ===
#
# transformers' nn.Linear stores (out, in); kerasllm's kernels are (in, ...):
# transpose, then split the head axis. GPT-2's Conv1D is already (in, out).


def _heads_in(heads, head_dim):
    """Linear (heads * head_dim, in) → EinsumDense kernel (in, heads, head_dim)."""
    return lambda w: w.T.reshape(w.shape[1], heads, head_dim)


def _heads_out(heads, head_dim):
    """Linear (out, heads * head_dim) → EinsumDense kernel (heads, head_dim, out)."""
    return lambda w: w.T.reshape(heads, head_dim, w.shape[0])


def _split_heads(heads, head_dim):
    return lambda b: b.reshape(heads, head_dim)


def unchanged(w):
    return w


def _transpose(w):
    return w.T


def _attention_table(target, source, names, backbone, biases):
    """Query/key/value/output of one attention layer from separate Linear tensors."""
    attention = getattr(backbone.get_layer(target.split("/")[0]),
                        "cross" if target.endswith("cross_attention") else "attention")
    heads, kv_heads, head_dim = (attention.num_heads, attention.num_key_value_heads,
                                 attention._head_dim)
    table = {}
    for ours, theirs, count in zip(("query", "key", "value"), names[:3],
                                   (heads, kv_heads, kv_heads)):
        table[f"{target}/{ours}/kernel"] = (f"{source}.{theirs}.weight",
                                            _heads_in(count, head_dim))
        if biases:
            table[f"{target}/{ours}/bias"] = (f"{source}.{theirs}.bias",
                                              _split_heads(count, head_dim))
    table[f"{target}/output/kernel"] = (f"{source}.{names[3]}.weight", _heads_out(heads, head_dim))
    if biases:
        table[f"{target}/output/bias"] = (f"{source}.{names[3]}.bias", unchanged)
    return table


def _norm_table(target, source, rms):
    if rms:
        return {f"{target}/scale": (f"{source}.weight", unchanged)}
    return {f"{target}/gamma": (f"{source}.weight", unchanged),
            f"{target}/beta": (f"{source}.bias", unchanged)}


def _dense_table(target, source, transform=_transpose, bias=True):
    table = {f"{target}/kernel": (f"{source}.weight", transform)}
    if bias:
        table[f"{target}/bias"] = (f"{source}.bias", unchanged)
    return table


def _output_embedding(backbone, name):
    """The untied output projection: transformers (vocabulary, hidden) → (hidden, vocabulary)."""
    if backbone.tie_embeddings:
        return {}
    return {_OUTPUT_MATRIX: (name, _transpose)}


def _bert_tables(backbone, prefix):
    table = {
        "embedding/token_embedding/embeddings": (f"{prefix}embeddings.word_embeddings.weight",
                                                 unchanged),
        "embedding/position_embedding/embeddings": (
            f"{prefix}embeddings.position_embeddings.weight", unchanged),
        "embedding/segment_embedding/embeddings": (
            f"{prefix}embeddings.token_type_embeddings.weight", unchanged),
        **_norm_table("embedding/norm", f"{prefix}embeddings.LayerNorm", False),
    }
    for i in range(backbone.num_layers):
        source, target = f"{prefix}encoder.layer.{i}", f"block_{i}"
        table.update(_attention_table(f"{target}/attention", f"{source}.attention",
                                      ("self.query", "self.key", "self.value", "output.dense"),
                                      backbone, True))
        table.update(_norm_table(f"{target}/attention_norm",
                                 f"{source}.attention.output.LayerNorm", False))
        table.update(_dense_table(f"{target}/feed_forward/intermediate",
                                  f"{source}.intermediate.dense"))
        table.update(_dense_table(f"{target}/feed_forward/output", f"{source}.output.dense"))
        table.update(_norm_table(f"{target}/feed_forward_norm", f"{source}.output.LayerNorm",
                                 False))
    if backbone.pooler:
        table.update(_dense_table("pooler", f"{prefix}pooler.dense"))
    # BERT's MLM head is `cls.predictions`, RoBERTa's `lm_head`; both project
    # through the tied word embeddings plus a bias.
    lm = "lm_head" if prefix == "roberta." else "cls.predictions"
    transform, norm = (("dense", "layer_norm") if prefix == "roberta."
                       else ("transform.dense", "transform.LayerNorm"))
    mlm = {
        **_dense_table("lm_head/intermediate_dense", f"{lm}.{transform}"),
        **_norm_table("lm_head/intermediate_layer_norm", f"{lm}.{norm}", False),
        "lm_head/output_bias": (f"{lm}.bias", unchanged),
    }
    return table, {"mlm": mlm}


def _gpt2_tables(backbone, prefix):
    heads, head_dim = backbone.num_heads, backbone.hidden_dim // backbone.num_heads
    table = {
        "embedding/token_embedding/embeddings": (f"{prefix}wte.weight", unchanged),
        "embedding/position_embedding/embeddings": (f"{prefix}wpe.weight", unchanged),
        **_norm_table("final_norm", f"{prefix}ln_f", False),
        **_output_embedding(backbone, "lm_head.weight"),
    }
    for i in range(backbone.num_layers):
        source, target = f"{prefix}h.{i}", f"block_{i}/attention"
        # c_attn is one Conv1D (in, 3 * hidden): query, key and value side by side.
        for j, name in enumerate(("query", "key", "value")):
            table[f"{target}/{name}/kernel"] = (
                f"{source}.attn.c_attn.weight",
                lambda w, j=j: np.split(w, 3, axis=1)[j].reshape(-1, heads, head_dim))
            table[f"{target}/{name}/bias"] = (
                f"{source}.attn.c_attn.bias",
                lambda b, j=j: np.split(b, 3)[j].reshape(heads, head_dim))
        table[f"{target}/output/kernel"] = (f"{source}.attn.c_proj.weight",
                                            lambda w: w.reshape(heads, head_dim, -1))
        table[f"{target}/output/bias"] = (f"{source}.attn.c_proj.bias", unchanged)
        table.update(_norm_table(f"block_{i}/attention_norm", f"{source}.ln_1", False))
        table.update(_norm_table(f"block_{i}/feed_forward_norm", f"{source}.ln_2", False))
        table.update(_dense_table(f"block_{i}/feed_forward/intermediate",
                                  f"{source}.mlp.c_fc", unchanged))
        table.update(_dense_table(f"block_{i}/feed_forward/output", f"{source}.mlp.c_proj",
                                  unchanged))
    return table, {}


def _llama_tables(backbone, prefix):
    bias = backbone.use_bias
    table = {
        "embedding/token_embedding/embeddings": (f"{prefix}embed_tokens.weight", unchanged),
        **_norm_table("final_norm", f"{prefix}norm", True),
        **_output_embedding(backbone, "lm_head.weight"),
    }
    for i in range(backbone.num_layers):
        source, target = f"{prefix}layers.{i}", f"block_{i}"
        table.update(_attention_table(f"{target}/attention", f"{source}.self_attn",
                                      ("q_proj", "k_proj", "v_proj", "o_proj"), backbone, bias))
        table.update(_norm_table(f"{target}/attention_norm", f"{source}.input_layernorm", True))
        table.update(_norm_table(f"{target}/feed_forward_norm",
                                 f"{source}.post_attention_layernorm", True))
        for ours, theirs in (("gate", "gate_proj"), ("intermediate", "up_proj"),
                             ("output", "down_proj")):
            table.update(_dense_table(f"{target}/feed_forward/{ours}", f"{source}.mlp.{theirs}",
                                      bias=bias))
    return table, {}


def _t5_tables(backbone, prefix):
    attention = ("q", "k", "v", "o")
    table = {
        "embedding/token_embedding/embeddings": ("shared.weight", unchanged),
        "encoder_position_bias/embeddings": (
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", unchanged),
        "position_bias/embeddings": (
            "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", unchanged),
        **_norm_table("encoder_final_norm", "encoder.final_layer_norm", True),
        **_norm_table("final_norm", "decoder.final_layer_norm", True),
        **_output_embedding(backbone, "lm_head.weight"),
    }
    feed_forward = (("gate", "wi_0"), ("intermediate", "wi_1"), ("output", "wo")) \
        if backbone.gated_feed_forward else (("intermediate", "wi"), ("output", "wo"))
    stacks = [("encoder_", "encoder", backbone.num_layers, False),
              ("", "decoder", backbone.num_decoder_layers or backbone.num_layers, True)]
    for target_prefix, stack, count, decoder in stacks:
        for i in range(count):
            source, target = f"{stack}.block.{i}.layer", f"{target_prefix}block_{i}"
            table.update(_attention_table(f"{target}/attention", f"{source}.0.SelfAttention",
                                          attention, backbone, False))
            table.update(_norm_table(f"{target}/attention_norm", f"{source}.0.layer_norm", True))
            if decoder:
                table.update(_attention_table(f"{target}/cross_attention",
                                              f"{source}.1.EncDecAttention", attention,
                                              backbone, False))
                table.update(_norm_table(f"{target}/cross_attention_norm",
                                         f"{source}.1.layer_norm", True))
            ff = f"{source}.{2 if decoder else 1}"
            for ours, theirs in feed_forward:
                table.update(_dense_table(f"{target}/feed_forward/{ours}",
                                          f"{ff}.DenseReluDense.{theirs}", bias=False))
            table.update(_norm_table(f"{target}/feed_forward_norm", f"{ff}.layer_norm", True))
    return table, {}


_TABLES = {"bert": _bert_tables, "roberta": _bert_tables, "gpt2": _gpt2_tables,
           "llama": _llama_tables, "t5": _t5_tables, "t5_v1_1": _t5_tables}

# Tensors that duplicate another one (tied weights some versions save twice).
# Copy → the tensor it must equal ({prefix}: the backbone's name prefix). A copy
# that differs is an untied weight kerasllm would drop, so the import refuses it.
_TIED_COPIES = {
    "bert": {"cls.predictions.decoder.weight": "{prefix}embeddings.word_embeddings.weight",
             "cls.predictions.decoder.bias": "cls.predictions.bias"},
    "roberta": {"lm_head.decoder.weight": "{prefix}embeddings.word_embeddings.weight",
                "lm_head.decoder.bias": "lm_head.bias"},
    "gpt2": {"lm_head.weight": "{prefix}wte.weight"},
    "llama": {"lm_head.weight": "{prefix}embed_tokens.weight"},
    "t5": {"encoder.embed_tokens.weight": "shared.weight",
           "decoder.embed_tokens.weight": "shared.weight", "lm_head.weight": "shared.weight"},
}
_TIED_COPIES["t5_v1_1"] = _TIED_COPIES["t5"]


def _check_tied_copies(family, prefix, tensors, used, path):
    """The tied copies present and not used, each checked equal to its original."""
    copies = set()
    for copy, original in _TIED_COPIES[family].items():
        original = original.format(prefix=prefix)
        if copy in used or copy not in tensors.names or original not in tensors.names:
            continue
        if not np.array_equal(tensors.get(copy), tensors.get(original)):
            raise CheckpointError(
                f"{path}: tensor '{copy}' differs from '{original}', which kerasllm ties it "
                "to; kerasllm cannot represent this checkpoint's separate weight")
        copies.add(copy)
    return copies


def _layout(family, tensors, model_config):
    """``(name prefix of backbone tensors, the LM objective the checkpoint has or None)``."""
    names = tensors.names
    prefixes = {"bert": "bert.", "roberta": "roberta.", "gpt2": "transformer.",
                "llama": "model.", "t5": "", "t5_v1_1": ""}
    prefix = prefixes[family] if any(n.startswith(prefixes[family]) for n in names) else ""
    if family in ("bert", "roberta"):
        has_lm = any(n.startswith(("cls.predictions.", "lm_head.")) for n in names)
        return prefix, "mlm" if has_lm else None
    has_output = model_config["tie_embeddings"] or "lm_head.weight" in names
    return prefix, "clm" if has_output else None


def assign_weights(targets, table, tensors, path, unused_ok):
    """Fill every weight of ``targets`` (path → variable) from its ``table`` entry;
    CheckpointError for a missing or misshapen tensor or an unused one."""
    used = set()
    for target, weight in targets.items():
        if target not in table:
            raise CheckpointError(f"{path}: kerasllm weight '{target}' has no source tensor "
                                  "in the import table")
        name, transform = table[target]
        if name not in tensors.names:
            raise CheckpointError(
                f"{path}: tensor '{name}' (for '{target}') is missing from the checkpoint")
        value = transform(tensors.get(name))
        if tuple(value.shape) != tuple(weight.shape):
            raise CheckpointError(
                f"{path}: tensor '{name}' has shape {tensors.shape(name)}, which does not "
                f"fit '{target}' {tuple(weight.shape)}")
        weight.assign(value.astype(weight.dtype))
        used.add(name)
    for name in sorted(tensors.names - used - unused_ok):
        if not name.endswith(_BUFFERS):
            raise CheckpointError(
                f"{path}: tensor '{name}' has no place in the kerasllm model: kerasllm cannot "
                "represent this checkpoint completely, so it refuses to import it")


class _TensorFiles:
    """The tensors of ``model.safetensors`` or of the shards its index lists."""

    def __init__(self, directory):
        import safetensors

        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = ["model.safetensors"]
        else:
            found = sorted(p.name for p in directory.glob("*")) if directory.is_dir() else []
            raise CheckpointError(
                f"{directory}: no model.safetensors or model.safetensors.index.json "
                f"(found: {', '.join(found) or 'nothing'}); save the model with "
                "save_pretrained(..., safe_serialization=True)")
        self._handles = {}
        self._file_of = {}
        for file in files:
            if not (directory / file).is_file():
                raise CheckpointError(f"{directory}: shard {file} listed in the index is missing")
            handle = safetensors.safe_open(directory / file, framework="tf")
            self._handles[file] = handle
            for name in handle.keys():
                self._file_of[name] = file
        self.names = set(self._file_of)

    def get(self, name):
        """float32 numpy (bfloat16 and float16 checkpoints are widened)."""
        import tensorflow as tf

        return tf.cast(self._handles[self._file_of[name]].get_tensor(name), tf.float32).numpy()

    def shape(self, name):
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())


def _read_json(path):
    if not path.is_file():
        raise CheckpointError(f"{path} not found; give a directory written by "
                              "transformers' save_pretrained")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
