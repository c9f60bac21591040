"""Workarounds for Keras 3's TensorFlow trainer and optimizer under tf.distribute.

Plain ``model.fit`` with Keras 3.15 on TensorFlow 2.21 fails with two or more
workers, and clips gradients wrongly with several replicas
(``tests/test_distribute.py`` reproduces all three with a plain Keras model):

1. ``_maybe_symbolic_build`` reduces a first batch to build the model's state
   with ``strategy.reduce("MEAN", batch, axis=None)``; under multi-worker
   collectives that reduces the whole nest at once and fails with "Attempt to
   convert a value (PerReplica ...) ... to a Tensor". The build needs only the
   batch's shapes and dtypes, which any one replica's part has. It also draws
   that batch under any strategy when nothing needs it (a kerasllm model is
   built when made, leaving only the optimizer): the input pipeline is then
   started twice, and a dataset that reshuffles on each start gives ``fit`` a
   different order of batches than on one device.
2. ``reduce_per_replica`` reduces each step's logs with
   ``strategy.reduce("MEAN", value, axis=0)``, which fails for the scalar logs
   every step returns: "Invalid reduction dimension 0 for input with 0
   dimensions". Returned from the step as shape ``(1,)``, they reduce across
   replicas along that axis to the mean a single-worker strategy reports.
3. The optimizer clips by ``global_clipnorm`` (or ``clipnorm``) before it sums
   the replicas' gradients, so each replica clips its own part with its own
   norm, and the update differs from one device's on the same batch. Clipping
   the sum, as tf.keras did, gives one device's update.

Each is a mixin; :class:`MultiWorkerWorkarounds`, a base of
:class:`kerasllm.KerasLLMModel`, combines the first two, and
:class:`ClipAfterAllReduce` is a base of kerasllm's optimizer. When the test reports that
Keras no longer needs one, delete it here; when it needs none, delete this
module and the base classes.
"""

import tensorflow as tf
from keras import tree

from kerasllm.distribute import in_multi_worker_mode


class SymbolicBuildWorkaround:
    """Workaround 1: build from one replica's part of the first batch, and draw
    no batch when nothing needs one."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self.distribute_strategy
        if iterator is not None and not self._needs_a_batch_to_build():
            iterator = None  # the optimizer alone is left to build
        elif iterator is not None and in_multi_worker_mode(strategy):
            for _, _, batches in iterator:
                data_batch = tree.map_structure(
                    lambda value: strategy.experimental_local_results(value)[0]
                    if isinstance(value, tf.distribute.DistributedValues) else value,
                    next(batches))
                break
            iterator = None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _needs_a_batch_to_build(self):
        unbuilt = [getattr(self, name, None) for name in ("_compile_metrics", "_compile_loss")]
        return not all(layer.built for layer in self._flatten_layers()) or \
            any(part is not None and not part.built for part in unbuilt)


class ScalarLogsWorkaround:
    """Workaround 2: a step's scalar logs as shape ``(1,)``."""

    def get_metrics_result(self):
        logs = super().get_metrics_result()
        # Inside a step (a replica context) the logs are about to be reduced; at an
        # epoch's end they are read as they are.
        replica = tf.distribute.get_replica_context()
        if replica is None or not in_multi_worker_mode(replica.strategy):
            return logs
        return tree.map_structure(
            lambda value: tf.reshape(value, [1]) if value.shape.rank == 0 else value, logs)


class MultiWorkerWorkarounds(SymbolicBuildWorkaround, ScalarLogsWorkaround):
    """Both workarounds, for :class:`kerasllm.KerasLLMModel`."""


class ClipAfterAllReduce:
    """Workaround 3, for an optimizer: clip the sum of the replicas' gradients."""

    def _clip_gradients(self, grads):
        if _replicas_in_step() > 1:
            return grads  # clipped once summed, in _all_reduce_sum_gradients
        return super()._clip_gradients(grads)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        summed = super()._all_reduce_sum_gradients(grads_and_vars)
        if _replicas_in_step() == 1:
            return summed
        variables = [variable for _, variable in summed]
        return list(zip(super()._clip_gradients([grad for grad, _ in summed]), variables))


def _replicas_in_step():
    replica = tf.distribute.get_replica_context()
    return replica.num_replicas_in_sync if replica is not None else 1
