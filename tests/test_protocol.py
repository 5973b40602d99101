"""The serving protocol: requests parsed into typed values at the edge, responses in each API's JSON,
and the one error type in each API's error shape."""

import json

import pytest

from kgpt.generation.logprobs import TokenLogprob
from kgpt.serving.batching import Busy
from kgpt.serving.protocol import (
    API,
    APIError,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    MetadataResponse,
    ModelList,
    ModelSpec,
    PredictRequest,
    PredictResponse,
    StatusResponse,
    Usage,
    parse_json,
)


def test_one_error_has_each_apis_shape():
    error = APIError("n=0 must be an integer from 1 to 16.", param="n")
    assert error.status == 400
    assert error.body(API.TF_SERVING) == {"error": "n=0 must be an integer from 1 to 16."}
    assert error.body(API.OPENAI) == {"error": {
        "message": "n=0 must be an integer from 1 to 16.", "type": "invalid_request_error", "param": "n",
        "code": None}}
    # The scheduler's refusal is the same error type: 503, a server error, "overloaded".
    busy = Busy("The server is busy; retry later.")
    assert isinstance(busy, APIError) and busy.status == 503
    assert busy.body(API.OPENAI)["error"] == {"message": "The server is busy; retry later.",
                                              "type": "server_error", "param": None, "code": "overloaded"}
    assert busy.body(API.TF_SERVING) == {"error": "The server is busy; retry later."}
    # Any other exception is a bug: a 500 naming it; an APIError stays itself.
    bug = APIError.of(KeyError("x"))
    assert (bug.status, bug.kind, bug.message) == (500, "server_error", "KeyError: 'x'")
    assert APIError.of(busy) is busy


@pytest.mark.parametrize("body, message", [
    (b"{", "JSON Parse error: Expecting property name"),
    (b"\xff", "JSON Parse error"),
    (b"[" * 101 + b"]" * 101, "nested deeper than 100 levels"),
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 100 levels"),
])
def test_json_errors_are_400(body, message):
    with pytest.raises(APIError, match=message) as caught:
        parse_json(body)
    assert caught.value.status == 400 and caught.value.param is None


def test_predict_requests_parse_into_their_format_and_signature():
    model = ModelSpec("tiny", "3")
    request = PredictRequest.parse(model, b'{"instances": ["a", "b"]}', "serving_default")
    assert request == PredictRequest(model, "serving_default", True, ["a", "b"])
    request = PredictRequest.parse(model, b'{"signature_name": "generate", "inputs": {"prompts": ["a"]}}',
                                   "serving_default")
    assert (request.signature_name, request.row_format, request.values) == ("generate", False, {"prompts": ["a"]})
    assert ModelSpec("tiny").describe() == "Latest(tiny)" and model.describe() == "Specific(tiny, 3)"
    for body, message in [(b"[1]", "must be an object"), (b"{}", "Missing 'inputs' or 'instances' key"),
                          (b'{"inputs": 1, "instances": 1}', "only one of 'inputs' or 'instances'")]:
        with pytest.raises(APIError, match=message):
            PredictRequest.parse(model, body, "serving_default")


def test_responses_have_tf_servings_json():
    outputs = {"text": ["ab", "c"], "length": [2, 1]}
    assert PredictResponse(outputs, row_format=True).to_json() == {
        "predictions": [{"length": 2, "text": "ab"}, {"length": 1, "text": "c"}]}
    assert PredictResponse(outputs, row_format=False).to_json() == {"outputs": {"length": [2, 1], "text": ["ab", "c"]}}
    assert PredictResponse({"text": ["ab"]}, row_format=True).to_json() == {"predictions": ["ab"]}
    assert StatusResponse("2").to_json()["model_version_status"][0]["version"] == "2"
    assert MetadataResponse("m", "2", {"serving_default": {}}).to_json()["model_spec"] == {
        "name": "m", "signature_name": "", "version": "2"}


