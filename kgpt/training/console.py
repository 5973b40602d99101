"""What `kgpt train` prints: the start block, a progress bar that fits the terminal, one line per
evaluation. On a terminal the bar is Keras' `Progbar`; elsewhere (a file, a pipe) only plain lines."""

import math
import shutil
import sys
import time

import keras
import tensorflow as tf

from kgpt.data.pipeline import count_windows, tokenize_corpus


def format_count(number):
    """`803,904`, or `12.4M` from a million on."""
    return f"{number / 1e6:.1f}M" if number >= 1e6 else f"{number:,}"


def format_duration(seconds):
    """`0:42`, `12:05` or `3:04:05`."""
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def format_rate(tokens_per_second):
    """`850 tok/s`, `41.2k tok/s`, `1.25M tok/s`."""
    if tokens_per_second >= 1e6:
        return f"{tokens_per_second / 1e6:.2f}M tok/s"
    if tokens_per_second >= 1e3:
        return f"{tokens_per_second / 1e3:.1f}k tok/s"
    return f"{tokens_per_second:.0f} tok/s"


def _perplexity(loss):
    if not math.isfinite(loss):
        return str(loss)  # "nan", "inf": the NaN stop says what happened
    value = math.exp(min(loss, 700.0))
    return f"{value:.2f}" if value < 100 else f"{value:,.0f}" if value < 1e6 else f"{value:.2e}"


def evaluation_line(step, max_steps, logs, elapsed, remaining):
    """One evaluation: step, train and validation loss, their perplexities, tokens/s, and time as
    tqdm writes it: elapsed<remaining (`remaining` None: unknown).

    Example:
        step 250/2000  loss 2.041  val 2.080  ppl 7.70/8.00  40.1k tok/s  0:32<3:45
    """
    parts = [f"step {step}/{max_steps}"]
    losses = [logs[key] for key in ("loss", "val_loss") if logs.get(key) is not None]
    if logs.get("loss") is not None:
        parts.append(f"loss {logs['loss']:.3f}")
    if logs.get("val_loss") is not None:
        parts.append(f"val {logs['val_loss']:.3f}")
    if losses:
        parts.append("ppl " + "/".join(_perplexity(loss) for loss in losses))
    if logs.get("tokens_per_second"):
        parts.append(format_rate(logs["tokens_per_second"]))
    timing = format_duration(elapsed)
    if remaining is not None and step < max_steps:
        timing += f"<{format_duration(remaining)}"
    parts.append(timing)
    return "  ".join(parts)


def _count(number, noun):
    return f"{number} {noun}{'s' * (number != 1)}"


def _short_device(name):
    return name.rsplit("device:", 1)[-1].lstrip("/")  # "/job:../device:GPU:0" -> "GPU:0"


def strategy_line(strategy, requested):
    """`train.strategy`, its replicas and devices, and, plainly, when mirroring has one replica."""
    kind = {"MirroredStrategy": "mirrored", "MultiWorkerMirroredStrategy": "multiworker"}.get(
        type(strategy).__name__, "default")
    try:
        devices = [_short_device(d) for d in strategy.extended.worker_devices]
    except RuntimeError:  # the default strategy: TensorFlow's default device
        devices = [_short_device(d.name) for d in tf.config.list_logical_devices("GPU")[:1]] or ["CPU:0"]
    name = f"{requested} -> {kind}" if requested != kind else kind
    replicas = strategy.num_replicas_in_sync
    if kind != "default" and replicas == 1:
        return f"{name} strategy, but only 1 replica ({devices[0]}): no data parallelism"
    return f"{name} strategy, {_count(replicas, 'replica')} ({', '.join(devices)})"


