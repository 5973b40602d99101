"""What a kgpt decode step costs: cache writes, ablations, op counts, the weight-streaming floor.

The A/B figures behind RESULTS.md's generation section. One process, one random model of the
`generate_throughput.py` "small" size (vocabulary 8,192, 6 layers x 384, context 256), greedy
decoding of a 32-token prompt plus 224 new tokens through `kgpt.generation.decoder.Decoder`, with XLA on
(as `kgpt generate` runs) and off (as the SavedModel runs). Each variant is traced with its own
`kgpt.model.layers.update_cache`; the variants are timed in turn, round after round, and the medians
reported, so a busy machine slows them alike.

Variants (`--variants NAME:xla|plain,...`):
- `scatter`: kgpt's `update_cache` (a `tensor_scatter_nd_update` of the new rows).
- `select`: the previous write, a broadcast select of the new row against a position mask.
- `dus`: XLA's `dynamic_update_slice` (`XlaDynamicUpdateSlice`: XLA only, so `:xla` only).
- `matmul`: `scatter`, with Keras' `tf.tensordot` for 3-D Dense inputs replaced by a
  broadcasting `tf.matmul` (fewer shape ops in the XLA-off graph).
- Ablations, to see where a step's time goes (they generate other tokens; only the time counts):
  `no-write` leaves the one-token steps' cache writes out, `no-attention` their attention (the
  cache writes and the attention over the cache: the query goes straight to the output
  projection), `no-feed-forward` their feed-forward layers, `no-head` their final LayerNorm and
  output head (every logit is the hidden state's first value). `--ablate` runs all of them, plus
  `scatter`, in both modes.

Usage:
    python benchmarks/decode_step.py [--batch-size 1] [--rounds 5] [--variants ...]
        [--count-ops] [--bandwidth] [--ablate] [--intra-op-threads N]
XLA_FLAGS set in the environment apply to every `:xla` variant.
"""

import argparse
import collections
import contextlib
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
from keras.src.backend.tensorflow import numpy as tf_numpy  # noqa: E402
from tensorflow.compiler.tf2xla.python import xla  # noqa: E402

from kgpt.generation.decoder import Decoder  # noqa: E402
from kgpt.generation.sampling import SamplingOptions  # noqa: E402
from kgpt.model import layers  # noqa: E402
from kgpt.model.gpt import GPT, build_model  # noqa: E402

PROMPT_LENGTH = 32
NEW_TOKENS = 224
SIZE = dict(vocabulary_size=8192, sequence_length=256, num_layers=6, num_heads=6, hidden_dim=384)


def select_update(cache, update, start_index):
    """The previous `update_cache`: a select against a position mask (whole cache rewritten)."""
    offset = ops.arange(ops.shape(cache)[2], dtype="int32") - ops.cast(start_index, "int32")
    update = ops.cast(update, cache.dtype)
    if update.shape[2] == 1:
        return ops.where(ops.reshape(offset == 0, (1, 1, -1, 1)), update, cache)
    length = ops.shape(update)[2]
    inside = ops.logical_and(offset >= 0, offset < length)
    gathered = ops.take(update, ops.clip(offset, 0, length - 1), axis=2)
    return ops.where(ops.reshape(inside, (1, 1, -1, 1)), gathered, cache)


def dynamic_update_slice(cache, update, start_index):
    zero = tf.constant(0, tf.int32)
    start = tf.stack([zero, zero, tf.cast(start_index, tf.int32), zero])
    return xla.dynamic_update_slice(cache, tf.cast(update, cache.dtype), start)


KERAS_MATMUL = tf_numpy.matmul


def broadcast_matmul(x1, x2):
    x1, x2 = tf.convert_to_tensor(x1), tf.convert_to_tensor(x2)
    if x1.shape.rank == 3 and x2.shape.rank == 2:
        return tf.matmul(x1, x2)
    return KERAS_MATMUL(x1, x2)


WRITES = {"scatter": layers.update_cache, "select": select_update, "dus": dynamic_update_slice,
          "matmul": layers.update_cache}


def _one_token(tensor):
    return tensor.shape.rank is not None and tensor.shape[1] == 1


def _skip_write(cache, update, start_index):
    return cache if update.shape[2] == 1 else WRITES["scatter"](cache, update, start_index)


def _skip_attention(self, inputs, cache, start_index):
    if not _one_token(inputs):
        return ATTENTION(self, inputs, cache, start_index)
    # Every column of the fused projection stays in use, so XLA cannot drop part of it.
    query, key, value = ops.split(self.qkv_dense(inputs), 3, axis=-1)
    return self.output_dense(query + key + value), cache


def _skip_feed_forward(self, inputs, training=None):
    return ops.zeros_like(inputs) if _one_token(inputs) else FEED_FORWARD(self, inputs, training)


def _skip_head(self, hidden):
    if not _one_token(hidden):
        return HEAD(self, hidden)
    # Logits that still depend on the blocks (zeros would let XLA drop the whole model).
    shape = (ops.shape(hidden)[0], 1, self.model_config.vocabulary_size)
    return ops.broadcast_to(ops.cast(hidden[..., :1], "float32"), shape)


ATTENTION = layers.CausalSelfAttention.call_with_cache
FEED_FORWARD = layers.FeedForward.call
HEAD = GPT._head
# name -> (owner, attribute, replacement while the decoder traces)
ABLATIONS = {
    "no-write": (layers, "update_cache", _skip_write),
    "no-attention": (layers.CausalSelfAttention, "call_with_cache", _skip_attention),
    "no-feed-forward": (layers.FeedForward, "call", _skip_feed_forward),
    "no-head": (GPT, "_head", _skip_head),
}


