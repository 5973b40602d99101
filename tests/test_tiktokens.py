"""Tests for kgpt.tokenizers.tiktokens and the `tiktoken:NAME` tokenizers: offline loading from the encoding files
in ../shared/data/tiktoken (skipped when absent), round trips, `tiktoken:gpt2` in the graph with
tiktoken's ids, a training run and its export, and the clear errors (offline, not exportable)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from kgpt import tokenizers as tk
from kgpt.cli import main
from kgpt.tokenizers import tiktokens

SHARED_DATA = pathlib.Path(
    os.environ.get("KGPT_SHARED_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data")
)
CACHE = SHARED_DATA / "tiktoken"
needs_files = pytest.mark.skipif(
    not (CACHE / "vocab.bpe").is_file(), reason=f"no tiktoken encoding files in {CACHE}"
)

VARIED_TEXT = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces and   runs of   spaces  ",
    "tabs\tand\nnewlines\n\n\nx\r\ny \n z\n\n  w",
    "digits 1234567 3.14159 2024-01-01 007 1,000,000 $19.99 50%",
    "unicode: café naïve 日本語のテキスト emoji 😀🎉 Ελληνικά русский ÀÉÎ õü",
    "it's don't I'll we've they're she'd I'm IT'S DON'T 'quoted' rock'n'roll",
    "punct!!! ?? ... --- (x) [y] {z} \"q\" <b>x</b> a->b",
    "trailing space ",
    " \u00a0nbsp\u3000ideographic\u2028line\u0085next\u200bzero-width",
    "<|endoftext|>after a special token",
    "a<|endoftext|>b <|endoftext|> <|endoftext|><|endoftext|>",
    "<|endofprompt|> <|fim_prefix|> look like text, not special tokens",
    "",
    "   ",
    "\n",
    "unseen words: zyxwvut quixotic Pneumonoultramicroscopicsilicovolcanoconiosis",
]


@pytest.fixture(scope="module")
def cache():
    """`TIKTOKEN_CACHE_DIR` set to the shared encoding files for this module's tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(tiktokens.CACHE_VARIABLE, str(CACHE))
        yield CACHE


@pytest.fixture(scope="module")
def gpt2(cache):
    return tk.make_tokenizer("tiktoken:gpt2")


def _reference(name, texts):
    """tiktoken's own ids: `<|endoftext|>` is the special token, other special texts are text."""
    encoding = tiktokens.load_encoding(name)
    return [encoding.encode(t, allowed_special={tk.END_OF_TEXT}, disallowed_special=()) for t in texts]


@needs_files
@pytest.mark.parametrize("name, hello_world", [("gpt2", [31373, 995]), ("o200k_base", [24912, 2375])])
def test_encode_decode_round_trips_offline(request, name, hello_world):
    tokenizer = request.getfixturevalue("gpt2") if name == "gpt2" else tk.make_tokenizer(f"tiktoken:{name}")
    encoding = tiktokens.load_encoding(name)
    assert tokenizer.vocabulary_size == encoding.n_vocab and tokenizer.end_of_text_id == encoding.eot_token
    assert tokenizer.encode_documents(["hello world"])[0].tolist() == hello_world  # tiktoken's published ids
    rows = [r.tolist() for r in tokenizer.encode_documents(VARIED_TEXT)]
    assert rows == _reference(name, VARIED_TEXT)
    assert rows[9][0] == tokenizer.end_of_text_id and rows[10].count(tokenizer.end_of_text_id) == 4
    if not tokenizer.graph_compatible:  # eager tokenize is tiktoken itself (the graph's: a slow test)
        assert tokenizer.tokenize(tf.constant(VARIED_TEXT)).to_list() == rows
    decoded = tokenizer.detokenize(tf.ragged.constant(rows, dtype=tf.int32)).numpy()
    assert [d.decode("utf-8") for d in decoded] == VARIED_TEXT


