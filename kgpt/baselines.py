"""Baselines the field starts from: an add-k bigram model and a GRU with attention over its past.

- `BigramModel`: `P(b | a) = (count(a, b) + k) / (count(a) + k V)`, counted on the training
  split's token stream (same tokenizer and stream as the GPT: documents followed by
  `<|endoftext|>`, one in front). `k` is chosen on the validation split unless given. Saved as a
  run directory that `kgpt evaluate` reads: `bigram.json` + `bigram_counts.npy` (no pickle),
  `tokenizer/`, `config.json`.
- `RecurrentLanguageModel`: embeddings -> GRU layers -> causal multi-head attention over the GRU's
  own states -> tied output head; a registered Keras model trained by `kgpt.train.train` (same
  data pipeline, schedule, optimiser and callbacks as the GPT) through `train_recurrent`.

Command line (the `[model]` section of the recipe sizes the GRU; the bigram ignores it):

    kgpt baseline bigram pipelines/shakespeare_char.toml --run-dir checkpoints/bigram
    kgpt baseline gru pipelines/shakespeare_char.toml --run-dir checkpoints/gru
    kgpt evaluate checkpoints/shakespeare_char checkpoints/gru checkpoints/bigram
"""

import json
import os

import keras
import numpy as np
from keras import ops

from kgpt.config import ModelConfig

BIGRAM_FILENAME = "bigram.json"
BIGRAM_COUNTS_FILENAME = "bigram_counts.npy"
SMOOTHING_GRID = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)


