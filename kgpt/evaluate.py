"""Perplexity evaluation: sliding-window scoring of a whole split, per-run metrics, one table.

`evaluate_runs(run_dirs, data, split)` scores each run directory (a trained or imported GPT, the
recurrent baseline, or the bigram baseline) on the same text, tokenized with each run's own
tokenizer, and returns `Evaluation`s; `format_table` prints them side by side.

The text is the split's documents, each followed by `<|endoftext|>`, with one `<|endoftext|>`
in front so that the first token is scored too (GPT-2's convention). Every token is scored once,
by `sliding_windows`: windows of the model's context `L` start every `stride` tokens and score
only the targets the previous window did not, so each target sees at least `L - stride` tokens of
left context (Hugging Face's "perplexity of fixed-length models"). `stride = L` is plain chunked
evaluation, the windows `kgpt.data` trains and validates on. Metrics, from the total negative
log-likelihood `NLL` (nats) over all scored tokens:

- token perplexity `exp(NLL / tokens)`: depends on the tokenizer;
- bits per byte `NLL / ln 2 / bytes` (UTF-8 bytes of the documents): tokenizer-independent;
- word-level perplexity `exp(NLL / words)`, words = whitespace-separated words of the documents
  (WikiText's convention): tokenizer-independent.
"""

import dataclasses
import math
import os
import sys
import time

import numpy as np
import tensorflow as tf

from kgpt import corpora
from kgpt.baselines import BigramModel
from kgpt.config import DataConfig
from kgpt.data import scoring_tokens
from kgpt.rundir import RunDirectory
from kgpt.tokenizer import tokenizer_kind


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
        return {
            **dataclasses.asdict(self),
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "word_perplexity": self.word_perplexity,
            "tokens_per_second": self.tokens_per_second,
        }


def sliding_windows(num_targets, context, stride):
    """The windows that score `num_targets` targets once each.

    Args:
        num_targets: `M`, the targets `1..M` of a stream of `M + 1` tokens.
        context: `L`, tokens per window.
        stride: tokens between window starts, `1 <= stride <= L`.

    Returns:
        A list of `(start, first)`: the window's inputs are tokens `[start, start + L)`, its
        targets tokens `[start + 1, start + L + 1)`, and it scores window positions `>= first`.
        The last window ends exactly at the last target (it starts earlier if needed), so every
        window has `min(L, M)` positions.
    """
    if not 1 <= stride <= context:
        raise ValueError(
            f"stride={stride} must be between 1 and the context length {context}; "
            f"stride={context} scores disjoint windows, smaller strides give more left context."
        )
    length = min(context, num_targets)
    last = num_targets - length
    starts = list(range(0, last, stride)) + [last]
    windows, scored_until = [], 0
    for start in starts:
        windows.append((start, scored_until - start))
        scored_until = start + length
    return windows


