"""Model FLOPs utilisation (MFU) for the benchmarks: a GPT's training FLOPs per token and the peak
FLOP/s of the device that ran it (a table of GPUs' dense bfloat16 peaks, an estimate for CPUs).

MFU = training FLOPs per token x tokens per second / the devices' peak FLOP/s (PaLM, appendix B;
nanoGPT's `estimate_mfu`). The FLOPs count the model's arithmetic only, not recomputation.

Example:
    peak, source = peak_flops("NVIDIA H100 80GB HBM3")  # 989e12, "H100 dense bf16 peak, ..."
    mfu = flops_per_token(config) * tokens_per_second / peak
"""

import os

import keras  # noqa: F401  (first: kgpt registers its classes on Keras' import, kgpt.model.gpt among them)

from kgpt.model.gpt import count_parameters

# Dense (no sparsity) bfloat16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets. The first
# entry whose name is in the device's name (case ignored) is used, so longer names come first.
GPU_PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756),
    ("H100 NVL", 835),
    ("H100", 989),  # SXM (the name reads "NVIDIA H100 80GB HBM3")
    ("H200", 989),  # and GH200
    ("B200", 2250),
    ("A100", 312),
    ("A10", 125),
    ("L40S", 362),
    ("L40", 181),
    ("L4", 121),
)


def flops_per_token(config):
    """Training FLOPs per token of a `ModelConfig`: `6 N` for the weights (forward and backward)
    plus `12 num_layers hidden_dim sequence_length` for attention's scores and values."""
    attention = 12 * config.num_layers * config.hidden_dim * config.sequence_length
    return 6 * count_parameters(config) + attention


def cpu_peak_flops():
    """This machine's float32 peak, estimated as cores x clock x 32 (two 256-bit FMA units per
    core, as on Zen 3 and recent Intel cores)."""
    cores = os.cpu_count() or 1
    megahertz = []
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                megahertz.append(float(line.split(":")[1]))
    clock = (max(megahertz) if megahertz else 2000.0) * 1e6
    return cores * clock * 32


def peak_flops(device_name=None):
    """`(FLOP/s, source)`: the CPU float32 estimate for no name or "CPU", else the bfloat16 peak of
    the GPU named `device_name` from the table (None for a GPU not in it); `source` says which."""
    if not device_name or device_name.upper() == "CPU":
        peak = cpu_peak_flops()
        return peak, f"CPU fp32 estimate (cores x clock x 32), {peak / 1e12:.2f} TFLOP/s"
    for name, tflops in GPU_PEAK_BF16_TFLOPS:
        if name.lower() in device_name.lower():
            return tflops * 1e12, f"{name} dense bf16 peak, {tflops} TFLOP/s"
    return None, f"{device_name!r} is not in benchmarks/mfu.py's table: give its peak (--peak-tflops)"
