"""Configuration: one YAML/dict format, validated into dataclasses.

Every key is checked against the dataclass fields: an unknown key, a value of
the wrong type or outside its allowed range raises :class:`ConfigError` naming
the key (``training.steps``) and what is allowed. Plugin names and plugin
options are checked later, by the builder, against the plugin registry.
"""

import dataclasses
import importlib.resources
import pathlib
import types
import typing
from typing import Literal, Optional

import yaml

from kerasllm.errors import ConfigError
from kerasllm.presets import family_preset


LORA_TARGETS = ("query", "key", "value", "output")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored", "tpu")


@dataclasses.dataclass
class LoRAConfig:
    """Low-rank adapters on the attention projections (:mod:`kerasllm.lora`).

    In encoder–decoders ``layers`` indexes the blocks of each stack, and the
    decoder's cross-attention is adapted like its self-attention (as PEFT does
    for T5, whose default targets ``q`` and ``v`` name both).
    """

    rank: int = 8
    alpha: float = 16.0  # the update B·A is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input only
    targets: list[str] = dataclasses.field(
        default_factory=lambda: ["query", "value"])  # of query, key, value, output
    layers: Optional[list[int]] = None  # block indices, negative from the end; None: all

    def validate(self, where):
        _positive(self, where, "rank", "alpha")
        _fraction(self, where, "dropout")
        if not self.targets:
            raise ConfigError(f"{where}.targets is empty; name at least one of "
                              f"{', '.join(LORA_TARGETS)}")
        for i, target in enumerate(self.targets):
            if target not in LORA_TARGETS:
                raise ConfigError(f"unknown LoRA target '{target}' in {where}.targets[{i}]; "
                                  f"known: {', '.join(LORA_TARGETS)}")
        if self.layers == []:
            raise ConfigError(f"{where}.layers is empty; omit it to adapt every block")


@dataclasses.dataclass
class ModelConfig:
    """The backbone (see :class:`kerasllm.Backbone` for every argument).

    ``family`` fills in the other fields from a preset (``kerasllm.presets``:
    bert, roberta, gpt2, llama, t5, t5_v1_1); keys given alongside it override
    the preset's. ``vocabulary_size`` defaults to the tokenizer's.
    """

    family: Optional[str] = None
    kind: Literal["encoder", "decoder", "encoder_decoder"] = "encoder"
    num_layers: int = 2
    num_decoder_layers: Optional[int] = None  # encoder_decoder; default num_layers
    num_heads: int = 4
    num_key_value_heads: Optional[int] = None  # grouped-query attention; default num_heads
    head_dim: Optional[int] = None  # default hidden_dim // num_heads
    hidden_dim: int = 128
    intermediate_dim: int = 512
    max_sequence_length: int = 128
    vocabulary_size: Optional[int] = None  # default: the tokenizer's
    num_segments: int = 2  # 0: no segment embedding and no `segment_ids` input
    dropout: float = 0.1
    norm: Literal["layer", "rms"] = "layer"
    norm_first: bool = False  # pre-norm (GPT-2, Llama, T5) instead of post-norm (BERT)
    activation: Literal["gelu", "gelu_approximate", "relu", "silu"] = "gelu"
    gated_feed_forward: bool = False  # SwiGLU (silu), gated-GELU (gelu_approximate)
    use_bias: bool = True
    position_embedding: Literal["learned", "rotary", "relative"] = "learned"
    position_offset: int = 0  # first row of the learned position table (RoBERTa: 2)
    rotary_theta: float = 10000.0
    relative_buckets: int = 32
    relative_max_distance: int = 128
    scale_scores: bool = True  # 1/sqrt(head_dim) attention scaling (T5: false)
    tie_embeddings: bool = True  # the output projection is the token embedding
    scale_logits: bool = False  # hidden_dim ** -0.5 before the output projection (T5)
    layer_norm_epsilon: float = 1e-12
    pooler: Optional[bool] = None  # `pooled_output`, tanh-dense over the first token;
    # default: encoders only
    lora: Optional[LoRAConfig] = None  # low-rank adapters; the rest of the backbone is frozen

    def validate(self, where):
        _positive(self, where, "num_layers", "num_heads", "hidden_dim",
                  "intermediate_dim", "max_sequence_length", "layer_norm_epsilon",
                  "rotary_theta", "relative_buckets", "relative_max_distance")
        _positive_or_none(self, where, "num_decoder_layers", "num_key_value_heads",
                          "head_dim", "vocabulary_size")
        _at_least(self, where, 0, "num_segments", "position_offset")
        _fraction(self, where, "dropout")
        if self.head_dim is None and self.hidden_dim % self.num_heads:
            raise ConfigError(
                f"{where}.hidden_dim ({self.hidden_dim}) must be divisible by "
                f"{where}.num_heads ({self.num_heads}), or give {where}.head_dim"
            )
        if self.num_key_value_heads and self.num_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{where}.num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"{where}.num_heads ({self.num_heads})"
            )
        if self.kind == "encoder_decoder" and self.num_segments:
            raise ConfigError(f"{where}.num_segments must be 0 for an encoder_decoder model")
        if self.num_decoder_layers and self.kind != "encoder_decoder":
            raise ConfigError(f"{where}.num_decoder_layers needs {where}.kind: encoder_decoder")
        if self.pooler is True and self.kind != "encoder":
            raise ConfigError(f"{where}.pooler needs {where}.kind: encoder; set it to false")
        if self.position_offset and self.position_embedding != "learned":
            raise ConfigError(f"{where}.position_offset needs learned position embeddings")
        if self.position_embedding == "relative":
            # Encoders split the buckets between the two directions; half of each
            # side's are exact distances, the rest log-spaced up to max distance.
            exact = self.relative_buckets // (2 if self.kind == "decoder" else 4)
            if exact < 1 or self.relative_max_distance <= exact:
                raise ConfigError(
                    f"{where}.relative_buckets ({self.relative_buckets}) leaves {exact} exact "
                    f"distances, which must be at least 1 and below {where}."
                    f"relative_max_distance ({self.relative_max_distance})")
        if self.position_embedding == "rotary" and self.head_size % 2:
            raise ConfigError(f"{where}: rotary positions need an even head size, "
                              f"got {self.head_size}")

    @property
    def head_size(self):
        return self.head_dim or self.hidden_dim // self.num_heads


