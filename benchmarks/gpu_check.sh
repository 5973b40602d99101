#!/usr/bin/env bash
# GPU check: nanoGPT's GPU configuration of shakespeare_char (pipelines/shakespeare_char_gpu.toml:
# 6 layers, width 384, 6 heads, context 256, batch 64, dropout 0.2, 5,000 steps) in mixed_bfloat16
# with XLA on one GPU, in at most 8 minutes, timed by benchmarks/time_to_quality.py. It records
# the GPU's name, the time from the training process's start to the first logged validation loss
# <= 1.47 (nanoGPT: 1.4697 in about 3 minutes on one A100), the median step time, tokens/s, MFU
# against the GPU's dense bf16 peak (benchmarks/mfu.py's table, which says which peak it used) and
# the best validation loss.
#
# Run from the repository root:  bash benchmarks/gpu_check.sh
# Results go to $OUT if set, else checkpoints/gpu_check: results.json (every figure),
# gpu_check.txt (the printed table), run1.log (what kgpt train printed), run1_history.csv.
#
# Assumes (the network may be off; nothing is downloaded): a Python >= 3.11 with kgpt's
# dependencies (pyproject.toml) whose TensorFlow 2.20 is built with CUDA and sees the GPU, as after
# `pip install 'tensorflow[and-cuda]>=2.20,<2.21' -e .` on a machine with a network. That Python is
# $GPU_CHECK_PYTHON, else .venv/bin/python, else python3. With GPU_CHECK_WHEELS=DIR (a wheelhouse:
# `pip download 'tensorflow[and-cuda]>=2.20,<2.21' . -d DIR` where there is a network), the
# dependencies are first installed from DIR, offline, into .venv-gpu-check. kgpt itself comes from
# this tree (PYTHONPATH), installed or not. Without a GPU TensorFlow can see, it stops with an error.
#
# Settings (environment variables):
#   GPU_CHECK_BUDGET=480   seconds for the whole check, a hard limit (training stops 40 s before)
#   GPU_CHECK_TARGET=1.47  the validation loss to time
#   GPU_CHECK_CPU=1        run without a GPU (the MFU is then against a CPU estimate)
#   GPU_CHECK_TINY=1       a tiny model for 20 steps (still bfloat16 and XLA): the test suite's CPU run
#   GPU_CHECK_OUT=DIR      the results folder (else $OUT, else checkpoints/gpu_check)

set -euo pipefail
cd "$(dirname "$0")/.."

budget=${GPU_CHECK_BUDGET:-480}
target=${GPU_CHECK_TARGET:-1.47}
out=${GPU_CHECK_OUT:-${OUT:-checkpoints/gpu_check}}
recipe=pipelines/shakespeare_char_gpu.toml
fail() { echo "gpu_check.sh: error: $*" >&2; exit 2; }

python=${GPU_CHECK_PYTHON:-}
if [[ -n ${GPU_CHECK_WHEELS:-} ]]; then
    [[ -d $GPU_CHECK_WHEELS ]] || fail "GPU_CHECK_WHEELS=$GPU_CHECK_WHEELS is not a folder of wheels."
    echo "Installing kgpt's dependencies from $GPU_CHECK_WHEELS (offline) into .venv-gpu-check"
    "${python:-python3}" -m venv .venv-gpu-check
    .venv-gpu-check/bin/python -m pip install -q --no-index --find-links "$GPU_CHECK_WHEELS" \
        'tensorflow[and-cuda]>=2.20,<2.21' . || fail "pip could not install from $GPU_CHECK_WHEELS."
    python=.venv-gpu-check/bin/python
fi
if [[ -z $python ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
command -v "$python" >/dev/null || fail "no Python at '$python'; set GPU_CHECK_PYTHON."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
# Compilation is timed in every run: no persistent XLA cache unless KGPT_XLA_CACHE names one.
export KGPT_XLA_CACHE=${KGPT_XLA_CACHE-}
# One GPU: several visible GPUs would make kgpt train data-parallel (64 windows on each).
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-0}  # set but empty: no GPU

# What this Python's TensorFlow sees: "<version>\t<GPU count>\t<first GPU's name>".
mkdir -p "$out"
devices=$("$python" - <<'EOF' 2>"$out/gpu_check_errors.txt"
import tensorflow as tf

import kgpt.cli, keras, tiktoken, tokenizers  # noqa: F401  (kgpt's dependencies are there)

gpus = tf.config.list_physical_devices("GPU")
name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else ""
print(f"{tf.__version__}\t{len(gpus)}\t{name}")
EOF
) || fail "$python cannot import TensorFlow, Keras or kgpt's other dependencies (pyproject.toml):" \
          "$(grep -v '^ ' "$out/gpu_check_errors.txt" | tail -n 1); install them (see this script's" \
          "header) or set GPU_CHECK_PYTHON to a Python that has them."
rm -f "$out/gpu_check_errors.txt"
IFS=$'\t' read -r tf_version gpu_count gpu_name <<<"$devices"
if [[ $gpu_count == 0 ]]; then
    [[ -n ${GPU_CHECK_CPU:-} ]] || fail "TensorFlow $tf_version sees no GPU (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES);" \
        "install a CUDA build (pip install 'tensorflow[and-cuda]>=2.20,<2.21'), or set GPU_CHECK_CPU=1 to run on the CPU."
    gpu_name=CPU
fi
echo "gpu_check.sh: TensorFlow $tf_version on $gpu_name; $recipe, budget ${budget} s, target val <= $target; results in $out"

settings=()
if [[ -n ${GPU_CHECK_TINY:-} ]]; then
    for setting in model.num_layers=1 model.num_heads=2 model.hidden_dim=16 data.sequence_length=32 \
        train.batch_size=4 train.max_steps=20 train.eval_interval=10 train.steps_per_execution=5 \
        train.eval_steps=2 train.eval_batch_size=8 train.warmup_steps=2 \
        train.sample_prompt=; do
        settings+=(--set "$setting")
    done
fi

left=$((budget - SECONDS))
(( left > 60 )) || fail "GPU_CHECK_BUDGET=$budget leaves no time to train; give it more seconds."
timeout -k 15 "$left" "$python" benchmarks/time_to_quality.py "$recipe" --runs 1 --target "$target" \
    --mfu --device "$gpu_name" --time-limit $((left - 40)) --out "$out" "${settings[@]}" \
    | tee "$out/gpu_check.txt"
