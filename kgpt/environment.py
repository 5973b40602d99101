"""The process TensorFlow starts in for the command line: its settings and its start-up noise.

TensorFlow prints lines on stderr while it starts that a user can do nothing about: on a machine
without a CUDA driver, "failed call to cuInit ... (303)" as an ERROR (and, at lower log levels,
"Could not find cuda drivers" and the CPU-instruction notice of cpu_feature_guard.cc), and absl's
"WARNING: All log messages before absl::InitializeLog() ...". They come from TensorFlow's C++
libraries writing to file descriptor 2 while `tensorflow` is imported and while it looks for GPUs.

`configure()` sets TensorFlow's environment defaults (the user's own settings win) and arranges
for the first `import tensorflow` to run with stderr captured; when it is done, every line that
is not one of the known lines above is written back, so real errors still show. A cuInit failure
is only dropped when no CUDA driver library (libcuda.so.1) can be loaded at all; on a machine with
a driver it is a real problem and stays. TensorFlow is still imported lazily: `configure()`
imports nothing heavy, so `kgpt --help` stays fast.
"""

import contextlib
import ctypes
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

# Lines TensorFlow's start-up writes that nobody can act on; each is matched in full.
KNOWN_NOISE = tuple(
    re.compile(pattern)
    for pattern in (
        # absl, before anything initialises its logging.
        (rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
         rb"STDERR"),
        # No CUDA driver library on this machine: TensorFlow runs on the CPU, as intended.
        (rb".*cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be "
         rb"used\."),
        # Which CPU instructions this TensorFlow build leaves unused (two lines).
        (rb".*cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized to use available "
         rb"CPU instructions.*"),
        (rb"To enable the following instructions: .*, in other operations, rebuild TensorFlow with "
         rb"the appropriate compiler flags\."),
    )
)
# Dropped only where no CUDA driver library can be loaded (see `cuda_driver_installed`).
CUDA_INIT_FAILURE = re.compile(rb".*cuda_platform\.cc:\d+\] failed call to cuInit: .*")


def cuda_driver_installed():
    """True when the CUDA driver library (libcuda.so.1) can be loaded in this process.

    Returns:
        A bool; False on CPU-only machines, where TensorFlow's failed cuInit is expected.
    """
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def is_noise(line):
    """True for a line of TensorFlow's start-up output that `KNOWN_NOISE` describes.

    Args:
        line: one line of stderr output, bytes, with or without its line ending.

    Returns:
        A bool.
    """
    line = line.rstrip(b"\r\n")
    if any(pattern.fullmatch(line) for pattern in KNOWN_NOISE):
        return True
    return bool(CUDA_INIT_FAILURE.fullmatch(line)) and not cuda_driver_installed()


@contextlib.contextmanager
def filtered_stderr():
    """Captures file descriptor 2 in the block, then writes back every line that is not noise.

    Lines written in the block (by C++ libraries or Python) appear when it ends, in order.

    Example:
        with filtered_stderr():
            import tensorflow as tf
            tf.config.list_physical_devices()
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().splitlines(keepends=True) if not is_noise(line)]
            if kept:
                os.write(2, b"".join(kept))


class _QuietTensorFlowLoader(importlib.abc.Loader):
    """Runs TensorFlow's own loader, and its first look for GPUs, inside `filtered_stderr`."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with filtered_stderr():
            try:
                self.loader.exec_module(module)
            finally:
                module.__loader__ = module.__spec__.loader = self.loader
            # Lists devices without starting TensorFlow's runtime (strategies that must be set
            # up first, such as MultiWorkerMirroredStrategy, still can be); this is where cuInit
            # runs and fails on a machine without a driver.
            module.config.list_physical_devices()


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` as usual, and makes its first import quiet (see the module docstring)."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        uninstall_quiet_import()
        spec = importlib.util.find_spec(name)  # the finders after this one
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietTensorFlowLoader(spec.loader)
        return spec


def install_quiet_import():
    """Makes the first `import tensorflow` in this process drop its known start-up noise.

    Does nothing when TensorFlow is already imported.
    """
    if "tensorflow" in sys.modules:
        return
    if not any(isinstance(finder, _QuietTensorFlowFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())


def uninstall_quiet_import():
    """Undoes `install_quiet_import` (TensorFlow imported afterwards prints as it always does)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietTensorFlowFinder)]


def configure():
    """Sets TensorFlow's environment for the command line; call it before TensorFlow is imported.

    The user's own environment settings win. TF_CPP_MIN_LOG_LEVEL=2 keeps TensorFlow's C++ INFO
    and WARNING lines off the terminal. oneDNN's custom ops are off by default on CPUs without
    AVX-512; on the AVX2 machines we measured they make a training step ~30% faster (with
    float32 rounding differences). Then `install_quiet_import()`.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    install_quiet_import()
