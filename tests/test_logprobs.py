"""Log-probabilities: each decode path's equal a NumPy log-softmax of full passes, the prompt's come
from one forward pass, and the text interface's `TokenLogprob`s follow the tokens they describe."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kgpt.generation.decoder import Decoder
from kgpt.generation.generator import Generator
from kgpt.generation.logprobs import MAX_LOGPROBS, check_logprobs, prompt_logprobs, token_logprobs
from kgpt.generation.sampling import SamplingOptions
from kgpt.generation.streaming import StepDecoder
from kgpt.model.gpt import build_model
from kgpt.tokenizers.char import train_characters


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(1)
    return build_model(dict(vocabulary_size=32, sequence_length=16, num_layers=2, num_heads=2, hidden_dim=16))


@pytest.fixture(scope="module")
def decoder(model):
    return Decoder(model, bucket=4)


def _log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _reference(model, prompt, continuation):
    """`(chosen, top_ids, top)` of each continuation token from a full pass over its prefix."""
    ids = list(prompt) + list(continuation)
    log_probabilities = _log_softmax(model(np.array([ids], "int32"))[0])
    rows = log_probabilities[len(prompt) - 1 : len(ids) - 1]
    chosen = rows[np.arange(len(continuation)), continuation]
    top_ids = np.argsort(-rows, axis=-1, kind="stable")[:, :MAX_LOGPROBS]
    return chosen, top_ids, np.take_along_axis(rows, top_ids, axis=-1)


def test_token_logprobs_are_the_log_softmax_and_its_best_tokens():
    logits = np.random.default_rng(0).normal(size=(2, 3, 10)).astype("float32")
    chosen = np.array([[1, 2, 3], [4, 5, 6]], "int32")
    recorded = token_logprobs(tf.constant(logits), tf.constant(chosen))
    expected = _log_softmax(logits)
    np.testing.assert_allclose(recorded.chosen, np.take_along_axis(expected, chosen[..., None], -1)[..., 0],
                               atol=1e-5)
    order = np.argsort(-expected, axis=-1)[..., :MAX_LOGPROBS]
    assert recorded.top_ids.numpy().tolist() == order.tolist()
    np.testing.assert_allclose(recorded.top, np.take_along_axis(expected, order, -1), atol=1e-5)


@pytest.mark.parametrize("sampling", [None, SamplingOptions(temperature=0.8, top_k=5, seed=3),
                                      SamplingOptions(repetition_penalty=1.5, frequency_penalty=0.5)])
def test_decode_records_the_models_logprobs_of_every_new_token(model, decoder, sampling):
    # The model's own distribution, whatever penalties or temperature chose the tokens.
    prompts = [[1, 2, 3, 4, 5], [7], [9, 10, 11]]
    rows, recorded = decoder(prompts, 6, sampling=sampling, logprobs=True)
    assert rows == decoder(prompts, 6, sampling=sampling)  # logprobs change no token
    for prompt, row, values in zip(prompts, rows, recorded):
        chosen, top_ids, top = _reference(model, prompt, row)
        np.testing.assert_allclose(values.chosen, chosen, atol=1e-4)
        assert values.top_ids.tolist() == top_ids.tolist()
        np.testing.assert_allclose(values.top, top, atol=1e-4)


@pytest.mark.parametrize("jit_compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_streamed_logprobs_equal_the_decode_loops(model, jit_compile):
    sampling = SamplingOptions(temperature=1.0, seed=5, presence_penalty=1.0)
    # 20 tokens on a context of 16: past the context too (the cache is rebuilt).
    rows, recorded = Decoder(model, jit_compile=jit_compile)([[5, 6]], 20, sampling=sampling,
                                                             num_return_sequences=2, logprobs=True)
    steps = list(StepDecoder(model, 16, jit_compile=jit_compile)([5, 6], 20, sampling, 2, logprobs=True))
    for index, (row, values) in enumerate(zip(rows, recorded)):
        assert [int(tokens[index]) for tokens, _ in steps] == row
        np.testing.assert_allclose([float(step.chosen[index]) for _, step in steps], values.chosen, atol=1e-5)
        assert [step.top_ids[index].tolist() for _, step in steps] == values.top_ids.tolist()


def test_prompt_logprobs_are_one_forward_pass_of_each_prompt(model):
    ids = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 0, 0]], "int32")  # the second right-padded
    recorded = prompt_logprobs(model, tf.constant(ids))
    for row, length in zip(range(2), (5, 3)):
        chosen, top_ids, top = _reference(model, ids[row, :1], ids[row, 1:length])
        assert float(recorded.chosen[row, 0]) == 0.0  # nothing predicts a first token
        np.testing.assert_allclose(recorded.chosen[row, 1:length], chosen, atol=1e-5)
        assert recorded.top_ids[row, 1:length].numpy().tolist() == top_ids.tolist()


@pytest.fixture(scope="module")
def generator(model):
    tokenizer = train_characters(["abcdefghijklmnopqrstuvwxyz .,"])
    keras.utils.set_random_seed(2)
    config = dict(vocabulary_size=tokenizer.vocabulary_size, sequence_length=16, num_layers=1, num_heads=2,
                  hidden_dim=16)
    return Generator(build_model(config), tokenizer, jit_compile=False)


def test_completions_carry_a_token_logprob_per_counted_token(generator):
    [completion] = generator.complete(["the cat"], 6, logprobs=2)
    [plain] = generator.complete(["the cat"], 6)
    assert completion.text == plain.text and plain.logprobs is None
    tokens = completion.logprobs
    assert len(tokens) == completion.token_count
    assert "".join(token.text for token in tokens) == completion.text
    ids = generator.tokenizer.encode_documents(["the cat"])[0]
    chosen, top_ids, _ = _reference(generator.model, ids, [token.token_id for token in tokens])
    np.testing.assert_allclose([token.logprob for token in tokens], chosen, atol=1e-4)
    for token, best in zip(tokens, top_ids):
        assert [t for t, _, _ in token.top] == best[:2].tolist()
        texts = generator.tokenizer.detokenize(tf.ragged.constant([[t] for t, _, _ in token.top])).numpy()
        assert [text for _, text, _ in token.top] == [text.decode() for text in texts]
    # A stream carries the same records, one per token step.
    pieces = list(generator.stream("the cat", 6, logprobs=2))
    assert [record for piece in pieces for record in piece.logprobs] == list(tokens)


def test_prompt_logprobs_score_the_prompt_as_decoding_feeds_it(generator):
    scored = generator.prompt_logprobs(["the cat", ""], logprobs=1)
    first, empty = scored
    ids = generator.tokenizer.encode_documents(["the cat"])[0]
    assert [token.token_id for token in first] == list(ids) and first[0].logprob is None and not first[0].top
    chosen, _, _ = _reference(generator.model, ids[:1], ids[1:])
    np.testing.assert_allclose([token.logprob for token in first[1:]], chosen, atol=1e-4)
    assert all(len(token.top) == 1 for token in first[1:])
    # An empty prompt is the end-of-text that generation starts it from.
    assert [token.token_id for token in empty] == [generator.tokenizer.end_of_text_id]
    # A prompt longer than the room max_new_tokens leaves is cut as generation cuts it.
    long_prompt = "abcdefghijklmnopqrst"
    with pytest.warns(UserWarning, match="left-truncated to their last 12 tokens"):
        [cut] = generator.prompt_logprobs([long_prompt], max_new_tokens=4)
    assert "".join(token.text for token in cut) == long_prompt[-12:]


@pytest.mark.parametrize("value", [-1, 6, 1.5, True, "2"])
def test_bad_logprobs_are_refused(value, generator):
    with pytest.raises(ValueError, match="logprobs=.* must be an integer from 0 to 5"):
        check_logprobs(value)
    with pytest.raises(ValueError, match="logprobs"):
        generator.complete(["a"], 2, logprobs=value)
    with pytest.raises(ValueError, match="Beam search returns no log-probabilities"):
        generator.complete(["a"], 2, logprobs=1, num_beams=2)
