import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kgpt import gpt2
from kgpt.cli import main
from kgpt.rundir import load_model
from kgpt.tokenizers.registry import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"n_positions": 16, "n_embd": 16, "n_layer": 2, "n_head": 2}


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    characters, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, characters)))


def _write_tokenizer(directory):
    """A tiny byte-level GPT-2 tokenizer: 256 bytes, a few merges, <|endoftext|> last."""
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "a t", "Ġ s", "i n", "Ġ c"]
    vocabulary = {symbol: i for i, symbol in enumerate(_bytes_to_unicode().values())}
    for merge in merges:
        vocabulary[merge.replace(" ", "")] = len(vocabulary)
    vocabulary["<|endoftext|>"] = len(vocabulary)
    (directory / "vocab.json").write_text(json.dumps(vocabulary))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocabulary)


def _hf_config(vocabulary_size, **overrides):
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocabulary_size,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0,
            **SIZES, **overrides}


def _random_tensors(config, seed=0, prefix=""):
    """HF-named random tensors for a `ModelConfig`, plus the legacy attention-mask buffers."""
    rng = np.random.default_rng(seed)
    tensors = {
        prefix + name: rng.normal(0, 0.3, shape).astype(np.float32)
        for name, (_, shape) in gpt2._hf_names(config).items()
    }
    for layer in range(config.num_layers):
        mask = np.tril(np.ones((1, 1, config.sequence_length, config.sequence_length), np.float32))
        tensors[f"{prefix}h.{layer}.attn.bias"] = mask
        tensors[f"{prefix}h.{layer}.attn.masked_bias"] = np.array(-1e4, np.float32)
    return tensors


@pytest.fixture
def hf_folder(tmp_path):
    """A tiny GPT-2 folder in HF's layout, written without torch."""
    folder = tmp_path / "hf"
    folder.mkdir()
    hf_config = _hf_config(_write_tokenizer(folder))
    (folder / "config.json").write_text(json.dumps(hf_config))
    tensors = _random_tensors(gpt2.model_config_from_hf(hf_config), prefix="transformer.")
    gpt2.write_safetensors(tensors, str(folder / "model.safetensors"), {"format": "pt"})
    return folder, tensors


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_prefixed_and_unprefixed_names_land_on_the_same_weights(tmp_path, prefix):
    _write_tokenizer(tmp_path)
    hf_config = _hf_config(265)
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    config = gpt2.model_config_from_hf(hf_config)
    tensors = _random_tensors(config, prefix=prefix)
    tensors[prefix.replace("transformer.", "") + "lm_head.weight"] = tensors[prefix + "wte.weight"]
    gpt2.write_safetensors(tensors, str(tmp_path / "model.safetensors"))
    model = gpt2.load_gpt2(str(tmp_path))
    weights = {v.path.split("/", 1)[1]: v.numpy() for v in model.weights}
    np.testing.assert_array_equal(weights["embeddings/token_embedding/embeddings"], tensors[prefix + "wte.weight"])
    np.testing.assert_array_equal(weights["block_1/attention/qkv/kernel"], tensors[prefix + "h.1.attn.c_attn.weight"])
    np.testing.assert_array_equal(weights["block_0/feed_forward/output/bias"], tensors[prefix + "h.0.mlp.c_proj.bias"])
    np.testing.assert_array_equal(weights["final_norm/gamma"], tensors[prefix + "ln_f.weight"])
    assert len(weights) == len(gpt2._hf_names(config))


def test_wrong_shape_missing_tensor_and_other_architectures_are_named():
    config = gpt2.model_config_from_hf(_hf_config(265))
    tensors = _random_tensors(config)
    tensors["h.1.mlp.c_fc.weight"] = np.zeros((16, 32), np.float32)
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight has shape \(16, 32\), expected \(16, 64\)"):
        gpt2.convert_weights(tensors, config)
    tensors = _random_tensors(config)
    del tensors["h.0.ln_2.bias"]
    with pytest.raises(ValueError, match=r"h\.0\.ln_2\.bias is missing \(expected shape \(16,\)\)"):
        gpt2.convert_weights(tensors, config)
    tensors = _random_tensors(config)
    tensors["lm_head.weight"] = tensors["wte.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.weight.*differs from wte.weight"):
        gpt2.convert_weights(tensors, config)
    tensors = {**_random_tensors(config), "h.2.ln_1.weight": np.zeros(16, np.float32)}
    with pytest.raises(ValueError, match=r"Unexpected tensor\(s\) h\.2\.ln_1\.weight"):
        gpt2.convert_weights(tensors, config)
    with pytest.raises(ValueError, match="model_type='llama'"):
        gpt2.model_config_from_hf({**_hf_config(265), "model_type": "llama"})
    with pytest.raises(ValueError, match="activation_function='relu'"):
        gpt2.model_config_from_hf(_hf_config(265, activation_function="relu"))


