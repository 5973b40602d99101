"""Log-probabilities of tokens: the graph function every decode path records them with
(`token_logprobs`), the prompt's own in one forward pass (`prompt_logprobs`), and `TokenLogprob`,
what the text interfaces return.

They are the model's: `log_softmax` of its logits, before penalties, temperature and filters change
what is drawn (vLLM's default), so a text scores the same whatever the sampling options.
"""

import dataclasses
import typing

import numpy as np
import tensorflow as tf

# Alternatives per token at most, as OpenAI's completions API allows.
MAX_LOGPROBS = 5


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One token with its log-probability and the most likely tokens at its position.

    Args:
        token_id: the token.
        text: its text alone (a token that ends inside a UTF-8 character has U+FFFD).
        logprob: its natural log-probability given the tokens before it; None for a prompt's first
            token, which nothing before it predicts.
        top: `(token_id, text, logprob)` of the most likely tokens at its position, best first, as
            many as asked (none for a prompt's first token).
    """

    token_id: int
    text: str
    logprob: float | None
    top: tuple = ()

    def to_json(self):
        """`{token, token_id, logprob, top: [{token, token_id, logprob}]}` (`kgpt generate --json`)."""
        return {"token": self.text, "token_id": self.token_id, "logprob": self.logprob,
                "top": [{"token": text, "token_id": token_id, "logprob": logprob}
                        for token_id, text, logprob in self.top]}


def format_logprobs(tokens):
    """`TokenLogprob`s as a table for people: per token its text (a Python literal, so spaces and
    newlines show), log-probability and the likeliest tokens."""
    lines = ["  token       logprob  likeliest"]
    for token in tokens:
        top = "  ".join(f"{text!r} {logprob:.3f}" for _, text, logprob in token.top)
        logprob = "" if token.logprob is None else f"{token.logprob:.3f}"
        lines.append(f"  {token.text!r:10} {logprob:>8}  {top}".rstrip())
    return "\n".join(lines)


def check_logprobs(logprobs):
    """`logprobs` (None: none; 0 to `MAX_LOGPROBS`: the chosen token's and this many alternatives)
    as an int or None; `ValueError` otherwise."""
    if logprobs is None:
        return None
    if isinstance(logprobs, bool) or not isinstance(logprobs, (int, np.integer)) or not (
            0 <= logprobs <= MAX_LOGPROBS):
        raise ValueError(
            f"logprobs={logprobs!r} must be an integer from 0 to {MAX_LOGPROBS}: the alternatives "
            "returned per token besides the chosen one (leave it out for none)."
        )
    return int(logprobs)


class TokenLogprobs(typing.NamedTuple):
    """Log-probabilities in a graph, for positions of any leading shape `S` (`(batch,)` for one
    step, `(batch, length)` for a row).

    Args:
        chosen: float32 `S`, the log-probability of the token at each position.
        top_ids: int32 `S + (k,)`, the `k = min(MAX_LOGPROBS, vocabulary)` likeliest tokens there.
        top: float32 `S + (k,)`, their log-probabilities, best first.
    """

    chosen: typing.Any
    top_ids: typing.Any
    top: typing.Any


def token_logprobs(logits, chosen):
    """`TokenLogprobs` of the tokens `chosen` (int32 `S`) under `logits` (float `S + (vocabulary,)`)."""
    log_probabilities = tf.nn.log_softmax(tf.cast(logits, tf.float32))
    chosen = tf.cast(chosen, tf.int32)
    picked = tf.gather(log_probabilities, chosen[..., None], batch_dims=chosen.shape.rank)[..., 0]
    top, top_ids = tf.math.top_k(log_probabilities, k=min(MAX_LOGPROBS, log_probabilities.shape[-1]))
    return TokenLogprobs(picked, top_ids, top)


def empty_logprobs(batch_shape, vocabulary_size):
    """Zeros in the shape of `token_logprobs`' outputs for positions `batch_shape` (what a step
    returns when none are asked for)."""
    k = min(MAX_LOGPROBS, vocabulary_size)
    top_shape = tf.concat([batch_shape, [k]], 0)
    return TokenLogprobs(tf.zeros(batch_shape), tf.zeros(top_shape, tf.int32), tf.zeros(top_shape))


def prompt_logprobs(model, token_ids):
    """The `TokenLogprobs` of each prompt token given the ones before it, in one forward pass.

    Args:
        model: a causal Keras model, token ids `(batch, length)` -> logits `(batch, length, vocabulary)`.
        token_ids: int32 `(batch, length)`, right-padded (what follows a row's end is not used by
            its tokens, the model being causal).

    Returns:
        `TokenLogprobs` of shape `(batch, length)`; position 0 (no prediction) is zeros.
    """
    token_ids = tf.cast(token_ids, tf.int32)
    logits = tf.cast(model(token_ids), tf.float32)[:, :-1]  # position i predicts token i + 1
    scored = token_logprobs(logits, token_ids[:, 1:])
    return TokenLogprobs(*(
        tf.concat([tf.zeros_like(value[:, :1]), value], axis=1) for value in scored
    ))


def logprob_spans(recorded, starts, counts, width, k):
    """`TokenLogprobs` of `counts` positions from `starts` in each row of `(batch, length)` ones,
    padded with zeros to `width`, `k` alternatives each (graph ops; `width` and `k` may be tensors)."""
    positions = starts[:, None] + tf.range(width)[None, :]
    valid = tf.range(width)[None, :] < counts[:, None]
    positions = tf.where(valid, positions, 0)
    chosen, top_ids, top = (tf.gather(value, positions, batch_dims=1) for value in recorded)
    return TokenLogprobs(
        tf.where(valid, chosen, 0.0),
        tf.where(valid[:, :, None], top_ids, 0)[:, :, :k],
        tf.where(valid[:, :, None], top, 0.0)[:, :, :k],
    )


def records(rows, row_logprobs, k, texts, first_is_prompt=False):
    """A tuple of `TokenLogprob` per row.

    Args:
        rows: lists of token ids.
        row_logprobs: per row, NumPy `TokenLogprobs` whose first `len(row)` positions are its tokens'.
        k: alternatives kept per token (0 to `MAX_LOGPROBS`).
        texts: `texts(ids)`: each token id's text alone (one call for every id of every row).
        first_is_prompt: each row starts a prompt: its first token's log-probability is None.
    """
    tops = [np.asarray(recorded.top_ids)[: len(row), :k].tolist()
            for row, recorded in zip(rows, row_logprobs)]
    ids = sorted({t for row in rows for t in row} | {t for top in tops for ts in top for t in ts})
    text_of = dict(zip(ids, texts(ids))) if ids else {}
    result = []
    for row, recorded, top_ids in zip(rows, row_logprobs, tops):
        tokens = []
        for position, (token, top) in enumerate(zip(row, top_ids)):
            if first_is_prompt and position == 0:
                tokens.append(TokenLogprob(token, text_of[token], None))
                continue
            alternatives = tuple((t, text_of[t], float(v)) for t, v in zip(top, recorded.top[position]))
            tokens.append(TokenLogprob(token, text_of[token], float(recorded.chosen[position]), alternatives))
        result.append(tuple(tokens))
    return result
