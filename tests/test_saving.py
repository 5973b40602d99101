"""Atomic writes of run directories (`kgpt.saving.staged_directory`)."""

import os

import pytest

from kgpt.saving import staged_directory


def test_staged_directory_publishes_whole_or_not_at_all(tmp_path):
    target = tmp_path / "run"
    (tmp_path / "run_unused").mkdir()  # a sibling the helper must leave alone
    with staged_directory(target) as staging:
        assert not target.exists()  # nothing visible while it is written
        with open(os.path.join(staging, "a.txt"), "w") as file:
            file.write("first")
    assert sorted(os.listdir(target)) == ["a.txt"]
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_directory(target) as staging:
            with open(os.path.join(staging, "b.txt"), "w") as file:
                file.write("second")
            raise RuntimeError("disk full")
    assert sorted(os.listdir(target)) == ["a.txt"]  # the failed write changed nothing
    with staged_directory(target) as staging:
        with open(os.path.join(staging, "c.txt"), "w") as file:
            file.write("third")
    assert sorted(os.listdir(target)) == ["c.txt"]  # replaced whole
    assert sorted(os.listdir(tmp_path)) == ["run", "run_unused"]  # no staging folder left


def test_staged_directory_without_replace_keeps_an_existing_target(tmp_path):
    target = tmp_path / "1"
    target.mkdir()
    (target / "saved_model.pb").write_bytes(b"first")
    with pytest.raises(OSError):
        with staged_directory(target, replace=False) as staging:
            with open(os.path.join(staging, "saved_model.pb"), "wb") as file:
                file.write(b"second")
    assert (target / "saved_model.pb").read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["1"]  # no staging folder left
