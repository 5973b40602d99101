"""Saving and loading `.keras` checkpoints: atomic writes, run-directory lookup, safe loading.

`.keras` files are kgpt's checkpoints (SavedModels are only for serving). Loading always keeps
Keras' `safe_mode` on, so a file cannot run arbitrary code.
"""

import contextlib
import os
import shutil
import tempfile
import zipfile

# Where a run directory keeps its models, in order of preference.
RUN_DIRECTORY_MODELS = ("best.keras", "final.keras", "model.keras")


def save_model(model, path):
    """Saves `model` to `path` (a `.keras` file) atomically: a temporary file, then a rename.

    A crash mid-save leaves any previous file at `path` intact and no partial file behind.
    """
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise ValueError(f"Model path {path!r} must end in .keras.")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".keras", dir=directory)
    os.close(handle)
    try:
        model.save(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@contextlib.contextmanager
def staged_directory(target, replace=True):
    """Yields an empty sibling folder of `target` to fill; on success it becomes `target`.

    The folder is published with a rename. With `replace`, it replaces any existing `target`
    (whose removal comes after the rename); without, an existing non-empty `target` makes the
    rename fail with `OSError` and is kept. An error inside the block leaves `target` as it was
    and no temporary folder behind, so a reader never sees a half-written directory.

    Example:
        with staged_directory("checkpoints/bigram") as staging:
            write_everything_into(staging)
    """
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.")
    retired = staging + ".old"
    try:
        yield staging
        if replace and os.path.isdir(target):
            os.replace(target, retired)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)


def resolve_model_path(path):
    """Returns the `.keras` file for `path`: the file itself, or the model of a run directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in RUN_DIRECTORY_MODELS:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(
            f"No model in directory {path}: looked for {', '.join(RUN_DIRECTORY_MODELS)}. "
            "Pass a .keras file or a run directory written by 'kgpt train'."
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such model file: {path}. Check the path.")
    return path


def load_model(path):
    """Loads a kgpt model from a `.keras` file or a run directory, with `safe_mode` on.

    Raises:
        FileNotFoundError: nothing at `path`, or a run directory without a model.
        ValueError: the file is not a readable `.keras` archive.
    """
    import keras

    # Register every kgpt serializable a checkpoint may name: layers, GPT, and the optimizer,
    # schedule and metric saved with a compiled model.
    import kgpt.distribute  # noqa: F401
    import kgpt.layers  # noqa: F401
    import kgpt.metrics  # noqa: F401
    import kgpt.model  # noqa: F401
    import kgpt.schedule  # noqa: F401

    path = resolve_model_path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a .keras archive (a zip file written by model.save); "
            "pass a file saved by kgpt or Keras 3."
        )
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"Could not load the Keras model in {path}: {error}") from error


def load_run_tokenizer(run_dir):
    """The tokenizer a run directory keeps in `tokenizer/`."""
    from kgpt.tokenizer import load_tokenizer
    from kgpt.train import TOKENIZER_DIRECTORY

    if not os.path.isdir(run_dir):
        raise FileNotFoundError(
            f"No run directory at {run_dir}; pass a folder written by 'kgpt train' (or "
            "'kgpt import-gpt2')."
        )
    return load_tokenizer(os.path.join(run_dir, TOKENIZER_DIRECTORY))


def read_model_config(path):
    """The `get_config()` dict saved in a `.keras` file or run directory, without loading weights."""
    import json

    path = resolve_model_path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))["config"]
    except (zipfile.BadZipFile, KeyError, ValueError) as error:
        raise ValueError(
            f"{path} is not a .keras archive with a model config ({error}); pass a file saved by "
            "kgpt or Keras 3."
        ) from error


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
