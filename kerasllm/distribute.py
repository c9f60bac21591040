"""Training on tf.distribute: the strategy a config names, the global batch split
over workers and replicas, losses averaged over the global batch, and which
worker writes the run's files.

``data.batch_size`` is the global batch: each optimizer step sees that many rows
whatever the strategy. With ``R`` replicas in sync (all workers together) and
``K`` gradient-accumulation steps, each replica computes ``batch_size / R`` rows
per step, ``batch_size / (R * K)`` at a time. Each worker's input pipeline reads
its own shard of the examples (every ``W``-th document of ``W`` workers).
"""

import contextlib
import json
import os
import threading

import tensorflow as tf

from kerasllm.config import STRATEGIES
from kerasllm.errors import ConfigError


def make_strategy(name, devices=None, tpu=None):
    """The ``tf.distribute.Strategy`` of ``training.strategy``.

    ``auto``: TPUStrategy when ``tpu`` (or ``TPU_NAME``) names a TPU,
    MultiWorkerMirroredStrategy when ``TF_CONFIG`` lists several tasks,
    MirroredStrategy over several GPUs, else None: no strategy, one device.
    ``devices``: for ``one_device`` (the first) and ``mirrored`` (all), e.g.
    ``["GPU:0", "GPU:1"]``; default: every GPU, or the CPU.

    MultiWorkerMirroredStrategy must be created before TensorFlow runs any op:
    make the strategy first thing in a program.
    """
    if name == "auto":
        name = _automatic()
        if name is None:
            return None
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(devices[0] if devices else _devices()[0])
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices or None)
    if name == "multi_worker_mirrored":
        if not _cluster_tasks():
            raise ConfigError(
                "training.strategy multi_worker_mirrored needs TF_CONFIG, the cluster and "
                "this worker's place in it, e.g. TF_CONFIG='{\"cluster\": {\"worker\": "
                "[\"host1:12345\", \"host2:12345\"]}, \"task\": {\"type\": \"worker\", "
                "\"index\": 0}}' (see the README's \"Training on several machines\")")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=tpu or os.environ.get("TPU_NAME", ""))
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ConfigError(f"unknown training.strategy '{name}'; known: {', '.join(STRATEGIES)}")


def in_multi_worker_mode(strategy):
    """Whether ``strategy`` runs collectives across several worker processes."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and \
        strategy.extended._in_multi_worker_mode()


def _automatic():
    if os.environ.get("TPU_NAME"):
        return "tpu"
    if len(_cluster_tasks()) > 1:
        return "multi_worker_mirrored"
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return "mirrored"
    return None


def _cluster_tasks():
    cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
    return [address for addresses in cluster.values() for address in addresses]


def _devices():
    gpus = tf.config.list_logical_devices("GPU")
    return [device.name for device in gpus] or ["/cpu:0"]


def is_chief(strategy):
    """Whether this worker writes the run's files: checkpoints, logs, the model.

    In a multi-worker cluster, the ``chief`` task, or worker 0 if there is none.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if strategy is None or not in_multi_worker_mode(strategy) or resolver is None:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and \
        "chief" not in resolver.cluster_spec().as_dict()


def replica_batch_size(strategy, batch_size, accumulation_steps=1):
    """Rows per replica per step; the global batch must split evenly."""
    replicas = _replicas(strategy)
    split = replicas * accumulation_steps
    if batch_size % split:
        raise ConfigError(
            f"data.batch_size ({batch_size}) is the global batch: it must be a multiple of "
            f"the {replicas} replica(s) in sync times training.gradient_accumulation_steps "
            f"({accumulation_steps}); try {split * max(1, round(batch_size / split))}")
    return batch_size // replicas


def describe(strategy, batch_size, accumulation_steps=1):
    """One line of batch arithmetic for the log; the batch must split evenly."""
    per_replica = replica_batch_size(strategy, batch_size, accumulation_steps)
    replicas = _replicas(strategy)
    workers = strategy.extended._num_workers if strategy and in_multi_worker_mode(strategy) \
        else 1
    if strategy is None:
        line = f"No distribution strategy (one device): batch {batch_size}"
    else:
        line = (f"Strategy {strategy_name(strategy)}: {workers} worker(s), {replicas} "
                f"replica(s) in sync; global batch {batch_size} = {replicas} x {per_replica} "
                "rows per replica")
    if accumulation_steps > 1:
        line += (f", each in {accumulation_steps} micro-batches of "
                 f"{per_replica // accumulation_steps}")
    return line


def strategy_name(strategy):
    """The ``training.strategy`` value that makes ``strategy``."""
    for name, kind in (("multi_worker_mirrored", tf.distribute.MultiWorkerMirroredStrategy),
                       ("mirrored", tf.distribute.MirroredStrategy),
                       ("one_device", tf.distribute.OneDeviceStrategy),
                       ("tpu", tf.distribute.TPUStrategy)):
        if isinstance(strategy, kind):
            return name
    return type(strategy).__name__


def distribute_batches(strategy, make_batches, batch_size):
    """Training batches for ``fit`` under ``strategy``.

    ``make_batches(rows, input_context)`` returns one input pipeline's dataset
    of ``rows``-row batches, sharded by ``input_context`` (None without a
    strategy): each replica takes its own batch, so a pipeline feeding ``n``
    replicas yields ``n`` batches per step, in replica order.
    """
    if strategy is None:
        return make_batches(batch_size, None)
    return strategy.distribute_datasets_from_function(
        lambda context: make_batches(context.get_per_replica_batch_size(batch_size), context))


def _replicas(strategy):
    return strategy.num_replicas_in_sync if strategy else 1


def replicas_per_pipeline(input_context):
    """Batches a pipeline yields per step: one per replica it feeds."""
    if input_context is None:
        return 1
    return input_context.num_replicas_in_sync // input_context.num_input_pipelines


_loss_state = threading.local()


@contextlib.contextmanager
def global_batch_losses():
    """While a step computes the losses it differentiates, averages taken with
    :func:`loss_denominator` are over the global batch, not over each replica's
    part of it. Metrics computed outside it stay per replica: an all-reduce
    inside a branch that only some replicas take would deadlock."""
    previous = getattr(_loss_state, "active", False)
    _loss_state.active = True
    try:
        yield
    finally:
        _loss_state.active = previous


def loss_denominator(total):
    """The denominator of a weighted mean whose weights sum to ``total`` here.

    One device: ``max(total, 1)``. Under :func:`global_batch_losses` with ``R``
    replicas: the global ``max(sum of totals, 1) / R``. Each replica's loss is
    then ``R`` times its share of the global mean, so the replica losses
    ``fit`` averages, and the gradients it sums after dividing by ``R``, are
    those of one device on the whole batch, even when replicas have different
    counts (masked tokens, document boundaries).
    """
    replica = tf.distribute.get_replica_context()
    if not getattr(_loss_state, "active", False) or replica is None or \
            replica.num_replicas_in_sync == 1:
        return tf.maximum(total, 1.0)
    total = replica.all_reduce(tf.distribute.ReduceOp.SUM, tf.stop_gradient(total))
    return tf.maximum(total, 1.0) / replica.num_replicas_in_sync
