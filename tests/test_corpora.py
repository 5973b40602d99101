"""Tests for kgpt.data.corpora: the registry of corpora and each corpus' files, splits and documents."""

import dataclasses
import hashlib
import os
import pathlib
import shutil
import zipfile

import keras
import pytest

import kgpt.data
from kgpt.data import corpora, run_tokenizer
from kgpt.data import pipeline as data
from kgpt.data.config import DataConfig

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"

WIKITEXT = (
    " \n = Alpha Article = \n \n Alpha text one . \n \n = = Alpha History = = \n \n Alpha more "
    "text . \n \n = = = Deep = = = \n Deeper . \n \n = Beta = \n \n Beta text 1 @,@ 000 . \n"
    " \n = Gamma Gamma = \n \n Gamma text <unk> . \n"
)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def imdb_dir(tmp_path):
    root = tmp_path / "data"
    for split, count in (("train", 4), ("test", 6)):
        for polarity in ("pos", "neg"):
            for i in range(count):
                _write(
                    root / "aclImdb" / split / polarity / f"{i}_{7 if polarity == 'pos' else 2}.txt",
                    f"{split} {polarity} review {i}.<br /><br />It was {'good' if polarity == 'pos' else 'bad'}.",
                )
    _write(root / "aclImdb" / "train" / "unsup" / "0_0.txt", "unlabelled review")
    return root


def _config(tmp_path, **kwargs):
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kwargs)


def dataclass_replace(config, **changes):
    return dataclasses.replace(config, **changes)


def test_wikitext_articles_split_at_top_level_headings():
    articles = list(corpora.split_wikitext_articles(WIKITEXT))
    assert [a.strip().splitlines()[0].strip() for a in articles] == [
        "= Alpha Article =",
        "= Beta =",
        "= Gamma Gamma =",
    ]
    assert "= = Alpha History = =" in articles[0] and "= = = Deep = = =" in articles[0]
    assert "".join(articles).strip() == WIKITEXT.strip()



def test_wikitext_reader_uses_data_dir(tmp_path):
    for split in ("train", "valid", "test"):
        _write(tmp_path / "data" / "wikitext-2" / f"wiki.{split}.tokens", WIKITEXT)
    config = _config(tmp_path, corpus="wikitext2_tokens", dir=str(tmp_path / "data"))
    documents = [d.numpy().decode() for d in data.read_documents(config, "validation")]
    assert len(documents) == 3 and documents[1].strip().startswith("= Beta =")



def test_wikitext_words_are_counted_as_its_tokenized_release_counts_them(tmp_path):
    for split in ("train", "valid", "test"):
        _write(tmp_path / "data" / "wikitext-2" / f"wiki.{split}.tokens", WIKITEXT)
    config = _config(tmp_path, corpus="wikitext2_tokens", dir=str(tmp_path / "data"))
    lines = WIKITEXT.split("\n")[:-1]
    assert corpora.count_words(config, "test") == sum(len(line.split()) for line in lines) + len(lines)
    text = _config(tmp_path, corpus="text", files=(str(tmp_path / "data" / "wikitext-2" / "wiki.test.tokens"),))
    assert corpora.count_words(text, "validation") is None  # no convention: the documents' words


@pytest.mark.corpus
@pytest.mark.skipif(not (SHARED_DATA / "wikitext-2-raw").is_dir(), reason="no ../shared/data")
def test_wikitext2_test_split_has_the_published_word_count():
    config = DataConfig(corpus="wikitext2", dir=str(SHARED_DATA))
    assert corpora.count_words(config, "test") == 245_569  # Merity et al. (2016), table 1
    assert corpora.count_words(dataclass_replace(config, corpus="wikitext2_tokens"), "test") == 245_569


