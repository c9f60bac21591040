"""From a config to a compiled model, through plugin lookups only."""

import inspect
import pathlib

import keras
import tensorflow as tf

from kerasllm.config import load_config
from kerasllm.errors import ConfigError, KerasLLMError
from kerasllm.model import KerasLLMModel
from kerasllm.plugins import get_registry
from kerasllm.training import make_optimizer


def build_model(config, tokenizer=None, *, registry=None):
    """A compiled :class:`KerasLLMModel` from a config.

    Args:
        config: a dict, a YAML path, a built-in config name or a ``Config``.
        tokenizer: a keras-hub tokenizer to use; default: load
            ``tokenizer.vocabulary`` or train one on the config's data source.
        registry: plugin registry; default: the installed plugins.

    Examples:
    ```python
    model = kerasllm.build_model({
        "model": {"num_layers": 2, "hidden_dim": 64, "intermediate_dim": 128},
        "tokenizer": {"vocabulary_size": 2000},
        "objectives": [{"name": "mlm"}],
    })
    ```
    """
    config = load_config(config)
    registry = registry or get_registry()
    check_plugins(config, registry, check_tokenizer=tokenizer is None)
    if tokenizer is None:
        tokenizer = build_tokenizer(config, registry)
    model = KerasLLMModel(config.to_dict(), tokenizer, registry=registry)
    model.compile(optimizer=make_optimizer(config.training),
                  jit_compile=_jit_compile(config.training.jit_compile))
    return model


def _jit_compile(setting):
    """``training.jit_compile`` for Keras' ``compile``. ``auto`` compiles the whole
    step on one device, CPU included: as keras-hub does, and 21-29% more tokens/s
    on CPU in ``tools/bench.py``. Under a distribution strategy it stays Keras'
    ``auto`` (GPU and TPU only): on CPU devices a compiled step under
    ``MirroredStrategy`` fails."""
    if setting == "auto" and not tf.distribute.has_strategy():
        return True
    return setting


