import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

from kgpt.cli import main
from kgpt.recipe import load_recipe
from kgpt.rundir import RunDirectory, load_model
from kgpt.training.train import train


@pytest.fixture
def recipe_path(write_toy_recipe):
    return write_toy_recipe()


def _history(run_dir):
    with open(os.path.join(run_dir, "history.csv")) as f:
        return list(csv.DictReader(f))


def test_fit_lowers_the_loss_and_writes_the_run_directory(trained_run):
    # conftest's session run: train(load_recipe(recipe_path), run_dir) of this file's recipe_path.
    run_dir, result = trained_run.run_dir, trained_run.result
    assert result.steps == 20 and result.stopped is None
    for name in ("config.json", "tokenizer", "best.keras", "final.keras", "history.csv", "logs", "backup"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    rows = _history(run_dir)
    assert len(rows) == 2
    assert float(rows[1]["loss"]) < float(rows[0]["loss"])
    # Perplexity is exp(loss) of the same tokens (the validation loss and perplexity agree).
    assert float(rows[1]["val_perplexity"]) == pytest.approx(np.exp(float(rows[1]["val_loss"])), rel=1e-4)
    for key in ("learning_rate", "tokens_per_second"):
        assert float(rows[1][key]) > 0
    final = keras.saving.load_model(os.path.join(run_dir, "final.keras"))  # compiled: the optimizer's state
    assert int(final.optimizer.iterations.numpy()) == 20
    # Below the loss of a uniform guess over the vocabulary: the model learned something.
    assert result.history["val_loss"][-1] < 0.9 * np.log(final.model_config.vocabulary_size)
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["train"]["max_steps"] == 20


def test_rerun_with_the_same_recipe_resumes_and_a_different_one_is_refused(recipe_path, trained_run, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained_run.run_dir, run_dir)  # train(recipe, run_dir), run once per session
    recipe = load_recipe(recipe_path)
    again = train(recipe, run_dir, verbose=0)  # already finished: nothing more to do
    assert again.steps == 20 and len(_history(run_dir)) == 2
    changed = load_recipe(recipe_path, ["train.learning_rate=0.5", "model.hidden_dim=32"])
    with pytest.raises(ValueError, match=r"model\.hidden_dim \(16 -> 32\).*train\.learning_rate"):
        train(changed, run_dir, verbose=0)


def test_early_stopping_stops(recipe_path, tmp_path):
    # A learning rate far below float32 resolution leaves the weights unchanged, so val_loss
    # never improves and patience=1 stops after the second evaluation.
    overrides = [
        "train.learning_rate=1e-15", "train.min_learning_rate=0.0", "train.weight_decay=0.0",
        "train.patience=1", "train.max_steps=50",
    ]
    result = train(load_recipe(recipe_path, overrides), str(tmp_path / "run"), verbose=0)
    assert result.steps == 20
    assert "early stopping" in result.stopped


class _Interrupt(keras.callbacks.Callback):
    """Ends a run like a kill would, right after the first evaluation's backup."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_early_stopping_counts_the_evaluations_before_a_resume(recipe_path, tmp_path):
    # Frozen weights: val_loss never improves, so patience=2 stops after the third evaluation.
    overrides = [
        "train.learning_rate=1e-15", "train.min_learning_rate=0.0", "train.weight_decay=0.0",
        "train.patience=2", "train.max_steps=60",
    ]
    recipe = load_recipe(recipe_path, overrides)
    assert train(recipe, str(tmp_path / "whole"), verbose=0).steps == 30
    run_dir = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):  # _Interrupt, right after the first backup
        train(recipe, run_dir, verbose=0, callbacks=[_Interrupt()])
    assert RunDirectory(run_dir).backup_state()[0] == 10
    resumed = train(recipe, run_dir, verbose=0)
    assert resumed.steps == 30 and "early stopping" in resumed.stopped
    assert len(RunDirectory(run_dir).backup_state()[1]) == 3
    # Started once more, the stopped run trains no further.
    assert train(recipe, run_dir, verbose=0).steps == 30


@pytest.mark.parametrize("eval_steps", [2, 1000])
def test_every_evaluation_scores_the_same_validation_batches(recipe_path, tmp_path, eval_steps):
    # Frozen weights (a learning rate below float32 resolution): any change in val_loss would
    # come from scoring different batches, or none once a short split ran out.
    overrides = [
        "train.learning_rate=1e-15", "train.min_learning_rate=0.0", "train.weight_decay=0.0",
        "train.max_steps=30", f"train.eval_steps={eval_steps}",
    ]
    result = train(load_recipe(recipe_path, overrides), str(tmp_path / "run"), verbose=0)
    losses = result.history["val_loss"]
    assert len(losses) == 3 and np.all(np.isfinite(losses)) and losses[0] > 1.0
    assert losses[0] == losses[1] == losses[2]


@pytest.mark.parametrize("overrides", [
    [], ["train.eval_steps=3", "train.eval_batch_size=5"], ["train.eval_steps=1000", "data.mode=document"],
])
def test_validation_data_knows_how_many_batches_it_has(recipe_path, overrides):
    # Keras' evaluate reads an unknown-size dataset until it ends, and warns at every evaluation.
    from kgpt.data.run_tokenizer import make_tokenizer
    from kgpt.training.train import make_datasets

    recipe = load_recipe(recipe_path, overrides)
    _, validation = make_datasets(recipe, make_tokenizer(recipe))
    assert int(validation.cardinality()) == len(list(validation)) > 0


@pytest.mark.slow
def test_nan_loss_stops_with_a_message(recipe_path, tmp_path, capsys):
    overrides = ["train.learning_rate=1e30", "train.min_learning_rate=1e29", "train.clip_norm=0.0", "train.warmup_steps=0"]
    result = train(load_recipe(recipe_path, overrides), str(tmp_path / "run"), verbose=0)
    assert result.steps < 20
    assert "at step" in result.stopped and "lower train.learning_rate" in result.stopped
    assert "Training stopped: the loss became nan" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "run" / "final.keras")
    # Through the CLI: the message, no final model and exit code 1 (not a traceback).
    arguments = ["train", str(recipe_path), "--run-dir", str(tmp_path / "cli-run")]
    assert main(arguments + [f"--set={override}" for override in overrides]) == 1
    printed = capsys.readouterr().out
    assert "Stopped early:" in printed and "nan at step" in printed
    assert not os.path.exists(tmp_path / "cli-run" / "final.keras")


@pytest.mark.slow
def test_init_from_starts_from_the_runs_weights_and_keeps_its_sizes(recipe_path, trained_run, tmp_path):
    source = str(tmp_path / "source")  # (the error below names it)
    shutil.copytree(trained_run.run_dir, source)  # train(load_recipe(recipe_path), source), once per session
    trained = load_model(os.path.join(source, "final.keras"))
    # A learning rate of 1e-9: the fine-tuned model is the source's, with the recipe's dropout.
    overrides = [f"train.init_from={source}", "train.learning_rate=1e-9",
                 "train.min_learning_rate=0", "model.dropout=0.3"]
    tuned_dir = str(tmp_path / "tuned")
    train(load_recipe(recipe_path, overrides), tuned_dir, verbose=0)
    tuned = load_model(os.path.join(tuned_dir, "final.keras"))
    assert tuned.model_config.dropout == 0.3
    assert tuned.model_config.hidden_dim == trained.model_config.hidden_dim
    for before, after in zip(trained.get_weights(), tuned.get_weights()):
        np.testing.assert_allclose(after, before, atol=1e-5)
    # A size that differs from the source's is an error naming both values.
    with pytest.raises(ValueError, match=r"model\.hidden_dim: recipe 32 vs .*source: 16"):
        train(load_recipe(recipe_path, [f"train.init_from={source}", "model.hidden_dim=32"]),
              str(tmp_path / "conflict"), verbose=0)
    assert not os.path.exists(tmp_path / "conflict")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.learning_rat=1.0"], r"Unknown key train\.learning_rat\. Did you mean train\.learning_rate"),
        (["train.batch_size=\"four\""], r"train\.batch_size='four' has type str; expected int"),
        (["model.num_layer=2"], r"Unknown key model\.num_layer"),
        (["data.tokenizer=words"], r"Unknown tokenizer='words'"),
        (["optimizer.lr=1"], r"section one of model, data, train"),
        (["train.strategy=tpu"], r"Unknown train\.strategy='tpu'.*one of: auto"),
        (["train.steps_per_execution=3"], r"eval_interval=10 is not a multiple of train\.steps_per_execution=3"),
    ],
)
def test_recipe_errors_name_the_key(recipe_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(recipe_path, overrides)


def test_cli_train_reports_recipe_errors_with_exit_2(recipe_path, capsys):
    assert main(["train", str(recipe_path), "--set", "train.max_step=3"]) == 2
    err = capsys.readouterr().err
    assert "Unknown key train.max_step" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "missing.toml"]) == 2
    assert "No such recipe: missing.toml" in capsys.readouterr().err


def test_an_unusable_cache_dir_is_refused_before_a_tokenizer_is_trained(recipe_path, tmp_path, monkeypatch, capsys):
    def trained_a_tokenizer(recipe):
        raise AssertionError("a tokenizer was made before data.cache_dir was checked")

    monkeypatch.setattr("kgpt.training.train.make_tokenizer", trained_a_tokenizer)
    (tmp_path / "file").write_text("")
    code = main(["train", str(recipe_path), "--run-dir", str(tmp_path / "run"),
                 "--set", f"data.cache_dir={tmp_path / 'file'}"])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith(f"kgpt train: error: data.cache_dir={str(tmp_path / 'file')!r} cannot")
    assert not (tmp_path / "run").exists()


def test_cli_train_runs_a_recipe(recipe_path, tmp_path, capsys, recwarn):
    run_dir = tmp_path / "cli-run"
    assert main(["train", str(recipe_path), "--run-dir", str(run_dir), "--set", "train.max_steps=20"]) == 0
    assert (run_dir / "final.keras").exists()
    # Not a terminal: plain lines, no colours or redrawn bars, no line per step.
    out = capsys.readouterr().out
    assert not re.search(r"[\x1b\r\b]", out)
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == [
        "run:", "model:", "data:", "tokenizer:", "devices:", "precision:", "steps:", "step", "step", "Trained"]
    assert lines[0] == f"run:       {run_dir} (new run)"
    number = r"\d+\.\d{3}"
    evaluation = rf"step 10/20  loss {number}  val {number}  ppl [\d.]+/[\d.]+  [\d.]+k? tok/s  \d+:\d\d<\d+:\d\d"
    assert re.fullmatch(evaluation, lines[7]), lines[7]
    assert re.fullmatch(r"step 20/20 .* \d+:\d\d", lines[8]), lines[8]
    assert lines[9].startswith(f"Trained 20 steps into {run_dir}; best val_loss ")
    # Keras evaluates exactly the validation batches there are: no "ran out of data" warning
    # (nor any other a user would see; Python hides DeprecationWarnings outside __main__).
    assert [str(w.message) for w in recwarn if not issubclass(w.category, DeprecationWarning)] == []


class _InterruptAt(keras.callbacks.Callback):
    """Ctrl-C at optimizer step `step` (a KeyboardInterrupt from inside `fit`)."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            raise KeyboardInterrupt


def test_a_short_last_interval_is_evaluated_and_a_finished_run_trains_nothing(recipe_path, tmp_path, capsys):
    recipe = load_recipe(recipe_path, ["train.max_steps=25"])  # eval_interval=10: 10, 10 and 5 steps
    result = train(recipe, tmp_path / "run", verbose=0)
    assert result.steps == 25 and result.stopped is None
    assert len(result.history["val_loss"]) == 3
    assert [row["epoch"] for row in _history(tmp_path / "run")] == ["0", "1", "2"]
    again = train(recipe, tmp_path / "run", verbose=0)
    assert again.steps == 25 and again.trained_steps == 0 and len(_history(tmp_path / "run")) == 3
    assert "Fitted" not in capsys.readouterr().out  # nothing needed fitting


@pytest.mark.slow
def test_an_interrupt_in_the_short_last_interval_resumes_to_the_uninterrupted_weights(recipe_path, tmp_path):
    recipe = load_recipe(recipe_path, ["train.max_steps=25"])
    reference = train(recipe, tmp_path / "reference", verbose=0)
    with pytest.raises(KeyboardInterrupt) as interrupt:
        train(recipe, tmp_path / "run", verbose=0, callbacks=[_InterruptAt(22)])
    assert str(interrupt.value) == (
        "interrupted at step 22; run the same command to resume (from step 20, the last evaluation)."
    )
    resumed = train(recipe, tmp_path / "run", verbose=0)
    assert (resumed.initial_steps, resumed.steps) == (20, 25)
    assert [row["epoch"] for row in _history(tmp_path / "run")] == ["0", "1", "2"]
    np.testing.assert_allclose(resumed.history["val_loss"], reference.history["val_loss"][2:], rtol=1e-5)
    resumed_weights = load_model(tmp_path / "run" / "final.keras").get_weights()
    reference_weights = load_model(tmp_path / "reference" / "final.keras").get_weights()
    assert max(float(np.abs(a - b).max()) for a, b in zip(resumed_weights, reference_weights)) < 1e-5


def test_a_recipe_tried_with_a_few_steps_fits_its_warm_up_and_says_so(recipe_path, tmp_path, capsys):
    # What `kgpt train pipelines/imdb.toml --set train.max_steps=50` asks of a long recipe.
    run_dir = tmp_path / "run"
    args = ["train", str(recipe_path), "--run-dir", str(run_dir), "--set", "train.max_steps=5",
            "--set", "train.warmup_steps=200"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("Fitted to train.max_steps=5: warmup_steps 200 -> 0, eval_interval 10 -> 5.") == 1
    assert "Trained 5 steps" in out
    assert [row["epoch"] for row in _history(run_dir)] == ["0"]
    with open(run_dir / "config.json") as f:
        assert json.load(f)["train"]["warmup_steps"] == 0  # what trained; the same command resumes it
    assert main(args) == 0
    assert "Nothing left to train" in capsys.readouterr().out


def _kgpt(args, **kwargs):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "kgpt", *args], env=env, **kwargs)


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_and_finishes_at_the_planned_step(recipe_path, tmp_path, request):
    run_dir = tmp_path / "run"
    args = ["train", str(recipe_path), "--run-dir", str(run_dir), "--set", "train.max_steps=60"]
    # An uninterrupted run of the same recipe, trained meanwhile (its own token cache: the two
    # processes never write one folder), compared with the resumed run at the end.
    reference_dir = tmp_path / "reference"
    reference = _kgpt(["train", str(recipe_path), "--run-dir", str(reference_dir), "--set", "train.max_steps=60",
                       "--set", f"data.cache_dir={tmp_path / 'reference-cache'}"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    request.addfinalizer(reference.kill)  # a no-op once it has finished
    process = _kgpt(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metadata = run_dir / "backup" / "training_metadata.json"
    deadline = time.time() + 240
    while time.time() < deadline and not metadata.exists():
        time.sleep(0.2)
    assert metadata.exists(), "no backup was written"
    os.kill(process.pid, signal.SIGKILL)  # mid-run, right after the first backup
    process.wait(timeout=60)
    assert not (run_dir / "final.keras").exists()
    resumed = _kgpt(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    # From the last backup: the first, or a later one written before the kill landed.
    resumed_at = re.search(r"resumed at step (\d+); 60 in all", output)
    assert resumed_at and int(resumed_at.group(1)) in range(10, 60, 10), output
    # The training state: Keras' own load, compiled (kgpt's loads are for the weights).
    assert int(keras.saving.load_model(run_dir / "final.keras").optimizer.iterations.numpy()) == 60
    epochs = [int(row["epoch"]) for row in _history(run_dir)]
    assert epochs == list(range(6))  # every evaluation logged once
    # The resumed run continued the same data stream from the same state: it ends where an
    # uninterrupted run ends.
    assert reference.wait(timeout=300) == 0
    resumed_weights = load_model(run_dir / "final.keras").get_weights()
    reference_weights = load_model(reference_dir / "final.keras").get_weights()
    assert max(float(np.abs(a - b).max()) for a, b in zip(resumed_weights, reference_weights)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_a_stop_before_the_first_evaluation_leaves_a_run_the_same_command_finishes(
    recipe_path, tmp_path, signal_number
):
    # CSVLogger opens history.csv when fit starts; its first row comes with the first evaluation.
    run_dir = tmp_path / "run"
    args = ["train", str(recipe_path), "--run-dir", str(run_dir)]
    process = _kgpt(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    history = run_dir / "history.csv"
    deadline = time.time() + 240
    while time.time() < deadline and not history.exists() and process.poll() is None:
        time.sleep(0.02)
    assert history.exists() and history.stat().st_size == 0, "missed the moment before the first row"
    os.kill(process.pid, signal_number)
    _, err = process.communicate(timeout=60)
    assert not (run_dir / "backup").exists()
    if signal_number == signal.SIGINT:
        assert process.returncode == 130 and "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.startswith("kgpt train:")]
        assert len(lines) == 1 and err.strip().endswith(lines[0]), err
        assert re.fullmatch(
            r"kgpt train: interrupted at step \d+, before the first evaluation; run the same command "
            r"to start again\.", lines[0]
        ), err
    rerun = _kgpt(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    assert "Trained 20 steps" in output
    assert [int(row["epoch"]) for row in _history(run_dir)] == [0, 1]


MIRRORED_CHECK = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
    )
    from kgpt.recipe import load_recipe
    from kgpt.rundir import load_model
    from kgpt.training.train import train
    results = {}
    for strategy, batch in (("default", 8), ("mirrored", 4)):
        # Same global batch (8): one device, or two replicas of 4. A large epsilon makes AdamW's
        # step linear in the gradient, so float32 summation-order noise stays at ~1e-7.
        recipe = load_recipe(sys.argv[1], [f"train.strategy={strategy}", f"train.batch_size={batch}",
            "train.epsilon=1.0", "train.clip_norm=0.05", "train.max_steps=10", "train.learning_rate=0.05"])
        result = train(recipe, sys.argv[2] + strategy, verbose=0)
        weights = load_model(sys.argv[2] + strategy + "/final.keras").get_weights()
        results[strategy] = (result.history["loss"][-1], weights)
    (loss_a, w_a), (loss_b, w_b) = results["default"], results["mirrored"]
    print(json.dumps({"loss": abs(loss_a - loss_b),
                      "weights": max(float(np.abs(a - b).max()) for a, b in zip(w_a, w_b)),
                      "moved": max(float(np.abs(a).max()) for a in w_a)}))
    """
)


@pytest.mark.distributed
def test_mirrored_on_two_devices_equals_one_device(recipe_path, tmp_path):
    script = tmp_path / "check.py"
    script.write_text(MIRRORED_CHECK)
    result = subprocess.run(
        [sys.executable, str(script), str(recipe_path), str(tmp_path / "run-")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    differences = json.loads(result.stdout.strip().splitlines()[-1])
    assert differences["loss"] < 1e-5
    assert differences["weights"] < 1e-5


def _free_ports(count):
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _run_two_workers(arguments):
    """Runs `python *arguments(index)` as workers 0 and 1 of one local TF_CONFIG cluster; asserts both
    succeed and returns their outputs."""
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        # Same oneDNN setting as this process, so a one-process reference has equal numerics.
        onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "0")
        env = {**os.environ, "TF_CONFIG": config, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": onednn}
        processes.append(subprocess.Popen([sys.executable, *arguments(index)], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=300)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output[-3000:]
    return outputs


@pytest.mark.distributed
def test_multiworker_fit_with_two_local_workers_equals_one_process(recipe_path, tmp_path):
    run_dir = tmp_path / "multi"
    # A large AdamW epsilon keeps float32 summation-order noise from being amplified.
    args = ["train", str(recipe_path), "--run-dir", str(run_dir), "--set", "train.strategy=multiworker",
            "--set", "train.epsilon=1.0"]
    outputs = _run_two_workers(lambda index: ["-m", "kgpt", *args])
    assert "Trained 20 steps" in outputs[0]
    final = keras.saving.load_model(run_dir / "final.keras")  # written by the chief only; compiled
    assert int(final.optimizer.iterations.numpy()) == 20
    assert (run_dir / "backup" / "worker-0").is_dir() and (run_dir / "backup" / "worker-1").is_dir()
    # Two workers of batch 4 see the same global batches as one process of batch 8.
    single = train(load_recipe(recipe_path, ["train.batch_size=8", "train.epsilon=1.0"]), str(tmp_path / "single"), verbose=0)
    multi_loss = [float(row["loss"]) for row in _history(run_dir)]
    np.testing.assert_allclose(multi_loss, single.history["loss"], rtol=1e-4)


# Each worker iterates the training input `fit` would get, for one pass, and saves its windows.
_WORKER_WINDOWS = """
import sys
import numpy as np
from kgpt.recipe import load_recipe
from kgpt.training import distribute, train
recipe = load_recipe(sys.argv[1])
strategy = distribute.make_strategy("multiworker")
tokenizer = train.make_tokenizer(recipe)
dataset, _ = train.make_datasets(recipe, tokenizer, strategy)
windows = [np.concatenate(strategy.experimental_local_results(x)) for _, (x, y) in zip(range(int(sys.argv[2])), dataset)]
np.save(sys.argv[3], np.concatenate(windows))
"""


@pytest.mark.distributed
def test_two_local_workers_train_disjoint_windows_that_make_one_pass(tmp_path):
    from kgpt.data.pipeline import make_dataset
    from kgpt.data.run_tokenizer import make_tokenizer

    # 64 documents of 23 random letters; shards of 16 documents (384 tokens, 47 windows of 8 each).
    rng = np.random.default_rng(0)
    lines = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 23)) for _ in range(64)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "valid.txt").write_text("one more line of the corpus.\n" * 4)
    recipe_path = tmp_path / "recipe.toml"
    recipe_path.write_text(textwrap.dedent(f"""
        [model]
        num_layers = 1
        num_heads = 2
        hidden_dim = 16
        [data]
        corpus = "text"
        files = ["{tmp_path / 'train.txt'}"]
        validation_files = ["{tmp_path / 'valid.txt'}"]
        document_separator = "line"
        tokenizer = "char"
        sequence_length = 8
        shard_bytes = {16 * 23}
        cache_dir = "{tmp_path / 'cache'}"
        [train]
        batch_size = 1
        max_steps = 10
        eval_interval = 10
    """))
    recipe = load_recipe(str(recipe_path))
    tokenizer = make_tokenizer(recipe)
    one_pass = np.concatenate([x.numpy() for x, _ in make_dataset(recipe.data, tokenizer, "train", 1)])
    assert len(one_pass) == 4 * 47
    steps = 2 * 47 // 4  # per worker: two shards' windows in batches of 4 (global batch 8)
    recipe_path.write_text(recipe_path.read_text().replace("batch_size = 1", "batch_size = 4"))
    _run_two_workers(lambda index: ["-c", _WORKER_WINDOWS, str(recipe_path), str(steps), str(tmp_path / f"w{index}.npy")])
    seen = [np.load(tmp_path / f"w{index}.npy") for index in range(2)]
    assert [len(s) for s in seen] == [2 * 47 - 2, 2 * 47 - 2]  # 23 batches of 4 from 94 windows
    rows = lambda array: {tuple(row) for row in array}  # noqa: E731
    assert all(len(rows(s)) == len(s) for s in seen)  # no window twice on one worker
    assert not rows(seen[0]) & rows(seen[1])  # nor on both
    assert rows(seen[0]) | rows(seen[1]) <= rows(one_pass)


def test_samples_follow_the_recipe_past_the_context(recipe_path, tmp_path, capsys):
    import tensorflow as tf

    from kgpt.data.run_tokenizer import make_tokenizer
    from kgpt.training.callbacks import SampleText
    from kgpt.training.train import build_model, make_callbacks

    overrides = ["train.sample_prompt=the cat", "train.sample_length=40",
                 "train.sample_temperature=0.5", "train.sample_top_k=7"]
    recipe = load_recipe(recipe_path, overrides)
    tokenizer = make_tokenizer(recipe)
    model = build_model(recipe, tokenizer)
    callbacks = make_callbacks(recipe, RunDirectory(tmp_path / "run"), tokenizer, model,
                               tf.distribute.get_strategy())
    (sample,) = [c for c in callbacks if isinstance(c, SampleText)]
    # A 16-token context: the 40 new tokens go on past it (the sample is not cut to 9).
    assert (sample.temperature, sample.top_k, sample.max_new_tokens, sample.seed) == (0.5, 7, 40, 1337)
    sample.set_model(model)
    text = sample.sample()
    # (this seed's sample ends at end-of-text after 20 tokens: more than the 9 that fit after the prompt)
    assert text.startswith("the cat") and len("the cat") + 9 < len(text) <= len("the cat") + 40
