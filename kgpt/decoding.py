"""Decoding on token ids: the compiled, key/value-cached loops and the `Decoder` that runs them.

`decode` runs a whole generation as one TensorFlow graph: a prefill pass over the prompts, then a
`tf.while_loop` of one-token `call_with_cache` steps, each picking a token with
`kgpt.sampling.sample_logits`. Prompts of different lengths share a batch: they are right-padded,
decoding starts after the shortest prompt, and a row still inside its own prompt keeps its prompt
token instead of the sampled one. The cache and token buffer are updated with scatters, gathers
and selects only, so the graph runs without XLA (as TensorFlow Serving runs it) and is also
XLA-compilable in-process. `beam_search` is the beam variant; its options (`num_beams`,
`length_penalty`) stay apart from the sampling options. A model without a cached path (the GRU
baseline) decodes through `CausalRecomputation`.
"""

import tensorflow as tf

from kgpt.sampling import SamplingOptions, sample_logits

_NEGATIVE_INFINITY = float("-inf")


class CausalRecomputation:
    """The cached-decoding interface for a causal model without one: the cache is the tokens.

    `initial_cache` is an int32 `(batch, max_length)` token buffer; `call_with_cache` writes the
    new tokens into it, runs the whole causal model over the buffer and returns the logits at
    the new tokens' positions. Positions past them hold filler, which a causal model never lets
    reach earlier positions, so the logits equal a full pass over the prefix. Each step costs a
    full pass (no reuse), with plain TensorFlow ops: no XLA needed.

    Args:
        model: a causal Keras model, token ids `(batch, length)` -> logits
            `(batch, length, vocabulary_size)` (e.g. `kgpt.recurrent.RecurrentLanguageModel`).

    Example:
        tokens, lengths = decode(CausalRecomputation(gru_model), prompt_ids, prompt_lengths, 20)
    """

    def __init__(self, model):
        self.model = model

    def initial_cache(self, batch_size, max_length):
        """An all-zero int32 token buffer `(batch_size, max_length)`."""
        return tf.zeros(tf.stack([batch_size, max_length]), tf.int32)

    def call_with_cache(self, token_ids, cache, start_index):
        """Writes `token_ids` at `[start_index, start_index + length)`; returns their logits.

        Returns:
            `(logits, cache)`: float32 `(batch, length, vocabulary_size)` and the updated buffer.
        """
        token_ids = tf.cast(token_ids, tf.int32)
        length = tf.shape(token_ids)[1]
        offset = tf.range(tf.shape(cache)[1]) - start_index  # (max_length,)
        inside = tf.logical_and(offset >= 0, offset < length)[None, :]
        written = tf.gather(token_ids, tf.clip_by_value(offset, 0, length - 1), axis=1)
        cache = tf.where(inside, written, cache)
        logits = tf.cast(self.model(cache), tf.float32)  # (batch, max_length, vocabulary)
        return logits[:, start_index : start_index + length], cache


def cached(model):
    """`model` if it has a key/value cache (`call_with_cache`), else `CausalRecomputation(model)`."""
    if hasattr(model, "call_with_cache") and hasattr(model, "initial_cache"):
        return model
    return CausalRecomputation(model)


def _write_column(tokens, column, index):
    """tokens[:, index] = column, without XLA-only dynamic-update-slice ops."""
    mask = tf.equal(tf.range(tf.shape(tokens)[1]), index)[None, :]
    return tf.where(mask, column[:, None], tokens)


def _cache_shape_invariants(cache):
    """Loop shape invariants of a cache: any batch (beams reorder it) and any length.

    A key/value tensor is `(batch, heads, length, head_dim)`; a token buffer
    (`CausalRecomputation`) is `(batch, length)`.
    """

    def invariant(c):
        if c.shape.rank == 2:
            return tf.TensorShape([None, None])
        return tf.TensorShape([None] + list(c.shape[1:2]) + [None] + list(c.shape[3:]))

    return tf.nest.map_structure(invariant, cache)


