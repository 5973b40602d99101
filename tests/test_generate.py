"""Text in, text out: Generator (in-process) and the shared base: prompts, truncation, options."""

import json
import warnings

import keras
import pytest
import tensorflow as tf

from kgpt.cli import main
from kgpt.generation.decoder import Decoder
from kgpt.generation.decoding import MAX_NEW_TOKENS
from kgpt.generation.generator import Generator, TextGenerator, sampling_options
from kgpt.generation.sampling import SamplingOptions
from kgpt.model.recurrent import RecurrentLanguageModel
from kgpt.serving.saved_model_generator import load_generator

TEXT = "the cat sat on the mat. a dog ran!\n"


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    """conftest's `tiny_run`: a character tokenizer of its TINY_TEXT, context 32."""
    return tiny_run[0]


@pytest.fixture(scope="module")
def generator(run_dir):
    # Without XLA: these tests are about texts, options and stops, not the compiled loop (XLA is
    # compared in test_decoding, test_streaming and test_export), and XLA doubles their time.
    return load_generator(run_dir, jit_compile=False)


@pytest.mark.slow
def test_generator_text_ragged_equals_one_by_one_and_keeps_prompts(generator):
    assert isinstance(generator, Generator) and isinstance(generator, TextGenerator)
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
    # The options structure and the keywords are the same request; keywords replace its fields.
    options = SamplingOptions(temperature=1.0, seed=2)
    assert generator.generate(["the"], 8, sampling=options, num_return_sequences=3) == samples
    assert generator.generate(["the"], 8, sampling=SamplingOptions(temperature=1.0), seed=2,
                              num_return_sequences=3) == samples


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
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(max_new_tokens=MAX_NEW_TOKENS + 1), "out of range; choose 1 to 65536"),
        (dict(max_new_tokens=32, num_beams=2), "beam search stays within the context"),
        (dict(stop=[""]), "Stop sequence '' must be a non-empty string"),
        (dict(stop=["a", 3]), "Stop sequence 3 must be a non-empty string"),
        (dict(stop={"a": 1}), "must be a string or a list of strings"),
        (dict(stop=["x"] * 17), "17 stop sequences given; at most 16"),
        (dict(stop=["x"] * 8, stop_token_ids=list(range(9))), "17 stop sequences given"),
        (dict(stop_token_ids=[-1]), "Stop token id -1 must be an integer in"),
        (dict(stop_token_ids=["a"]), "Stop token id 'a' must be an integer"),
        (dict(temperature=0.0), "greedy"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(temperature=1.0, top_p=1.5), "top_p=1.5"),
        (dict(num_beams=0), "beams=0"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3"),
        (dict(min_p=0.1), r"Unknown sampling option\(s\) \['min_p'\]"),
        (dict(sampling={"temperature": 1.0}), "is not a SamplingOptions"),
        (dict(prompts=[]), "No prompts given"),
    ],
)
def test_bad_options_are_refused_before_decoding(generator, options, match):
    options = {"prompts": ["a"], "max_new_tokens": 8, **options}
    with pytest.raises(ValueError, match=match):
        generator.generate(**options)


def test_sampling_options_merges_keywords_into_the_structure():
    base = SamplingOptions(temperature=0.5, top_k=3)
    assert sampling_options(base, seed=4) == SamplingOptions(temperature=0.5, top_k=3, seed=4)
    assert sampling_options(None) == SamplingOptions()
    assert sampling_options(base) is base


def test_a_recurrent_model_generates_in_process(generator):
    # The GRU baseline has no key/value cache: Generator decodes it by recomputation, no XLA.
    tokenizer = generator.tokenizer
    keras.utils.set_random_seed(0)
    model = RecurrentLanguageModel(
        vocabulary_size=tokenizer.vocabulary_size, sequence_length=32, num_layers=1, num_heads=2,
        hidden_dim=16,
    )
    recurrent = Generator(model, tokenizer)
    assert not recurrent.decoder.jit_compile
    prompts = ["the cat", "", "a dog"]
    texts = recurrent.generate(prompts, max_new_tokens=6)
    ids = [list(row) or [tokenizer.end_of_text_id] for row in tokenizer.encode_documents(prompts)]
    rows = Decoder(model, tokenizer.end_of_text_id)(ids, 6)
    rows = [row[:-1] if row and row[-1] == tokenizer.end_of_text_id else row for row in rows]
    assert texts == [tokenizer.detokenize(tf.constant(row, tf.int32)).numpy().decode("utf-8") for row in rows]
    sampled = recurrent.generate(["the"], 6, temperature=1.0, seed=1, num_return_sequences=2)
    assert len(sampled) == 2 and sampled == recurrent.generate(
        ["the"], 6, temperature=1.0, seed=1, num_return_sequences=2
    )


