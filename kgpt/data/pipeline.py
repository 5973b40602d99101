"""Input pipeline: corpus documents -> tokenizer (`kgpt.data.run_tokenizer`) -> token store on disk
(`tokenize_corpus`, `kgpt.data.tokenstore`) -> `tf.data` windows read shard by shard (`make_dataset`):
packed `(x, y)`, or one padded example per document with `sample_weight` 0 on padding, set by
position so that padding never counts even where `padding_id == end_of_text_id`. Deterministic
given the seed, also across passes, resumes and workers; memory does not grow with the corpus.
"""

import hashlib
import json
import os
import sys

import numpy as np
import tensorflow as tf

from kgpt import files
from kgpt.data import corpora, tokenstore

CACHE_FORMAT_VERSION = 3  # 2: normalisation moved into the tokenizer; 3: sharded token store


def read_documents(config, split):
    """The documents of one split as a `tf.data.Dataset` of scalar `tf.string`; the files are
    located (or downloaded) now, read when iterated."""
    corpora.corpus_files(config, split)  # fail now on missing files, not mid-iteration
    return tf.data.Dataset.from_generator(
        lambda: corpora.iter_documents(config, split),
        output_signature=tf.TensorSpec([], tf.string),
    )


def default_cache_directory():
    """`$KGPT_CACHE_DIR`, else `~/.cache/kgpt/tokens`."""
    return os.environ.get("KGPT_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "kgpt", "tokens"
    )


def cache_directory(config):
    """The folder of the token stores: `data.cache_dir`, else `default_cache_directory()`."""
    return config.cache_dir or default_cache_directory()


def check_cache_directory(config):
    """Makes the token-store folder and writes a file into it; a folder that cannot be made or
    written (read-only, a file, a parent that is a file, ...) raises `ValueError` naming it."""
    root = cache_directory(config)
    probe = f"{root.rstrip('/')}/{files.temporary_name('probe')}"
    try:
        tf.io.gfile.makedirs(root)
        if not tf.io.gfile.isdir(root):
            raise NotADirectoryError(f"{root} is not a folder")
        with tf.io.gfile.GFile(probe, "wb") as file:
            file.write(b"")
        tf.io.gfile.remove(probe)
    except (tf.errors.OpError, OSError) as error:
        reason = error.message if isinstance(error, tf.errors.OpError) else error.strerror or str(error)
        name = f"data.cache_dir={root!r}" if config.cache_dir else (
            f"the token-store folder {root!r} (data.cache_dir unset: $KGPT_CACHE_DIR or "
            "~/.cache/kgpt/tokens)")
        raise ValueError(
            f"{name} cannot hold token stores ({' '.join(str(reason).split())}); set data.cache_dir "
            "(or KGPT_CACHE_DIR) to a folder you can write to."
        ) from None


def cache_key(config, tokenizer, split):
    """(key, description) of the split's token store: its files (path, size, mtime), the tokenizer's
    fingerprint (vocabulary and normalisation), the options that change the documents, the shard size."""
    options = corpora.document_options(config, split)
    description = {
        "format_version": CACHE_FORMAT_VERSION,
        "corpus": config.corpus,
        "split": split,
        "files": corpora.file_identity(corpora.corpus_files(config, split)),
        "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint},
        "options": {name: getattr(config, name) for name in options + ("shard_bytes",)},
    }
    text = json.dumps(description, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32], description


def tokenize_corpus(config, tokenizer, split, progress=None):
    """The split's `TokenStore` at `<cache_dir>/<corpus>-<split>-<key>`, tokenized and written there
    first if needed (resuming a killed run's shards). Sequence length, mode and batch size are
    applied when reading, so they never invalidate the store.

    Args:
        progress: print a status line with tokens/s and ETA to stderr; default: when it is a terminal.
    """
    key, description = cache_key(config, tokenizer, split)
    root = cache_directory(config)
    path = f"{root.rstrip('/')}/{config.corpus}-{split}-{key}" if "://" in root else os.path.join(
        root, f"{config.corpus}-{split}-{key}")
    store = tokenstore.open_store(path, description)
    if store is not None:
        return store
    check_cache_directory(config)
    if progress is None:
        progress = sys.stderr.isatty()
    total_bytes = sum(size for _, size, _ in description["files"])
    store = tokenstore.write_store(
        path, description, tokenizer, _documents(config, tokenizer, split), config.shard_bytes,
        progress=(tokenstore.Progress(f"Tokenizing {config.corpus} {split}", total_bytes)
                  if progress else None),
    )
    if store.num_documents == 0:
        paths = [f for f, _, _ in description["files"]]
        raise ValueError(
            f"Corpus {config.corpus!r} ({split} split) is empty: no non-blank document in "
            f"{paths[:5]}{' ...' if len(paths) > 5 else ''}. Point data.dir / data.files at text."
        )
    return store


