"""Parameter-efficient fine-tuning: LoRA adapters on the attention projections, and freezing.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"),
as Hugging Face PEFT implements it: a projection ``y = W x + b`` becomes
``y = W x + b + (alpha / rank) · B(A(dropout(x)))``, where ``A`` maps the
projection's inputs to ``rank`` features and ``B`` those to its outputs. ``W``
and ``b`` stay fixed; ``B`` starts at zero, so a fresh adapter leaves the
model's outputs unchanged. After training, :func:`merge_lora` folds ``A·B``
into ``W`` for serving at the base model's cost.

``model.lora`` in the config selects the projections (``query``, ``key``,
``value``, ``output``) and blocks; ``training.freeze_embeddings`` and
``training.freeze_layers`` freeze parts of a model with or without LoRA.
:func:`apply_freezing` applies all three when the model is built (and rebuilt,
when a ``.keras`` file is loaded).
"""

import json
import math
import os
import pathlib
import tempfile

import keras
import numpy as np

from kerasllm.errors import KerasLLMError

# The key, in a save_lora_weights file, of the LoRA config it was saved with;
# variable paths always contain a "/", so it cannot clash with one.
_CONFIG_KEY = "lora_config"


@keras.saving.register_keras_serializable(package="kerasllm")
class LoRAEinsumDense(keras.layers.EinsumDense):
    """An ``EinsumDense`` with a trainable low-rank update and a frozen kernel and bias.

    The kernel's axes that the equation contracts with the input (``d`` in
    ``btd,dnh->btnh``) are LoRA's input features, the axes it keeps (``nh``)
    its output features: ``lora_a`` has shape ``(*contracted, rank)``,
    ``lora_b`` ``(rank, *kept)``, i.e. the ``(inputs, rank)`` and
    ``(rank, outputs)`` matrices of LoRA with the projection's own axes.

    Keras' built-in ``EinsumDense.enable_lora`` is not used: it factorises the
    kernel as ``kernel.shape[:-1] + (rank,)`` times ``(rank, kernel.shape[-1])``,
    which for the query kernel ``(hidden, heads, head_dim)`` is one rank-``rank``
    down-projection per head rather than LoRA's single ``(hidden, rank)``
    matrix, and it has no dropout.

    The variables keep ``EinsumDense``'s names, ``kernel`` and ``bias``, and
    add ``lora_a`` and ``lora_b``: weight paths are those of the model without
    LoRA, and a weights file saved without LoRA loads into the base weights
    (the adapter keeps its fresh initialisation).

    Args:
        equation, output_shape, bias_axes, ...: as ``keras.layers.EinsumDense``.
        rank: the inner size of the update.
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout rate on the adapter's input (the base path sees ``x``).
    """

    def __init__(self, equation, output_shape, rank, alpha, dropout=0.0, **kwargs):
        super().__init__(equation, output_shape, **kwargs)
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.lora_dropout = keras.layers.Dropout(dropout, name="lora_dropout")
        operands, outputs = equation.split("->")
        inputs, self._kernel_axes = operands.split(",")
        kernel_axes = self._kernel_axes
        rank_axis = next(axis for axis in "rzyxwvu" if axis not in equation)
        self._contracted = "".join(axis for axis in kernel_axes if axis not in outputs)
        self._kept = "".join(axis for axis in kernel_axes if axis in outputs)
        low_rank = "".join(axis for axis in inputs if axis not in self._contracted) + rank_axis
        self._down_equation = f"{inputs},{self._contracted}{rank_axis}->{low_rank}"
        self._up_equation = f"{low_rank},{rank_axis}{self._kept}->{outputs}"
        self._merge_equation = (f"{self._contracted}{rank_axis},{rank_axis}{self._kept}"
                                f"->{kernel_axes}")

    def build(self, input_shape):
        super().build(input_shape)
        self._kernel.trainable = False  # the same flag Keras' enable_lora sets
        if self.bias is not None:
            self.bias.trainable = False
        sizes = dict(zip(self._kernel_axes, self._kernel.shape))
        fan_in = math.prod(sizes[axis] for axis in self._contracted)
        # PEFT initialises A with kaiming_uniform_(a=sqrt(5)), i.e. U(±1/sqrt(fan_in)):
        # VarianceScaling(1/3, "fan_in", "uniform"), not he_uniform (scale 2, a
        # bound sqrt(6) times larger, what Keras' enable_lora uses).
        bound = 1 / math.sqrt(fan_in)
        self.lora_a = self.add_weight(
            name="lora_a", shape=(*(sizes[axis] for axis in self._contracted), self.rank),
            initializer=keras.initializers.RandomUniform(-bound, bound),
        )
        self.lora_b = self.add_weight(
            name="lora_b", shape=(self.rank, *(sizes[axis] for axis in self._kept)),
            initializer="zeros",
        )

    def call(self, inputs, training=None):
        outputs = keras.ops.einsum(self.equation, inputs, self.kernel)
        if self.bias is not None:
            outputs = outputs + self.bias
        low_rank = keras.ops.einsum(
            self._down_equation, self.lora_dropout(inputs, training=training), self.lora_a)
        update = keras.ops.einsum(self._up_equation, low_rank, self.lora_b)
        outputs = outputs + (self.alpha / self.rank) * update
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def merged_kernel(self):
        """``W + (alpha / rank) · A·B`` in the kernel's layout."""
        update = keras.ops.einsum(self._merge_equation, self.lora_a, self.lora_b)
        return self.kernel + (self.alpha / self.rank) * update

    @property
    def adapter_variables(self):
        return [self.lora_a, self.lora_b]

    @property
    def _base_variables(self):
        return [self._kernel] + ([self.bias] if self.bias is not None else [])

    def save_own_variables(self, store):
        # EinsumDense's order first, so that the base weights sit where a
        # layer without LoRA has them.
        for i, variable in enumerate(self._base_variables + self.adapter_variables):
            store[str(i)] = variable

    def load_own_variables(self, store):
        variables = self._base_variables + self.adapter_variables
        count = len(store.keys())
        if count not in (len(self._base_variables), len(variables)):
            raise ValueError(
                f"layer '{self.path}': the weights file holds {count} variables, expected "
                f"{len(self._base_variables)} (saved without LoRA) or {len(variables)}")
        for i, variable in enumerate(variables[:count]):
            variable.assign(store[str(i)])

    def get_config(self):
        return {**super().get_config(), "rank": self.rank, "alpha": self.alpha,
                "dropout": self.dropout}


