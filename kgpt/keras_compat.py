"""Every private Keras, keras-hub and tf.distribute attribute kgpt touches, in one place.

The rest of kgpt reaches them only through the functions here, and the private methods it
overrides or calls are checked on import (`check_overridden_methods`; keras-hub's when the BPE
layer is built): an upgrade that renames one fails with a `RuntimeError` naming it and the
installed version, instead of silently training or tokenizing differently. Tested with the
versions in `TESTED_VERSIONS`; pyproject.toml admits keras >= 3.10 and keras-hub >= 0.20.
"""

import inspect
import types
from importlib import metadata

import keras

TESTED_VERSIONS = {"keras": "3.15.1", "keras_hub": "0.32.0", "tensorflow": "2.20.0"}

# The private methods kgpt overrides in subclasses or rebinds on a model, with the parameter
# names its overrides take: (owner, method) -> parameters. The owner is the public class kgpt
# subclasses; the method may live on one of its private bases.
OVERRIDDEN_METHODS = {
    # kgpt.training.callbacks.RunBackup: atomic writes, epoch derived from the optimizer step.
    (keras.callbacks.BackupAndRestore, "_load_model"): ("self",),
    (keras.callbacks.BackupAndRestore, "_save_model"): ("self",),
    # kgpt.training.callbacks.BestModelCheckpoint: atomic `.keras` writes.
    (keras.callbacks.ModelCheckpoint, "_save_model"): ("self", "epoch", "batch", "logs"),
    # kgpt.training.distribute.AdamW: clipping after the cross-replica gradient sum.
    (keras.optimizers.AdamW, "_clip_gradients"): ("self", "grads"),
    (keras.optimizers.AdamW, "_all_reduce_sum_gradients"): ("self", "grads_and_vars"),
    # kgpt.training.distribute.enable_multi_worker_fit (keras-team/keras#20585).
    (keras.Model, "_maybe_symbolic_build"): ("self", "iterator", "data_batch"),
}

# Private methods kgpt calls (through the functions below), checked the same way.
CALLED_METHODS = {
    (keras.callbacks.ModelCheckpoint, "_should_save_model"): (
        "self", "epoch", "batch", "logs", "filepath",
    ),
    (keras.optimizers.Optimizer, "_get_current_learning_rate"): ("self",),
}


def _versions():
    installed = [f"Keras {keras.__version__}"]
    try:
        installed.append(f"keras-hub {metadata.version('keras-hub')}")
    except metadata.PackageNotFoundError:  # keras-hub not installed: nothing to name
        pass
    return ", ".join(installed)


def _changed(what, detail="is missing"):
    tested = ", ".join(f"{name} {number}" for name, number in TESTED_VERSIONS.items())
    return RuntimeError(
        f"{what} {detail} in the installed {_versions()}; kgpt relies on it "
        f"(see kgpt/keras_compat.py, tested with {tested}). Install the tested versions "
        "(pip install 'keras==3.15.1' 'keras-hub==0.32.0') or update kgpt.keras_compat."
    )


def _check_method(owner, name, parameters):
    method = getattr(owner, name, None)
    if not callable(method):
        raise _changed(f"{owner.__name__}.{name}")
    found = tuple(inspect.signature(method).parameters)
    if found != parameters:
        raise _changed(f"{owner.__name__}.{name}", f"takes {found} instead of {parameters}")


def check_overridden_methods(methods=None):
    """Raises a RuntimeError unless each private method kgpt overrides or calls is unchanged.

    Args:
        methods: `{(class, name): parameter names}`; default: `OVERRIDDEN_METHODS` and
            `CALLED_METHODS`.
    """
    if methods is None:
        methods = {**OVERRIDDEN_METHODS, **CALLED_METHODS}
    for (owner, name), parameters in methods.items():
        _check_method(owner, name, parameters)


def _read(instance, name):
    try:
        return getattr(instance, name)
    except AttributeError:
        owner = instance if isinstance(instance, type) else type(instance)
        raise _changed(f"{owner.__name__}.{name}") from None


# --- keras.callbacks.BackupAndRestore -------------------------------------------------------


def backup_weights_path(callback):
    """The weights file a `BackupAndRestore` writes and restores (`<backup_dir>/latest.weights.h5`)."""
    return _read(callback, "_weights_path")


