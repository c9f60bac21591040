"""Import keras-hub backbones (``BertBackbone``, ``GPT2Backbone``) into kerasllm.

For keras-hub users moving over: a backbone built from a preset, fine-tuned or
trained from scratch becomes a :class:`kerasllm.KerasLLMModel` with the same
outputs.

The flow is :mod:`kerasllm.hf`'s: the backbone's ``get_config()`` becomes a
kerasllm ``model`` config (the family preset, the sizes, and the choices
keras-hub hard-codes), refusing a config field kerasllm does not know; a table
names, for every kerasllm layer, the keras-hub layer whose weights it takes;
the import fails, naming the weight, if a keras-hub weight is left over or a
kerasllm weight has no source, so a load is never partial. Both sides keep
Keras layouts (EinsumDense kernels ``(hidden, heads, head_dim)``, Dense kernels
``(in, out)``), so a weight keeps its name (``kernel``, ``gamma``, ...) and its
shape.

This module is not named ``keras_hub``: ``from kerasllm import keras_hub``
would shadow the real package in user code.
"""

import keras_hub

from kerasllm.errors import KerasLLMError
from kerasllm.hf import CheckpointError, assign_weights, unchanged
from kerasllm.presets import family_preset


def from_keras_hub(backbone, *, objectives=None, head=None, tokenizer=None):
    """A :class:`kerasllm.KerasLLMModel` with the weights of a keras-hub backbone.

    The model is headless unless you give ``objectives`` (a list of objective
    configs) or ``head`` (a task-head config), whose weights start fresh:
    ``model(inputs)`` returns the backbone's outputs, ``sequence_output`` (and
    ``pooled_output`` for BERT), equal to keras-hub's. GPT-2's tied output
    projection comes with the token embedding: ``objectives=[{"name": "clm"}]``
    gives the complete language model.

    Args:
        backbone: a ``keras_hub.models.BertBackbone`` or ``GPT2Backbone``.
        objectives, head: as in a kerasllm config; default: none.
        tokenizer: the backbone's tokenizer (``keras_hub.models.BertTokenizer``,
            ``GPT2Tokenizer`` or a kerasllm tokenizer), required: kerasllm
            models carry theirs.

    Examples:
    ```python
    backbone = keras_hub.models.BertBackbone.from_preset("bert_base_en_uncased")
    tokenizer = keras_hub.models.BertTokenizer.from_preset("bert_base_en_uncased")
    classifier = kerasllm.from_keras_hub(
        backbone, tokenizer=tokenizer,
        head={"name": "classification", "options": {"num_classes": 2}})
    ```
    """
    from kerasllm.builder import build_model

    where = f"keras-hub {type(backbone).__name__} '{getattr(backbone, 'name', None)}'"
    if type(backbone) not in _FAMILIES:  # a subclass may compute differently
        known = ", ".join(f"keras_hub.models.{cls.__name__}" for cls in _FAMILIES)
        raise CheckpointError(f"{where}: kerasllm imports {known}; "
                              f"got a {type(backbone).__module__}.{type(backbone).__name__}")
    if tokenizer is None:
        raise KerasLLMError(
            f"{where}: give the backbone's tokenizer, e.g. tokenizer="
            f"keras_hub.models.{type(backbone).__name__.replace('Backbone', 'Tokenizer')}"
            ".from_preset(...) or a keras-hub task's task.preprocessor.tokenizer")
    translate, layers, attention = _FAMILIES[type(backbone)]
    model_config = _translate(backbone, translate, where)
    if tokenizer.vocabulary_size() > model_config["vocabulary_size"]:
        raise CheckpointError(
            f"{where}: the tokenizer has {tokenizer.vocabulary_size()} tokens but the "
            f"backbone embeds only {model_config['vocabulary_size']}; is it the "
            "backbone's tokenizer?")
    config = {
        "model": model_config,
        "tokenizer": {"name": "keras_hub"},  # the object itself is saved with the model
        "data": {"sequence_length": min(512, model_config["max_sequence_length"])},
        "objectives": objectives or [],
        "head": head,
        "training": {"output": f"runs/{backbone.name}"},
    }
    model = build_model(config, tokenizer)
    targets = {w.path: w for w in model.backbone.weights}
    table = _table(model.backbone, layers, attention)
    assign_weights(targets, table, _Weights(backbone), where, unused_ok=set())
    return model


# Fields of every Keras layer's config, none of them architecture. `dtype`: the
# weights are widened to kerasllm's, so a bfloat16 backbone imports (its outputs
# then match only to bfloat16 precision).
_LAYER_FIELDS = ("name", "trainable", "dtype")


