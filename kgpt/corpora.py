"""The corpora: one `Corpus` object per corpus (its download, the files of each split, its splits,
its document reader, the options that change its documents, its default evaluation split), in a
registry by name (`CORPORA`, `get_corpus`), and the readers that yield documents as Python strings.

Corpora (`data.corpus`):

| name | files | documents | splits |
| --- | --- | --- | --- |
| `wikitext2`, `wikitext103` | `wiki.{train,valid,test}.raw` | one per `" = Title = "` article | train, validation, test |
| `wikitext2_tokens`, `wikitext103_tokens` | `wiki.{train,valid,test}.tokens` | same | same |
| `imdb` | `aclImdb/{train,test}/{pos,neg}/*.txt` (+ `train/unsup` if `imdb_unsupervised`) | one per review, `<br />` -> space | train; validation = a seeded `validation_count` per polarity from test; test = the rest |
| `tinyshakespeare` | `input.txt` | one | train = first `1 - validation_fraction` of the characters, validation = the rest |
| `text` | `files` (paths or globs) | per file, blank-line block or line (`document_separator`) | train; validation = `validation_files` or a seeded `validation_fraction` of the documents |

Adding a corpus is one `Corpus(...)` in `CORPORA` below (plus its tests and README line).

Where files are looked for, in order: the data directory (`data.dir`, else `$KGPT_DATA_DIR`), both
the corpus' folder in it (`wikitext-2-raw/`, `aclImdb/`, `tinyshakespeare/`, ...) and the
directory itself; then `<KERAS_HOME or ~/.keras>/datasets/kgpt/<folder>/`. If the files are in
neither, the official archive is downloaded there with `keras.utils.get_file` and verified by
sha256 (see `Corpus.archive`), then extracted to a temporary folder and renamed, so nothing is
left half-written. Relative `files` are resolved against the data directory when one is set.

Documents come out as the corpus holds them (`strip_html` maps `<br />` to a space); lowercasing
and punctuation stripping belong to the tokenizer (`kgpt.tokenizer.Normalization`).
"""

import dataclasses
import difflib
import glob
import os
import re
import shutil
import tempfile
import typing

import numpy as np

SPLITS = ("train", "validation", "test")
# DataConfig fields that change the documents of every corpus.
TEXT_OPTIONS = ("strip_html", "errors")
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Archive:
    """An official corpus download: file name, mirrors, published sha256, folder it unpacks to."""

    filename: str
    urls: tuple
    sha256: str
    folder: str


@dataclasses.dataclass(frozen=True)
class Corpus:
    """One corpus: its files, its splits, how its documents are read.

    Args:
        name: the `data.corpus` value.
        archive: its official download (`Archive`: file, mirrors, sha256, folder), or None for a
            corpus of the user's own files (`data.files`).
        splits: the splits it has, from `SPLITS`.
        split_files: split -> the paths, relative to the corpus folder, that hold it (also what
            `find_corpus` checks for); empty for the user's files.
        reader: `(config, split, files) -> iterable of str`: the split's documents, from the
            paths `corpus_files` returns.
        options: `(config, split) -> tuple of DataConfig field names` that change the split's
            documents besides `TEXT_OPTIONS` (part of the token cache key).
        evaluation_split: the split `kgpt evaluate` scores by default.
        list_files: optional `(config, split) -> paths` when the files are not `split_files`
            (IMDB's review files, the user's globs).
    """

    name: str
    archive: typing.Optional[Archive]
    splits: tuple
    split_files: typing.Mapping[str, tuple]
    reader: typing.Callable
    options: typing.Callable
    evaluation_split: str
    list_files: typing.Optional[typing.Callable] = None

    @property
    def needs_files(self):
        """True when `data.files` names its files (no download, no standard layout)."""
        return self.archive is None


def data_directory(config):
    """The data directory: `config.dir`, else `$KGPT_DATA_DIR`, else None."""
    return config.dir or os.environ.get("KGPT_DATA_DIR") or None


