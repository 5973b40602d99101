"""Tests for kgpt.training.resources: the training step's memory estimate, the refusal of what
cannot fit (before any token store or model is built), and the recipes that must still pass."""

import glob
import pathlib
import time

import pytest

from kgpt.cli import main
from kgpt.config import ModelConfig
from kgpt.model.gpt import count_parameters
from kgpt.recipe import load_recipe
from kgpt.training import resources

ROOT = pathlib.Path(__file__).resolve().parents[1]
GPT2_SMALL = ModelConfig(vocabulary_size=50257, sequence_length=1024, num_layers=12, num_heads=12, hidden_dim=768)


def test_the_estimate_counts_logits_attention_activations_and_parameters():
    config = ModelConfig(vocabulary_size=10, sequence_length=4, num_layers=2, num_heads=2, hidden_dim=8)
    estimate = resources.estimate_training_memory(config, batch_size=3, sequence_length=4)
    assert estimate.logits == 2 * 3 * 4 * 10 * 4  # (batch, sequence, vocabulary) and its gradient
    assert estimate.attention == 2 * 3 * 2 * 4 * 4 * 4  # layers x batch x heads x sequence^2, float32
    assert estimate.activations == 2 * 3 * 4 * (4 * 8 + 32) * 4
    assert estimate.parameters == count_parameters(config) * 16  # weights, gradients, two moments
    assert estimate.total == estimate.logits + estimate.attention + estimate.activations + estimate.parameters
    half = resources.estimate_training_memory(config, 3, 4, precision="mixed_bfloat16")
    assert half.attention * 2 == estimate.attention and half.logits == estimate.logits


def test_the_pipelines_recipes_fit_in_a_few_gigabytes():
    # What runs today must pass: every recipe's step is far below the memory of a laptop.
    for path in sorted(glob.glob(str(ROOT / "pipelines" / "*.toml"))):
        recipe = load_recipe(path)
        vocabulary = {"char": 256, "gpt2": 50257}.get(recipe.data.tokenizer, recipe.data.vocabulary_size)
        config = GPT2_SMALL if recipe.train.init_from else recipe.model_config(vocabulary)
        estimate = resources.estimate_training_memory(config, recipe.train.batch_size,
                                                      recipe.data.sequence_length, recipe.train.precision)
        assert estimate.total < 4e9, (path, estimate)
    available, where = resources.available_memory()
    assert where is None or available > 0


def test_a_sequence_length_that_cannot_fit_is_refused_before_any_work(write_toy_recipe, tmp_path, capsys):
    recipe = write_toy_recipe(max_steps=2, eval_interval=1)
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    code = main(["train", str(recipe), "--run-dir", str(run_dir), "--set", "data.sequence_length=100000000",
                 "--set", "model.sequence_length=100000000"])
    error = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - started < 30
    assert error.count("\n") == 1 and error.startswith("kgpt train: error: data.sequence_length=100000000 ")
    assert "needs an estimated" in error and "lower data.sequence_length or train.batch_size" in error
    assert list((tmp_path / "cache").iterdir()) == []  # no token store was started
    assert not (run_dir / "config.json").exists()


def test_the_refusal_names_what_is_available(monkeypatch):
    recipe = load_recipe(ROOT / "pipelines" / "tiny.toml", ["data.sequence_length=4096", "model.sequence_length=4096"])
    monkeypatch.setattr(resources, "available_memory", lambda: (10**9, "on the GPU"))
    config = recipe.model_config(65)
    with pytest.raises(ValueError, match=r"estimated .* GB .* but 1\.0 GB is on the GPU; lower"):
        resources.check_training_resources(recipe, config, 8)
    monkeypatch.setattr(resources, "available_memory", lambda: (None, None))  # unknown: no refusal
    resources.check_training_resources(recipe, config, 8)
