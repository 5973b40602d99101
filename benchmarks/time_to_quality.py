"""Time to quality: the whole `kgpt train RECIPE` process, timed from its start.

Runs `kgpt train` as users do (a fresh process, a new run directory) and watches the run's
`history.csv`: the time each evaluation is logged, counted from the moment the process was
started. Reports, per run: the first evaluation interval (process start to the first logged
evaluation: TensorFlow's import, the corpus, tracing and compilation, then `eval_interval` steps),
the steady interval (median of the later ones), when validation loss first reached `--target`,
the whole process, and the best validation loss. With `--resume`, each run is killed right after
its first evaluation and started again into the same directory, and the resumed process's first
interval is reported too (what a resume pays before useful work). With `--rounds N`, N rounds of
nanoGPT's recipe (`benchmarks/nanogpt_shakespeare_char.py`, whole-script time) and kgpt's
(time to a logged validation loss <= `--target`), alternately, and their ratio.

Usage:
    python benchmarks/time_to_quality.py pipelines/shakespeare_char.toml --runs 3 --target 1.88
    python benchmarks/time_to_quality.py pipelines/shakespeare_char.toml --runs 3 --resume
    python benchmarks/time_to_quality.py pipelines/shakespeare_char.toml --rounds 2 \
        --nanogpt-python .venv-torch/bin/python   # an interpreter with torch (kgpt's [gpt2] extra)
"""

import argparse
import csv
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time


def history(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("val_loss")]


def backed_up(run_dir):
    """Evaluations the run's backup holds (the backup is written after the history row)."""
    try:
        with open(os.path.join(run_dir, "backup", "training_metadata.json")) as f:
            return len(json.load(f).get("val_loss", []))
    except (OSError, ValueError):
        return 0


def run(recipe, run_dir, extra, stop_after=None, poll=0.05):
    """Starts `kgpt train`; returns (seconds from start at which each evaluation was logged,
    validation losses, whole-process seconds). `stop_after`: SIGKILL once that many evaluations
    are logged and backed up."""
    path = os.path.join(run_dir, "history.csv")
    before = len(history(path))
    command = [sys.executable, "-m", "kgpt", "train", recipe, "--run-dir", run_dir, *extra]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    times, losses = [], []
    while True:
        rows = history(path)[before:]
        now = time.perf_counter() - start
        for row in rows[len(times):]:
            times.append(now)
            losses.append(float(row["val_loss"]))
        if stop_after is not None and len(times) >= stop_after and backed_up(run_dir) >= stop_after:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return times, losses, time.perf_counter() - start
        if process.poll() is not None:
            break
        time.sleep(poll)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{process.stderr.read()}")
    return times, losses, time.perf_counter() - start


NANOGPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nanogpt_shakespeare_char.py")


def run_nanogpt(python, arguments):
    """nanoGPT's recipe in a fresh process: (whole-script seconds, last and best validation loss)."""
    start = time.perf_counter()
    result = subprocess.run([python, NANOGPT, *arguments], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"{NANOGPT} failed ({result.returncode}):\n{result.stderr}")
    losses = [float(value) for value in re.findall(r"val loss ([0-9.]+)", result.stdout)]
    return seconds, losses[-1], min(losses)


def compare(args, extra):
    """`--rounds`: nanoGPT and kgpt alternately, one table row per round, then the medians."""
    print(f"| round | nanoGPT whole script s | nanoGPT last / best val | kgpt val <= {args.target} at s "
          "| kgpt first interval s | kgpt best val | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for index in range(args.rounds):
        nanogpt, last, best = run_nanogpt(args.nanogpt_python, shlex.split(args.nanogpt_args))
        with tempfile.TemporaryDirectory() as directory:
            times, losses, _ = run(args.recipe, os.path.join(directory, "run"), extra)
        reached = next((t for t, loss in zip(times, losses) if loss <= args.target), None)
        ratio = reached / nanogpt if reached is not None else None
        ratios += [ratio] if ratio is not None else []
        print(f"| {index + 1} | {nanogpt:.1f} | {last:.4f} / {best:.4f} | "
              f"{'-' if reached is None else f'{reached:.1f}'} | {times[0]:.1f} | {min(losses):.4f} | "
              f"{'-' if ratio is None else f'{ratio:.2f}'} |", flush=True)
    if ratios:
        print(f"\nmedian ratio (kgpt to val <= {args.target} / nanoGPT whole script): "
              f"{statistics.median(ratios):.2f}; load average after: {os.getloadavg()[0]:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--target", type=float, default=1.88, help="validation loss to reach")
    parser.add_argument("--resume", action="store_true", help="also time a resume after the first evaluation")
    parser.add_argument("--set", action="append", default=[], help="passed to kgpt train")
    parser.add_argument("--rounds", type=int, help="compare with nanoGPT: this many alternate rounds")
    parser.add_argument("--nanogpt-python", default=sys.executable, help="a Python with torch")
    parser.add_argument("--nanogpt-args", default="", help="passed to nanogpt_shakespeare_char.py")
    args = parser.parse_args()
    extra = [item for value in args.set for item in ("--set", value)]
    print(
        f"{args.recipe}; machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"load average before: {os.getloadavg()[0]:.2f}\n", flush=True,
    )
    if args.rounds:
        return compare(args, extra)
    print("| run | first interval s | steady interval s | resumed first interval s | "
          f"val <= {args.target} at s | whole process s | best val |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    reached_all = []
    for index in range(args.runs):
        with tempfile.TemporaryDirectory() as directory:
            run_dir = os.path.join(directory, "run")
            resumed = ""
            if args.resume:
                first, _, _ = run(args.recipe, run_dir, extra, stop_after=1)
                times, losses, total = run(args.recipe, run_dir, extra)
                resumed = f"{times[0]:.1f}"
                times = first[:1] + [first[0] + t for t in times]  # not a whole-run time line
                total = float("nan")
            else:
                times, losses, total = run(args.recipe, run_dir, extra)
            intervals = [b - a for a, b in zip(times, times[1:])]
            steady = statistics.median(intervals[1:] if len(intervals) > 1 else intervals)
            reached = next((t for t, loss in zip(times, losses) if loss <= args.target), None)
            if reached is not None and not args.resume:
                reached_all.append(reached)
            print(
                f"| {index + 1} | {times[0]:.1f} | {steady:.1f} | {resumed or '-'} | "
                f"{'-' if reached is None or args.resume else f'{reached:.1f}'} | "
                f"{'-' if args.resume else f'{total:.1f}'} | {min(losses):.4f} |",
                flush=True,
            )
    if reached_all:
        print(f"\nmedian time to val <= {args.target}: {statistics.median(reached_all):.1f} s "
              f"({len(reached_all)} of {args.runs} runs reached it)")


if __name__ == "__main__":
    main()
