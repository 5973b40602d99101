"""OpenAI's completions API on `kgpt serve`: request checks, stop sequences, and the `openai`
client package against a served run directory (whole and streamed answers equal `generate`'s)."""

import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import warnings

import numpy as np
import openai
import pytest
import tensorflow as tf
from test_batching import in_threads  # the one concurrent-start helper
from test_stopping import reference_cut  # the stop rule's reference

from kgpt.generation.generator import Completion, TextGenerator
from kgpt.generation.logprobs import TokenLogprob
from kgpt.generation.stopping import StopText
from kgpt.generation.streaming import Piece
from kgpt.serving.openai_api import Completions
from kgpt.serving.protocol import API, APIError, CompletionRequest
from kgpt.serving.saved_model_generator import load_generator
from kgpt.serving.server import make_server
from kgpt.serving.tokenization import DetokenizeRequest, TokenizeRequest

TEXT = "the cat sat on the mat. a dog ran!\n"


@pytest.mark.parametrize(
    "fields, status, param, message",
    [
        ({"frobnicate": 1}, 400, "frobnicate", "Unrecognized request argument supplied: frobnicate"),
        ({"best_of": 2}, 400, "best_of", "best_of=2 is not supported"),
        ({"echo": "yes"}, 400, "echo", "echo=\"yes\" must be true or false"),
        ({"logprobs": 6}, 400, "logprobs", "logprobs=6 must be an integer from 0 to 5"),
        ({"logprobs": True}, 400, "logprobs", "logprobs=true must be an integer from 0 to 5"),
        ({"suffix": "x"}, 400, "suffix", "suffix=\"x\" is not supported"),
        ({"presence_penalty": 2.5}, 400, "presence_penalty", "presence_penalty=2.5 must be a number from -2 to 2"),
        ({"frequency_penalty": "1"}, 400, "frequency_penalty", "frequency_penalty=\"1\" must be a number"),
        ({"repetition_penalty": 0}, 400, "repetition_penalty", "repetition_penalty=0 must be a number > 0"),
        ({"logit_bias": {"5": 100}}, 400, "logit_bias", "not supported"),
        ({"model": "gpt-4"}, 404, "model", "The model 'gpt-4' does not exist; this server serves 'tiny'"),
        ({"prompt": []}, 400, "prompt", "a non-empty list of strings"),
        ({"prompt": [1, 2]}, 400, "prompt", "token-id prompts are not supported"),
        ({"stop": ""}, 400, "stop", "empty one"),
        ({"stop": []}, 400, "stop", "a non-empty string or a list"),
        ({"stop": ["a", 3]}, 400, "stop", "a non-empty string or a list"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "5 stop sequences (at most 4)"),
        ({"n": 0}, 400, "n", "n=0 must be an integer from 1 to 16"),
        ({"n": 17}, 400, "n", "n=17 must be an integer from 1 to 16"),
        ({"max_tokens": 0}, 400, "max_tokens", "max_tokens=0 must be an integer from 1 to 65536 (past the"),
        ({"max_tokens": 0}, 400, "max_tokens", "0, scoring the prompt alone, needs echo: true"),
        ({"max_tokens": -1, "echo": True}, 400, "max_tokens", "max_tokens=-1 must be an integer from 0 to 65536"),
        ({"max_tokens": 2**31}, 400, "max_tokens", "max_tokens=2147483648 must be an integer from 1 to 65536"),
        ({"max_tokens": "8"}, 400, "max_tokens", "max_tokens=\"8\" must be an integer"),
        ({"temperature": 2.5}, 400, "temperature", "temperature=2.5 must be a number from 0 to 2"),
        ({"top_p": 0}, 400, "top_p", "top_p=0.0 must be in (0, 1]"),
        ({"seed": 2**40}, 400, "seed", "seed=1099511627776 must be an integer"),
        ({"stream": "yes"}, 400, "stream", "stream must be true or false"),
    ],
)
def test_bad_requests_are_refused_with_the_field_and_the_reason(fields, status, param, message):
    with pytest.raises(Exception) as caught:
        CompletionRequest.parse({"model": "tiny", "prompt": "a", **fields}, "tiny")
    error = caught.value
    assert (error.status, error.param) == (status, param)
    assert message in str(error), str(error)
    assert set(error.body(API.OPENAI)["error"]) == {"message", "type", "param", "code"}


def test_documented_fields_at_their_defaults_are_accepted_and_user_is_ignored():
    request = CompletionRequest.parse({
        "model": "tiny", "prompt": ["a", "b"], "user": "me", "echo": False, "best_of": 1, "logprobs": None,
        "suffix": None, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
        "temperature": 0, "stop": "\n", "seed": 3,
    }, "tiny")
    assert request.prompts == ["a", "b"] and request.stops == ["\n"] and request.max_tokens == 16
    assert request.sampling.temperature is None and request.sampling.seed == 3  # 0: greedy
    assert (request.logprobs, request.echo) == (None, False)


def test_stop_text_cuts_at_the_first_stop_however_the_text_arrives():
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab\n") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("ab\n") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        stop = StopText(stops)
        out = "".join(stop.add(piece, final=k == len(pieces) - 1) for k, piece in enumerate(pieces))
        first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        # Cut before the stop that ends first, as whole answers are (not the one starting first).
        assert out == reference_cut(text, stops), (text, stops, pieces)
        assert stop.stopped == (first >= 0)


# OpenAI's logprobs and echo, against a scripted generator ---------------------------------------

END_OF_TEXT = "<|endoftext|>"


