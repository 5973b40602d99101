"""Sampling: the options structure (validation, CLI flags, graph values) and the samplers."""

import argparse
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from kgpt.generation import sampling
from kgpt.generation.sampling import (
    SamplingOptions,
    add_sampling_arguments,
    draws_at_random,
    graph_checks,
    option,
    register_filter,
    sample_logits,
    sampling_from_arguments,
    signature_defaults,
    signature_dtypes,
)

LOGITS = tf.constant([[0.0, 3.0, 1.0, 2.0, -1.0]] * 500)


def test_samplers_on_fake_logits():
    assert set(sample_logits(LOGITS).numpy()) == {1}  # greedy picks the argmax
    seed = tf.constant([1, 2])
    top2 = sample_logits(LOGITS, SamplingOptions(temperature=1.0, top_k=2), seed=seed).numpy()
    assert set(top2) == {1, 3}  # never outside the two best, and both appear
    # Nucleus: p = softmax -> [0.03, 0.64, 0.09, 0.23, 0.01]; 0.64 + 0.23 >= 0.8 keeps {1, 3}.
    nucleus = sample_logits(LOGITS, SamplingOptions(temperature=1.0, top_p=0.8), seed=seed).numpy()
    assert set(nucleus) == {1, 3}
    assert set(sample_logits(LOGITS, SamplingOptions(temperature=1.0, top_p=0.5), seed=seed).numpy()) == {1}
    # top_k=1 is greedy at any temperature.
    assert set(sample_logits(LOGITS, SamplingOptions(temperature=5.0, top_k=1), seed=seed).numpy()) == {1}


@pytest.mark.parametrize(
    "options, draws",
    [(SamplingOptions(), False), (SamplingOptions(temperature=5.0, top_k=1), False),
     (SamplingOptions(temperature=1.0), True), (SamplingOptions(temperature=0.5, top_p=0.9), True)],
)
def test_draws_at_random_says_when_a_rows_place_in_the_batch_changes_its_token(options, draws):
    flat = tf.zeros([1, 50])  # every token equally likely: only the draw decides
    alone = sample_logits(flat, options.graph_inputs()).numpy()[0]
    # The same row at each place of a batch of 8 (one stateless seed per call).
    placed = sample_logits(tf.tile(flat, [8, 1]), options.graph_inputs()).numpy()
    assert draws_at_random(options.graph_inputs()) == draws
    assert (set(placed) != {alone}) == draws  # a greedy row is the argmax wherever it sits


def test_high_temperature_flattens_and_low_sharpens():
    seed = tf.constant([3, 4])
    hot = sample_logits(LOGITS, SamplingOptions(temperature=100.0), seed=seed).numpy()
    cold = sample_logits(LOGITS, SamplingOptions(temperature=0.01), seed=seed).numpy()
    assert set(hot) == {0, 1, 2, 3, 4} and set(cold) == {1}


@pytest.mark.parametrize(
    "options, expected",
    # Drawn by the sampler before options became one structure (kgpt.generation.generator.sample_logits of
    # commit a878904): the same seed and options give the same tokens.
    [
        (dict(temperature=0.7), [38, 1, 11, 13, 9, 19]),
        (dict(temperature=1.3, top_k=5), [19, 8, 11, 13, 27, 19]),
        (dict(temperature=1.0, top_p=0.6), [19, 22, 11, 13, 27, 19]),
        (dict(temperature=0.9, top_k=8, top_p=0.7), [6, 8, 11, 13, 27, 19]),
    ],
)
def test_samples_are_the_same_as_before_the_options_structure(options, expected):
    logits = tf.constant(np.random.default_rng(0).normal(size=(6, 40)).astype("float32") * 2)
    tokens = sample_logits(logits, SamplingOptions(**options), seed=tf.constant([7, 3]))
    assert tokens.numpy().tolist() == expected


def test_greedy_is_temperature_1_top_k_1_in_the_graph():
    # Greedy has no temperature in Python; the graph (and the SavedModel signature) spells it
    # top_k=1, which sample_logits answers with an argmax.
    assert SamplingOptions().graph_inputs() == dict(
        temperature=1.0, top_k=1, top_p=1.0, seed=0, frequency_penalty=0.0, presence_penalty=0.0,
        repetition_penalty=1.0)
    assert SamplingOptions(temperature=0.5, top_k=3).graph_inputs()["temperature"] == 0.5


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(temperature=0.0), "temperature=0.0 must be > 0; for greedy"),
        (dict(temperature=-1.0), "greedy"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k=-1 must be >= 0"),
        (dict(top_k=1.5), "top_k=1.5 must be an integer"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), "top_p"),
        (dict(seed="1"), "seed='1' must be an integer"),
        (dict(temperature=True), "temperature=True must be a number"),
        # inf passed every bound of temperature (and sampled uniformly); nan of none
        (dict(temperature=float("inf")), "temperature=inf must be a finite number and must be > 0; for greedy"),
        (dict(temperature=float("-inf")), "temperature=-inf must be a finite number"),
        (dict(top_p=float("nan")), r"top_p=nan must be a finite number and must be in \(0, 1\]"),
        (dict(top_k=float("inf")), "top_k=inf must be a finite number and must be >= 0"),
        (dict(seed=float("nan")), r"seed=nan must be a finite number\.$"),
    ],
)
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        SamplingOptions(**options)


