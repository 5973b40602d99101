"""Decoding on token ids: one prefill and one one-token step, and every loop and driver on them.

`prefill` and `step` (on a `DecodeState`: the cache, the position, the cache's offset and the
recent tokens a rebuild past the context starts from; token `p` drawn with the seed `[seed, p]`)
are the one implementation of cached decoding. `decode` (sampling, greedy) runs them as one graph,
a `tf.while_loop` without XLA-only ops; `beam_search` reorders the state between `feed`s in a loop
of its own; `StepDecoder` (`kgpt.generation.streaming`) drives them from Python and
`ServingModule` (`kgpt.serving.serving_module`) exports them as its `prefill` and `step`
signatures. The checks they share are here too.
"""

import typing

import tensorflow as tf

from kgpt.generation.logprobs import TokenLogprobs, empty_logprobs, token_logprobs
from kgpt.generation.sampling import SamplingOptions, sample_logits
from kgpt.generation.stopping import ends_with_stop

# New tokens per prompt: past the context generation is bounded by time and memory, not the model.
MAX_NEW_TOKENS = 1 << 16


class CausalRecomputation:
    """The cached-decoding interface for a causal model without one: the cache is the tokens.

    Each step writes the new tokens into an int32 `(batch, max_length)` buffer and runs the whole
    model over it (no reuse); the filler past them never reaches earlier positions of a causal
    model, so the logits equal a full pass over the prefix.

    Args:
        model: a causal Keras model, token ids `(batch, length)` -> logits `(batch, length, vocabulary)`.
    """

    def __init__(self, model):
        self.model = model

    def initial_cache(self, batch_size, max_length):
        """An all-zero int32 token buffer `(batch_size, max_length)`."""
        return tf.zeros(tf.stack([batch_size, max_length]), tf.int32)

    def call_with_cache(self, token_ids, cache, start_index):
        """Writes `token_ids` at `[start_index, start_index + length)`; returns `(logits, cache)`."""
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


# --- the decoding state, prefill and the one-token step ------------------------------------------


class DecodeState(typing.NamedTuple):
    """What decoding carries from one token to the next: a nest of tensors (a loop's state, a
    compiled function's argument, an export's `prefill` outputs and `step` inputs).

    Args:
        cache: the model's cache of positions `[offset, position)`: per layer `(key, value)`
            `(batch, heads, cache_length, head_dim)` for a GPT, int32 tokens `(batch, cache_length)`
            for `CausalRecomputation`.
        position: int32 scalar, the position (in prompt + continuation) of the next token fed.
        offset: int32 scalar, the position of the cache's first token (0 until a rebuild).
        recent: int32 `(batch, window)`, the last `window` tokens fed, oldest first, which a full
            cache is rebuilt from (zeros before position 0); width 0: never rebuilt.
        counts: int32 `(batch, vocabulary)`, how often each token was generated so far (OpenAI's
            penalties); width 0: no penalties (beam search).
        seen: bool `(batch, vocabulary)`, the tokens of the prompt or generated so far (the
            repetition penalty); width 0 with `counts`. Both are kept by `count` while a penalty
            is set (`penalized`), so a stream passes the same options to every step.
    """

    cache: typing.Any
    position: typing.Any
    offset: typing.Any
    recent: typing.Any
    counts: typing.Any
    seen: typing.Any

    def take(self, rows):
        """This state for the rows `rows` (int32 `(new_batch,)`), as beams reorder it."""
        cache = tf.nest.map_structure(lambda tensor: tf.gather(tensor, rows), self.cache)
        rows_of = lambda tensor: tf.gather(tensor, rows)  # noqa: E731
        return self._replace(cache=cache, recent=rows_of(self.recent), counts=rows_of(self.counts),
                             seen=rows_of(self.seen))


def _length_axis(tensor):
    """The positions' axis of a cache tensor: `(batch, heads, length, head_dim)` or `(batch, length)`."""
    return 1 if tensor.shape.rank == 2 else 2


