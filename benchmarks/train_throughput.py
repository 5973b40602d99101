"""Training throughput: kgpt vs keras-hub's GPT-2 of identical size, side by side in one process.

Both models train with `model.fit` on the same random token batches with AdamW and XLA
(`jit_compile=True`). keras-hub runs as its users run it: `GPT2Backbone` plus the tied reverse
embedding as the head, `fit` with default `steps_per_execution=1`. kgpt runs as `kgpt train`
runs it: its own model, optimiser and `steps_per_execution` from the recipe.

Reported per model: milliseconds per step, tokens per second, and model FLOPs utilisation (MFU):
training FLOPs per token `6 * N + 12 * num_layers * hidden_dim * sequence_length` (weights
forward + backward, plus attention scores and values; PaLM's appendix B) over the machine's peak
float32 FLOP/s, estimated as cores x clock x 32 (both in benchmarks/mfu.py; pass --peak-gflops
to override).

Usage:
    python benchmarks/train_throughput.py [--steps 100] [--rounds 3] [--sizes shakespeare_char,larger]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as `kgpt` sets it

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from mfu import cpu_peak_flops, flops_per_token  # noqa: E402  (benchmarks/mfu.py)

from kgpt.config import ModelConfig, TrainConfig  # noqa: E402
from kgpt.data.pipeline import pipeline_options  # noqa: E402
from kgpt.model.gpt import build_model  # noqa: E402
from kgpt.training.train import make_optimizer  # noqa: E402

SIZES = {
    # nanoGPT's shakespeare_char at its CPU size.
    "shakespeare_char": dict(vocabulary_size=65, sequence_length=64, num_layers=4, num_heads=4, hidden_dim=128, batch_size=12),
    "larger": dict(vocabulary_size=8192, sequence_length=256, num_layers=6, num_heads=6, hidden_dim=384, batch_size=12),
}


def dataset(size, steps):
    rng = np.random.default_rng(0)
    x = rng.integers(0, size["vocabulary_size"], (size["batch_size"] * 64, size["sequence_length"]), dtype=np.int32)
    y = np.roll(x, -1, axis=1)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(size["batch_size"], drop_remainder=True)
    # As kgpt's pipelines: tf.data's autotuner off, whose thread held each iterator's teardown up
    # to 10 s (the "slow mode" in RESULTS.md).
    return dataset.prefetch(8).with_options(pipeline_options())


def keras_hub_model(size):
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=size["vocabulary_size"],
        num_layers=size["num_layers"],
        num_heads=size["num_heads"],
        hidden_dim=size["hidden_dim"],
        intermediate_dim=4 * size["hidden_dim"],
        dropout=0.0,
        max_sequence_length=size["sequence_length"],
    )
    token_ids = keras.Input((None,), dtype="int32")
    hidden = backbone({"token_ids": token_ids, "padding_mask": keras.ops.ones_like(token_ids)})
    logits = backbone.token_embedding(hidden, reverse=True)
    return keras.Model(token_ids, logits)


def compile_and_warm_up(model, optimizer, data, steps_per_execution):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
        steps_per_execution=steps_per_execution,
    )
    model.fit(data, steps_per_epoch=2 * steps_per_execution, epochs=1, verbose=0)  # compile + warm up


def time_steps(model, data, steps):
    """Seconds per step of one `fit` over `steps` steps (a multiple of steps_per_execution)."""
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per model and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians reported")
    parser.add_argument("--sizes", default="shakespeare_char,larger")
    parser.add_argument("--steps-per-execution", type=int, default=50, help="kgpt's (as its recipes)")
    parser.add_argument("--peak-gflops", type=float, default=None)
    args = parser.parse_args()
    peak = args.peak_gflops * 1e9 if args.peak_gflops else cpu_peak_flops()
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} cores, "
          f"peak estimate {peak / 1e9:.0f} GFLOP/s fp32, TF_ENABLE_ONEDNN_OPTS={os.environ['TF_ENABLE_ONEDNN_OPTS']}")
    rows = []
    for name in args.sizes.split(","):
        size = SIZES[name]
        config = ModelConfig(**{k: v for k, v in size.items() if k != "batch_size"})
        tokens = size["batch_size"] * size["sequence_length"]
        data = dataset(size, args.steps)
        keras.utils.set_random_seed(0)
        hub = keras_hub_model(size)
        compile_and_warm_up(hub, keras.optimizers.AdamW(1e-4), data, 1)
        keras.utils.set_random_seed(0)
        model = build_model(config)
        train_config = TrainConfig(learning_rate=1e-4, max_steps=1000)
        compile_and_warm_up(model, make_optimizer(train_config, model), data, args.steps_per_execution)
        steps = max(args.steps // args.steps_per_execution, 1) * args.steps_per_execution
        # Alternate the two models and keep medians, so other load on the machine hits both alike.
        hub_times, kgpt_times = [], []
        for _ in range(args.rounds):
            hub_times.append(time_steps(hub, data, steps))
            kgpt_times.append(time_steps(model, data, steps))
        hub_step, kgpt_step = float(np.median(hub_times)), float(np.median(kgpt_times))
        for label, step in (("keras-hub GPT2Backbone", hub_step), ("kgpt", kgpt_step)):
            rows.append((name, label, step * 1e3, tokens / step, tokens / step * flops_per_token(config) / peak))
        rows.append((name, "kgpt / keras-hub", hub_step / kgpt_step, None, None))
    print(f"\n{'size':<17} {'model':<24} {'ms/step':>9} {'tokens/s':>10} {'MFU':>7}")
    for name, label, ms, tps, mfu in rows:
        if tps is None:
            print(f"{name:<17} {label:<24} {ms:>8.2f}x")
        else:
            print(f"{name:<17} {label:<24} {ms:>9.1f} {tps:>10.0f} {mfu:>6.1%}")


if __name__ == "__main__":
    main()