@dataclasses.dataclass
class TokenizerConfig:
    name: str = "wordpiece"  # a tokenizer plugin
    vocabulary: Optional[str] = None  # a vocabulary file to load; None: train one
    vocabulary_size: int = 8192  # when training
    lowercase: bool = True
    sentinels: int = 0  # when training: <extra_id_N> tokens for span corruption
    options: dict = dataclasses.field(default_factory=dict)  # the plugin's train/load options

    def validate(self, where):
        _positive(self, where, "vocabulary_size")
        _at_least(self, where, 0, "sentinels")


@dataclasses.dataclass
class DataConfig:
    source: str = "builtin"  # a data-source plugin
    options: dict = dataclasses.field(default_factory=dict)  # the source's options
    sequence_length: int = 128
    batch_size: int = 32
    shuffle_buffer: int = 4096
    heldout_fraction: float = 0.05  # of documents, kept out of training for evaluation
    eval_batches: int = 16
    packing: bool = True  # pretraining: concatenate documents into full rows
    # Multi-task: a source with n examples is drawn with probability ∝ n ** (1 / T);
    # 1 is proportional to size, larger values flatten towards uniform.
    mixing_temperature: float = 1.0

    def validate(self, where):
        _positive(self, where, "sequence_length", "batch_size", "shuffle_buffer", "eval_batches",
                  "mixing_temperature")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(
                f"{where}.heldout_fraction must be between 0 and 1 (exclusive), "
                f"got {self.heldout_fraction}"
            )


@dataclasses.dataclass
class SourceConfig:
    """A head's own data source, for multi-task training."""

    source: str  # a data-source plugin
    options: dict = dataclasses.field(default_factory=dict)
    size: Optional[int] = None  # examples, for mixing rates; default: counted once

    def validate(self, where):
        _positive_or_none(self, where, "size")


@dataclasses.dataclass
class HeadConfig:
    """One pretraining objective or task head."""

    name: str
    weight: float = 1.0  # the head's share of the total loss
    options: dict = dataclasses.field(default_factory=dict)
    data: Optional[SourceConfig] = None  # its own data source; default: `data`'s

    def validate(self, where):
        _at_least(self, where, 0.0, "weight")


