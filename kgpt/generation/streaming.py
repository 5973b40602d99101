"""Streaming: a token-by-token driver for in-process models, and text that grows piece by piece.

`kgpt.generation.decoding.decode` runs a whole continuation as one graph, so nothing is seen before it ends.
`StepDecoder` drives the same `kgpt.generation.decoding.prefill` and `step` (cache, per-position seeds, and
past the context the rebuilds of the cache) compiled, from Python, and yields each token as it is
produced; `stream_pieces` turns tokens into `Piece`s, whose text (`TextDeltas`) never splits a
UTF-8 character. An export streams through the same step (`SavedModelGenerator`, in
`kgpt.serving.saved_model_generator`).
"""

import dataclasses
import functools

import numpy as np
import tensorflow as tf

from kgpt.generation.decoding import (
    check_jit_compile,
    check_max_new_tokens,
    check_prompt_length,
    check_window,
    draw,
    has_penalties,
    prefill,
    step,
)
from kgpt.generation.logprobs import TokenLogprobs
from kgpt.generation.logprobs import records as logprob_records
from kgpt.generation.sampling import SamplingOptions

_REPLACEMENT = "\ufffd"


@dataclasses.dataclass(frozen=True)
class Piece:
    """What one step added to one streamed continuation.

    Args:
        index: which continuation of the prompt (0 to `num_return_sequences - 1`).
        text: the text added (may be empty: a token that ends inside a UTF-8 character).
        token_count: tokens of this continuation so far (end-of-text not counted).
        prompt_token_count: the prompt's tokens as decoded (after any truncation).
        finish_reason: on a continuation's last piece, "stop" (end-of-text) or "length"
            (`max_new_tokens` reached); None before.
        logprobs: with `logprobs` asked for, the `kgpt.generation.logprobs.TokenLogprob` of the
            token this step added (none for end-of-text); else None.
    """

    index: int
    text: str
    token_count: int
    prompt_token_count: int
    finish_reason: str | None = None
    logprobs: tuple | None = None


class TextDeltas:
    """The new part of a growing text, holding back a trailing partial character.

    Detokenized text marks an incomplete UTF-8 sequence at its end with U+FFFD, which the next
    token may complete; such a tail is held until it is complete or the text is final.

    Example:
        deltas = TextDeltas()
        deltas.update("ca"), deltas.update("caf\ufffd"), deltas.update("café", final=True)  # "ca", "f", "é"
    """

    def __init__(self):
        self.sent = ""

    def update(self, text, final=False):
        """The part of `text` past what was sent (text must extend it), stable part only unless final."""
        stable = text if final else text.rstrip(_REPLACEMENT)
        if len(stable) <= len(self.sent) or not stable.startswith(self.sent):
            return ""
        piece, self.sent = stable[len(self.sent):], stable
        return piece


def padded_rows(rows):
    """Lists of token ids as int32 `(ids, lengths)`: `(rows, longest)` right-padded with 0, `(rows,)`."""
    lengths = np.array([len(row) for row in rows], np.int32)
    ids = np.zeros((len(rows), int(lengths.max(initial=0))), np.int32)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = row
    return ids, lengths