def decode(
    model,
    prompt_ids,
    prompt_lengths,
    max_new_tokens,
    end_of_text_id=-1,
    sampling=None,
):
    """Generates continuations of a right-padded batch of prompts with a key/value cache.

    Meant to be called inside a `tf.function` (see `Decoder`); every argument may be a tensor.

    Args:
        model: anything with `initial_cache` and `call_with_cache` (a `kgpt.model.GPT`, or
            `cached(model)` for a model without a cache).
        prompt_ids: int32 `(batch, prompt_length)`, right-padded; every row has at least one token.
        prompt_lengths: int32 `(batch,)` true prompt lengths.
        max_new_tokens: tokens to add to each prompt; `prompt_length + max_new_tokens` must
            not exceed `model.model_config.sequence_length`.
        end_of_text_id: a row stops after producing this id (-1: never).
        sampling: a `kgpt.sampling.SamplingOptions`, or its `graph_inputs()` as tensors
            (default greedy); the same seed gives the same samples.

    Returns:
        `(tokens, lengths)`: int32 `(batch, prompt_length + max_new_tokens)` holding each prompt
        followed by its continuation, and int32 `(batch,)` the number of valid tokens per row
        (prompt + generated, end-of-text included); positions past a row's length are filler.
    """
    if sampling is None:
        sampling = SamplingOptions()
    if isinstance(sampling, SamplingOptions):
        sampling = sampling.graph_inputs()
    prompt_ids = tf.cast(prompt_ids, tf.int32)
    prompt_lengths = tf.cast(prompt_lengths, tf.int32)
    batch_size = tf.shape(prompt_ids)[0]
    total_length = tf.shape(prompt_ids)[1] + tf.cast(max_new_tokens, tf.int32)
    tokens = tf.pad(prompt_ids, [[0, 0], [0, total_length - tf.shape(prompt_ids)[1]]])
    start = tf.reduce_min(prompt_lengths)
    cache = model.initial_cache(batch_size, total_length)
    logits, cache = model.call_with_cache(tokens[:, :start], cache, 0)
    next_logits = logits[:, -1]
    seed = tf.stack([tf.cast(sampling["seed"], tf.int32), 0])
    limits = prompt_lengths + tf.cast(max_new_tokens, tf.int32)
    lengths = limits
    done = tf.zeros([batch_size], tf.bool)

    def condition(index, tokens, cache, next_logits, lengths, done):
        return tf.logical_and(index < total_length, tf.logical_not(tf.reduce_all(done)))

    def body(index, tokens, cache, next_logits, lengths, done):
        sampled = sample_logits(next_logits, sampling, seed + [0, index])
        in_prompt = index < prompt_lengths
        token = tf.where(in_prompt, tokens[:, index], sampled)
        token = tf.where(done, tf.fill([batch_size], tf.maximum(end_of_text_id, 0)), token)
        tokens = _write_column(tokens, token, index)
        # A row ends at end-of-text or once it has max_new_tokens tokens past its own prompt.
        ended = tf.logical_or(tf.equal(token, end_of_text_id), index + 1 >= limits)
        finished = tf.logical_and(tf.logical_not(done), tf.logical_and(~in_prompt, ended))
        lengths = tf.where(finished, index + 1, lengths)
        done = tf.logical_or(done, finished)
        logits, cache = model.call_with_cache(token[:, None], cache, index)
        return index + 1, tokens, cache, logits[:, -1], lengths, done

    index, tokens, cache, next_logits, lengths, done = tf.while_loop(
        condition,
        body,
        (start, tokens, cache, next_logits, lengths, done),
        shape_invariants=(
            tf.TensorShape([]),
            tf.TensorShape([None, None]),
            _cache_shape_invariants(cache),
            tf.TensorShape([None, None]),
            tf.TensorShape([None]),
            tf.TensorShape([None]),
        ),
    )
    return tokens, lengths


