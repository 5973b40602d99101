"""Distribution: choosing the `tf.distribute` strategy and making Keras 3 correct under it.

Two fixes for what Keras 3.15 gets wrong, through `kgpt.keras_compat`: `AdamW` clips the gradients
summed across replicas (Keras clips each replica's own before the sum), and
`enable_multi_worker_fit` makes `fit` run under MultiWorkerMirroredStrategy (keras-team/keras#20585).
"""

import os
import types

import keras
import tensorflow as tf

from kgpt import keras_compat


def make_strategy(name):
    """The `train.strategy` named `auto` (mirrored on >1 GPU), `default`, `mirrored` or `multiworker`."""
    if name == "auto":
        name = "mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if "TF_CONFIG" not in os.environ:
        raise ValueError(
            'train.strategy = "multiworker" needs the TF_CONFIG environment variable describing '
            "the cluster and this worker's task (see the README); set it on every worker."
        )
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_multi_worker(strategy):
    """True for a MultiWorkerMirroredStrategy that spans more than one worker."""
    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and keras_compat.in_multi_worker_mode(strategy)


def worker_index(strategy):
    """This process's index among the workers (0 on a single machine)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not is_multi_worker(strategy):
        return 0
    return int(resolver.task_id or 0)


def _replicas():
    context = tf.distribute.get_replica_context()
    return context.num_replicas_in_sync if context is not None else 1


@keras.saving.register_keras_serializable(package="kgpt")
class AdamW(keras.optimizers.AdamW):
    """Keras' AdamW with global-norm clipping after the cross-replica gradient sum (one device: Keras')."""

    def _clip_gradients(self, grads):
        if _replicas() > 1:
            return grads  # clipped in _all_reduce_sum_gradients, once summed
        return super()._clip_gradients(grads)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        grads_and_vars = list(super()._all_reduce_sum_gradients(grads_and_vars))
        if _replicas() > 1 and self.global_clipnorm:
            present = [(g, v) for g, v in grads_and_vars if g is not None]
            clipped, _ = tf.clip_by_global_norm([g for g, _ in present], self.global_clipnorm)
            by_variable = {id(v): g for (_, v), g in zip(present, clipped)}
            grads_and_vars = [(by_variable.get(id(v), g), v) for g, v in grads_and_vars]
        return grads_and_vars


def _first_local_replica(value):
    return value.values[0] if isinstance(value, tf.distribute.DistributedValues) else value


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    # Keras only needs an example batch's shapes and dtypes here; take this worker's first
    # replica's batch: `strategy.reduce` of the whole (x, y) nest fails across workers.
    if iterator is not None and keras_compat.distribute_strategy(self) is not None:
        for _, _, step_iterator in iterator:
            data_batch = keras.tree.map_structure(_first_local_replica, next(step_iterator))
            break
        iterator = None
    return keras_compat.symbolic_build(self, iterator=iterator, data_batch=data_batch)


def _as_vectors(logs):
    # Multi-worker log reduction is strategy.reduce("MEAN", v, axis=0): give it (1,) vectors,
    # and it returns the scalar mean over all replicas, the same on every worker.
    return keras.tree.map_structure(lambda v: tf.reshape(v, (1,)), logs)


def _train_step(self, data):
    return _as_vectors(type(self).train_step(self, data))


def _test_step(self, data):
    return _as_vectors(type(self).test_step(self, data))


def enable_multi_worker_fit(model):
    """Lets `model.fit` / `evaluate` run under a multi-worker strategy; call it after `compile`.

    Rebinds three methods on this model instance only (class, config and saved files unchanged);
    returns `model`.
    """
    keras_compat.replace_symbolic_build(model, _maybe_symbolic_build)
    model.train_step = types.MethodType(_train_step, model)
    model.test_step = types.MethodType(_test_step, model)
    return model
