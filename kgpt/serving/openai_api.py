"""The OpenAI completions API of `kgpt serve`: `POST /v1/completions` (whole, decoded as one batch,
or streamed as server-sent events) and `GET /v1/models`, over a `kgpt.generate.TextGenerator`.

Requests follow OpenAI's legacy completions API: its documented fields that kgpt implements are
honoured, `user` is ignored, documented fields kgpt cannot honour are refused unless they hold
their default, and unknown fields are refused, each with OpenAI's error shape and a 4xx status.
"""

import dataclasses
import json
import secrets
import time

from kgpt.generation.decoding import check_options
from kgpt.generation.sampling import SamplingOptions
from kgpt.generation.stopping import StopText

MAX_STOPS = 4  # OpenAI's limit
MAX_CHOICES = 16  # n: continuations per prompt
MAX_PROMPTS = 32
DEFAULT_MAX_TOKENS = 16  # OpenAI's default
_INT32 = 2**31 - 1

_IMPLEMENTED = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "n", "stream", "seed",
                "stream_options", "top_k"}  # top_k: an extension (vLLM has it too)
_IGNORED = {"user"}  # an end-user id for OpenAI's abuse monitoring
# Documented fields kgpt does not implement: accepted only at these defaults (or null).
_DEFAULT_ONLY = {"echo": False, "best_of": 1, "logprobs": None, "suffix": "", "presence_penalty": 0,
                 "frequency_penalty": 0, "logit_bias": {}}


class OpenAIError(Exception):
    """A refused request: HTTP `status` and OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(self, message, param=None, status=400, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class CompletionRequest:
    prompts: list
    max_tokens: int
    sampling: SamplingOptions
    stops: list
    n: int
    stream: bool
    include_usage: bool


def _integer(request, name, default, low, high):
    value = request.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise OpenAIError(f"{name}={json.dumps(value)} must be an integer from {low} to {high}.", name)
    return value


def _number(request, name, default, low, high):
    value = request.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise OpenAIError(f"{name}={json.dumps(value)} must be a number from {low} to {high}.", name)
    return float(value)


def _strings(value, name, what):
    """`value` as a list of strings: a string, or a non-empty list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return value
    raise OpenAIError(f"{name} must be {what}; got {json.dumps(value)[:80]}.", name)


def parse_request(request, served_name):
    """Checks a `/v1/completions` request object; returns a `CompletionRequest` or raises `OpenAIError`."""
    if not isinstance(request, dict):
        raise OpenAIError("The request body must be a JSON object.")
    for name in request:
        if name in _DEFAULT_ONLY:
            if request[name] is not None and request[name] != _DEFAULT_ONLY[name]:
                raise OpenAIError(
                    f"{name}={json.dumps(request[name])[:80]} is not supported by kgpt serve; leave it "
                    f"out (or send {json.dumps(_DEFAULT_ONLY[name])}).", name, code="unsupported_parameter")
        elif name not in _IMPLEMENTED | _IGNORED:
            raise OpenAIError(f"Unrecognized request argument supplied: {name}", name)
    if "model" not in request:
        raise OpenAIError(f"You must provide a model parameter (this server has {served_name!r}).", "model")
    if request["model"] != served_name:
        raise OpenAIError(f"The model {request['model']!r} does not exist; this server serves "
                          f"{served_name!r}.", "model", status=404, code="model_not_found")
    if "prompt" not in request:
        raise OpenAIError("You must provide a prompt (a string or a list of strings).", "prompt")
    prompts = _strings(request["prompt"], "prompt", "a string or a non-empty list of strings (token-id "
                       "prompts are not supported; send text)")
    if len(prompts) > MAX_PROMPTS:
        raise OpenAIError(f"prompt has {len(prompts)} strings; send at most {MAX_PROMPTS} per request.",
                          "prompt")
    stops = [] if request.get("stop") is None else _strings(
        request["stop"], "stop", f"a non-empty string or a list of 1 to {MAX_STOPS} of them")
    if len(stops) > MAX_STOPS or not all(stops):
        problem = (f"{len(stops)} stop sequences (at most {MAX_STOPS})" if len(stops) > MAX_STOPS
                   else "an empty one")
        raise OpenAIError(f"stop has {problem}; send 1 to {MAX_STOPS} non-empty strings.", "stop")
    temperature = _number(request, "temperature", 1.0, 0, 2)
    seed = _integer(request, "seed", None, -_INT32 - 1, _INT32)
    try:
        sampling = SamplingOptions(
            temperature=temperature or None,  # 0: greedy
            top_p=_number(request, "top_p", 1.0, 0, 1), top_k=_integer(request, "top_k", 0, 0, _INT32),
            seed=secrets.randbelow(_INT32) if seed is None else seed,
        )
    except ValueError as error:  # e.g. top_p=0
        raise OpenAIError(str(error), str(error).split("=")[0]) from error
    stream = request.get("stream") or False
    options = request.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise OpenAIError("stream must be true or false, stream_options {\"include_usage\": bool}.", "stream")
    if options and not stream:
        raise OpenAIError("stream_options is only allowed with stream: true.", "stream_options")
    return CompletionRequest(
        prompts=prompts, max_tokens=_integer(request, "max_tokens", DEFAULT_MAX_TOKENS, 1, _INT32),
        sampling=sampling, stops=stops, n=_integer(request, "n", 1, 1, MAX_CHOICES), stream=stream,
        include_usage=bool(options.get("include_usage")),
    )


