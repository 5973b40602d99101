"""Tests for kgpt.data on tiny corpora written into tmp_path: tokenizer building, token cache,
packing and the tf.data pipeline."""

import collections
import dataclasses
import json
import os
import pathlib
import uuid

import numpy as np
import pytest
import tensorflow as tf

from kgpt import tokenizers as tk
from kgpt.config import ModelConfig
from kgpt.data import corpora, run_tokenizer
from kgpt.data import pipeline as data
from kgpt.data.config import DataConfig


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _config(tmp_path, **kwargs):
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kwargs)


def test_config_validates_names_and_values():
    with pytest.raises(ValueError, match="Did you mean 'wikitext2'"):
        DataConfig(corpus="wikitext-2")
    with pytest.raises(ValueError, match="Unknown tokenizer='sentencepiece'"):
        DataConfig(corpus="imdb", tokenizer="sentencepiece")
    with pytest.raises(ValueError, match="at least 258"):
        DataConfig(corpus="imdb", vocabulary_size=100)
    with pytest.raises(ValueError, match="needs data.files"):
        DataConfig(corpus="text")
    with pytest.raises(ValueError, match="Unknown key data.sequence_len"):
        DataConfig.from_dict({"corpus": "imdb", "sequence_len": 8})
    config = DataConfig.from_dict({"corpus": "text", "files": ["a.txt"]})
    assert config.files == ("a.txt",)
    assert DataConfig(corpus="imdb", tokenizer="tiktoken:o200k_base").tokenizer.endswith("o200k_base")
    with pytest.raises(ValueError, match="Did you mean 'char'"):
        DataConfig(corpus="imdb", tokenizer="chars")
    with pytest.raises(ValueError, match="needs a tiktoken encoding name"):
        DataConfig(corpus="imdb", tokenizer="tiktoken:")
    with pytest.raises(ValueError, match="needs data.tokenizer_path"):
        DataConfig(corpus="imdb", tokenizer="gpt2")


def test_sequence_length_larger_than_model_is_an_error():
    model = ModelConfig(vocabulary_size=300, sequence_length=16, num_heads=2, hidden_dim=16)
    with pytest.raises(ValueError, match="data.sequence_length=32 is larger"):
        data.check_model_compatibility(DataConfig(corpus="imdb", sequence_length=32), model)


def dataclass_replace(config, **changes):
    return dataclasses.replace(config, **changes)


def _packed_setup(shards, tmp_path, **kwargs):
    config = _config(
        tmp_path, corpus="text", files=(str(shards / "*.txt"),), tokenizer="char", sequence_length=8, **kwargs
    )
    return config, run_tokenizer.build_tokenizer(config)


def test_packing_shifts_targets_and_keeps_every_token(shards, tmp_path):
    config, tokenizer = _packed_setup(shards, tmp_path)
    stream = data.tokenize_corpus(config, tokenizer, "train")
    batches = list(data.make_dataset(config, tokenizer, "train", batch_size=5, shuffle=False))
    x = np.concatenate([b[0].numpy() for b in batches])
    y = np.concatenate([b[1].numpy() for b in batches])
    n = len(x)
    assert x.dtype == np.int32 and x.shape[1] == 8
    # Not shuffled, final partial batch kept: the windows tile the stream exactly.
    np.testing.assert_array_equal(x.ravel(), stream.read_tokens()[: n * 8])
    np.testing.assert_array_equal(y.ravel(), stream.read_tokens()[1 : n * 8 + 1])
    np.testing.assert_array_equal(x[1:, 0], y[:-1, -1])  # across window boundaries
    assert len(stream.read_tokens()) - 1 - n * 8 < 8  # only the final partial window is left out
    # Every document is followed by end-of-text.
    assert (stream.read_tokens()[stream.read_document_ends() - 1] == tokenizer.end_of_text_id).all()


