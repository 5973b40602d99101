"""Atomic writes: one helper for a file, one for a directory, and the cleanup of what a kill left.

Everything kgpt publishes (checkpoints, `config.json`, tokenizers, token caches, exports, run
directories) is written under a temporary name beside its target and renamed into place, so a
reader never sees a half-written file and a crash leaves the previous version intact.

Temporary names are `.tmp-<host>-<pid>-<random>-<target name>`: they end in the target's own
name (Keras picks the format from the suffix, `.keras` or `.weights.h5`), and they say which
process made them, so `remove_stale` can delete what a killed process left behind without
touching the files of one still writing. Only this module builds or parses these names.
"""

import contextlib
import os
import shutil
import socket
import tempfile
import time

_PREFIX = ".tmp-"
# A temporary of another machine (shared storage) is stale once it is this old.
_FOREIGN_STALE_SECONDS = 24 * 3600


def _host():
    return socket.gethostname().replace("-", "_") or "host"


def _temporary_prefix(name):
    return f"{_PREFIX}{_host()}-{os.getpid()}-"


@contextlib.contextmanager
def atomic_file(path):
    """Yields a temporary path beside `path`; when the block succeeds it is renamed onto `path`.

    The block writes the temporary path (it may call anything that takes a path, such as
    `model.save`). On an error the temporary file is removed and `path` is left as it was.

    Example:
        with atomic_file("checkpoints/run/config.json") as temporary:
            with open(temporary, "w") as file:
                json.dump(config, file)
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=_temporary_prefix(name), suffix=f"-{name}", dir=directory)
    os.close(handle)
    os.remove(temporary)  # writers such as h5py refuse to open an existing file
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            if os.path.isdir(temporary):
                shutil.rmtree(temporary, ignore_errors=True)
            else:
                os.remove(temporary)


@contextlib.contextmanager
def staged_directory(target, replace=True):
    """Yields an empty sibling folder of `target` to fill; when the block succeeds it becomes `target`.

    With `replace`, an existing `target` is replaced (removed after the rename). Without, an
    existing non-empty `target` makes the rename fail with `OSError` and is kept. An error in the
    block leaves `target` as it was and no temporary folder behind. The new folder gets the
    permissions a plain `os.makedirs` would (the user's umask), not `mkdtemp`'s private 0700.

    Example:
        with staged_directory("checkpoints/bigram") as staging:
            write_everything_into(staging)
    """
    target = os.path.abspath(os.fspath(target))
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=_temporary_prefix(name), suffix=f"-{name}")
    os.chmod(staging, 0o777 & ~_umask())
    retired = None
    try:
        yield staging
        if replace and os.path.isdir(target):
            retired = tempfile.mkdtemp(dir=parent, prefix=_temporary_prefix(name), suffix="-old")
            os.replace(target, os.path.join(retired, name))
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if retired:
            shutil.rmtree(retired, ignore_errors=True)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _owner(name):
    """`(host, pid)` of a temporary name made by this module, else None."""
    if not name.startswith(_PREFIX):
        return None
    parts = name[len(_PREFIX):].split("-", 2)
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def is_temporary(name):
    """True for a name made by `atomic_file` or `staged_directory`."""
    return _owner(name) is not None


def remove_stale(directory):
    """Deletes the temporaries in `directory` whose process has died (a `kill -9`, a crash).

    A temporary belongs to a dead process when it was made on this machine by a pid that no
    longer runs, or on another machine more than a day ago. Those of live processes stay.

    Returns:
        The names removed.
    """
    if not os.path.isdir(directory):
        return []
    removed = []
    host, now = _host(), time.time()
    for name in sorted(os.listdir(directory)):
        owner = _owner(name)
        if owner is None or owner[1] == os.getpid():
            continue
        path = os.path.join(directory, name)
        if owner[0] == host:
            stale = not _alive(owner[1])
        else:
            stale = now - os.lstat(path).st_mtime > _FOREIGN_STALE_SECONDS
        if stale:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(name)
    return removed
