"""`train(recipe, run_dir)`: strategy -> tokenizer and data -> model -> `model.fit` -> run directory.

A run directory (`checkpoints/<run>/`) holds everything later commands need: `config.json` (the
resolved recipe), `tokenizer/`, `best.keras`, `final.keras`, `history.csv`, `logs/` (TensorBoard)
and `backup/` (BackupAndRestore). Running the same recipe into the same directory resumes from
the last backup; a different recipe there is an error naming the keys that differ.

Keras "epochs" are evaluation intervals: `fit` runs `max_steps / eval_interval` epochs of
`eval_interval` steps over an endless, seeded, shuffled stream of windows.
"""

import dataclasses
import json
import os
import tempfile
import typing

from kgpt.config import ModelConfig, TrainConfig, _coerce, config_from_dict, read_recipe

CONFIG_FILENAME = "config.json"
TOKENIZER_DIRECTORY = "tokenizer"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe: model overrides, data and training settings.

    `model` holds only the `ModelConfig` fields the recipe sets; `vocabulary_size` defaults to
    the tokenizer's and `sequence_length` to `data.sequence_length`.
    """

    model: dict
    data: typing.Any  # kgpt.data.DataConfig
    train: TrainConfig

    def to_dict(self):
        return {"model": dict(self.model), "data": self.data.to_dict(), "train": dataclasses.asdict(self.train)}


def resolve_recipe(raw):
    """Validates a `{section: {key: value}}` recipe dict into a `Recipe`."""
    from kgpt.data import DataConfig

    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    hints = typing.get_type_hints(ModelConfig)
    model = {}
    for key, value in raw.get("model", {}).items():
        if key not in model_fields:
            # config_from_dict raises the helpful unknown-key message.
            config_from_dict(ModelConfig, {key: value}, "model")
        model[key] = _coerce(f"model.{key}", value, hints[key])
    data = DataConfig.from_dict(raw.get("data", {}))
    train = TrainConfig.from_dict(raw.get("train", {}), "train")
    if train.max_steps % train.eval_interval:
        raise ValueError(
            f"train.max_steps={train.max_steps} is not a multiple of train.eval_interval="
            f"{train.eval_interval}; make max_steps a multiple (e.g. "
            f"{-(-train.max_steps // train.eval_interval) * train.eval_interval})."
        )
    if train.eval_interval % train.steps_per_execution:
        raise ValueError(
            f"train.eval_interval={train.eval_interval} is not a multiple of "
            f"train.steps_per_execution={train.steps_per_execution}; Keras runs whole executions, "
            "so make eval_interval a multiple (or lower steps_per_execution)."
        )
    return Recipe(model=model, data=data, train=train)


def load_recipe(path, overrides=()):
    """Reads, overrides and validates a TOML recipe (see `pipelines/`)."""
    return resolve_recipe(read_recipe(path, overrides))


def config_differences(old, new, prefix=""):
    """The dotted keys whose values differ between two config dicts, as "key (old -> new)"."""
    keys = sorted(set(old) | set(new))
    found = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return found


def prepare_run_directory(run_dir, recipe):
    """Creates `run_dir` with `config.json`, or checks that an existing run has the same recipe.

    Returns:
        True when the run directory already existed (the run resumes).
    """
    path = os.path.join(run_dir, CONFIG_FILENAME)
    resolved = json.loads(json.dumps(recipe.to_dict()))  # tuples -> lists, as stored
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        differing = config_differences(stored, resolved)
        if differing:
            raise ValueError(
                f"{run_dir} holds a run with a different recipe: {'; '.join(differing)}. "
                "Use another --run-dir, or the same settings to resume."
            )
        return True
    os.makedirs(run_dir, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-config-", dir=run_dir)
    with os.fdopen(handle, "w") as f:
        json.dump(resolved, f, indent=2, sort_keys=True)
    os.replace(temporary, path)
    return False


def make_optimizer(config, model):
    """AdamW with the warmup-cosine schedule, decay on weight matrices only, global-norm clip."""
    from kgpt.distribute import AdamW
    from kgpt.schedule import WarmupCosine

    schedule = WarmupCosine(
        config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.total_decay_steps,
        min_learning_rate=config.min_learning_rate,
    )
    optimizer = AdamW(
        learning_rate=schedule,
        weight_decay=config.weight_decay,
        beta_1=config.beta_1,
        beta_2=config.beta_2,
        epsilon=config.epsilon,
        global_clipnorm=config.clip_norm or None,
    )
    # Decay only matrices: no biases, LayerNorm parameters or position table (GPT-2 / nanoGPT).
    no_decay = [
        w for w in model.trainable_weights if len(w.shape) < 2 or "position_embedding" in w.path
    ]
    optimizer.exclude_from_weight_decay(var_list=no_decay)
    return optimizer


# [model] keys a fine-tuning recipe may change: they shape no weight.
FINE_TUNING_KEYS = ("dropout",)


def _init_model_config(recipe):
    """The `ModelConfig` of `train.init_from` with the recipe's allowed changes, checked early."""
    from kgpt.saving import read_model_config

    source = recipe.train.init_from
    if not source:
        return None
    saved = read_model_config(source)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    config = ModelConfig(**{key: value for key, value in saved.items() if key in fields})
    conflicts = [
        f"model.{key}: recipe {value!r} vs {source}: {getattr(config, key)!r}"
        for key, value in recipe.model.items()
        if key not in FINE_TUNING_KEYS and getattr(config, key) != value
    ]
    if conflicts:
        raise ValueError(
            "train.init_from's model differs from the recipe: " + "; ".join(conflicts)
            + ". Remove these keys from [model] (the initial model's sizes win; only "
            + ", ".join(FINE_TUNING_KEYS) + " may change)."
        )
    changes = {key: recipe.model[key] for key in FINE_TUNING_KEYS if key in recipe.model}
    return dataclasses.replace(config, **changes)