@contextlib.contextmanager
def ablated(name):
    """Leaves one part out of the one-token decode steps traced inside the block."""
    if name not in ABLATIONS:
        yield
        return
    owner, attribute, replacement = ABLATIONS[name]
    original = getattr(owner, attribute)
    setattr(owner, attribute, replacement)
    try:
        yield
    finally:
        setattr(owner, attribute, original)


def while_body_ops(decoder, arguments, jit):
    """Op counts of the decode loop's body: HLO after optimisation, or the TensorFlow graph."""
    if jit:
        hlo = decoder._decode.experimental_get_compiler_ir(*arguments)(stage="optimized_hlo")
        bodies = [c for c in re.split(r"\n(?=\S)", hlo) if "body" in c.split("\n", 1)[0]]
        body = max(bodies, key=len)
        names = re.findall(r"=\s*\S+\s+([a-z\-]+)\(", body)
    else:
        graph = decoder._decode.get_concrete_function(*arguments).graph.as_graph_def()
        body = max((f for f in graph.library.function if "body" in f.signature.name),
                   key=lambda f: len(f.node_def))
        names = [node.op for node in body.node_def]
    return len(names), collections.Counter(names).most_common(12)


def streaming_bandwidth(parameters):
    """GB/s of a 1-row matmul over a float32 matrix the size of the model's weights."""
    matrix = tf.ones([384, parameters // 384])
    row = tf.ones([1, 384])
    product = tf.function(lambda: tf.matmul(row, matrix))
    product()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        product().numpy()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3, matrix.shape.num_elements() * 4 / min(times) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default="select:xla,dus:xla,scatter:xla,select:plain,scatter:plain")
    parser.add_argument("--count-ops", action="store_true", help="print each variant's loop-body ops")
    parser.add_argument("--bandwidth", action="store_true", help="time streaming the weights once")
    parser.add_argument("--ablate", action="store_true", help="time each ablation in both modes")
    parser.add_argument("--intra-op-threads", type=int, default=0,
                        help="TensorFlow's intra-op threads (0: one per core); 1 steadies CPU times on a busy machine")
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)

    keras.utils.set_random_seed(0)
    model = build_model(SIZE)
    model(np.zeros((1, 8), "int32"))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, SIZE["vocabulary_size"], (args.batch_size, PROMPT_LENGTH)).astype("int32")
    greedy = SamplingOptions().graph_tensors()
    no_stops = np.zeros((0, 1), "int32")  # `stopping.stop_id_matrix([])`
    arguments = (ids, np.full((args.batch_size,), PROMPT_LENGTH, "int32"), NEW_TOKENS, -1, greedy, no_stops)

    variants = args.variants.split(",")
    if args.ablate:
        names = ["scatter", *ABLATIONS]
        variants = [f"{name}:{mode}" for mode in ("xla", "plain") for name in names]
    decoders, reference = {}, None
    for variant in variants:
        name, mode = variant.split(":")
        known = name in WRITES or name in ABLATIONS
        if not known or mode not in ("xla", "plain") or (name == "dus" and mode == "plain"):
            parser.error(
                f"unknown variant {variant!r}: use scatter|select|matmul|{'|'.join(ABLATIONS)} "
                "with :xla or :plain, dus:xla"
            )
        # The swaps take effect when the decoder traces, on its first call below.
        layers.update_cache = WRITES.get(name, WRITES["scatter"])
        tf_numpy.matmul = broadcast_matmul if name == "matmul" else KERAS_MATMUL
        decoder = Decoder(model, jit_compile=mode == "xla")
        with ablated(name):
            tokens = decoder._decode(*arguments)[0].numpy()
        if name in ABLATIONS:
            pass  # other tokens by design
        elif reference is None:
            reference = tokens
        elif not np.array_equal(tokens, reference):
            raise SystemExit(f"{variant} generated other tokens than {variants[0]}")
        if args.count_ops:
            count, common = while_body_ops(decoder, arguments, mode == "xla")
            print(variant, f"loop-body ops: {count}, most common {common}")
        decoders[variant] = decoder
    layers.update_cache, tf_numpy.matmul = WRITES["scatter"], KERAS_MATMUL

    times = {variant: [] for variant in decoders}
    cpu_times = {variant: [] for variant in decoders}
    for _ in range(args.rounds):
        for variant, decoder in decoders.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            decoder._decode(*arguments)[0].numpy()
            times[variant].append((time.perf_counter() - start) / NEW_TOKENS * 1e3)
            cpu_times[variant].append((time.process_time() - cpu_start) / NEW_TOKENS * 1e3)
    print(
        f"batch {args.batch_size}, {NEW_TOKENS} new tokens, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"intra-op threads {args.intra_op_threads or 'default'}, load average {os.getloadavg()[0]:.1f}"
    )
    # CPU time (all of the process' threads) is what a busy machine disturbs least.
    print("| variant | ms / decode step (median) | min | CPU ms / step (median) | all rounds |")
    print("|---|---:|---:|---:|---|")
    for variant, values in times.items():
        rounds = " ".join(f"{value:.2f}" for value in values)
        cpu = statistics.median(cpu_times[variant])
        print(f"| {variant} | {statistics.median(values):.2f} | {min(values):.2f} | {cpu:.2f} | {rounds} |")
    if args.bandwidth:
        milliseconds, rate = streaming_bandwidth(model.count_params())
        print(f"streaming {model.count_params():,} float32 weights once: {milliseconds:.2f} ms, {rate:.1f} GB/s")


if __name__ == "__main__":
    main()