@pytest.mark.slow  # ~15-30 s on 2 cores
def test_stop_strings_cut_the_text_before_the_first_one(generator):
    prompts = ["the cat", "a dog"]
    # Seed 1 (TF's draws, without XLA): a first text of 40 characters, a second of 4.
    plain = generator.generate(prompts, 40, temperature=1.0, seed=1)
    stop = [plain[0][6:9], plain[1][2:4]]  # strings that span tokens (one per character)
    texts = generator.generate(prompts, 40, temperature=1.0, seed=1, stop=stop)
    assert texts == [text[: min([text.find(s) for s in stop if s in text] + [len(text)])] for text in plain]
    assert not any(s in text for text in texts for s in stop)
    assert len(texts[0]) <= 6
    # One string is a list of one; keep_prompt keeps the prompt in front of the cut text.
    assert generator.generate(prompts, 40, temperature=1.0, seed=1, stop=stop[0]) == [
        text.split(stop[0])[0] for text in plain
    ]
    kept = generator.generate(prompts, 40, temperature=1.0, seed=1, stop=stop, keep_prompt=True)
    assert kept == [p + t for p, t in zip(prompts, texts)]


@pytest.fixture
def cli_uses_generator(generator, run_dir, monkeypatch):
    """`kgpt generate RUN_DIR` answers from the module's generator (without XLA, loaded once): these
    tests are about the command line, not the compiled loop, which a load per call compiles anew."""
    from kgpt.serving import saved_model_generator

    load = saved_model_generator.load_generator
    monkeypatch.setattr(saved_model_generator, "load_generator",
                        lambda path, **kwargs: generator if path == run_dir else load(path, **kwargs))


