"""tf.distribute: MirroredStrategy over two logical CPUs and MultiWorkerMirroredStrategy
over two worker processes on localhost, each equal to one device on the same global
batches; a worker killed mid-epoch and the run resumed; Keras' multi-worker bugs."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf
import yaml

import kerasllm
from conftest import tiny_config
from kerasllm.distribute import make_strategy, replica_batch_size
from kerasllm.errors import ConfigError

# Two logical CPU devices must be configured before TensorFlow starts.
TWO_CPUS = """
import tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
"""

# One device trained on the global batches MirroredStrategy over two replicas and a
# two-worker cluster see; then the command line under MirroredStrategy over both
# CPUs. (In that order: one-device training after a MirroredStrategy job in the
# same process took ten times longer.)
REFERENCE_SCRIPT = TWO_CPUS + textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    import kerasllm
    from kerasllm import jobs
    from kerasllm.builder import build_tokenizer
    from kerasllm.cli import main
    from kerasllm.config import load_config
    from kerasllm.layers import attention_core
    from kerasllm.plugins import get_registry

    config = load_config(sys.argv[1])

    def one_device(pipelines, replicas):
        # Pipeline i of n feeds replicas/n replicas, one per-replica batch each per step.
        keras.utils.set_random_seed(config.training.seed)
        registry = get_registry()
        model = kerasllm.build_model(config, build_tokenizer(config, registry))
        _, splits = jobs._sources(config, registry)
        rows = config.data.batch_size // replicas
        shards = [jobs.training_batches(model, config, splits, batch_size=rows,
                                        input_context=tf.distribute.InputContext(
                                            pipelines, i, replicas))
                  for i in range(pipelines)]
        per_step = replicas // pipelines
        steps = tf.data.Dataset.zip(tuple(
            shard.batch(per_step, drop_remainder=True) for shard in shards))
        batches = steps.map(lambda *parts: tf.nest.map_structure(
            lambda *values: tf.concat([piece for value in values
                                       for piece in tf.unstack(value, num=per_step)], 0),
            *parts))
        initial = [weight.numpy() for weight in model.weights]
        model.fit(batches, steps_per_epoch=config.training.steps, verbose=0)
        return initial, [weight.numpy() for weight in model.weights]

    initial, mirrored = one_device(pipelines=1, replicas=2)
    _, two_workers = one_device(pipelines=2, replicas=2)
    for name, values in (("initial", initial), ("mirrored", mirrored),
                         ("two_workers", two_workers)):
        np.savez(f"{sys.argv[2]}/{name}.npz", *values)

    traces = attention_core.experimental_get_tracing_count()
    code = main(["pretrain", sys.argv[3], "--strategy", "mirrored",
                 "--output", f"{sys.argv[2]}/mirrored-run"])
    print(json.dumps({"code": code,
                      "xla_traces": attention_core.experimental_get_tracing_count() - traces}))
""")


# A worker as a user starts one, through the job, killing itself (kill -9) at a step.
WORKER_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import keras
    from kerasllm import jobs
    from kerasllm.layers import attention_core

    config, output, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])

    class KillAt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    result = jobs.pretrain(config, output=output, verbose=0,
                           callbacks=[KillAt()] if kill_at else [])
    print(json.dumps({"step": result["step"],
                      "xla_traces": attention_core.experimental_get_tracing_count()}))