def keras_cache_directory():
    """Where downloads go: `<KERAS_HOME or ~/.keras>/datasets/kgpt`."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "datasets", "kgpt")


def _check_split(corpus, split):
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}; pass 'train', 'validation' or 'test'.")
    if split not in corpus.splits:
        raise ValueError(
            f"corpus {corpus.name!r} has no {split} split (only {' and '.join(corpus.splits)}); "
            f"evaluate on split={corpus.evaluation_split!r}."
        )


def find_corpus(config, split, download=True):
    """Returns the folder holding `config.corpus`' files for `split`, downloading if needed.

    Args:
        config: a `DataConfig` naming a standard corpus (not `"text"`).
        split: `"train"`, `"validation"` or `"test"`.
        download: fetch the official archive when the files are found nowhere.

    Returns:
        A directory path.

    Raises:
        FileNotFoundError: naming the files expected, where they were looked for and the setting.
    """
    corpus = get_corpus(config.corpus)
    archive = corpus.archive
    if archive is None:
        raise ValueError(
            f"corpus {corpus.name!r} has no standard folder to find; its files are data.files."
        )
    required = list(corpus.split_files[split])
    candidates = []
    root = data_directory(config)
    if root:
        candidates += [os.path.join(root, archive.folder), root]
    cached = os.path.join(keras_cache_directory(), archive.folder)
    candidates.append(cached)
    for candidate in candidates:
        if all(os.path.exists(os.path.join(candidate, r)) for r in required):
            return candidate
    errors = []
    if download:
        try:
            _download(archive)
            if all(os.path.exists(os.path.join(cached, r)) for r in required):
                return cached
            errors.append(f"the downloaded {archive.filename} has no {', '.join(required)}")
        except Exception as error:  # no network, HTTP error, checksum mismatch
            errors.append(str(error))
    raise FileNotFoundError(
        f"Corpus {config.corpus!r} ({split} split): expected {', '.join(required)} in one of "
        f"{', '.join(repr(c) for c in candidates)}"
        + (f"; downloading {archive.filename} failed ({'; '.join(errors)})" if errors else "")
        + ". Put the files there, or point data.dir (or the KGPT_DATA_DIR environment variable) "
        "at the folder that holds them."
    )


def _download(archive):
    """Downloads `archive` into the Keras cache, verifies its sha256, unpacks it atomically."""
    import keras

    cache = keras_cache_directory()
    target = os.path.join(cache, archive.folder)
    if os.path.isdir(target):
        return target
    os.makedirs(cache, exist_ok=True)
    failures = []
    for url in archive.urls:
        try:
            path = keras.utils.get_file(
                fname=archive.filename,
                origin=url,
                file_hash=archive.sha256,
                hash_algorithm="sha256",
                cache_dir=os.path.dirname(os.path.dirname(cache)),
                cache_subdir=os.path.join("datasets", "kgpt"),
            )
            break
        except Exception as error:
            partial = os.path.join(cache, archive.filename)
            if os.path.exists(partial):
                os.remove(partial)  # a corrupted download is never kept
            failures.append(f"{url}: {error}")
    else:
        raise OSError("; ".join(failures))
    staging = tempfile.mkdtemp(dir=cache, prefix=f".{archive.folder}.")
    try:
        if archive.filename.endswith((".zip", ".tar.gz")):
            shutil.unpack_archive(path, staging)
            unpacked = os.path.join(staging, archive.folder)
        else:
            unpacked = os.path.join(staging, archive.folder)
            os.makedirs(unpacked)
            shutil.copy(path, os.path.join(unpacked, archive.filename))
        os.replace(unpacked, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_text(path, errors="strict"):
    """Reads a UTF-8 file.

    Args:
        path: the file.
        errors: `"strict"` raises on invalid UTF-8; `"replace"` substitutes U+FFFD.

    Returns:
        The text.

    Raises:
        ValueError: naming the file and the byte offset of invalid UTF-8 (strict mode).
    """
    with open(path, "rb") as file:
        data = file.read()
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not valid UTF-8 at byte offset {error.start} "
            f"(byte 0x{data[error.start]:02x}). Fix or re-encode the file, or set "
            'data.errors = "replace" to substitute U+FFFD for invalid bytes.'
        ) from None


def split_wikitext_articles(text):
    """Splits WikiText into articles at top-level `" = Title = "` lines.

    Sub-headings (`" = = Section = = "`) stay inside their article; blank articles are dropped.

    Args:
        text: the content of a `wiki.*.raw` / `wiki.*.tokens` file.

    Returns:
        A list of article strings, each starting with its title line.
    """
    articles, current = [], []
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        title = (
            stripped.startswith("= ") and stripped.endswith(" =")
            and not stripped.startswith("= =") and not stripped.endswith("= =")
        )
        if title and current:
            articles.append("".join(current))
            current = []
        current.append(line)
    if current:
        articles.append("".join(current))
    return [a for a in articles if a.strip()]


def _review_key(path):
    name = os.path.basename(path)
    head = name.split("_", 1)[0]
    return (0, int(head), name) if head.isdigit() else (1, 0, name)


def _listdir_txt(folder):
    return sorted(glob.glob(os.path.join(folder, "*.txt")), key=_review_key)


def imdb_files(config, split):
    """The aclImdb review files of `split` (validation carved from test, seeded, per polarity).

    Args:
        config: a `DataConfig` (`validation_count`, `seed`, `imdb_unsupervised`, `dir`).
        split: `"train"`, `"validation"` or `"test"`.

    Returns:
        A list of file paths, deterministic given the config.
    """
    root = find_corpus(config, split)
    if split == "train":
        folders = ["pos", "neg"] + (["unsup"] if config.imdb_unsupervised else [])
        return [f for name in folders for f in _listdir_txt(os.path.join(root, "train", name))]
    chosen = []
    for index, polarity in enumerate(("pos", "neg")):
        files = _listdir_txt(os.path.join(root, "test", polarity))
        if config.validation_count >= len(files):
            raise ValueError(
                f"validation_count={config.validation_count} reviews per polarity cannot be carved "
                f"from the {len(files)} files in {os.path.join(root, 'test', polarity)}; set "
                f"data.validation_count below {len(files)}."
            )
        rng = np.random.default_rng([config.seed, index])
        picked = np.zeros(len(files), dtype=bool)
        picked[rng.choice(len(files), size=config.validation_count, replace=False)] = True
        keep = picked if split == "validation" else ~picked
        chosen += [f for f, k in zip(files, keep) if k]
    return chosen


def expand_files(patterns, config, setting="data.files"):
    """Expands file paths / glob patterns (relative ones against the data directory), sorted.

    Raises:
        FileNotFoundError: when a pattern matches no file, naming it and where it was looked for.
    """
    root = data_directory(config)
    paths = []
    for pattern in patterns:
        full = os.path.join(root, pattern) if root and not os.path.isabs(pattern) else pattern
        matches = sorted(p for p in glob.glob(os.path.expanduser(full), recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(
                f"{setting}: {pattern!r} matches no file (looked for {os.path.abspath(full)!r}). "
                "Fix the path or glob, or set data.dir / KGPT_DATA_DIR to the folder it is relative to."
            )
        paths += [m for m in matches if m not in paths]
    return paths


def _file_documents(path, config):
    text = read_text(path, config.errors)
    if config.document_separator == "file":
        pieces = [text]
    elif config.document_separator == "line":
        pieces = text.splitlines()
    else:  # blank_line
        pieces = re.split(r"\n[ \t\r\f\v]*\n", text)
    return [p for p in pieces if p.strip()]


def corpus_files(config, split):
    """The files whose content makes up `split` (what the token cache key is computed from).

    Args:
        config: a `DataConfig`.
        split: `"train"`, `"validation"` or `"test"`.

    Returns:
        A list of file paths.
    """
    corpus = get_corpus(config.corpus)
    _check_split(corpus, split)
    if corpus.list_files is not None:
        return corpus.list_files(config, split)
    root = find_corpus(config, split)
    return [os.path.join(root, r) for r in corpus.split_files[split]]


def _in_validation(config, count):
    """Seeded choice of round(validation_fraction * count) document indices (at least one)."""
    if count < 2:
        raise ValueError(
            f"The text corpus has {count} document(s); a validation split needs at least 2. Add "
            "text, set data.document_separator = \"blank_line\" or \"line\", or set "
            "data.validation_files."
        )
    size = min(count - 1, max(1, round(config.validation_fraction * count)))
    chosen = np.zeros(count, dtype=bool)
    chosen[np.random.default_rng(config.seed).permutation(count)[:size]] = True
    return chosen


def _text_files(config, split):
    if split == "validation" and config.validation_files:
        return expand_files(config.validation_files, config, "data.validation_files")
    return expand_files(config.files, config)


def _read_text_files(config, split, files):
    if config.validation_files:
        selected = None  # corpus_files already picked files or validation_files
    elif not config.validation_fraction:
        if split == "validation":
            raise ValueError(
                "The text corpus has no validation split: data.validation_fraction is 0 and "
                "data.validation_files is empty; set one of them."
            )
        selected = None
    else:
        counts = [len(_file_documents(p, config)) for p in files]
        selected = _in_validation(config, sum(counts))
        if split == "train":
            selected = ~selected
    index = 0
    for path in files:
        for document in _file_documents(path, config):
            if selected is None or selected[index]:
                yield document
            index += 1


def _read_imdb(config, split, files):
    for path in files:
        yield _BR.sub(" ", read_text(path, config.errors))  # always: IMDB's line breaks


def _read_tinyshakespeare(config, split, files):
    text = read_text(files[0], config.errors)
    cut = int(len(text) * (1.0 - config.validation_fraction))
    yield text[:cut] if split == "train" else text[cut:]


def _read_wikitext(config, split, files):
    yield from split_wikitext_articles(read_text(files[0], config.errors))


def iter_documents(config, split):
    """Yields the documents of `split` as Python strings, `strip_html` applied, blank ones skipped.

    Args:
        config: a `DataConfig`.
        split: `"train"`, `"validation"` or `"test"`.

    Yields:
        Document strings, in a deterministic order.
    """
    corpus = get_corpus(config.corpus)
    files = corpus_files(config, split)
    for document in corpus.reader(config, split, files):
        if config.strip_html:
            document = _BR.sub(" ", document)
        if document.strip():
            yield document


def document_options(config, split):
    """The `DataConfig` field names whose values change the documents of `split` (cache key).

    Args:
        config: a `DataConfig`.
        split: `"train"`, `"validation"` or `"test"`.

    Returns:
        A tuple of field names: `TEXT_OPTIONS` and the corpus' own.
    """
    return TEXT_OPTIONS + tuple(get_corpus(config.corpus).options(config, split))


def file_identity(paths):
    """[(absolute path, size, mtime_ns)] for cache keys."""
    identity = []
    for path in paths:
        stat = os.stat(path)
        identity.append((os.path.abspath(path), stat.st_size, stat.st_mtime_ns))
    return identity



# sha256 values: WikiText from Apple's mlx-data (`mlx/data/datasets/wikitext.py`), the raw-v1 zip also
# in ../shared/data/PROVENANCE.md; aclImdb_v1.tar.gz as published by several independent loaders
# (e.g. the Julia MLDatasets and gomlx IMDB loaders); Tiny Shakespeare = karpathy/char-rnn's
# input.txt (also in PROVENANCE.md). The Salesforce S3 bucket is the original WikiText host;
# wikitext.smerity.com is the author's mirror of the same archives.
_WIKITEXT_MIRRORS = ("https://wikitext.smerity.com/", "https://s3.amazonaws.com/research.metamind.io/wikitext/")


def _wikitext(name, zip_name, folder, suffix, sha256):
    short = {"train": "train", "validation": "valid", "test": "test"}
    return Corpus(
        name=name,
        archive=Archive(zip_name, tuple(m + zip_name for m in _WIKITEXT_MIRRORS), sha256, folder),
        splits=SPLITS,
        split_files={split: (f"wiki.{short[split]}.{suffix}",) for split in SPLITS},
        reader=_read_wikitext,
        options=lambda config, split: (),
        evaluation_split="test",
    )


def _text_options(config, split):
    held_out = () if config.validation_files else ("validation_fraction", "seed")
    return ("files", "validation_files", "document_separator") + held_out


def _imdb_options(config, split):
    return ("imdb_unsupervised",) + (("validation_count", "seed") if split != "train" else ())


_IMDB_TEST = ("test/pos", "test/neg")
CORPORA = {
    corpus.name: corpus
    for corpus in (
        _wikitext(
            "wikitext2", "wikitext-2-raw-v1.zip", "wikitext-2-raw", "raw",
            "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
        ),
        _wikitext(
            "wikitext2_tokens", "wikitext-2-v1.zip", "wikitext-2", "tokens",
            "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c",
        ),
        _wikitext(
            "wikitext103", "wikitext-103-raw-v1.zip", "wikitext-103-raw", "raw",
            "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794",
        ),
        _wikitext(
            "wikitext103_tokens", "wikitext-103-v1.zip", "wikitext-103", "tokens",
            "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590",
        ),
        Corpus(
            name="imdb",
            archive=Archive(
                "aclImdb_v1.tar.gz",
                ("https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",),
                "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe",
                "aclImdb",
            ),
            splits=SPLITS,
            # validation and test are both carved from test/ (imdb_files).
            split_files={"train": ("train/pos", "train/neg"), "validation": _IMDB_TEST, "test": _IMDB_TEST},
            reader=_read_imdb,
            options=_imdb_options,
            evaluation_split="test",
            list_files=imdb_files,
        ),
        Corpus(
            name="tinyshakespeare",
            archive=Archive(
                "input.txt",
                ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",),
                "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                "tinyshakespeare",
            ),
            splits=("train", "validation"),
            split_files={"train": ("input.txt",), "validation": ("input.txt",)},
            reader=_read_tinyshakespeare,
            options=lambda config, split: ("validation_fraction",),
            evaluation_split="validation",
        ),
        Corpus(
            name="text",
            archive=None,
            splits=("train", "validation"),
            split_files={},
            reader=_read_text_files,
            options=_text_options,
            evaluation_split="validation",
            list_files=_text_files,
        ),
    )
}
# The corpora found by name in the data directory or downloaded (no data.files).
STANDARD_CORPORA = tuple(name for name, corpus in CORPORA.items() if not corpus.needs_files)


def get_corpus(name):
    """The registered `Corpus` called `name`.

    Args:
        name: a `data.corpus` value, e.g. `"wikitext2"`.

    Returns:
        A `Corpus` from `CORPORA`.

    Raises:
        ValueError: for an unknown name, with the closest known one and the list.

    Example:
        get_corpus("tinyshakespeare").evaluation_split  # "validation"
    """
    if name in CORPORA:
        return CORPORA[name]
    close = difflib.get_close_matches(str(name), list(CORPORA), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown corpus={name!r}.{hint} Set data.corpus to one of: {', '.join(CORPORA)}.")


def evaluation_split(name):
    """The split `kgpt evaluate` scores by default for corpus `name` (test where there is one)."""
    return get_corpus(name).evaluation_split
