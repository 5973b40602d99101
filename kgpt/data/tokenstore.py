"""The token store: a split's token ids on disk, written once and read shard by shard.

A store is a folder on any `tf.io.gfile` filesystem (local disk, `gs://`, `ram://`):

    tokens-00000.bin   token ids, little-endian uint16 (vocabulary <= 65,536) or uint32; each
                       document followed by end-of-text
    ends-00000.bin     int64 end offset of each document within its shard
    shard-00000.json   the shard's counts; present once the shard is complete
    index.json         the description (corpus, split, files, tokenizer fingerprint, options), the
                       dtype and every shard; written last, so a store without it is unfinished

Shards hold the documents of about `data.shard_bytes` of text, cut at document boundaries in
reading order, so a killed tokenization resumes at its first unfinished shard. Every file is
written under a temporary name and renamed into place.
"""

import concurrent.futures
import dataclasses
import itertools
import json
import os
import sys
import time

import numpy as np
import tensorflow as tf

from kgpt import files

FORMAT_VERSION = 1
INDEX = "index.json"
_UINT16_LIMIT = 2**16
_BATCH_DOCUMENTS = 1024  # documents per `encode_documents` call


def shard_names(number):
    """`(tokens, ends, marker)` file names of shard `number`."""
    return f"tokens-{number:05d}.bin", f"ends-{number:05d}.bin", f"shard-{number:05d}.json"


def write_file(path, data):
    """Writes `bytes` to `path` (any gfile filesystem) under a temporary name, then renames it."""
    directory, name = path.rsplit("/", 1) if "://" in path else os.path.split(path)
    temporary = f"{directory}/{files.temporary_name(name)}"
    try:
        with tf.io.gfile.GFile(temporary, "wb") as file:
            file.write(data)
        tf.io.gfile.rename(temporary, path, overwrite=True)
    finally:
        if tf.io.gfile.exists(temporary):
            tf.io.gfile.remove(temporary)


def _read_json(path):
    with tf.io.gfile.GFile(path, "rb") as file:
        return json.loads(file.read().decode("utf-8"))


def _join(directory, name):
    return f"{directory.rstrip('/')}/{name}" if "://" in directory else os.path.join(directory, name)


@dataclasses.dataclass(frozen=True)
class TokenStore:
    """An opened, complete store. `shards` are `(num_tokens, num_documents)`; `cached` is True when
    the store existed before this process asked for it."""

    path: str
    dtype: str
    shards: tuple
    description: dict
    cached: bool = True

    @property
    def num_tokens(self):
        return sum(count for count, _ in self.shards)

    @property
    def num_documents(self):
        return sum(count for _, count in self.shards)

    def token_files(self):
        return [_join(self.path, shard_names(i)[0]) for i in range(len(self.shards))]

    def end_files(self):
        return [_join(self.path, shard_names(i)[1]) for i in range(len(self.shards))]

    def read_shard(self, number):
        """Shard `number`'s tokens as stored (read-only uint16 or uint32 NumPy `[n]`; read whole:
        shards are bounded in size)."""
        with tf.io.gfile.GFile(self.token_files()[number], "rb") as file:
            return np.frombuffer(file.read(), dtype="<" + ("u2" if self.dtype == "uint16" else "u4"))

    def read_tokens(self):
        """Every token, int32 `[num_tokens]`, in memory: for scoring splits and tests, not training."""
        return np.concatenate([self.read_shard(i) for i in range(len(self.shards))]).astype(np.int32)

    def read_document_ends(self):
        """Every document's end offset in `read_tokens()`, int64."""
        offset, ends = 0, []
        for number, (count, _) in enumerate(self.shards):
            with tf.io.gfile.GFile(self.end_files()[number], "rb") as file:
                ends.append(np.frombuffer(file.read(), dtype="<i8") + offset)
            offset += count
        return np.concatenate(ends)

    def shard_tensors(self, number):
        """Graph ops reading shard `number` (a scalar tensor): `(tokens [n], ends int64 [d])`, tokens
        uint16 or int32 as stored (cast windows, not the shard: half the memory for uint16)."""
        tokens = tf.io.read_file(tf.gather(tf.constant(self.token_files()), number))
        # ids are below 2**31, so uint32 ids read as int32 unchanged (decode_raw has no uint32).
        tokens = tf.io.decode_raw(tokens, tf.uint16 if self.dtype == "uint16" else tf.int32)
        ends = tf.io.decode_raw(tf.io.read_file(tf.gather(tf.constant(self.end_files()), number)), tf.int64)
        return tokens, ends


def open_store(path, description, cached=True):
    """Opens the complete store at `path`, checking that it holds what `description` says and that
    no shard was truncated; returns None when `path` has no `index.json` (not written yet)."""
    index_path = _join(path, INDEX)
    if not tf.io.gfile.exists(index_path):
        return None
    try:
        index = _read_json(index_path)
        shards = tuple((s["num_tokens"], s["num_documents"]) for s in index["shards"])
        dtype = index["dtype"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{index_path} is not a kgpt token store index ({error}); delete {path} and run "
            "again to tokenize the corpus anew."
        ) from None
    _check_description(index.get("description"), description, index_path, path)
    store = TokenStore(path, dtype, shards, index["description"], cached=cached)
    itemsize = 2 if dtype == "uint16" else 4
    for name, (count, _) in zip(store.token_files(), shards):
        size = tf.io.gfile.stat(name).length if tf.io.gfile.exists(name) else None
        if size != count * itemsize:
            raise ValueError(
                f"Token shard {name} is {'missing' if size is None else f'{size:,} bytes'}, not the "
                f"{count * itemsize:,} bytes its index records (truncated or copied in part?). "
                f"Delete {path} and run again to tokenize the corpus anew."
            )
    return store


