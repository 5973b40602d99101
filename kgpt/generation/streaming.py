"""Streaming: a token-by-token decoder for in-process models, and text that grows piece by piece.

`kgpt.decoding.decode` runs a whole continuation as one graph, so nothing is seen before it ends.
`StepDecoder` runs the same computation (cache, sampler, per-position seeds and, past the
context, the rebuilds of the cache from the last tokens) as a compiled prefill and a compiled
one-token step driven from Python, and yields each token as it is produced;
`TextDeltas` turns the growing text into pieces that never split a UTF-8 character.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from kgpt.generation.decoding import CausalRecomputation, cached, default_window
from kgpt.generation.sampling import SamplingOptions, sample_logits

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
    """

    index: int
    text: str
    token_count: int
    prompt_token_count: int
    finish_reason: str | None = None


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
            lengths = np.array([len(row) for row in rows], np.int32)
            ids = np.zeros((len(rows), int(lengths.max(initial=0))), np.int32)
            for index, row in enumerate(rows):
                ids[index, : len(row)] = row
            texts = self._compiled(ids, lengths)
        return [text.decode("utf-8") for text in texts.numpy()]


class StepDecoder:
    """Yields the tokens of `decode` one step at a time, for a prompt repeated on `num_rows` rows.

    Token `p` (its position in prompt + continuation) is drawn with the stateless seed
    `[seed, p]`, as in `decode`, and past the context the cache is rebuilt where `decode` rebuilds
    it (from the last `window` tokens of each row, once the cache is full), so greedy and seeded
    sampling give `decode`'s tokens.

    Args:
        model: a `kgpt.model.GPT`, or a causal model without a cache (through `CausalRecomputation`).
        sequence_length: the cache's length (the model's context).
        jit_compile: compile the one-token step with XLA (the prefill runs without: its prompt
            length varies, and XLA would compile it again for each).
        window: tokens kept when generation passes the context (default half of it, as `decode`).

    Example:
        for tokens in StepDecoder(model, 32)([5, 6, 7], 10):  # tokens: int32 (num_rows,)
            print(tokens)
    """

    def __init__(self, model, sequence_length, end_of_text_id=-1, jit_compile=False, window=None):
        self._model = cached(model)
        if jit_compile and isinstance(self._model, CausalRecomputation):
            raise ValueError(
                f"{type(model).__name__} decodes by recomputation, without XLA; pass jit_compile=False."
            )
        window = default_window(sequence_length) if window is None else window
        if not 1 <= window < sequence_length:
            raise ValueError(
                f"window={window} must be 1 to {sequence_length - 1}: the tokens kept when generation "
                f"passes the context of {sequence_length}."
            )
        self.sequence_length = sequence_length
        self.window = window
        self.end_of_text_id = end_of_text_id
        self._prefill = tf.function(self._prefill_step, reduce_retracing=True)
        # Draws are made where `decode` makes them, under XLA or not: their random numbers differ.
        self._first = tf.function(self._sample, jit_compile=jit_compile, reduce_retracing=True)
        self._step = tf.function(self._next_step, jit_compile=jit_compile, reduce_retracing=True)

    def _prefill_step(self, prompt_ids, cache):
        logits, cache = self._model.call_with_cache(prompt_ids, cache, 0)
        return logits[:, -1], cache

    def _next_step(self, token, cache, slot, position, sampling):
        """Feeds `token` at cache index `slot`; draws the token at (absolute) `position`."""
        logits, cache = self._model.call_with_cache(token[:, None], cache, slot)
        return self._sample(logits[:, -1], sampling, position), cache

    @staticmethod
    def _sample(logits, sampling, position):
        return sample_logits(logits, sampling, tf.stack([tf.cast(sampling["seed"], tf.int32), position]))

    def _rebuild(self, ids):
        """Logits after `ids` (int32 `(num_rows, length)`) and a fresh cache holding them from index 0."""
        cache = self._model.initial_cache(len(ids), self.sequence_length)
        return self._prefill(tf.constant(ids, tf.int32), cache)

    def __call__(self, prompt_ids, max_new_tokens, sampling=None, num_rows=1):
        """Yields int32 `(num_rows,)` arrays, one per new position, until every row has produced
        end-of-text or `max_new_tokens` were made (a row past its end-of-text yields filler).

        Args:
            prompt_ids: the prompt's token ids (1 to `sequence_length`; more are not kept).
            sampling: a `SamplingOptions` (default greedy).
        """
        prompt_ids = [int(token) for token in prompt_ids]
        length = len(prompt_ids)
        if not 1 <= length <= self.sequence_length:
            raise ValueError(
                f"A prompt of {length} tokens does not fit the context of {self.sequence_length}; "
                f"the prompt needs 1 to {self.sequence_length} tokens (keep its last ones)."
            )
        sampling = (sampling or SamplingOptions()).graph_tensors()
        # Each row's prompt + continuation: rows differ when sampling, and a rebuild reads them.
        tokens = np.zeros((num_rows, length + max_new_tokens), np.int32)
        tokens[:, :length] = prompt_ids
        logits, cache = self._rebuild(tokens[:, :length])
        offset = 0  # the position of the cache's first token
        ended = np.zeros(num_rows, bool)
        for position in range(length, length + max_new_tokens):
            fed = position - 1  # the token the cache takes in before drawing at `position`
            if position == length:
                token = self._first(logits, sampling, tf.constant(position, tf.int32))
            elif fed - offset == self.sequence_length:  # full: `decode`'s rebuild from the last window
                offset = fed + 1 - self.window
                logits, cache = self._rebuild(tokens[:, offset:fed + 1])
                token = self._first(logits, sampling, tf.constant(position, tf.int32))
            else:
                token, cache = self._step(token, cache, tf.constant(fed - offset, tf.int32),
                                          tf.constant(position, tf.int32), sampling)
            row = token.numpy()
            tokens[:, position] = row
            yield row
            ended |= row == self.end_of_text_id
            if ended.all():
                return
