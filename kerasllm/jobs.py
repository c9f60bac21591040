"""Jobs the CLI runs: pretraining and fine-tuning from a config, resumable, with
held-out evaluation; evaluating a trained model."""

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import sys

import keras
import tensorflow as tf

from kerasllm.builder import (
    adopt_architecture,
    build_data_source,
    build_model,
    build_tokenizer,
    check_plugins,
    copy_backbone_weights,
    load_initial_model,
)
from kerasllm.config import load_config
from kerasllm.data import (
    build_dataset,
    count_examples,
    mix,
    mixing_rates,
    padding_fraction,
    split_heldout,
)
from kerasllm.distribute import (
    describe,
    distribute_batches,
    is_chief,
    make_strategy,
    replicas_per_pipeline,
)
from kerasllm.errors import ConfigError
from kerasllm.plugins import get_registry
from kerasllm.training import CheckpointEvery, CheckpointManager, StopOnNonFiniteLoss

TOKENIZER_FOLDER = "tokenizer"


def pretrain(config, *, steps=None, output=None, callbacks=(), verbose="auto", log=print):
    """Pretrain the config's model on its data source; resume if ``output`` has checkpoints.

    Writes to the output folder: ``tokenizer/`` (the vocabulary, so a resumed
    run tokenizes identically), ``checkpoints/`` (every ``training.checkpoint_every`` steps,
    atomic), ``logs/`` (TensorBoard) and ``model.keras`` at the end. Returns
    ``{"start": metrics, "end": metrics, "step": int, "output": path}`` with
    the held-out metrics before and after this run's training. ``callbacks``
    are passed to ``fit`` after kerasllm's own (the non-finite loss guard,
    checkpoints, TensorBoard). Under ``training.strategy`` the model trains
    inside the strategy's scope, each worker on its shard of the examples, and
    only the chief writes files (:mod:`kerasllm.distribute`).
    """
    config = _with_overrides(config, steps, output)
    if not config.objectives:
        raise ConfigError("pretrain needs `objectives`; this config has "
                          + ("a task `head`: use `kerasllm finetune`" if config.head or
                             config.heads else "none"))
    return _train(config, callbacks, verbose, log)


def finetune(config, *, steps=None, output=None, callbacks=(), verbose="auto", log=print):
    """Fine-tune the config's task head(s); resume if ``output`` has checkpoints.

    As :func:`pretrain`, and: ``training.initialize_from`` gives the starting
    weights and tokenizer (a kerasllm model or a Hugging Face checkpoint); head
    options the data settle (label vocabulary, target scale) are filled in from
    the training examples; the held-out task metrics (accuracy, F1, ...) are in
    ``result["task_metrics"]`` and ``metrics.json``; with LoRA, the adapters alone
    are also saved, as ``lora.weights.npz``.
    """
    config = _with_overrides(config, steps, output)
    if not (config.head or config.heads):
        raise ConfigError("finetune needs a task `head` (or `heads`); this config has "
                          + ("only `objectives`: use `kerasllm pretrain`" if config.objectives
                             else "none"))
    return _train(config, callbacks, verbose, log)


def evaluate(config, *, model=None, output_json=None, log=print):
    """The held-out metrics of a trained model: Keras' (loss, ...) and each task
    head's standard ones, on the held-out part of the config's data (the same
    examples training held out). ``model``: a ``.keras`` file or folder; default
    ``training.output``. Writes them as JSON to ``output_json`` (default
    ``metrics.json`` beside the model) and returns them."""
    from kerasllm.builder import load_model

    config = load_config(config)
    path = pathlib.Path(model or config.training.output)
    model = load_model(path)
    registry = get_registry()
    sources, splits = _sources(config, registry)
    task_heads = _task_heads(model, config)
    metrics = model.evaluate(_eval_batches(model, config, task_heads, splits), verbose=0,
                             return_dict=True)
    metrics.update(_task_metrics(model, task_heads, splits))
    output_json = pathlib.Path(output_json) if output_json else \
        (path if path.is_dir() else path.parent) / METRICS_FILE
    write_json(output_json, metrics)
    log(f"Wrote {output_json}")
    return metrics


METRICS_FILE = "metrics.json"
LORA_FILE = "lora.weights.npz"


def _with_overrides(config, steps, output):
    config = load_config(config)
    overrides = {"steps": steps, "output": None if output is None else str(output)}
    training = dataclasses.replace(
        config.training, **{k: v for k, v in overrides.items() if v is not None})
    return load_config({**config.to_dict(), "training": dataclasses.asdict(training)})


