"""Decoding on token ids: cached loop == full recomputation, beams, the Decoder, the no-cache adapter."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from kgpt.generation.beam_search import beam_search
from kgpt.generation.decoder import Decoder
from kgpt.generation.decoding import (
    MAX_NEW_TOKENS,
    CausalRecomputation,
    cached,
    check_options,
    decode,
    default_window,
    feed,
    prefill,
    sample_at,
    step,
)
from kgpt.generation.sampling import SamplingOptions
from kgpt.model.gpt import build_model
from kgpt.model.recurrent import RecurrentLanguageModel


@pytest.fixture(scope="module")
def model():
    return build_model(dict(vocabulary_size=32, sequence_length=24, num_layers=2, num_heads=2, hidden_dim=16))


def _greedy_by_full_recomputation(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(np.argmax(model(np.array([ids], "int32"))[0, -1])))
    return ids[len(prompt) :]


def test_greedy_ragged_batch_equals_full_recomputation(model):
    prompts = [[1, 2, 3, 4, 5], [7], [9, 10, 11]]
    decoder = Decoder(model, bucket=4)
    expected = [_greedy_by_full_recomputation(model, p, 6) for p in prompts]
    assert decoder(prompts, 6) == expected
    # One by one gives the same text as the ragged batch.
    assert [decoder([p], 6)[0] for p in prompts] == expected


def test_stops_at_end_of_text(model):
    prompts = [[1, 2, 3, 4, 5], [7]]
    first = _greedy_by_full_recomputation(model, prompts[0], 6)
    stop = first[1]
    out = Decoder(model, end_of_text_id=stop)(prompts, 6)
    assert out[0] == first[: first.index(stop) + 1]
    assert all(token != stop for token in out[1][:-1])


def test_sampling_is_reproducible_with_a_seed(model):
    decoder = Decoder(model)
    sampled = SamplingOptions(temperature=1.0, seed=3)
    a = decoder([[1, 2]], 10, sampling=sampled)
    assert a == decoder([[1, 2]], 10, sampling=sampled)
    assert a != decoder([[1, 2]], 10, sampling=SamplingOptions(temperature=1.0, seed=4))
    assert decoder([[1, 2]], 10, sampling=SamplingOptions(temperature=1.0, top_k=1, seed=5)) == decoder([[1, 2]], 10)


def test_keep_prompt_returns_prompt_and_continuation(model):
    out = Decoder(model)([[4, 5, 6]], 3, keep_prompt=True)[0]
    assert out[:3] == [4, 5, 6] and len(out) == 6


@pytest.mark.parametrize(
    "prompts, steps, options, match",
    [
        ([[1] * 25], 5, {}, "25 tokens does not fit the model's context of 24"),
        ([[1] * 20], 5, dict(num_beams=2), "beam search stays within it"),
        ([[1]], 0, {}, "max_new_tokens=0 is out of range"),
        ([[1]], MAX_NEW_TOKENS + 1, {}, "out of range"),
        ([[]], 3, {}, "at least one token"),
    ],
)
def test_rejects_requests_that_do_not_fit(model, prompts, steps, options, match):
    with pytest.raises(ValueError, match=match):
        Decoder(model)(prompts, steps, **options)


def _greedy_past_the_context(model, prompt, steps, sequence_length, window):
    """The reference: a full pass over the tokens since `offset`, which moves to the last `window`
    tokens whenever more than `sequence_length` would be needed (no cache)."""
    ids, offset = list(prompt), 0
    for _ in range(steps):
        if len(ids) - offset > sequence_length:
            offset = len(ids) - window
        ids.append(int(np.argmax(model(np.array([ids[offset:]], "int32"))[0, -1])))
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def spread():
    """A model with a wide initialisation: far-apart logits, so greedy picks are robust to rounding."""
    keras.utils.set_random_seed(5)
    return build_model(dict(vocabulary_size=32, sequence_length=8, num_layers=2, num_heads=2,
                            hidden_dim=16, initializer_range=0.5))


@pytest.mark.slow  # ~15-30 s on 2 cores
def test_greedy_past_the_context_equals_full_passes_over_cropped_windows(spread):
    prompts = [[1, 2, 3, 4, 5], [7], [9, 10, 11, 12, 13, 14, 15, 16]]  # the last one fills the context
    steps = 3 * 8
    for window in (default_window(8), 7):  # a rebuild every 4 tokens; every token, as nanoGPT
        expected = [_greedy_past_the_context(spread, p, steps, 8, window) for p in prompts]
        assert len(set(map(tuple, expected))) == 3  # the rows differ
        assert Decoder(spread, bucket=4, window=window)(prompts, steps) == expected, window
    # The XLA-compiled loop rebuilds the cache the same way.
    assert Decoder(spread, bucket=4, jit_compile=True, window=7)(prompts, steps) == expected
    # Sampling past the context is reproducible and agrees with the within-context tokens.
    decoder = Decoder(spread, bucket=4)
    sampled = SamplingOptions(temperature=1.0, seed=2)
    long = decoder(prompts, steps, sampling=sampled)
    assert [len(row) for row in long] == [steps] * 3 and long == decoder(prompts, steps, sampling=sampled)
    assert decoder(prompts, 3, sampling=sampled) == [row[:3] for row in long]


@pytest.mark.parametrize("kind", ["gpt", "gru"])
def test_a_full_cache_is_rebuilt_from_the_recent_tokens(spread, recurrent, kind):
    model = spread if kind == "gpt" else recurrent
    decoding_model, window = cached(model), 3
    ids = np.random.default_rng(1).integers(0, 32, (2, 11)).astype("int32")
    logits, state = prefill(decoding_model, ids[:, :8], 8, window)  # the cache holds 8 positions
    np.testing.assert_allclose(logits, model(ids[:, :8])[:, -1], atol=1e-5)
    assert (int(state.position), int(state.offset)) == (8, 0) and state.recent.numpy().tolist() == ids[:, 5:8].tolist()
    for position in (8, 9):  # full at 8: a rebuild from positions 6..8, then a cached step at 9
        logits, state = feed(decoding_model, state, ids[:, position])
        assert (int(state.position), int(state.offset)) == (position + 1, 6)
        assert state.recent.numpy().tolist() == ids[:, position + 1 - window : position + 1].tolist()
        np.testing.assert_allclose(logits, model(ids[:, 6 : position + 1])[:, -1], atol=1e-5)
    # A step feeds position 10 and draws the token at 11 with the seed [seed, 11].
    sampling = SamplingOptions(temperature=1.0, seed=7).graph_inputs()
    token, after, _ = step(decoding_model, state, ids[:, 10], sampling)
    expected = sample_at(model(ids[:, 6:11])[:, -1], sampling, 11)
    assert int(after.position) == 11 and token.numpy().tolist() == expected.numpy().tolist()


@pytest.mark.slow  # ~15-30 s on 2 cores
def test_stop_sequences_end_rows_like_the_generation_cut_after_them(spread):
    decoder = Decoder(spread, bucket=4)
    prompts = [[1, 2, 3], [7]]
    full = decoder(prompts, 20)
    first = full[0]
    stop = first[5:7]  # a two-token stop inside row 0's continuation
    out = decoder(prompts, 20, stop_sequences=[stop])
    cut = next(i for i in range(2, len(first) + 1) if first[i - 2 : i] == stop)
    assert out[0] == first[:cut]  # the stop is kept, like end-of-text; the caller drops it
    for row, expected in zip(out[1:], full[1:]):
        ends = [i for i in range(2, len(expected) + 1) if expected[i - 2 : i] == stop]
        assert row == expected[: ends[0]] if ends else row == expected
    # A one-token stop (a stop token id) and a stop that spans the prompt's end, which does not count.
    assert decoder(prompts[:1], 20, stop_sequences=[[first[3]]])[0] == first[: first.index(first[3]) + 1]
    assert decoder(prompts[:1], 20, stop_sequences=[[3, first[0]]])[0] == first
    # Beam search finishes hypotheses at a stop too: one beam is greedy.
    assert decoder(prompts[:1], 20, num_beams=1, stop_sequences=[stop]) == out[:1]
    beams = decoder(prompts[:1], 5, num_beams=2, num_return_sequences=2, stop_sequences=[[first[1]]])
    assert all(first[1] not in row[:-1] for row in beams)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens=0 is out of range"),
        (dict(max_new_tokens=MAX_NEW_TOKENS + 1), "is out of range; choose 1 to 65536"),
        (dict(max_new_tokens=32, num_beams=2), "beam search stays within the context"),
        (dict(num_beams=0), "beams=0 must be >= 1"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3 exceeds beams=2"),
        (dict(num_beams=2, sampling=SamplingOptions(temperature=1.0)), "Beam search is deterministic"),
        (dict(num_return_sequences=2), "Greedy decoding gives one sequence"),
        (dict(num_return_sequences=0), "num_return_sequences=0 must be >= 1"),
    ],
)
def test_bad_decoding_options_are_refused(options, match):
    options = {"max_new_tokens": 8, **options}
    with pytest.raises(ValueError, match=match):
        check_options(sequence_length=32, **options)


class BigramModel:
    """A stand-in for GPT: next-token log-probabilities from a table indexed by the last token."""

    def __init__(self, table):
        self.table = tf.math.log(tf.constant(table, tf.float32))

    def initial_cache(self, batch_size, max_length):
        # GPT's structure: one (key, value) pair per layer, (batch, heads, max_length, head_dim).
        shape = [batch_size, 1, max_length, 1]
        return ((tf.zeros(shape), tf.zeros(shape)),)

    def call_with_cache(self, token_ids, cache, start_index):
        return tf.gather(self.table, token_ids), cache


# From token 0, token 1 is likelier (0.6) than 2 (0.4); but every continuation of 1 is a coin
# flip among four (0.25) while 2 is almost surely followed by 3 (0.9): greedy finds 0.15,
# the best two-token sequence is 2, 3 with 0.36.
TABLE = [
    [0.0001, 0.6, 0.3998, 0.0001],
    [0.25, 0.25, 0.25, 0.25],
    [0.05, 0.025, 0.025, 0.9],
    [0.25, 0.25, 0.25, 0.25],
]


def _best_by_enumeration(table, prompt, steps):
    log_table = np.log(np.array(table))
    scores = {}
    for sequence in itertools.product(range(len(table)), repeat=steps):
        previous, total = prompt[-1], 0.0
        for token in sequence:
            total, previous = total + log_table[previous, token], token
        scores[sequence] = total
    return sorted(scores, key=scores.get, reverse=True)


def test_beam_search_finds_the_best_sequence_of_a_table():
    model = BigramModel(TABLE)
    greedy, _, _ = decode(model, tf.constant([[0]]), [1], 2)
    assert greedy.numpy()[0, 1:].tolist() == [1, 0]  # greedy takes the 0.6 branch
    tokens, lengths, scores = beam_search(model, [[0]], [1], 2, num_beams=2, length_penalty=0.0)
    ranked = _best_by_enumeration(TABLE, [0], 2)
    assert tokens[0, 0, 1:].numpy().tolist() == list(ranked[0]) == [2, 3]
    assert scores[0, 0].numpy() == pytest.approx(np.log(0.3998 * 0.9), rel=1e-5)
    assert lengths.numpy().tolist() == [[3, 3]]


def test_beam_search_finishes_beams_at_end_of_text_and_handles_ragged_prompts():
    model = BigramModel(TABLE)
    # With 3 as end-of-text, 0 -> 2 -> 3 finishes after two tokens (score log 0.36 / 2).
    tokens, lengths, scores = beam_search(
        model, [[0, 0], [1, 0]], [1, 2], 4, num_beams=2, end_of_text_id=3
    )
    assert tokens[0, 0, 1:3].numpy().tolist() == [2, 3] and lengths[0, 0] == 3
    assert tokens[1, 0, 2:4].numpy().tolist() == [2, 3] and lengths[1, 0] == 4
    assert tokens[1, 0, :2].numpy().tolist() == [1, 0]  # the prompt is kept
    assert scores[0, 0].numpy() == pytest.approx(np.log(0.3998 * 0.9) / 2, rel=1e-5)


@pytest.mark.slow
def test_beam_search_on_the_model_ragged_equals_one_by_one(model):
    decoder = Decoder(model, bucket=4)
    prompts = [[1, 2, 3, 4, 5], [7], [9, 10, 11]]
    batch = decoder(prompts, 5, num_beams=3, num_return_sequences=2)
    single = [row for p in prompts for row in decoder([p], 5, num_beams=3, num_return_sequences=2)]
    assert batch == single and len(batch) == 6
    # One beam is greedy decoding.
    assert decoder(prompts, 5, num_beams=1) == [
        _greedy_by_full_recomputation(model, p, 5) for p in prompts
    ]


# --- models without a key/value cache: decoding by full recomputation ----------------------------


def _causal_convolution_model(vocabulary_size=32):
    """A tiny causal model of the test's own: embedding -> causal convolution -> logits."""
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(vocabulary_size, 8),
        keras.layers.Conv1D(8, 3, padding="causal", activation="tanh"),
        keras.layers.Dense(vocabulary_size),
    ])


