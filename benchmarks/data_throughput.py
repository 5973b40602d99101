"""Data pipeline throughput on the aclImdb subset: first pass (tokenize + cache) vs from the cache.

Prints one table of tokens/s for:
  (a) first pass: read the train reviews, tokenize with byte-level BPE, write the token cache
      (`kgpt.data.tokenize_corpus` on an empty cache; the out-of-graph HF encoder);
  (a') the same tokenization in the graph (`tokenizer.tokenize` in a `tf.data` map; what a
      SavedModel runs), on the first N reviews, for comparison;
  (b) a pass from the cache: the one-off cost of loading the cache entry and building
      `make_dataset`, then every packed training window (shuffled, batched, prefetched) consumed
      in the graph (`Dataset.reduce`, as `model.fit`'s compiled iterator does) and, for
      reference, in a Python for-loop (which adds ~1 ms of eager overhead per batch).

Usage:
    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/data_throughput.py [--data-dir ../shared/data]
"""

import argparse
import os
import pathlib
import sys
import tempfile
import time

DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("KGPT_SHARED_DATA", str(DEFAULT_DATA)))
    parser.add_argument("--vocabulary-size", type=int, default=8192)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--in-graph-documents", type=int, default=2000)
    parser.add_argument("--cache-passes", type=int, default=3)
    args = parser.parse_args()
    if not os.path.isdir(os.path.join(args.data_dir, "aclImdb")):
        print(f"skipped: no aclImdb under {args.data_dir} (pass --data-dir)")
        return 0

    import tensorflow as tf

    from kgpt import corpora, data
    from kgpt.config import DataConfig

    with tempfile.TemporaryDirectory() as cache:
        config = DataConfig(
            corpus="imdb", dir=args.data_dir, tokenizer="bpe", vocabulary_size=args.vocabulary_size,
            sequence_length=args.sequence_length, validation_count=500, cache_dir=cache,
        )
        start = time.perf_counter()
        tokenizer = data.build_tokenizer(config)
        train_seconds = time.perf_counter() - start

        start = time.perf_counter()
        stream = data.tokenize_corpus(config, tokenizer, "train")
        first_seconds = time.perf_counter() - start
        assert not stream.cached
        tokens = stream.tokens.size

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
        for _ in range(args.cache_passes):
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
        ("(a) first pass: read + BPE + write cache", f"{first_seconds:.2f} s", f"{tokens:,}",
         f"{tokens / first_seconds:,.0f}"),
        (f"(a') in-graph BPE in tf.data ({len(documents)} reviews)", f"{graph_seconds:.2f} s",
         f"{graph_tokens:,}", f"{graph_tokens / graph_seconds:,.0f}"),
        (f"(b) cache hit: load + build make_dataset (best of {args.cache_passes})",
         f"{min(setup):.2f} s", "", ""),
        ("(b) from cache: windows consumed in-graph (as fit does)", "",
         f"{count * args.sequence_length:,}", f"{max(in_graph):,.0f}"),
        ("(b') from cache: windows in a Python for-loop", "",
         f"{count * args.sequence_length:,}", f"{max(python_loop):,.0f}"),
    ]
    print(f"aclImdb train ({len(stream.document_ends):,} reviews), vocabulary {tokenizer.vocabulary_size}, "
          f"sequence {args.sequence_length}, batch {args.batch_size}, {os.cpu_count()} CPUs")
    widths = [max(len(r[i]) for r in rows + [("step", "time", "tokens", "tokens/s")]) for i in range(4)]
    for row in [("step", "time", "tokens", "tokens/s")] + rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print(f"first pass vs in-graph: {tokens / first_seconds / (graph_tokens / graph_seconds):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
