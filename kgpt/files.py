"""Atomic writes: one helper for a file, one for a directory, and the cleanup of what a kill left;
and what an operating-system error on a user's path says (`describe_os_error`).

Everything kgpt publishes is written under a temporary name beside its target and renamed into
place, so a reader never sees a half-written file. Temporary names are
`.tmp-<host>-<pid>-<random>-<target name>`: they keep the target's suffix (Keras picks the format
from it) and name their process, so `remove_stale` deletes only what dead processes left.
"""

import contextlib
import errno
import os
import shutil
import socket
import tempfile
import time
import uuid

_PREFIX = ".tmp-"
# A temporary of another machine (shared storage) is stale once it is this old.
_FOREIGN_STALE_SECONDS = 24 * 3600


def _host():
    return socket.gethostname().replace("-", "_") or "host"


def _prefix():
    return f"{_PREFIX}{_host()}-{os.getpid()}-"


def temporary_name(name):
    """A temporary name for `name` in the form this module uses (see `remove_stale`)."""
    return f"{_prefix()}{uuid.uuid4().hex[:8]}-{name}"


def remove(path):
    """Deletes a file, link or folder tree if it is there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_file(path):
    """Yields a temporary path beside `path` for any writer (`model.save`, `open`); when the block
    succeeds it is renamed onto `path`, on an error `path` stays as it was."""
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=_prefix(), suffix=f"-{name}", dir=directory)
    os.close(handle)
    os.remove(temporary)  # writers such as h5py refuse to open an existing file
    try:
        yield temporary
        os.replace(temporary, os.path.join(directory, name))
    finally:
        remove(temporary)


@contextlib.contextmanager
def staged_directory(target, replace=True):
    """Yields an empty sibling folder of `target` to fill; when the block succeeds it becomes `target`.

    With `replace`, an existing `target` is replaced; without, an existing non-empty `target`
    makes the rename fail with `OSError` and is kept. An error in the block leaves `target` as it
    was. The folder gets the user's umask, not `mkdtemp`'s private 0700.
    """
    parent, name = os.path.split(os.path.abspath(os.fspath(target)))
    target = os.path.join(parent, name)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=_prefix(), suffix=f"-{name}")
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(staging, 0o777 & ~mask)
    retired = os.path.join(parent, f"{os.path.basename(staging)}-old")
    try:
        yield staging
        if replace and os.path.isdir(target):
            os.replace(target, retired)
        os.replace(staging, target)
    finally:
        remove(staging)
        remove(retired)


def _owner(name):
    """`(host, pid)` of a temporary name made by this module, else None."""
    parts = name[len(_PREFIX):].split("-", 2) if name.startswith(_PREFIX) else []
    return (parts[0], int(parts[1])) if len(parts) == 3 and parts[1].isdigit() else None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True


def is_temporary(name):
    """True for a name made by `atomic_file` or `staged_directory`."""
    return _owner(name) is not None


def remove_stale(directory):
    """Deletes the temporaries in `directory` of dead processes; returns their names.

    Dead: made on this machine by a pid that no longer runs, or on another one over a day ago.
    """
    removed = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        owner, path = _owner(name), os.path.join(directory, name)
        if owner is None or owner[1] == os.getpid():
            continue
        if owner[0] == _host():
            stale = not _alive(owner[1])
        else:
            stale = time.time() - os.lstat(path).st_mtime > _FOREIGN_STALE_SECONDS
        if stale:
            remove(path)
            removed.append(name)
    return removed


# What to do about the operating-system errors a user can cause with a path they gave.
_OS_ERROR_FIXES = {
    errno.EEXIST: "something is already there; choose another path or remove it",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder where a file is expected; pass a file",
    errno.EACCES: "choose a location you can write to, or change its permissions",
    errno.EPERM: "choose a location you can write to, or change its permissions",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.ENOSPC: "the disk is full; free some space or choose another location",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another location",
}


def describe_os_error(error):
    """One line for an `OSError`: what failed, on which path, what to do (kgpt's own messages as
    they are), e.g. `"Permission denied: 'runs/a' (choose a location you can write to, ...)"`."""
    if error.errno is None or not error.strerror:
        return str(error)
    paths = [repr(p) for p in (error.filename, error.filename2) if p is not None]
    text = f"{error.strerror}: {' -> '.join(paths)}" if paths else error.strerror
    fix = _OS_ERROR_FIXES.get(error.errno)
    return f"{text} ({fix})" if fix else text