def _documents(config, tokenizer, split):
    skip_blank = not tokenizer.normalization.identity
    for document in corpora.iter_documents(config, split):
        if skip_blank and not tokenizer.normalization.normalize(document).strip():
            continue  # e.g. a line of punctuation, blank once stripped: no document
        yield document


def scoring_tokens(config, tokenizer, split):
    """The split's token stream with one end-of-text in front, as int32 `[num_tokens + 1]`.

    Every document then follows an end-of-text, so its first token is predicted too (GPT-2's
    convention for scoring text), and the stream has as many targets as the store has tokens.
    """
    store = tokenize_corpus(config, tokenizer, split)
    return np.concatenate([[tokenizer.end_of_text_id], store.read_tokens()]).astype(np.int32)


def make_dataset(config, tokenizer, split, batch_size, shuffle=None, seed=None, repeat=False,
                 worker=(0, 1)):
    """The `tf.data` pipeline of one split, read shard by shard from its token store: int32 `x`, `y`
    `[batch, sequence_length]` (`y` is `x` shifted by one token) and, in document mode, float32
    `sample_weight`.

    Packed windows are cut within a shard (`x[i] = tokens[i*s : i*s+s]`, so each token is an input
    once; or, with `window_offsets = "random"`, as many windows starting anywhere); document mode
    gives each document one row, padded, with weight 0 on padding.

    Args:
        batch_size: the global batch under a distribution strategy (per worker with `worker`).
        shuffle: a new seeded order every pass (of the shards, and of the windows within each,
            two shards interleaved), final partial batch dropped; default: for "train".
        seed: default `config.seed`.
        repeat: repeat forever, for step-based training.
        worker: `(index, count)`: this worker's disjoint part of every pass: whole shards when
            there are at least `count`, else every `count`-th window.

    Example:
        train = make_dataset(config, tokenizer, "train", batch_size=12, repeat=True)
        x, y = next(iter(train))
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1 (e.g. 12).")
    shuffle = split == "train" if shuffle is None else shuffle
    seed = config.seed if seed is None else seed
    store = tokenize_corpus(config, tokenizer, split)
    _check_windows(config, store, split)
    index, count = worker
    by_shard = count > 1 and len(store.shards) >= count
    windows = _WindowReader(config, store, tokenizer.padding_id, shuffle, seed)

    def one_pass(number):
        order = tf.range(len(store.shards), dtype=tf.int64)
        if shuffle and len(store.shards) > 1:
            pass_seed = tf.stack([tf.constant(seed, tf.int64), number + 2**41])
            order = tf.random.experimental.stateless_shuffle(order, pass_seed)
        if by_shard:
            order = order[index::count]
        # Sequential interleave: two shards in memory, no others read ahead (reading one is fast).
        return tf.data.Dataset.from_tensor_slices(order).interleave(
            lambda shard: windows(shard, number), cycle_length=2 if shuffle else 1
        )

    dataset = tf.data.Dataset.range(2**62 if repeat else 1).flat_map(one_pass)
    if not repeat and not by_shard:
        # flat_map hides the size of a pass; without it Keras' evaluate runs until the data ends
        # and warns "Your input ran out of data" at every evaluation.
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(count_windows(config, store)))
    if count > 1 and not by_shard:
        dataset = dataset.shard(count, index)
    dataset = dataset.batch(batch_size, drop_remainder=shuffle)
    return dataset.prefetch(PREFETCH_BATCHES).with_options(pipeline_options())


# Batches read ahead; the pipeline has no parallel stage for tf.data's autotuner to size.
PREFETCH_BATCHES = 4


def pipeline_options():
    """`tf.data.Options` for kgpt's pipelines: tf.data's autotuner off.

    With it on, every iterator runs an optimisation thread that sleeps between rounds (doubling to
    10 s), and destroying the iterator waits for that sleep to end: `fit` and each evaluation sat
    idle for up to 10 s after their last step (the "slow mode" in benchmarks/RESULTS.md).
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def count_windows(config, store):
    """Windows (rows) in one pass over `store`, as `make_dataset` cuts them before batching: per
    shard `(tokens - 1) // sequence_length` packed, or one per document of at least 2 tokens."""
    if config.mode == "packed":
        return sum(max((n - 1) // config.sequence_length, 0) for n, _ in store.shards)
    lengths = np.diff(store.read_document_ends(), prepend=0)  # documents never span shards
    return int(np.sum(lengths >= 2))


def _check_windows(config, store, split):
    length = config.sequence_length
    if config.mode == "packed" and all((n - 1) // length < 1 for n, _ in store.shards):
        raise ValueError(
            f"Corpus {config.corpus!r} ({split} split) has {store.num_tokens} tokens, fewer "
            f"than one window of sequence_length + 1 = {length + 1}. Lower data.sequence_length "
            "or add text."
        )
    if config.mode == "document" and store.num_tokens <= store.num_documents:
        raise ValueError(
            f"Corpus {config.corpus!r} ({split} split) has no document with at least 2 "
            "tokens, so document mode has no targets; add text or use data.mode = \"packed\"."
        )


_GATHER_CHUNK = 256  # windows gathered per op inside a shard


class _WindowReader:
    """`reader(shard, pass_number)`: the `tf.data` windows of one shard in one pass. Each pass's order
    is a pure function of `(seed, shard, pass)`: no random state lives in the iterator, so every
    replica layout, worker and resumed run (which skips the batches it already trained on) sees
    the same stream."""

    def __init__(self, config, store, padding_id, shuffle, seed):
        self.store, self.length, self.padding_id = store, config.sequence_length, padding_id
        self.mode, self.shuffle, self.seed = config.mode, shuffle, seed
        self.random_offsets = config.mode == "packed" and shuffle and config.window_offsets == "random"
        self.buffer_size = config.shuffle_buffer_size

    def __call__(self, shard, number):
        tokens, ends = self.store.shard_tensors(shard)
        seed = tf.constant(self.seed, tf.int64) + shard * 1_000_003  # shard 0: the seed itself
        length, positions = self.length, tf.range(self.length + 1, dtype=tf.int64)
        if self.mode == "packed":
            count = (tf.size(tokens, tf.int64) - 1) // length
            if self.random_offsets:  # nanoGPT's sampling: windows start anywhere, new ones every pass
                starts = tf.random.stateless_uniform(
                    [count], tf.stack([seed, number + 2**40]), minval=0,
                    maxval=tf.size(tokens, tf.int64) - length, dtype=tf.int64)
                indices, stride = tf.data.Dataset.from_tensor_slices(starts), 1
            else:
                indices, stride = self._order(count, seed, number), length

            def gather(index):
                window = tf.cast(tf.gather(tokens, index[:, tf.newaxis] * stride + positions), tf.int32)
                return window[:, :-1], window[:, 1:]

        else:
            starts = tf.concat([[0], ends[:-1]], axis=0)
            lengths = tf.minimum(ends - starts, length + 1)
            keep = lengths >= 2
            starts, lengths = tf.boolean_mask(starts, keep), tf.boolean_mask(lengths, keep)
            indices = self._order(tf.size(starts, tf.int64), seed, number)
            last = tf.size(tokens, tf.int64) - 1

            def gather(index):
                first = tf.gather(starts, index)[:, tf.newaxis]  # (chunk, 1)
                rows = tf.gather(tokens, tf.minimum(first + positions, last))  # (chunk, s + 1)
                row_lengths = tf.gather(lengths, index)[:, tf.newaxis]
                rows = tf.where(positions[tf.newaxis, :] < row_lengths, rows, self.padding_id)
                weight = tf.cast(positions[tf.newaxis, :-1] < row_lengths - 1, tf.float32)
                return rows[:, :-1], rows[:, 1:], weight

        return indices.batch(_GATHER_CHUNK).map(gather).unbatch()

    def _order(self, count, seed, number):
        """Indices `[0, count)` for one pass: in order, or shuffled (wholly, or in a buffer)."""
        if not self.shuffle:
            return tf.data.Dataset.range(count)
        seed_pair = tf.stack([seed, number])
        if self.buffer_size is None:
            return tf.data.Dataset.from_tensor_slices(
                tf.random.experimental.stateless_shuffle(tf.range(count), seed_pair))
        pass_seed = tf.random.stateless_uniform([], seed_pair, maxval=2**62, dtype=tf.int64)
        return tf.data.Dataset.range(count).shuffle(self.buffer_size, seed=pass_seed)


def check_model_compatibility(config, model_config, tokenizer=None):
    """Raises if the data does not fit the model: sequence length or vocabulary too large."""
    if config.sequence_length > model_config.sequence_length:
        raise ValueError(
            f"data.sequence_length={config.sequence_length} is larger than the model's "
            f"sequence_length={model_config.sequence_length} (its position table); set "
            f"data.sequence_length to at most {model_config.sequence_length} or raise "
            "model.sequence_length."
        )
    if tokenizer is not None and tokenizer.vocabulary_size > model_config.vocabulary_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocabulary_size} ids but model.vocabulary_size="
            f"{model_config.vocabulary_size}; set model.vocabulary_size to at least "
            f"{tokenizer.vocabulary_size}."
        )
