"""Plots a run's training curve (history.csv) to a PNG: train and validation loss per evaluation.

Usage:
    python benchmarks/plot_history.py checkpoints/shakespeare_char benchmarks/shakespeare_char_loss.png

Needs matplotlib (`pip install -e '.[bench]'`).
"""

import argparse
import csv
import json
import os


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("output", help="PNG path")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(args.run_dir, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(args.run_dir, "config.json")) as f:
        interval = json.load(f)["train"]["eval_interval"]
    steps = [(int(row["epoch"]) + 1) * interval for row in rows]
    figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
    axis.plot(steps, [float(row["loss"]) for row in rows], "o-", label="train loss (interval mean)")
    axis.plot(steps, [float(row["val_loss"]) for row in rows], "s-", label="validation loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats per token)")
    axis.set_title(os.path.basename(os.path.normpath(args.run_dir)))
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