def cache_length(cache):
    """The positions a cache holds (an int32 scalar)."""
    first = tf.nest.flatten(cache)[0]
    return tf.shape(first)[_length_axis(first)]


def prefill(model, prompt_ids, max_length, window=0, penalties=True):
    """The first decoding step: prompts of equal length through a fresh cache, from position 0.

    Args:
        model: anything with `initial_cache` and `call_with_cache` (`cached(model)`).
        prompt_ids: int32 `(batch, length)`, `length >= 1`.
        max_length: positions the cache holds: prompt + new tokens, at most the model's context.
        window: tokens a full cache is rebuilt from (a Python int; 0: the continuation fits).
        penalties: keep the counts penalties need (the prompt's tokens as `seen`); False (beam
            search): `counts` and `seen` of width 0.

    Returns:
        `(logits, state)`: float32 `(batch, vocabulary)` logits of the token at position `length`,
        and the `DecodeState` that `step` feeds it with.
    """
    prompt_ids = tf.cast(prompt_ids, tf.int32)
    length = tf.shape(prompt_ids)[1]
    cache = model.initial_cache(tf.shape(prompt_ids)[0], max_length)
    logits, cache = model.call_with_cache(prompt_ids, cache, 0)
    # (batch, window): the prompt's last `window` tokens, zeros before position 0.
    recent = tf.gather(tf.pad(prompt_ids, [[0, 0], [window, 0]]), length + tf.range(window), axis=1)
    logits = tf.cast(logits[:, -1], tf.float32)
    batch_size = tf.shape(prompt_ids)[0]
    vocabulary_size = tf.shape(logits)[-1] if penalties else 0
    counts = tf.zeros(tf.stack([batch_size, vocabulary_size]), tf.int32)
    seen = tf.zeros_like(counts, tf.bool)
    if penalties:  # one scatter of the prompt's (row, token) pairs, O(batch * (length + vocabulary))
        rows = tf.repeat(tf.range(batch_size)[:, None], length, axis=1)
        pairs = tf.reshape(tf.stack([rows, prompt_ids], axis=-1), [-1, 2])
        seen = tf.scatter_nd(pairs, tf.ones([tf.shape(pairs)[0]], tf.int32), tf.shape(counts)) > 0
    return logits, DecodeState(cache, length, tf.constant(0), recent, counts, seen)


def feed(model, state, token):
    """The one-token cached call: `token` (int32 `(batch,)`) at `state.position`.

    With the cache full, it is rebuilt from the last `window` tokens (this one included) instead,
    so every token sees at least `window - 1` tokens before it (nanoGPT's cropping, one prefill per
    `cache_length - window` tokens).

    Returns:
        `(logits, state)`: float32 `(batch, vocabulary)` logits of the next position, the new state.
    """
    token = tf.cast(token, tf.int32)
    position, offset = state.position, state.offset

    def cached_step():
        logits, cache = model.call_with_cache(token[:, None], state.cache, position - offset)
        return tf.cast(logits[:, -1], tf.float32), cache, offset

    if state.recent.shape[1] == 0:  # never rebuilt: the continuation fits the cache
        logits, cache, offset = cached_step()
        return logits, state._replace(cache=cache, position=position + 1, offset=offset)
    recent = tf.concat([state.recent[:, 1:], token[:, None]], axis=1)

    def rebuild():
        empty = model.initial_cache(tf.shape(token)[0], cache_length(state.cache))
        logits, cache = model.call_with_cache(recent, empty, 0)
        return tf.cast(logits[:, -1], tf.float32), cache, position + 1 - tf.shape(recent)[1]

    logits, cache, offset = tf.cond(position - offset < cache_length(state.cache), cached_step, rebuild)
    return logits, state._replace(cache=cache, position=position + 1, offset=offset, recent=recent)