def test_options_are_frozen_and_normalised():
    options = SamplingOptions(temperature=1, top_k=2.0)
    assert options.temperature == 1.0 and isinstance(options.temperature, float)
    assert options.top_k == 2 and isinstance(options.top_k, int)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.top_k = 3


def test_cli_flags_are_the_fields():
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    flags = {action.dest for action in parser._actions} - {"help"}
    assert flags == {field.name for field in dataclasses.fields(SamplingOptions)}
    assert sampling_from_arguments(parser.parse_args([])) == SamplingOptions()
    args = parser.parse_args(["--temperature", "0.5", "--top-k", "4", "--top-p", "0.9", "--seed", "2"])
    assert sampling_from_arguments(args) == SamplingOptions(temperature=0.5, top_k=4, top_p=0.9, seed=2)
    with pytest.raises(ValueError, match="top_k=-2"):
        sampling_from_arguments(parser.parse_args(["--top-k", "-2"]))


def test_graph_checks_refuse_out_of_bounds_tensors():
    good = SamplingOptions(temperature=1.0).graph_tensors()
    graph_checks(good)  # eager: raises at once if a check fails
    for name, value, message in [
        ("temperature", 0.0, "temperature must be > 0; for greedy decoding use top_k=1"),
        ("top_k", -1, "top_k must be >= 0"),
        ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
        ("temperature", float("inf"), "temperature must be a finite number"),
        ("top_p", float("nan"), "top_p must be a finite number"),
        ("frequency_penalty", 2.5, r"frequency_penalty must be in \[-2, 2\]; 0 is off"),
        ("presence_penalty", -3.0, r"presence_penalty must be in \[-2, 2\]"),
        ("repetition_penalty", 0.0, "repetition_penalty must be > 0; 1 is off"),
    ]:
        bad = {**good, name: tf.constant(value, good[name].dtype)}
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            graph_checks(bad)
    penalties = dict(frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0)
    assert signature_dtypes() == dict(
        temperature=tf.float32, top_k=tf.int32, top_p=tf.float32, seed=tf.int32,
        **{name: tf.float32 for name in penalties},
    )
    assert signature_defaults() == dict(temperature=1.0, top_k=0, top_p=1.0, seed=0, **penalties)


# --- a new sampler is one function and one field ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class MinPOptions(SamplingOptions):
    """SamplingOptions plus min-p: keep tokens at least `min_p` times as likely as the best."""

    min_p: float = option(0.0, "float32", "keep tokens >= min_p x the best one's probability",
                          minimum=0, maximum=1)


def keep_min_p(sorted_logits, options):
    probabilities = tf.nn.softmax(sorted_logits)
    keep = probabilities >= options["min_p"] * probabilities[:, :1]
    return tf.where(keep, sorted_logits, -1e30)


@pytest.fixture
def min_p(monkeypatch):
    monkeypatch.setitem(sampling.FILTERS, "min_p", keep_min_p)
    return MinPOptions


def test_a_new_sampler_is_one_function_and_one_field(min_p):
    # Validation, CLI flags, graph values and the sampler all follow from the field.
    with pytest.raises(ValueError, match=r"min_p=1.5 must be in \[0, 1\]"):
        min_p(min_p=1.5)
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser, min_p)
    options = sampling_from_arguments(parser.parse_args(["--temperature", "1", "--min-p", "0.3"]), min_p)
    assert options == min_p(temperature=1.0, min_p=0.3)
    assert options.graph_tensors()["min_p"].dtype == tf.float32
    seed = tf.constant([1, 2])
    # p = [0.03, 0.64, 0.09, 0.23, 0.01]: 0.3 x 0.64 = 0.19 keeps {1, 3}, 0.5 x 0.64 keeps {1}.
    assert set(sample_logits(LOGITS, options, seed=seed).numpy()) == {1, 3}
    assert set(sample_logits(LOGITS, min_p(temperature=1.0, min_p=0.5), seed=seed).numpy()) == {1}
    # Without the field, the filter does not run: the base options sample everything.
    assert set(sample_logits(LOGITS, SamplingOptions(temperature=1.0), seed=seed).numpy()) == {0, 1, 2, 3, 4}


def test_register_filter_adds_to_the_registry(monkeypatch):
    monkeypatch.setattr(sampling, "FILTERS", dict(sampling.FILTERS))
    function = register_filter("min_p")(keep_min_p)
    assert function is keep_min_p and list(sampling.FILTERS) == ["top_k", "top_p", "min_p"]


@pytest.mark.parametrize("flag, value", [("--temperature", "inf"), ("--temperature", "nan"), ("--top-p", "nan")])
def test_generate_refuses_infinite_options_before_loading_a_model(tmp_path, capsys, flag, value):
    from kgpt.cli import main

    assert main(["generate", str(tmp_path / "no_run"), "--prompt", "x", flag, value]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"kgpt generate: error: {flag[2:].replace('-', '_')}={value} must be a finite number")
    assert error.count("\n") == 1
