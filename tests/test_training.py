"""Training with fit: combined objectives, checkpoints, resume after kill -9, gradient
accumulation, mixed precision, the non-finite loss guard."""

import importlib.metadata
import json
import pathlib
import signal
import subprocess
import sys
import textwrap
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasllm
from conftest import tiny_config
from kerasllm.data import build_dataset
from kerasllm.jobs import pretrain
from kerasllm.plugins import Registry
from kerasllm.training import CheckpointManager, NonFiniteLossError, WarmupLinearDecay
from kerasllm_plugins.mlm import MaskedLM


class FakeEntryPoint:
    def __init__(self, name, module):
        self.name, self.module = name, module
        self.dist = types.SimpleNamespace(name="test-plugins", version="1.0")

    def load(self):
        return self.module


def registry_with_second_mlm():
    module = types.SimpleNamespace(
        kerasllm_objectives=kerasllm.hookimpl(lambda: {"mlm_b": MaskedLM}))
    installed = list(importlib.metadata.entry_points(group="kerasllm"))
    return Registry(installed + [FakeEntryPoint("second_mlm", module)])


def test_objectives_combine_with_weights_and_log_separately(tokenizer, examples):
    config = tiny_config(objectives=[{"name": "mlm"}, {"name": "mlm_b", "weight": 0.5}])
    model = kerasllm.build_model(config, tokenizer, registry=registry_with_second_mlm())
    batches = build_dataset(model, examples, 8, 32).take(3).cache()
    result = model.evaluate(batches, verbose=0, return_dict=True)
    assert set(result) == {"loss", "mlm_loss", "mlm_accuracy", "mlm_b_loss", "mlm_b_accuracy"}
    np.testing.assert_allclose(
        result["loss"], result["mlm_loss"] + 0.5 * result["mlm_b_loss"], rtol=1e-5)
    history = model.fit(build_dataset(model, examples, 8, 32, repeat=True),
                        steps_per_epoch=3, verbose=0)
    assert {"mlm_loss", "mlm_b_loss", "mlm_b_accuracy"} <= set(history.history)


def test_schedule_warms_up_then_decays_linearly():
    schedule = WarmupLinearDecay(1e-3, warmup_steps=10, total_steps=110, end=1e-4)
    values = [float(schedule(step)) for step in (0, 5, 10, 60, 110, 200)]
    np.testing.assert_allclose(values, [0, 5e-4, 1e-3, 5.5e-4, 1e-4, 1e-4], rtol=1e-6)


