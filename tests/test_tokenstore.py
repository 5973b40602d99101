"""Tests for kgpt.data.tokenstore: shard layout and dtypes, resuming a killed tokenization, truncated and
foreign stores, the progress line; and kgpt.data reading windows shard by shard, per worker."""

import dataclasses
import io
import json
import os

import numpy as np
import pytest

from kgpt.data import pipeline as data
from kgpt.data import run_tokenizer, tokenstore
from kgpt.data.config import DataConfig


class CountingTokenizer:
    """Bytes as ids (or ids shifted past 65,536); counts encoded documents, fails after `fail_after`."""

    kind = "test"

    def __init__(self, vocabulary_size=300, fail_after=None, fingerprint="A"):
        self.vocabulary_size, self.fail_after, self.encoded = vocabulary_size, fail_after, 0
        self.end_of_text_id = vocabulary_size - 1
        self.fingerprint = fingerprint

    def encode_documents(self, texts):
        if self.fail_after is not None and self.encoded + len(texts) > self.fail_after:
            raise KeyboardInterrupt("killed")
        self.encoded += len(texts)
        shift = 0 if self.vocabulary_size <= 2**16 else 70_000
        return [np.frombuffer(t.encode(), np.uint8).astype(np.int32) + shift for t in texts]


def _description(tokenizer):
    return {"corpus": "test", "tokenizer": {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint}}


DOCUMENTS = [f"document {i} " + "x" * (i % 7) for i in range(40)]  # 12 to 20 bytes each


def _expected(tokenizer, documents=DOCUMENTS):
    ids = tokenizer.encode_documents(documents)
    return np.concatenate([np.append(d, tokenizer.end_of_text_id) for d in ids])


@pytest.mark.parametrize("vocabulary_size, dtype", [(300, "uint16"), (2**16, "uint16"), (70_400, "uint32")])
def test_shards_hold_every_document_in_order_in_the_smallest_dtype(tmp_path, vocabulary_size, dtype):
    tokenizer = CountingTokenizer(vocabulary_size)
    store = tokenstore.write_store(str(tmp_path / "s"), _description(tokenizer), tokenizer, DOCUMENTS,
                                   shard_bytes=100)
    assert store.dtype == dtype and not store.cached
    # Whole documents, at most 100 bytes of text a shard: 7 shards of 6-7 documents, then the rest.
    assert [d for _, d in store.shards] == [7, 6, 6, 6, 6, 6, 3]
    assert store.num_documents == 40 and store.num_tokens == sum(len(d) + 1 for d in DOCUMENTS)
    np.testing.assert_array_equal(store.read_tokens(), _expected(CountingTokenizer(vocabulary_size)))
    lengths = np.diff(np.concatenate([[0], store.read_document_ends()]))
    np.testing.assert_array_equal(lengths, [len(d) + 1 for d in DOCUMENTS])
    itemsize = 2 if dtype == "uint16" else 4
    assert os.path.getsize(tmp_path / "s" / "tokens-00000.bin") == store.shards[0][0] * itemsize
    again = tokenstore.open_store(str(tmp_path / "s"), _description(tokenizer))
    assert again.cached and again.shards == store.shards


def test_a_killed_tokenization_resumes_at_its_first_unfinished_shard(tmp_path):
    path = str(tmp_path / "s")
    killed = CountingTokenizer(fail_after=20)
    with pytest.raises(KeyboardInterrupt):
        tokenstore.write_store(path, _description(killed), killed, DOCUMENTS, shard_bytes=100)
    # Nothing half-written is visible: no index, complete shards only, no temporaries.
    assert tokenstore.open_store(path, _description(killed)) is None
    names = sorted(os.listdir(path))
    assert not [n for n in names if n.startswith(".tmp-")]
    markers = [n for n in names if n.startswith("shard-")]
    assert len(markers) == 3 and len([n for n in names if n.startswith("tokens-")]) == 3
    resumed = CountingTokenizer()
    store = tokenstore.write_store(path, _description(resumed), resumed, DOCUMENTS, shard_bytes=100)
    done = sum(json.loads((tmp_path / "s" / m).read_text())["num_documents"] for m in markers)
    assert resumed.encoded == 40 - done  # the finished shards were not tokenized again
    np.testing.assert_array_equal(store.read_tokens(), _expected(CountingTokenizer()))


def test_a_truncated_shard_is_an_error_naming_the_file_and_the_fix(tmp_path):
    tokenizer = CountingTokenizer()
    store = tokenstore.write_store(str(tmp_path / "s"), _description(tokenizer), tokenizer, DOCUMENTS, 100)
    shard = store.token_files()[2]
    with open(shard, "r+b") as file:
        file.truncate(10)
    with pytest.raises(ValueError, match=r"tokens-00002.bin is 10 bytes, not the \d+ bytes.*Delete .*run again"):
        tokenstore.open_store(store.path, _description(tokenizer))