def test_imdb_validation_split_is_deterministic_and_disjoint(imdb_dir, tmp_path):
    config = _config(tmp_path, corpus="imdb", dir=str(imdb_dir), validation_count=2)
    validation = corpora.imdb_files(config, "validation")
    test = corpora.imdb_files(config, "test")
    assert validation == corpora.imdb_files(config, "validation")
    assert not set(validation) & set(test)
    assert sorted(validation + test) == sorted(str(p) for p in (imdb_dir / "aclImdb" / "test").rglob("*.txt"))
    assert sum("/pos/" in f for f in validation) == 2 and sum("/neg/" in f for f in validation) == 2
    other = corpora.imdb_files(_config(tmp_path, corpus="imdb", dir=str(imdb_dir), validation_count=2, seed=7), "validation")
    assert len(other) == 4
    train = list(corpora.iter_documents(config, "train"))
    assert len(train) == 8 and all("<br" not in d for d in train)
    unsup = dataclass_replace(config, imdb_unsupervised=True)
    assert len(list(corpora.iter_documents(unsup, "train"))) == 9
    with pytest.raises(ValueError, match="validation_count below 6"):
        corpora.imdb_files(dataclass_replace(config, validation_count=6), "validation")



def test_text_shards_split_by_fraction_and_by_files(shards, tmp_path):
    config = _config(tmp_path, corpus="text", files=(str(shards / "wiki_books_*.txt"),), validation_fraction=0.25)
    train = list(corpora.iter_documents(config, "train"))
    validation = list(corpora.iter_documents(config, "validation"))
    assert len(train) == 9 and len(validation) == 3 and not set(train) & set(validation)
    assert validation == list(corpora.iter_documents(config, "validation"))
    by_files = dataclass_replace(
        config, files=(str(shards / "wiki_books_[01].txt"),), validation_files=(str(shards / "wiki_books_2.txt"),)
    )
    assert len(list(corpora.iter_documents(by_files, "train"))) == 8
    assert all(d.startswith("Shard 2") for d in corpora.iter_documents(by_files, "validation"))
    per_file = dataclass_replace(config, document_separator="file", validation_fraction=0.34)
    assert len(list(corpora.iter_documents(per_file, "validation"))) == 1