""")

# Plain Keras under two workers, with none, some or all of kerasllm's workarounds.
# Worker i's rows are the unit vector e_i, its targets 1: from a zero kernel, the
# global batch's gradient is (-1, -1, 0), whose norm clips to 0.1.
UPSTREAM_SCRIPT = textwrap.dedent("""
    import json, os
    import keras, numpy as np, tensorflow as tf
    from kerasllm.keras_workarounds import (
        ClipAfterAllReduce, ScalarLogsWorkaround, SymbolicBuildWorkaround)

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    worker = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    class ClippingSGD(ClipAfterAllReduce, keras.optimizers.SGD):
        pass
    variants = {
        "none": ((), keras.optimizers.SGD),
        "symbolic_build": ((SymbolicBuildWorkaround,), keras.optimizers.SGD),
        "logs": ((SymbolicBuildWorkaround, ScalarLogsWorkaround), keras.optimizers.SGD),
        "all": ((SymbolicBuildWorkaround, ScalarLogsWorkaround), ClippingSGD),
    }
    rows = np.eye(3, dtype="float32")[[worker, worker]]
    batches = strategy.distribute_datasets_from_function(
        lambda context: tf.data.Dataset.from_tensors((rows, np.ones((2, 1), "float32"))).repeat())
    report = {}
    for name, (mixins, optimizer) in variants.items():
        with strategy.scope():
            model = type(name, (*mixins, keras.Sequential), {})([
                keras.Input((3,)),
                keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
            model.compile(optimizer=optimizer(1.0, global_clipnorm=0.1), loss="mse")
        try:
            model.fit(batches, steps_per_epoch=1, verbose=0)
            report[name] = model.get_weights()[0][:, 0].tolist()
        except Exception as error:
            report[name] = str(error)[:300]
    print(json.dumps(report))
""")


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    with contextlib.ExitStack() as stack:
        for sock in sockets:
            stack.enter_context(sock)
            sock.bind(("localhost", 0))
        return [sock.getsockname()[1] for sock in sockets]


def run_cluster(commands, folder, timeout=300):
    """Run one command per worker of a localhost cluster (TF_CONFIG, free ports).

    When a worker dies of SIGKILL the others are killed too, as a scheduler
    restarting a job would; every process is killed by the end, whatever
    happens. Returns each worker's (return code, output).
    """
    folder.mkdir(parents=True, exist_ok=True)
    addresses = [f"localhost:{port}" for port in free_ports(len(commands))]
    processes, logs = [], []
    try:
        for index, command in enumerate(commands):
            log = open(folder / f"worker-{index}.log", "w")
            logs.append(log)
            tf_config = {"cluster": {"worker": addresses},
                         "task": {"type": "worker", "index": index}}
            processes.append(subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "TF_CONFIG": json.dumps(tf_config),
                     "TF_CPP_MIN_LOG_LEVEL": "2"}))
        deadline = time.monotonic() + timeout
        while any(process.poll() is None for process in processes):
            if any(process.returncode == -signal.SIGKILL for process in processes):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the cluster ran past {timeout} s; logs in {folder}")
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        for log in logs:
            log.close()
    return [(process.returncode, (folder / f"worker-{index}.log").read_text())
            for index, process in enumerate(processes)]


def last_json(output):
    """The report a script printed last; TensorFlow may log after it, at exit."""
    return json.loads(next(line for line in reversed(output.splitlines())
                           if line.startswith("{")))


def weights(path):
    return [weight.numpy() for weight in kerasllm.load_model(path).weights]


@pytest.fixture(scope="module")
def cluster_config(tmp_path_factory, tokenizer, documents):
    """A YAML config: a tiny decoder, clm (whose batches are deterministic),
    dropout off, global batch 8, 20 steps in epochs of 5, a checkpoint each."""
    folder = tmp_path_factory.mktemp("distribute")
    (folder / "corpus.txt").write_text("\n\n".join(documents))
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for t in tokenizer.get_vocabulary()))
    config = tiny_config(
        model={"kind": "decoder", "norm_first": True, "pooler": False},
        objectives=[{"name": "clm"}],
        tokenizer={"vocabulary": str(folder / "vocab.txt")},
        data={"source": "text", "options": {"paths": str(folder / "corpus.txt"),
                                            "mode": "document"},
              "batch_size": 8, "eval_batches": 2, "shuffle_buffer": 64},
        training={"steps": 20, "steps_per_epoch": 5, "checkpoint_every": 5,
                  "keep_checkpoints": 2, "learning_rate": 0.003, "warmup_steps": 5})
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def references(cluster_config):
    """One device's weights before and after training on the global batches of
    two replicas (``mirrored``) and of two workers (``two_workers``); and the
    output of ``kerasllm pretrain --strategy mirrored`` over two CPUs."""
    folder = cluster_config.parent
    script = folder / "reference.py"
    script.write_text(REFERENCE_SCRIPT)
    config = yaml.safe_load(cluster_config.read_text())
    config["training"]["devices"] = ["CPU:0", "CPU:1"]
    (folder / "mirrored.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, str(script), str(cluster_config), str(folder),
                             str(folder / "mirrored.yaml")],
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"mirrored_run": (folder / "mirrored-run", result.stdout),
            **{name: list(np.load(folder / f"{name}.npz").values())
               for name in ("initial", "mirrored", "two_workers")}}


def test_mirrored_over_two_cpus_equals_one_device_with_xla_attention(references):
    run, output = references["mirrored_run"]
    assert last_json(output)["code"] == 0
    assert "Strategy mirrored: 1 worker(s), 2 replica(s) in sync; global batch 8 = 2 x 4 " \
           "rows per replica" in output
    assert last_json(output)["xla_traces"] >= 1  # attention compiled under the strategy
    trained = weights(run)
    moved = max(np.abs(a - b).max() for a, b in zip(trained, references["initial"]))
    assert moved > 1e-2  # training changed the weights, exactly as on one device:
    for got, expected in zip(trained, references["mirrored"], strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_two_workers_resume_after_a_kill_and_equal_one_device(cluster_config, references,
                                                              tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    output = tmp_path / "run"

    # Worker 1 is killed (SIGKILL) at step 13, mid-epoch; the scheduler kills the rest.
    crashed = run_cluster([[sys.executable, str(script), str(cluster_config), str(output), kill]
                           for kill in ("0", "13")], tmp_path / "logs-crashed")
    assert crashed[1][0] == -signal.SIGKILL
    assert "Strategy multi_worker_mirrored: 2 worker(s), 2 replica(s) in sync; global " \
           "batch 8 = 2 x 4 rows per replica" in crashed[0][1]
    assert (output / "checkpoints" / "latest").read_text() == "ckpt-000000010"
    assert not (output / "model.keras").exists()

    # The same command again: both resume from step 10 and finish as if never stopped,
    # equal to one device trained on the two workers' global batches.
    rerun = run_cluster([[sys.executable, str(script), str(cluster_config), str(output), "0"]
                         for _ in range(2)], tmp_path / "logs-rerun")
    for code, log in rerun:
        assert code == 0, log[-3000:]
        assert "Resuming from step 10" in log
        assert last_json(log)["step"] == 20
        assert last_json(log)["xla_traces"] >= 1  # attention compiled under the strategy
    for got, expected in zip(weights(output), references["two_workers"], strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5)
    # Only the chief writes: one model, one set of checkpoints (the last 2), one log folder.
    assert sorted(p.name for p in output.iterdir()) == ["checkpoints", "logs", "model.keras"]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == \
        ["ckpt-000000015", "ckpt-000000020", "latest"]


def test_keras_still_needs_the_distribute_workarounds(tmp_path):
    """Fails when a Keras release fixes a bug: then delete that workaround from
    kerasllm/keras_workarounds.py (or the module, once neither is needed)."""
    script = tmp_path / "upstream.py"
    script.write_text(UPSTREAM_SCRIPT)
    runs = run_cluster([[sys.executable, str(script)]] * 2, tmp_path / "logs", timeout=180)
    for code, output in runs:
        assert code == 0, output[-3000:]
    report = last_json(runs[0][1])
    clipped = [0.1 / 2 ** 0.5] * 2 + [0.0]  # one device's update: the whole gradient clipped
    np.testing.assert_allclose(report["all"], clipped, rtol=1e-5)
    assert "Attempt to convert a value (PerReplica" in report["none"], (
        "Keras now builds under MultiWorkerMirroredStrategy: delete "
        "SymbolicBuildWorkaround", report)
    assert "Invalid reduction dimension 0 for input with 0 dimensions" in \
        report["symbolic_build"], (
            "Keras now reduces scalar logs across workers: delete ScalarLogsWorkaround", report)
    assert not np.allclose(report["logs"], clipped), (
        "Keras now clips the summed gradients: delete ClipAfterAllReduce", report)
    np.testing.assert_allclose(report["logs"], [0.1, 0.1, 0.0], rtol=1e-5)  # each clipped alone


def test_strategy_and_batch_errors_say_what_to_fix(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("TPU_NAME", raising=False)
    with pytest.raises(ConfigError, match="multi_worker_mirrored needs TF_CONFIG"):
        make_strategy("multi_worker_mirrored")
    if len(tf.config.list_logical_devices("GPU")) < 2:
        assert make_strategy("auto") is None  # one device: no strategy at all
    one = make_strategy("one_device")
    assert one.num_replicas_in_sync == 1
    assert replica_batch_size(one, 32, 4) == 32
    with pytest.raises(ConfigError, match=r"data.batch_size \(30\) is the global batch: it "
                                          r"must be a multiple of the 1 replica\(s\) in sync "
                                          r"times training.gradient_accumulation_steps \(4\)"):
        replica_batch_size(one, 30, 4)