def beam_search(
    model,
    prompt_ids,
    prompt_lengths,
    max_new_tokens,
    num_beams,
    end_of_text_id=-1,
    length_penalty=1.0,
):
    """Beam search over a right-padded batch of prompts with a key/value cache.

    Every prompt keeps `num_beams` live hypotheses. Each step scores the `2 * num_beams` best
    extensions: those ending in end-of-text (and, at the last step, all of them) become finished
    hypotheses scored `log_probability / new_tokens ** length_penalty`; the best others stay live.
    A prompt stops once it has `num_beams` finished hypotheses (Hugging Face's
    `early_stopping=True`) or after `max_new_tokens`. Like `decode`, only scatters, gathers and
    selects: it runs with or without XLA.

    Args:
        model: a `kgpt.model.GPT` (anything with `initial_cache` and `call_with_cache`).
        prompt_ids: int32 `(batch, prompt_length)`, right-padded; every row has a token.
        prompt_lengths: int32 `(batch,)`.
        max_new_tokens: at most this many tokens per hypothesis.
        num_beams: hypotheses kept per prompt (a Python int).
        end_of_text_id: id that finishes a hypothesis (-1: none).
        length_penalty: exponent of the length normalisation; 0 compares raw log-probabilities,
            larger values favour longer hypotheses.

    Returns:
        `(tokens, lengths, scores)`, best hypothesis first: int32
        `(batch, num_beams, prompt_length + max_new_tokens)` (prompt + continuation), int32
        `(batch, num_beams)` valid tokens per hypothesis, float32 `(batch, num_beams)` scores.
    """
    beams = int(num_beams)
    prompt_ids = tf.cast(prompt_ids, tf.int32)
    prompt_lengths = tf.cast(prompt_lengths, tf.int32)
    max_new_tokens = tf.cast(max_new_tokens, tf.int32)
    length_penalty = tf.cast(length_penalty, tf.float32)
    batch_size = tf.shape(prompt_ids)[0]
    total_length = tf.shape(prompt_ids)[1] + max_new_tokens
    tokens = tf.pad(prompt_ids, [[0, 0], [0, max_new_tokens]])
    tokens = tf.repeat(tokens[:, None], beams, axis=1)  # (batch, beams, total)
    start = tf.reduce_min(prompt_lengths)
    cache = model.initial_cache(batch_size * beams, total_length)
    flat_tokens = tf.reshape(tokens, [batch_size * beams, total_length])
    logits, cache = model.call_with_cache(flat_tokens[:, :start], cache, 0)
    next_logits = logits[:, -1]
    limits = prompt_lengths + max_new_tokens
    # Only beam 0 is live at first, so the first expansion does not pick the same token K times.
    alive_scores = tf.tile(
        tf.concat([[0.0], tf.fill([beams - 1], _NEGATIVE_INFINITY)], axis=0)[None, :], [batch_size, 1]
    )
    finished_tokens = tf.zeros_like(tokens)
    finished_scores = tf.fill([batch_size, beams], _NEGATIVE_INFINITY)
    finished_lengths = tf.zeros([batch_size, beams], tf.int32)
    done = tf.zeros([batch_size], tf.bool)
    batch_index = tf.range(batch_size)[:, None]

    def condition(index, *state):
        done = state[-1]
        return tf.logical_and(index < total_length, tf.logical_not(tf.reduce_all(done)))

    def body(
        index, tokens, cache, next_logits, alive_scores, finished_tokens, finished_scores,
        finished_lengths, done,
    ):
        vocabulary_size = tf.shape(next_logits)[-1]
        log_probabilities = tf.nn.log_softmax(tf.cast(next_logits, tf.float32))
        log_probabilities = tf.reshape(log_probabilities, [batch_size, beams, vocabulary_size])
        scores = tf.reshape(alive_scores[:, :, None] + log_probabilities, [batch_size, -1])
        candidate_scores, candidate_ids = tf.math.top_k(scores, k=2 * beams)  # (batch, 2K)
        parents = candidate_ids // vocabulary_size
        candidate_tokens = candidate_ids % vocabulary_size
        # (batch, 2K, total): each candidate's parent sequence with the new token written in.
        candidates = tf.gather(tokens, parents, batch_dims=1)
        column = tf.equal(tf.range(total_length), index)[None, None, :]
        candidates = tf.where(column, candidate_tokens[:, :, None], candidates)

        new_tokens = tf.cast(index + 1 - prompt_lengths, tf.float32)[:, None]  # (batch, 1)
        is_end = tf.equal(candidate_tokens, end_of_text_id)
        last_step = (index + 1 >= limits)[:, None]
        finishes = tf.logical_or(is_end, last_step)
        normalised = candidate_scores / tf.pow(tf.maximum(new_tokens, 1.0), length_penalty)
        generating = tf.logical_and(index >= prompt_lengths, tf.logical_not(done))  # (batch,)
        normalised = tf.where(
            tf.logical_and(finishes, generating[:, None]), normalised, _NEGATIVE_INFINITY
        )
        # Merge the new finished hypotheses into the pool and keep the best K.
        pool_scores = tf.concat([finished_scores, normalised], axis=1)
        pool_tokens = tf.concat([finished_tokens, candidates], axis=1)
        pool_lengths = tf.concat(
            [finished_lengths, tf.fill(tf.shape(candidate_tokens), index + 1)], axis=1
        )
        merged_scores, keep = tf.math.top_k(pool_scores, k=beams)
        merged_tokens = tf.gather(pool_tokens, keep, batch_dims=1)
        merged_lengths = tf.gather(pool_lengths, keep, batch_dims=1)

        # The best K candidates that did not end stay live.
        live_scores, live = tf.math.top_k(tf.where(is_end, _NEGATIVE_INFINITY, candidate_scores), k=beams)
        live_parents = tf.gather(parents, live, batch_dims=1)
        live_tokens = tf.gather(candidates, live, batch_dims=1)
        # Rows still inside their prompt (or finished) keep their beams as they are.
        keep_rows = tf.logical_not(generating)
        identity = tf.tile(tf.range(beams)[None, :], [batch_size, 1])
        parents = tf.where(keep_rows[:, None], identity, live_parents)
        tokens = tf.where(keep_rows[:, None, None], tokens, live_tokens)
        alive_scores = tf.where(keep_rows[:, None], alive_scores, live_scores)
        finished_scores = tf.where(generating[:, None], merged_scores, finished_scores)
        finished_tokens = tf.where(generating[:, None, None], merged_tokens, finished_tokens)
        finished_lengths = tf.where(generating[:, None], merged_lengths, finished_lengths)
        full = tf.reduce_all(finished_scores > _NEGATIVE_INFINITY, axis=1)
        done = tf.logical_or(
            done, tf.logical_and(generating, tf.logical_or(full, last_step[:, 0]))
        )

        # Reorder the cache to follow the parents, then feed each beam's token at `index`.
        flat_parents = tf.reshape(parents + batch_index * beams, [-1])
        cache = tf.nest.map_structure(lambda c: tf.gather(c, flat_parents), cache)
        token = tf.reshape(tokens[:, :, index], [-1, 1])
        logits, cache = model.call_with_cache(token, cache, index)
        return (
            index + 1, tokens, cache, logits[:, -1], alive_scores, finished_tokens,
            finished_scores, finished_lengths, done,
        )

    state = tf.while_loop(
        condition,
        body,
        (
            start, tokens, cache, next_logits, alive_scores, finished_tokens, finished_scores,
            finished_lengths, done,
        ),
        shape_invariants=(
            tf.TensorShape([]),
            tf.TensorShape([None, beams, None]),
            _cache_shape_invariants(cache),
            tf.TensorShape([None, None]),
            tf.TensorShape([None, beams]),
            tf.TensorShape([None, beams, None]),
            tf.TensorShape([None, beams]),
            tf.TensorShape([None, beams]),
            tf.TensorShape([None]),
        ),
    )
    return state[5], state[7], state[6]


