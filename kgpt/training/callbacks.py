"""Training callbacks: Keras' own made kill-safe and resumable, a NaN stop, throughput logs, text samples."""

import json
import math
import os
import threading
import time
import warnings

import h5py
import keras
import numpy as np
import tensorflow as tf

from kgpt import files, keras_compat
from kgpt.config import evaluations_done
from kgpt.generation.generator import Generator
from kgpt.model.saving import save_model
from kgpt.rundir import BACKUP_METADATA, backup_state, load_model, restart_hint


def _step(model):
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


class RunBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore whose backup survives kill -9 at any moment, and that ends the run at
    `max_steps`, the last evaluation interval shorter when `max_steps` is not a multiple of
    `steps_per_epoch` (Keras evaluates and ends the epoch when `stop_training` is set mid-epoch).

    The weights file carries the position (step, val_losses) and is renamed into place in one
    go, and the resume epoch comes from the restored optimizer step (`steps_per_epoch` per
    evaluation, the last at `max_steps`), so weights and position agree. The backup is kept, so
    rerunning a finished run trains no further. A damaged backup is a `ValueError` naming the
    file and the fix.
    """

    def __init__(self, backup_dir, steps_per_epoch, max_steps=None):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=False)
        self.steps_per_epoch = steps_per_epoch
        self.max_steps = max_steps
        self.val_losses = []

    def _load_model(self):
        # Keras' own also reads `training_metadata.json`; the position comes from the weights here.
        path = keras_compat.backup_weights_path(self)
        if not os.path.exists(path):
            return
        try:
            self.model.load_weights(path)
        except (OSError, KeyError, ValueError) as error:
            raise ValueError(f"{path} is damaged ({error}); {restart_hint(self.backup_dir)}") from error
        epoch = evaluations_done(_step(self.model), self.steps_per_epoch, self.max_steps)
        keras_compat.set_initial_epoch(self.model, epoch)
        self.val_losses = backup_state(self.backup_dir)[1][:epoch]

    def on_train_batch_end(self, batch, logs=None):
        if self.max_steps is not None and _step(self.model) >= self.max_steps:
            self.model.stop_training = True  # Keras still evaluates and ends this epoch
        super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        # Recorded with the backup, so a resumed EarlyStopping knows the evaluations before it.
        if (logs or {}).get("val_loss") is not None:
            self.val_losses = self.val_losses[:epoch] + [float(logs["val_loss"])]
        super().on_epoch_end(epoch, logs)

    def _save_model(self):
        metadata = {
            "epoch": keras_compat.backup_epoch(self), "batch": 0, "step": _step(self.model),
            "val_loss": self.val_losses,
        }
        with files.atomic_file(keras_compat.backup_weights_path(self)) as temporary:
            self.model.save_weights(temporary, overwrite=True)
            with h5py.File(temporary, "a") as file:  # one rename publishes weights and position
                file.attrs[BACKUP_METADATA] = json.dumps(metadata)
        # A readable copy (`backup_state` reads the weights file's).
        with files.atomic_file(keras_compat.backup_metadata_path(self)) as temporary:
            with open(temporary, "w") as f:
                json.dump(metadata, f)


class BestModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Atomic ModelCheckpoint of the lowest `val_loss`; `best_so_far` is the best before a resume."""

    def __init__(self, filepath, best_so_far=None):
        super().__init__(
            filepath,
            monitor="val_loss",
            mode="min",
            save_best_only=True,
            initial_value_threshold=best_so_far,
        )

    def _save_model(self, epoch, batch, logs):
        if keras_compat.checkpoint_should_save(self, epoch, batch, logs):
            save_model(self.model, self.filepath)


def evaluations_since_best(val_losses):
    """How many evaluations came after the lowest of `val_losses` (0 when it is the last)."""
    return len(val_losses) - 1 - int(np.argmin(val_losses)) if len(val_losses) else 0


