"""Optimizer, learning-rate schedule and atomic checkpoints for ``model.fit``."""

import json
import math
import os
import pathlib
import shutil
import tempfile

import keras

from kerasllm.errors import KerasLLMError
from kerasllm.keras_workarounds import ClipAfterAllReduce


@keras.saving.register_keras_serializable(package="kerasllm")
class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then linear decay
    to ``end`` at ``total_steps`` (the BERT schedule)."""

    def __init__(self, peak, warmup_steps, total_steps, end=0.0):
        self.peak = peak
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.end = end

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warmup = self.peak * step / max(self.warmup_steps, 1)
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = keras.ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        decay = self.peak + (self.end - self.peak) * progress
        return keras.ops.where(step < self.warmup_steps, warmup, decay)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "end": self.end}


@keras.saving.register_keras_serializable(package="kerasllm")
class AdamW(ClipAfterAllReduce, keras.optimizers.AdamW):
    """Keras' AdamW, clipping gradients as one device would under any strategy."""


def make_optimizer(training):
    """AdamW with warm-up and linear decay, global-norm clipping, and no weight
    decay on biases, layer-norm parameters or embeddings' layer norms."""
    optimizer = AdamW(
        learning_rate=WarmupLinearDecay(
            training.learning_rate, training.warmup_steps, training.steps,
            training.end_learning_rate,
        ),
        weight_decay=training.weight_decay,
        global_clipnorm=training.clipnorm or None,
    )
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    if training.precision == "mixed_float16":
        # float16 gradients underflow: scale the loss up, skip a step whose
        # gradients overflow, and adjust the scale as training goes.
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


class CheckpointManager:
    """Numbered checkpoints (model weights and optimizer state) in one folder.

    Each checkpoint is written to a temporary folder and renamed into place, and
    the ``latest`` pointer file is replaced atomically after that, so a crash at
    any moment leaves the previous checkpoint as the latest, intact.
    """

    POINTER = "latest"
    WEIGHTS = "model.weights.h5"

    def __init__(self, directory, keep=3):
        self.directory = pathlib.Path(directory)
        self.keep = keep

    def save(self, model, step):
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"ckpt-{step:09d}"
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.directory))
        # An unbuilt optimizer saves only its step count, which restore would
        # skip as a mismatch: build it so every checkpoint has the full state.
        _build_optimizer(model)
        model.save_weights(staging / self.WEIGHTS)
        _fsync(staging / self.WEIGHTS)
        state = {"step": step, "rng": [v.numpy().tolist() for v in _rng_states(model)]}
        _write_synced(staging / "state.json", json.dumps(state))
        final = self.directory / name
        if final.exists():  # a re-run over the same step; the new one wins
            shutil.rmtree(final)
        os.replace(staging, final)
        pointer = self.directory / f".{self.POINTER}.tmp"
        _write_synced(pointer, name)
        os.replace(pointer, self.directory / self.POINTER)
        self._prune()
        return final

    def latest(self):
        """The newest complete checkpoint folder, or None."""
        pointer = self.directory / self.POINTER
        if not pointer.is_file():
            return None
        path = self.directory / pointer.read_text().strip()
        return path if (path / self.WEIGHTS).is_file() else None

    def restore(self, model):
        """Load the latest checkpoint into ``model``; return its step (0 if none)."""
        path = self.latest()
        if path is None:
            return 0
        # Optimizer variables must exist before their values can be loaded.
        _build_optimizer(model)
        model.load_weights(path / self.WEIGHTS)
        state = json.loads((path / "state.json").read_text())
        # By position: their names carry process-wide counters (seed_generator_7).
        for variable, value in zip(_rng_states(model), state["rng"], strict=True):
            variable.assign(value)
        return state["step"]

    def _prune(self):
        checkpoints = sorted(self.directory.glob("ckpt-*"))
        for old in checkpoints[: -self.keep]:
            shutil.rmtree(old)
        for staging in self.directory.glob(".ckpt-*"):  # left by a crashed save
            shutil.rmtree(staging, ignore_errors=True)


class CheckpointEvery(keras.callbacks.Callback):
    """Save a checkpoint at the end of every epoch whose step is a multiple of
    ``every``. ``write``: False on the workers of a cluster that only follow the
    chief (they compute the same weights)."""

    def __init__(self, manager, every, last_step, write=True):
        super().__init__()
        self.manager = manager
        self.every = every
        self.last_step = last_step
        self.write = write

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if self.write and (step % self.every == 0 or step == self.last_step):
            self.manager.save(self.model, step)


class NonFiniteLossError(KerasLLMError):
    """Training produced a NaN or infinite loss."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stop at the first step whose loss is NaN or infinite, before anything
    saves that step's weights: the checkpoints keep the last good state.

    Keras' running mean of the loss turns non-finite at the first bad step and
    stays so, which names that step."""

    def __init__(self, manager=None):
        super().__init__()
        self.manager = manager

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        if math.isfinite(loss):
            return
        step = int(self.model.optimizer.iterations.numpy())
        latest = self.manager.latest() if self.manager else None
        kept = f"the latest checkpoint, {latest}, is intact" if latest else \
            "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"the loss became {loss} at step {step}; training stopped and this step's "
            f"weights were not saved ({kept}). Lower training.learning_rate, keep "
            "training.clipnorm on, or train in float32 (training.precision)")


def _build_optimizer(model):
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def _rng_states(model):
    """Seed-generator states (dropout streams): variables that `save_weights` skips.

    Restoring them makes a resumed run draw the same dropout masks as an
    uninterrupted one.
    """
    saved = {id(weight) for weight in model.weights}
    return [v for v in model.variables if id(v) not in saved and "seed_generator" in v.path]


def _write_synced(path, text):
    with open(path, "w") as handle:
        handle.write(text)
    _fsync(path)


def _fsync(path):
    """Flush a file to disk before it is renamed into place."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