def _model_config(recipe, tokenizer, init_config):
    if init_config is not None:
        return init_config
    values = {
        "vocabulary_size": tokenizer.vocabulary_size,
        "sequence_length": recipe.data.sequence_length,
        **recipe.model,
    }
    return ModelConfig(**values)


def load_matching_tokenizer(source, data, option):
    """The tokenizer of the run directory `source`, checked against the recipe's `data.tokenizer`.

    Args:
        source: a run directory written by `kgpt train` or `kgpt import-gpt2`.
        data: the recipe's `DataConfig`.
        option: how the user named `source` (e.g. "train.init_from"), for the error messages.
    """
    from kgpt.saving import load_run_tokenizer

    if not os.path.isdir(source):
        raise FileNotFoundError(
            f"{option}={source!r} is not a directory; pass a run directory written by "
            "'kgpt train' or 'kgpt import-gpt2'."
        )
    tokenizer = load_run_tokenizer(source)
    if tokenizer.kind != data.tokenizer:
        fix = f"data.tokenizer = {tokenizer.kind!r}"
        if tokenizer.kind == "gpt2":
            fix += f" and data.tokenizer_path = {os.path.join(source, TOKENIZER_DIRECTORY)!r}"
        raise ValueError(
            f"data.tokenizer: recipe {data.tokenizer!r} vs {source}: {tokenizer.kind!r}. "
            f"{option} keeps that run's tokenizer; set {fix}."
        )
    return tokenizer


def _init_tokenizer(recipe):
    """The tokenizer of `train.init_from` (None without it), checked against `data.tokenizer`."""
    source = recipe.train.init_from
    return load_matching_tokenizer(source, recipe.data, "train.init_from") if source else None


def _backup_dir(run_dir, strategy):
    from kgpt.distribute import is_multi_worker, worker_index

    backup = os.path.join(run_dir, "backup")
    # Every worker keeps its own backup (they restore together, each its own state).
    return os.path.join(backup, f"worker-{worker_index(strategy)}") if is_multi_worker(strategy) else backup


def _callbacks(recipe, run_dir, tokenizer, tokens_per_step, strategy, previous_val_losses):
    import keras

    from kgpt import callbacks
    from kgpt.distribute import worker_index

    config = recipe.train
    result = [callbacks.ThroughputLogger(tokens_per_step), callbacks.StopOnNaN()]
    is_chief = worker_index(strategy) == 0
    if config.patience:
        result.append(
            callbacks.ResumableEarlyStopping(
                config.patience, previous_val_losses, best_path=os.path.join(run_dir, "best.keras")
            )
        )
    if is_chief:
        result += [
            callbacks.BestModelCheckpoint(
                os.path.join(run_dir, "best.keras"),
                best_so_far=callbacks.best_logged(os.path.join(run_dir, "history.csv")),
            ),
            keras.callbacks.CSVLogger(os.path.join(run_dir, "history.csv"), append=True),
            keras.callbacks.TensorBoard(os.path.join(run_dir, "logs")),
        ]
        if config.sample_prompt and config.sample_length:
            result.append(
                callbacks.SampleText(
                    tokenizer, config.sample_prompt, config.sample_length, seed=config.seed
                )
            )
    # Last, so that an evaluation is backed up only once everything above has recorded it; a
    # kill before the backup re-runs that interval and `trim_history` drops its first record.
    result.append(
        callbacks.RunBackup(_backup_dir(run_dir, strategy), steps_per_epoch=config.eval_interval)
    )
    return result


@dataclasses.dataclass
class TrainResult:
    """What `train` did: steps completed, per-evaluation history, and why it stopped early."""

    run_dir: str
    steps: int
    history: dict
    stopped: typing.Optional[str] = None


