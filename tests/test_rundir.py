"""The run directory: layout, resume state, recipe identity, the lock, stale files, failed starts."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from kgpt import files
from kgpt.cli import main
from kgpt.recipe import load_recipe
from kgpt.rundir import RunDirectory
from kgpt.training.train import train


@pytest.fixture
def recipe_path(write_toy_recipe):
    return write_toy_recipe(max_steps=10)


def _write_history(path, losses):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "loss", "val_loss"])
        for epoch, loss in enumerate(losses):
            writer.writerow([epoch, loss + 1, loss])


def test_trim_history_keeps_the_backed_up_evaluations(tmp_path):
    run = RunDirectory(tmp_path)
    _write_history(run.history_path, [3.0, 2.0, 1.5, 1.0])
    run.trim_history(2)
    with open(run.history_path) as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1"]
    assert run.best_logged() == 2.0
    assert os.listdir(tmp_path) == ["history.csv"]  # no temporary left


@pytest.mark.parametrize("text", ["", "epoch,loss,val_loss\r\n"])
def test_trim_history_of_a_run_killed_before_its_first_evaluation(tmp_path, text):
    # CSVLogger opens history.csv when fit starts and writes a row per evaluation.
    run = RunDirectory(tmp_path)
    with open(run.history_path, "w", newline="") as f:
        f.write(text)
    run.trim_history(0)
    with open(run.history_path, newline="") as f:
        assert f.read() == text
    assert run.best_logged() is None


def _damage(path, how):
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        with open(path, "w") as f:
            f.write('{"epoch": 1,\n')


@pytest.mark.parametrize("name, how", [("latest.weights.h5", "truncated"), ("training_metadata.json", "garbled")])
def test_a_damaged_backup_is_a_one_line_error_naming_the_file(trained_run, tmp_path, capsys, name, how):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run_dir)
    backup = run_dir / "backup"
    if name == "training_metadata.json":  # a backup written before the weights carried its position
        with h5py.File(backup / "latest.weights.h5", "a") as file:
            del file.attrs["training_metadata.json"]
    _damage(backup / name, how)
    assert main(["train", str(trained_run.recipe_path), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"kgpt train: error: {backup / name} is damaged (")
    assert f"delete {backup} to train this run again from step 0" in err


def test_best_logged_and_backup_state_when_nothing_is_there(tmp_path):
    run = RunDirectory(tmp_path)
    assert run.best_logged() is None
    assert run.backup_state() == (0, [])
    os.makedirs(run.backup_dir())
    with open(os.path.join(run.backup_dir(), "training_metadata.json"), "w") as f:
        json.dump({"epoch": 3, "step": 750}, f)
    assert run.backup_state() == (0, [])  # no weights: nothing to resume from
    h5py.File(os.path.join(run.backup_dir(), "latest.weights.h5"), "w").close()
    assert run.backup_state() == (750, [])  # a backup from before losses were kept in the weights
    _write_history(run.history_path, [3.0, 1.25, 2.0])
    assert np.isclose(run.best_logged(), 1.25)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r"data\.files: 'corpus\.txt' matches no file"),
        ("empty", r"The text corpus has 0 document\(s\)"),
        ("latin-1", r"corpus\.txt is not valid UTF-8 at byte offset"),
        ("binary", r"corpus\.txt is not a text file: a NUL byte at offset 7\b"),
        ("too small", r"fewer than one window"),
        ("num_heads", r"hidden_dim=16 is not divisible by num_heads=3"),
    ],
)
def test_a_failed_start_leaves_no_run(recipe_path, tmp_path, case, message, capsys):
    corpus = tmp_path / "corpus.txt"
    text = corpus.read_text()
    arguments = ["train", str(recipe_path), "--run-dir", str(tmp_path / "run")]
    broken = list(arguments)
    if case == "missing":
        corpus.unlink()
    elif case == "empty":
        corpus.write_text("\n\n \n")
    elif case == "latin-1":
        corpus.write_bytes(text.encode("utf-8") + "café".encode("latin-1"))
    elif case == "binary":
        corpus.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00")  # an executable
    elif case == "too small":
        corpus.write_text("a b\n\nc d\n\ne f\n\ng h\n\ni j")
    else:
        broken += ["--set", "model.num_heads=3"]
    assert main(broken) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and re.search(message, error), error
    assert not (tmp_path / "run").exists()  # no config.json, no tokenizer/: not a run
    if case == "num_heads":  # the fixed (different) recipe then starts afresh
        corpus.write_text(text)
        assert main(arguments) == 0
        assert "Trained 10 steps" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated shard", "other tokenizer", "index missing"])
def test_a_damaged_token_store_is_a_one_line_error_or_resumed(write_toy_recipe, tmp_path, capsys, damage):
    from kgpt.data.pipeline import tokenize_corpus
    from kgpt.data.run_tokenizer import make_tokenizer

    recipe_path = write_toy_recipe(max_steps=2, eval_interval=2, eval_steps=1, warmup_steps=1)
    recipe = load_recipe(recipe_path)
    store = tokenize_corpus(recipe.data, make_tokenizer(recipe), "train")
    index = os.path.join(store.path, "index.json")
    if damage == "truncated shard":
        with open(store.token_files()[0], "r+b") as file:
            file.truncate(7)
    elif damage == "other tokenizer":
        with open(index) as file:
            saved = json.load(file)
        saved["description"]["tokenizer"]["fingerprint"] = "f" * 64
        with open(index, "w") as file:
            json.dump(saved, file)
    else:  # killed before its index was written: resumed, not an error
        os.remove(index)
    code = main(["train", str(recipe_path), "--run-dir", str(tmp_path / "run")])
    error = capsys.readouterr().err
    if damage == "index missing":
        assert code == 0 and os.path.isfile(index)
        return
    assert code == 2 and len(error.strip().splitlines()) == 1, error
    named = store.token_files()[0] if damage == "truncated shard" else index
    assert named in error and f"Delete {store.path}" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_run_directory_is_locked_while_it_trains(recipe_path, tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from kgpt.rundir import RunDirectory
            with RunDirectory({str(run_dir)!r}).lock():
                print("locked", flush=True)
                time.sleep(120)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"{run_dir} is in use by another kgpt training \(pid {holder.pid}"):
            train(load_recipe(recipe_path), str(run_dir), verbose=0)
        assert not RunDirectory(run_dir).is_run()
    finally:
        holder.send_signal(signal.SIGKILL)  # the OS releases the lock of a killed process
        holder.wait()
    assert train(load_recipe(recipe_path), str(run_dir), verbose=0).steps == 10


@pytest.mark.parametrize("run_dir", ["gs://bucket/run", "ram://run"])
def test_a_run_directory_must_be_a_local_path(recipe_path, tmp_path, monkeypatch, capsys, run_dir):
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert main(["train", str(recipe_path), "--run-dir", run_dir]) == 2
    assert capsys.readouterr().err.strip() == (
        f"kgpt train: error: {run_dir}: run directories must be local paths (a run is held by an OS "
        "file lock and its checkpoints are renamed into place); pass a local --run-dir."
    )
    assert sorted(os.listdir(tmp_path)) == before  # no local "gs:" or "ram:" folder


@pytest.mark.slow
def test_temporaries_of_a_killed_run_are_removed_on_the_next_start(write_toy_recipe, trained_run, tmp_path):
    recipe_path = write_toy_recipe()  # the recipe of conftest's trained toy run
    run = RunDirectory(tmp_path / "run")
    shutil.copytree(trained_run.run_dir, run.path)  # trained by that recipe
    dead = f".tmp-{files._host()}-999999-abc-"
    stale = [
        run.file(".tmp-k2j3h4.keras"),  # the naming of kgpt before kgpt.files
        run.file(dead + "best.keras"),
        os.path.join(run.backup_dir(), dead + "model.weights.h5"),
        os.path.join(run.tokenizer_dir, ".tokenizer.json.x7"),
    ]
    for path in stale:
        with open(path, "w") as file:
            file.write("partial")
    train(load_recipe(recipe_path), run.path, verbose=0)
    assert not [path for path in stale if os.path.exists(path)]


@pytest.mark.slow
def test_moved_data_resumes_and_the_run_records_the_new_place(write_toy_recipe, trained_run, tmp_path, capsys):
    recipe_path = write_toy_recipe()  # the recipe of conftest's trained toy run, its corpus in tmp_path
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained_run.run_dir, run_dir)  # trained by that recipe
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "corpus.txt").write_text((tmp_path / "corpus.txt").read_text())
    (tmp_path / "corpus.txt").unlink()
    overrides = [f"data.dir={moved}", f"data.cache_dir={tmp_path / 'new-cache'}"]
    assert main(["train", str(recipe_path), "--run-dir", run_dir] + [f"--set={o}" for o in overrides]) == 0
    assert "Nothing left to train in" in capsys.readouterr().out
    stored = RunDirectory(run_dir).read_config()["data"]
    assert stored["dir"] == str(moved) and stored["cache_dir"] == str(tmp_path / "new-cache")
    # What changes the token stream is identity: a resume with it is refused, naming the key.
    with pytest.raises(ValueError, match=r"data\.sequence_length \(16 -> 8\)"):
        train(load_recipe(recipe_path, overrides + ["data.sequence_length=8"]), run_dir, verbose=0)


def test_a_bigram_run_says_it_has_no_model(tmp_path, capsys):
    (tmp_path / "bigram.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a bigram baseline, which only scores text"):
        RunDirectory(tmp_path).model_path()
    assert main(["info", str(tmp_path)]) == 2
    assert "bigram baseline" in capsys.readouterr().err


@pytest.mark.slow
def test_the_package_names_work_in_a_fresh_process(tmp_path):
    # README's Python example: `kgpt.build_model` is the first use of Keras in the process.
    script = textwrap.dedent(f"""
        import kgpt
        model = kgpt.build_model(kgpt.ModelConfig(vocabulary_size=8, sequence_length=4, num_layers=1,
                                                  num_heads=2, hidden_dim=8))
        kgpt.save_model(model, {str(tmp_path / "m.keras")!r})
        print(type(kgpt.load_model({str(tmp_path / "m.keras")!r})).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "GPT"


@pytest.mark.slow
def test_importing_kgpt_registers_its_classes_without_importing_tensorflow(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        import kgpt
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules
        import keras
        model = keras.saving.load_model({str(tmp_path / "m.keras")!r})
        print(type(model).__name__)
    """)
    build = [sys.executable, "-m", "kgpt", "build", str(tmp_path / "m.keras"),
             "--set", "vocabulary_size=8", "--set", "sequence_length=4", "--set", "num_layers=1",
             "--set", "hidden_dim=8", "--set", "num_heads=2"]
    subprocess.run(build, check=True, capture_output=True)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "GPT"
