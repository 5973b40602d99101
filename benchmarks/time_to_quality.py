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

With `--mfu`, also the median step time (training steps only: history's `tokens_per_second`,
evaluation intervals after the first, which holds the compilation), tokens per second and the
model FLOPs utilisation against `--device`'s peak (benchmarks/mfu.py's table; a CPU estimate
without it). `--time-limit` stops a run that many seconds after its start and reports what it
logged; `--out DIR` keeps each run's output and history and writes every figure to
`DIR/results.json`.

Usage:
    python benchmarks/time_to_quality.py pipelines/shakespeare_char.toml --runs 3 --target 1.88
    python benchmarks/time_to_quality.py pipelines/shakespeare_char.toml --runs 3 --resume
    python benchmarks/time_to_quality.py pipelines/shakespeare_char_gpu.toml --runs 1 --target 1.47 \\
        --mfu --device "NVIDIA H100 80GB HBM3" --time-limit 450 --out results
    python benchmarks/time_to_quality.py pipelines/shakespeare_char.toml --rounds 2 \
        --nanogpt-python .venv-torch/bin/python   # an interpreter with torch (kgpt's [gpt2] extra)
"""

import argparse
import csv
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from kgpt import environment

environment.configure()  # mfu imports TensorFlow: without its start-up noise

from mfu import flops_per_token, peak_flops  # noqa: E402

from kgpt.config import ModelConfig  # noqa: E402
from kgpt.model.gpt import count_parameters  # noqa: E402
from kgpt.rundir import read_model_config  # noqa: E402


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


@dataclasses.dataclass
class Run:
    """One `kgpt train` process as the watcher saw it."""

    times: list  # seconds from the start at which each evaluation was logged
    losses: list  # their validation losses
    total: float  # seconds the whole process ran
    rows: list  # the history rows it logged
    timed_out: bool = False  # stopped at --time-limit


def run(recipe, run_dir, extra, stop_after=None, poll=0.05, time_limit=None, log=None):
    """Starts `kgpt train` and returns a `Run`. `stop_after`: SIGKILL once that many evaluations
    are logged and backed up; `time_limit`: stop it that many seconds after its start; `log`: a
    file for its output (else a temporary one, shown if it fails)."""
    path = os.path.join(run_dir, "history.csv")
    before = len(history(path))
    command = [sys.executable, "-m", "kgpt", "train", recipe, "--run-dir", run_dir, *extra]
    with open(log, "w+") if log else tempfile.TemporaryFile("w+") as output:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True)
        times, losses, timed_out = [], [], False
        while True:
            rows = history(path)[before:]
            now = time.perf_counter() - start
            for row in rows[len(times):]:
                times.append(now)
                losses.append(float(row["val_loss"]))
            if stop_after is not None and len(times) >= stop_after and backed_up(run_dir) >= stop_after:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return Run(times, losses, time.perf_counter() - start, rows)
            if time_limit is not None and now > time_limit and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                timed_out = True
            if process.poll() is not None:
                break
            time.sleep(poll)
        total = time.perf_counter() - start
        if process.returncode and not timed_out:
            output.seek(0)
            text = output.read()
            raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{text[-4000:]}")
    return Run(times, losses, total, history(path)[before:], timed_out)


def throughput(result, run_dir, devices, peak):
    """`{step_time_ms, tokens_per_second, parameters, flops_per_token, mfu}` of a finished run:
    the median of its evaluation intervals after the first (the first, if it logged one only)."""
    rates = [float(row["tokens_per_second"]) for row in result.rows if row.get("tokens_per_second")]
    if not rates:
        return {}
    rate = statistics.median(rates[1:] if len(rates) > 1 else rates)
    with open(os.path.join(run_dir, "config.json")) as f:
        batch_size = json.load(f)["train"]["batch_size"] * devices
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    config = ModelConfig(**{k: v for k, v in read_model_config(run_dir).items() if k in fields})
    flops = flops_per_token(config)
    tokens_per_step = batch_size * config.sequence_length
    return {
        "step_time_ms": 1e3 * tokens_per_step / rate,
        "tokens_per_second": rate,
        "parameters": count_parameters(config),
        "flops_per_token": flops,
        "mfu": flops * rate / (peak * devices) if peak else None,
    }


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
            result = run(args.recipe, os.path.join(directory, "run"), extra)
        times, losses = result.times, result.losses
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
    parser.add_argument("--mfu", action="store_true", help="also step time, tokens/s and MFU")
    parser.add_argument("--device", default=None, help="the GPU's name, for its peak (default: CPU)")
    parser.add_argument("--devices", type=int, default=1, help="replicas the run trains on")
    parser.add_argument("--peak-tflops", type=float, default=None, help="per device, instead of the table")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds; stops each run then")
    parser.add_argument("--out", default=None, help="folder for results.json and each run's log and history")
    parser.add_argument("--rounds", type=int, help="compare with nanoGPT: this many alternate rounds")
    parser.add_argument("--nanogpt-python", default=sys.executable, help="a Python with torch")
    parser.add_argument("--nanogpt-args", default="", help="passed to nanogpt_shakespeare_char.py")
    args = parser.parse_args()
    extra = [item for value in args.set for item in ("--set", value)]
    if args.peak_tflops:
        peak, source = args.peak_tflops * 1e12, f"--peak-tflops {args.peak_tflops:g}"
    else:
        peak, source = peak_flops(args.device)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(
        f"{args.recipe}; machine: {machine}"
        + (f", {args.devices} x {args.device}" if args.device else "")
        + f"; load average before: {os.getloadavg()[0]:.2f}"
        + (f"\nMFU against: {source}" if args.mfu else "") + "\n", flush=True,
    )
    mfu_columns = " step ms | tokens/s | MFU |" if args.mfu else ""
    if args.rounds:
        return compare(args, extra)
    print("| run | first interval s | steady interval s | resumed first interval s | "
          f"val <= {args.target} at s | whole process s | best val |{mfu_columns}")
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if args.mfu else ""))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    reached_all, results = [], []
    for index in range(args.runs):
        with tempfile.TemporaryDirectory() as directory:
            run_dir = os.path.join(directory, "run")
            log = os.path.join(args.out, f"run{index + 1}.log") if args.out else None
            resumed = ""
            if args.resume:
                first = run(args.recipe, run_dir, extra, stop_after=1)
                result = run(args.recipe, run_dir, extra, time_limit=args.time_limit, log=log)
                resumed = f"{result.times[0]:.1f}"
                times = first.times[:1] + [first.times[0] + t for t in result.times]  # not a whole-run time line
                losses, total = result.losses, float("nan")
            else:
                result = run(args.recipe, run_dir, extra, time_limit=args.time_limit, log=log)
                times, losses, total = result.times, result.losses, result.total
            speed = throughput(result, run_dir, args.devices, peak) if args.mfu and times else {}
            if args.out and os.path.exists(os.path.join(run_dir, "history.csv")):
                shutil.copy(os.path.join(run_dir, "history.csv"), os.path.join(args.out, f"run{index + 1}_history.csv"))
        intervals = [b - a for a, b in zip(times, times[1:])]
        steady = statistics.median(intervals[1:] if len(intervals) > 1 else intervals) if intervals else None
        reached = next((t for t, loss in zip(times, losses) if loss <= args.target), None)
        if reached is not None and not args.resume:
            reached_all.append(reached)
        results.append({
            "first_interval_s": times[0] if times else None, "steady_interval_s": steady,
            "resumed_first_interval_s": float(resumed) if resumed else None,
            "time_to_target_s": None if args.resume else reached,
            "process_s": None if args.resume else total, "timed_out": result.timed_out,
            "best_val_loss": min(losses) if losses else None,
            "evaluations": [{"time_s": t, "val_loss": loss} for t, loss in zip(times, losses)],
            **speed,
        })

        def cell(value, form="{:.1f}"):
            return "-" if value is None or value != value else form.format(value)

        row = (
            f"| {index + 1} | {cell(results[-1]['first_interval_s'])} | {cell(steady)} | {resumed or '-'} | "
            f"{cell(results[-1]['time_to_target_s'])} | "
            f"{cell(results[-1]['process_s'])}{' (time limit)' if result.timed_out else ''} | "
            f"{cell(results[-1]['best_val_loss'], '{:.4f}')} |"
        )
        if args.mfu:
            row += (f" {cell(speed.get('step_time_ms'))} | {cell(speed.get('tokens_per_second'), '{:,.0f}')} | "
                    f"{cell(speed.get('mfu'), '{:.1%}')} |")
        print(row, flush=True)
    summary = None
    if reached_all:
        summary = statistics.median(reached_all)
        print(f"\nmedian time to val <= {args.target}: {summary:.1f} s "
              f"({len(reached_all)} of {args.runs} runs reached it)")
    if args.out:
        report = {
            "recipe": args.recipe, "set": args.set, "target": args.target,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine, "device": args.device or "CPU", "devices": args.devices,
            "peak_flops_per_device": peak, "peak_source": source, "time_limit_s": args.time_limit,
            "median_time_to_target_s": summary, "runs": results,
        }
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
