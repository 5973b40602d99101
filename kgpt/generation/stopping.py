"""Stop sequences: their checks, the in-graph test that a row's tokens end with one, and the text cut.

A row ends at the first stop. Stop token ids end it like end-of-text and are dropped. A stop string
is matched twice: in the decode loop, against its own tokenization (an early end that needs no text),
and on the text, which is cut before the occurrence that completes first. The text rule alone decides
what is returned (a string can span tokens that tokenize it differently), so the result is the
generation without stops, cut before its first stop, never containing one.
"""

import numpy as np
import tensorflow as tf

# Stop strings and stop token ids of one request together, as OpenAI's API allows four.
MAX_STOPS = 16
_PAD = -1  # left padding of a stop's ids: matches any token


def check_stops(stop=None, stop_token_ids=None, vocabulary_size=None):
    """Validates stop sequences; returns `(strings, token_ids)` as tuples.

    Args:
        stop: a string or a list of non-empty strings (None: none).
        stop_token_ids: a list of token ids, each in `[0, vocabulary_size)` (None: none).
    """
    strings = () if stop is None else (stop,) if isinstance(stop, str) else stop
    ids = () if stop_token_ids is None else stop_token_ids
    if not isinstance(strings, (list, tuple)):
        raise ValueError(f"stop={stop!r} must be a string or a list of strings.")
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"stop_token_ids={stop_token_ids!r} must be a list of token ids.")
    for text in strings:
        if not isinstance(text, str) or not text:
            raise ValueError(f"Stop sequence {text!r} must be a non-empty string.")
    for token in ids:
        integer = isinstance(token, (int, np.integer)) and not isinstance(token, bool)
        if not integer or not (token >= 0 and (vocabulary_size is None or token < vocabulary_size)):
            bound = "" if vocabulary_size is None else f" in [0, {vocabulary_size})"
            raise ValueError(f"Stop token id {token!r} must be an integer{bound}.")
    if len(strings) + len(ids) > MAX_STOPS:
        raise ValueError(
            f"{len(strings) + len(ids)} stop sequences given; at most {MAX_STOPS} (strings and "
            "token ids together) are allowed."
        )
    return tuple(strings), tuple(int(token) for token in ids)


def stop_id_matrix(sequences):
    """Token-id sequences as int32 `(len(sequences), longest)`, left-padded with -1 (at least 1 column)."""
    width = max([len(sequence) for sequence in sequences] + [1])
    matrix = np.full((len(sequences), width), _PAD, np.int32)
    for row, sequence in enumerate(sequences):
        if sequence:
            matrix[row, width - len(sequence):] = sequence
    return matrix


def matched_stop_lengths(suffix, stop_ids, room):
    """Per stop, its length where `suffix` ends with it inside the continuation, else 0.

    Args:
        suffix: int32 `(..., length)`, the last `length = stop_ids.shape[1]` tokens of each row.
        stop_ids: int32 `(stops, length)` from `stop_id_matrix`.
        room: int32 broadcastable to `(...,)`: continuation tokens in each row's suffix.

    Returns:
        int32 `(..., stops)`.
    """
    lengths = tf.reduce_sum(tf.cast(stop_ids >= 0, tf.int32), axis=1)  # (stops,)
    agree = tf.logical_or(stop_ids < 0, tf.equal(suffix[..., None, :], stop_ids))  # (..., stops, length)
    matched = tf.reduce_all(agree, axis=-1) & (lengths > 0) & (lengths <= tf.expand_dims(room, -1))
    return tf.where(matched, lengths, 0)


def ends_with_stop(tokens, end, prompt_lengths, stop_ids):
    """Bool `(...)`: the tokens before `end` (a scalar) end with a stop inside the continuation.

    Args:
        tokens: int32 `(..., total)`; `prompt_lengths` broadcasts to `(...)`.
    """
    width = tf.shape(stop_ids)[1]
    positions = tf.maximum(end - width + tf.range(width), 0)  # (width,)
    suffix = tf.gather(tokens, positions, axis=-1)  # (..., width)
    return tf.reduce_any(matched_stop_lengths(suffix, stop_ids, end - prompt_lengths) > 0, axis=-1)


