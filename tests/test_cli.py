import csv
import errno
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

import kgpt.cli
from kgpt.cli import main

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(kgpt.cli.__file__)))

SUBCOMMANDS = [
    "train", "generate", "export", "serve", "evaluate", "import-gpt2", "baseline", "info", "build",
]
TINY = ["--set", "vocabulary_size=32", "--set", "sequence_length=8", "--set", "num_layers=1", "--set", "hidden_dim=16"]


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in SUBCOMMANDS])
def test_help_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "usage: kgpt" in capsys.readouterr().out


def test_module_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "kgpt", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "info" in result.stdout and "train" in result.stdout


def test_build_then_info(tmp_path, capsys):
    path = str(tmp_path / "tiny.keras")
    assert main(["build", path, "--set", "model.num_heads=2", *TINY]) == 0
    assert zipfile.is_zipfile(path)
    capsys.readouterr()
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "num_heads: 2" in out and "vocabulary_size: 32" in out
    # 32*16 + 8*16 + one block (4*16 + 16*48+48 + 16*16+16 + 2*16*64+64+16 = 3,280) + final norm 32
    assert "Parameters: 3,952" in out
    assert "block_0" in out and "DecoderBlock" in out


def test_info_accepts_a_run_directory(tmp_path, capsys):
    assert main(["build", str(tmp_path / "final.keras"), *TINY]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path)]) == 0
    assert "Parameters:" in capsys.readouterr().out


def test_a_fresh_process_loads_a_trained_checkpoint_without_the_training_code(trained_run):
    # best.keras holds the compiled state (AdamW, WarmupCosine, Perplexity); loading it for its
    # weights, as `kgpt info`, `generate`, `export` and `evaluate` do, needs none of those classes.
    script = (
        "import sys\n"
        "from kgpt.rundir import load_model\n"
        f"model = load_model({trained_run.run_dir!r})\n"
        "print(type(model).__name__, sorted(m for m in sys.modules if m.startswith('kgpt.training')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": REPOSITORY, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "GPT []"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "missing.keras"], "No such model file or run directory: missing.keras"),
        (["build", "m.keras", "--set", "vocabulary_size=32"], "sequence_length"),
        (["build", "m.keras", *TINY, "--set", "num_heads=3"], "not divisible by num_heads=3"),
        (["build", "m.keras", *TINY, "--set", "num_layer=3"], "Did you mean model.num_layers"),
        (["build", "m.txt", *TINY], "must end in .keras"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err
    assert not os.path.exists(tmp_path / "m.keras")


def test_info_rejects_a_file_that_is_not_a_model(tmp_path, capsys):
    bad = tmp_path / "bad.keras"
    bad.write_text("not a zip")
    assert main(["info", str(bad)]) == 2
    assert "is not a .keras archive" in capsys.readouterr().err


def test_info_on_directory_without_model(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "looked for best.keras, final.keras, model.keras" in capsys.readouterr().err


def test_build_refuses_to_overwrite(tmp_path, capsys):
    path = tmp_path / "m.keras"
    path.write_bytes(b"keep")
    assert main(["build", str(path), *TINY]) == 2
    assert path.read_bytes() == b"keep"
    assert "--force" in capsys.readouterr().err


# --- operating-system errors: one line, exit 2 ------------------------------------------------



def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], err
    return lines[0]


def test_run_directory_that_is_a_file(write_toy_recipe, tmp_path, capsys):
    recipe = str(write_toy_recipe(max_steps=4, eval_interval=2, eval_steps=1, warmup_steps=1))
    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert main(["train", recipe, "--run-dir", str(taken)]) == 2
    _one_line_error(capsys, f"kgpt train: error: {taken} is a file, not a run directory; choose another --run-dir")
    assert main(["train", recipe, "--run-dir", str(taken / "run")]) == 2
    _one_line_error(capsys, "Not a directory", repr(str(taken / "run")))
    assert taken.read_text() == "a file"


def _kgpt_without_root_override(argv, cwd):
    """Runs `python -m kgpt argv` where file permissions bind, even when the tests run as root."""
    prefix = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        drop = [setpriv, "--bounding-set=-dac_override,-dac_read_search"] if setpriv else None
        if drop is None or subprocess.run([*drop, "true"], capture_output=True, check=False).returncode:
            pytest.skip("running as root, which writes to read-only folders; setpriv cannot drop that")
        prefix = drop
    env = {**os.environ, "PYTHONPATH": REPOSITORY}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "kgpt", *argv],
        capture_output=True, text=True, timeout=300, cwd=cwd, env=env, check=False,
    )