def graph_sampling(sampling):
    """`{field: scalar}` sampling inputs: a `SamplingOptions`' (None: greedy), or `sampling` as given."""
    if sampling is None or isinstance(sampling, SamplingOptions):
        return (sampling or SamplingOptions()).graph_inputs()
    return sampling


def sample_at(logits, sampling, position):
    """The token at `position` from its logits, drawn with the stateless seed `[seed, position]`.

    Args:
        logits: float `(batch, vocabulary)`.
        sampling: `graph_sampling` inputs (a `SamplingOptions`' `graph_inputs()` or tensors).
        position: int32 scalar, the token's position in prompt + continuation.

    Returns:
        int32 `(batch,)`.
    """
    sampling = graph_sampling(sampling)
    seed = tf.stack([tf.cast(sampling["seed"], tf.int32), tf.cast(position, tf.int32)])
    return sample_logits(logits, sampling, seed)


_PENALTIES = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0}


def has_penalties(sampling):
    """Whether a `SamplingOptions` (None: greedy) sets a penalty (Python: which graph to trace)."""
    return any(getattr(sampling, name, off) != off for name, off in _PENALTIES.items())


def penalized(sampling):
    """A bool scalar: some penalty of the `graph_sampling` inputs is set (a Python bool when none is
    a tensor; None: the options class has none)."""
    sampling = graph_sampling(sampling)
    if not any(name in sampling for name in _PENALTIES):
        return None
    values = [sampling.get(name, off) for name, off in _PENALTIES.items()]
    if not any(tf.is_tensor(value) for value in values):  # known now: a Python bool
        return any(value != off for value, off in zip(values, _PENALTIES.values()))
    return tf.reduce_any(tf.stack([
        tf.not_equal(tf.cast(sampling.get(name, off), tf.float32), off) for name, off in _PENALTIES.items()
    ]))


def count(state, token, sampling, generated=True):
    """`state` with `token` (int32 `(batch,)`) counted: in `seen`, and in `counts` where
    `generated` (a bool or `(batch,)`: False for a prompt's own token); only while `penalized`."""
    on = penalized(sampling)
    if on is None or on is False or state.counts.shape[1] == 0:
        return state

    def counted():
        pairs = tf.stack([tf.range(tf.shape(token)[0]), tf.cast(token, tf.int32)], axis=1)
        added = tf.cast(tf.broadcast_to(generated, tf.shape(token)), tf.int32)
        counts = tf.tensor_scatter_nd_add(state.counts, pairs, added)
        seen = tf.tensor_scatter_nd_update(state.seen, pairs, tf.ones_like(token, tf.bool))
        return counts, seen

    counts, seen = counted() if on is True else tf.cond(on, counted, lambda: (state.counts, state.seen))
    return state._replace(counts=counts, seen=seen)


def apply_penalties(logits, state, sampling):
    """`logits` (float32 `(batch, vocabulary)`) after the repetition penalty (on `state.seen`), then
    the frequency and presence penalties (on `state.counts`); as they are when none is set."""
    on = penalized(sampling)
    if on is None or on is False or state.counts.shape[1] == 0:
        return logits
    sampling = graph_sampling(sampling)

    def penalize():
        repetition = tf.cast(sampling.get("repetition_penalty", 1.0), tf.float32)
        scaled = tf.where(logits > 0, logits / repetition, logits * repetition)
        penalized_logits = tf.where(state.seen, scaled, logits)
        counts = tf.cast(state.counts, tf.float32)
        frequency = tf.cast(sampling.get("frequency_penalty", 0.0), tf.float32)
        presence = tf.cast(sampling.get("presence_penalty", 0.0), tf.float32)
        return penalized_logits - frequency * counts - presence * tf.cast(counts > 0, tf.float32)

    return penalize() if on is True else tf.cond(on, penalize, lambda: logits)