def load_model(path):
    """A model saved with ``model.save("….keras")``, reloaded in safe mode.

    ``path`` is the ``.keras`` file, or a folder holding ``model.keras`` (what
    ``kerasllm convert`` and ``kerasllm pretrain`` write).
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "model.keras"
    if not path.is_file():
        raise KerasLLMError(f"model file not found: {path}")
    get_registry()  # importing the plugins registers their Keras classes
    return keras.saving.load_model(path, safe_mode=True)


def load_initial_model(path):
    """The model fine-tuning starts from: a kerasllm ``.keras`` file or folder, or a
    Hugging Face checkpoint directory (one holding ``config.json``)."""
    path = pathlib.Path(path)
    if (path / "config.json").is_file():
        from kerasllm.hf import from_hf

        return from_hf(path)
    if not path.exists():
        raise ConfigError(f"training.initialize_from: not found: {path}; give a kerasllm "
                          "model (model.keras or its folder) or a Hugging Face checkpoint "
                          "directory")
    return load_model(path)


# What fine-tuning may change of the architecture it starts from.
ADJUSTABLE_MODEL_KEYS = ("dropout", "lora")


def adopt_architecture(config, initial):
    """``config`` with the ``model`` section of the model it starts from, but for
    what fine-tuning may change (dropout, LoRA) where the config sets it. A key the
    config sets to another value than both the default and the starting model's
    is refused, not ignored; the config's other sections are checked against the
    adopted architecture (sequence length, blocks to freeze)."""
    own = config.to_dict()["model"]
    theirs = initial.config.to_dict()["model"]
    defaults = load_config({}).to_dict()["model"]
    for key, value in own.items():
        if key in ADJUSTABLE_MODEL_KEYS or key == "family":
            continue
        if value != theirs[key] and value != defaults[key]:
            raise ConfigError(
                f"model.{key} is {value!r}, but training.initialize_from's model has "
                f"{theirs[key]!r}; fine-tuning keeps the architecture it starts from "
                f"(only {', '.join(ADJUSTABLE_MODEL_KEYS)} may change): remove model.{key}")
    # Dropout as the config sets it, else as the starting model had it.
    changed = {key: own[key] for key in ADJUSTABLE_MODEL_KEYS if own[key] != defaults[key]}
    adopted = load_config({**config.to_dict(), "model": {**theirs, **changed}})
    adopted.check_architecture()
    return adopted


def copy_backbone_weights(source, target):
    """Every backbone weight of ``source`` into ``target``'s, by path; the only
    weights ``target`` may have beyond them are LoRA adapters."""
    weights = {weight.path: weight for weight in source.backbone.weights}
    unused = set(weights)
    for weight in target.backbone.weights:
        if weight.path in weights:
            if tuple(weight.shape) != tuple(weights[weight.path].shape):
                raise KerasLLMError(
                    f"{weight.path}: shape {tuple(weights[weight.path].shape)} in "
                    f"training.initialize_from's model, {tuple(weight.shape)} in the new one")
            weight.assign(weights[weight.path])
            unused.discard(weight.path)
        elif "lora" not in weight.name:
            raise KerasLLMError(
                f"{weight.path} has no counterpart in training.initialize_from's model")
    if unused:
        first = sorted(unused)[0]
        hint = ("; it holds LoRA adapters: keep its model.lora, or start from "
                "kerasllm.lora.merge_lora(model) saved as a .keras file") if "lora" in first else ""
        raise KerasLLMError(f"training.initialize_from's model has {first}, which has no "
                            f"place in the new model{hint}")


def build_data_source(config, registry=None, source=None):
    """A data source: ``source`` (a head's ``data``, a ``SourceConfig``) or the
    config's ``data.source`` with ``data.options``."""
    registry = registry or get_registry()
    name, options, where = _source_entry(config, source)
    cls = registry.get("data source", name, f"{where}.source")
    return _instantiate(cls, options, f"{where}.options", f"data source '{name}'")


def _source_entry(config, source):
    if source is None:
        return config.data.source, config.data.options, "data"
    where = next(where for where, head, _ in config.head_entries if head.data is source)
    return source.source, source.options, f"{where}.data"


def build_tokenizer(config, registry=None, examples=None):
    """Load ``tokenizer.vocabulary``, or train on ``examples`` (default: the data source)."""
    registry = registry or get_registry()
    tokenizer_config = config.tokenizer
    factory = registry.get("tokenizer", tokenizer_config.name, "tokenizer.name")
    what = f"tokenizer '{tokenizer_config.name}'"
    if tokenizer_config.vocabulary:
        path = pathlib.Path(tokenizer_config.vocabulary)
        if not path.exists():
            raise ConfigError(f"tokenizer.vocabulary: not found: {path}")
        _check_options(factory.load, tokenizer_config.options, "tokenizer.options", what,
                       ("cls", "path", "lowercase"))
        try:
            return factory.load(path, lowercase=tokenizer_config.lowercase,
                                **tokenizer_config.options)
        except ValueError as error:
            raise ConfigError(f"tokenizer.vocabulary: {error}") from None
    from kerasllm.data import texts

    _check_options(factory.train, tokenizer_config.options, "tokenizer.options", what,
                   ("cls", "texts", "vocabulary_size", "lowercase", "sentinels"))
    if examples is None:
        examples = build_data_source(config, registry).examples()
    training_texts = texts(examples)
    try:
        return factory.train(
            training_texts, vocabulary_size=tokenizer_config.vocabulary_size,
            lowercase=tokenizer_config.lowercase, sentinels=tokenizer_config.sentinels,
            **tokenizer_config.options,
        )
    except ValueError as error:
        raise ConfigError(f"tokenizer.options: invalid value for {what}: {error}") from None


def check_plugins(config, registry=None, check_tokenizer=True):
    """Resolve every plugin name and option of a config, before any slow work
    (the tokenizer's only with ``check_tokenizer``: not when one is given ready-made)."""
    registry = registry or get_registry()
    if check_tokenizer:
        registry.get("tokenizer", config.tokenizer.name, "tokenizer.name")
    for source, _ in config.tasks or [(None, [])]:
        name, options, where = _source_entry(config, source)
        cls = registry.get("data source", name, f"{where}.source")
        _check_options(cls, options, f"{where}.options", f"data source '{name}'", ())
    for where, head_config, kind in config.head_entries:
        cls = registry.get(kind, head_config.name, f"{where}.name")
        _check_options(cls, head_config.options, f"{where}.options",
                       f"{kind} '{head_config.name}'", ("backbone", "tokenizer", "name"))


def make_head(kind, where, head_config, backbone, tokenizer, registry=None):
    """One objective or task head, by plugin name, with its options checked."""
    registry = registry or get_registry()
    cls = registry.get(kind, head_config.name, f"{where}.name")
    what = f"{kind} '{head_config.name}'"
    if cls.requires_causal is not None and cls.requires_causal != backbone.causal:
        needed = "decoder" if cls.requires_causal else "encoder"
        kind = backbone.kind.replace("_", "-")
        raise ConfigError(
            f"{what} in {where} needs model.kind: {needed}, "
            f"but the model is a{'n' if kind[0] == 'e' else ''} {kind}"
        )
    return _instantiate(
        cls, head_config.options, f"{where}.options", what,
        backbone=backbone, tokenizer=tokenizer, name=head_config.name,
    )


def _instantiate(cls, options, where, what, **fixed):
    _check_options(cls, options, where, what, tuple(fixed))
    try:
        return cls(**fixed, **options)
    except ValueError as error:
        raise ConfigError(f"{where}: invalid value for {what}: {error}") from None


def _check_options(target, options, where, what, fixed):
    """Options are the keyword arguments of a constructor (``target`` a class) or
    a function, less those kerasllm passes."""
    parameters = inspect.signature(
        target.__init__ if isinstance(target, type) else target).parameters
    allowed = sorted(
        name for name, p in parameters.items()
        if name not in ("self", *fixed) and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    )
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown option '{unknown[0]}' for {what} in {where}; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )
    missing = [
        name for name in allowed
        if parameters[name].default is parameters[name].empty and name not in options
    ]
    if missing:
        raise ConfigError(f"{where}.{missing[0]} is required by {what}")
