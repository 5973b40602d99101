"""Baselines: an add-k bigram model (`train_bigram`) and the GRU with attention (`train_recurrent`).

The bigram is counted on the GPT's training token stream and saved, without pickle, as a run
directory `kgpt evaluate` reads; the GRU (`kgpt.recurrent`) is the recipe with `[model] kind = "gru"`.
"""

import dataclasses
import itertools
import json
import os

import numpy as np

from kgpt import files
from kgpt.config import DataConfig, config_differences, identity
from kgpt.data import build_tokenizer, scoring_tokens, tokenize_corpus
from kgpt.rundir import BIGRAM, BIGRAM_COUNTS, RunDirectory
from kgpt.train import load_matching_tokenizer, train

SMOOTHING_GRID = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)


class BigramModel:
    """Add-k smoothed bigram counts over token ids: `P(b | a) = (count(a, b) + k) / (count(a) + k V)`.

    `keys` are the sorted int64 `a * V + b` of every bigram seen, `counts` their counts (sparse).

    Example:
        bigram = BigramModel.fit(stream, vocabulary_size=65, k=0.1)
        bigram.probability([1], [2])  # P(2 | 1)
    """

    def __init__(self, keys, counts, vocabulary_size, k=1.0):
        if k <= 0:
            raise ValueError(f"k={k} must be positive (add-k smoothing; e.g. 1.0 or 0.01).")
        self.keys = np.asarray(keys, dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.vocabulary_size = int(vocabulary_size)
        self.k = float(k)
        self.row_totals = np.bincount(
            self.keys // self.vocabulary_size, weights=self.counts, minlength=self.vocabulary_size
        )

    @classmethod
    def fit(cls, tokens, vocabulary_size, k=1.0):
        """Counts the bigrams `(tokens[i], tokens[i + 1])` of a token stream."""
        return cls.fit_pieces([tokens], vocabulary_size, k)

    @classmethod
    def fit_pieces(cls, pieces, vocabulary_size, k=1.0):
        """Counts the bigrams of one stream given as consecutive pieces (token-store shards), one
        piece in memory at a time; pairs across piece boundaries count too."""
        keys, counts, previous = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], None
        for piece in pieces:
            piece = np.asarray(piece, dtype=np.int64)
            if piece.size and (piece.min() < 0 or piece.max() >= vocabulary_size):
                raise ValueError(
                    f"Token ids must be in [0, {vocabulary_size}); found {piece.min()}..{piece.max()}."
                )
            piece = piece if previous is None else np.concatenate([[previous], piece])
            previous = piece[-1] if piece.size else previous
            unique, count = np.unique(piece[:-1] * vocabulary_size + piece[1:], return_counts=True)
            keys.append(unique)
            counts.append(count)
        keys, inverse = np.unique(np.concatenate(keys), return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate(counts), minlength=len(keys))
        return cls(keys, counts.astype(np.int64), vocabulary_size, k)

    def with_smoothing(self, k):
        return BigramModel(self.keys, self.counts, self.vocabulary_size, k)

    @property
    def parameters(self):
        """Entries of the conditional probability table it represents (`V * V`)."""
        return self.vocabulary_size**2

    def probability(self, previous, following):
        """`P(following | previous)`, element-wise over arrays of ids."""
        previous = np.asarray(previous, np.int64)
        query = previous * self.vocabulary_size + np.asarray(following, np.int64)
        position = np.minimum(np.searchsorted(self.keys, query), max(len(self.keys) - 1, 0))
        found = self.keys[position] == query if len(self.keys) else np.zeros(query.shape, bool)
        pair = np.where(found, self.counts[position] if len(self.keys) else 0, 0)
        return (pair + self.k) / (self.row_totals[previous] + self.k * self.vocabulary_size)

    def nll(self, x, y):
        """Per-position negative log-likelihood (nats) of targets `y` after inputs `x`."""
        return -np.log(self.probability(x, y))

    def save(self, run_dir):
        """Writes `bigram.json` and `bigram_counts.npy` into a folder being staged (no pickle)."""
        os.makedirs(run_dir, exist_ok=True)
        np.save(os.path.join(run_dir, BIGRAM_COUNTS), np.stack([self.keys, self.counts], 1))
        with open(os.path.join(run_dir, BIGRAM), "w", encoding="utf-8") as file:
            json.dump({"vocabulary_size": self.vocabulary_size, "k": self.k,
                       "counts_file": BIGRAM_COUNTS}, file, indent=2)

    @classmethod
    def load(cls, run_dir):
        with open(os.path.join(run_dir, BIGRAM), encoding="utf-8") as file:
            meta = json.load(file)
        table = np.load(os.path.join(run_dir, meta["counts_file"]), allow_pickle=False)
        return cls(table[:, 0], table[:, 1], meta["vocabulary_size"], meta["k"])


