import os
import re
import threading
import time

import keras
import numpy as np
import pytest

from kgpt.model.gpt import build_model
from kgpt.model.saving import save_model
from kgpt.rundir import backup_state
from kgpt.training.callbacks import (
    ResumableEarlyStopping,
    RunBackup,
    ThroughputLogger,
    evaluations_since_best,
    patience_spent,
)


def test_evaluations_since_best():
    assert evaluations_since_best([]) == 0
    assert evaluations_since_best([3.0]) == 0
    assert evaluations_since_best([3.0, 2.0, 2.5, 2.0]) == 2  # a tie is no improvement
    assert evaluations_since_best([3.0, 2.5, 1.0]) == 0


def _tiny_model():
    model = build_model(dict(vocabulary_size=8, sequence_length=4, num_layers=1, num_heads=1, hidden_dim=4))
    model(np.zeros((1, 4), "int32"))
    return model


def test_resumed_early_stopping_keeps_its_wait_and_restores_the_checkpointed_best(tmp_path):
    best = _tiny_model()
    save_model(best, str(tmp_path / "best.keras"))
    model = _tiny_model()  # other weights: the run's latest
    callback = ResumableEarlyStopping(2, [3.0, 2.0, 2.5], best_path=str(tmp_path / "best.keras"))
    callback.set_model(model)
    callback.on_train_begin()
    assert (callback.best, callback.best_epoch, callback.wait) == (2.0, 1, 1)
    callback.on_epoch_end(3, {"val_loss": 2.6})  # the second evaluation without improvement
    assert model.stop_training
    callback.on_train_end()
    for restored, expected in zip(model.get_weights(), best.get_weights()):
        np.testing.assert_array_equal(restored, expected)


def test_patience_spent_before_the_resume():
    assert patience_spent([3.0, 2.0, 2.5, 2.5], 2)
    assert not patience_spent([3.0, 2.0, 2.5], 2)
    assert not patience_spent([3.0], 1)  # Keras never stops at the first evaluation


def test_sample_text_continues_the_prompt_at_each_evaluation(capsys):
    from kgpt.tokenizers.char import train_characters
    from kgpt.training.callbacks import SampleText

    tokenizer = train_characters(["the cat sat on the mat.\n"])
    model = build_model(
        dict(vocabulary_size=tokenizer.vocabulary_size, sequence_length=16, num_layers=1,
             num_heads=1, hidden_dim=8)
    )
    # A prompt longer than the context keeps its end; the sample goes on past the context.
    callback = SampleText(tokenizer, "the cat sat on the mat", max_new_tokens=40, seed=1)
    callback.set_model(model)
    sample = callback.sample()
    assert sample.startswith("the cat sat on the mat")
    assert 15 < len(sample) - len("the cat sat on the mat") <= 40
    assert callback.sample() == sample  # the same seed at every evaluation
    callback.on_epoch_end(0)
    assert f"--- sample after evaluation 1 ---\n{sample}\n---" in capsys.readouterr().out


def _fit_with_samples(warm_up, capsys):
    """Losses and printed output of a seeded 2-evaluation `fit` with a `SampleText`."""
    from kgpt.tokenizers.char import train_characters
    from kgpt.training.callbacks import SampleText

    tokenizer = train_characters(["the cat sat on the mat.\n"])
    keras.utils.set_random_seed(3)
    model = build_model(
        dict(vocabulary_size=tokenizer.vocabulary_size, sequence_length=8, num_layers=1,
             num_heads=1, hidden_dim=8)
    )
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=2)
    ids = np.random.default_rng(0).integers(0, tokenizer.vocabulary_size, (32, 9)).astype("int32")
    sample_text = SampleText(tokenizer, "the ", max_new_tokens=12, seed=1, warm_up=warm_up)
    history = model.fit(ids[:, :-1], ids[:, 1:], batch_size=4, epochs=2, validation_data=(ids[:8, :-1], ids[:8, 1:]),
                        shuffle=False, callbacks=[sample_text], verbose=0)
    return history.history, capsys.readouterr().out


@pytest.mark.slow  # two fits, each tracing a train step and a decode loop
def test_sample_text_traces_its_first_sample_in_the_background_with_the_same_output(capsys, monkeypatch):
    from kgpt.generation import decoder

    traced_in = []  # the Python decode loop runs only while its program is traced

    def decode(*args, **kwargs):
        traced_in.append(threading.current_thread().name)
        return original(*args, **kwargs)

    original = decoder.decode
    monkeypatch.setattr(decoder, "decode", decode)
    warm = _fit_with_samples(True, capsys)
    assert traced_in == ["kgpt-sample"]  # traced once, in the warm-up thread, not after the evaluation
    traced_in.clear()
    cold = _fit_with_samples(False, capsys)
    assert traced_in == ["MainThread"]
    assert warm == cold  # the same losses to the last bit, and the same samples printed
    assert warm[1].count("--- sample after evaluation") == 2


def _regression():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    return model


class _Steps(keras.callbacks.Callback):
    """The optimizer step at each evaluation (`on_epoch_end`)."""

    def __init__(self):
        super().__init__()
        self.at_epoch_end = []

    def on_epoch_end(self, epoch, logs=None):
        self.at_epoch_end.append(int(self.model.optimizer.iterations.numpy()))


class _SlowEvaluation(keras.callbacks.Callback):
    def on_test_end(self, logs=None):
        time.sleep(1.0)


def test_throughput_counts_training_steps_and_not_the_evaluation_after_them():
    x = np.random.RandomState(0).normal(size=(64, 3)).astype("float32")
    history = _regression().fit(
        x, x.sum(axis=1), batch_size=2, epochs=2, steps_per_epoch=4,
        validation_data=(x[:4], x[:4].sum(axis=1)), verbose=0,
        callbacks=[ThroughputLogger(tokens_per_step=100), _SlowEvaluation()],
    )
    # 400 tokens in the second epoch's four steps (milliseconds); with the 1 s evaluation
    # counted it would be below 400 tokens/s.
    assert history.history["tokens_per_second"][1] > 4000


def _fit(model, backup_dir, epochs=3, steps_per_epoch=4, max_steps=10):
    x = np.random.RandomState(0).normal(size=(64, 3)).astype("float32")
    steps = _Steps()
    history = model.fit(
        x, x.sum(axis=1), batch_size=2, epochs=epochs, steps_per_epoch=steps_per_epoch,
        validation_data=(x[:4], x[:4].sum(axis=1)), verbose=0,
        callbacks=[steps, RunBackup(str(backup_dir), steps_per_epoch, max_steps=max_steps)],
    )
    return steps.at_epoch_end, history.history


def test_run_backup_ends_a_shorter_last_interval_at_max_steps_and_resumes_after_it(tmp_path):
    steps, history = _fit(_regression(), tmp_path / "backup")
    assert steps == [4, 8, 10]  # intervals of 4, 4 and the last 2 steps, each evaluated
    assert len(history["val_loss"]) == 3
    assert backup_state(str(tmp_path / "backup")) == (10, history["val_loss"])
    # A finished run, restored: no epoch is left, not even one step.
    model = _regression()
    steps, history = _fit(model, tmp_path / "backup")
    assert steps == [] and int(model.optimizer.iterations.numpy()) == 10


def test_run_backup_names_damaged_weights_and_the_fix(tmp_path):
    _fit(_regression(), tmp_path / "backup", epochs=1)
    weights = tmp_path / "backup" / "latest.weights.h5"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(weights))} is damaged \(.*delete .*backup to train"):
        _fit(_regression(), tmp_path / "backup")
