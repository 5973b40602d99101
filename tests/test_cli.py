import os
import subprocess
import sys
import zipfile

import pytest

from kgpt.cli import main

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