class BigramModel:
    """Add-k smoothed bigram counts over token ids, stored sparsely.

    Args:
        keys: sorted int64 `a * V + b` of every bigram seen.
        counts: int64 counts of those bigrams.
        vocabulary_size: `V`.
        k: the add-k smoothing constant (> 0).

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
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocabulary_size):
            raise ValueError(
                f"Token ids must be in [0, {vocabulary_size}); found {tokens.min()}..{tokens.max()}."
            )
        keys, counts = np.unique(tokens[:-1] * vocabulary_size + tokens[1:], return_counts=True)
        return cls(keys, counts, vocabulary_size, k)

    def with_smoothing(self, k):
        return BigramModel(self.keys, self.counts, self.vocabulary_size, k)

    @property
    def parameters(self):
        """Entries of the conditional probability table it represents (`V * V`)."""
        return self.vocabulary_size**2

    def _pair_counts(self, previous, following):
        query = np.asarray(previous, np.int64) * self.vocabulary_size + np.asarray(following, np.int64)
        position = np.minimum(np.searchsorted(self.keys, query), max(len(self.keys) - 1, 0))
        found = self.keys[position] == query if len(self.keys) else np.zeros(query.shape, bool)
        return np.where(found, self.counts[position] if len(self.keys) else 0, 0)

    def probability(self, previous, following):
        """`P(following | previous)`, element-wise over arrays of ids."""
        pair = self._pair_counts(previous, following)
        total = self.row_totals[np.asarray(previous, np.int64)]
        return (pair + self.k) / (total + self.k * self.vocabulary_size)

    def nll(self, x, y):
        """Per-position negative log-likelihood (nats) of targets `y` after inputs `x`."""
        return -np.log(self.probability(x, y))

    def save(self, run_dir):
        os.makedirs(run_dir, exist_ok=True)
        np.save(os.path.join(run_dir, BIGRAM_COUNTS_FILENAME), np.stack([self.keys, self.counts], 1))
        with open(os.path.join(run_dir, BIGRAM_FILENAME), "w", encoding="utf-8") as file:
            json.dump({"vocabulary_size": self.vocabulary_size, "k": self.k,
                       "counts_file": BIGRAM_COUNTS_FILENAME}, file, indent=2)

    @classmethod
    def load(cls, run_dir):
        with open(os.path.join(run_dir, BIGRAM_FILENAME), encoding="utf-8") as file:
            meta = json.load(file)
        table = np.load(os.path.join(run_dir, meta["counts_file"]), allow_pickle=False)
        return cls(table[:, 0], table[:, 1], meta["vocabulary_size"], meta["k"])


def is_bigram_run(run_dir):
    return os.path.isfile(os.path.join(run_dir, BIGRAM_FILENAME))


def _stream(data, tokenizer, split):
    from kgpt.data import scoring_tokens

    # int64: the bigram keys are `a * V + b`, beyond int32 for GPT-2's vocabulary.
    return scoring_tokens(data, tokenizer, split).astype(np.int64)


def train_bigram(recipe, run_dir, k=None, tokenizer_from=None):
    """Fits the add-k bigram baseline on a recipe's training split into a run directory.

    Args:
        recipe: a `kgpt.train.Recipe` (only `[data]` is used).
        run_dir: the run directory to write.
        k: the smoothing constant; None picks the best of `SMOOTHING_GRID` on validation.
        tokenizer_from: a run directory whose tokenizer to use (default: build it from `[data]`,
            as `kgpt train` does).

    Returns:
        The `BigramModel`.
    """
    from kgpt.data import build_tokenizer
    from kgpt.saving import staged_directory
    from kgpt.train import CONFIG_FILENAME, TOKENIZER_DIRECTORY, load_matching_tokenizer

    data = json.loads(json.dumps(recipe.data.to_dict()))  # tuples -> lists, as stored
    _check_bigram_run_directory(run_dir, data)  # before anything is fitted or written
    tokenizer = (
        load_matching_tokenizer(tokenizer_from, recipe.data, "--tokenizer-from")
        if tokenizer_from else None
    )
    # Fitted into a sibling folder that replaces run_dir at the end: never a half-written run.
    with staged_directory(run_dir) as staging:
        tokenizer_dir = os.path.join(staging, TOKENIZER_DIRECTORY)
        if tokenizer is None:
            tokenizer = build_tokenizer(recipe.data, tokenizer_dir)
        else:
            tokenizer.save(tokenizer_dir)
        stream = _stream(recipe.data, tokenizer, "train")
        bigram = BigramModel.fit(stream, tokenizer.vocabulary_size)
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
        config = {
            "model": {"architecture": "bigram", "vocabulary_size": tokenizer.vocabulary_size,
                      "k": k, "validation_nll_by_k": by_k},
            "data": data,
        }
        with open(os.path.join(staging, CONFIG_FILENAME), "w", encoding="utf-8") as file:
            json.dump(config, file, indent=2, sort_keys=True)
    return bigram


def _check_bigram_run_directory(run_dir, data):
    """Refuses a `run_dir` that holds anything but a bigram fitted on the same `[data]`."""
    from kgpt.train import CONFIG_FILENAME, config_differences

    if not os.path.isdir(run_dir) or not os.listdir(run_dir):
        return
    config_path = os.path.join(run_dir, CONFIG_FILENAME)
    if not is_bigram_run(run_dir) or not os.path.isfile(config_path):
        raise ValueError(
            f"{run_dir} already holds something other than a bigram run (a bigram fit replaces "
            "its whole run directory); choose another --run-dir."
        )
    with open(config_path, encoding="utf-8") as file:
        differing = config_differences(json.load(file).get("data", {}), data)
    if differing:
        raise ValueError(
            f"{run_dir} holds a bigram fitted on other data: {'; '.join(differing)}. Use another "
            "--run-dir, or the same [data] to fit it again."
        )


@keras.saving.register_keras_serializable(package="kgpt")
class RecurrentLanguageModel(keras.Model):
    """GRU language model with causal attention over its own past states (pre-Transformer LM).

    token embedding -> dropout -> `num_layers` GRUs -> x + MultiHeadAttention(x, causal) ->
    LayerNorm -> tied head (logits = x @ token_embedding^T, float32). The attention lets each
    position look back at every earlier GRU state instead of only the last one.

    Args:
        vocabulary_size, sequence_length, num_layers, num_heads, hidden_dim, dropout,
        layer_norm_epsilon, initializer_range: as in `ModelConfig` (`sequence_length` is the
            training and evaluation window; the GRU itself has no length limit).

    Call args:
        token_ids: int `(batch, length)`.

    Returns:
        float32 logits `(batch, length, vocabulary_size)`.

    Example:
        model = RecurrentLanguageModel.from_config_object(ModelConfig(vocabulary_size=65, sequence_length=64))
    """

    def __init__(self, vocabulary_size, sequence_length, num_layers=1, num_heads=4, hidden_dim=128,
                 dropout=0.0, layer_norm_epsilon=1e-5, initializer_range=0.02, **kwargs):
        super().__init__(**kwargs)
        self.model_config = ModelConfig(
            vocabulary_size=vocabulary_size, sequence_length=sequence_length,
            num_layers=num_layers, num_heads=num_heads, hidden_dim=hidden_dim, dropout=dropout,
            layer_norm_epsilon=layer_norm_epsilon, initializer_range=initializer_range,
        )
        initializer = keras.initializers.RandomNormal(stddev=initializer_range)
        self.token_embedding = keras.layers.Embedding(
            vocabulary_size, hidden_dim, embeddings_initializer=initializer,
            dtype=self.dtype_policy, name="token_embedding",
        )
        self.embedding_dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)
        self.recurrent_layers = [
            keras.layers.GRU(hidden_dim, return_sequences=True, dropout=dropout,
                             dtype=self.dtype_policy, name=f"gru_{index}")
            for index in range(num_layers)
        ]
        self.attention = keras.layers.MultiHeadAttention(
            num_heads, hidden_dim // num_heads, dropout=dropout, kernel_initializer=initializer,
            dtype=self.dtype_policy, name="attention",
        )
        self.norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="norm"
        )
        self.build((None, sequence_length))

    @classmethod
    def from_config_object(cls, config, **kwargs):
        """Builds from a `ModelConfig`; its GPT-only fields (intermediate_dim, ...) are unused."""
        used = ("vocabulary_size", "sequence_length", "num_layers", "num_heads", "hidden_dim",
                "dropout", "layer_norm_epsilon", "initializer_range")
        return cls(**{name: getattr(config, name) for name in used}, **kwargs)

    def build(self, input_shape):
        hidden_shape = tuple(input_shape) + (self.model_config.hidden_dim,)
        self.token_embedding.build(input_shape)
        for layer in self.recurrent_layers:
            layer.build(hidden_shape)
        self.attention.build(hidden_shape, hidden_shape)
        self.norm.build(hidden_shape)
        self.built = True

    def call(self, token_ids, training=None):
        x = self.embedding_dropout(self.token_embedding(token_ids), training=training)
        for layer in self.recurrent_layers:
            x = layer(x, training=training)  # (batch, length, hidden)
        x = x + self.attention(x, x, use_causal_mask=True, training=training)
        x = ops.cast(self.norm(x), "float32")
        table = ops.cast(self.token_embedding.embeddings, "float32")
        return ops.matmul(x, ops.transpose(table))  # (batch, length, vocabulary)

    def get_config(self):
        config = self.model_config
        return {
            **super().get_config(),
            **{name: getattr(config, name) for name in (
                "vocabulary_size", "sequence_length", "num_layers", "num_heads", "hidden_dim",
                "dropout", "layer_norm_epsilon", "initializer_range")},
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def train_recurrent(recipe, run_dir, verbose="auto"):
    """Trains `RecurrentLanguageModel` with `kgpt.train.train`: same data, schedule, callbacks.

    The recipe's `[model]` sizes it (`num_layers` GRU layers of width `hidden_dim`, `num_heads`
    attention heads). It prints no text samples (`kgpt.callbacks.SampleText` needs the GPT's
    cached decoder), and its run directory keeps the recipe as given.

    Returns:
        The `kgpt.train.TrainResult`.
    """
    from kgpt.train import train

    return train(recipe, run_dir, verbose=verbose, build_model=RecurrentLanguageModel.from_config_object)