def _check_description(found, expected, source, path):
    expected = json.loads(json.dumps(expected))  # tuples as lists, as the index holds them
    if found == expected:
        return
    found = found or {}
    what = [key for key in sorted(set(found) | set(expected)) if found.get(key) != expected.get(key)]
    if "tokenizer" in what:
        reason = (f"it was written by a {found.get('tokenizer', {}).get('kind')!r} tokenizer with "
                  f"fingerprint {str(found.get('tokenizer', {}).get('fingerprint'))[:12]}..., not "
                  f"this run's ({expected['tokenizer']['kind']!r}, "
                  f"{expected['tokenizer']['fingerprint'][:12]}...)")
    else:
        reason = f"its {', '.join(what)} differ from this run's"
    raise ValueError(f"{source} does not belong to this corpus and tokenizer: {reason}. Delete {path} "
                     "or set data.cache_dir to another folder.")


class Progress:
    """One status line on stderr: shards, tokens, tokens/s and ETA (from the text read so far)."""

    def __init__(self, title, total_bytes, stream=None, interval=0.5):
        self.title, self.total_bytes, self.stream = title, max(total_bytes, 1), stream or sys.stderr
        self.interval, self.started, self.last = interval, time.perf_counter(), 0.0

    def update(self, shards, tokens, done_bytes, final=False):
        now = time.perf_counter()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        fraction = min(done_bytes / self.total_bytes, 1.0)
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else 0.0
        line = (f"{self.title}: {shards} shards, {tokens:,} tokens, {tokens / elapsed:,.0f} tokens/s, "
                f"{100 * fraction:.0f}%" + ("" if final else f", ETA {eta:.0f} s"))
        end = "\n" if final else ""
        print("\r" + line, end=end, file=self.stream, flush=True)


def write_store(path, description, tokenizer, documents, shard_bytes, progress=None):
    """Tokenizes `documents` (an iterable of strings) into a store at `path` and returns it opened.

    Shards already complete in `path` (a killed earlier run) are kept and their documents skipped
    unread by the tokenizer. `progress`: a `Progress`, or None for silence.
    """
    existing = open_store(path, description)
    if existing is not None:
        return existing
    tf.io.gfile.makedirs(path)
    if "://" not in path:
        files.remove_stale(path)  # temporaries of killed runs
    dtype = "uint16" if tokenizer.vocabulary_size <= _UINT16_LIMIT else "uint32"
    shard_description = {"tokenizer": description["tokenizer"], "dtype": dtype}
    shards, chunk, chunk_bytes, done_bytes, pending = [], [], 0, 0, None
    # The tokenizer (Rust, all cores, GIL released) encodes one shard while this thread reads the next.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as encoder:
        for document in itertools.chain(documents, [None]):  # None: the end
            size = 0 if document is None else len(document.encode("utf-8"))
            if chunk and (document is None or chunk_bytes + size > shard_bytes):
                if pending is not None:
                    shards.append(pending.result())
                    if progress:
                        progress.update(len(shards), sum(c for c, _ in shards), done_bytes)
                args = (path, len(shards), tokenizer, chunk, dtype, shard_description)
                pending, chunk, chunk_bytes = encoder.submit(_finished_or_write_shard, *args), [], 0
            if document is not None:
                chunk.append(document)
                chunk_bytes += size
                done_bytes += size
        if pending is not None:
            shards.append(pending.result())
    if progress:
        progress.update(len(shards), sum(c for c, _ in shards), done_bytes, final=True)
    index = {"format_version": FORMAT_VERSION, "description": description, "dtype": dtype,
             "shards": [{"num_tokens": c, "num_documents": d} for c, d in shards],
             "num_tokens": sum(c for c, _ in shards), "num_documents": sum(d for _, d in shards)}
    write_file(_join(path, INDEX), json.dumps(index, indent=2).encode("utf-8"))
    return open_store(path, description, cached=False)


def _finished_or_write_shard(path, number, tokenizer, documents, dtype, shard_description):
    """Shard `number`'s `(tokens, documents)`: from its marker if a killed run finished it, else written."""
    marker = _join(path, shard_names(number)[2])
    if tf.io.gfile.exists(marker):
        saved = _read_json(marker)
        _check_description(saved.get("description"), shard_description, marker, path)
        return saved["num_tokens"], saved["num_documents"]
    return _write_shard(path, number, tokenizer, documents, dtype, shard_description)


def _write_shard(path, number, tokenizer, documents, dtype, shard_description):
    """Encodes `documents` and writes shard `number` (tokens, ends, then its marker)."""
    encoded = [ids for start in range(0, len(documents), _BATCH_DOCUMENTS)
               for ids in tokenizer.encode_documents(documents[start:start + _BATCH_DOCUMENTS])]
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.empty(int(lengths.sum()), dtype="<" + ("u2" if dtype == "uint16" else "u4"))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    for ids, start, end in zip(encoded, starts, ends):
        tokens[start:end - 1] = ids
    tokens[ends - 1] = tokenizer.end_of_text_id
    tokens_name, ends_name, marker_name = shard_names(number)
    write_file(_join(path, tokens_name), tokens.tobytes())
    write_file(_join(path, ends_name), ends.astype("<i8").tobytes())
    counts = {"num_tokens": int(tokens.size), "num_documents": len(encoded)}
    write_file(_join(path, marker_name), json.dumps({**counts, "description": shard_description}).encode())
    return counts["num_tokens"], counts["num_documents"]