class RowTexts:
    """The texts of growing rows of token ids, all rows in one compiled call per step.

    A streamed continuation is detokenized again after every token; as eager TensorFlow ops that
    cost ~20 ms a call (ragged tensors built op by op), as one `tf.function` call well under 1 ms.
    Tokenizers that cannot run in a graph (tiktoken's larger encodings) detokenize eagerly.

    Example:
        RowTexts(tokenizer)([[5, 6], []])  # ["ab", ""]
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._compiled = None
        if tokenizer.graph_compatible:
            specs = [tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32)]
            self._compiled = tf.function(self._texts, input_signature=specs)

    def _texts(self, ids, lengths):
        return self.tokenizer.detokenize(tf.RaggedTensor.from_tensor(ids, lengths=lengths))

    def __call__(self, rows):
        """A `str` per row of ids (lists of ints)."""
        if self._compiled is None:
            texts = self.tokenizer.detokenize(tf.ragged.constant(rows, dtype=tf.int32, ragged_rank=1))
        else:
            texts = self._compiled(*padded_rows(rows))
        return [text.decode("utf-8") for text in texts.numpy()]


def stream_pieces(steps, texts, end_of_text_id, max_new_tokens, prompt_token_count, num_rows,
                  logprobs=None):
    """The `Piece`s of `num_rows` continuations, one per live row and token step, until every row
    has ended (end-of-text, or `max_new_tokens` tokens); closing it closes `steps`.

    Args:
        steps: an iterator (a generator) of `(tokens, token_logprobs)` per new position: int32
            `(num_rows,)`, and NumPy `TokenLogprobs` of shape `(num_rows,)` (None without logprobs).
        texts: `texts(rows)`: the `str` of each list of token ids (`RowTexts`, an export's signature).
        prompt_token_count: the prompt's tokens as decoded, reported on every piece.
        logprobs: alternatives per token in each piece's `TokenLogprob`s (None: no logprobs).

    Example:
        for piece in stream_pieces(StepDecoder(model, 32)([5, 6], 10), RowTexts(tokenizer), 0, 10, 2, 1):
            print(piece.text, end="")
    """
    rows = [[] for _ in range(num_rows)]
    deltas = [TextDeltas() for _ in rows]
    finished = [False] * num_rows
    try:
        for count, (tokens, recorded) in enumerate(steps, 1):
            live = [index for index in range(num_rows) if not finished[index]]
            reasons, last = {}, count == max_new_tokens
            for index in live:
                token = int(tokens[index])
                if token != end_of_text_id:
                    rows[index].append(token)
                reasons[index] = "stop" if token == end_of_text_id else "length" if last else None
            records = {}
            if logprobs is not None:
                kept = [index for index in live if int(tokens[index]) != end_of_text_id]
                # Each row's one token, with `logprobs.records` (one text lookup for all its ids).
                one = [TokenLogprobs(*(value[index : index + 1] for value in recorded)) for index in kept]
                token_texts = lambda ids: texts([[token] for token in ids])  # noqa: E731
                records = dict(zip(kept, logprob_records([[int(tokens[index])] for index in kept], one,
                                                         logprobs, token_texts)))
            for index, text in zip(live, texts([rows[index] for index in live])):
                finished[index] = reasons[index] is not None
                piece = deltas[index].update(text, final=finished[index])
                token_logprobs = None if logprobs is None else records.get(index, ())
                yield Piece(index, piece, len(rows[index]), prompt_token_count, reasons[index],
                            token_logprobs)
            if all(finished):
                return
    finally:
        steps.close()


class StepDecoder:
    """Yields the tokens of `decode` one step at a time, for a prompt repeated on `num_rows` rows.

    A Python driver of `decoding.prefill` and `decoding.step`, the functions `decode`'s
    loop runs: token `p` (its position in prompt + continuation) is drawn with the stateless seed
    `[seed, p]`, and past the context the cache is rebuilt from the last `window` tokens where
    `decode` rebuilds it, so greedy and seeded sampling give `decode`'s tokens.

    Args:
        model: a `kgpt.model.GPT`, or a causal model without a cache (through `CausalRecomputation`).
        sequence_length: the model's context.
        jit_compile: compile the one-token step (and the first draw) with XLA; the prefill runs
            without: its prompt length varies, and XLA would compile it again for each.
        window: tokens kept when generation passes the context (default half of it, as `decode`).

    Example:
        for tokens in StepDecoder(model, 32)([5, 6, 7], 10):  # tokens: int32 (num_rows,)
            print(tokens)
    """

    def __init__(self, model, sequence_length, end_of_text_id=-1, jit_compile=False, window=None):
        self._model = check_jit_compile(model, jit_compile)
        self.window = check_window(window, sequence_length)
        self.sequence_length = sequence_length
        self.end_of_text_id = end_of_text_id
        # One function per value of the Python bools `penalties` (without them no counts are kept)
        # and `logprobs`, made lazily: each traces for its shapes only.
        self._prefill = {penalties: tf.function(
            functools.partial(prefill, self._model, window=self.window, penalties=penalties),
            reduce_retracing=True,
        ) for penalties in (False, True)}
        # Draws are made where `decode` makes them, under XLA or not: their random numbers differ.
        self._first = {logprobs: tf.function(
            functools.partial(draw, logprobs=logprobs), jit_compile=jit_compile, reduce_retracing=True,
        ) for logprobs in (False, True)}
        self._step = {logprobs: tf.function(
            functools.partial(step, self._model, logprobs=logprobs), jit_compile=jit_compile,
            reduce_retracing=True,
        ) for logprobs in (False, True)}

    def __call__(self, prompt_ids, max_new_tokens, sampling=None, num_rows=1, logprobs=False):
        """Yields `(tokens, token_logprobs)` per new position: int32 `(num_rows,)` and, with
        `logprobs`, NumPy `TokenLogprobs` of shape `(num_rows,)` (else None), until every row has
        produced end-of-text or `max_new_tokens` were made (a row past its end-of-text yields filler).

        Args:
            prompt_ids: the prompt's token ids (1 to `sequence_length`; more are not kept).
            sampling: a `SamplingOptions` (default greedy).
            logprobs: record each token's log-probabilities (`decoding.draw`).
        """
        prompt_ids = [int(token) for token in prompt_ids]
        check_prompt_length(len(prompt_ids), self.sequence_length)
        check_max_new_tokens(max_new_tokens, self.sequence_length)
        penalties = has_penalties(sampling)
        sampling = (sampling or SamplingOptions()).graph_tensors()
        # The cache `decode` makes: prompt + new tokens, at most the context.
        max_length = min(len(prompt_ids) + max_new_tokens, self.sequence_length)
        logits, state = self._prefill[penalties](tf.constant([prompt_ids] * num_rows, tf.int32),
                                                 tf.constant(max_length, tf.int32))
        logprobs = bool(logprobs)
        token, recorded = self._first[logprobs](logits, state, sampling)
        ended = np.zeros(num_rows, bool)
        for count in range(max_new_tokens):
            if count:
                token, state, recorded = self._step[logprobs](state, token, sampling)
            row = token.numpy()
            yield row, (type(recorded)(*(value.numpy() for value in recorded)) if logprobs else None)
            ended |= row == self.end_of_text_id
            if ended.all():
                return