@pytest.fixture(scope="module")
def recurrent():
    keras.utils.set_random_seed(4)
    return RecurrentLanguageModel(vocabulary_size=32, sequence_length=24, num_layers=1, num_heads=2, hidden_dim=16)


def test_the_adapter_is_used_only_without_a_cache(model, recurrent):
    assert cached(model) is model
    assert isinstance(cached(recurrent), CausalRecomputation)


def test_adapter_logits_equal_a_full_pass_over_the_prefix(recurrent):
    adapter = CausalRecomputation(recurrent)
    ids = np.random.default_rng(0).integers(0, 32, (2, 7)).astype("int32")
    cache = adapter.initial_cache(2, 12)
    logits, cache = adapter.call_with_cache(ids[:, :4], cache, 0)
    np.testing.assert_allclose(logits, recurrent(ids[:, :4]), atol=1e-5)
    logits, cache = adapter.call_with_cache(ids[:, 4:], cache, 4)
    np.testing.assert_allclose(logits, recurrent(ids)[:, 4:], atol=1e-5)
    assert cache[:, :7].numpy().tolist() == ids.tolist() and not cache[:, 7:].numpy().any()


def test_a_model_without_a_cache_decodes_like_greedy_full_recomputation(recurrent):
    convolution = _causal_convolution_model()
    prompts = [[1, 2, 3, 4, 5], [7], [9, 10, 11]]
    for model, decoder in [
        (convolution, Decoder(convolution, bucket=4, sequence_length=24)),
        (recurrent, Decoder(recurrent, bucket=4)),
    ]:
        assert decoder(prompts, 6) == [_greedy_by_full_recomputation(model, p, 6) for p in prompts]
    # Sampling and beams run through the same adapter.
    sampled = SamplingOptions(temperature=1.0, seed=1)
    decoder = Decoder(recurrent, bucket=4)
    assert decoder(prompts, 4, sampling=sampled) == decoder(prompts, 4, sampling=sampled)
    assert decoder(prompts, 4, num_beams=1) == decoder(prompts, 4)
    assert len(decoder(prompts, 4, num_beams=2, num_return_sequences=2)) == 6


