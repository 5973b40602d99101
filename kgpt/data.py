"""Input pipeline: corpus documents -> tokenizer (`build_tokenizer`) -> token stream, cached on disk
(`tokenize_corpus`) -> `tf.data` windows (`make_dataset`): packed `(x, y)`, or one padded example
per document with `sample_weight` 0 on padding, set by position so that padding never counts even
where `padding_id == end_of_text_id`. Deterministic given the seed, also across passes and resumes.
"""

import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorflow as tf

from kgpt import corpora, files
from kgpt import tokenizer as tokenizers

CACHE_FORMAT_VERSION = 2  # 2: normalisation moved from the documents into the tokenizer
_BATCH_DOCUMENTS = 1024  # documents per `encode_documents` call


def read_documents(config, split):
    """The documents of one split as a `tf.data.Dataset` of scalar `tf.string`; the files are
    located (or downloaded) now, read when iterated."""
    corpora.corpus_files(config, split)  # fail now on missing files, not mid-iteration
    return tf.data.Dataset.from_generator(
        lambda: corpora.iter_documents(config, split),
        output_signature=tf.TensorSpec([], tf.string),
    )


def text_normalization(config):
    """The `kgpt.tokenizer.Normalization` that `data.lowercase` / `data.strip_punctuation` ask for."""
    return tokenizers.Normalization(lowercase=config.lowercase, strip_punctuation=config.strip_punctuation)


def check_tokenizer(config, tokenizer, source):
    """Raises unless `tokenizer` (from `source`) has the kind and normalisation `config` asks for."""
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
    """Loads the tokenizer saved in `directory`, or makes one from `config` (trained on the training
    split, or read from `data.tokenizer_path` or tiktoken's cache) and saves it there.

    Example:
        tokenizer = build_tokenizer(recipe.data, "checkpoints/run/tokenizer")
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
    """A split's tokens, int32: each document followed by end-of-text, concatenated. Document i is
    `tokens[document_ends[i-1]:document_ends[i]]`; `path` is its cache folder, `cached` True when it
    was read from there."""

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
    """(key, description) of the token cache entry: the split's files (path, size, mtime), the
    tokenizer's fingerprint (vocabulary and normalisation) and the options that change the documents."""
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


def tokenize_corpus(config, tokenizer, split):
    """The split's `TokenStream`, from `<cache_dir>/<corpus>-<split>-<key>/` or tokenized and written
    there (atomically, so concurrent runs and killed ones never leave a partial entry). Sequence
    length, mode and batch size are applied later, so they never invalidate the cache."""
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
        if skip_blank and not tokenizer.normalization.normalize(document).strip():
            continue  # e.g. a line of punctuation, blank once stripped: no document, as before
        batch.append(document)
        if len(batch) == _BATCH_DOCUMENTS:
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
    """Cuts `tokens` into windows of stride `s`: `(inputs [n, s], next_tokens [n])`, views where possible,
    `x[i] = tokens[i*s : i*s+s]`, `y[i] = concat(inputs[i, 1:], next_tokens[i])`. Every token is an
    input once and a target once; only the final `< s` tokens are left out."""
    count = (len(tokens) - 1) // sequence_length
    inputs = tokens[: count * sequence_length].reshape(count, sequence_length)
    next_tokens = tokens[sequence_length : count * sequence_length + 1 : sequence_length]
    return inputs, next_tokens


def pad_documents(stream, sequence_length, padding_id):
    """`(rows [n, s + 1] int32, lengths [n] int32)`: each document's tokens (end-of-text included)
    truncated or padded with `padding_id` to `s + 1`; documents with no target are dropped."""
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
    """The `tf.data` pipeline of one split: int32 `x`, `y` `[batch, sequence_length]` (`y` is `x`
    shifted by one token) and, in document mode, float32 `sample_weight`.

    Args:
        batch_size: the global batch under a distribution strategy.
        shuffle: a new seeded order every pass, final partial batch dropped; default: for "train".
        seed: default `config.seed`.
        repeat: repeat forever, for step-based training.

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
    # nanoGPT's sampling: each window starts anywhere in the stream, so later passes see new
    # windows rather than the same cut reshuffled. `count` windows per pass.
    random_offsets = config.mode == "packed" and shuffle and config.window_offsets == "random"
    if config.mode == "packed":
        inputs, next_tokens = pack_windows(stream.tokens, length)
        count = len(inputs)
        if count == 0:
            raise ValueError(
                f"Corpus {config.corpus!r} ({split} split) has {stream.tokens.size} tokens, fewer "
                f"than one window of sequence_length + 1 = {length + 1}. Lower data.sequence_length "
                "or add text."
            )
        if random_offsets:
            stream_tokens = tf.constant(stream.tokens)
            offsets = tf.range(length + 1, dtype=tf.int64)

            def gather(start):
                window = tf.gather(stream_tokens, start[:, tf.newaxis] + offsets)  # (batch, s + 1)
                return window[:, :-1], window[:, 1:]

        else:
            inputs, next_tokens = tf.constant(inputs), tf.constant(next_tokens)

            def gather(index):
                x = tf.gather(inputs, index)  # (batch, sequence_length)
                y = tf.concat([x[:, 1:], tf.gather(next_tokens, index)[:, tf.newaxis]], axis=1)
                return x, y

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

    if random_offsets:
        dataset = _random_starts(count, stream.tokens.size - length - 1, seed, repeat)
    elif shuffle:
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

    def one_pass(number):
        seed_pair = tf.stack([tf.constant(seed, tf.int64), number + 2**40])  # apart from shuffles
        starts = tf.random.stateless_uniform(
            [count], seed_pair, minval=0, maxval=max_start + 1, dtype=tf.int64
        )
        return tf.data.Dataset.from_tensor_slices(starts)

    return tf.data.Dataset.range(2**62 if repeat else 1).flat_map(one_pass)


def _shuffled_indices(count, seed, buffer_size, repeat):
    """Window indices, in a new seeded order on every pass.

    Each pass's order is a pure function of `(seed, pass)`: no random state lives in the
    iterator, so every tf.distribute replica layout, every worker and every resumed run (which
    skips the batches it already trained on) sees exactly the same stream.
    """

    def one_pass(number):
        seed_pair = tf.stack([tf.constant(seed, tf.int64), number])
        if buffer_size is None or buffer_size >= count:
            order = tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64), seed_pair)
            return tf.data.Dataset.from_tensor_slices(order)
        pass_seed = tf.random.stateless_uniform([], seed_pair, maxval=2**62, dtype=tf.int64)
        return tf.data.Dataset.range(count).shuffle(
            buffer_size, seed=pass_seed, reshuffle_each_iteration=False
        )

    return tf.data.Dataset.range(2**62 if repeat else 1).flat_map(one_pass)


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
