"""Weight-only int8 for generation: decode speed, greedy agreement and perplexity against float32.

Issue 23's question: does int8 (Keras' `quantize("int8")` or weight-only int8 with a per-output-
channel scale) make `kgpt generate` faster at a perplexity within 1% of float32? One process per
model; variants (each a copy of the same float32 weights):
- `float32`: the model as `kgpt generate` runs it.
- `keras-int8`: Keras' `Dense.quantize("int8")` on every Dense: int8 kernels with a per-output
  scale, and the *inputs* quantized on the fly (absmax per row), an int8 x int8 -> int32 matmul.
  The tied embedding/output head stays float32.
- `int8-dense`: weight-only: the same int8 kernels, activations float32
  (`Int8QuantizationConfig(activation_quantizer=None)`); head float32.
- `int8-all`: `int8-dense` plus the tied table in int8 with one scale per row (per vocabulary
  entry, i.e. per output channel of the head), used by the lookup and by the head.

For each: greedy decoding through `kgpt.generation.decoder.Decoder` (the compiled loop of
`kgpt generate`; XLA on, and off as the default SavedModel export runs it), batch 1 and 8, timed
in interleaved rounds (median ms per new token; the ratio to float32 in the same round); greedy
tokens compared with float32's (matching positions, and the mean count before a row's first
difference); and validation perplexity over the same sliding windows as `kgpt evaluate`.

Usage:
    python benchmarks/int8_generate.py RUN_DIR [RUN_DIR ...] [--random-small] [--data-dir DIR]
        [--rounds 5] [--new-tokens 64] [--split validation] [--no-plain] [--hlo]
`--random-small` adds a random 6-layer, width-384, vocabulary-8,192 model (the
`generate_throughput.py` "small" size): speed only, no perplexity. `--hlo` prints what XLA
compiles each variant's Dense matmul to.
"""

import argparse
import dataclasses
import math
import os
import re
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as `kgpt` sets it

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import ops  # noqa: E402

from kgpt.data.pipeline import scoring_tokens  # noqa: E402
from kgpt.evaluate import evaluate_run, evaluation_data, keras_scorer, load_run  # noqa: E402
from kgpt.generation.decoder import Decoder  # noqa: E402
from kgpt.model.gpt import build_model  # noqa: E402
from kgpt.rundir import RunDirectory  # noqa: E402

SMALL = dict(vocabulary_size=8192, sequence_length=256, num_layers=6, num_heads=6, hidden_dim=384)
VARIANTS = ("float32", "keras-int8", "int8-dense", "int8-all")
PROMPT_LENGTH = 16


def _dense_layers(model):
    return [layer for layer in model._flatten_layers() if type(layer) is keras.layers.Dense]


def _int8_head(model):
    """The tied head on the int8 table: `logits = (hidden @ q^T) / scale`, scale per vocabulary row."""
    table = model.embeddings.token_embedding

    def head(hidden):
        if model.final_norm is not None:
            hidden = model.final_norm(hidden)
        hidden = ops.cast(hidden, "float32")
        logits = ops.matmul(hidden, ops.transpose(ops.cast(table._embeddings, "float32")))
        return logits / table.embeddings_scale

    return head


def quantized(model, variant):
    """`model` (a float32 GPT, changed in place) as `variant`; returns it."""
    if variant == "float32":
        return model
    config = None if variant == "keras-int8" else keras.quantizers.Int8QuantizationConfig(
        activation_quantizer=None
    )
    for layer in _dense_layers(model):
        layer.quantize("int8", config=config)
    if variant == "int8-all":
        model.embeddings.token_embedding.quantize("int8")
        model._head = _int8_head(model)  # the instance's head, not GPT's
    return model


def weight_megabytes(model):
    return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in model.weights) / 1e6


def dense_hlo(model):
    """What XLA makes of the first Dense on one token: its optimized HLO's dot and fusion lines."""
    dense = _dense_layers(model)[0]
    inputs = tf.zeros((1, 1, dense._kernel.shape[0]))
    function = tf.function(lambda x: dense(x), jit_compile=True)
    hlo = function.experimental_get_compiler_ir(inputs)(stage="optimized_hlo")
    lines = [re.sub(r",? (metadata|frontend_attributes)=\{[^}]*\}", "", line.strip())
             for line in hlo.splitlines() if re.search(r"\b(dot|fusion|custom-call)\(", line)]
    return lines


def prompts_of(tokens, batch_size, rng):
    starts = rng.integers(0, len(tokens) - PROMPT_LENGTH, batch_size)
    return [list(map(int, tokens[s : s + PROMPT_LENGTH])) for s in starts]


def agreement(rows, reference):
    """(matching positions / all, mean tokens before a row's first difference)."""
    same = total = 0
    prefixes = []
    for row, ref in zip(rows, reference):
        equal = np.asarray(row) == np.asarray(ref)
        same, total = same + int(equal.sum()), total + len(equal)
        prefixes.append(int(np.argmin(equal)) if not equal.all() else len(equal))
    return same / total, statistics.mean(prefixes)


