"""The corpora: one `Corpus` per corpus (its download, the files and reader of each split, the
options that change its documents, its evaluation split) in a registry by name (`CORPORA`,
`get_corpus`), and `iter_documents`, which yields a split's documents as Python strings. Files are
found in the data directory, the Keras cache or kgpt's own checked copy, else downloaded and verified.
"""

import dataclasses
import difflib
import glob
import hashlib
import os
import re
import shutil
import typing

import numpy as np

from kgpt import files

SPLITS = ("train", "validation", "test")
# DataConfig fields that change the documents of every corpus.
TEXT_OPTIONS = ("strip_html", "errors")
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
# Copies of small public-domain corpora shipped with kgpt (package data; see PROVENANCE.md there).
BUNDLED_DIRECTORY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus_data")
_verified_bundles = set()  # shipped files whose sha256 this process has checked


@dataclasses.dataclass(frozen=True)
class Archive:
    """An official corpus download: file name, mirrors, published sha256, folder it unpacks to."""

    filename: str
    urls: tuple
    sha256: str
    folder: str


@dataclasses.dataclass(frozen=True)
class Corpus:
    """One corpus. `archive` is its official download, or None for the user's files (`data.files`);
    `split_files` maps each split to the paths in the corpus folder that hold it, unless
    `list_files(config, split)` lists them; `reader(config, split, files)` yields the documents;
    `options(config, split)` names the `DataConfig` fields besides `TEXT_OPTIONS` that change them;
    `bundled` is the copy of a single-file archive shipped in `BUNDLED_DIRECTORY` (relative path)."""

    name: str
    archive: Archive | None
    split_files: typing.Mapping[str, tuple]
    reader: typing.Callable
    options: typing.Callable
    splits: tuple = SPLITS
    evaluation_split: str = "test"
    list_files: typing.Callable | None = None
    bundled: str | None = None
    count_words: typing.Callable | None = None  # (config, split, files) -> the corpus' own word count

    @property
    def needs_files(self):
        """True when `data.files` names its files (no download, no standard layout)."""
        return self.archive is None


def _gfile(path):
    """`tf.io.gfile` for a filesystem URL (`gs://...`, `ram://...`), None for a local path (`os`)."""
    if "://" not in os.fspath(path):
        return None
    import tensorflow as tf  # here only: importing kgpt.data.corpora (and kgpt.cli) loads no TensorFlow

    return tf.io.gfile


def _glob_files(pattern):
    """The files (not folders) that the glob `pattern` matches, sorted."""
    gfile = _gfile(pattern)
    if gfile:
        return sorted(p for p in gfile.glob(pattern) if not gfile.isdir(p))
    return sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))


def data_directory(config):
    """The data directory: `config.dir`, else `$KGPT_DATA_DIR`, else None."""
    return config.dir or os.environ.get("KGPT_DATA_DIR") or None


