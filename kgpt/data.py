"""Input pipeline: corpus documents -> tokenizer -> cached token stream -> packed `tf.data` windows.

Entry points (what training, evaluation and export call):

- `DataConfig` (defined in `kgpt.config`): the `[data]` recipe section.
- `read_documents(config, split) -> tf.data.Dataset` of `tf.string` documents.
- `build_tokenizer(config, directory=None) -> Tokenizer`: load it from `directory` when saved
  there, else train (`bpe`, `char`) or load (`gpt2`, `tiktoken:NAME`) it and save it there,
  with the text normalisation of `data.lowercase` / `data.strip_punctuation`
  (`text_normalization(config)`), which the tokenizer then applies wherever it runs.
- `tokenize_corpus(config, tokenizer, split) -> TokenStream`: the split's token stream, every
  document followed by `<|endoftext|>`, read from / written to the token cache.
- `scoring_tokens(config, tokenizer, split)`: that stream with one `<|endoftext|>` in front, the
  text that evaluation and the bigram baseline score.
- `make_dataset(config, tokenizer, split, batch_size, shuffle=None, seed=None, repeat=False)`:
  packed mode yields `(x, y)`, document mode `(x, y, sample_weight)`, all `[batch,
  sequence_length]` (int32, int32, float32); `y` is `x` shifted by one token.
- `check_model_compatibility(config, model_config, tokenizer=None)`.

Packing: the stream is cut into windows of `sequence_length + 1` tokens with stride
`sequence_length`, so window i+1's first input is window i's last target; every token is an input
once and a target once, and only the final `< sequence_length` tokens are left out. Document mode:
one example per document (plus its `<|endoftext|>`), truncated or padded to `sequence_length + 1`
with `tokenizer.padding_id`; `sample_weight` is 1 on real targets and 0 on padding, set by
position, so padding never counts in the loss or perplexity even where padding_id equals
end_of_text_id (GPT-2, tiktoken).

Training (`shuffle=True`, the default for split "train"): the windows are shuffled (a full
stateless permutation per pass, or a seeded buffer of `shuffle_buffer_size`), in an order that
depends only on the seed and the pass number,
batched with `drop_remainder=True`. Validation/test: in order, final partial batch kept. Both
are prefetched; the whole pipeline is deterministic given the seed.

Token cache: `<cache_dir>/<corpus>-<split>-<key>/{tokens.npy, document_ends.npy, meta.json}`,
key = sha256 of the split's files (path, size, mtime), the tokenizer's fingerprint (which covers
its normalisation) and every option that changes the documents (`corpora.document_options`). It is written to a temporary folder and renamed, reused by
later runs, and a changed file, tokenizer or option gives a new key. `cache_dir` defaults to
`$KGPT_CACHE_DIR`, else `~/.cache/kgpt/tokens`. Sequence length, mode and batch size are applied
when packing, so they never invalidate the cache.
"""

import dataclasses
import difflib
import hashlib
import json
import os
import typing

import numpy as np
import tensorflow as tf

from kgpt import corpora, files
from kgpt import tokenizer as tokenizers
from kgpt.config import DataConfig  # noqa: F401  (the `[data]` section these functions take)

CACHE_FORMAT_VERSION = 2  # 2: normalisation moved from the documents into the tokenizer


def read_documents(config, split):
    """The documents of one split as a `tf.data.Dataset` of scalar `tf.string`.

    Args:
        config: a `DataConfig`.
        split: `"train"`, `"validation"` or `"test"`.

    Returns:
        A `tf.data.Dataset`; files are located (or downloaded) now, read when iterated.

    Example:
        for text in read_documents(config, "validation").take(1): print(text.numpy()[:80])
    """
    corpora.corpus_files(config, split)  # fail now on missing files, not mid-iteration
    return tf.data.Dataset.from_generator(
        lambda: corpora.iter_documents(config, split),
        output_signature=tf.TensorSpec([], tf.string),
    )


def text_normalization(config):
    """The `kgpt.tokenizer.Normalization` that `data.lowercase` / `data.strip_punctuation` ask for.

    Args:
        config: a `DataConfig`.

    Returns:
        A `Normalization`.
    """
    return tokenizers.Normalization(lowercase=config.lowercase, strip_punctuation=config.strip_punctuation)


