import itertools
import json
import warnings

import numpy as np
import pytest
import tensorflow as tf

from kgpt.cli import main
from kgpt.generate import Decoder, Generator, beam_search, check_options, load_generator, sample_logits
from kgpt.model import build_model
from kgpt.tokenizer import train_characters


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
    a = decoder([[1, 2]], 10, temperature=1.0, seed=3)
    assert a == decoder([[1, 2]], 10, temperature=1.0, seed=3)
    assert decoder([[1, 2]], 10, temperature=1.0, top_k=1, seed=5) == decoder([[1, 2]], 10)


def test_keep_prompt_returns_prompt_and_continuation(model):
    out = Decoder(model)([[4, 5, 6]], 3, keep_prompt=True)[0]
    assert out[:3] == [4, 5, 6] and len(out) == 6


@pytest.mark.parametrize("prompts, steps", [([[1] * 20], 5), ([[1]], 0), ([[]], 3)])
def test_rejects_requests_that_do_not_fit(model, prompts, steps):
    with pytest.raises(ValueError):
        Decoder(model)(prompts, steps)


def test_samplers_on_fake_logits():
    logits = tf.constant([[0.0, 3.0, 1.0, 2.0, -1.0]] * 500)
    assert set(sample_logits(logits).numpy()) == {1}  # greedy picks the argmax
    seed = tf.constant([1, 2])
    top2 = sample_logits(logits, temperature=1.0, top_k=2, seed=seed).numpy()
    assert set(top2) == {1, 3}  # never outside the two best, and both appear
    # Nucleus: p = softmax -> [0.03, 0.64, 0.09, 0.23, 0.01]; 0.64 + 0.23 >= 0.8 keeps {1, 3}.
    nucleus = sample_logits(logits, temperature=1.0, top_p=0.8, seed=seed).numpy()
    assert set(nucleus) == {1, 3}
    assert set(sample_logits(logits, temperature=1.0, top_p=0.5, seed=seed).numpy()) == {1}


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
    greedy, _ = decode_fake(model, [[0]], 2)
    assert greedy[0, 1:].tolist() == [1, 0]  # greedy takes the 0.6 branch
    tokens, lengths, scores = beam_search(model, [[0]], [1], 2, num_beams=2, length_penalty=0.0)
    ranked = _best_by_enumeration(TABLE, [0], 2)
    assert tokens[0, 0, 1:].numpy().tolist() == list(ranked[0]) == [2, 3]
    assert scores[0, 0].numpy() == pytest.approx(np.log(0.3998 * 0.9), rel=1e-5)
    assert lengths.numpy().tolist() == [[3, 3]]


def decode_fake(model, prompts, steps):
    from kgpt.generate import decode

    tokens, lengths = decode(model, tf.constant(prompts), [len(p) for p in prompts], steps)
    return tokens.numpy(), lengths.numpy()


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


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, write_run_directory):
    tokenizer = train_characters(["the cat sat on the mat. a dog ran!\n"])
    return write_run_directory(tmp_path_factory.mktemp("run"), tokenizer)[0]


@pytest.fixture(scope="module")
def generator(run_dir):
    return load_generator(run_dir)


def test_generator_text_ragged_equals_one_by_one_and_keeps_prompts(generator):
    assert isinstance(generator, Generator)
    prompts = ["the cat", "a", "", "dog ran on the mat"]
    batch = generator.generate(prompts, max_new_tokens=8)
    assert batch == [generator.generate([p], max_new_tokens=8)[0] for p in prompts]
    assert generator.generate(prompts, max_new_tokens=8, keep_prompt=True) == [
        p + t for p, t in zip(prompts, batch)
    ]
    samples = generator.generate(["the"], 8, temperature=1.0, seed=2, num_return_sequences=3)
    assert len(samples) == 3 and samples == generator.generate(
        ["the"], 8, temperature=1.0, seed=2, num_return_sequences=3
    )


def test_long_prompts_are_left_truncated_with_a_warning_or_refused(generator):
    long = "the cat sat on the mat. " * 3  # 72 characters, context 32
    with pytest.warns(UserWarning, match="left-truncated"):
        text = generator.generate([long], max_new_tokens=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert text == generator.generate([long[-24:]], max_new_tokens=8)
    with pytest.raises(ValueError, match="context"):
        generator.generate([long], max_new_tokens=8, truncate=False)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=32), "max_new_tokens"),
        (dict(temperature=0.0), "greedy"),
        (dict(temperature=-1.0), "greedy"),
        (dict(top_k=-1), "top_k"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_p=1.5), "top_p"),
        (dict(num_beams=0), "beams"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    ],
)
def test_bad_options_are_refused(options, match):
    options = {"max_new_tokens": 8, **options}
    with pytest.raises(ValueError, match=match):
        check_options(sequence_length=32, **options)


def test_cli_generate(run_dir, capsys):
    assert main(["generate", run_dir, "--prompt", "the cat", "--prompt", "a", "--max-new-tokens", "5", "--json"]) == 0
    texts = json.loads(capsys.readouterr().out)
    assert [t[: len(p)] for t, p in zip(texts, ["the cat", "a"])] == ["the cat", "a"]
    assert main(["generate", run_dir, "--prompt", "a", "--beams", "2", "--max-new-tokens", "4"]) == 0
    for bad in (
        ["--temperature", "0"], ["--top-p", "1.5", "--temperature", "1"], ["--top-k", "-1"],
        ["--beams", "0"], ["--max-new-tokens", "0"], ["--max-new-tokens", "40"],
    ):
        capsys.readouterr()
        assert main(["generate", run_dir, "--prompt", "a", *bad]) == 2, bad
        error = capsys.readouterr().err
        assert error.startswith("kgpt generate: error:") and error.count("\n") == 1