def keras_cache_directory():
    """Where downloads go: `<KERAS_HOME or ~/.keras>/datasets/kgpt`."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "datasets", "kgpt")


def find_corpus(config, split):
    """The folder holding `config.corpus`' files for `split`: data dir, Keras cache, kgpt's copy, download."""
    corpus = get_corpus(config.corpus)
    archive = corpus.archive
    if archive is None:
        raise ValueError(
            f"corpus {corpus.name!r} has no standard folder to find; its files are data.files."
        )
    required = list(corpus.split_files[split])
    root = data_directory(config)
    cached = os.path.join(keras_cache_directory(), archive.folder)
    candidates = ([os.path.join(root, archive.folder), root] if root else []) + [cached]
    for candidate in candidates:
        if all((_gfile(candidate) or os.path).exists(os.path.join(candidate, r)) for r in required):
            return candidate
    if corpus.bundled:  # shipped with kgpt: no network
        return os.path.dirname(_verified_bundle(corpus))
    try:
        _download(archive)
        if all(os.path.exists(os.path.join(cached, r)) for r in required):
            return cached
        failure = f"the downloaded {archive.filename} has no {', '.join(required)}"
    except Exception as error:  # no network, HTTP error, checksum mismatch
        failure = str(error)
    raise FileNotFoundError(
        f"Corpus {config.corpus!r} ({split} split): expected {', '.join(required)} in one of "
        f"{', '.join(repr(c) for c in candidates)}; downloading {archive.filename} failed ({failure})"
        ". Put the files there, or point data.dir (or the KGPT_DATA_DIR environment variable) "
        "at the folder that holds them."
    )


def _verified_bundle(corpus):
    """The path of `corpus`' shipped copy, its sha256 checked against the archive's once per process."""
    path = os.path.join(BUNDLED_DIRECTORY, corpus.bundled)
    if path not in _verified_bundles:
        with open(path, "rb") as file:
            digest = hashlib.file_digest(file, "sha256").hexdigest()
        if digest != corpus.archive.sha256:
            raise ValueError(
                f"{path}, the copy of {corpus.name!r} shipped with kgpt, has sha256 {digest}, not "
                f"{corpus.archive.sha256}: the installation is damaged. Reinstall kgpt, or point "
                f"data.dir at a folder holding {corpus.archive.folder}/{corpus.archive.filename}."
            )
        _verified_bundles.add(path)
    return path


def _download(archive):
    """Downloads `archive` into the Keras cache, verifies its sha256, unpacks it atomically."""
    import keras

    cache = keras_cache_directory()
    target = os.path.join(cache, archive.folder)
    if os.path.isdir(target):
        return
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
    with files.staged_directory(target, replace=False) as staging:
        if not archive.filename.endswith((".zip", ".tar.gz")):  # a single file
            shutil.copy(path, os.path.join(staging, archive.filename))
            return
        shutil.unpack_archive(path, staging)  # holds archive.folder/
        unpacked = os.path.join(staging, archive.folder)
        for name in os.listdir(unpacked):
            os.replace(os.path.join(unpacked, name), os.path.join(staging, name))
        os.rmdir(unpacked)


def read_text(path, errors="strict"):
    """Reads a UTF-8 file; invalid UTF-8 raises (naming the offset) or, with `"replace"`, is U+FFFD."""
    return "".join(read_lines(path, errors))


def read_lines(path, errors="strict"):
    """Yields the lines of a UTF-8 file (ends kept), reading it line by line; errors as `read_text`."""
    gfile, offset = _gfile(path), 0
    with gfile.GFile(path, "rb") if gfile else open(path, "rb") as file:
        for line in file:
            if b"\0" in line:
                raise ValueError(
                    f"{path} is not a text file: a NUL byte at offset {offset + line.index(0)}. Remove it "
                    "from data.files (or the corpus folder), or convert it to UTF-8 text."
                )
            try:
                yield line.decode("utf-8", errors)
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path} is not valid UTF-8 at byte offset {offset + error.start} "
                    f"(byte 0x{line[error.start]:02x}). Fix or re-encode the file, or set "
                    'data.errors = "replace" to substitute U+FFFD for invalid bytes.'
                ) from None
            offset += len(line)


def split_wikitext_articles(lines):
    """Yields WikiText's non-blank articles, split at top-level `" = Title = "` lines (sub-headings,
    `" = = Section = = "`, stay inside their article); `lines`: the text, or its lines (streamed)."""
    article = []
    for piece in [lines] if isinstance(lines, str) else lines:
        for line in piece.splitlines(keepends=True):
            stripped = line.strip()
            title = stripped.startswith("= ") and stripped.endswith(" =")
            if title and "= =" not in (stripped[:3], stripped[-3:]):  # starts the next article
                if "".join(article).strip():
                    yield "".join(article)
                article = []
            article.append(line)
    if "".join(article).strip():
        yield "".join(article)


def _review_key(path):
    name = os.path.basename(path)
    head = name.split("_", 1)[0]
    return (0, int(head), name) if head.isdigit() else (1, 0, name)


def _listdir_txt(folder):
    return sorted(_glob_files(os.path.join(folder, "*.txt")), key=_review_key)


def imdb_files(config, split):
    """The aclImdb review files of `split`; validation is a seeded `validation_count` per polarity
    carved from test, and test the rest."""
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
        picked = set(rng.choice(len(files), size=config.validation_count, replace=False))
        chosen += [f for i, f in enumerate(files) if (i in picked) == (split == "validation")]
    return chosen


def expand_files(patterns, config, setting="data.files"):
    """Expands file paths / glob patterns (relative ones against the data directory; URLs, e.g.
    `gs://bucket/*.txt`, through `tf.io.gfile`, which has no `**`), sorted."""
    root = data_directory(config)
    paths = []
    for pattern in patterns:
        relative = not os.path.isabs(pattern) and "://" not in pattern
        full = os.path.join(root, pattern) if root and relative else pattern
        matches = _glob_files(full)
        if not matches:
            looked = full if _gfile(full) else os.path.abspath(full)
            raise FileNotFoundError(
                f"{setting}: {pattern!r} matches no file (looked for {looked!r}). "
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
    """The files whose content makes up `split` (what the token cache key is computed from)."""
    corpus = get_corpus(config.corpus)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}; pass 'train', 'validation' or 'test'.")
    if split not in corpus.splits:
        raise ValueError(
            f"corpus {corpus.name!r} has no {split} split (only {' and '.join(corpus.splits)}); "
            f"evaluate on split={corpus.evaluation_split!r}."
        )
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
    selected = None  # every document: corpus_files picked files or validation_files
    if not config.validation_files and config.validation_fraction:
        chosen = _in_validation(config, sum(len(_file_documents(p, config)) for p in files))
        selected = ~chosen if split == "train" else chosen
    elif not config.validation_files and split == "validation":
        raise ValueError(
            "The text corpus has no validation split: data.validation_fraction is 0 and "
            "data.validation_files is empty; set one of them."
        )
    documents = (document for path in files for document in _file_documents(path, config))
    for index, document in enumerate(documents):
        if selected is None or selected[index]:
            yield document


def _read_imdb(config, split, files):
    for path in files:
        yield _BR.sub(" ", read_text(path, config.errors))  # always: IMDB's line breaks


def _read_tinyshakespeare(config, split, files):
    text = read_text(files[0], config.errors)
    cut = int(len(text) * (1.0 - config.validation_fraction))
    yield text[:cut] if split == "train" else text[cut:]


def _read_wikitext(config, split, files):
    yield from split_wikitext_articles(read_lines(files[0], config.errors))


def _wikitext_words(config, split, files):
    """WikiText's own count: whitespace tokens plus one end-of-line per line, blank ones included,
    as its tokenized release has them (test split of WikiText-2: 245,569)."""
    return sum(len(line.split()) + 1 for line in read_lines(files[0], config.errors))


def count_words(config, split):
    """The split's word count by the corpus' own convention (for word-level perplexity), or None
    where it has none (then: whitespace-separated words of the documents)."""
    corpus = get_corpus(config.corpus)
    return corpus.count_words(config, split, corpus_files(config, split)) if corpus.count_words else None


def iter_documents(config, split):
    """Yields the documents of `split` in a deterministic order, `strip_html` applied, blank ones skipped."""
    for document in get_corpus(config.corpus).reader(config, split, corpus_files(config, split)):
        if config.strip_html:
            document = _BR.sub(" ", document)
        if document.strip():
            yield document


def document_options(config, split):
    """The `DataConfig` fields whose values change the documents of `split`: `TEXT_OPTIONS` and the
    corpus' own (part of the token cache key)."""
    return TEXT_OPTIONS + tuple(get_corpus(config.corpus).options(config, split))


