"""`Decoder`: generation on token ids for one model: pads prompts, runs the compiled `decode` loop or
`beam_search`, and unpads."""

import functools

import tensorflow as tf

from kgpt.generation.beam_search import beam_search
from kgpt.generation.decoding import (
    check_jit_compile,
    check_max_new_tokens,
    check_prompt_length,
    check_window,
    decode,
    has_penalties,
)
from kgpt.generation.sampling import SamplingOptions
from kgpt.generation.stopping import stop_id_matrix


class Decoder:
    """Generation for one model on token ids: pads prompts, runs `decode` or `beam_search`, unpads.

    Args:
        model: a `kgpt.model.GPT`, or any causal model of token ids (through `CausalRecomputation`).
        jit_compile: compile the loops with XLA (faster on CPU); only for models with a cache.
        bucket: prompts are padded to a multiple of this, so similar lengths share one graph.
        sequence_length: the model's context; default `model.model_config.sequence_length`.
        window: tokens kept when generation passes the context (default half of it).

    Example:
        Decoder(model, end_of_text_id=0)([[5, 6, 7], [8]], 20, sampling=SamplingOptions(temperature=0.8))
    """

    def __init__(self, model, end_of_text_id=-1, jit_compile=False, bucket=16, sequence_length=None,
                 window=None):
        if sequence_length is None:
            config = getattr(model, "model_config", None)
            if config is None:
                raise ValueError(
                    f"{type(model).__name__} has no model_config to read its context from; pass "
                    "sequence_length= (the longest prompt + new tokens it accepts)."
                )
            sequence_length = config.sequence_length
        window = check_window(window, sequence_length)
        self._cached_model = check_jit_compile(model, jit_compile)
        self.model = model
        self.sequence_length = sequence_length
        self.window = window
        self.end_of_text_id = end_of_text_id
        self.jit_compile = jit_compile
        self.bucket = bucket
        # One compiled loop per (logprobs, penalties), lazily: each traces for its shapes only.
        self._decode = {
            (logprobs, penalties): tf.function(
                functools.partial(self._loop, logprobs=logprobs, penalties=penalties),
                jit_compile=jit_compile, reduce_retracing=True, autograph=False,
            ) for logprobs in (False, True) for penalties in (False, True)
        }
        # num_beams is a Python int: one trace per value.
        self._beam_search = tf.function(
            lambda num_beams, ids, lengths, steps, end, penalty, stops: beam_search(
                self._cached_model, ids, lengths, steps, num_beams, end, penalty, stops
            ),
            jit_compile=jit_compile,
            reduce_retracing=True,
        )

    def _loop(self, ids, lengths, steps, end, sampling, stops, logprobs, penalties):
        return decode(self._cached_model, ids, lengths, steps, end, sampling, stops, self.sequence_length,
                      self.window, logprobs, penalties)

    def __call__(self, prompts, max_new_tokens, sampling=None, keep_prompt=False, num_beams=1,
                 length_penalty=1.0, num_return_sequences=1, stop_sequences=(), logprobs=False):
        """Continues each prompt (a non-empty list of token ids).

        Past the context (not with beams), each time the cache fills it is rebuilt from the last
        `window` tokens.

        Args:
            sampling: a `kgpt.generation.sampling.SamplingOptions` (default greedy).
            keep_prompt: return prompt + continuation instead of the continuation alone.
            num_beams: > 1 runs `beam_search` (with `length_penalty`) instead of `decode`.
            num_return_sequences: sequences per prompt (samples, or the best beams).
            stop_sequences: lists of token ids; a row ends once its continuation ends with one.
            logprobs: also return each token's log-probabilities (not with beams).

        Returns:
            `len(prompts) * num_return_sequences` lists of ids, prompt-major (end-of-text or the
            stop sequence that ended a row kept); with `logprobs`, `(rows, row_logprobs)`, the
            NumPy `kgpt.generation.logprobs.TokenLogprobs` of each row's tokens.
        """
        sequence_length = self.sequence_length
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("Every prompt needs at least one token; got an empty prompt.")
        longest = max(len(p) for p in prompts)
        check_max_new_tokens(max_new_tokens, sequence_length)
        if num_beams > 1 and longest + max_new_tokens > sequence_length:
            raise ValueError(
                f"A prompt of {longest} tokens plus max_new_tokens={max_new_tokens} does not fit the "
                f"model's context of {sequence_length}, and beam search stays within it; shorten the "
                f"prompt or ask for 1 to {sequence_length - longest} new tokens."
            )
        check_prompt_length(longest, sequence_length)
        bucketed = -(-longest // self.bucket) * self.bucket
        padded_length = min(bucketed, max(longest, sequence_length - max_new_tokens))
        ids = tf.constant([list(p) + [0] * (padded_length - len(p)) for p in prompts], tf.int32)
        lengths = tf.constant([len(p) for p in prompts], tf.int32)
        steps = tf.constant(max_new_tokens, tf.int32)
        end_of_text = tf.constant(self.end_of_text_id, tf.int32)
        stops = tf.constant(stop_id_matrix([list(sequence) for sequence in stop_sequences]))
        if num_beams > 1 and logprobs:
            raise ValueError("Beam search returns no log-probabilities; leave out logprobs or the beams.")
        if num_beams > 1:
            penalty = tf.constant(length_penalty, tf.float32)
            tokens, ends, _ = self._beam_search(num_beams, ids, lengths, steps, end_of_text, penalty, stops)
            # (batch, num_beams, ...) -> the best num_return_sequences of each prompt, prompt-major
            tokens = tokens.numpy()[:, :num_return_sequences].reshape(-1, tokens.shape[-1])
            ends = ends.numpy()[:, :num_return_sequences].reshape(-1)
        else:
            ids = tf.repeat(ids, num_return_sequences, axis=0)
            lengths = tf.repeat(lengths, num_return_sequences, axis=0)
            penalties = has_penalties(sampling)
            sampling = (sampling or SamplingOptions()).graph_tensors()
            loop = self._decode[bool(logprobs), penalties]
            tokens, ends, recorded = loop(ids, lengths, steps, end_of_text, sampling, stops)
            tokens, ends = tokens.numpy(), ends.numpy()
        prompts = [prompt for prompt in prompts for _ in range(num_return_sequences)]
        spans = [(0 if keep_prompt else len(prompt), end) for prompt, end in zip(prompts, ends)]
        rows = [row[start:end].tolist() for row, (start, end) in zip(tokens, spans)]
        if not logprobs:
            return rows
        recorded = type(recorded)(*(value.numpy() for value in recorded))
        return rows, [type(recorded)(*(value[row, start:end] for value in recorded))
                      for row, (start, end) in enumerate(spans)]
