"""Streaming: a token-by-token decoder for in-process models, and text that grows piece by piece.

`kgpt.decoding.decode` runs a whole continuation as one graph, so nothing is seen before it ends.
`StepDecoder` runs the same computation (cache, sampler and per-position seeds) as a compiled
prefill and a compiled one-token step driven from Python, and yields each token as it is produced;
`TextDeltas` turns the growing text into pieces that never split a UTF-8 character.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from kgpt.decoding import CausalRecomputation, cached
from kgpt.sampling import SamplingOptions, sample_logits

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
    `[seed, p]`, as in `decode`, so greedy and seeded sampling give `decode`'s tokens.

    Args:
        model: a `kgpt.model.GPT`, or a causal model without a cache (through `CausalRecomputation`).
        sequence_length: the cache's length (the model's context).
        jit_compile: compile the one-token step with XLA (the prefill runs without: its prompt
            length varies, and XLA would compile it again for each).

    Example:
        for tokens in StepDecoder(model, 32)([5, 6, 7], 10):  # tokens: int32 (num_rows,)
            print(tokens)
    """

    def __init__(self, model, sequence_length, end_of_text_id=-1, jit_compile=False):
        self._model = cached(model)
        if jit_compile and isinstance(self._model, CausalRecomputation):
            raise ValueError(
                f"{type(model).__name__} decodes by recomputation, without XLA; pass jit_compile=False."
            )
        self.sequence_length = sequence_length
        self.end_of_text_id = end_of_text_id
        self._prefill = tf.function(self._prefill_step, reduce_retracing=True)
        # Draws are made where `decode` makes them, under XLA or not: their random numbers differ.
        self._first = tf.function(self._sample, jit_compile=jit_compile, reduce_retracing=True)
        self._step = tf.function(self._next_step, jit_compile=jit_compile, reduce_retracing=True)

    def _prefill_step(self, prompt_ids, cache):
        logits, cache = self._model.call_with_cache(prompt_ids, cache, 0)
        return logits[:, -1], cache

    def _next_step(self, token, cache, position, sampling):
        logits, cache = self._model.call_with_cache(token[:, None], cache, position)
        return self._sample(logits[:, -1], sampling, position + 1), cache

    @staticmethod
    def _sample(logits, sampling, position):
        return sample_logits(logits, sampling, tf.stack([tf.cast(sampling["seed"], tf.int32), position]))

    def __call__(self, prompt_ids, max_new_tokens, sampling=None, num_rows=1):
        """Yields int32 `(num_rows,)` arrays, one per new position, until every row has produced
        end-of-text or `max_new_tokens` were made (a row past its end-of-text yields filler).

        Args:
            prompt_ids: the prompt's token ids (at least one; with `max_new_tokens`, at most the context).
            sampling: a `SamplingOptions` (default greedy).
        """
        prompt_ids = [int(token) for token in prompt_ids]
        if not prompt_ids or len(prompt_ids) + max_new_tokens > self.sequence_length:
            raise ValueError(
                f"A prompt of {len(prompt_ids)} tokens plus max_new_tokens={max_new_tokens} does not "
                f"fit the context of {self.sequence_length}; the prompt needs 1 to "
                f"{self.sequence_length - max_new_tokens} tokens."
            )
        sampling = (sampling or SamplingOptions()).graph_tensors()
        ids = tf.constant([prompt_ids] * num_rows, tf.int32)
        cache = self._model.initial_cache(num_rows, self.sequence_length)
        logits, cache = self._prefill(ids, cache)
        token = self._first(logits, sampling, tf.constant(len(prompt_ids), tf.int32))
        ended = np.zeros(num_rows, bool)
        position = len(prompt_ids)
        for step in range(max_new_tokens):
            if step:
                token, cache = self._step(token, cache, tf.constant(position - 1, tf.int32), sampling)
            tokens = token.numpy()
            yield tokens
            ended |= tokens == self.end_of_text_id
            position += 1
            if ended.all():
                return