def patience_spent(val_losses, patience):
    """True when EarlyStopping with `patience` would already have stopped after `val_losses`."""
    return len(val_losses) > 1 and evaluations_since_best(val_losses) >= patience


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping on `val_loss`, restoring the best weights, that carries on across a resume.

    A fresh one would forget the best loss and its wait, stop late and restore a model worse than
    `best.keras`; this one starts from the evaluations before the resume (kept by `RunBackup`) and
    `best_path`'s weights (without it, as on other workers, Keras keeps the best from now on).
    """

    def __init__(self, patience, previous_val_losses=(), best_path=None):
        super().__init__(
            monitor="val_loss", mode="min", patience=patience, restore_best_weights=True
        )
        self.previous_val_losses = [float(value) for value in previous_val_losses]
        self.best_path = best_path

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if not self.previous_val_losses:
            return
        self.wait = evaluations_since_best(self.previous_val_losses)
        self.best_epoch = int(np.argmin(self.previous_val_losses))
        self.best = self.previous_val_losses[self.best_epoch]
        if self.best_path and os.path.exists(self.best_path):
            self.best_weights = load_model(self.best_path).get_weights()


class StopOnNaN(keras.callbacks.Callback):
    """Stops training at the first NaN or infinite loss and says at which step and what to try."""

    message = None  # set on the instance when it stops training

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.message = (
                f"Training stopped: the loss became {float(loss)} at step {_step(self.model)}. "
                "Try a lower train.learning_rate, a longer train.warmup_steps, train.clip_norm=1.0, "
                "or train.precision=float32; then start again in a new run directory."
            )
            print(f"\n{self.message}", flush=True)
            self.model.stop_training = True


class ThroughputLogger(keras.callbacks.Callback):
    """Adds `learning_rate` and `tokens_per_second` to the logs; place it before the loggers.

    An epoch's `tokens_per_second` counts its training steps only, from the epoch's start to its
    last step's end: the evaluation, checkpoints and samples after it are not in it.
    """

    def __init__(self, tokens_per_step):
        super().__init__()
        self.tokens_per_step = tokens_per_step

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._batch_start = self._epoch_start
        self._steps = 0

    def on_train_batch_end(self, batch, logs=None):
        if logs is None:
            return
        now = time.perf_counter()
        steps = batch + 1 - self._steps
        self._steps = batch + 1
        elapsed = now - self._batch_start
        self._batch_start = now
        if elapsed > 0 and steps > 0:
            logs["tokens_per_second"] = steps * self.tokens_per_step / elapsed

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        elapsed = self._batch_start - self._epoch_start  # to the last step's end
        logs["learning_rate"] = keras_compat.current_learning_rate(self.model.optimizer)
        if elapsed > 0:
            logs["tokens_per_second"] = self._steps * self.tokens_per_step / elapsed


class SampleText(keras.callbacks.Callback):
    """Prints a sampled continuation of `prompt` after each evaluation, with the same `seed` each time.

    The first sample pays for its program (tracing the decode loop and TensorFlow's graph
    optimisation: seconds); with `warm_up` (off by default: on 2 cores the thread slowed the first
    interval more than it saved, RESULTS.md), a background thread samples once, output discarded,
    after the first training steps, so that this happens while the first interval trains (the
    steps run in C++ without the GIL). The sample after the evaluation waits for it and is the
    same text: the sample draws from `seed` alone, and reads the weights only.
    """

    def __init__(self, tokenizer, prompt, max_new_tokens=100, temperature=0.8, top_k=40, seed=0,
                 warm_up=False):
        super().__init__()
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self.warm_up = warm_up
        self._generator = None
        self._warm_up_thread = None

    def sample(self):
        if self._generator is None:
            # Without XLA: one short sample per evaluation does not repay a compilation.
            self._generator = Generator(self.model, self.tokenizer, jit_compile=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a long prompt keeps its end, every evaluation
            return self._generator.generate(
                [self.prompt], self.max_new_tokens,
                temperature=self.temperature, top_k=self.top_k, seed=self.seed, keep_prompt=True,
            )[0]

    def on_train_batch_end(self, batch, logs=None):
        # After the first execution: the train step is traced and compiled, and the rest of the
        # interval runs in C++.
        if self.warm_up and self._warm_up_thread is None:
            self._generator = Generator(self.model, self.tokenizer, jit_compile=False)
            # Keras' dtype policy and TensorFlow's strategy scope are per thread: the same here.
            policy, strategy = keras.config.dtype_policy(), tf.distribute.get_strategy()

            def sample_once():
                keras.config.set_dtype_policy(policy)
                try:
                    with strategy.scope():
                        self.sample()
                except Exception:  # the sample after the evaluation raises it again, in the open
                    pass

            self._warm_up_thread = threading.Thread(target=sample_once, name="kgpt-sample", daemon=True)
            self._warm_up_thread.start()

    def _wait_for_warm_up(self):
        if self._warm_up_thread is not None:
            self._warm_up_thread.join()

    def on_epoch_end(self, epoch, logs=None):
        self._wait_for_warm_up()
        print(f"--- sample after evaluation {epoch + 1} ---\n{self.sample()}\n---", flush=True)

    def on_train_end(self, logs=None):
        self._wait_for_warm_up()  # no thread left reading the model once `fit` returns