def draw(logits, state, sampling, logprobs=False):
    """The token at `state.position` from its logits: penalties (`apply_penalties`), then
    `sample_at` its seed.

    Args:
        logprobs: record the token's `TokenLogprobs` (the model's, before penalties and sampling):
            a Python bool or a bool scalar tensor.

    Returns:
        `(token, token_logprobs)`: int32 `(batch,)`, and `TokenLogprobs` of shape `(batch,)`
        (zeros when not recorded).
    """
    token = sample_at(apply_penalties(logits, state, sampling), sampling, state.position)
    empty = lambda: empty_logprobs(tf.shape(token), logits.shape[-1])  # noqa: E731
    if logprobs is False:
        return token, empty()
    return token, tf.cond(tf.convert_to_tensor(logprobs), lambda: token_logprobs(logits, token), empty)


def step(model, state, token, sampling, logprobs=False, generated=True):
    """One decoding step: counts and feeds `token` at `state.position`, then draws the token after it.

    Args:
        logprobs: record the drawn token's log-probabilities (`draw`).
        generated: `token` was generated (counted for the penalties), not a prompt's own (a bool
            or bool `(batch,)`).

    Returns:
        `(next_token, state, token_logprobs)`: int32 `(batch,)` at `state.position + 1`, the state
        that feeds it, and its `TokenLogprobs` (`draw`).

    Example:
        logits, state = prefill(model, prompt_ids, 32, window=16)
        token, _ = draw(logits, state, sampling)
        for _ in range(10):
            token, state, _ = step(model, state, token, sampling)
    """
    logits, state = feed(model, count(state, token, sampling, generated), token)
    token, recorded = draw(logits, state, sampling, logprobs)
    return token, state, recorded


def cache_shape_invariants(cache):
    """Any batch (beams reorder it) and length of `(batch, heads, length, head_dim)` or `(batch, length)`."""

    def invariant(c):
        if c.shape.rank == 2:
            return tf.TensorShape([None, None])
        return tf.TensorShape([None] + list(c.shape[1:2]) + [None] + list(c.shape[3:]))

    return tf.nest.map_structure(invariant, cache)


def state_shape_invariants(state):
    counts = tf.TensorShape([None, state.counts.shape[1]])
    return DecodeState(cache_shape_invariants(state.cache), tf.TensorShape([]), tf.TensorShape([]),
                       tf.TensorShape([None, state.recent.shape[1]]), counts, counts)


# --- the loops -------------------------------------------------------------------------------------


def write_column(tokens, column, index):
    """tokens[..., index] = column, without XLA-only dynamic-update-slice ops."""
    mask = tf.equal(tf.range(tf.shape(tokens)[-1]), index)  # broadcasts over the leading axes
    return tf.where(mask, column[..., None], tokens)


def write_position(buffer, values, index):
    """buffer[:, index] = values for a `(batch, length, ...)` buffer, as `write_column` writes."""
    mask = tf.equal(tf.range(tf.shape(buffer)[1]), index)
    mask = tf.reshape(mask, tf.concat([[1, -1], tf.ones([buffer.shape.rank - 2], tf.int32)], 0))
    return tf.where(mask, values[:, None], buffer)