def test_cli_generate(run_dir, capsys, cli_uses_generator):
    assert main(["generate", run_dir, "--prompt", "the cat", "--prompt", "a", "--max-new-tokens", "5", "--json"]) == 0
    texts = json.loads(capsys.readouterr().out)
    assert [t[: len(p)] for t, p in zip(texts, ["the cat", "a"])] == ["the cat", "a"]
    assert main(["generate", run_dir, "--prompt", "a", "--beams", "2", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["generate", run_dir, "--prompt", "a", "--max-new-tokens", "80", "--json",
                 "--temperature", "1", "--stop", "t", "--stop", "e", "--continuation-only"]) == 0
    [text] = json.loads(capsys.readouterr().out)
    assert "t" not in text and "e" not in text
    # --logprobs: each new token with its log-probability and the likeliest tokens, in JSON or a table.
    options = ["--prompt", "the", "--max-new-tokens", "4", "--frequency-penalty", "1", "--logprobs", "2"]
    assert main(["generate", run_dir, *options, "--json"]) == 0
    [answer] = json.loads(capsys.readouterr().out)
    assert answer["text"].startswith("the") and len(answer["logprobs"]) <= 4
    assert "".join(token["token"] for token in answer["logprobs"]) == answer["text"][3:]
    assert all(len(token["top"]) == 2 and token["logprob"] <= 0 for token in answer["logprobs"])
    assert main(["generate", run_dir, *options]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1] == "  token       logprob  likeliest" and len(table) == 2 + len(answer["logprobs"])
    for bad in (
        ["--temperature", "0"], ["--top-p", "1.5", "--temperature", "1"], ["--top-k", "-1"],
        ["--beams", "0"], ["--max-new-tokens", "0"], ["--max-new-tokens", "70000"],
        ["--beams", "2", "--max-new-tokens", "40"], ["--stop", ""], ["--stop-token-id", "999"],
        ["--logprobs", "6"], ["--presence-penalty", "-2.5"], ["--repetition-penalty", "0"],
        ["--beams", "2", "--logprobs", "1"], ["--beams", "2", "--frequency-penalty", "1"],
    ):
        capsys.readouterr()
        assert main(["generate", run_dir, "--prompt", "a", *bad]) == 2, bad
        error = capsys.readouterr().err
        assert error.startswith("kgpt generate: error:") and error.count("\n") == 1


def _joined(pieces, rows=1):
    """`[(text, last piece)]` per continuation of streamed `pieces`."""
    texts, last = [""] * rows, [None] * rows
    for piece in pieces:
        texts[piece.index] += piece.text
        last[piece.index] = piece
    return list(zip(texts, last))


@pytest.mark.slow  # compiles the decode loop and the step
def test_streamed_text_equals_generated_text(generator):
    # 10 new tokens stay within the context of 32; 80 pass it (the cache is rebuilt three times).
    for prompt, count in [("the cat", 10), ("", 10), ("the cat sat on the mat. " * 3, 10),
                          ("the cat", 80), ("the cat sat on the mat. " * 3, 80)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the long prompt is left-truncated, both ways
            [expected] = generator.complete([prompt], max_new_tokens=count)
            pieces = list(generator.stream(prompt, count))
        [(text, last)] = _joined(pieces)
        assert text == expected.text
        assert (last.token_count, last.prompt_token_count, last.finish_reason) == (
            expected.token_count, expected.prompt_token_count, expected.finish_reason)
        assert all(p.finish_reason is None for p in pieces[:-1])
    for count in (8, 50):  # seeded samples, three rows with their own histories
        options = dict(temperature=1.0, top_p=0.9, seed=3, num_return_sequences=3)
        streamed = _joined(generator.stream("the", count, **options), rows=3)
        completions = generator.complete(["the"], count, **options)
        assert [text for text, _ in streamed] == [c.text for c in completions]
        assert [(last.token_count, last.finish_reason) for _, last in streamed] == [
            (c.token_count, c.finish_reason) for c in completions]
        assert len({c.text for c in completions}) == 3
    with pytest.raises(ValueError, match="context"):
        generator.stream("the cat sat on the mat. " * 3, 8, truncate=False).__next__()
    with pytest.raises(ValueError, match="Beam search is not streamed"):
        generator.stream("a", 8, num_beams=2)


@pytest.mark.slow  # ~15 s on 2 cores
def test_complete_reports_counts_and_finish_reasons(generator):
    prompts = ["the cat", "", "the cat sat on the mat. " * 3]  # the last keeps 16 tokens (half of 32)
    # Seed 1 (TF's draws, without XLA): rows ended by length and by end-of-text.
    options = dict(temperature=1.0, seed=1, num_return_sequences=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        completions = generator.complete(prompts, 40, **options)
        assert [c.text for c in completions] == generator.generate(prompts, 40, **options)
    assert [c.prompt_token_count for c in completions] == [7, 7, 1, 1, 16, 16]
    for completion in completions:  # one token per character (end-of-text not counted)
        assert len(completion.text) <= completion.token_count <= 40
        assert completion.finish_reason == ("length" if completion.token_count == 40 else "stop")
    # A stop string ends its row early ("stop"), the text cut before it; the other row goes on.
    text = completions[0].text
    assert len(text) >= 5
    stop = text[3:5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stopped = generator.complete(prompts, 40, stop=stop, **options)
    assert stopped[0].text == text[: text.index(stop)] and stopped[0].finish_reason == "stop"
    assert stopped[0].token_count <= completions[0].token_count
    assert [c.text for c in stopped] == [c.text.split(stop)[0] for c in completions]
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generator.complete(["a"], 0)


def test_cli_generate_stream_prints_the_continuation(run_dir, capsys, cli_uses_generator):
    assert main(["generate", run_dir, "--prompt", "the", "--max-new-tokens", "6", "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.startswith("the") and streamed.endswith("\n")
    # Past the context of 32, as the whole text is generated (seeded: test_streamed_text_equals_...).
    options = ["--max-new-tokens", "70"]
    assert main(["generate", run_dir, "--prompt", "the", *options, "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert main(["generate", run_dir, "--prompt", "the", *options]) == 0
    assert streamed == capsys.readouterr().out
    assert main(["generate", run_dir, "--prompt", "a", "--prompt", "b", "--stream"]) == 2
    assert "--stream prints one continuation" in capsys.readouterr().err


def test_prompts_that_are_not_unicode_text_read_as_replacement_characters(generator):
    from kgpt.generation.generator import well_formed

    argument = b"ROM\xff\xfeEO".decode("utf-8", "surrogateescape")  # how Python passes argv's bytes
    assert well_formed(argument) == "ROM\ufffd\ufffdEO" and well_formed("caf\u00e9") == "caf\u00e9"
    assert well_formed("a\ud800b") == "a\ufffd\ufffd\ufffdb"  # a lone high surrogate: its 3 bytes
    texts = generator.generate([argument, "ROM\ufffd\ufffdEO"], max_new_tokens=3, keep_prompt=True)
    assert texts[0] == texts[1] and texts[0].startswith("ROM\ufffd\ufffdEO")
    pieces = list(generator.stream(argument, 3))
    assert "".join(p.text for p in pieces) == texts[0][len("ROM\ufffd\ufffdEO"):]