def test_safetensors_round_trip_keeps_dtypes_and_values(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int64),
               "c": np.float16([0.5, 1.5])}
    gpt2.write_safetensors(tensors, str(tmp_path / "x.safetensors"), {"format": "pt"})
    loaded = gpt2.read_safetensors(str(tmp_path / "x.safetensors"))
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded[name], value)


def test_import_writes_a_run_directory_that_loads(hf_folder, tmp_path):
    folder, tensors = hf_folder
    run_dir = str(tmp_path / "run")
    assert main(["import-gpt2", str(folder), "--out", run_dir]) == 0
    model = load_model(run_dir)
    np.testing.assert_array_equal(model.token_embeddings.numpy(), tensors["transformer.wte.weight"])
    tokenizer = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    assert tokenizer.kind == "gpt2" and tokenizer.vocabulary_size == 265
    assert tokenizer.tokenize("the cat").numpy().tolist() == [83, 257, 263, 260]  # t he Ġc at
    with open(os.path.join(run_dir, "config.json")) as f:
        stored = json.load(f)
    from kgpt.recipe import Recipe

    assert Recipe.from_dict(stored).model["num_layers"] == 2
    # An existing run directory is not overwritten without --force.
    assert main(["import-gpt2", str(folder), "--out", run_dir]) == 2
    assert main(["import-gpt2", str(folder), "--out", run_dir, "--force"]) == 0