def lora_projections(model):
    """The model's ``LoRAEinsumDense`` layers, encoder first, block by block."""
    backbone = model.backbone
    projections = []
    for stack in (backbone.encoder_stack, backbone.decoder_stack):
        for block in stack[0] if stack else ():
            for attention in (block.attention, block.cross):
                if attention is None:
                    continue
                projections += [
                    layer for layer in (attention.query, attention.key, attention.value,
                                        attention.output_projection)
                    if isinstance(layer, LoRAEinsumDense)
                ]
    return projections


def apply_freezing(model):
    """Mark the backbone weights that ``model.config`` keeps out of training as
    not trainable; heads stay trainable.

    With ``model.lora``, every backbone weight but the adapters; with
    ``training.freeze_embeddings``, the embedding tables and their norm (an
    untied output projection is the LM's, not an input embedding, and stays
    trainable); with ``training.freeze_layers: k``, the first ``k`` blocks of
    each stack (the shared position bias and final norm stay trainable).

    Per-variable ``trainable`` flags: the optimizer is built from
    ``model.trainable_variables``. They are not saved in a ``.keras`` file;
    ``KerasLLMModel.__init__`` calls this, so reloading re-applies them from
    the config.
    """
    backbone = model.backbone
    training = model.config.training
    frozen = []
    if model.config.model.lora is not None:
        adapters = {id(v) for p in lora_projections(model) for v in p.adapter_variables}
        frozen += [weight for weight in backbone.weights if id(weight) not in adapters]
    if training.freeze_embeddings:
        token_embedding = backbone.token_embedding
        output = None if token_embedding.tie_weights else token_embedding.reverse_embeddings
        frozen += [weight for weight in backbone.embedding.weights if weight is not output]
    for stack in (backbone.encoder_stack, backbone.decoder_stack):
        for block in stack[0][:training.freeze_layers] if stack else ():
            frozen += block.weights
    for weight in frozen:
        weight.trainable = False