def train(recipe, run_dir, verbose="auto", build_model=None):
    """Trains a GPT from a recipe into `run_dir` (resuming if it already holds this run).

    Args:
        recipe: a `Recipe` (see `load_recipe`).
        run_dir: the run directory.
        verbose: `model.fit` verbosity.
        build_model: `ModelConfig -> keras.Model`; default `GPT.from_config_object` (the
            recurrent baseline passes its own, see `kgpt.baselines.train_recurrent`).

    Returns:
        A `TrainResult`.

    Example:
        result = train(load_recipe("pipelines/tiny.toml"), "checkpoints/tiny")
    """
    import keras
    import tensorflow as tf

    from kgpt import data as kdata
    from kgpt.callbacks import (
        StopOnNaN,
        completed_steps,
        completed_val_losses,
        patience_spent,
        trim_history,
    )
    from kgpt.distribute import enable_multi_worker_fit, is_multi_worker, make_strategy, worker_index
    from kgpt.metrics import Perplexity
    from kgpt.model import GPT
    from kgpt.saving import load_model, save_model

    config = recipe.train
    init_tokenizer = _init_tokenizer(recipe)  # both before anything is written
    init_config = _init_model_config(recipe)
    resuming = prepare_run_directory(run_dir, recipe)
    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(config.precision)
    strategy = make_strategy(config.strategy)
    replicas = strategy.num_replicas_in_sync
    global_batch = config.batch_size * replicas

    tokenizer_dir = os.path.join(run_dir, TOKENIZER_DIRECTORY)
    if init_tokenizer is not None and not os.path.isdir(tokenizer_dir):
        init_tokenizer.save(tokenizer_dir)  # the initial run's vocabulary wins
    tokenizer = kdata.build_tokenizer(recipe.data, tokenizer_dir)

    with strategy.scope():
        init_model = load_model(config.init_from) if config.init_from else None
        model_config = _model_config(recipe, tokenizer, init_config)
        kdata.check_model_compatibility(recipe.data, model_config, tokenizer)
        model = (build_model or GPT.from_config_object)(model_config)
        if init_model is not None:
            model.set_weights(init_model.get_weights())
        model.compile(
            optimizer=make_optimizer(config, model),
            loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction="mean_with_sample_weight"
            ),
            weighted_metrics=[Perplexity()],
            jit_compile=config.jit_compile,
            steps_per_execution=config.steps_per_execution,
        )
        if is_multi_worker(strategy):
            enable_multi_worker_fit(model)

    train_data = kdata.make_dataset(recipe.data, tokenizer, "train", global_batch, repeat=True)
    # Resume the data stream where the backup left it, so a resumed run sees the same batches.
    skip = completed_steps(_backup_dir(run_dir, strategy)) if resuming else 0
    if skip:
        train_data = train_data.skip(skip)
    completed_epochs = skip // config.eval_interval
    if resuming and worker_index(strategy) == 0:
        trim_history(os.path.join(run_dir, "history.csv"), completed_epochs)
    previous_val_losses = completed_val_losses(_backup_dir(run_dir, strategy))[:completed_epochs]
    validation_data = kdata.make_dataset(recipe.data, tokenizer, "validation", global_batch)
    if config.eval_steps:
        # The same first eval_steps batches at every evaluation (or all, if there are fewer),
        # so validation losses compare across evaluations.
        validation_data = validation_data.take(config.eval_steps)
    if is_multi_worker(strategy):
        # Every worker builds the same global batches; each takes its replicas' share of each.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        train_data = train_data.with_options(options)
        validation_data = validation_data.with_options(options)

    callbacks = _callbacks(
        recipe, run_dir, tokenizer, global_batch * recipe.data.sequence_length, strategy,
        previous_val_losses,
    )
    epochs = config.max_steps // config.eval_interval
    if config.patience and patience_spent(previous_val_losses, config.patience):
        epochs = completed_epochs  # the run had already stopped early: nothing left to train
    history = model.fit(
        train_data,
        epochs=epochs,
        steps_per_epoch=config.eval_interval,
        validation_data=validation_data,
        callbacks=callbacks,
        shuffle=False,  # the dataset shuffles itself, seeded
        verbose=verbose,
    )
    nan_stop = next(c for c in callbacks if isinstance(c, StopOnNaN)).message
    steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    if worker_index(strategy) == 0 and nan_stop is None:
        save_model(model, os.path.join(run_dir, "final.keras"))
    stopped = nan_stop
    if stopped is None and steps < config.max_steps:
        stopped = f"early stopping after {steps} steps (no val_loss improvement)"
    return TrainResult(run_dir=run_dir, steps=steps, history=history.history, stopped=stopped)
