"""Data pipeline throughput: the token store's first pass and reading windows from it.

Default mode, on the aclImdb subset; prints one table of tokens/s for:
  (a) first pass: read the train reviews, tokenize with byte-level BPE, write the token store
      (`kgpt.data.tokenize_corpus` on an empty store; the out-of-graph HF encoder);
  (a') the same tokenization in the graph (`tokenizer.tokenize` in a `tf.data` map; what a
      SavedModel runs), on the first N reviews, for comparison;
  (b) a pass from the token store: the one-off cost of opening the store and building
      `make_dataset`, then every packed training window (shuffled, batched, prefetched) consumed
      in the graph (`Dataset.reduce`, as `model.fit`'s compiled iterator does) and, for
      reference, in a Python for-loop (which adds ~1 ms of eager overhead per batch).

Scale mode (`--scale-tokens N [N ...]`): for each N, a synthetic `text` corpus of at least N
tokens, made of numbered copies of WikiText-2's training text (`shards/part_NNNNN.txt` in a
temporary folder), with one byte-level BPE trained once on the first copy. Each N gets two fresh
subprocesses, so that each peak resident memory is its own:
  tokenize  the first pass into an empty token store: tokens, seconds, tokens/s, peak RSS;
  train     a small GPT (2 layers, width 128) for `--train-steps` steps on the store's shuffled
            windows (`make_dataset(..., repeat=True)`, batch 16 x 128, in a manual
            `next(iterator)` / `train_on_batch` loop): steps/s, the share of each step spent
            waiting for the input after `--warmup-steps`, peak RSS.
Peak RSS is `ru_maxrss` (TensorFlow's own import and compile memory included, the same for every
N) and the maximum of `VmRSS` sampled every 0.5 s; what matters is its growth with N. Targets:
first pass >= 1M tokens/s, RSS growth from the smallest to the largest N <= 100 MiB, input
wait < 2%. The corpus (~11 MB of text per 2.7M tokens) and its token stores are written to a
temporary folder (set TMPDIR, or `--keep DIR`) and read back from the page cache.

Usage:
    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/data_throughput.py [--data-dir ../shared/data]
    python benchmarks/data_throughput.py --scale-tokens 10_000_000 200_000_000 [--train-steps 200]
"""

import argparse
import json
import math
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
TRAIN_FILE = os.path.join("wikitext-2-raw", "wiki.train.raw")
VALID_FILE = os.path.join("wikitext-2-raw", "wiki.valid.raw")
SEQUENCE_LENGTH = 128
BATCH_SIZE = 16
MODEL = dict(sequence_length=SEQUENCE_LENGTH, num_layers=2, num_heads=4, hidden_dim=128)
TARGET_TOKENS_PER_SECOND = 1_000_000
TARGET_RSS_GROWTH_MIB = 100
TARGET_INPUT_WAIT = 0.02


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("KGPT_SHARED_DATA", str(DEFAULT_DATA)))
    parser.add_argument("--vocabulary-size", type=int, default=8192)
    parser.add_argument("--sequence-length", type=int, default=256, help="aclImdb mode")
    parser.add_argument("--batch-size", type=int, default=32, help="aclImdb mode")
    parser.add_argument("--in-graph-documents", type=int, default=2000, help="aclImdb mode")
    parser.add_argument("--store-passes", "--cache-passes", dest="store_passes", type=int, default=3,
                        help="aclImdb mode")
    parser.add_argument("--scale-tokens", type=int, nargs="+", action="extend", metavar="N",
                        help="scale mode: corpus sizes in tokens (e.g. 10_000_000 200_000_000)")
    parser.add_argument("--train-steps", type=int, default=200, help="scale mode")
    parser.add_argument("--warmup-steps", type=int, default=20, help="scale mode: steps not timed")
    parser.add_argument("--shard-bytes", type=int, default=None,
                        help="scale mode: data.shard_bytes (default: DataConfig's)")
    parser.add_argument("--keep", metavar="DIR",
                        help="scale mode: work in DIR and keep it (reuses its tokenizer and copies)")
    parser.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return 0
    if args.scale_tokens:
        return run_scale(args)
    return run_imdb(args)


