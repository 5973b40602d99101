"""Shared test settings and helpers: quiet TensorFlow logs, a seed for every test, run directories,
and the expensive artefacts built once per session (a tiny run, its export, a trained tiny run)."""

import dataclasses
import functools
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


def _write_toy_recipe(folder, batch_size=4, max_steps=20, eval_interval=10, eval_steps=2, warmup_steps=2):
    recipe_text = TOY_RECIPE.format(
        batch_size=batch_size, max_steps=max_steps, eval_interval=eval_interval,
        eval_steps=eval_steps, warmup_steps=warmup_steps,
    )
    rng = np.random.RandomState(0)
    paragraphs = [
        " ".join(rng.choice(["the cat sat.", "a dog ran.", "we sing la la."], size=6))
        for _ in range(40)
    ]
    (folder / "corpus.txt").write_text("\n\n".join(paragraphs))
    path = folder / "recipe.toml"
    path.write_text(recipe_text.replace(
        "[data]", f'[data]\ndir = "{folder}"\ncache_dir = "{folder / "cache"}"'
    ))
    return path


@pytest.fixture
def write_toy_recipe(tmp_path):
    """`write(batch_size, max_steps, eval_interval, eval_steps, warmup_steps) -> path`: the toy
    recipe over a small, very regular corpus (`corpus.txt`) written in `tmp_path`; its `[data]`
    section gets `dir` and `cache_dir` there."""
    return functools.partial(_write_toy_recipe, tmp_path)


# --- artefacts built once per session, for the tests that only read them -------------------------
# A test that changes one works on a copy (shutil.copytree) in its own tmp_path.

TINY_TEXT = "the cat sat on the mat. a dog ran!\n"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, write_run_directory):
    """`(run_dir, model, tokenizer)`: a run directory named `tiny` of a tiny random model (2 layers,
    hidden 16, context 32) with a character tokenizer of `TINY_TEXT`. Read-only."""
    from kgpt.tokenizers.char import train_characters

    tokenizer = train_characters([TINY_TEXT])
    run_dir, model = write_run_directory(tmp_path_factory.mktemp("tiny_run") / "tiny", tokenizer, 32)
    return run_dir, model, tokenizer


TINY_EXPORT_MAX_NEW_TOKENS = 8


@pytest.fixture(scope="session")
def tiny_run_export(tiny_run, tmp_path_factory):
    """`(base_dir, path)`: `kgpt export` of `tiny_run` as `base_dir/tiny/1` (default max_new_tokens 8),
    written with umask 022 (test_export checks its files' modes). Read-only."""
    from kgpt.serving.export import export

    base_dir = str(tmp_path_factory.mktemp("saved_models"))
    previous = os.umask(0o022)
    try:
        path = export(tiny_run[0], "tiny", base_dir=base_dir, max_new_tokens=TINY_EXPORT_MAX_NEW_TOKENS)
    finally:
        os.umask(previous)
    return base_dir, path


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    recipe_path: str  # the toy recipe at its defaults (20 steps), beside its corpus
    run_dir: str
    result: object  # the `kgpt.train.TrainResult` of the training


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A `TrainedRun`: the toy recipe at its defaults (`write_toy_recipe()`) trained 20 steps with
    `kgpt.train.train`. Read-only: a test that resumes or changes it works on a copy."""
    from kgpt.recipe import load_recipe
    from kgpt.training.train import train

    folder = tmp_path_factory.mktemp("trained")
    recipe_path = _write_toy_recipe(folder)
    run_dir = str(folder / "run")
    result = train(load_recipe(recipe_path), run_dir, verbose=0)
    return TrainedRun(str(recipe_path), run_dir, result)


@pytest.fixture(scope="module")
def run_directories_without_xla():
    """Generators loaded from run directories (`kgpt generate RUN`, `kgpt serve RUN`) decode without
    XLA in this module, for tests of what they answer rather than of the compiled loop."""
    from kgpt.generation.generator import Generator

    load = Generator.from_run_directory.__func__

    def from_run_directory(cls, run_dir, **kwargs):
        return load(cls, run_dir, **{"jit_compile": False, **kwargs})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Generator, "from_run_directory", classmethod(from_run_directory))
        yield