def test_a_store_or_shard_of_another_tokenizer_is_refused(tmp_path):
    first = CountingTokenizer(fingerprint="A" * 64)
    store = tokenstore.write_store(str(tmp_path / "s"), _description(first), first, DOCUMENTS, 100)
    other = CountingTokenizer(fingerprint="B" * 64)
    with pytest.raises(ValueError, match="written by a 'test' tokenizer with fingerprint AAAA.*not this run's"):
        tokenstore.open_store(store.path, _description(other))
    os.remove(os.path.join(store.path, tokenstore.INDEX))  # an unfinished store: its shards are checked
    with pytest.raises(ValueError, match=r"shard-00000.json .*fingerprint AAAA"):
        tokenstore.write_store(store.path, _description(other), other, DOCUMENTS, 100)
    assert other.encoded == 0


def test_progress_line_reports_tokens_per_second_and_eta():
    stream = io.StringIO()
    progress = tokenstore.Progress("Tokenizing x train", total_bytes=1000, stream=stream, interval=0.0)
    progress.update(shards=1, tokens=250, done_bytes=250)
    progress.update(shards=4, tokens=1000, done_bytes=1000, final=True)
    first, final = stream.getvalue().split("\r")[1:]
    assert first.startswith("Tokenizing x train: 1 shards, 250 tokens,") and "tokens/s, 25%, ETA" in first
    assert final.endswith("100%\n") and "ETA" not in final


def _sharded_config(tmp_path, **kwargs):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"part_{i}.txt").write_text("\n\n".join(f"part {i} line {j:02d} abc" for j in range(30)))
    config = DataConfig(corpus="text", files=(str(corpus / "*.txt"),), tokenizer="char", sequence_length=8,
                        validation_fraction=0.0, validation_files=(str(corpus / "part_0.txt"),),
                        cache_dir=str(tmp_path / "cache"), shard_bytes=600, **kwargs)
    return config, run_tokenizer.build_tokenizer(config)


def _windows(dataset):
    return [tuple(row) for batch in dataset for row in batch[0].numpy()]


@pytest.mark.parametrize("window_offsets", ["aligned", "random"])
def test_shuffled_passes_cover_every_shard_and_workers_read_disjoint_shards(tmp_path, window_offsets):
    config, tokenizer = _sharded_config(tmp_path, window_offsets=window_offsets)
    store = data.tokenize_corpus(config, tokenizer, "train")
    assert len(store.shards) == 4
    everything = _windows(data.make_dataset(config, tokenizer, "train", batch_size=1))
    per_shard = [(n - 1) // 8 for n, _ in store.shards]
    assert len(everything) == sum(per_shard)
    tokens = store.read_tokens()
    if window_offsets == "aligned":  # a pass is every aligned window once, in a new order
        ordered = _windows(data.make_dataset(config, tokenizer, "train", batch_size=1, shuffle=False))
        assert sorted(everything) == sorted(ordered) and everything != ordered
    text = tokens.tobytes()
    assert all(np.asarray(w, np.int32).tobytes() in text for w in everything)  # slices of the stream
    workers = [_windows(data.make_dataset(config, tokenizer, "train", batch_size=1, worker=(i, 2)))
               for i in range(2)]
    assert sorted(workers[0] + workers[1]) == sorted(everything)  # disjoint shards, together one pass
    assert workers[0] and workers[1]


_KILLED_WRITER = """
import sys, time
from kgpt.data import pipeline as data
from kgpt.data import run_tokenizer, tokenstore
from kgpt.data.config import DataConfig
write_shard = tokenstore._write_shard

def slow_write_shard(*args):
    counts = write_shard(*args)
    time.sleep(0.5)  # time for the test to kill this process between shards
    return counts

tokenstore._write_shard = slow_write_shard
config = DataConfig(corpus="text", files=(sys.argv[1],), tokenizer="char", validation_fraction=0.0,
                    validation_files=(sys.argv[1],), cache_dir=sys.argv[2], shard_bytes=200)
data.tokenize_corpus(config, run_tokenizer.build_tokenizer(config), "train")
"""


@pytest.mark.slow
def test_a_tokenization_killed_with_sigkill_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document number {i} with some text" for i in range(60)))
    cache = tmp_path / "cache"
    process = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(corpus), str(cache)])
    deadline = time.time() + 120
    while len(list(cache.glob("*/shard-*.json"))) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (folder,) = cache.iterdir()
    done = sorted(p.name for p in folder.glob("shard-*.json"))
    assert len(done) >= 3 and not (folder / "index.json").exists()
    config = DataConfig(corpus="text", files=(str(corpus),), tokenizer="char", validation_fraction=0.0,
                        validation_files=(str(corpus),), cache_dir=str(cache), shard_bytes=200)
    tokenizer = run_tokenizer.build_tokenizer(config)
    calls = []
    original = tokenizer.encode_documents
    tokenizer.encode_documents = lambda texts: calls.append(len(texts)) or original(texts)
    store = data.tokenize_corpus(config, tokenizer, "train")
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]  # the killed run's temporaries
    finished = sum(json.loads((folder / name).read_text())["num_documents"] for name in done)
    assert sum(calls) == 60 - finished  # only the unfinished shards were tokenized
    fresh = data.tokenize_corpus(dataclasses.replace(config, cache_dir=str(tmp_path / "fresh")), tokenizer, "train")
    np.testing.assert_array_equal(store.read_tokens(), fresh.read_tokens())