def count_parameters(model):
    """``{"trainable": ..., "total": ...}``: scalar parameters of the model's weights."""
    def count(weights):
        return sum(math.prod(weight.shape) for weight in weights)

    return {"trainable": count(model.trainable_weights), "total": count(model.weights)}


def merge_lora(model):
    """A new model without LoRA whose adapted kernels are ``W + (alpha/rank)·A·B``.

    Same config (less ``model.lora``) and tokenizer; every other weight is
    copied by path. For export: the merged model computes the same outputs
    as ``model`` without the adapters' extra matrix products.
    """
    from kerasllm.builder import build_model  # the builder imports this module

    projections = lora_projections(model)
    if not projections:
        raise KerasLLMError("merge_lora: the model has no LoRA adapters (model.lora is not set)")
    config = model.config.to_dict()
    config["model"]["lora"] = None
    merged = build_model(config, model.tokenizer)
    values = {weight.path: weight for weight in model.weights}
    values.update({p.kernel.path: p.merged_kernel() for p in projections})
    for weight in merged.weights:
        weight.assign(values[weight.path])
    return merged


def save_lora_weights(model, path):
    """Write the adapters' variables, keyed by variable path, to an ``.npz`` file.

    Written to a temporary file in the same folder and renamed into place: an
    interrupted save leaves any earlier file intact.
    """
    arrays = _adapter_variables(model, "save_lora_weights")
    arrays = {name: variable.numpy() for name, variable in arrays.items()}
    arrays[_CONFIG_KEY] = np.array(json.dumps(_lora_config(model)))
    path = pathlib.Path(path)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise


def load_lora_weights(model, path):
    """Load a :func:`save_lora_weights` file into ``model``'s adapters.

    Refuses (``KerasLLMError``, naming the file and a variable) a file whose
    variables, their shapes or ``alpha`` differ from the model's; nothing is
    assigned unless everything matches.
    """
    variables = _adapter_variables(model, "load_lora_weights")
    path = pathlib.Path(path)
    if not path.is_file():
        raise KerasLLMError(f"LoRA weights file not found: {path}")
    with np.load(path) as file:
        saved = {name: file[name] for name in file.files}
    if _CONFIG_KEY not in saved:
        raise KerasLLMError(f"{path} is not a LoRA weights file (no '{_CONFIG_KEY}' entry); "
                            "write one with kerasllm.lora.save_lora_weights")
    saved_config = json.loads(str(saved.pop(_CONFIG_KEY)))
    hint = ("the file was saved from a model with other model.lora targets or layers; "
            "load it into a model with the same model.lora")
    missing = sorted(set(variables) - set(saved))
    if missing:
        raise KerasLLMError(f"{path} lacks the model's LoRA variable '{missing[0]}' "
                            f"({len(missing)} missing): {hint}")
    unexpected = sorted(set(saved) - set(variables))
    if unexpected:
        raise KerasLLMError(f"{path} holds '{unexpected[0]}', which is not a LoRA variable "
                            f"of the model ({len(unexpected)} such): {hint}")
    for name, variable in variables.items():
        if saved[name].shape != tuple(variable.shape):
            raise KerasLLMError(
                f"{path}: '{name}' has shape {saved[name].shape}, the model's "
                f"{tuple(variable.shape)}: saved with model.lora.rank "
                f"{saved_config['rank']}, the model has {_lora_config(model)['rank']}")
    if saved_config["alpha"] != _lora_config(model)["alpha"]:
        raise KerasLLMError(
            f"{path} was trained with model.lora.alpha {saved_config['alpha']}, the model "
            f"has {_lora_config(model)['alpha']}: the update would be scaled differently; "
            "set model.lora.alpha to the file's")
    for name, variable in variables.items():
        variable.assign(saved[name])


def _adapter_variables(model, what):
    variables = {v.path: v for p in lora_projections(model) for v in p.adapter_variables}
    if not variables:
        raise KerasLLMError(f"{what}: the model has no LoRA adapters; set model.lora in its "
                            "config")
    return variables


def _lora_config(model):
    return model.config.to_dict()["model"]["lora"]