def scripted_tokens(prompt, max_new_tokens, seed=None, row=0):
    """A scripted continuation as `(piece text, token text)` per token: characters of "ab cé"
    chosen by the prompt's length (and the seed and row when sampled); "é" is two tokens, the first
    ending inside the character (its piece "", its text U+FFFD), as byte-level BPE decodes it."""
    tokens = []
    for position in range(max_new_tokens):
        char = "ab cé"[(len(prompt) + position * (1 + row) + (seed or 0)) % 5]
        tokens.extend([("", "\ufffd"), ("é", "\ufffd")] if char == "é" else [(char, char)])
    return tokens[:max_new_tokens]


def scripted_logprob(token_text, position, k, first=False):
    """A `TokenLogprob` with a made-up log-probability; its alternatives are "e", "a", "t", ... (so
    the chosen "a" is among them)."""
    if first:
        return TokenLogprob(ord(token_text[0]), token_text, None)
    top = tuple((ord(c), c, -0.25 * (rank + 1)) for rank, c in enumerate("eatoi"[:k]))
    return TokenLogprob(ord(token_text[0]), token_text, -0.5 - 0.01 * position - ord(token_text[0]) % 3, top)


class ScriptedGenerator(TextGenerator):
    """A `TextGenerator` whose text and logprobs are scripted (`scripted_tokens`, one token per
    character of a prompt), recording its calls."""

    sequence_length = 32
    vocabulary_size = 300
    default_max_new_tokens = 16

    def __init__(self):
        self.calls = []

    def _room(self, max_new_tokens):
        return self.sequence_length - max_new_tokens

    def _prompt_count(self, prompt, max_new_tokens):
        return min(len(prompt) or 1, self._room(max_new_tokens))

    def complete(self, prompts, max_new_tokens=None, *, sampling=None, num_return_sequences=1, stop=None,
                 logprobs=None, **options):
        self.calls.append(("complete", list(prompts)))
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        completions = []
        for prompt in prompts:
            for row in range(num_return_sequences):
                seed = None if sampling.temperature is None else sampling.seed
                tokens = scripted_tokens(prompt, max_new_tokens, seed, row)
                full = "".join(piece for piece, _ in tokens)
                text = reference_cut(full, stops)
                count = len(tokens)
                if text != full:  # tokens up to the one that completes the stop
                    ends = min(start + len(s) for s in stops for start in range(len(full))
                               if full.startswith(s, start))
                    count = next(i for i in range(len(tokens) + 1)
                                 if len("".join(piece for piece, _ in tokens[:i])) >= ends)
                start = self._prompt_count(prompt, max_new_tokens)
                scored = None if logprobs is None else tuple(
                    scripted_logprob(t, start + i, logprobs) for i, (_, t) in enumerate(tokens[:count]))
                completions.append(Completion(text, count, start, "stop" if text != full else "length", scored))
        return completions

    def stream(self, prompt, max_new_tokens=None, *, sampling=None, num_return_sequences=1, logprobs=None,
               **options):
        self.calls.append(("stream", prompt))
        seed = None if sampling.temperature is None else sampling.seed
        rows = [scripted_tokens(prompt, max_new_tokens, seed, row) for row in range(num_return_sequences)]
        start = self._prompt_count(prompt, max_new_tokens)
        for position in range(max_new_tokens):  # rows interleaved, as a batch steps
            for row, tokens in enumerate(rows):
                piece, text = tokens[position]
                scored = None if logprobs is None else (scripted_logprob(text, start + position, logprobs),)
                yield Piece(row, piece, position + 1, start, "length" if position == max_new_tokens - 1 else None,
                            scored)

    def prompt_logprobs(self, prompts, logprobs=0, max_new_tokens=0, truncate=True):
        self.calls.append(("prompt_logprobs", list(prompts)))
        room = self._room(max_new_tokens)
        scored = []
        for prompt in prompts:
            texts = list(prompt)[-room:] or [END_OF_TEXT]
            scored.append(tuple(scripted_logprob(t, i, logprobs, first=i == 0) for i, t in enumerate(texts)))
        return scored


def scripted_answers(fields):
    """The whole answer and the streamed chunks of one request (JSON values) to a `ScriptedGenerator`,
    and the generator's calls for the whole answer."""
    generator = ScriptedGenerator()
    completions = Completions(generator, "tiny")
    request = {"model": "tiny", "prompt": "the cat", **fields}
    whole = completions.create(CompletionRequest.parse(request, "tiny")).to_json()
    calls = list(generator.calls)
    stream = {**request, "stream": True, "stream_options": {"include_usage": True}}
    chunks = [chunk.to_json() for chunk in completions.stream(CompletionRequest.parse(stream, "tiny"))]
    return whole, chunks, calls


def joined_chunks(chunks):
    """Streamed choices joined per index: text, last finish_reason, logprobs lists concatenated."""
    choices = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            joined = choices.setdefault(choice["index"], {"text": "", "index": choice["index"], "logprobs": None,
                                                          "finish_reason": None})
            joined["text"] += choice["text"]
            joined["finish_reason"] = choice["finish_reason"] or joined["finish_reason"]
            if choice["logprobs"] is not None:
                logprobs = joined["logprobs"] or {name: [] for name in choice["logprobs"]}
                joined["logprobs"] = {name: logprobs[name] + choice["logprobs"][name] for name in logprobs}
    return [choices[index] for index in sorted(choices)]