def test_training_shuffle_is_seeded_drops_remainder_and_loses_nothing(shards, tmp_path):
    config, tokenizer = _packed_setup(shards, tmp_path)
    ordered = [b[0].numpy() for b in data.make_dataset(config, tokenizer, "train", 4, shuffle=False)]
    ordered = np.concatenate(ordered)

    def run(seed):
        dataset = data.make_dataset(config, tokenizer, "train", batch_size=4, seed=seed)
        return [(x.numpy(), y.numpy()) for x, y in dataset]

    first, again, other = run(1), run(1), run(2)
    assert all(x.shape == (4, 8) for x, _ in first)
    assert len(first) == len(ordered) // 4
    np.testing.assert_array_equal(np.concatenate([x for x, _ in first]), np.concatenate([x for x, _ in again]))
    assert not np.array_equal(np.concatenate([x for x, _ in first]), np.concatenate([x for x, _ in other]))
    seen = np.concatenate([x for x, _ in first])
    # A permutation of the windows, minus the dropped remainder: no window lost twice or made up.
    available = collections.Counter(r.tobytes() for r in ordered)
    used = collections.Counter(r.tobytes() for r in seen)
    assert all(used[k] <= available[k] for k in used) and sum(used.values()) == len(seen)
    for x, y in first:
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def test_document_mode_pads_with_zero_weight(shards, tmp_path):
    config, tokenizer = _packed_setup(shards, tmp_path, mode="document")
    config = dataclass_replace(config, sequence_length=40)
    stream = data.tokenize_corpus(config, tokenizer, "train")
    lengths = np.diff(np.concatenate([[0], stream.read_document_ends()]))
    batches = list(data.make_dataset(config, tokenizer, "train", batch_size=3, shuffle=False))
    x = np.concatenate([b[0].numpy() for b in batches])
    y = np.concatenate([b[1].numpy() for b in batches])
    weight = np.concatenate([b[2].numpy() for b in batches])
    assert weight.dtype == np.float32 and set(np.unique(weight)) <= {0.0, 1.0}
    np.testing.assert_array_equal(weight.sum(axis=1), np.minimum(lengths, 41) - 1)
    assert (y[weight == 0] == tokenizer.padding_id).all()
    assert (y[weight == 1] != tokenizer.padding_id).all()
    first = stream.read_tokens()[: stream.read_document_ends()[0]]
    np.testing.assert_array_equal(x[0, : len(first) - 1], first[:-1])
    assert y[0, len(first) - 2] == tokenizer.end_of_text_id


def test_token_cache_reused_and_invalidated(shards, tmp_path):
    config, tokenizer = _packed_setup(shards, tmp_path)
    first = data.tokenize_corpus(config, tokenizer, "train")
    second = data.tokenize_corpus(config, tokenizer, "train")
    assert not first.cached and second.cached and first.path == second.path
    np.testing.assert_array_equal(first.read_tokens(), second.read_tokens())
    # The normalisation belongs to the tokenizer: it changes the fingerprint, hence the key.
    lowercase = dataclass_replace(config, lowercase=True)
    lowercased = data.tokenize_corpus(lowercase, run_tokenizer.build_tokenizer(lowercase), "train")
    assert not lowercased.cached and lowercased.path != first.path
    assert not data.tokenize_corpus(dataclass_replace(config, strip_html=True), tokenizer, "train").cached
    other_tokenizer = run_tokenizer.build_tokenizer(dataclass_replace(config, tokenizer="bpe", vocabulary_size=300))
    assert not data.tokenize_corpus(config, other_tokenizer, "train").cached
    shard = shards / "wiki_books_0.txt"
    shard.write_text(shard.read_text() + "\nOne more block.\n")
    os.utime(shard, ns=(1, 1))
    changed = data.tokenize_corpus(config, tokenizer, "train")
    assert not changed.cached and changed.path != first.path
    assert not [p for p in pathlib.Path(config.cache_dir).iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("where", ["a file", "below a file", "read-only"])
def test_an_unusable_cache_dir_is_one_line_naming_it(shards, tmp_path, where):
    config, tokenizer = _packed_setup(shards, tmp_path)
    (tmp_path / "file").write_text("not a folder")
    cache_dir = {"a file": tmp_path / "file", "below a file": tmp_path / "file" / "tokens",
                 "read-only": tmp_path / "read-only"}[where]
    if where == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        cache_dir.mkdir(mode=0o555)
    config = dataclass_replace(config, cache_dir=str(cache_dir))
    with pytest.raises(ValueError) as caught:  # was tf.errors.FailedPreconditionError / PermissionDeniedError
        data.tokenize_corpus(config, tokenizer, "train")
    message = str(caught.value)
    assert message.startswith(f"data.cache_dir={str(cache_dir)!r} cannot hold token stores (")
    assert message.endswith("set data.cache_dir (or KGPT_CACHE_DIR) to a folder you can write to.")
    assert "\n" not in message and (tmp_path / "file").read_text() == "not a folder"


def test_build_tokenizer_saves_and_reloads(shards, tmp_path):
    config, tokenizer = _packed_setup(shards, tmp_path)
    saved = run_tokenizer.build_tokenizer(config, str(tmp_path / "run" / "tokenizer"))
    again = run_tokenizer.build_tokenizer(config, str(tmp_path / "run" / "tokenizer"))
    assert again.fingerprint == saved.fingerprint == tokenizer.fingerprint
    with pytest.raises(ValueError, match="holds a 'char' tokenizer"):
        run_tokenizer.build_tokenizer(dataclass_replace(config, tokenizer="bpe"), str(tmp_path / "run" / "tokenizer"))


def test_build_tokenizer_normalises_training_text_and_checks_a_saved_one(shards, tmp_path):
    _write(shards / "wiki_books_3.txt", "LOUD Words, Here!\n\n--- *** ---\n")
    config, _ = _packed_setup(shards, tmp_path, lowercase=True, strip_punctuation=True, validation_fraction=0.0)
    directory = str(tmp_path / "run" / "tokenizer")
    tokenizer = run_tokenizer.build_tokenizer(config, directory)
    assert tokenizer.normalization == tk.Normalization(lowercase=True, strip_punctuation=True)
    assert tokenizer.normalization == run_tokenizer.text_normalization(config)
    # Trained on normalised text: no capitals, no punctuation in the vocabulary.
    assert not any(c.isupper() or c in ",.:!-*" for c in tokenizer.characters)
    stream = data.tokenize_corpus(config, tokenizer, "train")
    documents = [d for d in corpora.iter_documents(config, "train") if set(d) - set("-* \n")]
    assert len(stream.read_document_ends()) == len(documents)  # "--- *** ---" is blank once stripped
    expected = tokenizer.tokenize(tf.constant(documents))  # in-graph normalisation
    np.testing.assert_array_equal(stream.read_tokens()[: stream.read_document_ends()[0] - 1], expected[0].numpy())
    assert run_tokenizer.build_tokenizer(config, directory).fingerprint == tokenizer.fingerprint
    with pytest.raises(ValueError, match="lowercase=True, strip_punctuation=True but data.lowercase = False"):
        run_tokenizer.build_tokenizer(dataclass_replace(config, lowercase=False, strip_punctuation=False), directory)
    # A tokenizer.json from before the normalisation was saved: the error says what to add.
    saved = pathlib.Path(directory) / tk.CONFIG_FILENAME
    legacy = {k: v for k, v in json.loads(saved.read_text()).items() if k != "normalization"}
    saved.write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match='add "normalization": {"lowercase": true, "strip_punctuation": true}'):
        run_tokenizer.build_tokenizer(config, directory)