def _train(config, callbacks, verbose, log):
    if verbose == "auto":  # a progress bar on terminals, a line per epoch in logs
        verbose = 1 if sys.stdout.isatty() else 2
    training = config.training
    # First: a multi-worker strategy must exist before TensorFlow runs any op.
    strategy = make_strategy(training.strategy, training.devices, training.tpu)
    chief = is_chief(strategy)  # the one worker that writes files
    registry = get_registry()
    check_plugins(config, registry)  # a typo fails now, not after tokenizer training
    output = pathlib.Path(training.output)
    output.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(training.seed)

    data = config.data
    sources, splits = _sources(config, registry)
    initial = None
    if training.initialize_from:
        initial = load_initial_model(training.initialize_from)
        config = adopt_architecture(config, initial)
        tokenizer = initial.tokenizer
    else:
        tokenizer = _tokenizer(config, registry, splits[0][0], output, write=chief)
    config = complete_head_options(config, registry, splits)
    log(describe(strategy, data.batch_size, training.gradient_accumulation_steps))
    checkpoints = CheckpointManager(output / "checkpoints", training.keep_checkpoints)
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = build_model(config, tokenizer, registry=registry)
        if initial is not None:
            copy_backbone_weights(initial, model)
            log(f"Initialized the backbone from {training.initialize_from}")
            del initial
        step = checkpoints.restore(model)
    if not model.is_pretraining:
        from kerasllm.lora import count_parameters

        counts = count_parameters(model)
        log(f"Parameters: {counts['trainable']:,} trainable of {counts['total']:,} "
            f"({counts['trainable'] / counts['total']:.2%})")
    if step:
        log(f"Resuming from step {step} ({checkpoints.latest()})")
    if step >= training.steps:
        log(f"Already trained for {step} steps (training.steps is {training.steps})")

    task_heads = _task_heads(model, config)
    rates = None
    if len(sources) > 1:
        sizes = [source_config.size if source_config and source_config.size else
                 count_examples(training_examples) for (source_config, _), (training_examples, _)
                 in zip(config.tasks, splits)]
        rates = mixing_rates(sizes, data.mixing_temperature)
        log("Mixing " + ", ".join(
            f"{'+'.join(head.name for head in heads)} {rate:.1%} ({size} examples)"
            for heads, rate, size in zip(task_heads, rates, sizes)))

    train_batches = distribute_batches(
        strategy, lambda rows, context: training_batches(
            model, config, splits, rates, batch_size=rows, input_context=context, step=step),
        data.batch_size)
    eval_batches = _eval_batches(model, config, task_heads, splits)
    log(f"Held-out padding: {padding_fraction(eval_batches):.1%} of positions")

    start = model.evaluate(eval_batches, verbose=0, return_dict=True)
    log(f"Held-out at step {step}: {_format(start)}")
    model.fit(
        train_batches,
        epochs=training.steps // training.steps_per_epoch,
        initial_epoch=step // training.steps_per_epoch,
        steps_per_epoch=training.steps_per_epoch,
        shuffle=False,  # the pipeline shuffles, with the run's seed
        callbacks=[
            StopOnNonFiniteLoss(checkpoints),
            CheckpointEvery(checkpoints, training.checkpoint_every, training.steps, write=chief),
            *([keras.callbacks.TensorBoard(output / "logs")] if chief else []),
            *callbacks,
        ],
        verbose=verbose,
    )
    end = model.evaluate(eval_batches, verbose=0, return_dict=True)
    final_step = int(model.optimizer.iterations.numpy())
    log(f"Held-out at step {final_step}: {_format(end)}")
    for source in sources:
        report = getattr(source, "report", None)
        if report and report.counts:
            log(f"Input handled: {report}")
    result = {"start": start, "end": end, "step": final_step, "output": output}
    if not model.is_pretraining:
        result["task_metrics"] = _task_metrics(model, task_heads, splits)
        log(f"Held-out task metrics: {_format(result['task_metrics'])}")
        if chief:
            write_json(output / METRICS_FILE, {**end, **result["task_metrics"]})
    if not chief:
        return result
    model.save(output / "model.keras")
    log(f"Saved {output / 'model.keras'}")
    if config.model.lora:
        from kerasllm.lora import save_lora_weights

        save_lora_weights(model, output / LORA_FILE)
        log(f"Saved the LoRA adapters alone: {output / LORA_FILE}")
    return result


def _sources(config, registry):
    """One data source per task (the shared ``data.source``, and each head's own),
    and each one's (training, held-out) examples."""
    sources = [build_data_source(config, registry, source) for source, _ in config.tasks]
    splits = [split_heldout(source.examples(), config.data.heldout_fraction)
              for source in sources]
    return sources, splits


