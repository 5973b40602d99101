"""Beam search on the decode step's prefill and cached call (`kgpt.generation.decoding`), as one graph."""

import tensorflow as tf

from kgpt.generation.decoding import (
    feed,
    prefill,
    state_shape_invariants,
    write_column,
)
from kgpt.generation.stopping import ends_with_stop

_NEGATIVE_INFINITY = float("-inf")


def beam_search(model, prompt_ids, prompt_lengths, max_new_tokens, num_beams, end_of_text_id=-1,
                length_penalty=1.0, stop_ids=None):
    """Beam search over a right-padded batch of prompts, with `decode`'s arguments, within the context.

    Each step scores the `2 * num_beams` best extensions: those ending in end-of-text or a stop
    (all, at the last step) finish, scored `log_probability / new_tokens ** length_penalty`; the
    best others stay live. A prompt stops at `num_beams` finished hypotheses (Hugging Face's
    `early_stopping=True`). The cache is `prefill`'s, reordered to follow the beams before each `feed`.

    Args:
        num_beams: hypotheses kept per prompt: a Python int, or a scalar tensor (an exported
            signature's input; then XLA cannot compile the search, whose `top_k` widths vary).
        length_penalty: 0 compares raw log-probabilities; larger values favour longer hypotheses.

    Returns:
        `(tokens, lengths, scores)`, best first: int32 `(batch, num_beams, prompt_length +
        max_new_tokens)`, int32 `(batch, num_beams)`, float32 `(batch, num_beams)`.
    """
    beams = num_beams if tf.is_tensor(num_beams) else int(num_beams)
    beams_dimension = None if tf.is_tensor(beams) else beams
    stop_ids = tf.zeros([0, 1], tf.int32) if stop_ids is None else tf.cast(stop_ids, tf.int32)
    prompt_ids = tf.cast(prompt_ids, tf.int32)
    prompt_lengths = tf.cast(prompt_lengths, tf.int32)
    max_new_tokens = tf.cast(max_new_tokens, tf.int32)
    length_penalty = tf.cast(length_penalty, tf.float32)
    batch_size = tf.shape(prompt_ids)[0]
    total_length = tf.shape(prompt_ids)[1] + max_new_tokens
    tokens = tf.pad(prompt_ids, [[0, 0], [0, max_new_tokens]])
    tokens = tf.repeat(tokens[:, None], beams, axis=1)  # (batch, beams, total)
    start = tf.reduce_min(prompt_lengths)
    # Within the context: a cache for every position, never rebuilt (window 0).
    logits, state = prefill(model, tf.reshape(tokens, [batch_size * beams, -1])[:, :start], total_length,
                           penalties=False)
    limits = prompt_lengths + max_new_tokens
    # Only beam 0 is live at first, so the first expansion does not pick the same token K times.
    alive_scores = tf.tile(tf.where(tf.range(beams) == 0, 0.0, _NEGATIVE_INFINITY)[None, :], [batch_size, 1])
    finished_tokens = tf.zeros_like(tokens)
    finished_scores = tf.fill([batch_size, beams], _NEGATIVE_INFINITY)
    finished_lengths = tf.zeros([batch_size, beams], tf.int32)
    done = tf.zeros([batch_size], tf.bool)

    def condition(state, *rest):  # rest[-1]: done
        return tf.logical_and(state.position < total_length, tf.logical_not(tf.reduce_all(rest[-1])))

    def body(
        state, tokens, next_logits, alive_scores, finished_tokens, finished_scores, finished_lengths, done,
    ):
        index = state.position
        vocabulary_size = tf.shape(next_logits)[-1]
        log_probabilities = tf.nn.log_softmax(next_logits)
        log_probabilities = tf.reshape(log_probabilities, [batch_size, beams, vocabulary_size])
        scores = tf.reshape(alive_scores[:, :, None] + log_probabilities, [batch_size, -1])
        candidate_scores, candidate_ids = tf.math.top_k(scores, k=2 * beams)  # (batch, 2K)
        parents = candidate_ids // vocabulary_size
        candidate_tokens = candidate_ids % vocabulary_size
        # (batch, 2K, total): each candidate's parent sequence with the new token written in.
        candidates = write_column(tf.gather(tokens, parents, batch_dims=1), candidate_tokens, index)

        new_tokens = tf.cast(index + 1 - prompt_lengths, tf.float32)[:, None]  # (batch, 1)
        is_end = tf.equal(candidate_tokens, end_of_text_id)
        is_end = is_end | ends_with_stop(candidates, index + 1, prompt_lengths[:, None], stop_ids)
        last_step = (index + 1 >= limits)[:, None]
        finishes = tf.logical_or(is_end, last_step)
        normalised = candidate_scores / tf.pow(tf.maximum(new_tokens, 1.0), length_penalty)
        generating = tf.logical_and(index >= prompt_lengths, tf.logical_not(done))  # (batch,)
        normalised = tf.where(finishes & generating[:, None], normalised, _NEGATIVE_INFINITY)
        # Merge the new finished hypotheses into the pool and keep the best K.
        pool_scores = tf.concat([finished_scores, normalised], axis=1)
        pool_tokens = tf.concat([finished_tokens, candidates], axis=1)
        new_lengths = tf.fill(tf.shape(candidate_tokens), index + 1)
        pool_lengths = tf.concat([finished_lengths, new_lengths], axis=1)
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
        done = done | (generating & (full | last_step[:, 0]))

        # The state follows the parents, then each beam's token at `index` is fed.
        state = state.take(tf.reshape(parents + tf.range(batch_size)[:, None] * beams, [-1]))
        next_logits, state = feed(model, state, tf.reshape(tokens[:, :, index], [-1]))
        return (
            state, tokens, next_logits, alive_scores, finished_tokens, finished_scores,
            finished_lengths, done,
        )

    final = tf.while_loop(
        condition,
        body,
        (state, tokens, logits, alive_scores, finished_tokens, finished_scores, finished_lengths, done),
        shape_invariants=(
            state_shape_invariants(state),
            tf.TensorShape([None, beams_dimension, None]),
            tf.TensorShape([None, None]),
            tf.TensorShape([None, beams_dimension]),
            tf.TensorShape([None, beams_dimension, None]),
            tf.TensorShape([None, beams_dimension]),
            tf.TensorShape([None, beams_dimension]),
            tf.TensorShape([None]),
        ),
    )
    return final[4], final[6], final[5]
