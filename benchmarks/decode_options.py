"""What penalties and log-probabilities cost a decode step, and that a step without them costs what
it did before they existed.

One random model (`--size`), greedy decoding of a 32-token prompt plus `--new-tokens` tokens through
`kgpt.generation.decoder.Decoder`, with XLA (as `kgpt generate` runs) and without (as the SavedModel
runs). Variants, timed in turn round after round (medians reported, so a busy machine slows them
alike):
- `none`: no penalty, no log-probabilities (every request before issue 24);
- `penalties`: frequency 0.5, presence 0.5, repetition 1.2 (the counts kept in the decode state);
- `logprobs`: each new token's log-probability and the 5 likeliest tokens;
- `both`.

`--baseline PATH` also times `none` in a checkout of kgpt from before the options (e.g. a
`git worktree` of 7f15d92), in subprocesses alternating with this checkout's, one per round: the
"unchanged speed when unused" row.

Usage:
    python benchmarks/decode_options.py [--size small|gpt2] [--rounds 5] [--new-tokens 224]
        [--baseline /path/to/old/kgpt/checkout]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as `kgpt` sets it

PROMPT_LENGTH = 32
SIZES = {
    "small": dict(vocabulary_size=8192, sequence_length=256, num_layers=6, num_heads=6, hidden_dim=384),
    # GPT-2 small's shape: its 50,257-token vocabulary is where per-token work on the logits costs most.
    "gpt2": dict(vocabulary_size=50257, sequence_length=1024, num_layers=12, num_heads=12, hidden_dim=768),
}
VARIANTS = {
    "none": ({}, False),
    "penalties": (dict(frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.2), False),
    "logprobs": ({}, True),
    "both": (dict(frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.2), True),
}


def _timings(size, new_tokens, rounds, variants, modes):
    """`{(variant, mode): [ms per new token, one per round]}`, in this process's kgpt."""
    import keras
    import numpy as np

    from kgpt.generation.decoder import Decoder
    from kgpt.generation.sampling import SamplingOptions
    from kgpt.model.gpt import build_model

    keras.utils.set_random_seed(0)
    model = build_model(SIZES[size])
    prompt = np.random.default_rng(0).integers(0, SIZES[size]["vocabulary_size"], PROMPT_LENGTH).tolist()
    decoders = {mode: Decoder(model, jit_compile=mode == "xla") for mode in modes}

    def run(variant, mode):
        penalties, logprobs = VARIANTS[variant]
        options = dict(sampling=SamplingOptions(**penalties))
        if logprobs:  # a keyword that a checkout from before it does not take
            options["logprobs"] = True
        started = time.perf_counter()
        decoders[mode]([prompt], new_tokens, **options)
        return (time.perf_counter() - started) * 1000 / new_tokens

    for variant in variants:  # traces and compiles, untimed
        for mode in modes:
            run(variant, mode)
    results = {(variant, mode): [] for variant in variants for mode in modes}
    for _ in range(rounds):
        for variant in variants:
            for mode in modes:
                results[variant, mode].append(run(variant, mode))
    return results


def _subprocess_none(tree, size, new_tokens, modes):
    """One round of `none` in the kgpt checkout at `tree`: `{mode: ms per new token}`."""
    command = [sys.executable, __file__, "--size", size, "--new-tokens", str(new_tokens), "--rounds", "1",
               "--variants", "none", "--modes", ",".join(modes), "--json"]
    env = {**os.environ, "PYTHONPATH": tree}
    output = subprocess.run(command, env=env, cwd=tree, check=True, capture_output=True, text=True).stdout
    return {mode: value[0] for mode, value in json.loads(output.splitlines()[-1])["none"].items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--new-tokens", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--modes", default="xla,plain")
    parser.add_argument("--baseline", help="a kgpt checkout from before the options, timed in subprocesses")
    parser.add_argument("--json", action="store_true", help="print the raw timings as one JSON line")
    args = parser.parse_args()
    variants, modes = args.variants.split(","), args.modes.split(",")
    if args.json:
        results = _timings(args.size, args.new_tokens, args.rounds, variants, modes)
        print(json.dumps({v: {m: results[v, m] for m in modes} for v in variants}))
        return
    if args.baseline:  # this checkout and the baseline alternately, a fresh process each
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        paired = {"this checkout": {m: [] for m in modes}, "baseline": {m: [] for m in modes}}
        for _ in range(args.rounds):
            for name, tree in (("this checkout", here), ("baseline", args.baseline)):
                for mode, value in _subprocess_none(tree, args.size, args.new_tokens, modes).items():
                    paired[name][mode].append(value)
        print(f"`none`, {args.size}, {args.rounds} alternating processes (median ms per new token):")
        print("| kgpt | " + " | ".join(modes) + " |\n|---|" + "---:|" * len(modes))
        for name, values in paired.items():
            print(f"| {name} | " + " | ".join(f"{statistics.median(values[m]):.2f}" for m in modes) + " |")
    results = _timings(args.size, args.new_tokens, args.rounds, variants, modes)
    print(f"\n{args.size}: {PROMPT_LENGTH}-token prompt + {args.new_tokens} new tokens, batch 1, greedy; "
          f"median of {args.rounds} rounds, ms per new token (change against `none`):")
    print("| variant | " + " | ".join(modes) + " |\n|---|" + "---:|" * len(modes))
    for variant in variants:
        cells = []
        for mode in modes:
            median = statistics.median(results[variant, mode])
            base = statistics.median(results["none", mode]) if "none" in variants else median
            cells.append(f"{median:.2f} ({(median / base - 1) * 100:+.0f}%)")
        print(f"| {variant} | " + " | ".join(cells) + " |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