def measure(name, make_model, tokens, args, evaluate=None):
    """Rows of the table for one model: `make_model()` builds a fresh float32 copy."""
    models = {variant: quantized(make_model(), variant) for variant in VARIANTS}
    context = models["float32"].model_config.sequence_length
    new_tokens = min(args.new_tokens, context - PROMPT_LENGTH)
    if args.hlo:
        for variant, model in models.items():
            print(f"{name} {variant}: first Dense under XLA:")
            for line in dense_hlo(model):
                print("   ", line[:160])
    rng = np.random.default_rng(0)
    modes = ["xla"] + ([] if args.no_plain else ["plain"])
    rows = {variant: {"MB": weight_megabytes(m)} for variant, m in models.items()}
    for batch_size in (1, 8):
        prompts = prompts_of(tokens, batch_size, rng)
        for mode in modes:
            decoders = {v: Decoder(m, jit_compile=mode == "xla") for v, m in models.items()}
            outputs = {v: d(prompts, new_tokens) for v, d in decoders.items()}  # traces, warms
            times = {v: [] for v in decoders}
            for _ in range(args.rounds):
                for variant, decoder in decoders.items():
                    start = time.perf_counter()
                    decoder(prompts, new_tokens)
                    times[variant].append((time.perf_counter() - start) / new_tokens * 1e3)
            for variant in decoders:
                ratios = [t / f for t, f in zip(times[variant], times["float32"])]
                rows[variant][f"b{batch_size} {mode}"] = (statistics.median(times[variant]),
                                                          statistics.median(ratios))
                if mode == "xla":
                    rows[variant][f"agree b{batch_size}"] = agreement(outputs[variant], outputs["float32"])
    if evaluate is not None:
        for variant, model in models.items():
            rows[variant]["perplexity"] = evaluate(model)
    print(f"{name}: {models['float32'].count_params():,} parameters, context {context}, "
          f"{new_tokens} new tokens after a {PROMPT_LENGTH}-token prompt, {args.rounds} rounds, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    return [(name, variant, row) for variant, row in rows.items()]


def print_table(results, modes):
    columns = [f"b{b} {m}" for b in (1, 8) for m in modes]
    header = ["model", "variant", "weights MB"] + [f"ms/token {c} (x f32)" for c in columns]
    header += ["greedy agree b1/b8", "val perplexity (change)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * 2 + "---:|" * (len(header) - 2))
    base = {}
    for name, variant, row in results:
        cells = [name, variant, f"{row['MB']:.1f}"]
        for column in columns:
            milliseconds, ratio = row[column]
            cells.append(f"{milliseconds:.2f} ({ratio:.2f}x)")
        cells.append(" / ".join(f"{row[f'agree b{b}'][0]:.0%} ({row[f'agree b{b}'][1]:.0f})" for b in (1, 8)))
        if "perplexity" in row:
            base.setdefault(name, row["perplexity"])
            change = row["perplexity"] / base[name] - 1
            cells.append(f"{row['perplexity']:.3f} ({change:+.2%})")
        else:
            cells.append("-")
        print("| " + " | ".join(cells) + " |")
    print("greedy agree: positions equal to float32's (mean tokens before a row's first difference)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", help="run directories written by kgpt train")
    parser.add_argument("--random-small", action="store_true", help="add a random 6 x 384 model, vocabulary 8,192")
    parser.add_argument("--data-dir", help="the corpus folder (overrides the runs' data.dir)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-plain", action="store_true", help="skip the XLA-off loop (the SavedModel's)")
    parser.add_argument("--hlo", action="store_true", help="print the first Dense's optimized HLO per variant")
    args = parser.parse_args()
    tf.get_logger().setLevel("ERROR")  # one Decoder per variant and mode: retracing is expected
    if not args.runs and not args.random_small:
        parser.error("give at least one run directory or --random-small")
    results = []
    for run_dir in args.runs:
        run = load_run(run_dir)
        config, fixed_split = evaluation_data(None, run.data, args.data_dir)
        split = fixed_split or args.split
        tokens = scoring_tokens(config, run.tokenizer, split)

        def evaluate(model, run=run, config=config, split=split):
            scored = dataclasses.replace(run, score=keras_scorer(model, jit_compile=True))
            return evaluate_run(scored, config, split, batch_size=32).perplexity

        results += measure(os.path.basename(os.path.normpath(run_dir)),
                           lambda run_dir=run_dir: RunDirectory(run_dir).load_model(), tokens, args, evaluate)
    if args.random_small:
        keras.utils.set_random_seed(0)
        weights = build_model(SMALL).get_weights()

        def make_small():
            model = build_model(SMALL)
            model.set_weights(weights)
            return model

        tokens = np.random.default_rng(1).integers(1, SMALL["vocabulary_size"], 4096)
        results += measure("random 6x384 v8192", make_small, tokens, args)
    print_table(results, ["xla"] + ([] if args.no_plain else ["plain"]))


if __name__ == "__main__":
    main()