def score_stream(score, tokens, context, stride, batch_size=8, progress=None):
    """Total negative log-likelihood of `tokens[1:]` given their left context, by sliding windows.

    Args:
        score: `score(x, y) -> nll`, int32 `(batch, length)` inputs and targets to float
            `(batch, length)` per-position negative log-likelihoods in nats.
        tokens: int `[M + 1]` token stream.
        context: window length (the model's `sequence_length`).
        stride: see `sliding_windows`.
        batch_size: windows per `score` call (the last batch is padded with masked windows, so
            `score` always sees one shape).
        progress: optional `progress(done_windows, total_windows, scored_tokens)` callback.

    Returns:
        `(nll, count)`: total nats (float) and number of scored targets (`M`).

    Example:
        nll, count = score_stream(score, stream, context=256, stride=128)
        perplexity = math.exp(nll / count)
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
    """Loads a run directory (GPT, recurrent or bigram baseline) for evaluation.

    Args:
        run_dir: a directory written by `kgpt train`, `kgpt import-gpt2` or `kgpt baseline`.
        jit_compile: compile the Keras scorer with XLA.

    Returns:
        A `LoadedRun`.
    """
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
    """The `DataConfig` to evaluate on.

    Args:
        data: a corpus name (`wikitext2`, `imdb`, `tinyshakespeare`, ...), a text file path, or
            None for the run's own corpus.
        run_data: the run's `config.json` data section; its corpus options (directory, IMDB
            validation size, lowercasing, ...) are kept when it names the same corpus.
        data_dir: overrides the data directory (`data.dir`).

    Returns:
        `(DataConfig, fixed_split)`: `fixed_split` is `"train"` for a text file (the whole file
        is scored, whatever the split), else None.
    """
    run_data = dict(run_data or {})
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    run_data = {k: v for k, v in run_data.items() if k in fields}
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


def _count_text(config, split):
    num_bytes = words = 0
    for document in corpora.iter_documents(config, split):
        num_bytes += len(document.encode("utf-8"))
        words += len(document.split())
    return num_bytes, words


def _progress_printer(name, stream=None):
    stream = stream or sys.stderr
    started, last = time.perf_counter(), [0.0]

    def report(done, total, tokens):
        now = time.perf_counter()
        if now - last[0] < 0.5 and done < total:
            return
        last[0] = now
        width = 30
        filled = int(width * done / total)
        rate = tokens / max(now - started, 1e-9)
        stream.write(
            f"\r{name}: [{'=' * filled}{'.' * (width - filled)}] {done}/{total} windows, "
            f"{rate:,.0f} tokens/s"
        )
        if done == total:
            stream.write("\n")
        stream.flush()

    return report


def evaluate_run(run, config, split, stride=None, batch_size=8, progress=False):
    """Scores one `LoadedRun` on a split.

    Args:
        run: from `load_run`.
        config: the `DataConfig` of the text (see `evaluation_data`).
        split: `"train"`, `"validation"` or `"test"`.
        stride: window stride; default the run's context (disjoint windows).
        batch_size: windows per batch.
        progress: print a progress bar on stderr.

    Returns:
        An `Evaluation`.
    """
    stride = run.context if stride is None else stride
    tokens = scoring_tokens(config, run.tokenizer, split)
    num_bytes, words = _count_text(config, split)
    reporter = _progress_printer(run.name) if progress else None
    started = time.perf_counter()
    nll, count = score_stream(run.score, tokens, run.context, stride, batch_size, reporter)
    seconds = time.perf_counter() - started
    return Evaluation(
        run=run.name, model=run.model, parameters=run.parameters, corpus=config.corpus,
        split=split, context=run.context, stride=stride, tokens=count,
        bytes=num_bytes, words=words, nll=nll, seconds=seconds,
    )


def evaluate_runs(run_dirs, data=None, split=None, stride=None, batch_size=8, data_dir=None,
                  progress=False, jit_compile=False):
    """Scores every run directory on the same split; see the module docstring for the metrics.

    Args:
        run_dirs: run directories (GPT, imported GPT-2, recurrent or bigram baselines).
        data: `wikitext2`, `imdb`, `tinyshakespeare`, ..., a text file, or None for each run's
            own corpus.
        split: default `test`, or `validation` for corpora without a test split.
        stride: window stride (default: each run's context); must not exceed any run's context.
        batch_size: windows per batch.
        data_dir: the corpus directory (overrides the runs' `data.dir`).
        progress: progress bars on stderr.
        jit_compile: compile Keras scoring with XLA.

    Returns:
        A list of `Evaluation`, one per run, in order.

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
    # Runs scored on their own corpora name theirs in a "data" column, and the first line
    # lists every text scored.
    texts = list(dict.fromkeys((e.corpus, e.split, e.bytes, e.words) for e in evaluations))
    if len(texts) > 1:
        header = header[:2] + ("data",) + header[2:]
        rows = [row[:2] + (f"{e.corpus} {e.split}",) + row[2:] for row, e in zip(rows, evaluations)]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = []
    if evaluations:
        strides = sorted({e.stride for e in evaluations})
        described = "; ".join(
            f"{corpus} {split}: {num_bytes:,} bytes, {words:,} words"
            for corpus, split, num_bytes, words in texts
        )
        lines.append(f"{described}; stride {', '.join(map(str, strides))}")
    left = 3 if len(texts) > 1 else 2  # text columns, left-aligned
    for row in [header] + rows:
        cells = zip(row, widths)
        lines.append("  ".join(
            cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(cells)
        ))
    return "\n".join(lines)