def _translate(backbone, translate, where):
    """The kerasllm model config of a keras-hub backbone; CheckpointError naming
    the first config field that ``translate`` did not consume."""
    fields = dict(backbone.get_config())
    config = translate(fields)
    for name, value in fields.items():
        if name not in _LAYER_FIELDS:
            raise CheckpointError(
                f"{where}: config field '{name}' = {value!r} is not supported; kerasllm "
                "cannot represent it, so it refuses to import the backbone")
    return config


def _sizes(fields):
    hidden_dim, num_heads = fields.pop("hidden_dim"), fields.pop("num_heads")
    return dict(
        vocabulary_size=fields.pop("vocabulary_size"), num_layers=fields.pop("num_layers"),
        num_heads=num_heads, hidden_dim=hidden_dim,
        # keras-hub's heads are hidden_dim // num_heads wide even when num_heads does
        # not divide hidden_dim (the output projection maps back to hidden_dim).
        head_dim=None if hidden_dim % num_heads == 0 else hidden_dim // num_heads,
        intermediate_dim=fields.pop("intermediate_dim"),
        max_sequence_length=fields.pop("max_sequence_length"), dropout=fields.pop("dropout"),
    )


def _bert(fields):
    # BertBackbone hard-codes its GELU and epsilons. The GELU is the tanh
    # approximation, not the erf of Hugging Face's BERT and the bert preset.
    return {**family_preset("bert"), **_sizes(fields), "num_segments": fields.pop("num_segments"),
            "activation": "gelu_approximate", "layer_norm_epsilon": 1e-12, "pooler": True}


def _gpt2(fields):
    # As in Hugging Face's GPT-2 and the gpt2 preset: tanh GELU, epsilon 1e-5, tied embeddings.
    return {**family_preset("gpt2"), **_sizes(fields), "activation": "gelu_approximate",
            "layer_norm_epsilon": 1e-5, "tie_embeddings": True}


# === Layer tables: kerasllm layer path → keras-hub layer path ===
#
# A layer's weights keep their names on both sides: `embeddings`, `kernel`,
# `bias`, `gamma`, `beta`.

_BERT_LAYERS = {
    "embedding/token_embedding": "token_embedding",
    "embedding/position_embedding": "position_embedding",
    "embedding/segment_embedding": "segment_embedding",
    "embedding/norm": "embeddings_layer_norm",
    "pooler": "pooled_dense",
}

_GPT2_LAYERS = {
    "embedding/token_embedding": "token_embedding",
    "embedding/position_embedding": "position_embedding",
    "final_norm": "layer_norm",
}

# keras-hub's TransformerEncoder (BERT) and TransformerDecoder (GPT-2) name
# their layers alike but for the attention: `self_attention_layer` in the
# encoder, `self_attention` in the decoder.
_BLOCK_LAYERS = {
    "attention/query": "{attention}/query",
    "attention/key": "{attention}/key",
    "attention/value": "{attention}/value",
    "attention/output": "{attention}/attention_output",
    "attention_norm": "self_attention_layer_norm",
    "feed_forward/intermediate": "feedforward_intermediate_dense",
    "feed_forward/output": "feedforward_output_dense",
    "feed_forward_norm": "feedforward_layer_norm",
}

# keras-hub class → (config translation, layer table, the blocks' attention layer).
_FAMILIES = {
    keras_hub.models.BertBackbone: (_bert, _BERT_LAYERS, "self_attention_layer"),
    keras_hub.models.GPT2Backbone: (_gpt2, _GPT2_LAYERS, "self_attention"),
}


def _table(backbone, layers, attention):
    """kerasllm weight path → (keras-hub weight path, transform) for ``backbone``."""
    layers = dict(layers)
    for i in range(backbone.num_layers):
        for ours, theirs in _BLOCK_LAYERS.items():
            layers[f"block_{i}/{ours}"] = f"transformer_layer_{i}/" + theirs.format(
                attention=attention)
    table = {}
    for weight in backbone.weights:
        layer, _, name = weight.path.rpartition("/")
        if layer in layers:
            table[weight.path] = (f"{layers[layer]}/{name}", unchanged)
    return table


class _Weights:
    """A keras-hub backbone's weights by path, read as ``kerasllm.hf`` reads a
    checkpoint's tensors."""

    def __init__(self, backbone):
        self._weights = {w.path: w for w in backbone.weights}
        self.names = set(self._weights)

    def get(self, name):
        return self._weights[name].numpy().astype("float32")

    def shape(self, name):
        return tuple(self._weights[name].shape)
