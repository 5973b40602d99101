"""Atomic writes of run directories (`kgpt.saving.staged_directory`)."""

import os

import pytest

from kgpt.saving import staged_directory


def test_staged_directory_publishes_whole_or_not_at_all(tmp_path):
    target = tmp_path / "run"
    with staged_directory(target) as staging:
        assert not target.exists()  # nothing visible while it is written
        (tmp_path / "run_unused").mkdir()
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
