"""kgpt.keras_compat: each accessor on real Keras / keras-hub objects, each override still called by
Keras, and the guards that fail loudly when an upgrade removes or changes an internal."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import kgpt.training.callbacks
from kgpt import keras_compat
from kgpt.tokenizers.bpe import train_bpe
from kgpt.training.callbacks import BestModelCheckpoint, RunBackup, ThroughputLogger
from kgpt.training.distribute import AdamW, enable_multi_worker_fit

X = np.arange(32, dtype="float32").reshape(8, 4) / 32.0
Y = X.sum(axis=1, keepdims=True)


def _model(optimizer=None):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.01), loss="mse")
    return model


# --- the guard --------------------------------------------------------------------------------


def test_every_listed_internal_is_present_in_the_installed_keras():
    keras_compat.check_overridden_methods()  # also runs on import; here it must not raise
    owners = {owner for owner, _ in keras_compat.OVERRIDDEN_METHODS}
    assert keras.callbacks.BackupAndRestore in owners and keras.Model in owners


def test_guard_names_a_missing_method_and_the_installed_version(monkeypatch):
    for base in keras.callbacks.BackupAndRestore.__mro__:
        if "_load_model" in vars(base):
            monkeypatch.delattr(base, "_load_model")
    with pytest.raises(
        RuntimeError,
        match=rf"BackupAndRestore\._load_model is missing in the installed Keras {keras.__version__}",
    ):
        keras_compat.check_overridden_methods()


def test_guard_names_a_method_whose_parameters_changed(monkeypatch):
    monkeypatch.setattr(
        keras.callbacks.ModelCheckpoint, "_save_model", lambda self, epoch, logs: None
    )
    with pytest.raises(RuntimeError, match=r"ModelCheckpoint\._save_model takes \('self', 'epoch', 'logs'\)"):
        keras_compat.check_overridden_methods()


def test_accessors_raise_a_clear_error_when_an_attribute_is_gone(tmp_path):
    callback = keras.callbacks.BackupAndRestore(str(tmp_path))
    del callback._weights_path
    with pytest.raises(RuntimeError, match=r"BackupAndRestore\._weights_path is missing.*Keras 3"):
        keras_compat.backup_weights_path(callback)
    layer = train_bpe(["low lower lowest"] * 4, vocabulary_size=270)._layer
    del layer.cache
    assert not keras_compat.has_byte_pair_internals(layer)
    with pytest.raises(RuntimeError, match=r"BytePairTokenizer\.cache is missing.*keras-hub"):
        keras_compat.byte_pair_cache(layer)


def test_replace_symbolic_build_refuses_a_keras_without_it(monkeypatch):
    for base in keras.Model.__mro__:
        if "_maybe_symbolic_build" in vars(base):
            monkeypatch.delattr(base, "_maybe_symbolic_build")
    with pytest.raises(RuntimeError, match=r"Model\._maybe_symbolic_build is missing"):
        enable_multi_worker_fit(_model())


# --- accessors on real objects ----------------------------------------------------------------


def test_backup_accessors(tmp_path):
    callback = keras.callbacks.BackupAndRestore(str(tmp_path))
    assert keras_compat.backup_weights_path(callback) == os.path.join(tmp_path, "latest.weights.h5")
    assert keras_compat.backup_metadata_path(callback) == os.path.join(
        tmp_path, "training_metadata.json"
    )
    assert keras_compat.backup_epoch(callback) == 0
    callback.set_model(_model())
    callback.on_epoch_end(0)  # Keras' own backup: the epoch it records is the one we read
    assert keras_compat.backup_epoch(callback) == 1
    with open(keras_compat.backup_metadata_path(callback)) as file:
        assert json.load(file)["epoch"] == 1
    assert os.path.exists(keras_compat.backup_weights_path(callback))


def test_initial_epoch_makes_fit_resume_there():
    model = _model()
    assert keras_compat.initial_epoch(model) is None

    class ResumeAtTwo(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            keras_compat.set_initial_epoch(self.model, 2)

    history = model.fit(X, Y, batch_size=4, epochs=3, verbose=0, callbacks=[ResumeAtTwo()])
    assert history.epoch == [2]


def test_distribute_strategy_and_multi_worker_mode():
    assert keras_compat.distribute_strategy(_model()) is None
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = _model()
    assert keras_compat.distribute_strategy(model) is strategy
    assert keras_compat.in_multi_worker_mode(strategy) is False
    assert keras_compat.in_multi_worker_mode(tf.distribute.get_strategy()) is False


def test_checkpoint_should_save_follows_the_monitor(tmp_path):
    callback = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "m.keras"), monitor="val_loss", save_best_only=True
    )
    callback.set_model(_model())
    callback.on_epoch_end(0, {"val_loss": 2.0})  # Keras' own save: sets the monitor and best
    assert os.path.exists(tmp_path / "m.keras") and callback.best == 2.0
    assert not keras_compat.checkpoint_should_save(callback, 1, None, {"val_loss": 3.0})
    assert keras_compat.checkpoint_should_save(callback, 2, None, {"val_loss": 1.0})


def test_current_learning_rate_evaluates_the_schedule():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    model = _model(keras.optimizers.SGD(schedule))
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0)  # 2 steps
    assert keras_compat.current_learning_rate(model.optimizer) == pytest.approx(0.1 * 0.5**2)


def test_byte_pair_accessors_merge_and_look_up_words():
    tokenizer = train_bpe(["low lower lowest newer wider"] * 8, vocabulary_size=280)
    layer = tokenizer._layer
    assert layer._allow_python_workflow is False  # graph_byte_pair_layer's setting took
    assert keras_compat.has_byte_pair_internals(layer)
    words = tf.constant(["lower", "Ġlowest"])
    cache = keras_compat.byte_pair_cache(layer)
    assert cache.lookup(words).numpy().tolist() == [b"", b""]
    keras_compat.byte_pair_merge_into_cache(layer, words)
    merged = cache.lookup(words).numpy()
    assert all(piece != b"" for piece in merged)
    pieces = tf.strings.split(merged, sep=" ")
    ids = keras_compat.byte_pair_token_to_id(layer).lookup(pieces)
    vocabulary = tokenizer.vocabulary
    expected = [[vocabulary[p.decode()] for p in row] for row in pieces.to_list()]
    assert ids.to_list() == expected
    # The in-graph path that uses them equals HF tokenizers' ids.
    assert tokenizer.tokenize(["lower lowest"])[0].numpy().tolist() == (
        tokenizer.encode_documents(["lower lowest"])[0].tolist()
    )


# --- overrides: Keras still calls them --------------------------------------------------------


def test_run_backup_overrides_are_called_by_fit(tmp_path):
    backup = str(tmp_path / "backup")
    model = _model()
    model.fit(X, Y, batch_size=4, epochs=2, verbose=0, callbacks=[RunBackup(backup, 2)])
    with open(os.path.join(backup, "training_metadata.json")) as file:
        metadata = json.load(file)
    assert metadata["step"] == 4 and metadata["epoch"] == 2  # "step" is only in kgpt's format
    # kgpt's _load_model derives the epoch from the optimizer step: 4 steps of 4 per epoch is
    # epoch 1, where Keras' own would resume at the recorded epoch 2.
    history = _model().fit(
        X, Y, batch_size=4, epochs=3, verbose=0, callbacks=[RunBackup(backup, 4)]
    )
    assert history.epoch == [1, 2]


def test_best_model_checkpoint_override_is_called_by_fit(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(kgpt.training.callbacks, "save_model", lambda model, path: saved.append(path))
    path = str(tmp_path / "best.keras")
    _model().fit(
        X, Y, batch_size=4, epochs=2, verbose=0, validation_data=(X, Y),
        callbacks=[BestModelCheckpoint(path)],
    )
    assert saved and set(saved) == {path}


def test_adamw_overrides_are_called_by_fit(monkeypatch):
    calls = []
    for name in ("_clip_gradients", "_all_reduce_sum_gradients"):
        original = getattr(AdamW, name)

        def spy(self, value, original=original, name=name):
            calls.append(name)
            return original(self, value)

        monkeypatch.setattr(AdamW, name, spy)
    model = _model(AdamW(0.01, global_clipnorm=1.0))
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0)
    assert {"_clip_gradients", "_all_reduce_sum_gradients"} <= set(calls)


def test_rebound_symbolic_build_is_called_by_fit():
    calls = []

    def build(model, iterator=None, data_batch=None):
        calls.append(model)
        return keras_compat.symbolic_build(model, iterator=iterator, data_batch=data_batch)

    model = _model()
    keras_compat.replace_symbolic_build(model, build)
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0)
    assert calls and calls[0] is model
    assert "_maybe_symbolic_build" not in vars(_model())  # other models keep Keras' own


def test_throughput_logger_logs_the_scheduled_learning_rate():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    model = _model(keras.optimizers.SGD(schedule))
    history = model.fit(X, Y, batch_size=4, epochs=2, verbose=0, callbacks=[ThroughputLogger(16)])
    assert history.history["learning_rate"] == pytest.approx([0.1 * 0.5**2, 0.1 * 0.5**4])
