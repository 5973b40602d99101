"""benchmarks/gpu_check.sh on the CPU with its tiny setting, and the MFU arithmetic it reports
(benchmarks/mfu.py). The benchmarks themselves are run by people, not by the test suite."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from kgpt.config import ModelConfig
from kgpt.model.gpt import build_model, count_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mfu_module():
    spec = importlib.util.spec_from_file_location("mfu", os.path.join(ROOT, "benchmarks", "mfu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A10", 125), ("NVIDIA L40S", 362), ("NVIDIA L4", 121),
])
def test_gpu_peaks_are_looked_up_by_the_devices_name(name, tflops):
    peak, source = _mfu_module().peak_flops(name)
    assert peak == tflops * 1e12 and f"{tflops} TFLOP/s" in source


def test_an_unknown_gpu_has_no_peak_and_the_cpu_an_estimate():
    mfu = _mfu_module()
    peak, source = mfu.peak_flops("NVIDIA Tesla T4")
    assert peak is None and "--peak-tflops" in source
    peak, source = mfu.peak_flops("CPU")
    assert peak == mfu.cpu_peak_flops() > 0 and "CPU" in source


def test_flops_per_token_counts_every_weight_once_and_attention():
    config = ModelConfig(vocabulary_size=65, sequence_length=256, num_layers=6, num_heads=6, hidden_dim=384)
    weights = build_model(config).count_params()  # the tied head counted once
    assert _mfu_module().flops_per_token(config) == 6 * weights + 12 * 6 * 384 * 256


def _gpu_check(tmp_path, **settings):
    environment = {
        **os.environ, "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "out"),
        "KGPT_CACHE_DIR": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": "", **settings,
    }
    environment.pop("OUT", None)
    return subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], env=environment,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_with_its_tiny_setting_and_writes_its_figures(tmp_path):
    # The tiny model starts near ln(68) = 4.22 nats per character: 4.5 is reached at once.
    done = _gpu_check(tmp_path, GPU_CHECK_CPU="1", GPU_CHECK_TINY="1", GPU_CHECK_TARGET="4.5")
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["gpu_check.txt", "results.json", "run1.log", "run1_history.csv"]
    results = json.loads((out / "results.json").read_text())
    assert results["recipe"] == "pipelines/shakespeare_char_gpu.toml" and results["device"] == "CPU"
    assert "CPU fp32 estimate" in results["peak_source"] and results["target"] == 4.5
    (run,) = results["runs"]
    assert [e["val_loss"] for e in run["evaluations"]] and len(run["evaluations"]) == 2  # 20 steps, every 10
    assert 0 < run["time_to_target_s"] == run["evaluations"][0]["time_s"] <= run["process_s"]
    assert run["best_val_loss"] == min(e["val_loss"] for e in run["evaluations"]) < math.log(68)
    assert not run["timed_out"]
    config = ModelConfig(vocabulary_size=68, sequence_length=32, num_layers=1, num_heads=2,
                         hidden_dim=16, use_bias=False)
    assert run["parameters"] == count_parameters(config)
    assert run["flops_per_token"] == 6 * run["parameters"] + 12 * 1 * 16 * 32
    # Step time and tokens/s agree (batch 4 x 32 tokens), and MFU is their FLOP/s over the peak.
    assert run["step_time_ms"] == pytest.approx(1e3 * 4 * 32 / run["tokens_per_second"])
    assert run["mfu"] == pytest.approx(
        run["flops_per_token"] * run["tokens_per_second"] / results["peak_flops_per_device"])
    assert 0 < run["mfu"] < 1
    log = (out / "run1.log").read_text()
    assert "precision: mixed_bfloat16, XLA on" in log  # the recipe's, as on a GPU
    table = (out / "gpu_check.txt").read_text()
    assert "| step ms | tokens/s | MFU |" in table and "median time to val <= 4.5" in table


@pytest.mark.slow
def test_gpu_check_without_a_gpu_stops_with_the_fix(tmp_path):
    done = _gpu_check(tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "gpu_check.sh: error: TensorFlow 2." in done.stderr and "set GPU_CHECK_CPU=1" in done.stderr
    assert not os.path.exists(tmp_path / "out" / "results.json")
