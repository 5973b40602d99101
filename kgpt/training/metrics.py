"""`Perplexity`: exp of the weighted mean token negative log-likelihood, as a stateful metric.

It keeps two sums (weighted NLL and weight), so it is exact over any number of batches and
replicas: not the mean of per-batch perplexities, and not 2**loss (the loss is in nats).
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kgpt")
class Perplexity(keras.metrics.Metric):
    """Token-level perplexity `exp(sum(w * nll) / sum(w))` from next-token logits.

    A token with `sample_weight` 0 never counts, whatever its logits (even an infinite NLL). The
    NLL is computed in float32, so bfloat16 / float16 logits are safe. The two sums are Keras'
    on-read metric variables, summed over replicas and workers when read outside a replica;
    inside one (Keras' `train_step` logs), `result()` all-reduces them first. `result()` is 0.0
    while no token has weight (a real perplexity is >= 1), as `keras.metrics.Mean` gives 0.

    Args:
        from_logits: `y_pred` holds logits (default); `False` means probabilities.
        dtype: dtype of the result (the sums are always float32).

    Example:
        model.compile(optimizer, loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True), metrics=[Perplexity()])
    """

    def __init__(self, from_logits=True, name="perplexity", dtype=None, **kwargs):
        super().__init__(name=name, dtype=dtype, **kwargs)
        self.from_logits = from_logits
        self.total_nll = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="total_nll"
        )
        self.total_weight = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="total_weight"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.cast(y_true, "int32")
        y_pred = ops.cast(y_pred, "float32")
        # (batch, length)
        nll = ops.sparse_categorical_crossentropy(y_true, y_pred, from_logits=self.from_logits)
        if sample_weight is None:
            weight = ops.ones_like(nll)
        else:
            weight = ops.cast(sample_weight, "float32")
            # (batch,) -> (batch, 1) and so on, then broadcast to (batch, length).
            while len(weight.shape) < len(nll.shape):
                weight = ops.expand_dims(weight, -1)
            weight = ops.broadcast_to(weight, ops.shape(nll))
        # `where`, not just `nll * weight`: 0 * inf would be NaN.
        weighted = ops.where(weight > 0, nll * weight, ops.zeros_like(nll))
        self.total_nll.assign_add(ops.sum(weighted))
        self.total_weight.assign_add(ops.sum(weight))

    def result(self):
        total_nll = ops.convert_to_tensor(self.total_nll)
        total_weight = ops.convert_to_tensor(self.total_weight)
        total_nll, total_weight = _sum_over_replicas(total_nll, total_weight)
        mean_nll = ops.divide(total_nll, ops.maximum(total_weight, 1e-12))
        perplexity = ops.where(total_weight > 0, ops.exp(mean_nll), ops.zeros_like(mean_nll))
        return ops.cast(perplexity, self.dtype)

    def get_config(self):
        return {**super().get_config(), "from_logits": self.from_logits}


def _sum_over_replicas(*values):
    """Inside a `tf.distribute` replica: the values summed over all replicas; else unchanged.

    Reading an on-read variable inside a replica gives only that replica's part.
    """
    if keras.backend.backend() != "tensorflow":
        return values
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values  # cross-replica reads are already summed; one replica has nothing to add
    # tf.identity places each value on this replica's device: the all-reduce sends to the
    # devices of its inputs, and under MultiWorkerMirroredStrategy a variable read inside
    # `tf.function` carries none ("destinations can not be empty").
    return tuple(context.all_reduce("SUM", [tf.identity(value) for value in values]))
