"""kgpt.training.console: the start block, the evaluation line, a progress bar that fits."""

import re
import types

import numpy as np
import pytest
import tensorflow as tf

from kgpt.training import console

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _screen_lines(output):
    """What a terminal shows, line by line: each `\\r` starts over, ANSI colours take no room."""
    return [ANSI.sub("", part) for line in output.replace("\b", "").split("\n") for part in line.split("\r")]


def test_evaluation_line_shows_step_losses_perplexities_rate_and_time():
    logs = {"loss": 2.0412, "val_loss": 2.0796, "perplexity": 7.7, "tokens_per_second": 40123.0}
    line = console.evaluation_line(250, 2000, logs, elapsed=32.4, remaining=225.0)
    assert line == "step 250/2000  loss 2.041  val 2.080  ppl 7.70/8.00  40.1k tok/s  0:32<3:45"
    assert len(line) <= 80
    last = console.evaluation_line(2000, 2000, {**logs, "val_loss": 9.5}, elapsed=3725, remaining=0.0)
    assert last.endswith("ppl 7.70/13,360  40.1k tok/s  1:02:05")  # nothing remains at the end


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("loss", [12.3456, 1e-4, float("nan")])
def test_progress_bar_fits_the_terminal_and_never_cuts_a_value(columns, loss, capsys):
    callback = console.TrainingConsole(max_steps=20000, steps_per_interval=2500, interactive=True,
                                       columns=columns)
    callback.set_model(types.SimpleNamespace(optimizer=types.SimpleNamespace(iterations=np.int64(0))))
    callback.on_train_begin()
    callback.on_epoch_begin(0)
    callback._bar.interval = 0  # draw every update (Progbar draws at most every 50 ms)
    for batch in range(249, 2500, 250):
        callback.on_train_batch_end(batch, {"loss": loss})
    callback.model.optimizer.iterations = np.int64(2500)
    callback.on_epoch_end(0, {"loss": 2.0, "val_loss": 2.1, "tokens_per_second": 5e4})
    lines = _screen_lines(capsys.readouterr().out)
    assert max(len(line) for line in lines) < columns
    bars = [line for line in lines if "/2500" in line]
    assert len(bars) == 10 and bars[-1].startswith("2500/2500 ━")
    shown = f"{loss:.4f}" if loss > 1e-3 else f"{loss:.4e}"
    assert all(line.rstrip().endswith(f"loss: {shown}") for line in bars)
    assert lines[-2].startswith("step 2500/20000  loss 2.000")  # the bar is cleared for it


def test_evaluation_lines_time_the_rest_at_the_last_intervals_pace(monkeypatch, capsys):
    clock = iter([100.0, 160.0, 165.0, 180.0])  # 60 s with compilation, then 20 s (5 s of samples)
    monkeypatch.setattr(console.time, "perf_counter", lambda: next(clock))
    callback = console.TrainingConsole(max_steps=400, steps_per_interval=100, interactive=False)
    optimizer = types.SimpleNamespace(iterations=np.int64(100))  # resumed at step 100
    callback.set_model(types.SimpleNamespace(optimizer=optimizer))
    callback.on_train_begin()
    for epoch in (1, 2):
        callback.on_epoch_begin(epoch)
        optimizer.iterations += 100
        callback.on_epoch_end(epoch, {"loss": 2.0})
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["step 200/400  loss 2.000  ppl 7.39  1:00<2:00", "step 300/400  loss 2.000  ppl 7.39  1:20<0:20"]


def test_strategy_line_says_when_mirrored_has_one_replica():
    if len(tf.config.list_logical_devices()) > 1:
        pytest.skip("this process has more than one device")
    line = console.strategy_line(tf.distribute.MirroredStrategy(), "mirrored")
    assert line == "mirrored strategy, but only 1 replica (CPU:0): no data parallelism"
    default = console.strategy_line(tf.distribute.get_strategy(), "auto")
    assert default == "auto -> default strategy, 1 replica (CPU:0)"


def test_start_block_describes_the_run(trained_run):
    from kgpt.recipe import load_recipe
    from kgpt.rundir import RunDirectory

    run = RunDirectory(trained_run.run_dir)
    recipe = load_recipe(trained_run.recipe_path)
    model, tokenizer = run.load_model(), run.load_tokenizer()
    lines = console.describe_run(recipe, run.path, model, tokenizer, tf.distribute.get_strategy(), 10)
    text = "\n".join(lines)
    assert lines[0] == f"run:       {run.path} (resuming at step 10)"
    assert f"gpt, {model.count_params():,} parameters (1 layer, 2 heads, hidden 16, context 16)" in text
    assert f"tokenizer: char, {tokenizer.vocabulary_size} ids" in text
    assert re.search(r"data: +text, [\d,]+ train and [\d,]+ validation tokens", text)
    assert "precision: float32, XLA off" in text
    assert "steps:     20, batch 4 x 16 tokens, evaluation every 10 on 8 windows" in text
    assert all(len(line) <= 80 for line in lines[1:])
