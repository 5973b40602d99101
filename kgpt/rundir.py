"""The run directory: its layout, `config.json`, the tokenizer and model in it, recipe identity,
resume state, and the lock that keeps two trainings out of one run (layout: README, Training).

`config.json` is written when training starts, so a folder whose start failed is not a run.
Every command reaches a run directory through `RunDirectory`; no other module spells these names.
"""

import contextlib
import csv
import errno
import fcntl
import json
import os
import socket
import zipfile

import h5py

from kgpt import files
from kgpt.data.run_tokenizer import TOKENIZER_DIRECTORY
from kgpt.model import saving
from kgpt.model.bigram import BIGRAM
from kgpt.recipe import Recipe, config_differences
from kgpt.tokenizers.registry import load_tokenizer

CONFIG = "config.json"
BEST_MODEL = "best.keras"
FINAL_MODEL = "final.keras"
# Where a run directory keeps its model, in order of preference (`model.keras`: `kgpt build`).
MODEL_FILES = (BEST_MODEL, FINAL_MODEL, "model.keras")
HISTORY = "history.csv"
LOGS = "logs"
BACKUP = "backup"
# Keras' BackupAndRestore's files. RunBackup adds `step` and `val_loss` to the metadata and
# writes it into the weights file too, as an attribute of this name (see `backup_state`).
BACKUP_WEIGHTS = "latest.weights.h5"
BACKUP_METADATA = "training_metadata.json"
LOCK = ".lock"
# Temporaries of kgpt versions before `kgpt.files`: under the lock, they are all stale.
_LEGACY_TEMPORARY_PREFIXES = (".tmp-", ".vocab.json.", ".merges.txt.", ".tokenizer.json.")