def graph_stop_ids(tokenizer, stop, stop_token_ids):
    """In a graph: `stop_id_matrix` of the strings `stop` (`[S]`) and the ids `stop_token_ids` (`[K]`).

    A string whose tokens do not detokenize back to it (normalised, or unknown characters) gets no
    id sequence: the text cut still applies, but the loop does not end early at it.
    """
    ids = tokenizer.tokenize(stop)  # ragged (S, None)
    ids = tf.concat([ids, tf.RaggedTensor.from_tensor(stop_token_ids[:, None])], axis=0)
    lengths = tf.cast(ids.row_lengths(), tf.int32)
    round_trip = tf.equal(tokenizer.detokenize(ids[: tf.size(stop)]), stop)
    lengths = lengths * tf.cast(tf.concat([round_trip, tf.ones_like(stop_token_ids, tf.bool)], 0), tf.int32)
    width = tf.maximum(tf.reduce_max(tf.concat([lengths, [1]], 0)), 1)
    dense = ids.to_tensor(default_value=0, shape=[None, None])
    dense = tf.pad(dense, [[0, 0], [0, 1]])  # at least one column
    # Right-align: column j of a stop of length n holds its token j - (width - n).
    source = tf.range(width)[None, :] - (width - lengths)[:, None]
    valid = source >= 0
    return tf.where(valid, tf.gather(dense, tf.maximum(source, 0), batch_dims=1), _PAD)


def cut_at_stop(text, stop):
    """`text` before the stop occurrence that ends first (ties: the longer stop), else `text`."""
    best = None
    for string in stop:
        start = text.find(string)
        if start >= 0:
            candidate = (start + len(string), start)
            best = candidate if best is None else min(best, candidate)
    return text if best is None else text[: best[1]]


def cut_at_stop_tensor(texts, stop):
    """`cut_at_stop` in a graph: `tf.string` `[batch]` texts, `[S]` non-empty stop strings."""
    lengths = tf.strings.length(texts)  # bytes
    best_end = lengths + 1  # past any match: none yet
    best_start = lengths

    def cut_one(index, best_end, best_start):
        string = stop[index]
        pieces = tf.strings.split(texts, sep=string, maxsplit=1)  # (batch, 1 or 2)
        found = tf.equal(pieces.row_lengths(), 2)
        start = tf.strings.length(pieces.to_tensor(default_value="")[:, 0])
        end = start + tf.strings.length(string)
        better = found & ((end < best_end) | ((end == best_end) & (start < best_start)))
        return index + 1, tf.where(better, end, best_end), tf.where(better, start, best_start)

    _, _, best_start = tf.while_loop(
        lambda index, *_: index < tf.size(stop), cut_one, (tf.constant(0), best_end, best_start),
        shape_invariants=(tf.TensorShape([]), tf.TensorShape([None]), tf.TensorShape([None])),
    )
    return tf.strings.substr(texts, tf.zeros_like(best_start), best_start)


def graph_stop_checks(stop, stop_token_ids, vocabulary_size):
    """Assertion ops (INVALID_ARGUMENT messages) for the stop inputs of a serving signature."""
    return [
        tf.debugging.assert_less_equal(
            tf.size(stop) + tf.size(stop_token_ids), MAX_STOPS,
            message=f"too many stop sequences: at most {MAX_STOPS} (stop and stop_token_ids together)",
        ),
        tf.debugging.assert_positive(
            tf.strings.length(stop), message="stop sequences must be non-empty strings"
        ),
        tf.debugging.assert_non_negative(stop_token_ids, message="stop_token_ids must be >= 0"),
        tf.debugging.assert_less(
            stop_token_ids, vocabulary_size,
            message=f"stop_token_ids must be < vocabulary_size={vocabulary_size}",
        ),
    ]
