"""`.keras` checkpoints: atomic saving, safe loading, the Keras classes a checkpoint may name.

`.keras` files are kgpt's checkpoints (SavedModels are only for serving). Loading always keeps
Keras' `safe_mode` on, so a file cannot run arbitrary code. Importing this module registers every
kgpt layer and model with Keras (`kgpt/__init__.py` also registers the training's metric,
schedule and optimizer, which a checkpoint's compiled state names).
"""

import os
import zipfile
import zlib

import keras

from kgpt import files
from kgpt.model import layers  # noqa: F401  (registers the layers)
from kgpt.model.gpt import GPT
from kgpt.model.recurrent import RecurrentLanguageModel

# `[model] kind` -> the Keras model class that trains it (names in `kgpt.config.MODEL_KINDS`).
MODEL_CLASSES = {"gpt": GPT, "gru": RecurrentLanguageModel}


def save_model(model, path):
    """Saves `model` to `path` (a `.keras` file) atomically: a crash leaves no partial file."""
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ValueError(f"Model path {path!r} must end in .keras.")
    with files.atomic_file(path) as temporary:
        model.save(temporary)


def load_keras_file(path):
    """Loads a kgpt model from a `.keras` file, with `safe_mode` on; ValueError if it is not one.

    `kgpt.rundir.load_model` is the public entry point (a file or a run directory)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such model file: {path}. Check the path.")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a .keras archive (a zip file written by model.save); "
            "pass a file saved by kgpt or Keras 3."
        )
    try:
        # Without the compiled state: kgpt loads checkpoints for their weights (training resumes from
        # backup/), so a load needs no optimizer, schedule or metric class registered.
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:  # e.g. a bad CRC inside the zip
        raise ValueError(
            f"{path} is damaged ({error}); restore it, or train again to write a new one."
        ) from error
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"Could not load the Keras model in {path}: {error}") from error


def describe_model(model):
    """Returns a printable description: configuration, parameter count and layer summary."""
    lines = [f"Model: {type(model).__name__} ({model.name})", "Configuration:"]
    config = model.get_config()
    for key in sorted(config):
        if key in ("name", "trainable", "dtype"):
            continue
        lines.append(f"  {key}: {config[key]}")
    lines.append(f"  dtype_policy: {model.dtype_policy.name}")
    lines.append(f"Parameters: {model.count_params():,}")
    lines.append("Layers:")
    rows = [(layer.name, type(layer).__name__, f"{layer.count_params():,}") for layer in model.layers]
    widths = [max(len(row[i]) for row in rows + [("name", "type", "parameters")]) for i in range(3)]
    for row in [("name", "type", "parameters")] + rows:
        lines.append(f"  {row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}")
    return "\n".join(lines)