# --- aclImdb mode -----------------------------------------------------------------------------


def run_imdb(args):
    if not os.path.isdir(os.path.join(args.data_dir, "aclImdb")):
        print(f"skipped: no aclImdb under {args.data_dir} (pass --data-dir)")
        return 0

    import tensorflow as tf

    from kgpt.data import corpora, run_tokenizer
    from kgpt.data import pipeline as data
    from kgpt.data.config import DataConfig

    with tempfile.TemporaryDirectory() as cache:
        config = DataConfig(
            corpus="imdb", dir=args.data_dir, tokenizer="bpe", vocabulary_size=args.vocabulary_size,
            sequence_length=args.sequence_length, validation_count=500, cache_dir=cache,
        )
        start = time.perf_counter()
        tokenizer = run_tokenizer.build_tokenizer(config)
        train_seconds = time.perf_counter() - start

        start = time.perf_counter()
        store = data.tokenize_corpus(config, tokenizer, "train")
        first_seconds = time.perf_counter() - start
        assert not store.cached
        tokens = store.num_tokens

        documents = list(corpora.iter_documents(config, "train"))[: args.in_graph_documents]
        dataset = tf.data.Dataset.from_tensor_slices(documents).batch(64).map(
            tokenizer.tokenize, num_parallel_calls=tf.data.AUTOTUNE
        )
        for _ in dataset.take(1):
            pass  # trace once
        start = time.perf_counter()
        graph_tokens = sum(int(batch.flat_values.shape[0]) for batch in dataset)
        graph_seconds = time.perf_counter() - start

        setup, in_graph, python_loop = [], [], []
        for _ in range(args.store_passes):
            start = time.perf_counter()
            windows = data.make_dataset(config, tokenizer, "train", batch_size=args.batch_size)
            setup.append(time.perf_counter() - start)
            # Consumed in the graph, as model.fit's compiled iterator does.
            start = time.perf_counter()
            count = int(windows.reduce(tf.constant(0), lambda n, batch: n + tf.shape(batch[0])[0]))
            in_graph.append(count * args.sequence_length / (time.perf_counter() - start))
            start = time.perf_counter()
            count = sum(int(x.shape[0]) for x, _ in windows)
            python_loop.append(count * args.sequence_length / (time.perf_counter() - start))
        assert data.tokenize_corpus(config, tokenizer, "train").cached

    rows = [
        ("BPE training (HF tokenizers)", f"{train_seconds:.1f} s", "", ""),
        ("(a) first pass: read + BPE + write token store", f"{first_seconds:.2f} s", f"{tokens:,}",
         f"{tokens / first_seconds:,.0f}"),
        (f"(a') in-graph BPE in tf.data ({len(documents)} reviews)", f"{graph_seconds:.2f} s",
         f"{graph_tokens:,}", f"{graph_tokens / graph_seconds:,.0f}"),
        (f"(b) token store: open + build make_dataset (best of {args.store_passes})",
         f"{min(setup):.2f} s", "", ""),
        ("(b) from the token store: windows consumed in-graph (as fit does)", "",
         f"{count * args.sequence_length:,}", f"{max(in_graph):,.0f}"),
        ("(b') from the token store: windows in a Python for-loop", "",
         f"{count * args.sequence_length:,}", f"{max(python_loop):,.0f}"),
    ]
    print(f"aclImdb train ({store.num_documents:,} reviews), vocabulary {tokenizer.vocabulary_size}, "
          f"sequence {args.sequence_length}, batch {args.batch_size}, {os.cpu_count()} CPUs")
    print_table(("step", "time", "tokens", "tokens/s"), rows)
    print(f"first pass vs in-graph: {tokens / first_seconds / (graph_tokens / graph_seconds):.1f}x")
    return 0


def print_table(header, rows):
    """Left-aligns the first column, right-aligns the others."""
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))))


# --- scale mode: the parent -------------------------------------------------------------------


