"""Training callbacks: Keras' own, wired for a run directory, plus kgpt's small additions.

Keras' callbacks do the work (BackupAndRestore, ModelCheckpoint, EarlyStopping, TensorBoard,
CSVLogger); kgpt adds atomic writes where a kill -9 could leave a torn file, a NaN stop that
says what to try, learning-rate and tokens/s logging, and a sample of generated text at each
evaluation.
"""

import json
import math
import os
import time
import warnings

import keras
import numpy as np

from kgpt import files, keras_compat
from kgpt.generate import Generator
from kgpt.rundir import BACKUP_METADATA
from kgpt.saving import load_model, save_model

def _read_json(path):
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as file:
        return json.load(file)


class RunBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore whose backup survives kill -9 at any moment.

    Keras writes the weights and then the metadata in place; a kill between or during the two
    writes leaves a torn or inconsistent backup. Here each file is written to a temporary name
    and renamed, and the epoch to resume from is derived from the restored optimizer step, so
    weights and position always agree. The backup is kept after training, so rerunning a
    finished run resumes at its end and trains no further.

    Args:
        backup_dir: the run's `backup/` folder.
        steps_per_epoch: optimizer steps per Keras epoch (the evaluation interval).
    """

    def __init__(self, backup_dir, steps_per_epoch):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=False)
        self.steps_per_epoch = steps_per_epoch
        self.val_losses = []

    def _load_model(self):
        super()._load_model()
        if os.path.exists(keras_compat.backup_weights_path(self)):
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            epoch = step // self.steps_per_epoch
            keras_compat.set_initial_epoch(self.model, epoch)
            metadata = _read_json(os.path.join(self.backup_dir, BACKUP_METADATA))
            self.val_losses = [float(v) for v in metadata.get("val_loss", [])][:epoch]

    def on_epoch_end(self, epoch, logs=None):
        # Recorded with the backup, so a resumed EarlyStopping knows the evaluations before it.
        if (logs or {}).get("val_loss") is not None:
            self.val_losses = self.val_losses[:epoch] + [float(logs["val_loss"])]
        super().on_epoch_end(epoch, logs)

    def _save_model(self):
        with files.atomic_file(keras_compat.backup_weights_path(self)) as temporary:
            self.model.save_weights(temporary, overwrite=True)
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        metadata = {
            "epoch": keras_compat.backup_epoch(self), "batch": 0, "step": step,
            "val_loss": self.val_losses,
        }
        with files.atomic_file(keras_compat.backup_metadata_path(self)) as temporary:
            with open(temporary, "w") as f:
                json.dump(metadata, f)


class BestModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint of the best model (lowest `val_loss`), written atomically.

    Args:
        filepath: the `.keras` path (the run's `best.keras`).
        best_so_far: the best `val_loss` of the run before a resume, so that a resumed run
            only replaces `best.keras` with a better model.
    """

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

    Keras' BackupAndRestore brings back the weights, the optimizer and the epoch, not the
    callbacks' state: a fresh EarlyStopping would forget the best validation loss and how long it
    has waited, stop later than the run it continues would have, and at the end restore a model
    worse than `best.keras`. This one starts from the evaluations before the resume (kept in the
    backup, see `RunBackup`) and the best weights in `best.keras`.

    Args:
        patience: evaluations without improvement before training stops.
        previous_val_losses: `val_loss` of each evaluation before the resume, in order.
        best_path: the run's `best.keras`, holding the weights of the lowest of them. Without it
            (e.g. a multi-worker run's other machines), the best weights are those Keras keeps
            from the next evaluation on.
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

    def __init__(self):
        super().__init__()
        self.message = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            self.message = (
                f"Training stopped: the loss became {float(loss)} at step {step}. Try a lower "
                "train.learning_rate, a longer train.warmup_steps, train.clip_norm=1.0, or "
                "train.precision=float32; then start again in a new run directory."
            )
            print(f"\n{self.message}", flush=True)
            self.model.stop_training = True


class ThroughputLogger(keras.callbacks.Callback):
    """Adds `learning_rate` and `tokens_per_second` to the logs of every batch and evaluation.

    Place it before the loggers (CSVLogger, TensorBoard) so they record these values too.

    Args:
        tokens_per_step: tokens in one global batch (`global_batch * sequence_length`).
    """

    def __init__(self, tokens_per_step):
        super().__init__()
        self.tokens_per_step = tokens_per_step

    def _learning_rate(self):
        return keras_compat.current_learning_rate(self.model.optimizer)

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
        elapsed = time.perf_counter() - self._epoch_start
        logs["learning_rate"] = self._learning_rate()
        if elapsed > 0:
            logs["tokens_per_second"] = self._steps * self.tokens_per_step / elapsed


class SampleText(keras.callbacks.Callback):
    """Prints a sampled continuation of a prompt at the end of each evaluation interval.

    Args:
        tokenizer: the run's `kgpt.tokenizer.Tokenizer`.
        prompt: the text to continue.
        max_new_tokens: length of the continuation.
        temperature, top_k: sampling settings.
        seed: the sampling seed (the same at every evaluation, so samples compare).
    """

    def __init__(self, tokenizer, prompt, max_new_tokens=100, temperature=0.8, top_k=40, seed=0):
        super().__init__()
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self._generator = None

    def sample(self):
        if self._generator is None:
            # Without XLA: one short sample per evaluation does not repay a compilation.
            self._generator = Generator(self.model, self.tokenizer, jit_compile=False)
        max_new_tokens = min(self.max_new_tokens, self._generator.sequence_length - 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a long prompt keeps its end, every evaluation
            return self._generator.generate(
                [self.prompt], max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                seed=self.seed, keep_prompt=True,
            )[0]

    def on_epoch_end(self, epoch, logs=None):
        sample = self.sample()
        print(f"\n--- sample after evaluation {epoch + 1} ---\n{sample}\n---", flush=True)
