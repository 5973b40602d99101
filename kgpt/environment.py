"""The process TensorFlow starts in for the command line: its settings and its start-up noise.

`configure()` sets TensorFlow's environment defaults (oneDNN, log level, a persistent XLA
compilation cache) and makes the first `import tensorflow` drop the lines of `KNOWN_NOISE` from
stderr, keeping every other line; it imports nothing heavy. `filter_stderr()` keeps dropping the
noise of later runtime lines (the compilation cache's) until the process exits.
"""

import atexit
import contextlib
import ctypes
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
import threading

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
# TensorFlow reads each compilation-cache entry as text first, logs that it is not, then reads it
# as the binary proto it wrote.
_RUNTIME_NOISE = (
    rb".*text_format\.cc:\d+\] Error parsing text-format tensorflow\.XlaSerializedCacheEntry: .*",
    # The first XLA compilation of a process, written by absl before its logging is initialised:
    # TF_CPP_MIN_LOG_LEVEL=3 does not reach it. `kgpt train` says whether XLA is on.
    (rb".*device_compiler\.h:\d+\] Compiled cluster using XLA!  This line is logged at most once "
     rb"for the lifetime of the process\."),
    # A distribution strategy's copy of a validation set drops the size that kgpt.data.pipeline
    # declares for Keras (which reads it from the set itself); the batches are the same.
    (rb".*auto_shard\.cc:\d+\] The `assert_cardinality` transformation is currently not handled "
     rb"by the auto-shard rewrite and will be removed\."),
)
KNOWN_NOISE = tuple(re.compile(pattern) for pattern in _NOISE_PATTERNS + _RUNTIME_NOISE)
# `XLA_CACHE_VARIABLE` names the compilation cache's directory; set it empty to turn the cache off.
XLA_CACHE_VARIABLE = "KGPT_XLA_CACHE"
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
    enable_xla_cache()
    install_quiet_import()


def xla_cache_directory():
    """Where XLA's compiled programs persist across processes: `$KGPT_XLA_CACHE`, else
    `$XDG_CACHE_HOME/kgpt/xla` (default `~/.cache/kgpt/xla`); None when set empty."""
    if XLA_CACHE_VARIABLE in os.environ:
        return os.environ[XLA_CACHE_VARIABLE] or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kgpt", "xla")


def enable_xla_cache():
    """Makes TensorFlow save each XLA-compiled program (the train, evaluation and decode steps)
    and load it in later processes instead of compiling again; TensorFlow checks that a loaded
    program was compiled from the same computation. The user's own `TF_XLA_FLAGS` cache wins; an
    unwritable directory leaves the cache off. Returns the directory, or None."""
    flags = os.environ.get("TF_XLA_FLAGS", "")
    directory = xla_cache_directory()
    if directory is None or "tf_xla_persistent_cache_directory" in flags:
        return None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return None
    if not os.access(directory, os.W_OK):
        return None
    os.environ["TF_XLA_FLAGS"] = f"{flags} --tf_xla_persistent_cache_directory={directory}".strip()
    return directory


def filter_stderr():
    """Until the process exits, file descriptor 2 goes through a thread that drops `KNOWN_NOISE`
    lines and writes every other line on, in order. For the command line's process only."""
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    terminal = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward():
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not is_noise(line):
                    os.write(terminal, line)

    thread = threading.Thread(target=forward, name="kgpt-stderr", daemon=True)
    thread.start()

    def restore():
        try:
            sys.stderr.flush()
        finally:
            os.dup2(terminal, 2)  # closes the pipe's last writer here: the thread drains and ends
            thread.join(timeout=5)

    atexit.register(restore)
