"""Perplexity evaluation: sliding-window scoring of a whole split, per-run metrics, one table.

`evaluate_runs` scores run directories (GPT, GRU or bigram), each with its own tokenizer, on the
same text (`kgpt.data.scoring_tokens`); the metrics are the README's (perplexity, bits per byte, word ppl).
"""

import dataclasses
import math
import os
import shutil
import sys
import time

import numpy as np
import tensorflow as tf

from kgpt.data import corpora
from kgpt.data.config import DataConfig
from kgpt.data.pipeline import scoring_tokens
from kgpt.model.bigram import BigramModel
from kgpt.rundir import RunDirectory
from kgpt.tokenizers.base import tokenizer_kind


@dataclasses.dataclass
class Evaluation:
    """One run scored on one split. `nll` is the total in nats over `tokens` scored tokens."""

    run: str
    model: str
    parameters: int
    corpus: str
    split: str
    context: int
    stride: int
    tokens: int
    bytes: int
    words: int
    nll: float
    seconds: float

    @property
    def perplexity(self):
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self):
        return self.nll / math.log(2) / self.bytes

    @property
    def word_perplexity(self):
        return math.exp(self.nll / self.words)

    @property
    def tokens_per_second(self):
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self):
        metrics = ("perplexity", "bits_per_byte", "word_perplexity", "tokens_per_second")
        return {**dataclasses.asdict(self), **{name: getattr(self, name) for name in metrics}}


def sliding_windows(num_targets, context, stride):
    """Windows of `context` tokens, every `stride`, that score the targets `1..num_targets` once each.

    Returns:
        `[(start, first)]`: inputs are tokens `[start, start + context)`, targets one further;
        positions `>= first` are scored. The last window ends at the last target, so every
        window has `min(context, num_targets)` positions.
    """
    if not 1 <= stride <= context:
        raise ValueError(
            f"stride={stride} must be between 1 and the context length {context}; "
            f"stride={context} scores disjoint windows, smaller strides give more left context."
        )
    length = min(context, num_targets)
    last = num_targets - length
    windows, scored_until = [], 0
    for start in list(range(0, last, stride)) + [last]:
        windows.append((start, scored_until - start))
        scored_until = start + length
    return windows