@pytest.mark.slow
def test_read_only_run_directory_new_or_resumed(write_toy_recipe, trained_run, tmp_path):
    recipe = str(write_toy_recipe())  # the recipe of conftest's trained toy run
    finished = tmp_path / "finished"
    shutil.copytree(trained_run.run_dir, finished)  # trained by that recipe
    empty = tmp_path / "empty"
    empty.mkdir()
    for path in (finished, empty):
        for folder, _, files in os.walk(path):
            for name in files:
                os.chmod(os.path.join(folder, name), 0o444)
            os.chmod(folder, 0o555)
    try:
        for run_dir in (empty, finished):
            result = _kgpt_without_root_override(["train", recipe, "--run-dir", str(run_dir)], tmp_path)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2, result.stderr
            assert "Traceback" not in result.stderr, result.stderr
            assert len(lines) == 1 and lines[0].startswith("kgpt train: error: Permission denied"), result.stderr
            assert str(run_dir) in lines[0] and "change its permissions" in lines[0]
    finally:
        for path in (finished, empty):
            for folder, _, _ in os.walk(path):
                os.chmod(folder, 0o755)


def test_import_gpt2_with_an_empty_merges_file(tmp_path, capsys):
    hf = tmp_path / "gpt2"
    hf.mkdir()
    vocabulary = {chr(0x100 + i): i for i in range(256)}
    vocabulary["<|endoftext|>"] = 256
    (hf / "vocab.json").write_text(json.dumps(vocabulary))
    (hf / "merges.txt").write_text("#version: 0.2\n")
    (hf / "config.json").write_text("{}")  # a whole folder, but for its merges
    (hf / "model.safetensors").write_bytes(b"")
    assert main(["import-gpt2", str(hf), "--out", str(tmp_path / "run")]) == 2
    _one_line_error(capsys, "kgpt import-gpt2: error:", str(hf / "merges.txt"), "no merge rules")
    assert not (tmp_path / "run").exists()