@dataclasses.dataclass
class TrainingConfig:
    steps: int = 1000
    steps_per_epoch: int = 100  # Keras epochs are reporting periods here
    checkpoint_every: int = 100  # a multiple of steps_per_epoch
    keep_checkpoints: int = 3
    learning_rate: float = 5e-4
    warmup_steps: int = 100
    end_learning_rate: float = 0.0
    weight_decay: float = 0.01
    clipnorm: float = 1.0  # global gradient norm; 0 disables clipping
    seed: int = 0
    output: str = "runs/quickstart"
    # Fine-tuning: start from this model (a kerasllm model.keras or its folder, or a
    # Hugging Face checkpoint directory); its architecture and tokenizer are used.
    initialize_from: Optional[str] = None
    freeze_embeddings: bool = False  # input tables and their norm, not an untied output
    freeze_layers: int = 0  # the first k blocks (encoder–decoders: of each stack)
    # tf.distribute (kerasllm.distribute): auto picks TPU, multi-worker (TF_CONFIG),
    # mirrored (several GPUs) or one device. data.batch_size is the global batch.
    strategy: Literal[STRATEGIES] = "auto"
    devices: Optional[list[str]] = None  # one_device / mirrored; default: every GPU
    tpu: Optional[str] = None  # the TPU's name or grpc:// address; default: $TPU_NAME
    # Compute dtype; variables, softmax, norms and losses stay float32.
    # mixed_float16 scales the loss dynamically.
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16"] = "float32"
    # Each step's batch in this many micro-batches, one after another; one update.
    gradient_accumulation_steps: int = 1
    # XLA-compile the whole training step (Keras' compile(jit_compile=...)); auto:
    # on one device always, under a strategy on GPU and TPU only (Keras' auto).
    # The attention core is XLA-compiled always.
    jit_compile: Literal["auto", True, False] = "auto"

    def validate(self, where):
        _positive(self, where, "steps", "steps_per_epoch", "checkpoint_every",
                  "keep_checkpoints", "learning_rate", "gradient_accumulation_steps")
        if self.devices == []:
            raise ConfigError(f"{where}.devices is empty; omit it to use every GPU")
        _at_least(self, where, 0, "warmup_steps", "end_learning_rate", "weight_decay",
                  "clipnorm", "freeze_layers")
        if self.steps % self.steps_per_epoch:
            raise ConfigError(
                f"{where}.steps ({self.steps}) must be a multiple of "
                f"{where}.steps_per_epoch ({self.steps_per_epoch})"
            )
        if self.checkpoint_every % self.steps_per_epoch:
            raise ConfigError(
                f"{where}.checkpoint_every ({self.checkpoint_every}) must be a multiple of "
                f"{where}.steps_per_epoch ({self.steps_per_epoch}): checkpoints are "
                "written at epoch ends so that a resumed run replays the same epochs"
            )


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    objectives: list[HeadConfig] = dataclasses.field(default_factory=list)
    head: Optional[HeadConfig] = None  # a task head (fine-tuning)
    heads: list[HeadConfig] = dataclasses.field(default_factory=list)  # several task heads
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)

    def validate(self, where=""):
        if self.head and self.heads:
            raise ConfigError("give one task head as `head` or several as `heads`, not both")
        names = [head.name for _, head, _ in self.head_entries]
        for duplicate in sorted({n for n in names if names.count(n) > 1}):
            raise ConfigError(f"'{duplicate}' appears twice in objectives and heads; each "
                              "objective or head may be used once")
        shared = {kind for _, head, kind in self.head_entries if head.data is None}
        if len(shared) > 1:
            raise ConfigError(
                "objectives and task heads cannot share a data source: objectives make "
                "their rows from whole documents, task heads from labelled examples; "
                "give the task heads (or the objectives) their own `data: {source: ...}`")
        if not self.training.initialize_from:  # else the starting model's, once loaded
            self.check_architecture()

    def check_architecture(self):
        """What the rest of the config asks of the model section: blocks to freeze,
        positions for the sequence length."""
        for depth_key in ("num_layers", "num_decoder_layers"):
            depth = getattr(self.model, depth_key)
            if depth is not None and self.training.freeze_layers > depth:
                raise ConfigError(
                    f"training.freeze_layers ({self.training.freeze_layers}) exceeds "
                    f"model.{depth_key} ({depth}); freeze at most {depth} blocks")
        longest = self.model.max_sequence_length - self.model.position_offset
        if self.data.sequence_length > longest:
            offset = f" - model.position_offset ({self.model.position_offset})" \
                if self.model.position_offset else ""
            raise ConfigError(
                f"data.sequence_length ({self.data.sequence_length}) exceeds "
                f"model.max_sequence_length ({self.model.max_sequence_length}){offset}"
            )

    def to_dict(self):
        return dataclasses.asdict(self)

    @property
    def head_entries(self):
        """(config key, HeadConfig, kind) for every objective and task head, in order."""
        entries = [(f"objectives[{i}]", o, "objective") for i, o in enumerate(self.objectives)]
        if self.head is not None:
            entries.append(("head", self.head, "task head"))
        entries += [(f"heads[{i}]", h, "task head") for i, h in enumerate(self.heads)]
        return entries

    @property
    def tasks(self):
        """The heads grouped by data source: ``[(SourceConfig or None, [entry, ...])]``,
        where None is the shared ``data.source``; one group per source to mix."""
        shared = [entry for entry in self.head_entries if entry[1].data is None]
        own = [(entry[1].data, [entry]) for entry in self.head_entries if entry[1].data]
        return ([(None, shared)] if shared else []) + own


