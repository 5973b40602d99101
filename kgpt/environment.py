"""The process TensorFlow starts in for the command line: its settings and its start-up noise.

`configure()` sets TensorFlow's environment defaults and makes the first `import tensorflow` drop
the lines of `KNOWN_NOISE` from stderr, keeping every other line; it imports nothing heavy.
"""

import contextlib
import ctypes
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

# Lines TensorFlow's start-up writes that nobody can act on, each matched in full.
_NOISE_PATTERNS = (
    # absl, before anything initialises its logging.
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    # No CUDA driver library on this machine: TensorFlow runs on the CPU, as intended.
    rb".*cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be used\.",
    # Which CPU instructions this TensorFlow build leaves unused (two lines).
    rb".*cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized to use available CPU instructions.*",
    (rb"To enable the following instructions: .*, in other operations, rebuild TensorFlow with "
     rb"the appropriate compiler flags\."),
)
KNOWN_NOISE = tuple(re.compile(pattern) for pattern in _NOISE_PATTERNS)
# Dropped only where no CUDA driver library can be loaded: with a driver, a failure is real.
CUDA_INIT_FAILURE = re.compile(rb".*cuda_platform\.cc:\d+\] failed call to cuInit: .*")


def cuda_driver_installed():
    """True when the CUDA driver library (libcuda.so.1) can be loaded in this process."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def is_noise(line):
    """True for a line (bytes, with or without its ending) of TensorFlow's known start-up noise."""
    line = line.rstrip(b"\r\n")
    if any(pattern.fullmatch(line) for pattern in KNOWN_NOISE):
        return True
    return bool(CUDA_INIT_FAILURE.fullmatch(line)) and not cuda_driver_installed()


@contextlib.contextmanager
def filtered_stderr():
    """Captures file descriptor 2 in the block, then writes back, in order, every line but noise."""
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
            os.write(2, b"".join(kept))


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `tensorflow` once, as usual, and runs its loader's `exec_module` in `filtered_stderr`."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        uninstall_quiet_import()
        spec = importlib.util.find_spec(name)  # the finders after this one
        if spec is not None and spec.loader is not None:
            self.loader, spec.loader = spec.loader, self
        return spec

    def exec_module(self, module):
        with filtered_stderr():
            try:
                self.loader.exec_module(module)
            finally:
                module.__loader__ = module.__spec__.loader = self.loader
            # cuInit runs here (and fails without a driver); it does not start TensorFlow's runtime.
            module.config.list_physical_devices()


def install_quiet_import():
    """Makes the first `import tensorflow` in this process drop its known start-up noise."""
    if "tensorflow" in sys.modules:
        return
    if not any(isinstance(finder, _QuietTensorFlowFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())


def uninstall_quiet_import():
    """Undoes `install_quiet_import`."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietTensorFlowFinder)]


def configure():
    """Sets TensorFlow's environment for the command line (the user's settings win), before import."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # C++ INFO and WARNING lines off the terminal
    # oneDNN's custom ops are off by default on CPUs without AVX-512; on the AVX2 machines we
    # measured they make a training step ~30% faster (with float32 rounding differences).
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    install_quiet_import()