def check_options(max_new_tokens, sequence_length, sampling=None, num_beams=1, num_return_sequences=1):
    """Raises `ValueError` with a fix for decoding options that cannot work.

    The sampling options validate themselves (`kgpt.sampling.SamplingOptions`); this checks the
    length and beam options, and how they combine with sampling.

    Args:
        max_new_tokens: tokens to add per prompt.
        sequence_length: the model's context.
        sampling: a `SamplingOptions` (default greedy).
        num_beams: beam search width (1: none).
        num_return_sequences: sequences per prompt.
    """
    if sampling is None:
        sampling = SamplingOptions()
    temperature = sampling.temperature
    if not 1 <= max_new_tokens < sequence_length:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} does not fit the model's context of "
            f"{sequence_length} tokens (at least one goes to the prompt); choose 1 to "
            f"{sequence_length - 1}."
        )
    if num_beams < 1:
        raise ValueError(f"beams={num_beams} must be >= 1 (1 means no beam search).")
    if num_beams > 1 and temperature is not None:
        raise ValueError(
            "Beam search is deterministic; use either beams > 1 or a sampling temperature."
        )
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences={num_return_sequences} must be >= 1.")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ValueError(
            f"num_return_sequences={num_return_sequences} exceeds beams={num_beams}; a beam "
            "search returns at most one sequence per beam."
        )
    if num_beams == 1 and temperature is None and num_return_sequences > 1:
        raise ValueError(
            "Greedy decoding gives one sequence per prompt; for several, sample (set a "
            "temperature) or use beams."
        )


