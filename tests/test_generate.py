import numpy as np
import pytest
import tensorflow as tf

from kgpt.generate import Decoder, sample_logits
from kgpt.model import build_model


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
