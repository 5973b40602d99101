"""Streaming: `StepDecoder` yields `decode`'s tokens one step at a time (past the context too, with
or without a key/value cache); `stream_pieces` gives one piece per token; `TextDeltas` never splits
a character."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_decoding import _greedy_past_the_context  # the no-cache reference

from kgpt.generation.decoder import Decoder
from kgpt.generation.sampling import SamplingOptions
from kgpt.generation.streaming import RowTexts, StepDecoder, TextDeltas, stream_pieces
from kgpt.model.gpt import build_model
from kgpt.model.recurrent import RecurrentLanguageModel
from kgpt.tokenizers.bpe import train_bpe
from kgpt.tokenizers.char import train_characters


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return build_model(dict(vocabulary_size=32, sequence_length=16, num_layers=2, num_heads=2, hidden_dim=16))


def _stepped(decoder, prompt, steps, sampling=None, rows=1):
    """`(rows, tokens)` of a step decoder, cut after each row's end-of-text."""
    columns = np.stack([tokens for tokens, _ in decoder(prompt, steps, sampling, rows)], axis=1)
    out = []
    for row in columns.tolist():
        end = row.index(decoder.end_of_text_id) + 1 if decoder.end_of_text_id in row else len(row)
        out.append(row[:end])
    return out


def _cropped_greedy(model, prompt, steps, context=16, window=8):
    return _greedy_past_the_context(model, prompt, steps, context, window)


def test_greedy_steps_equal_full_recomputation(model):
    steps = StepDecoder(model, 16)
    for prompt in ([5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]):
        assert _stepped(steps, prompt, 6) == [_cropped_greedy(model, prompt, 6)]


@pytest.mark.slow  # ~15 s on 2 cores
def test_greedy_steps_past_the_context_restart_from_the_last_window(model):
    steps = StepDecoder(model, 16)
    # 40 new tokens on a context of 16: the cache is rebuilt from the last 8 tokens every 8 tokens.
    for prompt in ([5, 6, 7], list(range(1, 17))):
        assert _stepped(steps, prompt, 40) == [_cropped_greedy(model, prompt, 40)]
    narrow = StepDecoder(model, 16, window=3)
    assert _stepped(narrow, [5, 6, 7], 30) == [_cropped_greedy(model, [5, 6, 7], 30, window=3)]


@pytest.mark.slow  # tracing the decode loop takes ~15 s
@pytest.mark.parametrize("jit_compile", [False, True])
def test_steps_give_the_tokens_of_the_decode_loop(model, jit_compile):
    decoder = Decoder(model, end_of_text_id=3, jit_compile=jit_compile)
    steps = StepDecoder(model, 16, end_of_text_id=3, jit_compile=jit_compile)
    for prompt, count in (([5, 6, 7], 6), ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 6), ([5, 6, 7], 50)):
        assert _stepped(steps, prompt, count) == decoder([prompt], count)
    sampled = SamplingOptions(temperature=1.0, top_k=8, seed=4)
    for count in (8, 50):  # within the context, and past it (rows differ, so do their rebuilds)
        assert _stepped(steps, [5, 6], count, sampled, rows=3) == decoder(
            [[5, 6]], count, sampling=sampled, num_return_sequences=3)


def test_steps_stop_at_end_of_text_and_refuse_what_does_not_fit(model):
    greedy = int(np.argmax(model(np.array([[5, 6, 7]], "int32"))[0, -1]))  # the first token, made the end
    assert [t for t, _ in StepDecoder(model, 16, end_of_text_id=greedy)([5, 6, 7], 10)] == [[greedy]]
    with pytest.raises(ValueError, match="A prompt of 17 tokens does not fit the model's context of 16"):
        next(StepDecoder(model, 16)([1] * 17, 8))
    with pytest.raises(ValueError, match="window=16 must be 1 to 15"):
        StepDecoder(model, 16, window=16)


def test_a_model_without_a_cache_steps_by_recomputation():
    keras.utils.set_random_seed(0)
    gru = RecurrentLanguageModel(vocabulary_size=32, sequence_length=16, hidden_dim=16)
    ids = [5, 6, 7]
    for _ in range(3):
        ids.append(int(np.argmax(gru(np.array([ids], "int32"))[0, -1])))
    assert _stepped(StepDecoder(gru, 16), [5, 6, 7], 3) == [ids[3:]]
    with pytest.raises(ValueError, match="jit_compile=False"):
        StepDecoder(gru, 16, jit_compile=True)