def file_identity(paths):
    """[(absolute path or URL, size, mtime_ns)] for cache keys."""
    identity = []
    for path in paths:
        gfile = _gfile(path)
        if gfile:
            stat = gfile.stat(path)
            identity.append((path, stat.length, stat.mtime_nsec))
        else:
            stat = os.stat(path)
            identity.append((os.path.abspath(path), stat.st_size, stat.st_mtime_ns))
    return identity


# sha256 values: WikiText from Apple's mlx-data (`mlx/data/datasets/wikitext.py`; the raw-v1 zip also in
# ../shared/data/PROVENANCE.md), aclImdb_v1.tar.gz as independent loaders publish it (Julia MLDatasets,
# gomlx), Tiny Shakespeare = karpathy/char-rnn's input.txt (also in PROVENANCE.md). The Salesforce S3
# bucket is WikiText's original host; wikitext.smerity.com is the author's mirror of the same archives.
_WIKITEXT_MIRRORS = ("https://wikitext.smerity.com/", "https://s3.amazonaws.com/research.metamind.io/wikitext/")


def _wikitext(size, suffix, sha256):
    """WikiText-`size`, its `raw` release (corpus `wikitext<size>`) or `tokens` (`wikitext<size>_tokens`)."""
    folder = f"wikitext-{size}" + ("-raw" if suffix == "raw" else "")
    zip_name = f"{folder}-v1.zip"
    short = {"train": "train", "validation": "valid", "test": "test"}
    return Corpus(
        name=f"wikitext{size}" + ("_tokens" if suffix == "tokens" else ""),
        archive=Archive(zip_name, tuple(m + zip_name for m in _WIKITEXT_MIRRORS), sha256, folder),
        split_files={split: (f"wiki.{short[split]}.{suffix}",) for split in SPLITS},
        reader=_read_wikitext,
        count_words=_wikitext_words,
        options=lambda config, split: (),
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
        _wikitext("2", "raw", "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11"),
        _wikitext("2", "tokens", "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c"),
        _wikitext("103", "raw", "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794"),
        _wikitext("103", "tokens", "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590"),
        Corpus(
            name="imdb",
            archive=Archive(
                "aclImdb_v1.tar.gz",
                ("https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",),
                "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe",
                "aclImdb",
            ),
            # validation and test are both carved from test/ (imdb_files).
            split_files={"train": ("train/pos", "train/neg"), "validation": _IMDB_TEST, "test": _IMDB_TEST},
            reader=_read_imdb,
            options=_imdb_options,
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
            bundled="tinyshakespeare/input.txt",
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
# The corpora found by name in the data directory, shipped with kgpt or downloaded (no data.files).
STANDARD_CORPORA = tuple(name for name, corpus in CORPORA.items() if not corpus.needs_files)


def get_corpus(name):
    """The registered `Corpus` called `name` (a `data.corpus` value).

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