def default_max_new_tokens(sequence_length):
    """New tokens when none are asked for: 64, or half the context of a smaller model."""
    return min(64, sequence_length // 2)


class Decoder:
    """Generation for one model on token ids: pads prompts, runs a compiled graph, unpads.

    Sampling and greedy decoding run `decode`, beam search runs `beam_search`, each as one
    `tf.function`. Prompts are padded to a multiple of `bucket` tokens, so calls with similar
    lengths reuse one graph (one trace per batch size and total length with XLA).

    Args:
        model: a `kgpt.model.GPT`, or any causal model of token ids (decoded through
            `CausalRecomputation` when it has no `call_with_cache`).
        end_of_text_id: id that ends a row (-1: never).
        jit_compile: compile the decode loops with XLA (faster in-process on CPU; see
            benchmarks/RESULTS.md). Only for models with a key/value cache.
        bucket: prompt-length granularity of the traced graphs.
        sequence_length: the model's context; default `model.model_config.sequence_length`.

    Example:
        decoder = Decoder(model, end_of_text_id=tokenizer.end_of_text_id)
        continuations = decoder(
            [[5, 6, 7], [8]], max_new_tokens=20, sampling=SamplingOptions(temperature=0.8, seed=1)
        )
    """

    def __init__(self, model, end_of_text_id=-1, jit_compile=False, bucket=16, sequence_length=None):
        if sequence_length is None:
            config = getattr(model, "model_config", None)
            if config is None:
                raise ValueError(
                    f"{type(model).__name__} has no model_config to read its context from; pass "
                    "sequence_length= (the longest prompt + new tokens it accepts)."
                )
            sequence_length = config.sequence_length
        self._cached_model = cached(model)
        if jit_compile and isinstance(self._cached_model, CausalRecomputation):
            # Seen with the GRU baseline: under XLA the loop returned token 0 at every step.
            raise ValueError(
                f"{type(model).__name__} has no key/value cache and decodes by recomputation, "
                "which runs without XLA; pass jit_compile=False."
            )
        self.model = model
        self.sequence_length = sequence_length
        self.end_of_text_id = end_of_text_id
        self.jit_compile = jit_compile
        self.bucket = bucket
        self._decode = tf.function(
            lambda *args: decode(self._cached_model, *args), jit_compile=jit_compile,
            reduce_retracing=True,
        )
        self._beam_searches = {}

    def _beam_search(self, num_beams):
        if num_beams not in self._beam_searches:
            self._beam_searches[num_beams] = tf.function(
                lambda ids, lengths, steps, end, penalty: beam_search(
                    self._cached_model, ids, lengths, steps, num_beams, end, penalty
                ),
                jit_compile=self.jit_compile,
                reduce_retracing=True,
            )
        return self._beam_searches[num_beams]

    def __call__(
        self,
        prompts,
        max_new_tokens,
        sampling=None,
        keep_prompt=False,
        num_beams=1,
        length_penalty=1.0,
        num_return_sequences=1,
    ):
        """Continues each prompt (a list of token ids).

        Args:
            prompts: list of non-empty lists of token ids.
            max_new_tokens: tokens to add; each prompt plus this must fit the context.
            sampling: a `kgpt.sampling.SamplingOptions` (default greedy).
            keep_prompt: return prompt + continuation instead of the continuation alone.
            num_beams: > 1 runs `beam_search` instead of sampling.
            length_penalty: see `beam_search`.
            num_return_sequences: sequences per prompt (samples, or the best beams).

        Returns:
            A list of `len(prompts) * num_return_sequences` lists of ids, prompt-major; a row
            that ended at end-of-text ends with that id.
        """
        sequence_length = self.sequence_length
        if sampling is None:
            sampling = SamplingOptions()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("Every prompt needs at least one token; got an empty prompt.")
        longest = max(len(p) for p in prompts)
        if max_new_tokens <= 0 or longest + max_new_tokens > sequence_length:
            raise ValueError(
                f"A prompt of {longest} tokens plus max_new_tokens={max_new_tokens} does not fit "
                f"the model's context of {sequence_length}; shorten the prompt or ask for 1 to "
                f"{sequence_length - longest} new tokens."
            )
        padded_length = min(-(-longest // self.bucket) * self.bucket, sequence_length - max_new_tokens)
        ids = tf.constant([list(p) + [0] * (padded_length - len(p)) for p in prompts], tf.int32)
        lengths = tf.constant([len(p) for p in prompts], tf.int32)
        if num_beams > 1:
            tokens, ends, _ = self._beam_search(num_beams)(
                ids,
                lengths,
                tf.constant(max_new_tokens, tf.int32),
                tf.constant(self.end_of_text_id, tf.int32),
                tf.constant(length_penalty, tf.float32),
            )
            tokens = tokens.numpy()[:, :num_return_sequences]
            ends = ends.numpy()[:, :num_return_sequences]
            rows = [
                (prompt, tokens[i, j], ends[i, j])
                for i, prompt in enumerate(prompts)
                for j in range(num_return_sequences)
            ]
        else:
            if num_return_sequences > 1:
                ids = tf.repeat(ids, num_return_sequences, axis=0)
                lengths = tf.repeat(lengths, num_return_sequences, axis=0)
            tokens, ends = self._decode(
                ids,
                lengths,
                tf.constant(max_new_tokens, tf.int32),
                tf.constant(self.end_of_text_id, tf.int32),
                sampling.graph_tensors(),
            )
            tokens, ends = tokens.numpy(), ends.numpy()
            rows = [
                (prompts[row // num_return_sequences], tokens[row], ends[row])
                for row in range(len(tokens))
            ]
        return [
            row[0 if keep_prompt else len(prompt) : end].tolist() for prompt, row, end in rows
        ]
