"""Atomic writes (`kgpt.files`): a file, a directory, and the cleanup of what a kill left."""

import errno
import os
import stat
import subprocess
import sys

import pytest

from kgpt import files
from kgpt.files import atomic_file, describe_os_error, remove_stale, staged_directory


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
    with pytest.raises(OSError, match="1"):
        with staged_directory(target, replace=False) as staging:
            with open(os.path.join(staging, "saved_model.pb"), "wb") as file:
                file.write(b"second")
    assert (target / "saved_model.pb").read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["1"]  # no staging folder left


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_file(path) as temporary:
            with open(temporary, "w") as file:
                file.write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]
    with atomic_file(path) as temporary:
        assert temporary.endswith("-config.json") and not os.path.exists(temporary)
        with open(temporary, "w") as file:
            file.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["config.json"]


def test_published_files_and_folders_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "a.txt") as temporary:
            open(temporary, "w").close()
        with staged_directory(tmp_path / "folder"):
            pass
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "folder").st_mode) == 0o755


def test_remove_stale_deletes_only_what_dead_processes_left(tmp_path):
    # A child process makes a temporary file and folder, then dies as a kill -9 would leave them.
    script = (
        "import os, sys; from kgpt.files import atomic_file, staged_directory\n"
        "a = atomic_file(sys.argv[1] + '/best.keras'); t = a.__enter__(); open(t, 'w').close()\n"
        "b = staged_directory(sys.argv[1] + '/run'); s = b.__enter__()\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    left = sorted(os.listdir(tmp_path))
    assert len(left) == 2 and all(files.is_temporary(name) for name in left)
    (tmp_path / "keep.txt").write_text("not a temporary")
    with atomic_file(tmp_path / "mine.json") as temporary:  # this live process's own
        open(temporary, "w").close()
        assert sorted(remove_stale(tmp_path)) == left
        assert sorted(os.listdir(tmp_path)) == sorted(["keep.txt", os.path.basename(temporary)])


def test_describe_os_error_keeps_kgpts_own_messages():
    assert describe_os_error(FileNotFoundError("No such model file: m.keras")) == (
        "No such model file: m.keras"
    )
    error = OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b")
    assert describe_os_error(error) == "Invalid cross-device link: '/a' -> '/b'"