def backup_metadata_path(callback):
    """The JSON file in which a `BackupAndRestore` records the epoch to resume from."""
    return _read(callback, "_training_metadata_path")


def backup_epoch(callback):
    """The epoch a `BackupAndRestore` records in its next backup (the epochs completed), an int."""
    return _read(callback, "_current_epoch")


# --- keras.Model ----------------------------------------------------------------------------


def set_initial_epoch(model, epoch):
    """Makes a `fit` that has started resume at `epoch`, as `BackupAndRestore` does on restore."""
    _read(model, "_initial_epoch")  # present on every Keras 3 Trainer
    model._initial_epoch = epoch


def initial_epoch(model):
    """The epoch a `fit` resumes from after a restore (None when nothing was restored)."""
    return _read(model, "_initial_epoch")


def distribute_strategy(model):
    """The `tf.distribute` strategy a model was created under (None when made outside any)."""
    return _read(model, "_distribute_strategy")


def symbolic_build(model, iterator=None, data_batch=None):
    """Runs Keras' own `Model._maybe_symbolic_build` (the class's, not a rebound one)."""
    method = _read(type(model), "_maybe_symbolic_build")
    return method(model, iterator=iterator, data_batch=data_batch)


def replace_symbolic_build(model, function):
    """Rebinds `_maybe_symbolic_build` on one model instance (its class stays as it is).

    `function(model, iterator=None, data_batch=None)` may call `symbolic_build` for Keras' own.
    """
    key = (keras.Model, "_maybe_symbolic_build")
    _check_method(*key, OVERRIDDEN_METHODS[key])
    model._maybe_symbolic_build = types.MethodType(function, model)


# --- keras.callbacks.ModelCheckpoint, optimizers and tf.distribute --------------------------


def checkpoint_should_save(callback, epoch, batch, logs):
    """Whether a `ModelCheckpoint` would save now; updates its best value as Keras does on save."""
    method = _read(callback, "_should_save_model")
    return method(epoch, batch, logs, callback.filepath)


def current_learning_rate(optimizer):
    """The learning rate a built optimizer applies at its current step (schedules evaluated)."""
    method = _read(optimizer, "_get_current_learning_rate")
    return float(keras.ops.convert_to_numpy(method()))


def in_multi_worker_mode(strategy):
    """True when a `tf.distribute` strategy spans more than one worker."""
    method = _read(strategy.extended, "_in_multi_worker_mode")
    return bool(method())


# --- keras_hub.tokenizers.BytePairTokenizer -------------------------------------------------

BYTE_PAIR_INTERNALS = ("cache", "token_to_id_map", "_bpe_merge_and_update_cache_tf")


def graph_byte_pair_layer(vocabulary, merges, unsplittable_tokens):
    """keras-hub's `BytePairTokenizer` producing int32 ids, built for graph use only."""
    import keras_hub

    layer = keras_hub.tokenizers.BytePairTokenizer(
        vocabulary=dict(vocabulary),
        merges=list(merges),
        unsplittable_tokens=list(unsplittable_tokens),
        dtype="int32",
        _allow_python_workflow=False,
    )
    if getattr(layer, "_allow_python_workflow", None) is not False:
        raise _changed("BytePairTokenizer's _allow_python_workflow argument", "is ignored")
    return layer


def has_byte_pair_internals(layer):
    """True when a `BytePairTokenizer` has the tables kgpt drives (else kgpt uses its `tokenize`)."""
    return all(hasattr(layer, name) for name in BYTE_PAIR_INTERNALS)


def byte_pair_cache(layer):
    """The layer's word -> merged-pieces cache (`lookup(words)`; `""` for unseen words)."""
    return _read(layer, "cache")


def byte_pair_token_to_id(layer):
    """The layer's token -> id lookup table (a `tf.lookup.StaticHashTable`)."""
    return _read(layer, "token_to_id_map")


def byte_pair_merge_into_cache(layer, words):
    """Runs the BPE merges on `words` (tf.string `[n]`, not yet cached) and adds them to the cache."""
    _read(layer, "_bpe_merge_and_update_cache_tf")(words)


check_overridden_methods()
