import collections
import csv
import json
import math
import os

import numpy as np
import pytest

from kgpt.cli import main
from kgpt.evaluate import evaluate_runs
from kgpt.model.bigram import BigramModel
from kgpt.model.recurrent import RecurrentLanguageModel
from kgpt.recipe import load_recipe
from kgpt.training.baselines import SMOOTHING_GRID, train_bigram


@pytest.fixture
def recipe_path(write_toy_recipe):
    return write_toy_recipe(batch_size=8, max_steps=30)


def test_bigram_probabilities_match_hand_counts_with_add_k():
    # Bigrams of 0 1 0 2 0 1: (0,1) x2, (1,0), (0,2), (2,0). Token 3 never occurs.
    bigram = BigramModel.fit([0, 1, 0, 2, 0, 1], vocabulary_size=4, k=0.5)
    # P(b | a) = (count(a, b) + k) / (count(a) + k V), count(0) = 3, count(1) = count(2) = 1.
    expected = {
        (0, 0): 0.5 / 5.0, (0, 1): 2.5 / 5.0, (0, 2): 1.5 / 5.0, (0, 3): 0.5 / 5.0,
        (1, 0): 1.5 / 3.0, (1, 1): 0.5 / 3.0,
        (2, 0): 1.5 / 3.0, (2, 3): 0.5 / 3.0,
        (3, 0): 0.25, (3, 3): 0.25,  # an unseen context: uniform
    }
    previous, following = np.array(list(expected)).T
    np.testing.assert_allclose(bigram.probability(previous, following), list(expected.values()))
    np.testing.assert_allclose(bigram.nll(previous, following), -np.log(list(expected.values())))
    grid = np.arange(4)
    table = bigram.probability(np.repeat(grid, 4), np.tile(grid, 4)).reshape(4, 4)
    np.testing.assert_allclose(table.sum(axis=1), 1.0)  # every row is a distribution
    assert bigram.parameters == 16


def test_bigram_rejects_bad_smoothing_and_ids():
    with pytest.raises(ValueError, match="k=0 must be positive"):
        BigramModel.fit([0, 1], vocabulary_size=2, k=0)
    with pytest.raises(ValueError, match=r"Token ids must be in \[0, 2\); found 0\.\.5"):
        BigramModel.fit([0, 5], vocabulary_size=2)


def test_bigram_counted_shard_by_shard_equals_the_whole_stream():
    tokens = np.random.default_rng(1).integers(0, 7, 1000)
    whole = BigramModel.fit(tokens, vocabulary_size=7)
    pieces = BigramModel.fit_pieces(iter([tokens[:1], tokens[1:300], [], tokens[300:]]), vocabulary_size=7)
    np.testing.assert_array_equal(pieces.keys, whole.keys)
    np.testing.assert_array_equal(pieces.counts, whole.counts)  # pairs across pieces counted once


def test_bigram_save_load_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 9, 500)
    bigram = BigramModel.fit(tokens, vocabulary_size=9, k=0.03)
    bigram.save(str(tmp_path))
    loaded = BigramModel.load(str(tmp_path))
    assert (loaded.vocabulary_size, loaded.k) == (9, 0.03)
    grid = np.arange(9)
    previous, following = np.repeat(grid, 9), np.tile(grid, 9)
    np.testing.assert_array_equal(
        loaded.probability(previous, following), bigram.probability(previous, following)
    )
    # Plain arrays, no pickle.
    np.load(tmp_path / "bigram_counts.npy", allow_pickle=False)