def _stream(data, tokenizer, split):
    # int64: the bigram keys are `a * V + b`, beyond int32 for GPT-2's vocabulary.
    return scoring_tokens(data, tokenizer, split).astype(np.int64)


def train_bigram(recipe, run_dir, k=None, tokenizer_from=None):
    """Fits the bigram on the training split of a recipe's `[data]` into `run_dir`; returns it.

    Args:
        k: the smoothing constant; None picks the best of `SMOOTHING_GRID` on validation.
        tokenizer_from: a run directory whose tokenizer to use (default: built as `kgpt train` does).
    """
    data = recipe.data.to_dict()
    _check_bigram_run_directory(run_dir, data)  # before anything is fitted or written
    tokenizer = (
        load_matching_tokenizer(tokenizer_from, recipe.data, "--tokenizer-from")
        if tokenizer_from else build_tokenizer(recipe.data)
    )
    # Fitted into a sibling folder that replaces run_dir at the end: never a half-written run.
    files.remove_stale(os.path.dirname(os.path.abspath(run_dir)))
    with files.staged_directory(run_dir) as staging:
        staged = RunDirectory(staging)
        tokenizer.save(staged.tokenizer_dir)
        store = tokenize_corpus(recipe.data, tokenizer, "train")  # read shard by shard
        shards = (store.read_shard(i) for i in range(len(store.shards)))
        bigram = BigramModel.fit_pieces(itertools.chain([[tokenizer.end_of_text_id]], shards),
                                        tokenizer.vocabulary_size)
        validation_nll = {}
        if k is None:
            validation = _stream(recipe.data, tokenizer, "validation")
            for candidate in SMOOTHING_GRID:
                nll = bigram.with_smoothing(candidate).nll(validation[:-1], validation[1:]).mean()
                validation_nll[candidate] = float(nll)
            k = min(validation_nll, key=validation_nll.get)
        bigram = bigram.with_smoothing(k)
        bigram.save(staging)
        by_k = {str(c): v for c, v in validation_nll.items()}
        staged.write_config({
            "model": {"architecture": "bigram", "vocabulary_size": tokenizer.vocabulary_size,
                      "k": k, "validation_nll_by_k": by_k},
            "data": data,
        })
    return bigram


def _check_bigram_run_directory(run_dir, data):
    """Refuses a `run_dir` that holds anything but a bigram fitted on the same `[data]`."""
    run = RunDirectory(run_dir)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"{run_dir} is a file, not a run directory; choose another --run-dir.")
    if not os.path.isdir(run_dir) or not any(not n.startswith(".") for n in os.listdir(run_dir)):
        return
    if not (run.is_bigram() and run.is_run()):
        raise ValueError(
            f"{run_dir} already holds something other than a bigram run (a bigram fit replaces "
            "its whole run directory); choose another --run-dir."
        )
    stored = run.read_config().get("data", {})
    try:
        stored = DataConfig.from_dict(stored).to_dict()
    except ValueError:
        pass  # written by another schema: compare what is there
    differing = config_differences(identity({"data": stored}), identity({"data": data}))
    if differing:
        raise ValueError(
            f"{run_dir} holds a bigram fitted on other data: {'; '.join(differing)}. Use another "
            "--run-dir, or the same [data] to fit it again."
        )


def train_recurrent(recipe, run_dir, verbose="auto"):
    """Trains the recipe as the GRU baseline (`[model] kind = "gru"`); returns the `TrainResult`."""
    return train(dataclasses.replace(recipe, model_kind="gru"), run_dir, verbose=verbose)
