"""The add-k smoothed bigram baseline (`BigramModel`): sparse counts over token ids, saved without
pickle as `bigram.json` + `bigram_counts.npy` in a run directory (`kgpt baseline bigram`)."""

import json
import os

import numpy as np

BIGRAM = "bigram.json"
BIGRAM_COUNTS = "bigram_counts.npy"


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