@needs_files
def test_byte_level_bpe_of_gpt2_is_gpt2s_own_files(cache):
    vocabulary, merges = tiktokens.byte_level_bpe(tiktokens.load_encoding("gpt2"))
    assert vocabulary == json.loads((CACHE / "encoder.json").read_text(encoding="utf-8"))
    lines = (CACHE / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version") and merges == [line for line in lines[1:] if line]


@needs_files
@pytest.mark.slow  # tracing the BPE merge loop: ~15 s per encoding on 2 cores
@pytest.mark.parametrize("name", ["gpt2", "p50k_base"])
def test_gpt2_pattern_encodings_run_in_the_graph_with_tiktokens_ids(request, name):
    tokenizer = request.getfixturevalue("gpt2") if name == "gpt2" else tk.make_tokenizer(f"tiktoken:{name}")
    texts = list(VARIED_TEXT)
    wikitext = SHARED_DATA / "wikitext-2-raw" / "wiki.valid.raw"
    if wikitext.is_file():  # real text as well, where the shared corpora are
        texts += wikitext.read_text(encoding="utf-8").splitlines()[:300]
    expected = _reference(name, texts)
    assert tokenizer.graph_compatible and tokenizer.graph_problem() is None
    assert tokenizer.tokenize(tf.constant(texts)).to_list() == expected  # eager: a tf.function

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def round_trip(strings):
        ids = tokenizer.tokenize(strings)
        return ids.to_tensor(-1), tokenizer.detokenize(ids)

    ids, text = round_trip(tf.constant(VARIED_TEXT))
    assert [[i for i in row if i >= 0] for row in ids.numpy().tolist()] == expected[: len(VARIED_TEXT)]
    assert [t.decode("utf-8") for t in text.numpy()] == VARIED_TEXT


@needs_files
def test_tiktoken_gpt2_is_saved_by_name_and_fingerprinted_by_its_files(gpt2, tmp_path):
    gpt2.save(tmp_path / "tokenizer")
    # A copy of the encoding, so that the folder loads without tiktoken's cache or a network.
    assert sorted(os.listdir(tmp_path / "tokenizer")) == sorted(
        [tk.CONFIG_FILENAME, tiktokens.ENCODING_FILENAME, tiktokens.RANKS_FILENAME])
    saved = json.loads((tmp_path / "tokenizer" / tk.CONFIG_FILENAME).read_text())
    assert saved["kind"] == "tiktoken:gpt2" and saved["special_tokens"] == [tk.END_OF_TEXT]
    loaded = tk.load_tokenizer(str(tmp_path / "tokenizer"))
    assert loaded.fingerprint == gpt2.fingerprint and loaded.graph_compatible
    original = tiktokens.load_encoding("gpt2")
    assert loaded._encoding is not original and loaded._encoding._mergeable_ranks == original._mergeable_ranks
    assert loaded._encoding._pat_str == original._pat_str and loaded._encoding.eot_token == original.eot_token
    lowercase = tk.TiktokenTokenizer("gpt2", normalization=tk.Normalization(lowercase=True))
    assert lowercase.fingerprint != gpt2.fingerprint
    upper, lower = lowercase.encode_documents(["HELLO World"])[0], gpt2.encode_documents(["hello world"])[0]
    assert upper.tolist() == lower.tolist()


@needs_files
@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_encodings_the_graph_cannot_split_say_why_and_what_to_use(cache, name):
    tokenizer = tk.make_tokenizer(f"tiktoken:{name}")
    assert not tokenizer.graph_compatible
    problem = tokenizer.graph_problem()
    for part in (repr(name), r"look-ahead (\s+(?!\S))", "RE2", "'tiktoken:gpt2', 'gpt2' or 'bpe'", "in-process"):
        assert part in problem
    with pytest.raises(ValueError, match="look-ahead"):
        tf.function(lambda s: tokenizer.tokenize(s).to_tensor())(tf.constant(["hello"]))


@needs_files
def test_export_of_an_encoding_the_graph_cannot_split_exits_2(cache, tmp_path, write_run_directory, capsys):
    run_dir, _ = write_run_directory(tmp_path / "run", tk.make_tokenizer("tiktoken:o200k_base"), 16)
    assert main(["export", run_dir, "--name", "o200k", "--base-dir", str(tmp_path / "saved")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"kgpt export: error: Cannot export {run_dir}: the SavedModel tokenizes")
    assert "'o200k_base'" in error and "RE2" in error and "tokenizer 'tiktoken:gpt2'" in error
    assert not (tmp_path / "saved").exists()


def test_an_unknown_encoding_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unknown tiktoken encoding 'o300k'; .* one of .*o200k_base"):
        tk.make_tokenizer("tiktoken:o300k")


OFFLINE = """
from kgpt.tokenizers.tiktokens import load_encoding
try:
    load_encoding("o200k_base")
except FileNotFoundError as error:
    print(error)
"""


def test_offline_without_the_files_is_a_clear_error(tmp_path):
    # A fresh process (tiktoken keeps loaded encodings), an empty cache, and no way out: a proxy
    # that refuses connections stands in for a machine without network.
    environment = {**os.environ, tiktokens.CACHE_VARIABLE: str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9",
                   "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}
    environment["PYTHONPATH"] = os.pathsep.join([str(pathlib.Path(__file__).parents[1]), *sys.path])
    result = subprocess.run([sys.executable, "-c", OFFLINE], capture_output=True, text=True,
                            env=environment, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    message = result.stdout
    assert message.startswith("tiktoken could not load the BPE file of encoding 'o200k_base'")
    assert f"TIKTOKEN_CACHE_DIR={tmp_path}" in message and "keeps its own copy in tokenizer/" in message
    assert os.listdir(tmp_path) == []


# --- a training run and its export ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    """A tiny model trained with `tiktoken:gpt2` through the CLI: `(run_dir, corpus texts)`."""
    folder = tmp_path_factory.mktemp("tiktoken_run")
    paragraphs = [f"The cat sat on mat {i}. A dog ran, didn't it? Café 😀 {i * 7}" for i in range(40)]
    (folder / "corpus.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    recipe = folder / "recipe.toml"
    recipe.write_text(f"""
[model]
num_layers = 1
num_heads = 2
hidden_dim = 16

[data]
corpus = "text"
files = ["corpus.txt"]
dir = "{folder}"
cache_dir = "{folder / "cache"}"
tokenizer = "tiktoken:gpt2"
sequence_length = 16
validation_fraction = 0.2

[train]
batch_size = 4
max_steps = 6
eval_interval = 3
eval_steps = 1
learning_rate = 1e-2
warmup_steps = 1
jit_compile = false
""")
    run_dir = str(folder / "run")
    assert main(["train", str(recipe), "--run-dir", run_dir]) == 0
    return run_dir, paragraphs


@needs_files
@pytest.mark.slow
def test_a_training_run_with_tiktoken_gpt2_stores_tiktokens_ids_and_generates(trained, gpt2, capsys):
    from kgpt.data.corpora import iter_documents
    from kgpt.data.pipeline import scoring_tokens
    from kgpt.recipe import load_recipe
    from kgpt.rundir import RunDirectory

    run_dir, _ = trained
    run = RunDirectory(run_dir)
    tokenizer = run.load_tokenizer()
    assert tokenizer.kind == "tiktoken:gpt2" and tokenizer.fingerprint == gpt2.fingerprint
    assert run.load_model().model_config.vocabulary_size == 50257
    # The token store holds tiktoken's ids, each document followed by end-of-text.
    config = load_recipe(os.path.join(os.path.dirname(run_dir), "recipe.toml")).data
    documents = list(iter_documents(config, "validation"))
    expected = [tokenizer.end_of_text_id]
    for ids in _reference("gpt2", documents):
        expected += ids + [tokenizer.end_of_text_id]
    assert len(documents) > 1 and scoring_tokens(config, tokenizer, "validation").tolist() == expected
    assert main(["generate", run_dir, "--prompt", "The cat", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


GENERATE_AND_EXPORT_OFFLINE = """
import sys
import tiktoken.load
from kgpt.cli import main

def refuse(blobpath):
    raise ConnectionError("no network: " + blobpath)

tiktoken.load.read_file = refuse
run_dir, base_dir = sys.argv[1:]
assert main(["generate", run_dir, "--prompt", "The cat", "--max-new-tokens", "2"]) == 0
assert main(["export", run_dir, "--name", "tiny", "--base-dir", base_dir, "--max-new-tokens", "4"]) == 0
"""


@pytest.fixture(scope="module")
def offline_export(trained, tmp_path_factory):
    """`trained`'s run generated from and exported in a fresh process (tiktoken keeps loaded
    encodings) with an empty cache and no downloads: `(completed process, base_dir, cache dir)`."""
    folder = tmp_path_factory.mktemp("tiktoken_offline")
    empty, base_dir = folder / "empty", folder / "saved"
    empty.mkdir()
    environment = {**os.environ, tiktokens.CACHE_VARIABLE: str(empty),
                   "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    environment["PYTHONPATH"] = os.pathsep.join([str(pathlib.Path(__file__).parents[1]), *sys.path])
    result = subprocess.run([sys.executable, "-c", GENERATE_AND_EXPORT_OFFLINE, trained[0], str(base_dir)],
                            capture_output=True, text=True, env=environment, timeout=600)
    return result, str(base_dir), empty


@needs_files
@pytest.mark.export
def test_a_tiktoken_gpt2_run_generates_and_exports_without_cache_or_network(offline_export):
    result, base_dir, empty = offline_export
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("The cat") and os.path.isdir(os.path.join(base_dir, "tiny", "1"))
    assert os.listdir(empty) == []


@needs_files
@pytest.mark.export
def test_an_exported_tiktoken_gpt2_model_tokenizes_as_tiktoken(trained, offline_export):
    import tensorflow_text  # noqa: F401  (registers the tokenizer ops before loading)

    from kgpt.generation.generator import Generator
    from kgpt.rundir import RunDirectory
    from kgpt.serving.saved_model_generator import load_generator

    run_dir, paragraphs = trained
    result, base_dir, _ = offline_export  # exported with no cache and no network
    assert result.returncode == 0, result.stderr[-3000:]
    run = RunDirectory(run_dir)
    model, tokenizer = run.load_model(), run.load_tokenizer()
    loaded = tf.saved_model.load(os.path.join(base_dir, "tiny", "1"))
    prompts = [t[:40] for t in VARIED_TEXT if t.strip()] + [paragraphs[0][:30]]
    reference = _reference("gpt2", prompts)
    outputs = loaded.signatures["serving_default"](prompts=tf.constant(prompts))
    # The graph's prompt tokens are tiktoken's (all fit: room = 16 - 4), and so is its greedy text.
    assert outputs["prompt_token_count"].numpy().tolist() == [min(len(r), 12) for r in reference]
    texts = [t.decode("utf-8") for t in outputs["text"].numpy()]
    for generator in (Generator(model, tokenizer, jit_compile=False), load_generator(os.path.join(base_dir, "tiny"))):
        with pytest.warns(UserWarning, match="8 prompt.s. longer than the 12 tokens"):
            assert generator.generate(prompts, max_new_tokens=4) == texts
    # score: the log-likelihood of tiktoken's ids after end-of-text, as the Keras model gives it.
    short = [p for p, r in zip(prompts, reference) if 0 < len(r) <= 16]
    scores = loaded.signatures["score"](texts=tf.constant(short))
    for text, likelihood, count in zip(short, scores["log_likelihood"].numpy(), scores["token_count"].numpy()):
        ids = [tokenizer.end_of_text_id] + _reference("gpt2", [text])[0]
        logits = model(np.array([ids[:-1]], dtype=np.int32))
        picked = tf.gather(tf.nn.log_softmax(tf.cast(logits[0], tf.float32)), ids[1:], batch_dims=1)
        assert count == len(ids) - 1
        np.testing.assert_allclose(likelihood, float(tf.reduce_sum(picked)), rtol=1e-4)


# --- encodings that run only eagerly (o200k_base, cl100k_base) in-process -------------------------

# o200k_base's pre-tokenizer, as tiktoken_ext/openai_public.py spells it: its look-ahead (\s+(?!\S))
# keeps the encoding out of the graph, as cl100k_base's does.
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])


@pytest.fixture
def eager_only(monkeypatch):
    """`tiktoken:o200k_tiny`, built offline: o200k_base's pattern over the 256 bytes and a few
    merges, registered with tiktoken for this test. Like o200k_base, kgpt runs it only eagerly."""
    import tiktoken.registry

    name = "o200k_tiny"
    tiktoken.registry.list_encoding_names()  # loads the registry of encodings
    ranks = {bytes([byte]): byte for byte in range(256)}
    for merge in (b"th", b"the", b" t", b" the", b"at", b" c", b" cat", b"\n\n"):
        ranks[merge] = len(ranks)
    encoding = dict(name=name, pat_str=O200K_PATTERN, mergeable_ranks=ranks,
                    special_tokens={tk.END_OF_TEXT: len(ranks)})
    monkeypatch.setitem(tiktoken.registry.ENCODING_CONSTRUCTORS, name, lambda: encoding)
    yield name
    tiktoken.registry.ENCODINGS.pop(name, None)


def _generates_in_process(generator, capsys, run_dir):
    """The Generator of an eager-only tokenizer: with and without stops, as `kgpt generate` prints it."""
    from kgpt.generation.stopping import cut_at_stop

    tokenizer = generator.tokenizer
    assert not tokenizer.graph_compatible
    # No rows to detokenize: a string tensor of none (it was a float tensor, which crashed).
    none = tokenizer.detokenize(tf.ragged.constant([], dtype=tf.int32, ragged_rank=1))
    assert none.dtype == tf.string and none.shape == [0]
    prompts = ["the cat", ""]
    options = dict(temperature=1.0, seed=2)
    completions = generator.complete(prompts, 12, **options)
    plain = [c.text for c in completions]
    assert plain == generator.generate(prompts, 12, **options)
    assert all(c.finish_reason in ("stop", "length") and c.token_count >= 1 for c in completions)
    stop = [plain[0][2:4] or "the"]
    assert generator.generate(prompts, 12, stop=stop, **options) == [cut_at_stop(t, stop) for t in plain]
    assert main(["generate", run_dir, "--prompt", "the cat", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("the cat")


def test_an_eager_only_encoding_trains_with_samples_and_generates(eager_only, write_toy_recipe, tmp_path,
                                                                  capsys):
    from kgpt.generation.generator import Generator

    recipe = write_toy_recipe(max_steps=4, eval_interval=2, eval_steps=1)
    recipe.write_text(recipe.read_text().replace('tokenizer = "char"', f'tokenizer = "tiktoken:{eager_only}"'))
    run_dir = str(tmp_path / "run")
    sample = ["--set=train.sample_prompt=the cat", "--set=train.sample_length=6"]
    assert main(["train", str(recipe), "--run-dir", run_dir, *sample]) == 0
    printed = capsys.readouterr().out
    assert printed.count("--- sample after evaluation") == 2 and "\nthe cat" in printed
    generator = Generator.from_run_directory(run_dir, jit_compile=False)  # no XLA compilation to wait for
    assert generator.tokenizer.kind == f"tiktoken:{eager_only}"
    _generates_in_process(generator, capsys, run_dir)


def _no_network(monkeypatch, empty):
    """tiktoken's cache is `empty` and any download fails."""
    import tiktoken.load

    def refuse(blobpath):
        raise ConnectionError(f"no network in this test: {blobpath}")

    monkeypatch.setenv(tiktokens.CACHE_VARIABLE, str(empty))
    monkeypatch.setattr(tiktoken.load, "read_file", refuse)


def test_a_run_directory_keeps_its_encoding_and_loads_without_cache_or_network(
        eager_only, write_toy_recipe, tmp_path, monkeypatch, capsys):
    import tiktoken.registry

    recipe = write_toy_recipe(max_steps=2, eval_interval=2, eval_steps=1)
    recipe.write_text(recipe.read_text().replace('tokenizer = "char"', f'tokenizer = "tiktoken:{eager_only}"'))
    run_dir = tmp_path / "run"
    monkeypatch.setenv(tiktokens.CACHE_VARIABLE, str(tmp_path / "tiktoken-cache"))
    assert main(["train", str(recipe), "--run-dir", str(run_dir)]) == 0
    assert (run_dir / "tokenizer" / tiktokens.RANKS_FILENAME).is_file()
    # Now tiktoken knows no such encoding, has nothing cached and cannot download.
    monkeypatch.delitem(tiktoken.registry.ENCODING_CONSTRUCTORS, eager_only)
    tiktoken.registry.ENCODINGS.pop(eager_only, None)
    (tmp_path / "empty").mkdir()
    _no_network(monkeypatch, tmp_path / "empty")
    capsys.readouterr()
    assert main(["generate", str(run_dir), "--prompt", "the cat", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    assert main(["evaluate", str(run_dir), "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)[0]["perplexity"] > 0
    assert os.listdir(tmp_path / "empty") == []


@needs_files
@pytest.mark.corpus  # the real o200k_base files: ../shared/data/tiktoken
def test_o200k_base_generates_in_process(cache, tmp_path, write_run_directory, capsys):
    from kgpt.generation.generator import Generator

    run_dir, _ = write_run_directory(tmp_path / "run", tk.make_tokenizer("tiktoken:o200k_base"), 16)
    _generates_in_process(Generator.from_run_directory(run_dir, jit_compile=False), capsys, run_dir)
