"""Stop sequences: their checks, the in-graph test that a row's tokens end with one, the text rule,
and the post-processing of decoded rows that applies them.

A row ends at the first stop. Stop token ids end it like end-of-text and are dropped. A stop string
is matched twice: in the decode loop, against its own tokenization (an early end that needs no text),
and on the text, which is cut before the occurrence that ends first. The text rule alone decides
what is returned (a string can span tokens that tokenize it differently), so the result is the
generation without stops, cut before its first stop, never containing one. The text rule is one
function of graph ops (`stop_spans`), which the export's graph, `Generator` (`continuations`) and
streamed text (`StopText`, compiled) all run.
"""

import typing

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


def stop_spans(texts, stop):
    """The stop rule, once for the graph and for Python: where each text is cut, and what a stream
    of it must hold back.

    A text is cut before the stop occurrence that ends first (ties: the one that starts first, the
    longer stop). Where no stop occurs yet, the text's longest tail that begins a stop (a proper
    prefix of one) may still become one: a stream holds it back until more text or the end comes.
    So a stream that sends `texts[:length - held]` until a cut, then the text before the cut, sends
    the cut of the whole text however it arrives. Offsets count UTF-8 bytes; a valid UTF-8 stop
    occurs in valid UTF-8 text only at character boundaries, so they cut between characters.

    Args:
        texts: `tf.string` `[batch]`.
        stop: `tf.string` `[S]`, non-empty strings.

    Returns:
        `(cut, held)`, int32 `[batch]` each: the byte offset each text is cut at (-1: no stop
        occurs), and the bytes at its end that begin a stop (0 where one occurs).

    Example:
        stop_spans(tf.constant(["a\\n\\nb", "a\\n"]), tf.constant(["\\n\\n"]))  # ([1, -1], [0, 1])
    """
    lengths = tf.strings.length(texts)  # bytes
    batch_size = tf.shape(texts)[0]

    def one_stop(index, best_end, best_start, held):
        string = stop[index]
        size = tf.strings.length(string)
        # Its first occurrence, the one of this stop that ends first.
        pieces = tf.strings.split(texts, sep=string, maxsplit=1)  # (batch, 1 or 2)
        found = tf.equal(pieces.row_lengths(), 2)
        start = tf.strings.length(pieces.to_tensor(default_value="", shape=[None, 2])[:, 0])
        end = start + size
        better = found & ((end < best_end) | ((end == best_end) & (start < best_start)))
        # The texts' tails of 1 to size - 1 bytes, against the stop's prefixes as long.
        tail = tf.range(1, size)  # (size - 1,)
        shape = [batch_size, size - 1]
        tails = tf.strings.substr(
            tf.broadcast_to(texts[:, None], shape), tf.maximum(lengths[:, None] - tail, 0),
            tf.broadcast_to(tail, shape),
        )
        prefixes = tf.strings.substr(tf.fill([size - 1], string), tf.zeros_like(tail), tail)
        begins = tf.equal(tails, prefixes) & (tail <= lengths[:, None])  # (batch, size - 1)
        # The max over no tails (a 1-byte stop) is int32's least: `maximum` keeps `held`.
        held = tf.maximum(held, tf.reduce_max(tf.where(begins, tail, 0), axis=1))
        return index + 1, tf.where(better, end, best_end), tf.where(better, start, best_start), held

    _, best_end, best_start, held = tf.while_loop(
        lambda index, *_: index < tf.size(stop), one_stop,
        (tf.constant(0), lengths + 1, lengths, tf.zeros_like(lengths)),  # best_end past any match: none yet
        shape_invariants=(tf.TensorShape([]),) + (tf.TensorShape([None]),) * 3,
    )
    found = best_end <= lengths
    return tf.where(found, best_start, -1), tf.where(found, 0, held)


_compiled_stop_spans = tf.function(stop_spans, input_signature=[tf.TensorSpec([None], tf.string)] * 2)


def cut_at_stop_tensor(texts, stop):
    """`texts` (`tf.string` `[batch]`) before their first stop (`stop_spans`): in a graph or eagerly."""
    cut, _ = stop_spans(texts, stop)
    return tf.strings.substr(texts, tf.zeros_like(cut), tf.where(cut >= 0, cut, tf.strings.length(texts)))


