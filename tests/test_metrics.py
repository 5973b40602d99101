"""Perplexity: hand-computed values, masking, accumulation, serialization, replicas."""

import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from kgpt.training.metrics import Perplexity


def log_softmax(logits):
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def reference_perplexity(y_true, logits, weight):
    nll = -np.take_along_axis(log_softmax(logits.astype("float64")), y_true[..., None], -1)[..., 0]
    return math.exp((nll * weight).sum() / weight.sum())


def random_batch(seed, batch=2, length=3, vocabulary_size=5):
    rng = np.random.RandomState(seed)
    y_true = rng.randint(0, vocabulary_size, (batch, length)).astype("int32")
    logits = rng.normal(size=(batch, length, vocabulary_size)).astype("float32")
    return y_true, logits


def test_uniform_logits_give_the_vocabulary_size():
    metric = Perplexity()
    metric.update_state(np.array([[0, 3, 31], [7, 7, 1]]), np.zeros((2, 3, 32), "float32"))
    assert float(metric.result()) == pytest.approx(32.0, rel=1e-6)


def test_hand_computed_value_with_masking():
    # Token 1: p(correct) = e^2 / (e^2 + 1 + 1); token 2: uniform over 3 -> nll log 3.
    y_true = np.array([[0, 2, 1]])
    logits = np.array([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1e4, -1e4, 0.0]]], "float32")
    weight = np.array([[1.0, 1.0, 0.0]])  # the third token is padding with terrible logits
    expected = math.exp((-(2 - math.log(math.exp(2) + 2)) + math.log(3)) / 2)
    metric = Perplexity()
    metric.update_state(y_true, logits, sample_weight=weight)
    assert float(metric.result()) == pytest.approx(expected, rel=1e-6)
    unmasked_only = Perplexity()
    unmasked_only.update_state(y_true[:, :2], logits[:, :2])
    assert float(unmasked_only.result()) == pytest.approx(expected, rel=1e-6)


def test_masked_tokens_with_infinite_nll_never_count():
    metric = Perplexity(from_logits=False)
    probabilities = np.array([[[0.5, 0.5], [1.0, 0.0]]], "float32")  # p(correct) = 0 at t=1
    metric.update_state(np.array([[0, 1]]), probabilities, sample_weight=np.array([[1.0, 0.0]]))
    assert float(metric.result()) == pytest.approx(2.0, rel=1e-6)


def test_per_sequence_sample_weight_broadcasts():
    y_true, logits = random_batch(0)
    metric = Perplexity()
    metric.update_state(y_true, logits, sample_weight=np.array([1.0, 0.0]))
    assert float(metric.result()) == pytest.approx(
        reference_perplexity(y_true[:1], logits[:1], np.ones((1, 3))), rel=1e-5
    )


def test_accumulates_tokens_not_batch_perplexities():
    (y1, p1), (y2, p2) = random_batch(1), random_batch(2, batch=3)
    w1, w2 = np.ones((2, 3)), np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1]], "float32")
    metric = Perplexity()
    metric.update_state(y1, p1, sample_weight=w1)
    metric.update_state(y2, p2, sample_weight=w2)
    concatenated = reference_perplexity(
        np.concatenate([y1, y2]), np.concatenate([p1, p2]), np.concatenate([w1, w2])
    )
    batch_mean = (reference_perplexity(y1, p1, w1) + reference_perplexity(y2, p2, w2)) / 2
    assert float(metric.result()) == pytest.approx(concatenated, rel=1e-5)
    assert abs(concatenated - batch_mean) > 1e-2 * concatenated  # the test can tell them apart


def test_low_precision_logits_are_scored_in_float32():
    y_true, logits = random_batch(3)
    metric = Perplexity()
    metric.update_state(y_true, keras.ops.cast(logits * 30, "float16"))  # large logits
    value = float(metric.result())
    assert np.isfinite(value)
    rounded = keras.ops.convert_to_numpy(keras.ops.cast(logits * 30, "float16")).astype("float32")
    assert value == pytest.approx(reference_perplexity(y_true, rounded, np.ones((2, 3))), rel=1e-4)


def test_no_tokens_gives_zero_and_reset_state_clears():
    y_true, logits = random_batch(4)
    metric = Perplexity()
    assert float(metric.result()) == 0.0
    metric.update_state(y_true, logits, sample_weight=np.zeros((2, 3)))
    assert float(metric.result()) == 0.0
    metric.update_state(y_true, logits)
    assert float(metric.result()) > 1.0
    metric.reset_state()
    assert float(metric.result()) == 0.0


def test_get_config_and_serialization_round_trip():
    metric = Perplexity(from_logits=False, name="val_ppl")
    restored = Perplexity.from_config(metric.get_config())
    deserialized = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(metric)
    )
    for other in (restored, deserialized):
        assert isinstance(other, Perplexity)
        assert other.get_config() == metric.get_config()
        assert other.name == "val_ppl" and other.from_logits is False


REPLICA_SCRIPT = r"""
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from kgpt.training.metrics import Perplexity
strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
with strategy.scope():
    metric = Perplexity()
rng = np.random.RandomState(0)
y = rng.randint(0, 8, (4, 5)).astype("int32")
logits = rng.normal(size=(4, 5, 8)).astype("float32")
weight = np.ones((4, 5), "float32"); weight[2:, 1:] = 0  # replica 1 sees far fewer tokens
data = tf.data.Dataset.from_tensor_slices((y, logits, weight)).batch(4)

@tf.function
def step(batch):
    def replica_fn(y, logits, weight):
        metric.update_state(y, logits, sample_weight=weight)
        return metric.result()
    return strategy.run(replica_fn, args=batch)

for batch in strategy.experimental_distribute_dataset(data):
    in_replica = [float(v) for v in strategy.experimental_local_results(step(batch))]
single = Perplexity()
single.update_state(y, logits, sample_weight=weight)
halves = [Perplexity(), Perplexity()]
halves[0].update_state(y[:2], logits[:2], sample_weight=weight[:2])
halves[1].update_state(y[2:], logits[2:], sample_weight=weight[2:])
print("RESULT", float(single.result()), float(metric.result()), *in_replica,
      float(halves[0].result()), float(halves[1].result()))
"""


@pytest.mark.distributed
def test_replicas_aggregate_to_the_single_device_value():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run(
        [sys.executable, "-c", REPLICA_SCRIPT],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT"))
    single, cross_replica, replica0, replica1, half0, half1 = map(float, line.split()[1:])
    # Read outside the replicas, inside each replica: all equal the one-device value...
    assert cross_replica == pytest.approx(single, rel=1e-6)
    assert replica0 == pytest.approx(single, rel=1e-6)
    assert replica1 == pytest.approx(single, rel=1e-6)
    # ...which is not what averaging per-replica perplexities would give.
    assert abs((half0 + half1) / 2 - single) > 1e-2 * single
