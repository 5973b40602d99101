"""`train(recipe, run_dir)`: strategy -> tokenizer -> model -> datasets -> `model.fit` -> run directory.

Its parts stand alone: `make_tokenizer`, `build_model` (weights, optimizer, compile),
`make_datasets`, `make_callbacks`. Keras "epochs" are evaluation intervals: `fit` runs
`ceil(max_steps / eval_interval)` epochs of `eval_interval` steps over an endless, seeded stream,
the last one ended at `max_steps` by `RunBackup`.
"""

import dataclasses

import keras
import tensorflow as tf

from kgpt.config import ModelConfig
from kgpt.data import pipeline as kdata
from kgpt.data.run_tokenizer import make_tokenizer
from kgpt.model.saving import MODEL_CLASSES, save_model
from kgpt.rundir import RunDirectory, read_model_config
from kgpt.training import callbacks as kcallbacks
from kgpt.training import console, distribute
from kgpt.training.metrics import Perplexity
from kgpt.training.resources import check_training_resources
from kgpt.training.schedule import WarmupCosine

# [model] keys a fine-tuning recipe may change: they shape no weight.
FINE_TUNING_KEYS = ("dropout",)


def make_optimizer(config, model):
    """AdamW with the warmup-cosine schedule, decay on weight matrices only, global-norm clip."""
    schedule = WarmupCosine(
        config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=config.total_decay_steps, min_learning_rate=config.min_learning_rate,
    )
    optimizer = distribute.AdamW(
        learning_rate=schedule, weight_decay=config.weight_decay, beta_1=config.beta_1,
        beta_2=config.beta_2, epsilon=config.epsilon, global_clipnorm=config.clip_norm or None,
    )
    # Decay only matrices: no biases, LayerNorm parameters or position table (GPT-2 / nanoGPT).
    optimizer.exclude_from_weight_decay(var_list=[
        w for w in model.trainable_weights if len(w.shape) < 2 or "position_embedding" in w.path
    ])
    return optimizer


def initial_model_config(recipe):
    """`train.init_from`'s `ModelConfig` with the recipe's allowed changes (None without it);
    a `[model]` size that differs from the initial model's raises `ValueError`."""
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


def build_model(recipe, tokenizer, strategy=None):
    """The recipe's model (`[model] kind`, or `train.init_from`'s with its weights), compiled
    with AdamW, the masked cross-entropy and `Perplexity`, in `strategy`'s scope."""
    config = recipe.train
    strategy = strategy or tf.distribute.get_strategy()
    init_config = initial_model_config(recipe)  # checked before anything is built
    with strategy.scope():
        model_config = init_config or recipe.model_config(tokenizer.vocabulary_size)
        kdata.check_model_compatibility(recipe.data, model_config, tokenizer)
        check_training_resources(recipe, model_config, config.batch_size)  # before the model and data
        model = MODEL_CLASSES[recipe.model_kind].from_config_object(model_config)
        if config.init_from:
            model.set_weights(RunDirectory(config.init_from).load_model().get_weights())
        model.compile(
            optimizer=make_optimizer(config, model),
            loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction="mean_with_sample_weight"
            ),
            weighted_metrics=[Perplexity()],
            jit_compile=config.jit_compile,
            steps_per_execution=config.steps_per_execution,
        )
        # Its slots now, not inside the first traced step: a tf.function that creates variables
        # is traced twice, which cost the first `fit` call seconds.
        model.optimizer.build(model.trainable_variables)
        if distribute.is_multi_worker(strategy):
            distribute.enable_multi_worker_fit(model)
    return model