BUILTIN_CONFIGS = ("quickstart",)


def load_config(source):
    """A validated :class:`Config` from a dict, a YAML path, a built-in name or a Config.

    Built-in names (``quickstart``) refer to configs shipped in ``kerasllm/configs``.
    """
    if isinstance(source, Config):
        source = source.to_dict()
    elif isinstance(source, (str, pathlib.Path)):
        source = _read_yaml(source)
    if not isinstance(source, dict):
        raise ConfigError(f"a config must be a mapping, got {type(source).__name__}")
    return _build(Config, source, "")


def _read_yaml(path):
    path = pathlib.Path(path)
    if not path.exists() and str(path) in BUILTIN_CONFIGS:
        text = importlib.resources.files("kerasllm").joinpath(f"configs/{path}.yaml").read_text()
    elif not path.is_file():
        raise ConfigError(
            f"config file not found: {path}; give a YAML file or a built-in config "
            f"({', '.join(BUILTIN_CONFIGS)})"
        )
    else:
        text = path.read_text()
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None


def _build(cls, data, where):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    if cls is ModelConfig and data.get("family") is not None:
        data = {**family_preset(data["family"], f"{where}.family"), **data}
    hints = typing.get_type_hints(cls)
    fields = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        place = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key '{place}'; allowed: {', '.join(sorted(fields))}")
    values = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        values[name] = _coerce(hints[name], value, key)
    required = [
        field.name for field in dataclasses.fields(cls)
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    ]
    for name in required:
        if name not in values:
            raise ConfigError(f"{where}.{name} is required" if where else f"{name} is required")
    instance = cls(**values)
    instance.validate(where)
    return instance


def _coerce(hint, value, key):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, key)
    if origin is Literal:
        # By type too: 1 == True, yet `jit_compile: 1` is no choice of true/false.
        if not any(value == arg and type(value) is type(arg) for arg in args):
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool) or not isinstance(value, hint) or (
        hint is int and isinstance(value, bool)
    ):
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r}")
    return value


def _positive(config, where, *names):
    _at_least(config, where, None, *names)


def _positive_or_none(config, where, *names):
    _positive(config, where, *(name for name in names if getattr(config, name) is not None))


def _at_least(config, where, minimum, *names):
    for name in names:
        value = getattr(config, name)
        too_small = value <= 0 if minimum is None else value < minimum
        if too_small:
            bound = "> 0" if minimum is None else f">= {minimum}"
            raise ConfigError(f"{where}.{name} must be {bound}, got {value}")


def _fraction(config, where, *names):
    for name in names:
        value = getattr(config, name)
        if not 0 <= value < 1:
            raise ConfigError(f"{where}.{name} must be in [0, 1), got {value}")