def score_stream(score, tokens, context, stride, batch_size=8, progress=None):
    """`(nll, count)`: total nats of `tokens[1:]` given their left context, and targets scored.

    Args:
        score: `score(x, y)`: int32 `(batch, length)` inputs and targets to per-position nats.
        batch_size: windows per `score` call; the last batch is padded, so one shape is traced.
        progress: optional `progress(done_windows, total_windows, scored_tokens)`.
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    num_targets = len(tokens) - 1
    if num_targets < 1:
        raise ValueError("The token stream has fewer than 2 tokens; there is nothing to score.")
    windows = sliding_windows(num_targets, context, stride)
    length = min(context, num_targets)
    offsets = np.arange(length)
    total, count = 0.0, 0
    for begin in range(0, len(windows), batch_size):
        batch = windows[begin : begin + batch_size]
        padding = batch_size - len(batch)
        starts = np.array([s for s, _ in batch] + [0] * padding)
        firsts = np.array([f for _, f in batch] + [length] * padding)  # padding scores nothing
        index = starts[:, None] + offsets[None, :]  # (batch, length)
        nll = np.asarray(score(tokens[index], tokens[index + 1]), dtype=np.float64)
        mask = offsets[None, :] >= firsts[:, None]
        total += float(np.sum(nll, where=mask))
        count += int(mask.sum())
        if progress is not None:
            progress(begin + len(batch), len(windows), count)
    return total, count


def keras_scorer(model, jit_compile=False):
    """`score(x, y)` for a Keras model returning `(batch, length, vocabulary)` logits."""

    @tf.function(jit_compile=jit_compile, reduce_retracing=True)
    def nll(x, y):
        logits = tf.cast(model(x, training=False), tf.float32)
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)

    return lambda x, y: nll(tf.constant(x), tf.constant(y)).numpy()


@dataclasses.dataclass
class LoadedRun:
    """What evaluation needs of a run directory: a scorer, its tokenizer and its context."""

    name: str
    model: str
    parameters: int
    context: int
    tokenizer: object
    score: object
    data: dict  # the run's `config.json` data section (empty when absent)


def load_run(run_dir, jit_compile=False):
    """A `LoadedRun` of a directory written by `kgpt train`, `kgpt import-gpt2` or `kgpt baseline`."""
    run = RunDirectory(run_dir)
    tokenizer = run.load_tokenizer()
    data = run.read_config().get("data", {})
    name = os.path.basename(os.path.normpath(run_dir))
    if run.is_bigram():
        bigram = BigramModel.load(run_dir)
        context = data.get("sequence_length", 256)
        return LoadedRun(name, f"bigram (k={bigram.k:g})", bigram.parameters, context, tokenizer,
                         bigram.nll, data)
    model = run.load_model()
    return LoadedRun(
        name, type(model).__name__, model.count_params(), model.model_config.sequence_length,
        tokenizer, keras_scorer(model, jit_compile), data,
    )


def evaluation_data(data, run_data=None, data_dir=None):
    """`(DataConfig, fixed_split)` to evaluate on; `fixed_split` is `"train"` for a text file, else None.

    Args:
        data: a corpus name, a text file path, or None for the run's own corpus.
        run_data: the run's `config.json` data section; its options are kept for the same corpus.
        data_dir: overrides `data.dir`.
    """
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    run_data = {k: v for k, v in (run_data or {}).items() if k in fields}
    relocated = {"dir": data_dir} if data_dir else {}
    if data is None:
        if not run_data:
            raise ValueError(
                "The run directory has no config.json data section; pass --data "
                "(wikitext2, imdb, tinyshakespeare or a text file)."
            )
        data = run_data["corpus"]
    if data in corpora.CORPORA and not corpora.get_corpus(data).needs_files:
        values = {**(run_data if run_data.get("corpus") == data else {"corpus": data}), **relocated}
        kind = tokenizer_kind(values.get("tokenizer", "bpe"))
        if kind.needs_tokenizer_path and not values.get("tokenizer_path"):
            values = {**values, "tokenizer": "bpe"}  # the run's own tokenizer is used anyway
        return DataConfig(**values), None
    if data in corpora.CORPORA and run_data.get("corpus") == data:
        return DataConfig(**{**run_data, **relocated}), None
    if not os.path.isfile(data):
        raise FileNotFoundError(
            f"--data {data!r} is neither a corpus "
            f"({', '.join(n for n, c in corpora.CORPORA.items() if not c.needs_files)}) "
            "nor a text file."
        )
    config = DataConfig(
        corpus="text", files=(os.path.abspath(data),), document_separator="file",
        validation_fraction=0.0,
    )
    return config, "train"


def _count_text(config, split, tokenizer):
    # The text the model scores: normalised as its tokenizer does (lowercase, punctuation).
    num_bytes = words = 0
    normalize = tokenizer.normalization.normalize
    for document in map(normalize, corpora.iter_documents(config, split)):
        num_bytes += len(document.encode("utf-8"))
        words += len(document.split())
    return num_bytes, corpora.count_words(config, split) or words


def _progress_printer(name):
    started, last = time.perf_counter(), [0.0, 0]  # time and length of the last line

    def report(done, total, tokens):
        now = time.perf_counter()
        if now - last[0] < 0.5 and done < total:
            return
        last[0] = now
        rate = tokens / max(now - started, 1e-9)
        counts = f" {done}/{total} windows, {rate:,.0f} tokens/s"
        # The bar takes what the terminal leaves, at most 30 columns: the line never wraps.
        width = max(0, min(30, shutil.get_terminal_size().columns - 1 - len(name) - 4 - len(counts)))
        filled = int(width * done / total)
        line = f"{name}: [{'=' * filled}{'.' * (width - filled)}]{counts}"
        sys.stderr.write("\r" + line.ljust(last[1]))  # blanks what a longer line left
        last[1] = len(line)
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report


def evaluate_run(run, config, split, stride=None, batch_size=8, progress=False):
    """Scores a `LoadedRun` on a split of `config`'s text; `stride` defaults to its context."""
    stride = run.context if stride is None else stride
    tokens = scoring_tokens(config, run.tokenizer, split)
    num_bytes, words = _count_text(config, split, run.tokenizer)
    reporter = _progress_printer(run.name) if progress else None
    started = time.perf_counter()
    nll, count = score_stream(run.score, tokens, run.context, stride, batch_size, reporter)
    return Evaluation(
        run=run.name, model=run.model, parameters=run.parameters, corpus=config.corpus,
        split=split, context=run.context, stride=stride, tokens=count,
        bytes=num_bytes, words=words, nll=nll, seconds=time.perf_counter() - started,
    )