def check_tokenizer(config, tokenizer, source):
    """Raises unless `tokenizer` is what `config` asks for: its kind and its text normalisation.

    Args:
        config: a `DataConfig`.
        tokenizer: a loaded `Tokenizer`.
        source: where it came from, for the message (e.g. the tokenizer folder).

    Raises:
        ValueError: naming the setting that differs and the value to set.
    """
    if tokenizer.kind != config.tokenizer:
        raise ValueError(
            f"{source} holds a {tokenizer.kind!r} tokenizer but data.tokenizer = "
            f"{config.tokenizer!r}; use another run directory or set data.tokenizer = "
            f"{tokenizer.kind!r}."
        )
    wanted = text_normalization(config)
    if tokenizer.normalization != wanted:
        have = tokenizer.normalization
        raise ValueError(
            f"{source} holds a tokenizer with lowercase={have.lowercase}, strip_punctuation="
            f"{have.strip_punctuation} but data.lowercase = {config.lowercase}, "
            f"data.strip_punctuation = {config.strip_punctuation}; set those to the tokenizer's "
            "values or use another run directory. (A tokenizer saved before kgpt stored its "
            "normalisation has none; add \"normalization\": "
            f"{json.dumps(wanted.to_dict())} to its tokenizer.json if it was trained that way.)"
        )


def build_tokenizer(config, directory=None):
    """Loads the tokenizer saved in `directory`, or makes one from `config` (and saves it there).

    `bpe` and `char` are trained on the training split; `gpt2` reads `config.tokenizer_path`;
    `tiktoken:NAME` loads the encoding from tiktoken's cache (`kgpt.tokenizer.TOKENIZER_KINDS`).
    The tokenizer carries `text_normalization(config)` and applies it to all text it tokenizes.

    Args:
        config: a `DataConfig`.
        directory: optional folder (e.g. `checkpoints/<run>/tokenizer`).

    Returns:
        A `kgpt.tokenizer.Tokenizer`.

    Raises:
        ValueError: when the tokenizer in `directory` (or `tokenizer_path`) is of another kind
            or normalises text differently than `config` asks.
    """
    if directory and os.path.isfile(os.path.join(directory, tokenizers.CONFIG_FILENAME)):
        loaded = tokenizers.load_tokenizer(directory)
        check_tokenizer(config, loaded, directory)
        return loaded
    kind = tokenizers.tokenizer_kind(config.tokenizer)
    result = tokenizers.make_tokenizer(
        config.tokenizer,
        documents=corpora.iter_documents(config, "train") if kind.trained_on_corpus else None,
        vocabulary_size=config.vocabulary_size,
        path=config.tokenizer_path,
        normalization=text_normalization(config),
    )
    check_tokenizer(config, result, config.tokenizer_path or config.tokenizer)
    if directory:
        result.save(directory)
    return result


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """A split's tokens: each document followed by end-of-text, concatenated.

    Attributes:
        tokens: int32 `[num_tokens]`.
        document_ends: int64 `[num_documents]`, the end offset of each document (after its
            end-of-text token); document i is `tokens[ends[i-1]:ends[i]]`.
        path: the cache folder it was read from or written to.
        cached: True when read from an existing cache entry.
    """

    tokens: np.ndarray
    document_ends: np.ndarray
    path: str
    cached: bool


def default_cache_directory():
    """`$KGPT_CACHE_DIR`, else `~/.cache/kgpt/tokens`."""
    return os.environ.get("KGPT_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "kgpt", "tokens"
    )


def cache_key(config, tokenizer, split):
    """(key, description) of the token cache entry for this corpus split and tokenizer.

    The tokenizer's fingerprint covers its vocabulary and its text normalisation; the options
    are the `DataConfig` fields that change the split's documents (`corpora.document_options`).
    """
    options = corpora.document_options(config, split)
    description = {
        "format_version": CACHE_FORMAT_VERSION,
        "corpus": config.corpus,
        "split": split,
        "files": corpora.file_identity(corpora.corpus_files(config, split)),
        "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint},
        "options": {name: getattr(config, name) for name in options},
    }
    text = json.dumps(description, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32], description