class StopText:
    """A text that grows piece by piece, cut at the first of `stops` (`stop_spans`, compiled):
    what may be sent holds back a tail that may begin a stop, so the pieces sent join to the cut
    of the whole text however it was split.

    Args:
        stops: stop strings (a list; empty: nothing is cut or held back).

    Example:
        stop = StopText(["\\n\\n"])
        stop.add("a\\n"), stop.add("\\nb")  # "a", "" (and stop.stopped)
    """

    def __init__(self, stops):
        self.stops = list(stops)
        self._stops = tf.constant([s.encode("utf-8", "surrogatepass") for s in self.stops], tf.string,
                                  shape=[len(self.stops)])
        self.pending = ""  # received, not sent: no stop can begin before it
        self.stopped = False

    def add(self, piece, final=False):
        """The text that may be sent now, after `piece` arrived (all of it if `final`)."""
        if self.stopped:
            return ""
        text, self.pending = self.pending + piece, ""
        if not self.stops:
            return text
        data = text.encode("utf-8", "surrogatepass")
        cut, held = (int(value[0]) for value in _compiled_stop_spans(tf.constant([data]), self._stops))
        self.stopped = cut >= 0
        end = cut if self.stopped else len(data) if final else len(data) - held
        self.pending = data[end:].decode("utf-8", "surrogatepass") if not self.stopped else ""
        return data[:end].decode("utf-8", "surrogatepass")


def cut_at_stop(text, stop):
    """`text` (a `str`) before its first stop (`stop_spans`): the whole text through `StopText`."""
    return StopText(stop).add(text, final=True)


class Continuations(typing.NamedTuple):
    """Decoded rows after post-processing (`continuations`), one entry per row.

    Args:
        text: `tf.string` (batch,), without end-of-text or a stop token id, cut before a stop string.
        token_ids: int32 (batch, longest), padded with the tokenizer's padding id.
        token_count: int32 (batch,): a stop string's tokens counted, an ending id not.
        stopped: bool (batch,): ended by end-of-text or a stop (an id, a stop string's tokens or its
            text), not by length.
    """

    text: typing.Any
    token_ids: typing.Any
    token_count: typing.Any
    stopped: typing.Any


def continuations(tokenizer, tokens, ends, lengths, max_new_tokens, stop, stop_token_ids):
    """Decoded rows as continuations: the one post-processing of the export's graph and `Generator`.

    Row i's continuation is `tokens[i, lengths[i]:ends[i]]` without the end-of-text or stop token id
    that ended it; its text is cut before its first stop string (`cut_at_stop_tensor`). Graph ops:
    inside a `tf.function` where `tokenizer.graph_compatible`, else called eagerly.

    Args:
        tokenizer: a kgpt tokenizer (its `detokenize`, `end_of_text_id`, `padding_id`).
        tokens: int32 `(batch, length)`; `ends`, `lengths`: int32 `(batch,)`, each row's valid
            tokens (as `kgpt.generation.decoding.decode` returns them) and where its continuation starts.
        max_new_tokens: int32 scalar, the tokens each row was allowed.
        stop: `tf.string` `[S]`; stop_token_ids: int32 `[K]`.

    Returns:
        `Continuations`.
    """
    last = tf.gather(tokens, tf.maximum(ends - 1, 0), batch_dims=1)
    enders = tf.concat([[tokenizer.end_of_text_id], stop_token_ids], 0)
    ended = tf.reduce_any(tf.equal(last[:, None], enders[None, :]), axis=1) & (ends > lengths)
    counts = tf.maximum(ends - lengths - tf.cast(ended, tf.int32), 0)
    width = tf.reduce_max(tf.concat([counts, [0]], 0))
    positions = lengths[:, None] + tf.range(width)[None, :]
    valid = tf.range(width)[None, :] < counts[:, None]
    new = tf.gather(tokens, tf.where(valid, positions, 0), batch_dims=1)
    new = tf.where(valid, new, tokenizer.padding_id)
    text = tokenizer.detokenize(tf.RaggedTensor.from_tensor(new, lengths=counts))
    kept = cut_at_stop_tensor(text, stop)
    cut = tf.strings.length(kept) < tf.strings.length(text)
    stopped = ended | (ends - lengths < max_new_tokens) | cut
    return Continuations(text=kept, token_ids=new, token_count=counts, stopped=stopped)


def compiled_continuations(tokenizer):
    """`continuations` for `tokenizer` on tensors, as one `tf.function` call where the tokenizer
    runs in a graph, else eagerly (tiktoken's o200k_base, cl100k_base)."""

    def function(tokens, ends, lengths, max_new_tokens, stop, stop_token_ids):
        return continuations(tokenizer, tokens, ends, lengths, max_new_tokens, stop, stop_token_ids)

    if not tokenizer.graph_compatible:
        return function
    vector = tf.TensorSpec([None], tf.int32)
    return tf.function(function, input_signature=[
        tf.TensorSpec([None, None], tf.int32), vector, vector, tf.TensorSpec([], tf.int32),
        tf.TensorSpec([None], tf.string), vector,
    ])


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