def test_fitted_bigram_run_matches_counts_of_the_training_stream(recipe_path, tmp_path):
    from kgpt.data.pipeline import tokenize_corpus
    from kgpt.tokenizers.registry import load_tokenizer

    run_dir = str(tmp_path / "bigram")
    recipe = load_recipe(recipe_path)
    bigram = train_bigram(recipe, run_dir)
    tokenizer = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    stream = [tokenizer.end_of_text_id] + tokenize_corpus(recipe.data, tokenizer, "train").read_tokens().tolist()
    pairs = collections.Counter(zip(stream[:-1], stream[1:]))
    totals = collections.Counter(stream[:-1])
    size, k = tokenizer.vocabulary_size, bigram.k
    for (a, b), count in list(pairs.items())[:20]:
        assert bigram.probability([a], [b])[0] == pytest.approx((count + k) / (totals[a] + k * size))
    # k is the grid value with the lowest validation NLL, computed here from the counts.
    validation = [tokenizer.end_of_text_id] + tokenize_corpus(
        recipe.data, tokenizer, "validation"
    ).read_tokens().tolist()

    def validation_nll(k):
        return sum(
            -math.log((pairs[a, b] + k) / (totals[a] + k * size))
            for a, b in zip(validation[:-1], validation[1:])
        ) / (len(validation) - 1)

    by_k = {candidate: validation_nll(candidate) for candidate in SMOOTHING_GRID}
    assert min(by_k, key=by_k.get) == k
    with open(os.path.join(run_dir, "config.json")) as f:
        recorded = json.load(f)["model"]["validation_nll_by_k"]
    for candidate, nll in by_k.items():
        assert recorded[str(candidate)] == pytest.approx(nll, rel=1e-9)
    # A bigram only looks one token back: the stride changes nothing.
    by_stride = [evaluate_runs([run_dir], stride=s)[0] for s in (16, 1)]
    assert by_stride[0].tokens == by_stride[1].tokens
    assert by_stride[0].nll == pytest.approx(by_stride[1].nll, rel=1e-9)
    assert by_stride[0].perplexity < 0.5 * size


def _tree(path):
    return {
        os.path.relpath(os.path.join(root, name), path): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(path) for name in names
    }


def test_bigram_refits_only_a_bigram_run_of_the_same_data(recipe_path, tmp_path):
    from kgpt.files import _host

    run_dir = tmp_path / "runs" / "bigram"
    recipe = load_recipe(recipe_path)
    train_bigram(recipe, str(run_dir), k=0.1)
    # The staging folder of a fit killed halfway (its process is gone) is removed by the next fit.
    (tmp_path / "runs" / f".tmp-{_host()}-999999-abc-bigram").mkdir()
    assert train_bigram(recipe, str(run_dir), k=0.01).k == 0.01  # same data: fitted again
    with open(run_dir / "bigram.json") as f:
        assert json.load(f)["k"] == 0.01
    assert os.listdir(tmp_path / "runs") == ["bigram"]  # no staging folder left beside it
    before = _tree(run_dir)
    other_data = load_recipe(recipe_path, ["data.validation_fraction=0.3"])
    differs = r"fitted on other data: data\.validation_fraction \(0.2 -> 0.3\)"
    with pytest.raises(ValueError, match=differs):
        train_bigram(other_data, str(run_dir))
    assert _tree(run_dir) == before
    # A GPT run directory is never overwritten by a bigram.
    gpt_run = tmp_path / "runs" / "gpt"
    gpt_run.mkdir()
    (gpt_run / "config.json").write_text('{"model": {"num_layers": 1}}')
    (gpt_run / "final.keras").write_bytes(b"weights")
    with pytest.raises(ValueError, match="something other than a bigram run"):
        train_bigram(recipe, str(gpt_run))
    assert _tree(gpt_run) == {
        "config.json": b'{"model": {"num_layers": 1}}', "final.keras": b"weights"
    }


def test_bigram_tokenizer_from_must_match_the_recipes_tokenizer(recipe_path, tmp_path, capsys):
    from kgpt.tokenizers.bpe import train_bpe

    recipe = load_recipe(recipe_path)
    char_run = tmp_path / "char_run"
    train_bigram(recipe, str(char_run))
    shared = train_bigram(recipe, str(tmp_path / "shared"), tokenizer_from=str(char_run))
    assert shared.vocabulary_size == BigramModel.load(str(char_run)).vocabulary_size
    bpe_run = tmp_path / "bpe_run"
    bpe = train_bpe(["the cat sat. a dog ran. " * 20], vocabulary_size=300)
    bpe.save(str(bpe_run / "tokenizer"))
    argv = ["baseline", "bigram", str(recipe_path), "--run-dir", str(tmp_path / "b"),
            "--tokenizer-from", str(bpe_run)]
    assert main(argv) == 2
    assert "data.tokenizer: recipe 'char' vs" in capsys.readouterr().err
    assert main(argv[:-1] + [str(tmp_path / "missing")]) == 2
    assert "--tokenizer-from=" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "b")


def _tiny_recurrent(**kwargs):
    return RecurrentLanguageModel(
        vocabulary_size=32, sequence_length=8, num_layers=2, num_heads=2, hidden_dim=16, **kwargs
    )


