"""Jobs the CLI runs: pretraining from a config, resumable, with held-out evaluation."""

import dataclasses
import os
import pathlib
import shutil
import sys

import keras

from kerasllm.builder import (
    build_data_source,
    build_model,
    build_tokenizer,
    check_plugins,
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
from kerasllm.errors import ConfigError
from kerasllm.plugins import get_registry
from kerasllm.training import CheckpointEvery, CheckpointManager

TOKENIZER_FOLDER = "tokenizer"


def pretrain(config, *, steps=None, output=None, callbacks=(), verbose="auto", log=print):
    """Pretrain the config's model on its data source; resume if ``output`` has checkpoints.

    Writes to the output folder: ``tokenizer/`` (the vocabulary, so a resumed
    run tokenizes identically), ``checkpoints/`` (every ``training.checkpoint_every`` steps,
    atomic), ``logs/`` (TensorBoard) and ``model.keras`` at the end. Returns
    ``{"start": metrics, "end": metrics, "step": int, "output": path}`` with
    the held-out metrics before and after this run's training. ``callbacks``
    are passed to ``fit`` after kerasllm's own (checkpoints, TensorBoard).
    """
    if verbose == "auto":  # a progress bar on terminals, a line per epoch in logs
        verbose = 1 if sys.stdout.isatty() else 2
    config = load_config(config)
    overrides = {"steps": steps, "output": output}
    training = dataclasses.replace(
        config.training, **{k: v for k, v in overrides.items() if v is not None})
    config = load_config({**config.to_dict(), "training": dataclasses.asdict(training)})
    if not config.objectives:
        raise ConfigError("pretrain needs `objectives`; this config has "
                          + ("a task `head`" if config.head else "none"))
    registry = get_registry()
    check_plugins(config, registry)  # a typo fails now, not after tokenizer training
    output = pathlib.Path(training.output)
    output.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(training.seed)

    data = config.data
    # One task per data source: the shared `data.source`, and each head's own.
    sources = [build_data_source(config, registry, source) for source, _ in config.tasks]
    splits = [split_heldout(source.examples(), data.heldout_fraction) for source in sources]
    model = build_model(config, _tokenizer(config, registry, splits[0][0], output),
                        registry=registry)
    checkpoints = CheckpointManager(output / "checkpoints", training.keep_checkpoints)
    step = checkpoints.restore(model)
    if step:
        log(f"Resuming from step {step} ({checkpoints.latest()})")
    if step >= training.steps:
        log(f"Already trained for {step} steps (training.steps is {training.steps})")

    task_heads = [[model.get_head(head.name) for _, head, _ in entries]
                  for _, entries in config.tasks]
    rates = None
    if len(sources) > 1:
        sizes = [source_config.size if source_config and source_config.size else
                 count_examples(training_examples) for (source_config, _), (training_examples, _)
                 in zip(config.tasks, splits)]
        rates = mixing_rates(sizes, data.mixing_temperature)
        log("Mixing " + ", ".join(
            f"{'+'.join(head.name for head in heads)} {rate:.1%} ({size} examples)"
            for heads, rate, size in zip(task_heads, rates, sizes)))

    def batches(heads, examples, **options):
        return build_dataset(model, examples, data.batch_size, data.sequence_length,
                             packing=data.packing, heads=heads, **options)

    train_batches = mix(model, [
        (heads, batches(heads, training_examples, shuffle_buffer=data.shuffle_buffer,
                        seed=training.seed, repeat=True))
        for heads, (training_examples, _) in zip(task_heads, splits)
    ], rates or [1.0], seed=training.seed).skip(step)  # the batches already trained on
    # Shuffled so that a few batches are not all one long document's (sentence-pair
    # objectives draw their negatives within a batch); cached so that the
    # evaluations before and after see the same batches.
    eval_batches = mix(model, [
        (heads, batches(heads, heldout_examples, shuffle_buffer=data.shuffle_buffer,
                        seed=training.seed).take(data.eval_batches))
        for heads, (_, heldout_examples) in zip(task_heads, splits)
    ], None).cache()
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
            CheckpointEvery(checkpoints, training.checkpoint_every, training.steps),
            keras.callbacks.TensorBoard(output / "logs"),
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
    model.save(output / "model.keras")
    log(f"Saved {output / 'model.keras'}")
    return {"start": start, "end": end, "step": final_step, "output": output}


def _tokenizer(config, registry, examples, output):
    """The configured vocabulary, the run's saved one when resuming, or a new one
    (trained, then saved for a resumed run to tokenize identically)."""
    saved = output / TOKENIZER_FOLDER
    if config.tokenizer.vocabulary:
        return build_tokenizer(config, registry)
    if saved.is_dir():
        return build_tokenizer(load_config({**config.to_dict(), "tokenizer": {
            **config.to_dict()["tokenizer"], "vocabulary": str(saved), "options": {}}}),
            registry)
    tokenizer = build_tokenizer(config, registry, examples)
    factory = registry.get("tokenizer", config.tokenizer.name, "tokenizer.name")
    staging = output / f".{TOKENIZER_FOLDER}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    factory.save(tokenizer, staging)
    os.replace(staging, saved)  # a crash never leaves a half-written vocabulary
    return tokenizer


def _format(metrics):
    return ", ".join(f"{name} {value:.4f}" for name, value in sorted(metrics.items()))