def decode(model, prompt_ids, prompt_lengths, max_new_tokens, end_of_text_id=-1, sampling=None,
           stop_ids=None, sequence_length=None, window=None, logprobs=False, penalties=True):
    """Continues a right-padded batch of prompts, inside a `tf.function`; arguments may be tensors.

    A `tf.while_loop` of `step`s after a `prefill` of the shortest prompt; a row still inside its
    own prompt keeps its token. Past the context, the cache is rebuilt from the last `window` tokens
    each time it fills (`feed`).

    Args:
        model: anything with `initial_cache` and `call_with_cache` (`cached(model)`).
        prompt_ids: int32 `(batch, prompt_length)`, right-padded; rows of 1 to `sequence_length` tokens.
        prompt_lengths: int32 `(batch,)` true prompt lengths.
        end_of_text_id: a row stops after producing this id (-1: never).
        sampling: a `kgpt.generation.sampling.SamplingOptions` (default greedy), or its `graph_inputs()`.
        stop_ids: int32 `(stops, length)` from `stopping.stop_id_matrix`: a row also stops once
            its continuation ends with one of these sequences (kept, like end-of-text).
        sequence_length: the model's context (a Python int); None: prompt + new tokens fit in it.
        window: tokens the rebuilt cache starts from, a Python int in `[1, sequence_length)`;
            default `default_window(sequence_length)`.
        logprobs: record each new token's `TokenLogprobs` (a Python bool or a bool scalar tensor).
        penalties: keep the counts penalties need (`prefill`); False: a loop without them, for
            options known to set none (then it is the loop it was before penalties existed).

    Returns:
        `(tokens, lengths, token_logprobs)`: int32 `(batch, prompt_length + max_new_tokens)`,
        prompt + continuation; int32 `(batch,)` valid tokens per row (end-of-text or stop
        included), the rest filler; `TokenLogprobs` of shape `(batch, prompt_length +
        max_new_tokens)`, set at the continuation's positions (zeros elsewhere, and of length 0
        when `logprobs` is False).
    """
    sampling = graph_sampling(sampling)
    prompt_ids = tf.cast(prompt_ids, tf.int32)
    prompt_lengths = tf.cast(prompt_lengths, tf.int32)
    max_new_tokens = tf.cast(max_new_tokens, tf.int32)
    stop_ids = tf.zeros([0, 1], tf.int32) if stop_ids is None else tf.cast(stop_ids, tf.int32)
    batch_size = tf.shape(prompt_ids)[0]
    total_length = tf.shape(prompt_ids)[1] + max_new_tokens
    tokens = tf.pad(prompt_ids, [[0, 0], [0, max_new_tokens]])
    start = tf.reduce_min(prompt_lengths)
    if sequence_length is None:
        max_length, window = total_length, 0
    else:
        max_length = tf.minimum(total_length, sequence_length)
        window = default_window(sequence_length) if window is None else window
    logits, state = prefill(model, tokens[:, :start], max_length, window, penalties)
    sampled, recorded = draw(logits, state, sampling, logprobs)
    limits = prompt_lengths + max_new_tokens
    # The log-probabilities of the token drawn for each position (length 0: none recorded).
    empty = empty_logprobs(tf.stack([batch_size, total_length if logprobs is not False else 0]),
                           logits.shape[-1])
    record = lambda buffers, values, index: TokenLogprobs(*(  # noqa: E731
        write_position(buffer, value, index) for buffer, value in zip(buffers, values)))
    recorded = empty if logprobs is False else record(empty, recorded, start)

    def condition(state, sampled, tokens, lengths, done, recorded):
        return tf.logical_and(state.position < total_length, tf.logical_not(tf.reduce_all(done)))

    def body(state, sampled, tokens, lengths, done, recorded):
        index = state.position  # of `sampled`, the token this step feeds
        in_prompt = index < prompt_lengths
        token = tf.where(in_prompt, tokens[:, index], sampled)
        token = tf.where(done, tf.fill([batch_size], tf.maximum(end_of_text_id, 0)), token)
        tokens = write_column(tokens, token, index)
        # A row ends at end-of-text, a stop, or once it has max_new_tokens tokens past its prompt.
        ended = tf.logical_or(tf.equal(token, end_of_text_id), index + 1 >= limits)
        ended = tf.logical_or(ended, ends_with_stop(tokens, index + 1, prompt_lengths, stop_ids))
        finished = tf.logical_and(tf.logical_not(done), tf.logical_and(~in_prompt, ended))
        lengths = tf.where(finished, index + 1, lengths)
        done = tf.logical_or(done, finished)
        sampled, state, values = step(model, state, token, sampling, logprobs, generated=~in_prompt)
        if logprobs is not False:
            recorded = tf.cond(tf.convert_to_tensor(logprobs), lambda: record(recorded, values, index + 1),
                               lambda: recorded)
        return state, sampled, tokens, lengths, done, recorded

    logprobs_shape = tf.TensorShape([None, None])
    _, _, tokens, lengths, _, recorded = tf.while_loop(
        condition,
        body,
        (state, sampled, tokens, limits, tf.zeros([batch_size], tf.bool), recorded),
        shape_invariants=(
            state_shape_invariants(state),
            tf.TensorShape([None]),
            tf.TensorShape([None, None]),
            tf.TensorShape([None]),
            tf.TensorShape([None]),
            TokenLogprobs(logprobs_shape, logprobs_shape.concatenate(recorded.top.shape[2:]),
                          logprobs_shape.concatenate(recorded.top.shape[2:])),
        ),
    )
    return tokens, lengths, recorded


