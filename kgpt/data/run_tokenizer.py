"""A run's tokenizer, one owner for its setup: made from `[data]` (trained on the training split,
read from `data.tokenizer_path` or tiktoken's cache) and saved, or loaded from a run directory
(`train.init_from`, `--tokenizer-from`), and always checked against `[data]` (kind, normalisation).
"""

import json
import os

from kgpt.data import corpora
from kgpt.tokenizers.base import CONFIG_FILENAME, tokenizer_kind
from kgpt.tokenizers.normalization import Normalization
from kgpt.tokenizers.registry import load_tokenizer
from kgpt.tokenizers.registry import make_tokenizer as make_kind

# A run directory's tokenizer folder (`kgpt.rundir.RunDirectory.tokenizer_dir`).
TOKENIZER_DIRECTORY = "tokenizer"


def text_normalization(config):
    """The `Normalization` that `data.lowercase` / `data.strip_punctuation` ask for."""
    return Normalization(lowercase=config.lowercase, strip_punctuation=config.strip_punctuation)


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
    if directory and os.path.isfile(os.path.join(directory, CONFIG_FILENAME)):
        loaded = load_tokenizer(directory)
        check_tokenizer(config, loaded, directory)
        return loaded
    kind = tokenizer_kind(config.tokenizer)
    result = make_kind(
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


def load_matching_tokenizer(source, data, option):
    """The tokenizer of run directory `source`, checked against `data.tokenizer`; `option` names
    `source` in errors (e.g. "train.init_from")."""
    if not os.path.isdir(source):
        raise FileNotFoundError(
            f"{option}={source!r} is not a directory; pass a run directory written by "
            "'kgpt train' or 'kgpt import-gpt2'."
        )
    directory = os.path.join(source, TOKENIZER_DIRECTORY)
    tokenizer = load_tokenizer(directory)
    if tokenizer.kind != data.tokenizer:
        fix = f"data.tokenizer = {tokenizer.kind!r}"
        if tokenizer.needs_tokenizer_path:
            fix += f" and data.tokenizer_path = {directory!r}"
        raise ValueError(
            f"data.tokenizer: recipe {data.tokenizer!r} vs {source}: {tokenizer.kind!r}. "
            f"{option} keeps that run's tokenizer; set {fix}."
        )
    check_tokenizer(data, tokenizer, directory)  # and its text normalisation
    return tokenizer


def make_tokenizer(recipe):
    """A new run's tokenizer: `train.init_from`'s (checked against `[data]`), else built from `[data]`."""
    if recipe.train.init_from:
        return load_matching_tokenizer(recipe.train.init_from, recipe.data, "train.init_from")
    return build_tokenizer(recipe.data)
