"""WarmupCosine: closed-form values, edge cases, argument errors, serialization."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kgpt.training.schedule import WarmupCosine

PEAK, FLOOR, WARMUP, DECAY = 1e-3, 1e-4, 10, 110


def closed_form(step):
    if step < WARMUP:
        return PEAK * step / WARMUP
    progress = min((step - WARMUP) / (DECAY - WARMUP), 1.0)
    return FLOOR + 0.5 * (1 + math.cos(math.pi * progress)) * (PEAK - FLOOR)


@pytest.fixture
def schedule():
    return WarmupCosine(PEAK, warmup_steps=WARMUP, decay_steps=DECAY, min_learning_rate=FLOOR)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),  # warmup start
        (5, PEAK / 2),  # mid-warmup
        (10, PEAK),  # peak
        (60, FLOOR + (PEAK - FLOOR) / 2),  # mid-decay: cos(pi / 2) = 0
        (110, FLOOR),  # floor
        (111, FLOOR),  # after decay
        (10_000, FLOOR),
    ],
)
def test_values_equal_closed_form(schedule, step, expected):
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert closed_form(step) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_every_step_matches_closed_form_with_int_and_float_steps(schedule):
    steps = np.arange(0, 130)
    expected = np.array([closed_form(s) for s in steps])
    for dtype in ("int64", "float32"):
        values = keras.ops.convert_to_numpy(schedule(keras.ops.convert_to_tensor(steps, dtype)))
        np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-10)


def test_runs_inside_tf_function_and_xla(schedule):
    compiled = tf.function(schedule, jit_compile=True)
    for step in (0, 5, 60, 200):
        got = float(compiled(tf.constant(step, tf.int64)))
        assert got == pytest.approx(closed_form(step), rel=1e-6, abs=1e-12)


def test_zero_warmup_starts_at_peak():
    schedule = WarmupCosine(PEAK, warmup_steps=0, decay_steps=100, min_learning_rate=FLOOR)
    assert float(schedule(0)) == pytest.approx(PEAK)
    assert float(schedule(50)) == pytest.approx(FLOOR + (PEAK - FLOOR) / 2)
    assert float(schedule(100)) == pytest.approx(FLOOR)


def test_decay_equal_to_warmup_goes_from_peak_to_floor():
    schedule = WarmupCosine(PEAK, warmup_steps=10, decay_steps=10, min_learning_rate=FLOOR)
    values = [float(schedule(s)) for s in (5, 10, 11)]
    assert values == pytest.approx([PEAK / 2, PEAK, FLOOR])
    assert np.isfinite(float(WarmupCosine(PEAK, 0, 0)(0)))


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (dict(warmup_steps=-1, decay_steps=10), "warmup_steps=-1"),
        (dict(warmup_steps=1, decay_steps=-10), "decay_steps=-10"),
        (dict(warmup_steps=1.5, decay_steps=10), "warmup_steps=1.5"),
        (dict(warmup_steps=20, decay_steps=10), "decay_steps=10 is smaller than warmup_steps"),
        (dict(warmup_steps=1, decay_steps=10, min_learning_rate=2e-3), "min_learning_rate"),
        (dict(warmup_steps=1, decay_steps=10, learning_rate=-1.0), "learning_rate=-1.0"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, names):
    kwargs = {"learning_rate": PEAK, **kwargs}
    with pytest.raises(ValueError, match=names):
        WarmupCosine(**kwargs)


def test_get_config_and_keras_serialization_round_trip(schedule):
    restored = WarmupCosine.from_config(schedule.get_config())
    serialized = keras.saving.serialize_keras_object(schedule)
    deserialized = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(deserialized, WarmupCosine)
    assert deserialized.get_config() == restored.get_config() == schedule.get_config()
    for step in (0, 5, 60, 200):
        assert float(deserialized(step)) == float(restored(step)) == float(schedule(step))


def test_round_trip_inside_adamw_in_a_keras_file(schedule, tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=schedule), loss="mse")
    model.fit(np.ones((8, 2)), np.ones((8, 1)), batch_size=2, epochs=1, verbose=0)  # 4 steps
    path = tmp_path / "model.keras"
    model.save(path)
    optimizer = keras.saving.load_model(path).optimizer
    restored = keras.saving.deserialize_keras_object(optimizer.get_config()["learning_rate"])
    assert isinstance(restored, WarmupCosine)
    assert restored.get_config() == schedule.get_config()
    assert int(optimizer.iterations) == 4
    assert float(optimizer.learning_rate) == pytest.approx(closed_form(4), rel=1e-6)