def test_corpus_and_token_store_on_a_gfile_filesystem(tmp_path, monkeypatch):
    # ram:// is TensorFlow's in-memory filesystem, standing in for gs://: nothing may reach local disk.
    monkeypatch.setenv("KGPT_CACHE_DIR", str(tmp_path / "default-cache"))
    monkeypatch.chdir(tmp_path)  # a URL mistaken for a relative path would appear here as "ram:/..."
    root, cache = f"ram://corpus-{uuid.uuid4().hex}/shards", f"ram://cache-{uuid.uuid4().hex}"
    tf.io.gfile.makedirs(root)
    for i in range(2):
        with tf.io.gfile.GFile(f"{root}/part_{i}.txt", "w") as file:
            file.write("\n\n".join(f"Part {i} block {j}: some words here." for j in range(4)) + "\n")
    config = DataConfig(corpus="text", files=(f"{root}/*.txt",), tokenizer="char", sequence_length=8,
                        validation_fraction=0.5, cache_dir=cache)
    assert corpora.corpus_files(config, "train") == [f"{root}/part_0.txt", f"{root}/part_1.txt"]
    tokenizer = run_tokenizer.build_tokenizer(config)
    store = data.tokenize_corpus(config, tokenizer, "train")
    assert not store.cached and store.path.startswith(f"{cache}/")
    assert tf.io.gfile.exists(f"{store.path}/index.json")
    assert [size for _, size, _ in store.description["files"]] == [
        tf.io.gfile.stat(f"{root}/part_{i}.txt").length for i in range(2)]
    batches = list(data.make_dataset(config, tokenizer, "train", batch_size=3, shuffle=False))
    x, y = (np.concatenate([b[k].numpy() for b in batches]) for k in (0, 1))
    tokens = store.read_tokens()
    assert len(x) == (len(tokens) - 1) // 8 > 1
    np.testing.assert_array_equal(x, tokens[: len(x) * 8].reshape(-1, 8))
    np.testing.assert_array_equal(y, tokens[1 : len(x) * 8 + 1].reshape(-1, 8))
    assert data.tokenize_corpus(config, tokenizer, "train").cached
    assert os.listdir(tmp_path) == []  # neither the default cache nor a stray "ram:" folder
    with pytest.raises(FileNotFoundError, match=f"'{root}/none/\\*.txt' matches no file"):
        corpora.expand_files((f"{root}/none/*.txt",), config)