def test_completion_requests_parse_into_typed_values():
    request = CompletionRequest.parse({
        "model": "tiny", "prompt": "a", "max_tokens": 5, "temperature": 0.5, "top_k": 3, "seed": 9, "n": 2,
        "stop": ["x", "y"], "stream": True, "stream_options": {"include_usage": True}}, "tiny")
    assert request.prompts == ["a"] and request.max_tokens == 5 and request.n == 2
    assert (request.sampling.temperature, request.sampling.top_k, request.sampling.seed) == (0.5, 3, 9)
    assert request.stops == ["x", "y"] and request.stream and request.include_usage
    # Without a seed one is drawn; temperature 0 is greedy.
    request = CompletionRequest.parse({"model": "tiny", "prompt": ["a", "b"], "temperature": 0}, "tiny")
    assert request.sampling.temperature is None and isinstance(request.sampling.seed, int)
    assert (request.max_tokens, request.n, request.stream, request.stops) == (16, 1, False, [])
    assert (request.logprobs, request.echo) == (None, False)
    assert (request.sampling.frequency_penalty, request.sampling.presence_penalty,
            request.sampling.repetition_penalty) == (0.0, 0.0, 1.0)


def test_logprobs_echo_and_penalties_parse_into_the_request_and_its_sampling_options():
    request = CompletionRequest.parse({
        "model": "tiny", "prompt": "a", "logprobs": 3, "echo": True, "frequency_penalty": 0.5,
        "presence_penalty": -1, "repetition_penalty": 1.2}, "tiny")
    assert (request.logprobs, request.echo) == (3, True)
    assert (request.sampling.frequency_penalty, request.sampling.presence_penalty,
            request.sampling.repetition_penalty) == (0.5, -1.0, 1.2)
    # A scoring request: the prompt alone, scored.
    request = CompletionRequest.parse({"model": "tiny", "prompt": ["a", "b"], "echo": True, "logprobs": 0,
                                       "max_tokens": 0, "temperature": 0}, "tiny")
    assert (request.max_tokens, request.logprobs, request.echo) == (0, 0, True)


@pytest.mark.parametrize("fields, param", [
    ({"top_p": 0}, "top_p"),  # refused by SamplingOptions, field checked alone
    ({"top_k": -1}, "top_k"),
    ({"max_tokens": 70000}, "max_tokens"),  # past kgpt's limit of new tokens
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": 1.5}, "logprobs"),
    ({"echo": 1}, "echo"),
    ({"max_tokens": 0}, "max_tokens"),  # 0 needs echo
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"repetition_penalty": -1}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),  # refused by SamplingOptions
])
def test_a_refusal_names_its_field_without_reading_the_message(fields, param):
    with pytest.raises(APIError) as caught:
        CompletionRequest.parse({"model": "tiny", "prompt": "a", **fields}, "tiny")
    assert caught.value.param == param and caught.value.status == 400


def test_completion_responses_have_openais_json():
    choices = [CompletionChoice("ab", 0, "length"), CompletionChoice("c", 1, None)]
    answer = CompletionResponse("cmpl-1", 5, "tiny", choices, Usage(3, 4)).to_json()
    assert list(answer) == ["id", "object", "created", "model", "choices", "usage"]
    assert answer["object"] == "text_completion"
    assert answer["choices"][1] == {"text": "c", "index": 1, "logprobs": None, "finish_reason": None}
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert "usage" not in CompletionResponse("cmpl-1", 5, "tiny", choices[:1]).to_json()  # a chunk
    assert json.loads(json.dumps(ModelList("tiny", 5).to_json()))["data"][0]["id"] == "tiny"


def test_choice_logprobs_have_openais_legacy_shape():
    tokens = (
        TokenLogprob(5, "Hi", None),  # a prompt's first token: nothing predicts it
        TokenLogprob(6, " there", -0.5, ((7, " you", -0.25), (6, " there", -0.5))),
        TokenLogprob(8, "!", float("-inf"), ((9, ".", -0.1),)),
    )
    logprobs = ChoiceLogprobs.of(tokens, 0)
    assert logprobs.text_offset == (0, 2, 8)
    assert ChoiceLogprobs.of(tokens[1:], 2).text_offset == (2, 8)  # a completion after "Hi"
    assert ChoiceLogprobs.of(tokens, -1).text_offset == (0, 1, 7)  # what starts before the text is at 0
    answer = CompletionChoice("Hi there!", 0, "length", logprobs).to_json()
    assert json.loads(json.dumps(answer, allow_nan=False)) == answer  # -inf is written as OpenAI does
    assert answer["logprobs"] == {
        "tokens": ["Hi", " there", "!"],
        "token_logprobs": [None, -0.5, -9999.0],
        # The chosen token first, then the alternatives (the chosen one once).
        "top_logprobs": [None, {" there": -0.5, " you": -0.25}, {"!": -9999.0, ".": -0.1}],
        "text_offset": [0, 2, 8],
    }
    assert list(answer["logprobs"]["top_logprobs"][1]) == [" there", " you"]