def test_logprobs_come_in_openais_shape_one_entry_per_completion_token():
    whole, _, calls = scripted_answers({"prompt": "the c", "max_tokens": 4, "temperature": 0, "logprobs": 2})
    [choice] = whole["choices"]
    logprobs = choice["logprobs"]
    assert list(logprobs) == ["tokens", "token_logprobs", "top_logprobs", "text_offset"]
    assert "".join(logprobs["tokens"]) == choice["text"] and len(logprobs["tokens"]) == 4
    assert len(logprobs["token_logprobs"]) == whole["usage"]["completion_tokens"] == 4
    # Offsets in prompt + completion: the first token follows the 5 characters of "the c".
    assert logprobs["text_offset"] == [5, 6, 7, 8]
    for token, chosen, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert top[token] == chosen and list(top)[0] == token  # the chosen token first
        assert {"e": -0.25, "a": -0.5}.items() <= top.items() or token in "ea"
        assert len(top) == (2 if token in "ea" else 3)  # k alternatives + the chosen, one key each
    assert calls == [("complete", ["the c"])]  # no prompt scoring without echo
    # logprobs 0: the chosen token's alone.
    whole, _, _ = scripted_answers({"prompt": "the c", "max_tokens": 2, "temperature": 0, "logprobs": 0})
    assert [list(top) for top in whole["choices"][0]["logprobs"]["top_logprobs"]] == [["a"], ["b"]]
    # Not asked for: null, as before.
    assert scripted_answers({"max_tokens": 2})[0]["choices"][0]["logprobs"] is None


def test_echo_puts_the_prompt_and_its_scores_before_the_completion():
    whole, _, calls = scripted_answers({"prompt": ["the ca", "a"], "max_tokens": 3, "temperature": 0,
                                        "logprobs": 1, "echo": True, "n": 2})
    # One batched scoring of every prompt, one batched decode.
    assert calls == [("prompt_logprobs", ["the ca", "a"]), ("complete", ["the ca", "a"])]
    first, copy, second, _ = whole["choices"]
    assert first == copy | {"index": 0} and second["index"] == 2  # greedy n: copies
    completion = "".join(piece for piece, _ in scripted_tokens("the ca", 3))
    assert first["text"] == "the ca" + completion == "the cab c"
    logprobs = first["logprobs"]
    assert logprobs["tokens"] == list("the cab c")
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert None not in logprobs["token_logprobs"][1:] and None not in logprobs["top_logprobs"][1:]
    assert logprobs["text_offset"] == list(range(len(first["text"])))
    assert second["text"].startswith("a") and second["logprobs"]["text_offset"][:2] == [0, 1]
    # Usage: the prompt is not completion tokens.
    assert whole["usage"] == {"prompt_tokens": 6 + 1, "completion_tokens": 4 * 3, "total_tokens": 19}
    # Echo without logprobs: the text only, no scoring pass.
    whole, _, calls = scripted_answers({"prompt": "the ca", "max_tokens": 3, "temperature": 0, "echo": True})
    assert whole["choices"][0]["text"] == "the cab c" and whole["choices"][0]["logprobs"] is None
    assert calls == [("complete", ["the ca"])]


def test_max_tokens_0_with_echo_scores_the_prompts_without_generating():
    whole, chunks, calls = scripted_answers({"prompt": ["the cat", ""], "max_tokens": 0, "echo": True,
                                             "logprobs": 1, "n": 2, "temperature": 0.7})
    assert calls == [("prompt_logprobs", ["the cat", ""])]  # no generation call
    assert [c["text"] for c in whole["choices"]] == ["the cat", "the cat", "", ""]
    assert {c["finish_reason"] for c in whole["choices"]} == {"length"}  # as vLLM answers it
    assert whole["choices"][0]["logprobs"]["tokens"] == list("the cat")
    assert whole["choices"][2]["logprobs"]["tokens"] == [END_OF_TEXT]  # "": end-of-text, unscored
    assert whole["choices"][2]["logprobs"]["token_logprobs"] == [None]
    assert whole["usage"] == {"prompt_tokens": 7 + 1, "completion_tokens": 0, "total_tokens": 8}
    assert joined_chunks(chunks) == whole["choices"] and chunks[-1]["usage"] == whole["usage"]
    # Without logprobs too: the prompts back, counted.
    whole, _, _ = scripted_answers({"max_tokens": 0, "echo": True})
    assert whole["choices"][0] == {"text": "the cat", "index": 0, "logprobs": None, "finish_reason": "length"}
    assert whole["usage"]["prompt_tokens"] == 7


def test_a_scoring_request_as_evaluation_clients_send_it():
    prompts = ["the cat sat", "a dog", "x"]
    whole, _, calls = scripted_answers({"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1,
                                        "temperature": 0})
    assert len(whole["choices"]) == len(prompts) and calls[0] == ("prompt_logprobs", prompts)
    for prompt, choice in zip(prompts, whole["choices"]):
        logprobs = choice["logprobs"]
        assert choice["text"].startswith(prompt) and len(choice["text"]) == len(prompt) + 1
        assert len(logprobs["token_logprobs"]) == len(prompt) + 1  # every prompt token + the generated one
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert all(isinstance(top, dict) and len(top) in (1, 2) for top in logprobs["top_logprobs"][1:])
        # The continuation's log-probability: the last entry, found at the prompt's length.
        assert logprobs["text_offset"][-1] == len(prompt)


def test_a_prompt_cut_to_fit_the_context_is_scored_from_its_kept_tokens():
    long = "ab " * 15  # 45 characters; 31 fit beside 1 new token in a context of 32
    whole, chunks, _ = scripted_answers({"prompt": long, "echo": True, "logprobs": 0, "max_tokens": 1,
                                         "temperature": 0})
    [choice] = whole["choices"]
    assert choice["text"].startswith(long) and len(choice["logprobs"]["tokens"]) == 31 + 1
    assert choice["logprobs"]["text_offset"][0] == len(long) - 31  # the kept tokens end the prompt
    assert choice["logprobs"]["text_offset"][-1] == len(long)
    assert joined_chunks(chunks) == whole["choices"]