def evaluate_runs(run_dirs, data=None, split=None, stride=None, batch_size=8, data_dir=None,
                  progress=False, jit_compile=False):
    """Scores every run directory on the same split; returns one `Evaluation` per run, in order.

    Args:
        data: a corpus name, a text file, or None for each run's own corpus.
        split: default `test`, or `validation` for corpora without a test split.
        stride: window stride (default: each run's context); at most every run's context.
        data_dir: the corpus directory (overrides the runs' `data.dir`).
        progress, jit_compile: progress bars on stderr; Keras scoring compiled with XLA.

    Example:
        rows = evaluate_runs(["checkpoints/gpt2"], data="wikitext2", stride=512)
        print(format_table(rows))
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1 (e.g. 8).")
    results = []
    for run_dir in run_dirs:
        run = load_run(run_dir, jit_compile=jit_compile)
        config, fixed_split = evaluation_data(data, run.data, data_dir)
        run_split = fixed_split or split or corpora.evaluation_split(config.corpus)
        if stride is not None and stride > run.context:
            raise ValueError(
                f"--stride {stride} exceeds {run.name}'s context of {run.context} tokens; use a "
                f"stride of at most {run.context}."
            )
        results.append(evaluate_run(run, config, run_split, stride, batch_size, progress))
    return results


def format_table(evaluations):
    """A plain-text table: model, parameters, tokens/s, perplexity, bits per byte, word perplexity."""
    header = ("run", "model", "parameters", "tokens", "tokens/s", "perplexity", "bits/byte",
              "word ppl")
    rows = [
        (e.run, e.model, f"{e.parameters:,}", f"{e.tokens:,}", f"{e.tokens_per_second:,.0f}",
         f"{e.perplexity:.3f}", f"{e.bits_per_byte:.4f}", f"{e.word_perplexity:.2f}")
        for e in evaluations
    ]
    # Runs scored on different texts (their own corpora) get a "data" column.
    texts = list(dict.fromkeys((e.corpus, e.split, e.bytes, e.words) for e in evaluations))
    if len(texts) > 1:
        header = header[:2] + ("data",) + header[2:]
        rows = [row[:2] + (f"{e.corpus} {e.split}",) + row[2:] for row, e in zip(rows, evaluations)]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = []
    if evaluations:
        strides = ", ".join(map(str, sorted({e.stride for e in evaluations})))
        described = "; ".join(
            f"{corpus} {split}: {num_bytes:,} bytes, {words:,} words"
            for corpus, split, num_bytes, words in texts
        )
        lines.append(f"{described}; stride {strides}")
    left = 3 if len(texts) > 1 else 2  # text columns, left-aligned
    for row in [header] + rows:
        lines.append("  ".join(
            cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
        ))
    return "\n".join(lines)
