"""Baselines: an add-k bigram model (`train_bigram`) and the GRU with attention (`train_recurrent`).

The bigram is counted on the GPT's training token stream and saved, without pickle, as a run
directory `kgpt evaluate` reads; the GRU (`kgpt.model.recurrent`) is the recipe with `[model] kind = "gru"`.
"""

import dataclasses
import itertools
import os

import numpy as np

from kgpt import files
from kgpt.data.config import DataConfig
from kgpt.data.pipeline import scoring_tokens, tokenize_corpus
from kgpt.data.run_tokenizer import build_tokenizer, load_matching_tokenizer
from kgpt.model.bigram import BigramModel
from kgpt.recipe import config_differences, identity
from kgpt.rundir import RunDirectory
from kgpt.training.train import train

SMOOTHING_GRID = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)


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