def test_tinyshakespeare_is_split_90_10_by_characters(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 10
    _write(tmp_path / "data" / "tinyshakespeare" / "input.txt", text)
    config = _config(tmp_path, corpus="tinyshakespeare", dir=str(tmp_path / "data"), tokenizer="char")
    (train,) = corpora.iter_documents(config, "train")
    (validation,) = corpora.iter_documents(config, "validation")
    assert train + validation == text and len(train) == int(len(text) * 0.9)



@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No data directory, an empty Keras cache (`tmp_path/keras`) and no download possible."""
    monkeypatch.delenv("KGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))

    def no_download(archive):
        raise AssertionError(f"tried to download {archive.filename}")

    monkeypatch.setattr(corpora, "_download", no_download)
    monkeypatch.setattr(keras.utils, "get_file", no_download)
    return tmp_path / "keras" / "datasets" / "kgpt"


def test_tinyshakespeare_ships_with_kgpt_and_needs_no_download(offline, tmp_path, monkeypatch):
    config = _config(tmp_path, corpus="tinyshakespeare", tokenizer="char")
    (path,) = corpora.corpus_files(config, "train")
    assert path == os.path.join(os.path.dirname(kgpt.data.__file__), "corpus_data", "tinyshakespeare", "input.txt")
    with open(path, "rb") as file:
        assert hashlib.sha256(file.read()).hexdigest() == corpora.get_corpus("tinyshakespeare").archive.sha256
    (train,) = corpora.iter_documents(config, "train")
    (validation,) = corpora.iter_documents(config, "validation")
    assert len(train) == int(1_115_394 * 0.9) and len(train) + len(validation) == 1_115_394
    assert train.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    assert not os.path.exists(offline)  # nothing was written to the Keras cache

    def no_second_check(*args, **kwargs):
        raise AssertionError("the shipped copy was hashed again")

    monkeypatch.setattr(hashlib, "file_digest", no_second_check)  # verified once per process
    assert corpora.corpus_files(config, "validation") == [path]


def test_data_dir_and_keras_cache_win_over_the_shipped_copy(offline, tmp_path):
    cached = _write(offline / "tinyshakespeare" / "input.txt", "From the Keras cache.\n" * 10)
    config = _config(tmp_path, corpus="tinyshakespeare", tokenizer="char")
    assert corpora.corpus_files(config, "train") == [str(cached)]
    mine = _write(tmp_path / "data" / "tinyshakespeare" / "input.txt", "My own Shakespeare.\n" * 10)
    config = _config(tmp_path, corpus="tinyshakespeare", tokenizer="char", dir=str(tmp_path / "data"))
    assert corpora.corpus_files(config, "train") == [str(mine)]
    (train,) = corpora.iter_documents(config, "train")
    assert train == ("My own Shakespeare.\n" * 10)[:180]


def test_a_corrupted_shipped_copy_is_an_error_naming_the_file(offline, tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "BUNDLED_DIRECTORY", str(tmp_path / "corpus_data"))
    damaged = _write(tmp_path / "corpus_data" / "tinyshakespeare" / "input.txt", "First Citizen:\nTruncated.\n")
    config = _config(tmp_path, corpus="tinyshakespeare", tokenizer="char")
    with pytest.raises(ValueError) as error:
        corpora.corpus_files(config, "train")
    message = str(error.value)
    for needle in (str(damaged), "sha256", corpora.get_corpus("tinyshakespeare").archive.sha256, "Reinstall", "data.dir"):
        assert needle in message
    with pytest.raises(ValueError, match="sha256"):  # a failed check is not remembered as passed
        corpora.corpus_files(config, "validation")


def test_missing_corpus_names_files_places_and_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    config = _config(tmp_path, corpus="wikitext2", dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as error:
        data.read_documents(config, "train")
    message = str(error.value)
    for needle in ("wiki.train.raw", str(tmp_path / "nowhere"), "data.dir", "KGPT_DATA_DIR", "no network"):
        assert needle in message
    assert not (tmp_path / "keras" / "datasets" / "kgpt" / "wikitext-2-raw").exists()



def test_download_is_verified_and_unpacked_atomically(tmp_path, monkeypatch):
    archive = tmp_path / "wikitext-2-raw-v1.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for split in ("train", "valid", "test"):
            bundle.writestr(f"wikitext-2-raw/wiki.{split}.raw", WIKITEXT)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    calls = []

    def fake_get_file(fname, origin, file_hash, hash_algorithm, cache_dir, cache_subdir):
        calls.append((origin, file_hash))
        target = os.path.join(cache_dir, cache_subdir, fname)
        shutil.copy(archive, target)
        return target

    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    config = _config(tmp_path, corpus="wikitext2")
    assert len(list(corpora.iter_documents(config, "train"))) == 3
    archive = corpora.get_corpus("wikitext2").archive
    assert calls == [(archive.urls[0], archive.sha256)]
    assert len(list(corpora.iter_documents(config, "test"))) == 3 and len(calls) == 1


def test_registry_lists_every_corpus_with_splits_and_evaluation_split():
    assert list(corpora.CORPORA) == [
        "wikitext2", "wikitext2_tokens", "wikitext103", "wikitext103_tokens", "imdb", "tinyshakespeare", "text",
    ]
    assert corpora.STANDARD_CORPORA == tuple(list(corpora.CORPORA)[:-1])  # all but "text"
    for name, corpus in corpora.CORPORA.items():
        assert corpus.name == name and set(corpus.splits) <= set(corpora.SPLITS)
        assert corpus.evaluation_split in corpus.splits
        assert (corpus.archive is None) == corpus.needs_files
        if corpus.archive is not None:
            assert set(corpus.split_files) == set(corpus.splits)
    evaluation = {name: corpora.evaluation_split(name) for name in corpora.CORPORA}
    assert evaluation == {
        **{name: "test" for name in corpora.CORPORA},
        "tinyshakespeare": "validation",
        "text": "validation",
    }
    assert corpora.get_corpus("wikitext2").split_files["validation"] == ("wiki.valid.raw",)
    assert corpora.get_corpus("wikitext103_tokens").split_files["test"] == ("wiki.test.tokens",)
    assert corpora.get_corpus("imdb").archive.folder == "aclImdb"


def test_unknown_corpus_and_missing_split_say_what_to_set():
    with pytest.raises(ValueError, match=r"Unknown corpus='wikitext-2'\. Did you mean 'wikitext2'\?.*data\.corpus"):
        corpora.get_corpus("wikitext-2")
    with pytest.raises(ValueError, match="Did you mean 'tinyshakespeare'"):
        DataConfig(corpus="tiny_shakespeare")
    config = DataConfig(corpus="tinyshakespeare")
    with pytest.raises(ValueError, match=r"has no test split \(only train and validation\); evaluate on split='validation'"):
        corpora.corpus_files(config, "test")
    with pytest.raises(ValueError, match="split='dev' is not one of"):
        corpora.corpus_files(config, "dev")


def test_document_options_are_the_fields_that_change_each_split():
    text = DataConfig(corpus="text", files=("a.txt",))
    assert set(corpora.document_options(text, "train")) == {
        "strip_html", "errors", "files", "validation_files", "document_separator", "validation_fraction", "seed",
    }
    by_files = dataclass_replace(text, validation_files=("b.txt",))
    assert "seed" not in corpora.document_options(by_files, "validation")
    imdb = DataConfig(corpus="imdb")
    assert "seed" not in corpora.document_options(imdb, "train")  # train is not carved by seed
    assert {"seed", "validation_count", "imdb_unsupervised"} <= set(corpora.document_options(imdb, "test"))
    assert corpora.document_options(DataConfig(corpus="wikitext2"), "test") == corpora.TEXT_OPTIONS
    assert "validation_fraction" in corpora.document_options(DataConfig(corpus="tinyshakespeare"), "train")
    # Lowercasing and punctuation belong to the tokenizer, not to the documents.
    assert not {"lowercase", "strip_punctuation"} & set(corpora.document_options(text, "train"))


def test_adding_a_corpus_is_one_registry_entry(tmp_path, monkeypatch):
    _write(tmp_path / "lines" / "all.txt", "ONE line\n\nsecond Line<br />here\n   \nthird\n")

    def read_lines(config, split, files):
        lines = [line for path in files for line in corpora.read_text(path).splitlines()]
        return lines[:-1] if split == "train" else lines[-1:]

    lines = corpora.Corpus(
        name="lines",
        archive=corpora.Archive("all.txt", ("https://example.invalid/all.txt",), "0" * 64, "lines"),
        splits=("train", "test"),
        split_files={"train": ("all.txt",), "test": ("all.txt",)},
        reader=read_lines,
        options=lambda config, split: ("seed",),
        evaluation_split="test",
    )
    monkeypatch.setitem(corpora.CORPORA, "lines", lines)
    config = _config(tmp_path, corpus="lines", dir=str(tmp_path), tokenizer="char", strip_html=True)
    assert list(corpora.iter_documents(config, "train")) == ["ONE line", "second Line here"]
    assert corpora.corpus_files(config, "test") == [str(tmp_path / "lines" / "all.txt")]
    assert corpora.evaluation_split("lines") == "test"
    tokenizer = run_tokenizer.build_tokenizer(config)
    _, description = data.cache_key(config, tokenizer, "test")
    assert description["options"] == {"strip_html": True, "errors": "strict", "seed": 1337, "shard_bytes": 2**25}
    with pytest.raises(ValueError, match="has no validation split"):
        corpora.corpus_files(config, "validation")


def test_documents_keep_their_text_normalisation_is_the_tokenizers(imdb_dir, tmp_path):
    config = _config(tmp_path, corpus="imdb", dir=str(imdb_dir), validation_count=2, lowercase=True, strip_punctuation=True)
    train = list(corpora.iter_documents(config, "train"))
    # `<br />` is IMDB's reading option; case and punctuation are left for the tokenizer.
    assert "train pos review 0.  It was good." in train