def test_any_os_error_is_one_line_and_other_exceptions_keep_their_traceback(monkeypatch, capsys):
    def disk_full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/a/final.keras")

    monkeypatch.setattr(kgpt.cli, "_run_info", disk_full)
    assert main(["info", "x.keras"]) == 2
    line = _one_line_error(capsys, "kgpt info: error: No space left on device: '/runs/a/final.keras'")
    assert "the disk is full" in line

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(kgpt.cli, "_run_info", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(["info", "x.keras"])


def _main_catching_ctrl_c(argv):
    try:
        return main(argv)
    except KeyboardInterrupt:  # not for pytest: it would end the session
        pytest.fail("KeyboardInterrupt escaped kgpt.cli.main")


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(kgpt.cli, "_run_info", interrupted)
    assert _main_catching_ctrl_c(["info", "x.keras"]) == 130
    assert _one_line_error(capsys, "kgpt info: interrupted") == "kgpt info: interrupted"

    def training_interrupted(args):  # kgpt.training.train.train says where to resume
        raise KeyboardInterrupt("interrupted at step 7; run the same command to resume (from step 5, ...).")

    monkeypatch.setattr(kgpt.cli, "_run_train", training_interrupted)
    assert _main_catching_ctrl_c(["train", "recipe.toml"]) == 130
    _one_line_error(capsys, "kgpt train: interrupted at step 7; run the same command to resume (from step 5")


def _damage_a_member(path, member):
    """Changes one byte of `member`'s stored data; the zip's structure stays intact."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + name_length + extra_length + info.compress_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_keras_file_with_a_bad_crc_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "best.keras"
    assert main(["build", str(path), *TINY]) == 0
    _damage_a_member(path, "model.weights.h5")
    assert zipfile.is_zipfile(path)  # an intact zip whose member fails its CRC
    capsys.readouterr()
    for command in (["info", str(path)], ["generate", str(path), "--prompt", "a"]):
        assert main(command) == 2
        _one_line_error(capsys, f"kgpt {command[0]}: error: {path} is damaged (", "restore it")


# --- TensorFlow's start-up noise stays off stderr ---------------------------------------------

NOISE = ("cuInit", "Could not find cuda drivers", "cpu_feature_guard", "absl::InitializeLog")

def _kgpt(argv, cwd, **env):
    return subprocess.run(
        [sys.executable, "-m", "kgpt", *argv], capture_output=True, text=True, timeout=300,
        cwd=cwd, env={**os.environ, "PYTHONPATH": REPOSITORY, **env}, check=False,
    )


@pytest.mark.slow
def test_commands_print_no_tensorflow_start_up_noise(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, "-m", "kgpt", "build", "m.keras", *TINY], capture_output=True, text=True,
        timeout=300, cwd=tmp_path, env={**env, "PYTHONPATH": REPOSITORY}, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert not [word for word in NOISE if word in result.stderr], result.stderr
    # With every TensorFlow log line asked for, only the known noise goes: other INFO stays.
    result = _kgpt(["info", "m.keras"], tmp_path, TF_CPP_MIN_LOG_LEVEL="0")
    assert result.returncode == 0 and "Parameters:" in result.stdout, result.stderr
    assert not [word for word in NOISE if word in result.stderr], result.stderr
    assert "oneDNN custom operations are on" in result.stderr


@pytest.mark.slow
def test_a_real_error_after_tensorflow_starts_is_still_printed(tmp_path):
    (tmp_path / "bad.keras").write_text("not a zip")
    result = _kgpt(["info", "bad.keras"], tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2
    assert len(lines) == 1 and "is not a .keras archive" in lines[0], result.stderr


@pytest.mark.slow
def test_a_second_run_loads_its_xla_programs_from_the_cache(tmp_path, write_toy_recipe):
    recipe = write_toy_recipe(max_steps=4, eval_interval=2)
    text = recipe.read_text().replace("jit_compile = false", "jit_compile = true")
    recipe.write_text(text)
    cache = tmp_path / "xla"
    # TensorFlow's own log of the cache, asked for; kgpt drops only the text-format retry line.
    logs = {"KGPT_XLA_CACHE": str(cache), "TF_XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "0",
            "TF_CPP_VMODULE": "device_executable_persistor=3"}
    first = _kgpt(["train", str(recipe), "--run-dir", "a"], tmp_path, **logs)
    assert first.returncode == 0, first.stderr
    entries = sorted(os.listdir(cache))
    assert entries and all(name.endswith("XLA_CPU_JIT.pb") for name in entries)  # train + evaluation
    second = _kgpt(["train", str(recipe), "--run-dir", "b"], tmp_path, **logs)
    assert second.returncode == 0, second.stderr
    assert "Verifying loaded cache entry" in second.stderr
    assert "Error parsing text-format" not in second.stderr
    assert sorted(os.listdir(cache)) == entries  # nothing compiled anew
    losses = [
        [(row["loss"], row["val_loss"]) for row in csv.DictReader(open(tmp_path / run / "history.csv"))]
        for run in ("a", "b")
    ]
    assert len(losses[0]) == 2 and losses[0] == losses[1]  # loaded programs compute what compiled ones did


def test_import_kgpt_cli_does_not_import_tensorflow():
    code = "import sys, kgpt, kgpt.cli; print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": REPOSITORY}, check=False,
    )
    assert result.stdout.strip() == "False", result.stderr


@pytest.mark.parametrize("flag, value, wanted", [
    ("--port", "99999", "--port 99999 is out of range: it must be an integer from 0 to 65535"),
    ("--port", "-1", "--port -1 is out of range"),
    ("--max-request-bytes", "0", "--max-request-bytes 0 is out of range: it must be an integer >= 1"),
    ("--max-concurrent-requests", "0", "--max-concurrent-requests 0 is out of range"),
    ("--max-batch-size", "-3", "--max-batch-size -3 is out of range"),
    ("--max-queued-requests", "0", "--max-queued-requests 0 is out of range"),
    ("--max-connections", "0", "--max-connections 0 is out of range"),
    ("--batch-timeout-ms", "-1", "--batch-timeout-ms -1 is out of range: it must be a finite number >= 0"),
    ("--batch-timeout-ms", "inf", "--batch-timeout-ms inf is out of range"),
    ("--request-timeout", "0", "--request-timeout 0 is out of range: it must be a finite number > 0"),
    ("--request-timeout", "inf", "--request-timeout inf is out of range"),
    ("--read-timeout", "nan", "--read-timeout nan is out of range"),
])
def test_serve_checks_its_flags_before_loading_a_model(tmp_path, monkeypatch, capsys, flag, value, wanted):
    import kgpt.serving.model_server

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(kgpt.serving.model_server.ModelServer, "__init__", no_model)
    assert main(["serve", str(tmp_path), flag, value]) == 2
    _one_line_error(capsys, f"kgpt serve: error: {wanted}")