def make_datasets(recipe, tokenizer, strategy=None, skip_steps=0):
    """`(train, validation)` datasets of global batches; `train` resumes after `skip_steps` batches.

    Under MultiWorkerMirroredStrategy each worker builds only its own part of the training stream
    (`make_dataset`'s `worker`: whole token shards, or every n-th window), per-worker batches.
    """
    strategy = strategy or tf.distribute.get_strategy()
    global_batch = recipe.train.batch_size * strategy.num_replicas_in_sync

    def train_dataset(batch_size, worker=(0, 1)):
        dataset = kdata.make_dataset(recipe.data, tokenizer, "train", batch_size, repeat=True, worker=worker)
        # The same batches an uninterrupted run would see from here.
        return dataset.skip(skip_steps) if skip_steps else dataset

    eval_batch = (recipe.train.eval_batch_size or recipe.train.batch_size) * strategy.num_replicas_in_sync
    validation_data = kdata.make_dataset(recipe.data, tokenizer, "validation", eval_batch)
    if recipe.train.eval_steps:
        # The same first eval_steps training batches' windows at every evaluation (or all, if
        # there are fewer), so validation losses compare across evaluations; in eval_batch rows.
        windows = recipe.train.eval_steps * global_batch
        if windows % eval_batch:
            # unbatch hides the size again: tell Keras how many batches (see make_dataset).
            store = kdata.tokenize_corpus(recipe.data, tokenizer, "validation")
            batches = -(-min(windows, kdata.count_windows(recipe.data, store)) // eval_batch)
            validation_data = validation_data.unbatch().take(windows).batch(eval_batch).apply(
                tf.data.experimental.assert_cardinality(batches))
        else:
            validation_data = validation_data.take(windows // eval_batch)
    if not distribute.is_multi_worker(strategy):
        return train_dataset(global_batch), validation_data

    def worker_dataset(context):
        batch_size = context.get_per_replica_batch_size(global_batch)
        return train_dataset(batch_size, (context.input_pipeline_id, context.num_input_pipelines))

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.distribute_datasets_from_function(worker_dataset), validation_data.with_options(options)


def make_callbacks(recipe, run, tokenizer, model, strategy, val_losses=(), extra=(), verbose=0):
    """The run's callbacks: throughput, worker 0's console (with `verbose`), NaN stop, early
    stopping (carrying on from `val_losses` of a resumed run), worker 0's checkpoint, CSV log,
    TensorBoard and samples, `extra`, and last the backup, so that it records what all the others saw."""
    config = recipe.train
    tokens_per_step = config.batch_size * strategy.num_replicas_in_sync * recipe.data.sequence_length
    result = [kcallbacks.ThroughputLogger(tokens_per_step)]
    if verbose and not run.worker:
        result.append(console.TrainingConsole(config.max_steps, config.eval_interval))
    result.append(kcallbacks.StopOnNaN())
    if config.patience:
        result.append(
            kcallbacks.ResumableEarlyStopping(config.patience, val_losses, best_path=run.best_model_path)
        )
    if not run.worker:  # a single process, or worker 0
        result += [
            kcallbacks.BestModelCheckpoint(run.best_model_path, best_so_far=run.best_logged()),
            keras.callbacks.CSVLogger(run.history_path, append=True),
            keras.callbacks.TensorBoard(run.logs_dir),
        ]
        if config.sample_prompt and config.sample_length:
            # Past the context, the sample goes on from the last half of it (kgpt.generation.decoding).
            result.append(
                kcallbacks.SampleText(
                    tokenizer, config.sample_prompt, config.sample_length,
                    temperature=config.sample_temperature, top_k=config.sample_top_k,
                    seed=config.seed,
                )
            )
    result += list(extra)
    # Last, so that an evaluation is backed up only once everything above has recorded it; a
    # kill before the backup re-runs that interval and `trim_history` drops its first record.
    result.append(
        kcallbacks.RunBackup(
            run.backup_dir(), steps_per_epoch=config.eval_interval, max_steps=config.max_steps
        )
    )
    return result


def interrupted_message(model, run):
    """What an interrupted `fit` says: where it stopped, where the same command resumes."""
    step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    backup_step = run.backup_state()[0]
    if not backup_step:
        return (
            f"interrupted at step {step}, before the first evaluation; run the same command "
            "to start again."
        )
    return (
        f"interrupted at step {step}; run the same command to resume (from step {backup_step}, "
        "the last evaluation)."
    )


@dataclasses.dataclass
class TrainResult:
    """What `train` did: steps in all, per-evaluation logs, why it stopped early, where it resumed."""

    run_dir: str
    steps: int
    history: dict
    stopped: str | None = None
    initial_steps: int = 0  # steps done before this call (a resume)

    @property
    def trained_steps(self):
        return self.steps - self.initial_steps


def train(recipe, run_dir, verbose="auto", callbacks=()):
    """Trains a recipe's model into `run_dir`, resuming if it already holds this run.

    `callbacks` are extra Keras callbacks, run before the backup; a second process training into
    `run_dir` is refused. `verbose=0` prints nothing but samples; otherwise the start block, a
    progress bar on a terminal and a line per evaluation (`kgpt.training.console`). Returns a
    `TrainResult`.

    Example:
        result = train(load_recipe("pipelines/tiny.toml"), "checkpoints/tiny")
    """
    config, note = recipe.train.fit_to_max_steps()  # e.g. a recipe tried with a few max_steps
    recipe = dataclasses.replace(recipe, train=config)
    strategy = distribute.make_strategy(config.strategy)
    worker = distribute.worker_index(strategy)
    run = RunDirectory(run_dir, worker=worker if distribute.is_multi_worker(strategy) else None)
    with run.lock():
        run.remove_stale_files()
        resuming = run.check_recipe(recipe)
        if note and not worker:
            print(note, flush=True)
        keras.utils.set_random_seed(config.seed)
        keras.mixed_precision.set_global_policy(config.precision)
        kdata.check_cache_directory(recipe.data)  # before a BPE tokenizer is trained on the corpus
        tokenizer = run.load_tokenizer() if resuming else make_tokenizer(recipe)
        model = build_model(recipe, tokenizer, strategy)
        step, val_losses = run.backup_state() if resuming else (0, [])
        completed_epochs = config.evaluations_done(step)
        train_data, validation_data = make_datasets(recipe, tokenizer, strategy, skip_steps=step)
        if not resuming:
            run.start(recipe, tokenizer)
        else:
            run.write_config(recipe)  # the same run; its data may have moved
            if worker == 0:
                run.trim_history(completed_epochs)
        val_losses = val_losses[:completed_epochs]
        fit_callbacks = make_callbacks(
            recipe, run, tokenizer, model, strategy, val_losses, callbacks, verbose=verbose)
        if verbose and not run.worker:
            print("\n".join(console.describe_run(recipe, run.path, model, tokenizer, strategy, step)))
        epochs = config.num_evaluations
        if config.patience and kcallbacks.patience_spent(val_losses, config.patience):
            epochs = completed_epochs  # the run had already stopped early: nothing left to train
        try:
            history = model.fit(
                train_data,
                epochs=epochs,
                steps_per_epoch=config.eval_interval,
                validation_data=validation_data,
                callbacks=fit_callbacks,
                shuffle=False,  # the dataset shuffles itself, seeded
                verbose=0,  # kgpt's console instead: Keras' bar ignores the terminal's width
            )
        except KeyboardInterrupt:
            raise KeyboardInterrupt(interrupted_message(model, run)) from None
        nan_stop = next(c for c in fit_callbacks if isinstance(c, kcallbacks.StopOnNaN)).message
        steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        if worker == 0 and nan_stop is None:
            save_model(model, run.final_model_path)
    stopped = nan_stop
    if stopped is None and steps < config.max_steps:
        stopped = f"early stopping after {steps} steps (no val_loss improvement)"
    return TrainResult(
        run_dir=run.path, steps=steps, history=history.history, stopped=stopped,
        initial_steps=step,
    )