def test_checkpoint_write_is_atomic_and_pruned(tokenizer, tmp_path, monkeypatch):
    model = kerasllm.build_model(tiny_config(), tokenizer)
    manager = CheckpointManager(tmp_path, keep=2)
    manager.save(model, 10)
    saved = [w.numpy().copy() for w in model.weights]

    def crash_midway(path):
        pathlib.Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    for weight in model.weights:  # change the live weights
        weight.assign(weight + 1.0)
    monkeypatch.setattr(model, "save_weights", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        manager.save(model, 20)
    monkeypatch.undo()
    assert manager.latest().name == "ckpt-000000010"
    assert not (tmp_path / "ckpt-000000020").exists()
    assert manager.restore(model) == 10
    for weight, expected in zip(model.weights, saved):
        np.testing.assert_array_equal(weight.numpy(), expected)

    for step in (20, 30):
        manager.save(model, step)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000000020", "ckpt-000000030"]
    assert not list(tmp_path.glob(".ckpt-*"))  # the crashed staging folder is gone
    assert manager.latest().name == "ckpt-000000030"


PRETRAIN_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import keras
    from kerasllm.jobs import pretrain

    class CrashAt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == int(sys.argv[3]):
                print("simulated crash", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no cleanup runs

    result = pretrain(json.loads(sys.argv[1]), output=sys.argv[2], callbacks=[CrashAt()],
                      verbose=0)
    print(json.dumps({"step": result["step"], "start": result["start"], "end": result["end"]}))
""")


def run_pretrain(tmp_path, config, output, crash_at=0):
    """One run in a fresh process, as a user's rerun of a crashed command is."""
    script = tmp_path / "run.py"
    script.write_text(PRETRAIN_SCRIPT)
    return subprocess.run(
        [sys.executable, str(script), json.dumps(config), str(output), str(crash_at)],
        capture_output=True, text=True, timeout=180,
    )


@pytest.fixture
def run_config(tokenizer, documents, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(documents))
    vocabulary = tmp_path / "vocab.txt"
    vocabulary.write_text("".join(f"{token}\n" for token in tokenizer.get_vocabulary()))
    # clm, whose batches depend only on the seeded shuffle: keras-hub's MLM mask
    # generator shuffles with stateful RNG inside tf_text's parallel map_fn, so two
    # uninterrupted mlm runs already differ (measured 0.7% in final loss).
    return tiny_config(
        model={"dropout": 0.1, "kind": "decoder", "norm_first": True, "pooler": False},
        objectives=[{"name": "clm"}],
        tokenizer={"vocabulary": str(vocabulary)},
        data={"source": "text", "options": {"paths": str(corpus), "mode": "document"},
              "eval_batches": 4, "shuffle_buffer": 256},
        training={"steps": 40, "steps_per_epoch": 10, "checkpoint_every": 10},
    )


def test_resume_continues_step_count_and_reproduces_the_run(run_config, tmp_path):
    first = run_pretrain(tmp_path, run_config, tmp_path / "a")
    assert first.returncode == 0, first.stderr[-3000:]
    uninterrupted = json.loads(first.stdout.splitlines()[-1])
    crashed = run_pretrain(tmp_path, run_config, tmp_path / "b", crash_at=25)
    assert crashed.returncode == -signal.SIGKILL and "simulated crash" in crashed.stderr
    assert CheckpointManager(tmp_path / "b" / "checkpoints").latest().name == "ckpt-000000020"
    rerun = run_pretrain(tmp_path, run_config, tmp_path / "b")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Resuming from step 20" in rerun.stdout
    resumed = json.loads(rerun.stdout.splitlines()[-1])
    assert resumed["step"] == uninterrupted["step"] == 40
    # Bit-exact: weights, optimizer state, dropout seed streams and the data
    # position all continue where the checkpoint left them.
    assert resumed["end"]["loss"] == uninterrupted["end"]["loss"]
    assert uninterrupted["end"]["loss"] < uninterrupted["start"]["loss"] - 0.5
    a = kerasllm.load_model(tmp_path / "a" / "model.keras")
    b = kerasllm.load_model(tmp_path / "b" / "model.keras")
    for wa, wb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(wa.numpy(), wb.numpy())
    assert (tmp_path / "a" / "logs").is_dir()


def test_gradient_accumulation_equals_one_step_on_the_whole_batch(tokenizer, documents):
    examples = tf.data.Dataset.from_tensor_slices(
        {"text": documents, "label": [i % 3 for i in range(len(documents))]})

    def train(accumulation_steps):
        keras.utils.set_random_seed(0)
        model = kerasllm.build_model(tiny_config(
            objectives=[], head={"name": "classification",
                                 "options": {"num_classes": 3, "dropout": 0.0}},
            training={"gradient_accumulation_steps": accumulation_steps}), tokenizer)
        initial = [weight.numpy() for weight in model.weights]
        batches = build_dataset(model, examples, 16, 32, shuffle_buffer=64, seed=0, repeat=True)
        history = model.fit(batches, steps_per_epoch=4, verbose=0)
        return initial, model, history.history

    initial, whole, whole_logs = train(1)
    _, accumulated, accumulated_logs = train(4)  # 4 micro-batches of 4 rows each step
    assert int(accumulated.optimizer.iterations.numpy()) == 4
    assert max(np.abs(a.numpy() - b).max() for a, b in zip(whole.weights, initial)) > 1e-3
    for a, b in zip(whole.weights, accumulated.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    for name in ("loss", "classification_loss", "classification_accuracy"):
        np.testing.assert_allclose(accumulated_logs[name], whole_logs[name], rtol=1e-5)


def test_mixed_precision_trains_close_to_float32_with_float32_norms(tokenizer, examples):
    losses = {}
    for precision in ("float32", "mixed_bfloat16", "mixed_float16"):
        keras.utils.set_random_seed(0)
        model = kerasllm.build_model(tiny_config(
            model={"kind": "decoder", "norm_first": True, "pooler": False},
            objectives=[{"name": "clm"}], training={"precision": precision}), tokenizer)
        batches = build_dataset(model, examples, 8, 32, shuffle_buffer=64, seed=0, repeat=True)
        history = model.fit(batches, steps_per_epoch=30, verbose=0)
        losses[precision] = history.history["loss"][0]
        assert all(weight.dtype == "float32" for weight in model.weights)
        x, _ = next(iter(batches))
        assert model(x)["clm"].dtype == "float32"  # losses see float32 logits
        norm = next(layer for layer in model.backbone._flatten_layers()
                    if isinstance(layer, keras.layers.LayerNormalization))
        assert norm.compute_dtype == precision.replace("mixed_", "")
        # Values near 1000, 4 apart (exact in bfloat16): a mean taken in 16 bits is
        # off by several units, as much as the spread.
        exact = 1000.0 + 4 * np.random.default_rng(0).integers(-3, 4, size=(2, 32))
        inputs = keras.ops.cast(exact, norm.compute_dtype)
        exact = (exact - exact.mean(-1, keepdims=True)) / exact.std(-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(keras.ops.cast(norm(inputs), "float32")), exact,
                                   atol=0.05)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)  # float16
    for precision, loss in losses.items():
        assert np.isfinite(loss) and abs(loss - losses["float32"]) < 0.02 * losses["float32"], \
            losses
    assert losses["float32"] < 6.5  # it learned: log(1000) ≈ 6.9 at the start


def test_a_non_finite_loss_stops_training_naming_the_step(run_config, tmp_path):
    class Poison(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == 13:
                weight = self.model.backbone.weights[0]
                weight.assign(weight * np.nan)

    with pytest.raises(NonFiniteLossError,
                       match=r"the loss became nan at step 14; training stopped and this "
                             r"step's weights were not saved \(the latest checkpoint, "
                             r".*ckpt-000000010, is intact\)"):
        pretrain(run_config, output=tmp_path / "run", callbacks=[Poison()], verbose=0,
                 log=lambda line: None)
    manager = CheckpointManager(tmp_path / "run" / "checkpoints")
    assert manager.latest().name == "ckpt-000000010"
    model = kerasllm.build_model(run_config)
    assert manager.restore(model) == 10
    assert all(np.isfinite(weight.numpy()).all() for weight in model.weights)