def test_bad_text_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        data.read_documents(_config(tmp_path, corpus="text", files=(str(tmp_path / "none*.txt"),)), "train")
    _write(tmp_path / "blank.txt", "  \n\n \n")
    blank = _config(tmp_path, corpus="text", files=(str(tmp_path / "blank.txt"),), tokenizer="char", validation_fraction=0.0)
    with pytest.raises(ValueError, match="is empty"):
        data.tokenize_corpus(blank, _char("x"), "train")
    _write(tmp_path / "short.txt", "tiny")
    short = dataclass_replace(blank, files=(str(tmp_path / "short.txt"),), sequence_length=64)
    with pytest.raises(ValueError, match="fewer than one window"):
        data.make_dataset(short, _char("tiny"), "train", batch_size=2)
    (tmp_path / "bad.txt").write_bytes(b"caf\xc3\xa9 ok\n\nthen \xff here")
    bad = dataclass_replace(blank, files=(str(tmp_path / "bad.txt"),))
    with pytest.raises(ValueError, match=r"bad.txt is not valid UTF-8 at byte offset 15.*errors = \"replace\""):
        list(corpora.iter_documents(bad, "train"))
    replaced = list(corpora.iter_documents(dataclass_replace(bad, errors="replace"), "train"))
    assert replaced == ["café ok", "then \ufffd here"]


def _char(text):
    return tk.train_characters([text])


SHARED_DATA = pathlib.Path(
    os.environ.get("KGPT_SHARED_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data")
)


@pytest.mark.corpus
def test_real_corpora(tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real corpora not found at {SHARED_DATA} (set KGPT_SHARED_DATA)")
    shakespeare = _config(tmp_path, corpus="tinyshakespeare", dir=str(SHARED_DATA), tokenizer="char", sequence_length=64)
    characters = run_tokenizer.build_tokenizer(shakespeare)
    assert len(characters.characters) == 65 and characters.vocabulary_size == 68
    x, y = next(iter(data.make_dataset(shakespeare, characters, "validation", batch_size=4)))
    assert x.shape == (4, 64)
    validation = data.tokenize_corpus(shakespeare, characters, "validation")
    assert validation.num_tokens == 1115394 - int(1115394 * 0.9) + 1

    wikitext = _config(tmp_path, corpus="wikitext2", dir=str(SHARED_DATA), tokenizer="bpe", vocabulary_size=2000)
    articles = list(corpora.iter_documents(wikitext, "validation"))
    assert len(articles) == 60 and all(a.startswith(" = ") for a in articles)
    bpe = tk.train_bpe(articles, 2000)
    sample = articles[:8] + list(corpora.iter_documents(wikitext, "test"))[:8]
    assert bpe.tokenize(tf.constant(sample)).to_list() == [r.tolist() for r in bpe.encode_documents(sample)]

    imdb = _config(tmp_path, corpus="imdb", dir=str(SHARED_DATA), validation_count=500, tokenizer="bpe", vocabulary_size=1000)
    reviews = list(corpora.iter_documents(imdb, "validation"))
    assert len(reviews) == 1000 and len(list(corpora.iter_documents(imdb, "test"))) == 1000
    assert bpe.tokenize(tf.constant(reviews[:200])).to_list() == [r.tolist() for r in bpe.encode_documents(reviews[:200])]
    batches = list(data.make_dataset(dataclass_replace(imdb, mode="document"), bpe, "validation", batch_size=64))
    assert sum(len(b[0]) for b in batches) == 1000 and batches[-1][0].shape[0] == 1000 % 64


def test_random_window_offsets_are_seeded_slices_of_the_stream(shards, tmp_path):
    config, tokenizer = _packed_setup(shards, tmp_path, window_offsets="random")
    stream = data.tokenize_corpus(config, tokenizer, "train").read_tokens()

    def run(seed, passes):
        dataset = data.make_dataset(config, tokenizer, "train", batch_size=4, seed=seed, repeat=True)
        per_pass = (len(stream) - 1) // 8 // 4
        return [(x.numpy(), y.numpy()) for x, y in dataset.take(per_pass * passes)]

    first, again, other = run(1, 2), run(1, 2), run(2, 1)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(first[0][0], other[0][0])
    text = stream.tobytes()
    starts = set()
    for x, y in first:
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            window = np.concatenate([row_x, row_y[-1:]]).astype(np.int32).tobytes()
            offset = text.find(window)
            assert offset >= 0 and offset % 4 == 0  # a contiguous slice of the token stream
            starts.add(offset // 4)
    # Not confined to the aligned grid: windows start at arbitrary positions.
    assert any(start % 8 for start in starts)