@pytest.mark.parametrize("fields", [
    {"max_tokens": 6, "temperature": 0, "logprobs": 2},
    {"max_tokens": 6, "temperature": 0, "logprobs": 1, "echo": True, "n": 2, "prompt": ["the cat", "", "ab"]},
    {"max_tokens": 9, "temperature": 1.0, "seed": 3, "logprobs": 3, "n": 3},  # sampled rows, with "é"
    {"max_tokens": 9, "temperature": 1.0, "seed": 3, "logprobs": 0, "echo": True, "n": 2},
    {"max_tokens": 12, "temperature": 0, "logprobs": 1, "stop": [" c"]},  # cut by a stop string
    {"max_tokens": 12, "temperature": 0, "logprobs": 1, "echo": True, "stop": "b c", "n": 2},
    {"max_tokens": 12, "temperature": 0, "echo": True, "stop": "zz"},
])
def test_streamed_answers_equal_whole_ones_with_logprobs(fields):
    whole, chunks, _ = scripted_answers(fields)
    assert joined_chunks(chunks) == whole["choices"]
    assert chunks[-1]["usage"] == whole["usage"] and not chunks[-1]["choices"]
    if fields.get("logprobs") is not None:
        for choice in whole["choices"]:
            offsets = choice["logprobs"]["text_offset"]
            assert offsets == sorted(offsets) and len(offsets) == len(choice["logprobs"]["tokens"])


def test_logprobs_keep_every_token_counted_when_a_stop_string_cuts_the_text():
    whole, chunks, _ = scripted_answers({"prompt": "the ca", "max_tokens": 12, "temperature": 0, "logprobs": 1,
                                         "stop": " c"})
    [choice] = whole["choices"]
    full = "".join(piece for piece, _ in scripted_tokens("the ca", 12))
    assert choice["finish_reason"] == "stop" and choice["text"] == full[: full.index(" c")]
    # One entry per completion token counted in usage: the stop's tokens too (as vLLM keeps them).
    tokens = choice["logprobs"]["tokens"]
    assert len(tokens) == whole["usage"]["completion_tokens"]
    assert "".join(tokens) == full[: full.index(" c") + 2]
    # Streamed: a token held back (it may begin the stop) still brings its logprob.
    assert all(c["logprobs"]["tokens"] for chunk in chunks for c in chunk["choices"])


def test_a_token_inside_a_character_streams_its_logprob_with_empty_text():
    _, chunks, _ = scripted_answers({"prompt": "the ", "max_tokens": 2, "temperature": 0, "logprobs": 0})
    choices = [c for chunk in chunks for c in chunk["choices"]]
    assert [c["text"] for c in choices] == ["", "é"]
    assert [c["logprobs"]["tokens"] for c in choices] == [["\ufffd"], ["\ufffd"]]
    assert [c["logprobs"]["text_offset"] for c in choices] == [[4], [5]]


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    """conftest's run directory `tiny` (a character tokenizer of TINY_TEXT), served as model 'tiny'."""
    return tiny_run[0]


