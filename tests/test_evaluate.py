import json
import math

import numpy as np
import pytest

from kgpt.cli import main
from kgpt.data.config import DataConfig
from kgpt.data.run_tokenizer import build_tokenizer
from kgpt.evaluate import (
    Evaluation,
    evaluate_runs,
    format_table,
    keras_scorer,
    score_stream,
    sliding_windows,
)

# Every character of the hand-made evaluation text below occurs in the training text, so the
# character tokenizer maps each character to one id (no <unk>).
TRAINING_TEXT = "the cat sat on the mat.\n\nhéllo wörld, the dog ran.\n\n" * 20
# 3 + 2 + 3 = 8 words; 24 + 1 = 25 characters; é and ö are 2 UTF-8 bytes each: 27 bytes.
EVALUATION_TEXT = "the cat sat\nhéllo wörld\non the mat."


def _make_gpt_run(tmp_path, name, uniform=False, seed=0, **data_options):
    """A run directory (tokenizer/, config.json, final.keras) with a tiny random GPT.

    With `uniform`, the token embeddings are zero; the head is tied to them, so every logit is 0.
    """
    import keras

    from kgpt.config import ModelConfig
    from kgpt.model.gpt import GPT
    from kgpt.model.saving import save_model

    (tmp_path / "train.txt").write_text(TRAINING_TEXT, encoding="utf-8")
    data = DataConfig(
        corpus="text", files=("train.txt",), dir=str(tmp_path), cache_dir=str(tmp_path / "cache"),
        tokenizer="char", sequence_length=8, validation_fraction=0.2, **data_options,
    )
    run_dir = tmp_path / name
    tokenizer = build_tokenizer(data, str(run_dir / "tokenizer"))
    keras.utils.set_random_seed(seed)
    model = GPT.from_config_object(ModelConfig(
        vocabulary_size=tokenizer.vocabulary_size, sequence_length=8, num_layers=1, num_heads=2,
        hidden_dim=16,
    ))
    if uniform:
        table = model.token_embeddings
        table.assign(np.zeros(table.shape, np.float32))
    save_model(model, str(run_dir / "final.keras"))
    (run_dir / "config.json").write_text(json.dumps({"data": data.to_dict()}))
    return str(run_dir), model, tokenizer


@pytest.mark.parametrize(
    "num_targets, context, stride",
    [(40, 8, 8), (40, 8, 3), (37, 8, 8), (37, 8, 5), (37, 8, 1), (5, 8, 4), (8, 8, 8)],
)
def test_sliding_windows_score_every_target_once_with_enough_left_context(num_targets, context, stride):
    length = min(context, num_targets)
    scored = []
    for index, (start, first) in enumerate(sliding_windows(num_targets, context, stride)):
        assert 0 <= start and start + length <= num_targets
        for position in range(first, length):
            scored.append(start + position + 1)  # the stream index of the target
            if index > 0:  # after the first window, >= context - stride tokens of left context
                assert position >= context - stride
    assert sorted(scored) == list(range(1, num_targets + 1))


def test_sliding_windows_reject_a_stride_outside_1_to_context():
    for stride in (0, 9):
        with pytest.raises(ValueError, match=f"stride={stride} must be between 1 and the context length 8"):
            sliding_windows(20, 8, stride)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_score_stream_counts_each_token_once_and_padding_never(batch_size):
    seen = []

    def score(x, y):
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted
        seen.append(x.shape)
        return np.ones(x.shape)

    nll, count = score_stream(score, np.arange(38) % 7, context=8, stride=3, batch_size=batch_size)
    assert count == 37 and nll == 37.0
    assert {shape for shape in seen} == {(batch_size, 8)}  # one shape: padded last batch


def _periodic_copy_scorer(period, vocabulary_size, hit=0.9):
    """A model of a stream with period `period`: it predicts the token `period` back when its
    window shows it (probability `hit`), else guesses uniformly. It benefits from context."""

    def score(x, y):
        nll = np.full(x.shape, math.log(vocabulary_size))
        for position in range(period - 1, x.shape[1]):
            correct = x[:, position - period + 1] == y[:, position]
            nll[:, position] = np.where(
                correct, -math.log(hit), -math.log((1 - hit) / (vocabulary_size - 1))
            )
        return nll

    return score


