"""Generation past the context: tokens/s for 4x the context against the within-context speed.

One model, `kgpt.generation.decoder.Decoder` (what `kgpt generate RUN_DIR` runs: prefill, then the cached
decode loop as one XLA-compiled `tf.while_loop`), greedy, no end-of-text, batch 1 and 8:

- within: a short prompt plus new tokens up to the context (no rebuild of the cache);
- past, window W: a short prompt plus 4x the context of new tokens; each time the cache is full
  it is rebuilt from the last W tokens (one prefill of W tokens every `context - W` new tokens).
  W = context / 2 is kgpt's default; W = context - 1 rebuilds at every token, as nanoGPT crops.

Each timed call is one full generation after a warm-up call (which traces and compiles); the rows
are measured in turn, round after round, and the table reports medians and the ratio to "within".

Usage:
    python benchmarks/generate_past_context.py [--rounds 3] [--batch-sizes 1,8]
"""

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as `kgpt` sets it

import keras  # noqa: E402

from kgpt.generation.decoder import Decoder  # noqa: E402
from kgpt.model.gpt import build_model  # noqa: E402

SIZE = dict(vocabulary_size=512, sequence_length=128, num_layers=4, num_heads=4, hidden_dim=128)
PROMPT_LENGTH = 8


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,8")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    model = build_model(SIZE)
    context = SIZE["sequence_length"]
    cases = [("within", context - PROMPT_LENGTH, context // 2)]
    for window in (context // 2, context - 1):
        cases.append((f"past 4x, W={window}", 4 * context, window))
    decoders = {window: Decoder(model, jit_compile=True, window=window) for _, _, window in cases}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    times = {(name, batch): [] for name, _, _ in cases for batch in batch_sizes}

    def run(name, steps, window, batch):
        prompts = [[(7 * row + i) % SIZE["vocabulary_size"] for i in range(PROMPT_LENGTH)] for row in range(batch)]
        start = time.perf_counter()
        rows = decoders[window](prompts, steps)
        elapsed = time.perf_counter() - start
        assert all(len(row) == steps for row in rows), name  # no early end: the same work each time
        return elapsed

    for name, steps, window in cases:  # warm-up: trace and compile
        for batch in batch_sizes:
            run(name, steps, window, batch)
    for _ in range(args.rounds):
        for name, steps, window in cases:
            for batch in batch_sizes:
                times[(name, batch)].append(run(name, steps, window, batch))

    print(f"GPT {SIZE}, prompt {PROMPT_LENGTH} tokens, greedy, XLA; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; medians of {args.rounds} rounds")
    print(f"{'case':<20} {'batch':>5} {'new tokens':>10} {'seconds':>8} {'tokens/s':>9} {'vs within':>9}")
    for batch in batch_sizes:
        base = None
        for name, steps, _ in cases:
            seconds = statistics.median(times[(name, batch)])
            rate = batch * steps / seconds
            base = base or rate
            print(f"{name:<20} {batch:>5} {steps:>10} {seconds:>8.3f} {rate:>9.0f} {rate / base:>8.2f}x")


if __name__ == "__main__":
    main()