class RunDirectory:
    """A run directory (`checkpoints/<run>/`, which need not exist yet).

    Args:
        path: the folder.
        worker: this process's index in a multi-worker run (its own backup folder and lock), or
            None for a single process.

    Example:
        run = RunDirectory("checkpoints/shakespeare_char")
        model, tokenizer = run.load_model(), run.load_tokenizer()
    """

    def __init__(self, path, worker=None):
        self.path = os.fspath(path)
        self.worker = worker
        if "://" in self.path:
            raise ValueError(
                f"{self.path}: run directories must be local paths (a run is held by an OS file lock "
                "and its checkpoints are renamed into place); pass a local --run-dir."
            )
        self.config_path = self.file(CONFIG)
        self.tokenizer_dir = self.file(TOKENIZER_DIRECTORY)
        self.best_model_path = self.file(BEST_MODEL)
        self.final_model_path = self.file(FINAL_MODEL)
        self.history_path = self.file(HISTORY)
        self.logs_dir = self.file(LOGS)

    def file(self, name):
        return os.path.join(self.path, name)

    def backup_dir(self):
        """`backup/`, or `backup/worker-N/` for worker N of a multi-worker run."""
        backup = self.file(BACKUP)
        return backup if self.worker is None else os.path.join(backup, f"worker-{self.worker}")

    def is_run(self):
        """True once training (or an import, or a baseline fit) has written `config.json`."""
        return os.path.isfile(self.config_path)

    def is_bigram(self):
        return os.path.isfile(self.file(BIGRAM))

    def check_exists(self):
        """Raises `FileNotFoundError` unless this is a run directory written by kgpt."""
        if not os.path.isdir(self.path):
            raise FileNotFoundError(
                f"No run directory at {self.path}; pass a folder written by 'kgpt train' (or "
                "'kgpt import-gpt2', 'kgpt baseline')."
            )

    def read_config(self):
        """The `config.json` dict; `{}` for a folder that has none (e.g. a bare model folder)."""
        if not os.path.isfile(self.config_path):
            return {}
        try:
            with open(self.config_path, encoding="utf-8") as file:
                return json.load(file)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{self.config_path} is not valid JSON ({error}); restore it or start a new run."
            ) from error

    def write_config(self, config):
        """Writes `config.json` atomically (a `Recipe` or a dict)."""
        if isinstance(config, Recipe):
            config = config.to_dict()
        with files.atomic_file(self.config_path) as temporary:
            with open(temporary, "w", encoding="utf-8") as file:
                json.dump(config, file, indent=2, sort_keys=True)

    def check_recipe(self, recipe):
        """True when the folder holds this run (it resumes), False when it holds none; ValueError
        naming the keys when its recipe identity (`Recipe.identity`) differs."""
        if not self.is_run():
            return False
        stored = self.read_config()
        try:
            stored_identity = Recipe.from_dict(stored).identity()
        except ValueError:
            stored_identity = stored  # written by another schema: compare what is there
        differing = config_differences(stored_identity, recipe.identity())
        if differing:
            raise ValueError(
                f"{self.path} holds a run with a different recipe: {'; '.join(differing)}. "
                "Use another --run-dir, or the same settings to resume."
            )
        return True

    def load_tokenizer(self):
        """The tokenizer in `tokenizer/`."""
        self.check_exists()
        return load_tokenizer(self.tokenizer_dir)

    def model_path(self):
        """The `.keras` file of the run: `best.keras`, else `final.keras`, else `model.keras`."""
        self.check_exists()
        for name in MODEL_FILES:
            if os.path.isfile(self.file(name)):
                return self.file(name)
        if self.is_bigram():
            raise ValueError(
                f"{self.path} holds a bigram baseline, which only scores text ('kgpt evaluate'); "
                "it has no neural model to generate with, export or describe. Use a GPT or GRU run."
            )
        raise FileNotFoundError(
            f"No model in directory {self.path}: looked for {', '.join(MODEL_FILES)}. Pass a "
            ".keras file or a run directory written by 'kgpt train'."
        )

    def load_model(self):
        """The run's Keras model (GPT or GRU baseline), loaded with `safe_mode` on."""
        return load_model(self.path)

    def backup_state(self):
        """`(step, val_losses)` of this process's last backup (see `backup_state`)."""
        return backup_state(self.backup_dir())

    def best_logged(self, key="val_loss"):
        """The lowest `key` in `history.csv`, or None when there is none yet."""
        if not os.path.exists(self.history_path):
            return None
        with open(self.history_path, newline="") as file:
            values = [float(row[key]) for row in csv.DictReader(file) if row.get(key) not in (None, "")]
        return min(values) if values else None

    def trim_history(self, epochs):
        """Keeps the first `epochs` rows of `history.csv`: those the backup holds, once each."""
        if not os.path.exists(self.history_path):
            return
        with open(self.history_path, newline="") as file:
            reader = csv.DictReader(file)
            fieldnames = reader.fieldnames  # read while open: None for an empty file
            rows = [row for row in reader if row.get("epoch", "").isdigit() and int(row["epoch"]) < epochs]
        if not fieldnames:
            return  # killed before the first evaluation: CSVLogger writes the header
        with files.atomic_file(self.history_path) as temporary:
            with open(temporary, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(rows)

    def start(self, recipe, tokenizer):
        """Makes the folder a run: its tokenizer, then `config.json` (the marker, written last)."""
        tokenizer.save(self.tokenizer_dir)
        self.write_config(recipe)

    @contextlib.contextmanager
    def lock(self):
        """Holds the run for one training process (per worker): an OS file lock on `.lock`, released
        however the process ends, `kill -9` included; ValueError if another process holds it. A
        folder this call created is removed when it leaves without becoming a run."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f"{self.path} is a file, not a run directory; choose another --run-dir.")
        created = not os.path.exists(self.path)
        os.makedirs(self.path, exist_ok=True)
        lock_path = self.file(LOCK if not self.worker else f"{LOCK}-worker-{self.worker}")
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                handle.close()
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ValueError(
                f"{self.path} is in use by another kgpt training ({holder}); wait for it to "
                "finish, or choose another --run-dir."
            ) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield self
        finally:
            if created and not self.is_run():
                files.remove(self.path)
            handle.close()

    def remove_stale_files(self):
        """Deletes the temporaries a killed run left, holding `lock()`; returns their paths.

        Worker 0 (or a single process) cleans the run's own files; worker N its backup folder.
        """
        folders = [self.backup_dir()]
        if not self.worker:
            folders += [self.path, self.tokenizer_dir, self.file(BACKUP)]
        removed = [
            os.path.join(folder, name)
            for folder in folders if os.path.isdir(folder)
            for name in os.listdir(folder)
            if files.is_temporary(name) or name.startswith(_LEGACY_TEMPORARY_PREFIXES)
        ]
        for path in removed:
            files.remove(path)
        return removed


def backup_state(backup_dir):
    """`(step, val_losses)` of the backup in `backup_dir`: optimizer steps, each evaluation's val_loss.

    They are read from the weights file (`RunBackup` writes them into it, so one rename publishes
    weights and position together), else from `training_metadata.json` (backups of kgpt before
    that); `(0, [])` without weights. A damaged file is a `ValueError` naming it and the fix.
    """
    weights_path = os.path.join(backup_dir, BACKUP_WEIGHTS)
    if not os.path.isfile(weights_path):
        return 0, []
    path = weights_path
    try:
        with h5py.File(weights_path, "r") as file:
            text = file.attrs.get(BACKUP_METADATA)
        if text is None:
            path = os.path.join(backup_dir, BACKUP_METADATA)
            with open(path, encoding="utf-8") as file:
                text = file.read()
        metadata = json.loads(text)
        return int(metadata.get("step", 0)), [float(v) for v in metadata.get("val_loss", [])]
    except (OSError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is damaged ({error}); {restart_hint(backup_dir)}") from error


def restart_hint(backup_dir):
    """What to do about a damaged backup: restore it, or train the run again from step 0."""
    return (
        f"restore it, or delete {backup_dir} to train this run again from step 0 "
        "(or use another --run-dir)."
    )


def model_file(path):
    """The `.keras` file for `path`: the file itself, or the model of a run directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return RunDirectory(path).model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such model file or run directory: {path}. Check the path.")
    return path


def load_model(path):
    """Loads a kgpt model from a `.keras` file or a run directory, with `safe_mode` on."""
    return saving.load_keras_file(model_file(path))


def read_model_config(path):
    """The model's `get_config()` dict in a `.keras` file or run directory, without its weights."""
    path = model_file(path)
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))["config"]
    except (zipfile.BadZipFile, KeyError, ValueError) as error:
        raise ValueError(
            f"{path} is not a .keras archive with a model config ({error}); pass a file saved by "
            "kgpt or Keras 3."
        ) from error