def test_a_smaller_stride_helps_a_model_that_uses_context():
    period, vocabulary_size = 6, 10
    stream = np.tile(np.random.default_rng(0).permutation(vocabulary_size)[:period], 20)
    score = _periodic_copy_scorer(period, vocabulary_size)
    results = {s: score_stream(score, stream, context=8, stride=s) for s in (8, 4, 2, 1)}
    counts = {s: count for s, (_, count) in results.items()}
    assert set(counts.values()) == {len(stream) - 1}
    nll = {s: total for s, (total, _) in results.items()}
    # The model needs 6 tokens in view: strides <= 3 give it that after the first window.
    assert nll[1] == pytest.approx(nll[2], rel=1e-12)
    assert nll[2] < nll[4] < nll[8]
    # With stride 2 every window after the first gives >= 6 tokens of context: only the first
    # window's first 5 targets are guessed.
    guessed, remembered = 5, len(stream) - 1 - 5
    assert nll[2] == pytest.approx(guessed * math.log(vocabulary_size) - remembered * math.log(0.9))


def _log_softmax(logits):
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_stride_equal_to_context_is_plain_chunked_evaluation(tmp_path):
    _, model, _ = _make_gpt_run(tmp_path, "run")
    context = 8
    stream = np.random.default_rng(1).integers(0, model.model_config.vocabulary_size, 5 * context + 1)
    # Independent reference: disjoint chunks of `context` inputs, each scored from scratch.
    chunks_x = stream[:-1].reshape(5, context)
    chunks_y = stream[1:].reshape(5, context)
    log_probabilities = _log_softmax(np.asarray(model(chunks_x), np.float64))
    expected = -np.take_along_axis(log_probabilities, chunks_y[..., None], -1).sum()
    nll, count = score_stream(keras_scorer(model), stream, context, stride=context, batch_size=2)
    assert count == 5 * context
    assert nll == pytest.approx(expected, rel=1e-5)
    # A smaller stride rescores later windows with more context: same count, another total.
    nll_overlapping, count_overlapping = score_stream(keras_scorer(model), stream, context, stride=4)
    assert count_overlapping == count and nll_overlapping != pytest.approx(nll, rel=1e-6)


def test_metric_formulas_on_a_hand_made_example():
    # 10 tokens, 4 words, 12 bytes, a total of 20 nats.
    result = Evaluation(run="r", model="m", parameters=1, corpus="text", split="train", context=8,
                        stride=8, tokens=10, bytes=12, words=4, nll=20.0, seconds=2.0)
    assert result.perplexity == pytest.approx(math.exp(2.0))
    assert result.word_perplexity == pytest.approx(math.exp(5.0))
    assert result.bits_per_byte == pytest.approx(20.0 / math.log(2) / 12)
    assert result.tokens_per_second == 5.0
    assert result.to_dict()["word_perplexity"] == pytest.approx(math.exp(5.0))


def test_uniform_logits_give_the_vocabulary_size_as_perplexity(tmp_path):
    run_dir, model, tokenizer = _make_gpt_run(tmp_path, "uniform", uniform=True)
    path = tmp_path / "evaluation.txt"
    path.write_text(EVALUATION_TEXT, encoding="utf-8")
    (result,) = evaluate_runs([run_dir], data=str(path), stride=3, batch_size=4)
    vocabulary_size = model.model_config.vocabulary_size
    assert vocabulary_size == tokenizer.vocabulary_size
    # One document: <|endoftext|> + 35 characters + <|endoftext|>; the first token is context only.
    assert (result.tokens, result.words, result.bytes) == (36, 8, 37)
    assert result.perplexity == pytest.approx(vocabulary_size, rel=1e-5)
    assert result.nll == pytest.approx(36 * math.log(vocabulary_size), rel=1e-5)
    # Word-level perplexity: exp(total NLL / words) = V ** (36 / 8); bits per byte likewise.
    assert result.word_perplexity == pytest.approx(vocabulary_size ** (36 / 8), rel=1e-4)
    assert result.bits_per_byte == pytest.approx(36 * math.log2(vocabulary_size) / 37, rel=1e-5)


def test_bytes_and_words_are_those_of_the_text_the_model_scores(tmp_path):
    # The tokenizer of a strip_punctuation run sees "well made  don t stop ": five words.
    run_dir, _, tokenizer = _make_gpt_run(tmp_path, "stripped", strip_punctuation=True)
    path = tmp_path / "evaluation.txt"
    path.write_text("well-made, don't stop!", encoding="utf-8")
    (result,) = evaluate_runs([run_dir], data=str(path))
    assert tokenizer.normalization.normalize("well-made, don't stop!") == "well made  don t stop "
    assert (result.words, result.bytes) == (5, len("well made  don t stop "))