def tokenize_corpus(config, tokenizer, split, batch_documents=1024):
    """Returns the split's token stream, from the cache or by tokenizing and caching it.

    Args:
        config: a `DataConfig`.
        tokenizer: a `kgpt.tokenizer.Tokenizer`.
        split: `"train"`, `"validation"` or `"test"`.
        batch_documents: documents per `encode_documents` call.

    Returns:
        A `TokenStream`.

    Raises:
        ValueError: when the split has no documents.
    """
    key, description = cache_key(config, tokenizer, split)
    root = config.cache_dir or default_cache_directory()
    path = os.path.join(root, f"{config.corpus}-{split}-{key}")
    if os.path.isfile(os.path.join(path, "meta.json")):
        return TokenStream(
            np.load(os.path.join(path, "tokens.npy")),
            np.load(os.path.join(path, "document_ends.npy")),
            path,
            cached=True,
        )
    end_of_text = np.array([tokenizer.end_of_text_id], dtype=np.int32)
    pieces, lengths, batch = [], [], []

    def flush():
        for ids in tokenizer.encode_documents(batch):
            pieces.extend((ids, end_of_text))
            lengths.append(len(ids) + 1)
        batch.clear()

    skip_blank = not tokenizer.normalization.identity
    for document in corpora.iter_documents(config, split):
        if skip_blank and not tokenizer.normalize(document).strip():
            continue  # e.g. a line of punctuation, blank once stripped: no document, as before
        batch.append(document)
        if len(batch) == batch_documents:
            flush()
    if batch:
        flush()
    if not lengths:
        paths = [f for f, _, _ in description["files"]]
        raise ValueError(
            f"Corpus {config.corpus!r} ({split} split) is empty: no non-blank document in "
            f"{paths[:5]}{' ...' if len(paths) > 5 else ''}. Point data.dir / data.files at text."
        )
    tokens = np.concatenate(pieces).astype(np.int32)
    document_ends = np.cumsum(lengths, dtype=np.int64)
    files.remove_stale(root)  # temporaries of killed runs
    meta = {**description, "num_tokens": int(tokens.size), "num_documents": len(lengths)}
    try:
        # replace=False: an entry another process published meanwhile is kept (same content).
        with files.staged_directory(path, replace=False) as staging:
            np.save(os.path.join(staging, "tokens.npy"), tokens)
            np.save(os.path.join(staging, "document_ends.npy"), document_ends)
            with open(os.path.join(staging, "meta.json"), "w", encoding="utf-8") as file:
                json.dump(meta, file, indent=2)
    except OSError:
        if not os.path.isfile(os.path.join(path, "meta.json")):  # not a lost race: real error
            raise
    return TokenStream(tokens, document_ends, path, cached=False)


def pack_windows(tokens, sequence_length):
    """Cuts a token stream into `(x, y)` windows: `x[i] = tokens[i*s : i*s+s]`, `y` shifted by one.

    Args:
        tokens: int `[num_tokens]`.
        sequence_length: `s`.

    Returns:
        `(inputs [n, s], next_tokens [n])`: `y[i] = concat(inputs[i, 1:], next_tokens[i])`.
        Views of `tokens` where possible, no copy of the stream.
    """
    count = (len(tokens) - 1) // sequence_length
    inputs = tokens[: count * sequence_length].reshape(count, sequence_length)
    next_tokens = tokens[sequence_length : count * sequence_length + 1 : sequence_length]
    return inputs, next_tokens


def pad_documents(stream, sequence_length, padding_id):
    """One row per document: its tokens (end-of-text included) truncated/padded to `s + 1`.

    Args:
        stream: a `TokenStream`.
        sequence_length: `s`.
        padding_id: the id written after each document's end.

    Returns:
        `(rows [n, s + 1] int32, lengths [n] int32)`; documents with no target are dropped.
    """
    ends = stream.document_ends
    starts = np.concatenate([[0], ends[:-1]])
    lengths = np.minimum(ends - starts, sequence_length + 1)
    keep = lengths >= 2
    starts, lengths = starts[keep], lengths[keep]
    positions = np.arange(sequence_length + 1)
    index = np.minimum(starts[:, None] + positions[None, :], len(stream.tokens) - 1)
    rows = np.where(positions[None, :] < lengths[:, None], stream.tokens[index], padding_id)
    return rows.astype(np.int32), lengths.astype(np.int32)


def scoring_tokens(config, tokenizer, split):
    """The split's token stream with one end-of-text in front, as int32 `[num_tokens + 1]`.

    Every document then follows an end-of-text, so its first token is predicted too (GPT-2's
    convention for scoring text), and the stream has as many targets as `tokenize_corpus` tokens.
    """
    stream = tokenize_corpus(config, tokenizer, split)
    return np.concatenate([[tokenizer.end_of_text_id], stream.tokens]).astype(np.int32)


