"""Shared test settings and helpers: quiet TensorFlow logs, a seed for every test, run directories."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from kgpt.model.gpt import build_model  # noqa: E402
from kgpt.model.saving import save_model  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _xla_cache(tmp_path_factory):
    """Commands started by tests keep their compiled XLA programs in this session's folder, not in
    the user's cache (`kgpt.environment.xla_cache_directory`)."""
    if "KGPT_XLA_CACHE" not in os.environ:
        os.environ["KGPT_XLA_CACHE"] = str(tmp_path_factory.mktemp("xla-cache"))


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)


@pytest.fixture(scope="session")
def write_run_directory():
    """`write(path, tokenizer, sequence_length=32) -> (run_dir, model)`: a run directory as
    `kgpt train` leaves it (a tiny random model in `final.keras`, the tokenizer, `config.json`)."""

    def write(path, tokenizer, sequence_length=32):
        keras.utils.set_random_seed(0)
        model = build_model(
            dict(vocabulary_size=tokenizer.vocabulary_size, sequence_length=sequence_length,
                 num_layers=2, num_heads=2, hidden_dim=16)
        )
        os.makedirs(path, exist_ok=True)
        save_model(model, os.path.join(path, "final.keras"))
        tokenizer.save(os.path.join(path, "tokenizer"))
        with open(os.path.join(path, "config.json"), "w") as file:
            json.dump({"model": model.model_config.to_dict()}, file)
        return str(path), model

    return write


# A one-layer character model over `corpus.txt`; tests pick the [train] values they need.
TOY_RECIPE = """
[model]
num_layers = 1
num_heads = 2
hidden_dim = 16

[data]
corpus = "text"
files = ["corpus.txt"]
tokenizer = "char"
sequence_length = 16
validation_fraction = 0.2

[train]
batch_size = {batch_size}
max_steps = {max_steps}
eval_interval = {eval_interval}
eval_steps = {eval_steps}
learning_rate = 1e-2
warmup_steps = {warmup_steps}
min_learning_rate = 1e-3
jit_compile = false
"""


@pytest.fixture
def shards(tmp_path):
    """Three text shards, `shards/wiki_books_{0,1,2}.txt`, of four blank-line blocks each."""
    (tmp_path / "shards").mkdir()
    for i in range(3):
        blocks = [f"Shard {i} block {j}: some words here." for j in range(4)]
        (tmp_path / "shards" / f"wiki_books_{i}.txt").write_text("\n\n".join(blocks) + "\n")
    return tmp_path / "shards"


@pytest.fixture
def write_toy_recipe(tmp_path):
    """`write(batch_size, max_steps, eval_interval, eval_steps, warmup_steps) -> path`: the toy
    recipe over a small, very regular corpus (`corpus.txt`) written in `tmp_path`; its `[data]`
    section gets `dir` and `cache_dir` there."""

    def write(batch_size=4, max_steps=20, eval_interval=10, eval_steps=2, warmup_steps=2):
        recipe_text = TOY_RECIPE.format(
            batch_size=batch_size, max_steps=max_steps, eval_interval=eval_interval,
            eval_steps=eval_steps, warmup_steps=warmup_steps,
        )
        rng = np.random.RandomState(0)
        paragraphs = [
            " ".join(rng.choice(["the cat sat.", "a dog ran.", "we sing la la."], size=6))
            for _ in range(40)
        ]
        (tmp_path / "corpus.txt").write_text("\n\n".join(paragraphs))
        path = tmp_path / "recipe.toml"
        path.write_text(recipe_text.replace(
            "[data]", f'[data]\ndir = "{tmp_path}"\ncache_dir = "{tmp_path / "cache"}"'
        ))
        return path

    return write