def run_scale(args):
    args.data_dir = os.path.abspath(args.data_dir)  # workers' paths must not depend on data.dir
    source = os.path.join(args.data_dir, TRAIN_FILE)
    if not os.path.isfile(source):
        print(f"skipped: no {TRAIN_FILE} under {args.data_dir} (pass --data-dir)")
        return 0
    if args.train_steps <= args.warmup_steps:
        raise SystemExit(f"--train-steps={args.train_steps} must exceed --warmup-steps="
                         f"{args.warmup_steps} (e.g. 200 and 20).")
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        return scale_benchmark(args, source, args.keep)
    with tempfile.TemporaryDirectory(prefix="kgpt-data-throughput-") as root:
        return scale_benchmark(args, source, root)


def scale_benchmark(args, source, root):
    """Runs the workers for every N. This process never imports TensorFlow: a child's `ru_maxrss`
    starts from its parent's resident memory at the fork."""
    sizes = sorted(set(args.scale_tokens))
    pool = os.path.join(root, "copies")
    write_copies(source, pool, 1)
    options = ["--data-dir", args.data_dir, "--vocabulary-size", str(args.vocabulary_size)]
    options += ["--shard-bytes", str(args.shard_bytes)] if args.shard_bytes else []
    bpe = run_worker("tokenizer", options + ["--work", pool])
    tokens_per_copy, shard_bytes = bpe["tokens_per_copy"], bpe["shard_bytes"]
    print(f"BPE ({bpe['vocabulary_size']} ids) on one copy of {TRAIN_FILE}: {bpe['seconds']:.1f} s; "
          f"{tokens_per_copy:,} tokens per copy", file=sys.stderr)

    results = []
    for n in sizes:
        copies = math.ceil(n / tokens_per_copy)
        write_copies(source, pool, copies)
        work = os.path.join(root, f"n{n}")
        link_copies(pool, os.path.join(work, "shards"), copies)
        shutil.rmtree(os.path.join(work, "cache"), ignore_errors=True)  # the first pass, always
        common = options + ["--work", work]
        print(f"N={n:,}: {copies} copies; tokenizing ...", file=sys.stderr)
        tokenize = run_worker("tokenize", common)
        print(f"N={n:,}: {tokenize['tokens']:,} tokens in {tokenize['seconds']:.1f} s; "
              f"training {args.train_steps} steps ...", file=sys.stderr)
        train = run_worker("train", common + ["--train-steps", str(args.train_steps),
                                              "--warmup-steps", str(args.warmup_steps)])
        results.append(dict(n=n, copies=copies, tokenize=tokenize, train=train))

    print(f"Synthetic corpus: copies of {TRAIN_FILE} ({os.path.getsize(source) / 2**20:.1f} MiB, "
          f"{tokens_per_copy:,} tokens each), BPE {bpe['vocabulary_size']}, shard_bytes "
          f"{shard_bytes / 2**20:g} MiB; GPT {MODEL['num_layers']} layers x {MODEL['hidden_dim']}, "
          f"batch {BATCH_SIZE} x {SEQUENCE_LENGTH}, {args.train_steps} steps ({args.warmup_steps} "
          f"untimed); {os.cpu_count()} CPUs")
    print_table(*scale_rows(results))
    print(targets_line(results))
    return 0


def write_copies(source, pool, count):
    """Makes `pool/part_00000.txt` ... (`count` of them): the source text after a line naming the
    copy, so that no two copies are identical."""
    os.makedirs(pool, exist_ok=True)
    text = None
    for number in range(count):
        path = os.path.join(pool, f"part_{number:05d}.txt")
        if os.path.exists(path):
            continue
        if text is None:
            with open(source, "rb") as file:
                text = file.read()
        with open(path + ".tmp", "wb") as file:
            file.write(f" = Copy {number} = \n \n".encode() + text)
        os.replace(path + ".tmp", path)


