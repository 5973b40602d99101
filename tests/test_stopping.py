"""Stop sequences: the one text rule (`stop_spans`) in a graph, in Python and streamed piece by piece,
against a plain reference of the rule, and the post-processing of decoded rows (`continuations`)."""

import random

import numpy as np
import pytest
import tensorflow as tf

from kgpt.generation.stopping import (
    StopText,
    compiled_continuations,
    continuations,
    cut_at_stop,
    cut_at_stop_tensor,
    stop_spans,
)
from kgpt.serving import openai_api
from kgpt.tokenizers.char import train_characters


def reference_cut(text, stops):
    """The rule, plainly: `text` before the stop occurrence that ends first (ties: the one that
    starts first, the longer stop), over every occurrence of every stop."""
    occurrences = [(start + len(stop), start) for stop in stops for start in range(len(text))
                   if text.startswith(stop, start)]
    return text[: min(occurrences)[1]] if occurrences else text


def reference_held(text, stops):
    """The longest tail of `text` that begins a stop (a proper prefix of one), where none occurs."""
    if reference_cut(text, stops) != text or any(stop in text for stop in stops):
        return ""
    size = max([k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])], default=0)
    return text[len(text) - size:]


# Multi-byte characters too: the graph counts UTF-8 bytes, Python characters.
ALPHABET = "ab\né日😀"
CASES = [  # (text, stops, cut text)
    ("ab\n\nbba", ["ab\n\n", "\n"], "ab"),  # "\n" ends first, though "ab\n\n" starts first
    ("xabcd", ["abc", "bc"], "x"),  # both end at 4: the one starting first
    ("xabcd", ["bc", "abcd"], "xa"),
    ("café 日本語", ["日本", "語"], "café "),
    ("a😀b", ["😀"], "a"),
    ("no stop here", ["zz", "q"], "no stop here"),
    ("", ["a"], ""),
    ("stop", ["stop"], ""),
    ("abc", [], "abc"),
]


def _random_cases(count, seed=0):
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 14)))
        stops = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cases.append((text, stops))
    return cases


def _in_graph(texts, stops):
    """`stop_spans` and `cut_at_stop_tensor` inside one `tf.function`, as the export runs them."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)] * 2)
    def spans(texts, stops):
        return (*stop_spans(texts, stops), cut_at_stop_tensor(texts, stops))

    cut, held, kept = spans(tf.constant(texts, tf.string), tf.constant(stops, tf.string, shape=[len(stops)]))
    return cut.numpy().tolist(), held.numpy().tolist(), [k.decode("utf-8") for k in kept.numpy()]


def test_the_cases_of_the_rule():
    for text, stops, expected in CASES:
        assert reference_cut(text, stops) == expected, (text, stops)
        assert cut_at_stop(text, stops) == expected, (text, stops)
        assert _in_graph([text], stops)[2] == [expected], (text, stops)
    assert openai_api.StopText is StopText  # the API streams with the one rule


def test_graph_and_python_cut_and_hold_back_as_the_reference():
    rng = random.Random(1)
    for _ in range(12):  # a batch of texts per set of stops, as a request has
        stops = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))]
        texts = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 16))) for _ in range(12)]
        texts += [stop[: len(stop) - 1] for stop in stops] + ["x" + stops[0]]  # tails that begin a stop
        cut, held, kept = _in_graph(texts, stops)
        for text, cut_bytes, held_bytes, graph_text in zip(texts, cut, held, kept):
            expected = reference_cut(text, stops)
            assert graph_text == expected == cut_at_stop(text, stops), (text, stops)
            data = text.encode("utf-8")
            assert (cut_bytes >= 0) == any(stop in text for stop in stops)
            assert data[: cut_bytes if cut_bytes >= 0 else len(data)].decode("utf-8") == expected
            assert data[len(data) - held_bytes:].decode("utf-8") == reference_held(text, stops), (text, stops)


def _streamed(text, stops, cuts):
    stop = StopText(stops)
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    sent = [stop.add(piece, final=index == len(pieces) - 1) for index, piece in enumerate(pieces)]
    return "".join(sent), stop.stopped


@pytest.mark.parametrize("cases", [CASES, _random_cases(40)], ids=["cases", "random"])
def test_streamed_text_is_cut_as_the_whole_text_however_it_is_split(cases):
    for text, stops, *_ in cases:
        expected = (reference_cut(text, stops), any(stop in text for stop in stops))
        splits = [[]] + [[i] for i in range(len(text) + 1)] + [list(range(1, len(text)))]  # one piece,
        for cuts in splits:  # two pieces split at every position (empty ones too), one per character
            assert _streamed(text, stops, cuts) == expected, (text, stops, cuts)


def test_a_stream_holds_back_only_what_may_begin_a_stop():
    stop = StopText(["\n\n", "END"])
    assert stop.add("one\n") == "one" and stop.pending == "\n"
    assert stop.add("two E") == "\ntwo " and stop.pending == "E"
    assert stop.add("N") == "" and stop.add("D and more") == "" and stop.stopped
    assert stop.add("ignored", final=True) == ""
    open_ended = StopText(["\n\n"])
    assert open_ended.add("last\n", final=True) == "last\n" and not open_ended.stopped


@pytest.fixture(scope="module")
def tokenizer():
    return train_characters(["abcdef \n"])


def test_continuations_drop_the_ending_id_and_cut_at_a_stop_in_and_out_of_a_graph(tokenizer):
    end = tokenizer.end_of_text_id
    ids = {c: int(tokenizer.encode_documents([c])[0][0]) for c in "abcdef "}
    a, b, c, d, e, f, space = (ids[k] for k in "abcdef ")
    # Prompts of 2 and 1 tokens (row 1 left-aligned after its prompt), then 4 new tokens at most.
    tokens = np.array([
        [a, b, c, d, end, 0],  # ended by end-of-text
        [a, c, f, e, c, 0],  # ended by length: 4 new tokens
        [a, b, e, f, 0, 0],  # ended early by the decode loop (a stop string's tokens)
        [a, b, c, space, d, 0],  # ended by stop token id `space`
        [a, b, c, d, e, f],  # cut before the stop string "de", its tokens counted
    ], np.int32)
    ends = np.array([5, 5, 4, 4, 6], np.int32)
    lengths = np.array([2, 1, 2, 2, 2], np.int32)
    stop, stop_token_ids = tf.constant(["de", "xyz"]), tf.constant([space], tf.int32)
    expected = {
        "text": [b"cd", b"cfec", b"ef", b"c", b"c"],
        "token_count": [2, 4, 2, 1, 4],
        "stopped": [True, False, True, True, True],
    }
    arguments = (tokens, ends, lengths, np.int32(4), stop, stop_token_ids)
    eager = continuations(tokenizer, *map(tf.convert_to_tensor, arguments))
    compiled = compiled_continuations(tokenizer)(*arguments)
    for outputs in (eager, compiled):
        assert {key: getattr(outputs, key).numpy().tolist() for key in expected} == expected
        assert outputs.token_ids.numpy().tolist()[:2] == [[c, d, tokenizer.padding_id, tokenizer.padding_id],
                                                             [c, f, e, c]]