def training_batches(model, config, splits, rates=None, *, batch_size=None,
                     input_context=None, step=0):
    """One input pipeline's training batches, as ``fit`` draws them, from
    optimizer step ``step`` on: ``batch_size`` rows each (default
    ``data.batch_size``), from its ``input_context``'s shard of the examples.

    ``splits``: each task's (training, held-out) examples; ``rates``: the
    tasks' mixing rates (None: one task). A pipeline feeding ``n`` replicas
    yields ``n`` batches per step, so it skips ``n * step`` to resume there.
    """
    data, training = config.data, config.training
    return mix(model, [
        (heads, _batches(model, config, heads, training_examples, batch_size=batch_size,
                         shuffle_buffer=data.shuffle_buffer, seed=training.seed, repeat=True,
                         input_context=input_context))
        for heads, (training_examples, _) in zip(_task_heads(model, config), splits)
    ], rates or [1.0], seed=training.seed).skip(step * replicas_per_pipeline(input_context))


def _task_heads(model, config):
    return [[model.get_head(head.name) for _, head, _ in entries] for _, entries in config.tasks]


def _batches(model, config, heads, examples, batch_size=None, **options):
    data = config.data
    return build_dataset(model, examples, batch_size or data.batch_size, data.sequence_length,
                         packing=data.packing, heads=heads, **options)


def _eval_batches(model, config, task_heads, splits):
    # Shuffled so that a few batches are not all one long document's (sentence-pair
    # objectives draw their negatives within a batch); cached so that the
    # evaluations before and after see the same batches.
    data = config.data
    batches = mix(model, [
        (heads, _batches(model, config, heads, heldout_examples,
                         shuffle_buffer=data.shuffle_buffer,
                         seed=config.training.seed).take(data.eval_batches))
        for heads, (_, heldout_examples) in zip(task_heads, splits)
    ], None).cache()
    # Across workers, each evaluates its share of every batch: the examples come
    # from a file only some workers would get with file-based sharding.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return batches.with_options(options)


def _task_metrics(model, task_heads, splits):
    """Each task head's standard metrics on its held-out examples (all of them)."""
    from kerasllm.evaluation import evaluate

    metrics = {}
    for heads, (_, heldout_examples) in zip(task_heads, splits):
        heads = [head for head in heads if head not in model.objectives]
        if heads:
            metrics.update(evaluate(model, heldout_examples, model.config.data.batch_size,
                                    heads))
    return metrics


def complete_head_options(config, registry, splits):
    """The config with each task head's ``infer_options`` applied to its training
    examples (label vocabularies, target scales), so they are saved with the model."""
    config_dict = config.to_dict()
    for (_, entries), (training_examples, _) in zip(config.tasks, splits):
        for where, head_config, kind in entries:
            if kind != "task head":
                continue
            cls = registry.get(kind, head_config.name, f"{where}.name")
            options = cls.infer_options(training_examples, dict(head_config.options))
            if options != head_config.options:
                _entry(config_dict, where)["options"] = options
    return load_config(config_dict)


def _entry(config_dict, where):
    """The head entry a config key (``head``, ``heads[1]``) names in a config dict."""
    if where == "head":
        return config_dict["head"]
    section, index = where.rstrip("]").split("[")
    return config_dict[section][int(index)]


def write_json(path, values):
    """Write ``values`` as JSON, atomically: a crash leaves the old file or none. An
    undefined metric (NaN: a correlation with a constant side) is written as null,
    which JSON has, unlike NaN."""
    values = {name: None if value != value else value for name, value in values.items()}
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)


def _tokenizer(config, registry, examples, output, write=True):
    """The configured vocabulary, the run's saved one when resuming, or a new one
    (trained, then saved for a resumed run to tokenize identically; by the chief
    alone in a cluster, where every worker trains the same one on the same
    examples)."""
    saved = output / TOKENIZER_FOLDER
    if config.tokenizer.vocabulary:
        return build_tokenizer(config, registry)
    if saved.is_dir():
        return build_tokenizer(load_config({**config.to_dict(), "tokenizer": {
            **config.to_dict()["tokenizer"], "vocabulary": str(saved), "options": {}}}),
            registry)
    tokenizer = build_tokenizer(config, registry, examples)
    if not write:
        return tokenizer
    factory = registry.get("tokenizer", config.tokenizer.name, "tokenizer.name")
    staging = output / f".{TOKENIZER_FOLDER}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    factory.save(tokenizer, staging)
    os.replace(staging, saved)  # a crash never leaves a half-written vocabulary
    return tokenizer


def _format(metrics):
    return ", ".join(f"{name} {value:.4f}" for name, value in sorted(metrics.items()))