def test_recomputation_refuses_xla(recurrent):
    with pytest.raises(ValueError, match="decodes by recomputation, which runs without XLA"):
        Decoder(recurrent, jit_compile=True)


def test_a_model_without_a_context_needs_sequence_length():
    with pytest.raises(ValueError, match="pass sequence_length="):
        Decoder(_causal_convolution_model())


@pytest.fixture(scope="module")
def decoder(model):
    """One `Decoder` (one trace) for the tests that only call it."""
    return Decoder(model, bucket=4)


def _penalized_greedy(model, prompt, steps, frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0):
    """Greedy decoding by full passes with the penalties written out in NumPy: OpenAI's on the counts of
    generated tokens, Hugging Face's on the tokens of prompt and continuation."""
    ids, counts = list(prompt), np.zeros(32)
    for _ in range(steps):
        logits = np.asarray(model(np.array([ids], "int32"))[0, -1], np.float64)
        seen = np.isin(np.arange(32), ids)
        penalized = np.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = np.where(seen, penalized, logits)
        logits = logits - frequency_penalty * counts - presence_penalty * (counts > 0)
        token = int(np.argmax(logits))
        ids.append(token)
        counts[token] += 1
    return ids[len(prompt) :]


@pytest.mark.parametrize("penalties", [
    dict(frequency_penalty=1.5), dict(presence_penalty=0.5, repetition_penalty=3.0),
    pytest.param(dict(presence_penalty=2.0), marks=pytest.mark.slow),
    pytest.param(dict(frequency_penalty=-2.0), marks=pytest.mark.slow),
])
def test_penalties_equal_a_numpy_reference_and_change_greedy_text(model, decoder, penalties):
    prompts = [[1, 2, 3, 4, 5], [7], [9, 10, 11]]  # ragged: a row's own prompt tokens are not counted
    decoded = decoder(prompts, 10, sampling=SamplingOptions(**penalties))
    assert decoded == [_penalized_greedy(model, prompt, 10, **penalties) for prompt in prompts]
    assert decoded != decoder(prompts, 10)


def test_penalties_are_refused_out_of_range_and_with_beams(model):
    with pytest.raises(ValueError, match=r"frequency_penalty=3.0 must be in \[-2, 2\]; 0 is off"):
        SamplingOptions(frequency_penalty=3.0)
    with pytest.raises(ValueError, match="repetition_penalty=0.0 must be > 0; 1 is off"):
        SamplingOptions(repetition_penalty=0.0)
    with pytest.raises(ValueError, match="Beam search takes no penalties"):
        check_options(4, 24, SamplingOptions(presence_penalty=1.0), num_beams=2)