def test_evaluate_command_prints_one_table_and_json(tmp_path, capsys):
    first, _, _ = _make_gpt_run(tmp_path, "first", seed=1)
    second, _, tokenizer = _make_gpt_run(tmp_path, "second", uniform=True)
    path = tmp_path / "evaluation.txt"
    path.write_text(EVALUATION_TEXT * 3, encoding="utf-8")
    assert main(["evaluate", first, second, "--data", str(path), "--stride", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("text train:") and "stride 4" in lines[0]
    assert lines[1].split()[:3] == ["run", "model", "parameters"] and "word ppl" in lines[1]
    assert [line.split()[0] for line in lines[2:]] == ["first", "second"]

    assert main(["evaluate", first, second, "--data", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["run"] for row in rows] == ["first", "second"]
    assert rows[0]["tokens"] == rows[1]["tokens"] == len(EVALUATION_TEXT * 3) + 1
    assert rows[1]["perplexity"] == pytest.approx(tokenizer.vocabulary_size, rel=1e-5)
    for row in rows:
        assert row["perplexity"] == pytest.approx(math.exp(row["nll"] / row["tokens"]))
        assert row["stride"] == row["context"] == 8


def test_evaluate_command_reports_bad_input_in_one_line(tmp_path, capsys):
    run_dir, _, _ = _make_gpt_run(tmp_path, "run")
    assert main(["evaluate", run_dir, "--data", str(tmp_path / "missing.txt")]) == 2
    assert "neither a corpus" in capsys.readouterr().err
    assert main(["evaluate", run_dir, "--stride", "9"]) == 2
    assert "exceeds run's context of 8 tokens" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert "No run directory at" in capsys.readouterr().err


def test_evaluate_defaults_to_the_runs_own_corpus(tmp_path, monkeypatch):
    from kgpt.data import corpora

    run_dir, _, _ = _make_gpt_run(tmp_path, "run")
    monkeypatch.chdir(tmp_path)
    (result,) = evaluate_runs([run_dir])
    # A text corpus has no test split: its validation documents are scored.
    assert (result.corpus, result.split) == ("text", "validation")
    data = DataConfig(**json.loads((tmp_path / "run" / "config.json").read_text())["data"])
    documents = list(corpora.iter_documents(data, "validation"))
    assert 0 < len(documents) < 40
    # Character tokens: each document's characters and its <|endoftext|>.
    assert result.tokens == sum(len(d) + 1 for d in documents)
    assert result.words == sum(len(d.split()) for d in documents)


def test_data_dir_points_a_text_run_at_its_moved_corpus(tmp_path, monkeypatch):
    run_dir, _, _ = _make_gpt_run(tmp_path, "run")
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "train.txt").rename(moved / "train.txt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="train.txt"):
        evaluate_runs([run_dir])
    (result,) = evaluate_runs([run_dir], data_dir=str(moved))
    assert (result.corpus, result.split) == ("text", "validation") and result.tokens > 0


def _evaluation(run, corpus, split, num_bytes, words):
    return Evaluation(run=run, model="GPT", parameters=10, corpus=corpus, split=split, context=8,
                      stride=8, tokens=5, bytes=num_bytes, words=words, nll=5.0, seconds=1.0)


def test_table_names_each_runs_text_when_they_differ():
    same = format_table(
        [_evaluation("a", "text", "test", 100, 20), _evaluation("b", "text", "test", 100, 20)]
    )
    lines = same.splitlines()
    assert lines[0] == "text test: 100 bytes, 20 words; stride 8"
    assert "data" not in lines[1].split()
    mixed = format_table([
        _evaluation("a", "imdb", "test", 900, 150),
        _evaluation("b", "tinyshakespeare", "validation", 100, 20),
    ]).splitlines()
    assert mixed[0] == (
        "imdb test: 900 bytes, 150 words; tinyshakespeare validation: 100 bytes, 20 words; stride 8"
    )
    assert mixed[1].split()[:3] == ["run", "model", "data"]
    assert mixed[2].split()[:4] == ["a", "GPT", "imdb", "test"]
    assert mixed[3].split()[:4] == ["b", "GPT", "tinyshakespeare", "validation"]



@pytest.mark.parametrize("name, widths", [("wikitext2-gpt2-medium-finetuned", [79, 79]), ("gpt2", [75, 75])])
def test_progress_line_fits_80_columns(monkeypatch, capsys, name, widths):
    import kgpt.evaluate

    monkeypatch.setenv("COLUMNS", "80")
    clock = iter([0.0, 1.0, 2.0])
    monkeypatch.setattr(kgpt.evaluate.time, "perf_counter", lambda: next(clock))
    report = kgpt.evaluate._progress_printer(name)
    report(1, 100_000, 2_000_000)  # 2,000,000 tokens/s
    report(100_000, 100_000, 900)  # 450 tokens/s: a shorter line blanks the longer one's end
    lines = capsys.readouterr().err.split("\r")[1:]
    assert [len(line.rstrip("\n")) for line in lines] == widths
    assert lines[-1].rstrip().endswith("] 100000/100000 windows, 450 tokens/s")