def link_copies(pool, folder, count):
    """`folder` holds exactly the first `count` copies of the pool (hard links; copies where the
    filesystem has none)."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for number in range(count):
        name = f"part_{number:05d}.txt"
        try:
            os.link(os.path.join(pool, name), os.path.join(folder, name))
        except OSError:
            shutil.copyfile(os.path.join(pool, name), os.path.join(folder, name))


def run_worker(kind, arguments):
    """Runs this script as a `--worker kind` subprocess (with the kgpt this process imported) and
    returns the JSON object on its last line of output."""
    import kgpt

    environment = dict(os.environ)
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    environment.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as `kgpt` sets it
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(kgpt.__file__)))
    environment["PYTHONPATH"] = os.pathsep.join(
        [package_root] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p])
    completed = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", kind] + arguments,
                               stdout=subprocess.PIPE, text=True, env=environment)
    if completed.returncode:
        raise SystemExit(f"The {kind} worker failed (exit code {completed.returncode}); its "
                         "errors are above.")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def scale_rows(results):
    header = ("N (tokens)", "store tokens", "shards", "1st pass s", "tokens/s", "tok RSS MiB",
              "tok sampled", "train RSS MiB", "train sampled", "steps/s", "input wait")
    rows = []
    for r in results:
        tokenize, train = r["tokenize"], r["train"]
        rows.append((
            f"{r['n']:,}", f"{tokenize['tokens']:,}", f"{tokenize['shards']}",
            f"{tokenize['seconds']:.1f}", f"{tokenize['tokens'] / tokenize['seconds']:,.0f}",
            mebibytes(tokenize["peak_rss_kib"]), mebibytes(tokenize["sampled_rss_kib"]),
            mebibytes(train["peak_rss_kib"]), mebibytes(train["sampled_rss_kib"]),
            f"{train['steps_per_second']:.2f}", f"{100 * train['input_wait']:.2f}%",
        ))
    return header, rows


def mebibytes(kib):
    return f"{kib / 1024:,.0f}"


def targets_line(results):
    slowest = min(r["tokenize"]["tokens"] / r["tokenize"]["seconds"] for r in results)
    wait = max(r["train"]["input_wait"] for r in results)
    parts = [f"first pass >= {TARGET_TOKENS_PER_SECOND:,} tokens/s: slowest {slowest:,.0f} "
             f"{verdict(slowest >= TARGET_TOKENS_PER_SECOND)}"]
    if len(results) > 1:
        small, large = results[0], results[-1]
        growth = {
            f"{worker} {measure}": (large[worker][key] - small[worker][key]) / 1024
            for worker in ("tokenize", "train")
            for measure, key in (("peak", "peak_rss_kib"), ("sampled", "sampled_rss_kib"))
        }
        worst = max(growth.values())
        parts.append(f"RSS growth N={small['n']:,} -> {large['n']:,} <= {TARGET_RSS_GROWTH_MIB} MiB: "
                     + ", ".join(f"{name} {value:+,.0f}" for name, value in growth.items())
                     + f" MiB {verdict(worst <= TARGET_RSS_GROWTH_MIB)}")
    parts.append(f"input wait < {100 * TARGET_INPUT_WAIT:g}%: largest {100 * wait:.2f}% "
                 f"{verdict(wait < TARGET_INPUT_WAIT)}")
    return "Targets: " + "; ".join(parts)


def verdict(met):
    return "(met)" if met else "(MISSED)"


# --- scale mode: the subprocesses -------------------------------------------------------------


def scale_config(files, cache_dir, data_dir, vocabulary_size, shard_bytes=None):
    """The `text` corpus `files` (a path or glob) with WikiText-2's validation text as its
    validation split, in windows of `SEQUENCE_LENGTH`, its token stores in `cache_dir`."""
    from kgpt.data.config import DataConfig

    return DataConfig(
        corpus="text", files=(files,), document_separator="blank_line", validation_fraction=0.0,
        validation_files=(os.path.join(data_dir, VALID_FILE),), tokenizer="bpe",
        vocabulary_size=vocabulary_size, sequence_length=SEQUENCE_LENGTH, window_offsets="aligned",
        cache_dir=cache_dir, **({"shard_bytes": shard_bytes} if shard_bytes else {}),
    )


def worker_config(args):
    """The worker's config and the tokenizer saved beside its corpus (by `tokenizer_worker`)."""
    from kgpt.data import run_tokenizer

    config = scale_config(os.path.join(args.work, "shards", "*.txt"), os.path.join(args.work, "cache"),
                          args.data_dir, args.vocabulary_size, args.shard_bytes)
    tokenizer_dir = os.path.join(os.path.dirname(os.path.abspath(args.work)), "tokenizer")
    return config, run_tokenizer.build_tokenizer(config, tokenizer_dir)


