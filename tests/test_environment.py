"""kgpt.environment: TensorFlow's known start-up lines are dropped from stderr, nothing else is."""

import os
import subprocess
import sys

import pytest

from kgpt import environment

# Lines as TensorFlow 2.20 prints them on a CPU-only machine.
CUINIT = (
    b"2026-11-29 22:46:26.408645: E external/local_xla/xla/stream_executor/cuda/"
    b"cuda_platform.cc:51] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n"
)
NOISE = [
    (b"2026-11-29 22:47:12.624419: I external/local_xla/xla/tsl/cuda/cudart_stub.cc:31] Could "
     b"not find cuda drivers on your machine, GPU will not be used.\n"),
    (b"2026-11-29 22:47:12.811438: I tensorflow/core/platform/cpu_feature_guard.cc:210] This "
     b"TensorFlow binary is optimized to use available CPU instructions in performance-critical "
     b"operations.\n"),
    (b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow "
     b"with the appropriate compiler flags.\n"),
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    (b"E0000 00:00:1796015101.049024   10049 text_format.cc:430] Error parsing text-format "
     b"tensorflow.XlaSerializedCacheEntry: 2:1: Expected identifier, got: 5\n"),
    # absl writes it even with TF_CPP_MIN_LOG_LEVEL=3.
    (b"I0000 00:00:1796540546.064020   28417 device_compiler.h:196] Compiled cluster using XLA!  "
     b"This line is logged at most once for the lifetime of the process.\n"),
    (b"W0000 00:00:1796541567.068513    9983 auto_shard.cc:558] The `assert_cardinality` "
     b"transformation is currently not handled by the auto-shard rewrite and will be removed.\n"),
]
REAL = [
    (b"2026-11-29 22:47:12.811438: E tensorflow/core/framework/op_kernel.cc:1830] OP_REQUIRES "
     b"failed at save_restore_v2_ops.cc:109 : PERMISSION_DENIED: /runs/a; Permission denied\n"),
    b"Traceback (most recent call last):\n",
    b"kgpt train: error: File exists: '/runs/a'\n",
]


def test_known_lines_are_noise_and_others_are_not():
    assert all(environment.is_noise(line) for line in NOISE)
    assert not any(environment.is_noise(line) for line in REAL)


def test_cuinit_failure_is_noise_only_without_a_driver(monkeypatch):
    monkeypatch.setattr(environment, "cuda_driver_installed", lambda: False)
    assert environment.is_noise(CUINIT)
    monkeypatch.setattr(environment, "cuda_driver_installed", lambda: True)
    assert not environment.is_noise(CUINIT)  # a driver that fails is a real problem


def test_filtered_stderr_writes_back_everything_but_the_noise(capfd, monkeypatch):
    monkeypatch.setattr(environment, "cuda_driver_installed", lambda: False)
    with environment.filtered_stderr():
        for line in [NOISE[0], REAL[0], CUINIT, *NOISE[1:], REAL[1]]:
            os.write(2, line)
    assert capfd.readouterr().err.encode() == REAL[0] + REAL[1]


def test_filtered_stderr_restores_stderr_after_an_error(capfd):
    with pytest.raises(ImportError, match="no such module"), environment.filtered_stderr():
        os.write(2, REAL[2])
        raise ImportError("no such module")
    os.write(2, b"after\n")
    assert capfd.readouterr().err.encode() == REAL[2] + b"after\n"


def test_quiet_import_is_installed_once_and_only_before_tensorflow(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    environment.install_quiet_import()  # TensorFlow is imported in this process: nothing to do
    assert not any(isinstance(f, environment._QuietTensorFlowFinder) for f in sys.meta_path)
    monkeypatch.delitem(sys.modules, "tensorflow")
    environment.install_quiet_import()
    environment.install_quiet_import()
    assert sum(isinstance(f, environment._QuietTensorFlowFinder) for f in sys.meta_path) == 1
    environment.uninstall_quiet_import()
    assert not any(isinstance(f, environment._QuietTensorFlowFinder) for f in sys.meta_path)


def test_xla_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(environment.XLA_CACHE_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert environment.xla_cache_directory() == str(tmp_path / "kgpt" / "xla")
    monkeypatch.setenv(environment.XLA_CACHE_VARIABLE, str(tmp_path / "mine"))
    assert environment.xla_cache_directory() == str(tmp_path / "mine")
    monkeypatch.setenv(environment.XLA_CACHE_VARIABLE, "")
    assert environment.xla_cache_directory() is None


def test_enable_xla_cache_sets_the_flag_unless_the_user_did(monkeypatch, tmp_path):
    monkeypatch.setenv(environment.XLA_CACHE_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=0")
    assert environment.enable_xla_cache() == str(tmp_path / "cache")
    assert os.environ["TF_XLA_FLAGS"] == f"--tf_xla_auto_jit=0 --tf_xla_persistent_cache_directory={tmp_path / 'cache'}"
    assert os.path.isdir(tmp_path / "cache")
    mine = "--tf_xla_persistent_cache_directory=/elsewhere"
    monkeypatch.setenv("TF_XLA_FLAGS", mine)
    assert environment.enable_xla_cache() is None and os.environ["TF_XLA_FLAGS"] == mine
    monkeypatch.setenv("TF_XLA_FLAGS", "")
    monkeypatch.setenv(environment.XLA_CACHE_VARIABLE, "")  # off
    assert environment.enable_xla_cache() is None and os.environ["TF_XLA_FLAGS"] == ""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(environment.XLA_CACHE_VARIABLE, str(tmp_path / "file" / "cache"))  # unwritable
    assert environment.enable_xla_cache() is None and os.environ["TF_XLA_FLAGS"] == ""


FILTER_SCRIPT = """
import os, sys
from kgpt import environment
environment.filter_stderr()
os.write(2, {lines!r})
sys.stderr.write("python line\\n")
print("stdout line")
raise SystemExit(3)
"""


def test_filter_stderr_drops_noise_until_exit_and_keeps_the_rest(tmp_path):
    lines = NOISE[0] + REAL[0] + NOISE[-1] + REAL[1]
    script = FILTER_SCRIPT.format(lines=lines)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == 3
    assert result.stdout == b"stdout line\n"
    assert result.stderr == REAL[0] + REAL[1] + b"python line\n"
