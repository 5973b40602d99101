"""WikiText-2 recipe sweep: short runs of candidate settings, each given the same wall-clock budget.

Each candidate is `kgpt train RECIPE --set ...` in a fresh process. The budget is turned into a
step count per candidate from its measured step time, so a candidate that steps faster trains on
more tokens, as it would in the same hour. Step times are measured once per shape (model, batch,
context: the settings that change what a step costs) by a probe run of two short intervals, and
kept in `--step-times` (JSON), so a later sweep on a busy machine can reuse a quiet machine's
figures. The learning-rate schedule of every candidate ends at its own last step.

The table: steps, tokens trained, step time, best validation loss per token and its perplexity.
All candidates share one tokenizer (the recipe's; its cache is shared), so per-token losses
compare directly.

Usage:
    python benchmarks/wikitext2_sweep.py --data-dir ../shared/data --budget 300
    python benchmarks/wikitext2_sweep.py --data-dir ../shared/data --budget 300 --only lr2e-3,gru
"""

import argparse
import concurrent.futures
import csv
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import tomllib

RECIPE = "pipelines/wikitext2.toml"
GRU_RECIPE = "pipelines/wikitext2_gru.toml"

# The GPT recipe before the sweep (4 x 192, learned positions, dropout 0.1, peak 1e-3); every GPT
# candidate is it plus its changes, so the table holds whatever the recipe file says now.
BEFORE = {"model.num_layers": 4, "model.hidden_dim": 192, "model.position_embedding": "learned",
          "model.dropout": 0.1, "train.learning_rate": 1e-3, "train.min_learning_rate": 1e-4}
LR2 = {"train.learning_rate": 2e-3, "train.min_learning_rate": 2e-4}
ALIBI = {**LR2, "model.dropout": 0.0, "model.position_embedding": "alibi"}

# name -> (recipe, overrides).
CANDIDATES = {
    "base": (RECIPE, BEFORE),
    "lr2e-3": (RECIPE, {**BEFORE, **LR2}),
    "lr2e-3-d0": (RECIPE, {**BEFORE, **LR2, "model.dropout": 0.0}),
    "lr3e-3-d0": (RECIPE, {**BEFORE, "train.learning_rate": 3e-3, "train.min_learning_rate": 3e-4,
                           "model.dropout": 0.0}),
    "alibi": (RECIPE, {**BEFORE, **ALIBI}),
    "2x256-alibi": (RECIPE, {**BEFORE, **ALIBI, "model.num_layers": 2, "model.hidden_dim": 256}),
    "3x256-alibi": (RECIPE, {**BEFORE, **ALIBI, "model.num_layers": 3, "model.hidden_dim": 256}),
    "gru": (GRU_RECIPE, {}),
}
SHAPE_KEYS = ("model.num_layers", "model.hidden_dim", "model.num_heads", "data.sequence_length",
              "train.batch_size", "model.position_embedding")


def shape(recipe, overrides):
    return recipe + ";" + ",".join(f"{k}={overrides[k]}" for k in SHAPE_KEYS if k in overrides)


def train(recipe, run_dir, overrides, data_dir):
    command = [sys.executable, "-m", "kgpt", "train", recipe, "--run-dir", run_dir,
               "--set", f"data.dir={data_dir}"]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}")
    with open(os.path.join(run_dir, "history.csv"), newline="") as f:
        return list(csv.DictReader(f))


def step_time(recipe, overrides, data_dir, batch_tokens):
    """Seconds per step: the second of two 25-step intervals of a probe run (the first pays the
    start-up)."""
    probe = {**overrides, "train.max_steps": 50, "train.eval_interval": 25, "train.eval_steps": 1,
             "train.steps_per_execution": 25, "train.warmup_steps": 5, "train.sample_prompt": ""}
    with tempfile.TemporaryDirectory() as directory:
        rows = train(recipe, os.path.join(directory, "probe"), probe, data_dir)
    return batch_tokens / float(rows[-1]["tokens_per_second"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder with wikitext-2-raw/")
    parser.add_argument("--budget", type=float, default=240, help="seconds of training per candidate")
    parser.add_argument("--only", default="", help="comma-separated candidate names")
    parser.add_argument("--step-times", default="benchmarks/wikitext2_step_times.json")
    parser.add_argument("--parallel", type=int, default=1, help="candidates trained at once")
    parser.add_argument("--keep", default="", help="keep run directories under this folder")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(CANDIDATES)
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        parser.error(f"unknown candidates {unknown}; choose from {sorted(CANDIDATES)}")
    times = {}
    if os.path.exists(args.step_times):
        with open(args.step_times) as f:
            times = json.load(f)
    print(f"budget {args.budget:.0f} s per candidate; {platform.machine()}, {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}\n", flush=True)
    print("| candidate | changes | steps | tokens | s/step | val loss at half | best val loss | val ppl |")
    print("|---|---|---:|---:|---:|---:|---:|---:|", flush=True)
    sizes = {}
    for name in names:  # every probe first, while the machine is as quiet as it will be
        recipe, overrides = CANDIDATES[name]
        with open(recipe, "rb") as f:
            base = tomllib.load(f)
        batch = overrides.get("train.batch_size", base["train"]["batch_size"])
        context = overrides.get("data.sequence_length", base["data"]["sequence_length"])
        key = shape(recipe, overrides)
        sizes[name] = batch, context, key
        if key not in times:
            times[key] = step_time(recipe, overrides, args.data_dir, batch * context)
            with open(args.step_times, "w") as f:
                json.dump(times, f, indent=1)
    def one(name):
        recipe, overrides = CANDIDATES[name]
        batch, context, key = sizes[name]
        seconds = times[key]
        steps = max(100, int(args.budget / seconds) // 100 * 100)
        settings = {**overrides, "train.max_steps": steps, "train.eval_interval": steps // 2,
                    "train.steps_per_execution": 50, "train.sample_prompt": "",
                    "train.warmup_steps": min(200, steps // 10)}
        with tempfile.TemporaryDirectory() as directory:
            run_dir = os.path.join(args.keep or directory, f"sweep_{name}")
            try:
                rows = train(recipe, run_dir, settings, args.data_dir)
            except RuntimeError as error:
                return f"| {name} | failed: {str(error).splitlines()[-1]} |"
        best = min(float(r["val_loss"]) for r in rows)
        changed = {k: v for k, v in overrides.items() if BEFORE.get(k) != v or recipe != RECIPE}
        shown = " ".join(f"{k.split('.')[1]}={v}" for k, v in changed.items()) or "(as before)"
        return (f"| {name} | {shown} | {steps:,} | {steps * batch * context / 1e6:.2f}M | {seconds:.3f} | "
                f"{float(rows[0]['val_loss']):.4f} | {best:.4f} | {math.exp(best):.1f} |")

    # Runs may share the machine (--parallel): each run's step count comes from its step time
    # alone, so what it trains to does not depend on the load. A run directory kept
    # with --keep resumes where it stopped.
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        for line in pool.map(one, names):
            print(line, flush=True)

if __name__ == "__main__":
    main()