@pytest.mark.parametrize("keep, missing", [
    (["config.json"], "model.safetensors (or model.safetensors.index.json or pytorch_model.bin), "
                      "vocab.json (or encoder.json), merges.txt"),
    (["config.json", "model.safetensors", "vocab.json"], "merges.txt"),
])
def test_import_of_an_incomplete_folder_names_the_missing_files(hf_folder, tmp_path, capsys, keep, missing):
    folder, _ = hf_folder
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in keep:
        (partial / name).write_bytes((folder / name).read_bytes())
    assert main(["import-gpt2", str(partial), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"it lacks {missing}; a GPT-2 folder holds config.json" in error
    assert "data.tokenizer_path" not in error and not (tmp_path / "run").exists()


def test_cli_export_format_hf_round_trips_through_import(hf_folder, tmp_path, capsys):
    folder, tensors = hf_folder
    run_dir, hf_out = str(tmp_path / "run"), str(tmp_path / "hf_out")
    assert main(["import-gpt2", str(folder), "--out", run_dir]) == 0
    assert main(["export", run_dir, "--format", "hf", "--out", hf_out]) == 0
    assert sorted(os.listdir(hf_out)) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    exported = gpt2.read_safetensors(os.path.join(hf_out, "model.safetensors"))
    np.testing.assert_array_equal(exported["wte.weight"], tensors["transformer.wte.weight"])
    again = str(tmp_path / "again")
    assert main(["import-gpt2", hf_out, "--out", again]) == 0
    ids = np.array([[1, 83, 257, 263, 260]], np.int32)
    np.testing.assert_array_equal(load_model(again)(ids).numpy(), load_model(run_dir)(ids).numpy())
    # Never over an existing folder; --out is required; nothing half-written is left behind.
    capsys.readouterr()
    assert main(["export", run_dir, "--format", "hf", "--out", hf_out]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", run_dir, "--format", "hf"]) == 2
    assert "--out" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["again", "hf", "hf_out", "run"]


def test_pickled_checkpoint_without_torch_is_refused(hf_folder, monkeypatch):
    folder, _ = hf_folder
    os.remove(folder / "model.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ValueError, match="weights_only=True.*torch is not installed.*safetensors"):
        gpt2.read_checkpoint(str(folder))


class _Payload:
    """An arbitrary object: a pickle of it runs code on load unless weights_only refuses it."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_pickled_checkpoint_with_code_is_refused_and_tensors_load(hf_folder):
    torch = pytest.importorskip("torch", reason="pytorch_model.bin needs the gpt2 extra (torch)")
    folder, tensors = hf_folder
    os.remove(folder / "model.safetensors")
    torch.save({"wte.weight": torch.zeros(2), "evil": _Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="Refusing .*weights_only=True.*safetensors"):
        gpt2.read_checkpoint(str(folder))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, folder / "pytorch_model.bin")
    model = gpt2.load_gpt2(str(folder))
    np.testing.assert_array_equal(model.blocks[0].attention.qkv_dense.kernel.numpy(),
                                  tensors["transformer.h.0.attn.c_attn.weight"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny random transformers GPT2LMHeadModel saved with save_pretrained (no download)."""
    torch = pytest.importorskip("torch", reason="parity needs the gpt2 extra: torch")
    transformers = pytest.importorskip("transformers", reason="parity needs the gpt2 extra: transformers")
    folder = tmp_path_factory.mktemp("reference")
    vocabulary_size = _write_tokenizer(folder)
    torch.manual_seed(0)
    # A wide initialiser keeps greedy choices far from ties, so float32 rounding cannot flip them.
    config = transformers.GPT2Config(
        vocab_size=vocabulary_size, n_positions=32, n_embd=16, n_layer=2, n_head=2,
        initializer_range=0.3, bos_token_id=vocabulary_size - 1, eos_token_id=vocabulary_size - 1,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return torch, transformers, model, folder


def test_imported_logits_and_greedy_continuations_match_transformers(reference, tmp_path):
    from kgpt.generation.decoder import Decoder

    torch, _, reference_model, folder = reference
    model = gpt2.import_gpt2(str(folder), str(tmp_path / "run"))
    ids = np.random.default_rng(0).integers(0, 265, (3, 32))
    with torch.no_grad():
        expected = reference_model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), expected, atol=1e-4, rtol=0)
    prompts = [[5, 6, 7, 8], [200, 17, 3, 99]]
    with torch.no_grad():
        reference_ids = reference_model.generate(
            torch.tensor(prompts), max_new_tokens=24, do_sample=False, pad_token_id=0,
            attention_mask=torch.ones(2, 4, dtype=torch.long), eos_token_id=None,
        ).numpy()[:, 4:].tolist()
    assert Decoder(model)(prompts, max_new_tokens=24) == reference_ids


def test_exported_folder_loads_in_transformers_with_the_same_logits(reference, tmp_path):
    torch, transformers, _, folder = reference
    model = gpt2.load_gpt2(str(folder))
    gpt2.export_gpt2(model, load_tokenizer_from_folder(folder), str(tmp_path / "hf"))
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    ids = np.random.default_rng(1).integers(0, 265, (2, 32))
    with torch.no_grad():
        expected = reloaded(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), expected, atol=1e-4, rtol=0)


def load_tokenizer_from_folder(folder):
    from kgpt.tokenizers.bpe import load_gpt2_tokenizer

    return load_gpt2_tokenizer(str(folder))


FINE_TUNE_RECIPE = """
[data]
corpus = "text"
files = ["corpus.txt"]
tokenizer = "gpt2"
sequence_length = 16
validation_fraction = 0.2

[train]
batch_size = 8
max_steps = 10
eval_interval = 10
eval_steps = 1
learning_rate = 1e-2
warmup_steps = 2
min_learning_rate = 3e-4
jit_compile = false
"""


@pytest.mark.slow
def test_fine_tuning_an_imported_model_lowers_the_loss(hf_folder, tmp_path, monkeypatch):
    from kgpt.evaluate import evaluate_runs
    from kgpt.recipe import load_recipe
    from kgpt.training.train import train

    folder, _ = hf_folder
    imported = str(tmp_path / "imported")
    gpt2.import_gpt2(str(folder), imported)
    rng = np.random.RandomState(0)
    paragraphs = [" ".join(rng.choice(["the cat sat.", "a cat at the sea."], size=4)) for _ in range(40)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(paragraphs))
    recipe = FINE_TUNE_RECIPE.replace(
        "[data]", f'[data]\ndir = "{tmp_path}"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'tokenizer_path = "{imported}/tokenizer"'
    )
    (tmp_path / "recipe.toml").write_text(recipe)
    run_dir = str(tmp_path / "fine_tuned")
    result = train(load_recipe(tmp_path / "recipe.toml", [f"train.init_from={imported}"]), run_dir, verbose=0)
    assert result.steps == 10
    # The same validation text, windows and tokenizer before and after fine-tuning.
    monkeypatch.setenv("KGPT_CACHE_DIR", str(tmp_path / "cache"))
    before, after = evaluate_runs([imported, run_dir], data=str(tmp_path / "corpus.txt"))
    assert after.context == before.context == 16 and after.tokens == before.tokens
    assert after.nll < 0.9 * before.nll
    # A recipe that sets a different size conflicts with the imported model, naming both values.
    with pytest.raises(ValueError, match=r"model\.hidden_dim: recipe 32 vs .*imported: 16"):
        train(load_recipe(tmp_path / "recipe.toml", [f"train.init_from={imported}", "model.hidden_dim=32"]),
              str(tmp_path / "conflict"), verbose=0)
    # So does another tokenizer kind, before anything is written.
    (tmp_path / "char.toml").write_text(recipe.replace('tokenizer = "gpt2"', 'tokenizer = "char"'))
    with pytest.raises(ValueError, match=r"data\.tokenizer: recipe 'char' vs .*imported: 'gpt2'.*"
                       r"data\.tokenizer_path = '.*imported/tokenizer'"):
        train(load_recipe(tmp_path / "char.toml", [f"train.init_from={imported}"]),
              str(tmp_path / "char_run"), verbose=0)
    assert not os.path.exists(tmp_path / "char_run")
    with pytest.raises(FileNotFoundError, match="train.init_from='.*nowhere' is not a directory"):
        train(load_recipe(tmp_path / "recipe.toml", [f"train.init_from={tmp_path / 'nowhere'}"]),
              str(tmp_path / "nowhere_run"), verbose=0)


def _wikitext_articles(rng, count):
    """WikiText-2-shaped raw text: ` = Title = ` articles with ` = = Section = = ` headings."""
    sentences = ["the cat sat on the mat .", "a cat at the sea is in the sun .",
                 "the history of the cat is the history of the sea ."]
    lines = []
    for index in range(count):
        lines += ["", f" = Article {index} = ", ""]
        for section in range(2):
            lines += [f" = = Part {section} = = ", "",
                      " " + " ".join(rng.choice(sentences, size=8)) + " ", ""]
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_wikitext2_gpt2_recipe_fine_tunes_an_imported_model_end_to_end(tmp_path, monkeypatch, capsys):
    """pipelines/wikitext2_gpt2.toml as its header says to run it, on a tiny random GPT-2 made by
    transformers (context 256, the recipe's) and a WikiText-2-shaped corpus, in a fresh working
    directory: `kgpt import-gpt2` into checkpoints/gpt2, `kgpt train` (a process of its own),
    then `kgpt generate` and `kgpt evaluate` on the result."""
    torch = pytest.importorskip("torch", reason="needs the gpt2 extra: torch")
    transformers = pytest.importorskip("transformers", reason="needs the gpt2 extra: transformers")
    hf = tmp_path / "hf"
    hf.mkdir()
    vocabulary_size = _write_tokenizer(hf)
    torch.manual_seed(0)
    # A wide initialiser: the imported weights are far from a fresh model's (std 0.02).
    config = transformers.GPT2Config(
        vocab_size=vocabulary_size, n_positions=256, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3,
        bos_token_id=vocabulary_size - 1, eos_token_id=vocabulary_size - 1,
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(hf)
    data = tmp_path / "wikitext-2-raw"
    data.mkdir()
    rng = np.random.RandomState(0)
    for split, count in (("train", 40), ("valid", 6), ("test", 6)):
        (data / f"wiki.{split}.raw").write_text(_wikitext_articles(rng, count))
    work = tmp_path / "work"  # the recipe's relative paths: checkpoints/gpt2
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("KGPT_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["import-gpt2", str(hf), "--out", "checkpoints/gpt2"]) == 0

    recipe = os.path.join(ROOT, "pipelines", "wikitext2_gpt2.toml")
    command = [sys.executable, "-m", "kgpt", "train", recipe, "--set", f"data.dir={data}",
               "--set", "train.max_steps=20", "--set", "train.eval_interval=10",
               "--set", "train.eval_steps=2", "--set", "train.sample_length=8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "parameters (2 layers, 2 heads, hidden 32, context 256)" in done.stdout  # the imported sizes
    run_dir = os.path.join("checkpoints", "wikitext2_gpt2")
    with open(os.path.join(run_dir, "history.csv")) as f:
        history = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in history] == [0, 1]
    assert float(history[1]["val_loss"]) < float(history[0]["val_loss"])
    # From the imported weights: 20 AdamW steps of at most 6e-5 move no weight by more than ~1.2e-3.
    imported, tuned = load_model("checkpoints/gpt2"), load_model(run_dir)
    moved = [np.abs(a - b).max() for a, b in zip(imported.get_weights(), tuned.get_weights())]
    assert 0 < max(moved) < 2e-3
    assert np.std(imported.token_embeddings.numpy()) > 0.2  # transformers' 0.3, not a fresh 0.02

    capsys.readouterr()
    assert main(["generate", run_dir, "--prompt", "The history of", "--max-new-tokens", "8", "--json"]) == 0
    (continuation,) = json.loads(capsys.readouterr().out)
    assert continuation.startswith("The history of") and len(continuation) > len("The history of")
    assert main(["evaluate", "checkpoints/gpt2", run_dir, "--data-dir", str(data), "--json"]) == 0
    before, after = json.loads(capsys.readouterr().out)
    assert before["split"] == after["split"] == "test" and before["tokens"] == after["tokens"] > 0
    assert after["nll"] < before["nll"]