def make_dataset(config, tokenizer, split, batch_size, shuffle=None, seed=None, repeat=False):
    """The `tf.data` pipeline of one split: `(x, y)` (packed) or `(x, y, sample_weight)`.

    Args:
        config: a `DataConfig` (corpus, options, `sequence_length`, `mode`).
        tokenizer: the `Tokenizer` from `build_tokenizer`.
        split: `"train"`, `"validation"` or `"test"`.
        batch_size: examples per batch (the global batch under a distribution strategy).
        shuffle: shuffle windows and drop the final partial batch; default: `split == "train"`.
        seed: shuffle seed; default `config.seed`.
        repeat: repeat forever (reshuffled each pass), for step-based training.

    Returns:
        A `tf.data.Dataset` of int32 `[batch, sequence_length]` `x`, `y` (and float32
        `sample_weight` in document mode).

    Raises:
        ValueError: when the split has fewer than `sequence_length + 1` tokens.

    Example:
        train = make_dataset(config, tokenizer, "train", batch_size=12, repeat=True)
        x, y = next(iter(train))
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1 (e.g. 12).")
    shuffle = split == "train" if shuffle is None else shuffle
    seed = config.seed if seed is None else seed
    length = config.sequence_length
    stream = tokenize_corpus(config, tokenizer, split)
    if config.mode == "packed":
        inputs, next_tokens = pack_windows(stream.tokens, length)
        count = len(inputs)
        if count == 0:
            raise ValueError(
                f"Corpus {config.corpus!r} ({split} split) has {stream.tokens.size} tokens, fewer "
                f"than one window of sequence_length + 1 = {length + 1}. Lower data.sequence_length "
                "or add text."
            )
        inputs, next_tokens = tf.constant(inputs), tf.constant(next_tokens)

        def gather(index):
            x = tf.gather(inputs, index)  # (batch, sequence_length)
            y = tf.concat([x[:, 1:], tf.gather(next_tokens, index)[:, tf.newaxis]], axis=1)
            return x, y

        if shuffle and config.window_offsets == "random":
            # nanoGPT's sampling: each window starts anywhere in the stream, so later passes see
            # new windows rather than the same cut reshuffled. `count` windows per pass.
            stream_tokens = tf.constant(stream.tokens)
            offsets = tf.range(length + 1, dtype=tf.int64)

            def gather(start):  # noqa: F811  replaces the aligned gather
                window = tf.gather(stream_tokens, start[:, tf.newaxis] + offsets)  # (batch, s + 1)
                return window[:, :-1], window[:, 1:]

            dataset = _random_starts(count, stream.tokens.size - length - 1, seed, repeat)
            dataset = dataset.batch(batch_size, drop_remainder=True)
            dataset = dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            return dataset.prefetch(tf.data.AUTOTUNE)

    else:
        rows, lengths = pad_documents(stream, length, tokenizer.padding_id)
        count = len(rows)
        if count == 0:
            raise ValueError(
                f"Corpus {config.corpus!r} ({split} split) has no document with at least 2 "
                "tokens, so document mode has no targets; add text or use data.mode = \"packed\"."
            )
        rows, lengths = tf.constant(rows), tf.constant(lengths)
        positions = tf.range(length, dtype=tf.int32)

        def gather(index):
            window = tf.gather(rows, index)  # (batch, sequence_length + 1)
            targets = tf.gather(lengths, index)[:, tf.newaxis] - 1
            weight = tf.cast(positions[tf.newaxis, :] < targets, tf.float32)
            return window[:, :-1], window[:, 1:], weight

    if shuffle:
        dataset = _shuffled_indices(count, seed, config.shuffle_buffer_size, repeat)
    else:
        dataset = tf.data.Dataset.range(count)
        if repeat:
            dataset = dataset.repeat()
    dataset = dataset.batch(batch_size, drop_remainder=shuffle)
    dataset = dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _random_starts(count, max_start, seed, repeat):
    """`count` window start positions in `[0, max_start]` per pass, a pure function of the seed."""
    passes = tf.data.Dataset.range(2**62 if repeat else 1)

    def one_pass(number):
        seed_pair = tf.stack([tf.constant(seed, tf.int64), number + 2**40])  # apart from shuffles
        starts = tf.random.stateless_uniform(
            [count], seed_pair, minval=0, maxval=max_start + 1, dtype=tf.int64
        )
        return tf.data.Dataset.from_tensor_slices(starts)

    return passes.flat_map(one_pass)


def _shuffled_indices(count, seed, buffer_size, repeat):
    """Window indices, in a new seeded order on every pass.

    Each pass's order is a pure function of `(seed, pass)`: no random state lives in the
    iterator, so every tf.distribute replica layout, every worker and every resumed run (which
    skips the batches it already trained on) sees exactly the same stream.
    """
    passes = tf.data.Dataset.range(2**62 if repeat else 1)

    def one_pass(number):
        seed_pair = tf.stack([tf.constant(seed, tf.int64), number])
        if buffer_size is None or buffer_size >= count:
            order = tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64), seed_pair)
            return tf.data.Dataset.from_tensor_slices(order)
        pass_seed = tf.random.stateless_uniform([], seed_pair, maxval=2**62, dtype=tf.int64)
        return tf.data.Dataset.range(count).shuffle(
            buffer_size, seed=pass_seed, reshuffle_each_iteration=False
        )

    return passes.flat_map(one_pass)


def check_model_compatibility(config, model_config, tokenizer=None):
    """Raises if the data does not fit the model: sequence length or vocabulary too large.

    Args:
        config: a `DataConfig`.
        model_config: a `kgpt.config.ModelConfig`.
        tokenizer: optional; its `vocabulary_size` must not exceed the model's.
    """
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