def test_recurrent_model_is_causal():
    model = _tiny_recurrent()
    ids = np.random.default_rng(0).integers(0, 32, (2, 8))
    logits = np.asarray(model(ids))
    assert logits.shape == (2, 8, 32) and logits.dtype == np.float32
    for t in range(7):
        changed = ids.copy()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 32
        new = np.asarray(model(changed))
        np.testing.assert_allclose(new[:, : t + 1], logits[:, : t + 1], atol=1e-6)
        assert not np.allclose(new[:, t + 1], logits[:, t + 1])


def test_recurrent_model_round_trips_through_a_keras_file(tmp_path):
    from kgpt.model.saving import save_model
    from kgpt.rundir import load_model

    model = _tiny_recurrent(dropout=0.1)
    ids = np.random.default_rng(1).integers(0, 32, (2, 8))
    save_model(model, str(tmp_path / "gru.keras"))
    loaded = load_model(str(tmp_path / "gru.keras"))
    assert isinstance(loaded, RecurrentLanguageModel)
    assert loaded.get_config() == model.get_config()
    np.testing.assert_allclose(np.asarray(loaded(ids)), np.asarray(model(ids)), atol=1e-6)


@pytest.mark.slow
def test_gru_baseline_trains_with_the_gpt_pipeline_and_its_loss_falls(recipe_path, tmp_path, capsys):
    from kgpt.rundir import load_model

    run_dir = str(tmp_path / "gru")
    argv = ["baseline", "gru", str(recipe_path), "--run-dir", run_dir,
            "--set", "train.sample_prompt=the"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Trained the GRU baseline 30 steps" in out
    assert "--- sample after evaluation 3 ---\nthe" in out  # decoded by recomputation
    with open(os.path.join(run_dir, "config.json")) as f:
        stored = json.load(f)
    assert stored["train"]["sample_prompt"] == "the" and stored["model"]["kind"] == "gru"
    for name in ("config.json", "tokenizer", "best.keras", "final.keras", "history.csv"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    with open(os.path.join(run_dir, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])
    model = load_model(run_dir)
    assert isinstance(model, RecurrentLanguageModel)
    assert float(rows[-1]["val_loss"]) < 0.8 * math.log(model.model_config.vocabulary_size)
    # The schedule is the GPT's: warmup then cosine down to min_learning_rate at the end.
    assert float(rows[-1]["learning_rate"]) == pytest.approx(1e-3, rel=1e-3)
    # The run directory works with the commands that take a GPT run.
    assert main(["info", run_dir]) == 0
    assert "Model: RecurrentLanguageModel" in capsys.readouterr().out
    assert main(["generate", run_dir, "--prompt", "the", "--max-new-tokens", "6", "--json"]) == 0
    (text,) = json.loads(capsys.readouterr().out)
    assert text.startswith("the") and len(text) <= len("the") + 6
    # `kgpt train` with model.kind=gru is the same run: it resumes it, with nothing left to do.
    assert main(["train", str(recipe_path), "--run-dir", run_dir, "--set", "model.kind=gru",
                 "--set", "train.sample_prompt=the"]) == 0
    assert "Nothing left to train" in capsys.readouterr().out

    # kgpt evaluate reads it beside a bigram fitted on the same recipe.
    bigram_dir = str(tmp_path / "bigram")
    assert main(["baseline", "bigram", str(recipe_path), "--run-dir", bigram_dir, "--k", "0.1"]) == 0
    assert "k=0.1" in capsys.readouterr().out
    assert main(["evaluate", run_dir, bigram_dir, "--json"]) == 0
    gru, bigram = json.loads(capsys.readouterr().out)
    assert (gru["model"], bigram["model"]) == ("RecurrentLanguageModel", "bigram (k=0.1)")
    assert gru["tokens"] == bigram["tokens"] and gru["split"] == "validation"
    for row in (gru, bigram):  # both far better than a uniform guess
        assert row["perplexity"] < 0.5 * model.model_config.vocabulary_size


def test_baseline_command_reports_bad_input(recipe_path, tmp_path, capsys):
    assert main(["baseline", "gru", str(recipe_path), "--k", "1"]) == 2
    assert "--k and --tokenizer-from apply to 'kgpt baseline bigram' only" in capsys.readouterr().err
    assert main(["baseline", "bigram", str(recipe_path), "--run-dir", str(tmp_path / "b"), "--k", "-1"]) == 2
    assert "k=-1.0 must be positive" in capsys.readouterr().err
    assert main(["baseline", "bigram", str(tmp_path / "missing.toml")]) == 2
    assert "No such recipe" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["baseline", "lstm", str(recipe_path)])
    assert exit_info.value.code == 2