@pytest.fixture(scope="module")
def server(run_dir, run_directories_without_xla):
    # The served Generator (and `load_generator` here) decodes without XLA: these tests are about
    # the API's answers, and compiling each new batch shape with XLA would double their time.
    server = make_server(str(run_dir), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x", max_retries=0)


def test_openai_client_whole_and_streamed_greedy_answers_agree(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    answer = client.completions.create(model="tiny", prompt=["the cat", "a"], max_tokens=10, temperature=0, n=2)
    assert answer.object == "text_completion" and answer.model == "tiny" and answer.id.startswith("cmpl-")
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    texts = [c.text for c in answer.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: n equal copies
    assert {c.finish_reason for c in answer.choices} <= {"stop", "length"}
    assert answer.usage.prompt_tokens == 7 + 1
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    streamed, chunks = {}, 0
    for chunk in client.completions.create(model="tiny", prompt=["the cat", "a"], max_tokens=10, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        chunks += 1
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[0], streamed[1]] == [texts[0], texts[2]]
    assert chunks > 3  # piece by piece, not one answer
    assert chunk.usage.prompt_tokens == 8 and not chunk.choices  # the last chunk: usage only


@pytest.mark.slow
def test_served_greedy_answers_equal_generate(client, run_dir):
    expected = load_generator(str(run_dir)).generate(["the cat", "a", ""], max_new_tokens=10)
    answer = client.completions.create(model="tiny", prompt=["the cat", "a", ""], max_tokens=10, temperature=0)
    assert [c.text for c in answer.choices] == expected
    streamed = {}
    for chunk in client.completions.create(model="tiny", prompt=["the cat", "a", ""], max_tokens=10,
                                           temperature=0, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(3)] == expected


def test_seeded_samples_stream_as_they_are_answered_whole(client):
    options = dict(model="tiny", prompt="the", max_tokens=8, temperature=1.0, top_p=0.9, seed=7, n=3)
    whole = client.completions.create(**options)
    streamed = [""] * 3
    reasons = [None] * 3
    for chunk in client.completions.create(stream=True, **options):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert streamed == [c.text for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]
    assert len(set(streamed)) > 1  # three different samples


def test_stop_sequences_cut_the_text_and_finish_with_stop(client):
    full = client.completions.create(model="tiny", prompt="a", max_tokens=12, temperature=0).choices[0].text
    assert len(full) > 3
    stop = full[2:4]
    answer = client.completions.create(model="tiny", prompt="a", max_tokens=12, temperature=0, stop=[stop, "@@"])
    assert answer.choices[0].text == full[: full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    pieces = list(client.completions.create(model="tiny", prompt="a", max_tokens=12, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.text for p in pieces for c in p.choices) == full[: full.index(stop)]
    assert pieces[-1].choices[0].finish_reason == "stop"


@pytest.mark.slow  # ~14 s on 2 cores
def test_a_whole_answer_is_one_batched_decode_past_the_context(client, server):
    generator = server.model.completions.generator  # the served Generator, compiled once
    prompts = ["the cat", "a", ""]
    # 50 tokens on a context of 32; seeded samples of the three prompts as one batch.
    expected = generator.complete(prompts, 50, temperature=1.0, seed=3, num_return_sequences=2)
    answer = client.completions.create(model="tiny", prompt=prompts, max_tokens=50, temperature=1.0, seed=3,
                                       n=2)
    assert [c.text for c in answer.choices] == [e.text for e in expected]
    assert [c.finish_reason for c in answer.choices] == [e.finish_reason for e in expected]
    assert [c.index for c in answer.choices] == list(range(6))
    assert answer.usage.prompt_tokens == 7 + 1 + 1
    assert answer.usage.completion_tokens == sum(e.token_count for e in expected)
    # Streamed past the context too, equal to the whole greedy answer.
    whole = client.completions.create(model="tiny", prompt="the", max_tokens=50, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="the", max_tokens=50, temperature=0,
                                            stream=True))
    assert "".join(c.text for chunk in chunks for c in chunk.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert whole.choices[0].text == generator.generate(["the"], 50)[0]


def test_whole_answers_finish_with_stop_at_a_stop_string_and_length_otherwise(client):
    full = client.completions.create(model="tiny", prompt="a", max_tokens=12, temperature=0, stop="@@")
    count = full.usage.completion_tokens
    assert full.choices[0].finish_reason == ("length" if count == 12 else "stop")
    text = full.choices[0].text
    assert len(text) > 4 and count == len(text)  # one token per character
    # A stop completed by the last token allowed: finished by the stop, not by the length.
    stop = text[2:4]
    ends = text.index(stop) + len(stop)
    answer = client.completions.create(model="tiny", prompt="a", max_tokens=ends, temperature=0, stop=stop)
    assert answer.choices[0].text == text[: text.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens <= ends


def test_errors_reach_the_client_in_openais_shape(client, server):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="a", max_tokens=70000)  # past the context is fine
    assert "max_tokens=70000 must be an integer from 1 to 65536" in caught.value.message
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="at most 4"):
        client.completions.create(model="tiny", prompt="a", stop=["1", "2", "3", "4", "5"])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="a")
    port = server.server_address[1]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/v1/completions", body="{not json")
    response = connection.getresponse()
    assert response.status == 400 and "JSON Parse error" in json.loads(response.read())["error"]["message"]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/v1/completions")
    response = connection.getresponse()
    assert response.status == 405 and response.getheader("Allow") == "POST"
    assert json.loads(response.read())["error"]["type"] == "invalid_request_error"
    # TF Serving's routes need an export.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/v1/models/tiny")
    response = connection.getresponse()
    assert response.status == 404 and "needs an export" in json.loads(response.read())["error"]


def test_a_client_that_drops_a_stream_does_not_break_the_server(client, server):
    body = json.dumps({"model": "tiny", "prompt": "the", "max_tokens": 25, "temperature": 0, "stream": True})
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=60) as connection:
            connection.sendall(request)
            head = connection.recv(4096)
            assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
        # closed mid-stream
    answer = client.completions.create(model="tiny", prompt="the", max_tokens=5, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")


def drop_a_long_stream(server, events):
    """Starts a greedy stream of 60000 tokens, reads `events` events of it and drops the connection;
    returns the scheduler's model calls then, 1 s later and 2 s later."""
    scheduler = server.model.scheduler
    body = json.dumps({"model": server.model.name, "prompt": "the", "max_tokens": 60000, "temperature": 0,
                       "stream": True})
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=120) as connection:
        connection.sendall(request)
        received = b""
        while received.count(b"data: ") < events:
            chunk = connection.recv(1 << 16)
            assert chunk, received
            received += chunk
        assert b'"finish_reason":"' not in received  # still decoding
        assert b'"finish_reason":null}' in received  # events are compact JSON, as answers are
        dropped = scheduler.calls
    time.sleep(1.0)
    settled = scheduler.calls
    time.sleep(1.0)
    return dropped, settled, scheduler.calls


def test_a_client_that_leaves_a_stream_stops_its_decoding(server, caplog):
    dropped, settled, later = drop_a_long_stream(server, 5)
    assert settled == later  # no model call starts after the disconnect
    assert settled - dropped <= 2  # at most the step in progress, and one it was sending
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_the_playground_is_one_self_contained_page(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    connection.request("GET", "/")
    response = connection.getresponse()
    page = response.read().decode()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/html")
    assert "/v1/completions" in page and "getReader" in page and "stream: true" in page
    for element in ("prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "generate"):
        assert f'id="{element}"' in page
    assert "http://" not in page and "https://" not in page and "<link" not in page and " src=" not in page


@pytest.mark.export
def test_an_export_streams_one_event_per_token_equal_to_its_generate(tiny_run_export):
    base_dir, path = tiny_run_export  # conftest's export of run_dir (shared: read only)
    generator = load_generator(path)
    long = "the cat sat on the mat. " * 2  # left-truncated
    # 12 new tokens stay within the context of 32; 40 pass it.
    for prompt, count in [("the cat", 12), ("", 12), (long, 12), ("the cat", 40), (long, 40)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            [expected] = generator.complete([prompt], max_new_tokens=count)
            pieces = list(generator.stream(prompt, count))
        assert "".join(p.text for p in pieces) == expected.text
        assert (pieces[-1].finish_reason, pieces[-1].token_count) == (expected.finish_reason, expected.token_count)
    for count in (9, 40):
        streamed = [""] * 2
        for piece in generator.stream("the", count, temperature=1.0, seed=5, num_return_sequences=2):
            streamed[piece.index] += piece.text
        assert streamed == generator.generate(["the"], count, temperature=1.0, seed=5, num_return_sequences=2)
    server = make_server(os.path.join(base_dir, "tiny"), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x")
        whole = client.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0)
        assert whole.choices[0].text == generator.generate(["the cat"], max_new_tokens=12)[0]
        chunks = list(client.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0,
                                                stream=True))
        assert "".join(c.text for chunk in chunks for c in chunk.choices) == whole.choices[0].text
        # A character model: one server-sent event per token decoded (the export's `step`).
        events = [c for chunk in chunks for c in chunk.choices if c.text]
        assert len(events) == whole.usage.completion_tokens
        assert whole.choices[0].finish_reason == "stop" or whole.usage.completion_tokens == 12
        assert whole.usage.prompt_tokens == 7
        # Past the context, several prompts as one call of the export; a stop ends a choice with "stop".
        expected = generator.complete(["the cat", "a"], 40, temperature=1.0, seed=2, num_return_sequences=2)
        answer = client.completions.create(model="tiny", prompt=["the cat", "a"], max_tokens=40, temperature=1.0,
                                           seed=2, n=2)
        assert [(c.text, c.finish_reason) for c in answer.choices] == [
            (e.text, e.finish_reason) for e in expected]
        assert answer.usage.completion_tokens == sum(e.token_count for e in expected)
        text = whole.choices[0].text
        stop = text[2:4]
        ends = text.index(stop) + len(stop)  # the stop completes at the last token allowed
        cut = client.completions.create(model="tiny", prompt="the cat", max_tokens=ends, temperature=0, stop=stop)
        assert (cut.choices[0].text, cut.choices[0].finish_reason) == (text[: text.index(stop)], "stop")
    finally:
        server.shutdown()
        server.server_close()
    # Concurrent greedy whole answers share decode calls (as predict's requests do), answers unchanged.
    prompts = ["the cat", "a", "", "dog", "the mat", "t"]
    server = make_server(os.path.join(base_dir, "tiny"), port=0, batch_timeout=2.0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x")
        answers = in_threads(lambda prompt: client.completions.create(
            model="tiny", prompt=prompt, max_tokens=10, temperature=0, stop=["z"]), [(p,) for p in prompts])
        assert [a.choices[0].text for a in answers] == generator.generate(prompts, 10, stop=["z"])
        assert server.model.scheduler.calls < len(prompts)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.export
def test_an_export_stops_streaming_when_its_client_leaves(tiny_run_export):
    base_dir, _ = tiny_run_export  # conftest's export of run_dir (shared: read only)
    server = make_server(os.path.join(base_dir, "tiny"), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dropped, settled, later = drop_a_long_stream(server, 3)
        assert settled == later  # no model call starts after the disconnect
        assert settled - dropped <= 2
    finally:
        server.shutdown()
        server.server_close()


# vLLM's tokenizer routes: /tokenize, /detokenize, /tokenizer_info ---------------------------------

@pytest.mark.parametrize(
    "parse, request_body, status, param, message",
    [
        (TokenizeRequest.parse, {}, 400, "prompt", "prompt must be a string"),
        (TokenizeRequest.parse, {"prompt": ["a"]}, 400, "prompt", "prompt must be a string"),
        (TokenizeRequest.parse, {"prompt": "a", "add_special_tokens": 1}, 400, "add_special_tokens",
         "must be true or false"),
        (TokenizeRequest.parse, {"prompt": "a", "messages": []}, 400, "messages", "Unrecognized request argument"),
        (TokenizeRequest.parse, {"prompt": "a", "model": "gpt-4"}, 404, "model", "does not exist"),
        (DetokenizeRequest.parse, {}, 400, "tokens", "tokens must be a list of token ids"),
        (DetokenizeRequest.parse, {"tokens": "1 2"}, 400, "tokens", "tokens must be a list"),
        (DetokenizeRequest.parse, {"tokens": [1, 19]}, 400, "tokens", "tokens[1]=19 is not a token id; send "
         "integers from 0 to 18"),
        (DetokenizeRequest.parse, {"tokens": [-1]}, 400, "tokens", "tokens[0]=-1 is not a token id"),
        (DetokenizeRequest.parse, {"tokens": [1.0]}, 400, "tokens", "tokens[0]=1.0 is not a token id"),
        (DetokenizeRequest.parse, {"tokens": [True]}, 400, "tokens", "tokens[0]=True is not a token id"),
        (DetokenizeRequest.parse, {"tokens": [1], "prompt": "a"}, 400, "prompt", "Unrecognized request"),
        (DetokenizeRequest.parse, {"tokens": [1], "model": "other"}, 404, "model", "this server serves 'tiny'"),
    ],
)
def test_bad_tokenizer_requests_are_refused_with_the_field(parse, request_body, status, param, message):
    arguments = (19,) if parse == DetokenizeRequest.parse else ()  # vocabulary_size
    with pytest.raises(APIError) as caught:
        parse(request_body, "tiny", *arguments)
    error = caught.value
    assert (error.status, error.param) == (status, param)
    assert message in str(error), str(error)
    assert error.status == 400 or error.code == "model_not_found"


def test_tokenizer_requests_take_the_served_model_or_none():
    assert TokenizeRequest.parse({"prompt": ""}, "tiny").prompt == ""
    assert TokenizeRequest.parse({"model": "tiny", "prompt": "a", "add_special_tokens": False}, "tiny").prompt == "a"
    assert DetokenizeRequest.parse({"model": None, "tokens": []}, "tiny", 19).tokens == []


def _post(port, path, body):
    """`(status, JSON answer)` of a POST of `body` (a JSON value) to `path`."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def _get(port, path):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def check_tokenizer_routes(port, tokenizer, context):
    """The tokenizer routes of a server of model 'tiny' agree with `tokenizer` (the run's), which has
    the characters of TEXT; returns the ids of TEXT."""
    status, info = _get(port, "/tokenizer_info")
    assert status == 200
    assert (info["eos_token"], info["eos_token_id"]) == ("<|endoftext|>", tokenizer.end_of_text_id)
    assert (info["tokenizer_kind"], info["tokenizer_class"]) == ("char", "char")
    assert info["vocabulary_size"] == tokenizer.vocabulary_size
    assert info["model_max_length"] == info["max_model_len"] == context
    status, answer = _post(port, "/tokenize", {"model": "tiny", "prompt": TEXT})
    assert status == 200
    assert answer == {"tokens": tokenizer.encode_documents([TEXT])[0].tolist(), "count": len(TEXT),
                      "max_model_len": context}
    # No special tokens either way (GPT-2's convention); "" is no token.
    assert _post(port, "/tokenize", {"prompt": TEXT, "add_special_tokens": True})[1] == answer
    assert _post(port, "/tokenize", {"prompt": TEXT, "add_special_tokens": False})[1] == answer
    assert _post(port, "/tokenize", {"prompt": ""})[1] == {"tokens": [], "count": 0, "max_model_len": context}
    assert _post(port, "/detokenize", {"model": "tiny", "tokens": answer["tokens"]}) == (200, {"prompt": TEXT})
    assert _post(port, "/detokenize", {"tokens": []}) == (200, {"prompt": ""})
    assert _post(port, "/detokenize", {"tokens": [info["eos_token_id"]]})[1] == {"prompt": "<|endoftext|>"}
    # Refusals in OpenAI's shape, naming the field.
    status, error = _post(port, "/detokenize", {"tokens": [0, info["vocabulary_size"]]})
    assert status == 400 and error["error"]["param"] == "tokens"
    assert f"tokens[1]={info['vocabulary_size']} is not a token id" in error["error"]["message"]
    status, error = _post(port, "/tokenize", {"prompt": 3})
    assert (status, error["error"]["param"], error["error"]["type"]) == (400, "prompt", "invalid_request_error")
    status, error = _post(port, "/tokenize", {"model": "gpt-4", "prompt": "a"})
    assert (status, error["error"]["code"]) == (404, "model_not_found")
    assert _post(port, "/detokenize", {"model": "gpt-4", "tokens": [1]})[0] == 404
    return answer["tokens"]


def test_tokenizer_routes_of_a_run_directory_use_the_runs_tokenizer(server, run_dir, tiny_run):
    tokenizer = tiny_run[2]
    check_tokenizer_routes(server.server_address[1], tokenizer, 32)
    # The served generator's own methods, several texts at once.
    generator = server.model.completions.generator
    texts = [TEXT, "", "a dog"]
    assert generator.detokenize(generator.tokenize(texts)) == texts
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    connection.request("GET", "/tokenize")
    response = connection.getresponse()
    assert response.status == 405 and response.getheader("Allow") == "POST"


@pytest.mark.export
def test_tokenizer_routes_of_an_export_use_its_own_tokenize_signature(tiny_run_export, tiny_run):
    base_dir, path = tiny_run_export  # conftest's export of run_dir (shared: read only)
    server = make_server(os.path.join(base_dir, "tiny"), port=0, batch_timeout=0.5)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        ids = check_tokenizer_routes(port, tiny_run[2], 32)
        # Concurrent requests share `tokenize` calls, each answer cut back to its own ids.
        prompts = [TEXT, "a", "", "the mat", "dog ran!"]
        calls = server.model.scheduler.calls
        answers = in_threads(lambda prompt: _post(port, "/tokenize", {"prompt": prompt}), [(p,) for p in prompts])
        assert [answer["tokens"] for _, answer in answers] == [
            row.tolist() for row in tiny_run[2].encode_documents(prompts)]
        assert server.model.scheduler.calls - calls < len(prompts)
        # TF Serving's REST API serves the signature too.
        status, answer = _post(port, "/v1/models/tiny:predict", {"signature_name": "tokenize", "instances": ["a"]})
        assert status == 200 and answer["predictions"] == [{"token_ids": [4], "token_count": 1}]
        # The ids are the export's own tokenization (its `tokenize` signature).
        signature = server.model.completions.generator.module.signatures["tokenize"]
        outputs = signature(prompts=tf.constant([TEXT, "", "a dog"]))
        assert outputs["token_ids"].numpy()[0].tolist() == ids
        assert outputs["token_count"].numpy().tolist() == [len(TEXT), 0, 5]
        calls = server.model.scheduler.calls
        assert _post(port, "/tokenize", {"prompt": "a dog"})[1]["tokens"] == outputs["token_ids"].numpy()[2, :5].tolist()
        assert server.model.scheduler.calls > calls  # through the scheduler, as predict's calls
        # An export older than the `tokenize` signature: 404, saying to export again.
        tokenization, server.model.tokenization = server.model.tokenization, None
        try:
            status, error = _get(port, "/tokenizer_info")
        finally:
            server.model.tokenization = tokenization
        assert status == 404 and "export the run again" in error["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()


SCORED = "the cat sat on the mat. a dog ran to the cat."


@pytest.fixture(scope="module")
def bpe_export(write_run_directory, tmp_path_factory):
    """`(run_dir, model, tokenizer, model_dir)`: a tiny random model of a byte-level BPE tokenizer, whose
    text can spell end-of-text, and its export."""
    from kgpt.serving.export import export
    from kgpt.tokenizers.bpe import train_bpe

    tokenizer = train_bpe([SCORED * 20], vocabulary_size=300)
    root = tmp_path_factory.mktemp("bpe_export")
    run_dir, model = write_run_directory(root / "bpe", tokenizer, 64)
    path = export(str(run_dir), "bpe", base_dir=str(root / "saved_models"), max_new_tokens=8)
    return str(run_dir), model, tokenizer, os.path.dirname(path)


@pytest.mark.export
def test_the_openai_client_scores_an_export_as_kgpt_evaluate_does(bpe_export, tmp_path, capsys):
    from kgpt.cli import main

    run_dir, model, tokenizer, model_dir = bpe_export
    text_file = tmp_path / "scored.txt"
    text_file.write_text(SCORED)
    assert main(["evaluate", run_dir, "--data", str(text_file), "--json"]) == 0
    [evaluation] = json.loads(capsys.readouterr().out)
    in_process = load_generator(run_dir)
    server = make_server(model_dir, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x")
        # `kgpt evaluate` scores end-of-text + text + end-of-text; echo scores every prompt token but the first.
        prompt = "<|endoftext|>" + SCORED + "<|endoftext|>"
        scored = client.completions.create(model="bpe", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
        [choice] = scored.choices
        logprobs = choice.logprobs
        assert choice.text == prompt and "".join(logprobs.tokens) == prompt
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        assert len(logprobs.tokens) == evaluation["tokens"] + 1 == scored.usage.prompt_tokens
        assert -sum(logprobs.token_logprobs[1:]) == pytest.approx(evaluation["nll"], rel=1e-4)
        # ... and a NumPy log-softmax of the model's logits, token by token.
        ids = [int(token) for token in tokenizer.encode_documents([prompt])[0]]
        logits = np.asarray(model(np.array([ids], "int32"))[0], np.float64)
        reference = logits - logits.max(-1, keepdims=True)
        reference -= np.log(np.exp(reference).sum(-1, keepdims=True))
        expected = reference[np.arange(len(ids) - 1), ids[1:]]
        np.testing.assert_allclose(logprobs.token_logprobs[1:], expected, atol=1e-4)
        assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(ids))]
        # The routes a client counts tokens with tokenize as the export does.
        port = server.server_address[1]
        assert _post(port, "/tokenize", {"prompt": prompt})[1]["tokens"] == ids
        assert _post(port, "/detokenize", {"tokens": ids})[1]["prompt"] == prompt
        # A scoring request as evaluation clients send it: every prompt token, then the one generated.
        contexts = ["the cat sat", "a dog"]
        answer = client.completions.create(model="bpe", prompt=contexts, max_tokens=1, echo=True, logprobs=1,
                                           temperature=0)
        for context, choice in zip(contexts, answer.choices):
            count = len(tokenizer.encode_documents([context])[0])
            assert len(choice.logprobs.token_logprobs) == count + 1 == len(choice.logprobs.top_logprobs)
            assert choice.logprobs.top_logprobs[0] is None
            assert all(isinstance(top, dict) and 1 <= len(top) <= 2 for top in choice.logprobs.top_logprobs[1:])
        # logprobs=2: OpenAI's shape, one entry per completion token, the in-process decode's values.
        whole = client.completions.create(model="bpe", prompt="the cat", max_tokens=6, temperature=0, logprobs=2)
        [choice] = whole.choices
        [expected] = in_process.complete(["the cat"], 6, logprobs=2)
        assert choice.text == expected.text and len(choice.logprobs.tokens) == whole.usage.completion_tokens
        assert choice.logprobs.tokens == [token.text for token in expected.logprobs]
        np.testing.assert_allclose(choice.logprobs.token_logprobs, [t.logprob for t in expected.logprobs],
                                   atol=1e-4)
        for top, token in zip(choice.logprobs.top_logprobs, expected.logprobs):
            assert set(top) == {text for _, text, _ in token.top} | {token.text}
        assert choice.logprobs.text_offset[0] == len("the cat")
        streamed = list(client.completions.create(model="bpe", prompt="the cat", max_tokens=6, temperature=0,
                                                  logprobs=2, stream=True))
        tokens = [t for chunk in streamed for c in chunk.choices if c.logprobs for t in c.logprobs.tokens]
        assert tokens == choice.logprobs.tokens
        # Penalties change greedy text, as the in-process decode (tested against NumPy) has them.
        plain = client.completions.create(model="bpe", prompt="the", max_tokens=8, temperature=0)
        penalized = client.completions.create(model="bpe", prompt="the", max_tokens=8, temperature=0,
                                              frequency_penalty=2.0, presence_penalty=1.0,
                                              extra_body={"repetition_penalty": 1.5})
        expected = in_process.generate(["the"], 8, frequency_penalty=2.0, presence_penalty=1.0,
                                       repetition_penalty=1.5)
        assert penalized.choices[0].text == expected[0] != plain.choices[0].text
        stream = client.completions.create(model="bpe", prompt="the", max_tokens=8, temperature=0,
                                           frequency_penalty=2.0, presence_penalty=1.0,
                                           extra_body={"repetition_penalty": 1.5}, stream=True)
        assert "".join(c.text for chunk in stream for c in chunk.choices) == expected[0]
    finally:
        server.shutdown()
        server.server_close()
