"""The tokenizer kinds (`bpe`, `gpt2`, `char`, `tiktoken:NAME`) with their capability flags, and
making (`make_tokenizer`) or loading (`load_tokenizer`) a tokenizer of any of them."""

import json
import os

from kgpt.tokenizers.base import (
    BYTE_ALPHABET_SIZE,
    CONFIG_FILENAME,
    FORMAT_VERSION,
    TOKENIZER_KINDS,
    Normalization,
    TokenizerKind,
    register_kind,
    tokenizer_kind,
    tokenizer_names,
)
from kgpt.tokenizers.bpe import BytePairTokenizer, _read_bpe_files, load_gpt2_tokenizer, train_bpe
from kgpt.tokenizers.char import CharacterTokenizer, train_characters
from kgpt.tokenizers.tiktokens import TiktokenTokenizer

__all__ = ["TOKENIZER_KINDS", "TOKENIZER_NAMES", "load_tokenizer", "make_tokenizer", "tokenizer_kind"]


def _make_gpt2(name, documents, vocabulary_size, path, normalization):
    if os.path.isfile(os.path.join(path, CONFIG_FILENAME)):
        return load_tokenizer(path)  # a tokenizer kgpt saved: its own normalisation
    return load_gpt2_tokenizer(path, normalization=normalization)


def _load_bpe(directory, saved, normalization):
    vocabulary, merges = _read_bpe_files(
        os.path.join(directory, saved["vocabulary_file"]), os.path.join(directory, saved["merges_file"])
    )
    return BytePairTokenizer(
        vocabulary, merges, kind=saved["kind"], padding=saved.get("padding"), normalization=normalization
    )


for _kind in (
    TokenizerKind(
        "bpe", "bpe", has_bpe_files=True, trained_on_corpus=True,
        minimum_vocabulary_size=BYTE_ALPHABET_SIZE + 2, load=_load_bpe,
        make=lambda name, texts, size, path, normalization: train_bpe(texts, size, normalization),
    ),
    TokenizerKind(
        "gpt2", "gpt2", has_bpe_files=True, needs_tokenizer_path=True, make=_make_gpt2, load=_load_bpe
    ),
    TokenizerKind(
        "char", "char", trained_on_corpus=True,
        make=lambda name, texts, size, path, normalization: train_characters(texts, normalization),
        load=lambda folder, saved, normalization: CharacterTokenizer(saved["characters"], normalization),
    ),
    TokenizerKind(
        "tiktoken", "tiktoken:NAME", graph_compatible=False,
        make=lambda name, texts, size, path, normalization: TiktokenTokenizer(
            name.partition(":")[2], normalization
        ),
        load=lambda folder, saved, normalization: TiktokenTokenizer(saved["encoding"], normalization, folder),
    ),
):
    register_kind(_kind)
TOKENIZER_NAMES = tokenizer_names()


def make_tokenizer(name, documents=None, vocabulary_size=None, path=None, normalization=None):
    """Makes a tokenizer of the kind `name` (a `data.tokenizer` value) applying `normalization`: trains
    it on `documents` with at most `vocabulary_size` ids, or loads it from `path` (`gpt2`; a tokenizer
    kgpt saved there keeps its own normalisation).

    Example:
        tokenizer = make_tokenizer("char", documents=["hello"], normalization=Normalization(lowercase=True))
    """
    kind = tokenizer_kind(name)
    if kind.trained_on_corpus and documents is None:
        raise ValueError(f"tokenizer {name!r} is trained on text; pass documents=[...].")
    if kind.minimum_vocabulary_size is not None and vocabulary_size is None:
        raise ValueError(f"tokenizer {name!r} needs a vocabulary_size (e.g. 8192).")
    if kind.needs_tokenizer_path and not path:
        raise ValueError(
            f"tokenizer {name!r} is loaded from files; set data.tokenizer_path to the folder "
            "holding vocab.json (or encoder.json) and merges.txt."
        )
    return kind.make(name, documents, vocabulary_size, path, normalization)


def load_tokenizer(directory):
    """Loads a tokenizer written by `Tokenizer.save` (without a saved normalisation: none).

    Example:
        tokenizer = load_tokenizer("checkpoints/shakespeare_char/tokenizer")
    """
    path = os.path.join(directory, CONFIG_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No tokenizer in {directory!r}: {CONFIG_FILENAME} is missing. Pass the folder that "
            "Tokenizer.save wrote (a run directory's tokenizer/)."
        )
    with open(path, encoding="utf-8") as file:
        saved = json.load(file)
    version = saved.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version={version!r}; this kgpt reads up to {FORMAT_VERSION}. "
            "It was written by a newer kgpt; upgrade kgpt or save the tokenizer again."
        )
    kind = saved.get("kind", "")
    try:
        spec = tokenizer_kind(kind)
    except ValueError:
        raise ValueError(
            f"{path} has kind={kind!r}; expected one of {', '.join(TOKENIZER_NAMES)}. "
            "The file is damaged or from a newer kgpt; save the tokenizer again."
        ) from None
    normalization = Normalization.from_dict(saved.get("normalization"), path)
    return spec.load(directory, saved, normalization)