class RssSampler:
    """`with RssSampler() as rss:` samples this process' VmRSS every `interval` s; `rss.peak_kib`."""

    def __init__(self, interval=0.5):
        self.interval, self.peak_kib = interval, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    self.peak_kib = max(self.peak_kib, int(line.split()[1]))
                    return

    def _run(self):
        while not self._done.wait(self.interval):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._done.set()
        self._thread.join()
        self.sample()


def peak_rss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def tokenizer_worker(args):
    """Trains (or loads) the one BPE of every N on the first copy in `--work` (the pool) and saves
    it beside; returns the seconds it took and the tokens of one copy in a store."""
    from kgpt.data import corpora, run_tokenizer

    config = scale_config(os.path.join(args.work, "part_00000.txt"), os.path.join(args.work, "cache"),
                          args.data_dir, args.vocabulary_size, args.shard_bytes)  # cache: not written
    start = time.perf_counter()
    tokenizer = run_tokenizer.build_tokenizer(config, os.path.join(os.path.dirname(args.work), "tokenizer"))
    seconds = time.perf_counter() - start
    documents = list(corpora.iter_documents(config, "train"))
    tokens = sum(ids.size + 1 for ids in tokenizer.encode_documents(documents))  # + end-of-text
    return dict(vocabulary_size=tokenizer.vocabulary_size, seconds=seconds, tokens_per_copy=tokens,
                shard_bytes=config.shard_bytes)


def tokenize_worker(args):
    """The first pass into an empty token store."""
    from kgpt.data import pipeline as data

    config, tokenizer = worker_config(args)
    before = peak_rss_kib()
    with RssSampler() as rss:
        start = time.perf_counter()
        store = data.tokenize_corpus(config, tokenizer, "train", progress=False)
        seconds = time.perf_counter() - start
    if store.cached:
        raise RuntimeError(f"{store.path} existed before the first pass; delete it.")
    return dict(tokens=store.num_tokens, documents=store.num_documents, shards=len(store.shards),
                seconds=seconds, peak_rss_kib=peak_rss_kib(), sampled_rss_kib=rss.peak_kib,
                rss_before_kib=before)


def train_worker(args):
    """`--train-steps` steps of a small GPT on the store's windows, timing the input wait."""
    import keras

    from kgpt.data import pipeline as data
    from kgpt.model import gpt as model

    config, tokenizer = worker_config(args)
    dataset = data.make_dataset(config, tokenizer, "train", batch_size=BATCH_SIZE, repeat=True)
    gpt = model.build_model(dict(vocabulary_size=tokenizer.vocabulary_size, **MODEL))
    gpt.compile(optimizer=keras.optimizers.AdamW(learning_rate=3e-4),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    iterator = iter(dataset)
    waits, steps = [], []
    with RssSampler() as rss:
        for step in range(args.train_steps):
            t0 = time.perf_counter()
            batch = next(iterator)
            t1 = time.perf_counter()
            gpt.train_on_batch(*batch)  # returns NumPy logs: the step has finished
            t2 = time.perf_counter()
            if step >= args.warmup_steps:
                waits.append(t1 - t0)
                steps.append(t2 - t0)
    return dict(steps_per_second=len(steps) / sum(steps), input_wait=sum(waits) / sum(steps),
                peak_rss_kib=peak_rss_kib(), sampled_rss_kib=rss.peak_kib)


WORKERS = {"tokenizer": tokenizer_worker, "tokenize": tokenize_worker, "train": train_worker}

if __name__ == "__main__":
    sys.exit(main())