# --- checks shared by the loops and their drivers --------------------------------------------------


def check_max_new_tokens(max_new_tokens, sequence_length):
    """Raises `ValueError` unless `1 <= max_new_tokens <= MAX_NEW_TOKENS`."""
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} is out of range; choose 1 to {MAX_NEW_TOKENS} (past the "
            f"context of {sequence_length} tokens, generation continues from the last "
            f"{default_window(sequence_length)})."
        )


def check_window(window, sequence_length):
    """`window` (default `default_window(sequence_length)`); `ValueError` outside `[1, sequence_length)`."""
    window = default_window(sequence_length) if window is None else window
    if not 1 <= window < sequence_length:
        raise ValueError(
            f"window={window} must be 1 to {sequence_length - 1}: the tokens kept when generation "
            f"passes the context of {sequence_length}."
        )
    return window


def check_prompt_length(length, sequence_length):
    """Raises `ValueError` unless a prompt of `length` tokens fits the context."""
    if length < 1:
        raise ValueError("Every prompt needs at least one token; got an empty prompt.")
    if length > sequence_length:
        raise ValueError(
            f"A prompt of {length} tokens does not fit the model's context of {sequence_length}; "
            f"keep its last {sequence_length} tokens."
        )


def check_jit_compile(model, jit_compile):
    """`cached(model)`; `ValueError` for XLA (`jit_compile`) without a key/value cache."""
    decoding_model = cached(model)
    if jit_compile and isinstance(decoding_model, CausalRecomputation):
        # Seen with the GRU baseline: under XLA the loop returned token 0 at every step.
        raise ValueError(
            f"{type(model).__name__} has no key/value cache and decodes by recomputation, "
            "which runs without XLA; pass jit_compile=False."
        )
    return decoding_model


def check_options(max_new_tokens, sequence_length, sampling=None, num_beams=1, num_return_sequences=1):
    """Raises `ValueError` with a fix for length and beam options that cannot work with `sampling`."""
    temperature = None if sampling is None else sampling.temperature
    check_max_new_tokens(max_new_tokens, sequence_length)
    if num_beams < 1:
        raise ValueError(f"beams={num_beams} must be >= 1 (1 means no beam search).")
    if num_beams > 1 and max_new_tokens >= sequence_length:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} does not fit the model's context of {sequence_length} "
            f"tokens, and beam search stays within the context; choose 1 to {sequence_length - 1}, "
            "or decode without beams (greedy or sampling continue past the context)."
        )
    if num_beams > 1 and temperature is not None:
        raise ValueError("Beam search is deterministic; use either beams > 1 or a sampling temperature.")
    if num_beams > 1 and has_penalties(sampling):
        raise ValueError(
            "Beam search takes no penalties (frequency, presence or repetition); use them with greedy "
            "or sampled decoding, or leave them out."
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


def default_window(sequence_length):
    """Tokens kept when generation passes the context: half of it (at least 1)."""
    return max(1, sequence_length // 2)


def prompt_room(sequence_length, max_new_tokens, num_beams=1):
    """Prompt tokens kept: what leaves room for `max_new_tokens` in the context, and past the
    context (not for beams) at least `default_window`, the context every rebuild keeps anyway."""
    room = sequence_length - max_new_tokens
    return room if num_beams > 1 else max(room, default_window(sequence_length))


