"""Training with fit: combined objectives, checkpoints, resume, MirroredStrategy."""

import importlib.metadata
import json
import pathlib
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

import kerasllm
from conftest import tiny_config
from kerasllm.data import build_dataset
from kerasllm.plugins import Registry
from kerasllm.training import CheckpointManager, WarmupLinearDecay
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
    import json, os, sys
    import keras
    from kerasllm.jobs import pretrain

    class CrashAt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == int(sys.argv[3]):
                print("simulated crash", file=sys.stderr, flush=True)
                os._exit(3)  # abrupt, like kill -9: no cleanup runs

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
    assert crashed.returncode == 3 and "simulated crash" in crashed.stderr
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


MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, keras_hub, kerasllm
    from kerasllm.data import build_dataset
    from kerasllm.layers import attention_core
    vocabulary = open(sys.argv[1]).read().split("\\n")[:-1]
    config = json.loads(sys.argv[2])
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = kerasllm.build_model(config, tokenizer)
    texts = [line for line in open(sys.argv[3]).read().split("\\n\\n") if line.strip()]
    examples = tf.data.Dataset.from_tensor_slices({"text": texts})
    batches = build_dataset(model, examples, 16, 32, shuffle_buffer=256, seed=0, repeat=True)
    history = model.fit(batches, steps_per_epoch=15, epochs=3, verbose=0)
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "loss": history.history["loss"],
        "xla_traces": attention_core.experimental_get_tracing_count(),
    }))
""")


def test_mirrored_strategy_trains_with_the_xla_attention_core(run_config, tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    config = tiny_config(training={"learning_rate": 0.003})
    data = run_config["data"]["options"]["paths"]
    result = subprocess.run(
        [sys.executable, str(script), run_config["tokenizer"]["vocabulary"], json.dumps(config), data],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    assert report["xla_traces"] >= 1
    losses = report["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.3, losses