@pytest.mark.slow  # tracing the recomputation loop takes ~10 s
def test_a_model_without_a_cache_steps_like_its_decode_loop_past_the_context():
    keras.utils.set_random_seed(0)
    gru = RecurrentLanguageModel(vocabulary_size=32, sequence_length=16, hidden_dim=16)
    decoder, steps = Decoder(gru, end_of_text_id=3), StepDecoder(gru, 16, end_of_text_id=3)
    count = 48  # 3x the context: the token buffer is rebuilt from the last 8 tokens every 8 tokens
    greedy = _stepped(steps, [5, 6, 7], count)
    assert greedy == decoder([[5, 6, 7]], count) and len(greedy[0]) > 16
    sampled = SamplingOptions(temperature=1.0, seed=2)
    rows = _stepped(steps, [5, 6], count, sampled, rows=2)
    assert rows == decoder([[5, 6]], count, sampling=sampled, num_return_sequences=2)
    assert rows[0] != rows[1] and max(len(row) for row in rows) > 16


def test_stream_pieces_are_one_per_token_and_close_the_steps():
    texts = lambda rows: ["".join(chr(97 + token) for token in row) for row in rows]  # noqa: E731
    read = []

    def steps():
        for tokens in ([1, 2], [0, 3], [4, 0], [5, 6]):  # end-of-text is 0
            read.append(tokens)
            yield np.array(tokens), None

    pieces = list(stream_pieces(steps(), texts, 0, 4, 2, 2))
    assert [(p.index, p.text, p.token_count, p.finish_reason) for p in pieces] == [
        (0, "b", 1, None), (1, "c", 1, None), (0, "", 1, "stop"), (1, "d", 2, None),
        (1, "", 2, "stop"),
    ]
    assert len(read) == 3 and all(p.prompt_token_count == 2 for p in pieces)  # both rows ended: no 4th step
    stream = stream_pieces(steps(), texts, -1, 4, 2, 2)
    assert [next(stream).text for _ in range(3)] == ["b", "c", "a"]
    read.clear()
    stream.close()  # closes the steps before their next call
    assert list(stream) == [] and read == []


def test_text_deltas_hold_a_partial_character_until_it_is_complete():
    deltas = TextDeltas()
    assert [deltas.update("ca"), deltas.update("caf\ufffd"), deltas.update("caf\ufffd\ufffd"),
            deltas.update("café"), deltas.update("café!", final=True)] == ["ca", "f", "", "é", "!"]
    final = TextDeltas()
    assert final.update("a\ufffd") == "a" and final.update("a\ufffd", final=True) == "\ufffd"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_row_texts_equal_detokenize_row_by_row(kind):
    text = "the café sat on the mat. a dog ran! é\n"
    tokenizer = train_characters([text]) if kind == "char" else train_bpe([text * 3], 300)
    ids = tokenizer.encode_documents([text])[0].tolist()
    # Growing rows of unequal lengths (an empty one; a byte-level row cut inside "é": U+FFFD).
    rows = [ids[:cut] for cut in (0, 1, 5, len(ids) - 1, len(ids))]
    expected = [tokenizer.detokenize(tf.constant(row, tf.int32)).numpy().decode() for row in rows]
    assert RowTexts(tokenizer)(rows) == expected
    assert expected[-1] == text


@pytest.mark.parametrize("jit_compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_penalized_steps_give_the_tokens_of_the_decode_loop_past_the_context(model, jit_compile):
    # The counts live in the decode state: they go on past the context, where the cache is rebuilt.
    decoder = Decoder(model, end_of_text_id=3, jit_compile=jit_compile)
    steps = StepDecoder(model, 16, end_of_text_id=3, jit_compile=jit_compile)
    for sampling in (SamplingOptions(frequency_penalty=1.0, repetition_penalty=1.2),
                     SamplingOptions(temperature=1.0, seed=4, presence_penalty=1.5)):
        assert _stepped(steps, [5, 6], 30, sampling, rows=2) == decoder(
            [[5, 6]], 30, sampling=sampling, num_return_sequences=2 if sampling.temperature else 1) * (
            1 if sampling.temperature else 2)