def describe_run(recipe, run_dir, model, tokenizer, strategy, resumed_at=0):
    """The start block's lines: where, what model on what data, which devices, how long.

    Args:
        resumed_at: the step a resumed run goes on from (0: a new run).
    """
    config, data = recipe.train, recipe.data
    model_config = model.model_config
    where = f"resuming at step {resumed_at}" if resumed_at else "new run"
    train_store, validation = (tokenize_corpus(data, tokenizer, s) for s in ("train", "validation"))
    replicas = strategy.num_replicas_in_sync
    windows = count_windows(data, validation)
    if config.eval_steps:  # the first eval_steps training batches' worth
        windows = min(windows, config.eval_steps * config.batch_size * replicas)
    return [
        f"run:       {run_dir} ({where})",
        f"model:     {recipe.model_kind}, {format_count(model.count_params())} parameters "
        f"({_count(model_config.num_layers, 'layer')}, {_count(model_config.num_heads, 'head')}, hidden "
        f"{model_config.hidden_dim}, context {model_config.sequence_length})",
        f"data:      {data.corpus}, {train_store.num_tokens:,} train and "
        f"{validation.num_tokens:,} validation tokens",
        f"tokenizer: {tokenizer.kind}, {tokenizer.vocabulary_size:,} ids",
        f"devices:   {strategy_line(strategy, config.strategy)}",
        f"precision: {config.precision}, XLA {'on' if config.jit_compile else 'off'}",
        f"steps:     {config.max_steps:,}, batch {config.batch_size * replicas} x "
        f"{data.sequence_length} tokens, evaluation every {config.eval_interval:,} on "
        f"{windows:,} windows",
    ]


def terminal_columns():
    """The terminal's width (`$COLUMNS` first), 80 when unknown."""
    return shutil.get_terminal_size((80, 24)).columns


class TrainingConsole(keras.callbacks.Callback):
    """Prints one line per evaluation and, on a terminal, a progress bar of the interval's steps.

    The bar is `keras.utils.Progbar`, sized to fit `columns`; it is cleared before each evaluation
    line. Place it after `ThroughputLogger` (whose `tokens_per_second` it prints) and before
    anything that prints after an evaluation (samples).

    Args:
        max_steps, steps_per_interval: `train.max_steps`, `train.eval_interval`.
        interactive: draw the bar; default: when stdout is a terminal.
        columns: the width the bar must fit; default: the terminal's.
    """

    def __init__(self, max_steps, steps_per_interval, interactive=None, columns=None):
        super().__init__()
        self.max_steps = max_steps
        self.steps_per_interval = steps_per_interval
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self.columns = columns
        self._bar = None

    def _step(self):
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def on_train_begin(self, logs=None):
        self._started = None  # set once resumed weights and step are in place

    def on_epoch_begin(self, epoch, logs=None):
        now = time.perf_counter()
        if self._started is None:
            self._started, self._first_step = now, self._step()
            self._last_line, self._last_step = now, self._first_step
        if self.interactive:
            self._bar = self._make_bar()

    def _make_bar(self):
        columns = self.columns or terminal_columns()
        # What Progbar writes besides the bar, at its widest: "250/250 ", " 10:02:03", " 999ms/step"
        # and " - loss: 1.2345e-04" (left out below 10 columns of bar); one column spare, so the
        # cursor never wraps.
        fixed, loss = 2 * len(str(self.steps_per_interval)) + 2 + 9 + 11, 19
        self._show_loss = columns - 1 - fixed - loss >= 10
        width = max(1, min(30, columns - 1 - fixed - loss * self._show_loss))
        return keras.utils.Progbar(
            self.steps_per_interval, width=width, stateful_metrics=["loss"], unit_name="step"
        )

    def on_train_batch_end(self, batch, logs=None):
        if self._bar is None:
            return
        values = [("loss", float(logs["loss"]))] if self._show_loss and logs and "loss" in logs else []
        self._bar.update(batch + 1, values, finalize=False)  # the evaluation line replaces it

    def _clear_bar(self):
        if self._bar is not None:
            columns = self.columns or terminal_columns()
            sys.stdout.write("\r" + " " * (columns - 1) + "\r")
            self._bar = None

    def on_epoch_end(self, epoch, logs=None):
        self._clear_bar()
        now = time.perf_counter()
        step = self._step()
        # The last interval's pace for the rest, from line to line: its evaluation, and the sample,
        # checkpoints and backup after the line before, included (the first carries compilation).
        seconds, steps = now - self._last_line, step - self._last_step
        self._last_line, self._last_step = now, step
        remaining = seconds / steps * (self.max_steps - step) if steps > 0 else None
        print(evaluation_line(step, self.max_steps, logs or {}, now - self._started, remaining), flush=True)

    def on_train_end(self, logs=None):
        self._clear_bar()
        sys.stdout.flush()