class Completions:
    """Answers the `/v1` routes for one `TextGenerator` served as `name`.

    Args:
        generator: a `kgpt.generate.Generator` or `SavedModelGenerator`.
        run: `run(function)` calls `function()` and returns its value; the server passes its
            scheduler here (a bounded queue, a limit on model calls at once).
        whole: runs a whole answer's `complete` call like `run` (default: `run`); the server runs
            it at once for an export, whose generator puts each signature call in the scheduler.
    """

    def __init__(self, generator, name, run=None, whole=None):
        self.generator = generator
        self.name = name
        self.created = int(time.time())
        self.run = run or (lambda function: function())
        self.whole = whole or self.run

    def models(self):
        return {"object": "list", "data": [
            {"id": self.name, "object": "model", "created": self.created, "owned_by": "kgpt"}]}

    def create(self, request):
        """A checked request -> the response object, or (stream) an iterator of event objects whose
        first item is computed now (so a refusal is still an HTTP error, not an event).

        A whole answer is one call of the generator's batched decode (every prompt and choice, the
        stops ending rows early); a streamed one decodes prompt by prompt, token by token."""
        request = parse_request(request, self.name)
        rows = 1 if request.sampling.temperature is None else request.n  # greedy: n copies of one
        try:  # before any decoding: max_tokens in range, ...
            check_options(request.max_tokens, self.generator.sequence_length, request.sampling, 1, rows)
        except ValueError as error:
            raise _max_tokens_error(error) from error
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                "created": int(time.time()), "model": self.name}
        if not request.stream:
            try:
                completions = self.whole(lambda: self.generator.complete(
                    request.prompts, request.max_tokens, sampling=request.sampling,
                    num_return_sequences=rows, stop=request.stops,
                ))
            except ValueError as error:  # e.g. an export older than stop sequences
                raise _max_tokens_error(error) from error
            return self._whole(request, head, completions, request.n // rows)
        events = self._events(request, head)
        first = self.run(lambda: next(events, None))
        return self._chunks(request, head, first, events)

    def _events(self, request, head):
        """`(index, text, finish_reason, prompt_tokens, completion_tokens)` per piece, stops applied;
        prompt-major choices, n copies of a greedy continuation."""
        greedy = request.sampling.temperature is None
        copies = request.n if greedy else 1
        for number, prompt in enumerate(request.prompts):
            rows = 1 if greedy else request.n
            pieces = self.generator.stream(prompt, request.max_tokens, sampling=request.sampling,
                                           num_return_sequences=rows)
            stops = [StopText(request.stops) for _ in range(rows)]
            try:
                for piece in pieces:
                    stop = stops[piece.index]
                    if stop.stopped:
                        continue
                    text = stop.add(piece.text, final=piece.finish_reason is not None)
                    reason = "stop" if stop.stopped else piece.finish_reason
                    if not text and reason is None:
                        continue
                    for copy in range(copies):
                        index = (number * rows + piece.index) * copies + copy
                        yield index, text, reason, piece.prompt_token_count, piece.token_count
                    if all(stop.stopped for stop in stops):
                        break
            finally:
                pieces.close()

    @staticmethod
    def _whole(request, head, completions, copies):
        """The answer to prompt-major `kgpt.generate.Completion`s, each as `copies` choices."""
        choices = [
            {"text": completion.text, "index": number * copies + copy, "logprobs": None,
             "finish_reason": completion.finish_reason}
            for number, completion in enumerate(completions) for copy in range(copies)
        ]
        rows = len(completions) // len(request.prompts)
        usage = {"prompt_tokens": sum(c.prompt_token_count for c in completions[::rows]),
                 "completion_tokens": copies * sum(c.token_count for c in completions)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {**head, "choices": choices, "usage": usage}

    def _chunks(self, request, head, first, events):
        prompt_tokens, counts = {}, {}
        try:
            event = first
            while event is not None:
                index, text, reason, prompt_count, count = event
                prompt_tokens[index // request.n] = prompt_count
                counts[index] = count
                yield {**head, "choices": [
                    {"text": text, "index": index, "logprobs": None, "finish_reason": reason}]}
                event = self.run(lambda: next(events, None))
        finally:
            events.close()
        if request.include_usage:
            usage = {"prompt_tokens": sum(prompt_tokens.values()), "completion_tokens": sum(counts.values())}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            yield {**head, "choices": [], "usage": usage}


def server_sent_events(objects):
    """Encodes objects as `data: {json}\\n\\n` events, then `data: [DONE]\\n\\n` (bytes)."""
    for value in objects:
        yield f"data: {json.dumps(value, ensure_ascii=False)}\n\n".encode()
    yield b"data: [DONE]\n\n"


def _max_tokens_error(error):
    """A generator's `ValueError` as OpenAI's 400, in the API's words (`max_tokens`)."""
    message = str(error)
    param = "max_tokens" if "max_new_tokens" in message else None
    return OpenAIError(message.replace("max_new_tokens", "max_tokens"), param)
