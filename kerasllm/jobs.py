"""Jobs the CLI runs: pretraining from a config, resumable, with held-out evaluation."""

import dataclasses
import pathlib
import sys

import keras

from kerasllm.builder import build_data_source, build_model, build_tokenizer, check_plugins
from kerasllm.config import load_config
from kerasllm.errors import ConfigError
from kerasllm.data import build_dataset, split_heldout
from kerasllm.plugins import get_registry
from kerasllm.training import CheckpointEvery, CheckpointManager

VOCABULARY_FILE = "vocabulary.txt"


def pretrain(config, *, steps=None, output=None, callbacks=(), verbose="auto", log=print):
    """Pretrain the config's model on its data source; resume if ``output`` has checkpoints.

    Writes to the output folder: ``vocabulary.txt`` (so a resumed run tokenizes
    identically), ``checkpoints/`` (every ``training.checkpoint_every`` steps,
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

    training_examples, heldout_examples = split_heldout(
        build_data_source(config, registry).examples(), config.data.heldout_fraction)
    model = build_model(config, _tokenizer(config, registry, training_examples, output),
                        registry=registry)
    checkpoints = CheckpointManager(output / "checkpoints", training.keep_checkpoints)
    step = checkpoints.restore(model)
    if step:
        log(f"Resuming from step {step} ({checkpoints.latest()})")
    if step >= training.steps:
        log(f"Already trained for {step} steps (training.steps is {training.steps})")

    data = config.data
    train_batches = build_dataset(
        model, training_examples, data.batch_size, data.sequence_length,
        shuffle_buffer=data.shuffle_buffer, seed=training.seed, repeat=True,
    ).skip(step)  # the batches the checkpointed steps already consumed
    # Cached so that the evaluations before and after see the same masks.
    eval_batches = build_dataset(
        model, heldout_examples, data.batch_size, data.sequence_length,
    ).take(data.eval_batches).cache()

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
    model.save(output / "model.keras")
    log(f"Saved {output / 'model.keras'}")
    return {"start": start, "end": end, "step": final_step, "output": output}


def _tokenizer(config, registry, examples, output):
    """The configured vocabulary, the run's saved one when resuming, or a new one."""
    saved = output / VOCABULARY_FILE
    factory = registry.get("tokenizer", config.tokenizer.name, "tokenizer.name")
    if not config.tokenizer.vocabulary and saved.is_file():
        return factory.load(saved, lowercase=config.tokenizer.lowercase)
    tokenizer = build_tokenizer(config, registry, examples)
    factory.save_vocabulary(tokenizer, saved)
    return tokenizer


def _format(metrics):
    return ", ".join(f"{name} {value:.4f}" for name, value in sorted(metrics.items()))
