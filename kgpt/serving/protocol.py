"""The serving protocol: typed requests and responses of TF Serving's REST API, of OpenAI's
completions API and of vLLM's tokenizer routes, parsed from JSON at the edge, and `APIError`, the
one error type of all, with each API's error shape (`APIError.body`).

Nothing here runs a model: `kgpt.serving.rest` and `kgpt.serving.openai_api` answer these
requests, `kgpt.serving.server` carries them over HTTP.
"""

import dataclasses
import enum
import json
import secrets

from kgpt.generation.decoding import MAX_NEW_TOKENS
from kgpt.generation.logprobs import MAX_LOGPROBS, check_logprobs
from kgpt.generation.sampling import SamplingOptions

# Deep enough for any tensor (TensorFlow's rank limit is far below) inside a request object.
MAX_JSON_DEPTH = 100


class API(enum.Enum):
    """Which API a route belongs to: it decides the shape of its errors."""

    TF_SERVING = "tf_serving"
    OPENAI = "openai"


class APIError(Exception):
    """A refused request in either API.

    Args:
        message: what happened and how to fix it.
        status: the HTTP status.
        param: the request field at fault (OpenAI's `param`), if one is.
        code: OpenAI's `code` (e.g. "model_not_found"), if any.
        kind: OpenAI's error `type`; default "invalid_request_error" below 500, else "server_error".

    Example:
        raise APIError("n=0 must be an integer from 1 to 16.", param="n")
    """

    def __init__(self, message, status=400, param=None, code=None, kind=None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self, api):
        """The JSON error of `api`: TF Serving's `{"error": message}` or OpenAI's
        `{"error": {message, type, param, code}}`; the one place either shape is made."""
        if api is API.OPENAI:
            return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                              "code": self.code}}
        return {"error": self.message}

    @classmethod
    def of(cls, error):
        """`error` itself if it is an `APIError`; any other exception (a bug) as a 500."""
        if isinstance(error, cls):
            return error
        return cls(f"{type(error).__name__}: {error}", status=500)


def compact_json(value):
    """`value` as the servers answer it: compact JSON, UTF-8 text rather than \\u escapes."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def parse_json(body):
    """The JSON value of a request body; nesting deeper than `MAX_JSON_DEPTH` is refused before it
    can recurse. Raises `APIError` (400)."""
    deep = f"JSON Parse error: nested deeper than {MAX_JSON_DEPTH} levels; send tensors as nested lists"
    try:
        value = json.loads(body)
    except RecursionError as error:  # deeper than Python's recursion limit
        raise APIError(deep) from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise APIError(f"JSON Parse error: {error}") from error
    level, containers = 0, [value]
    while containers:  # breadth first, one level at a time, without recursion
        level += 1
        if level > MAX_JSON_DEPTH:
            raise APIError(deep)
        containers = [
            item for container in containers if isinstance(container, (list, dict))
            for item in (container.values() if isinstance(container, dict) else container)
            if isinstance(item, (list, dict))
        ]
    return value


# TF Serving's REST API ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The servable a URL names: `/v1/models/NAME[/versions/VERSION]`."""

    name: str
    version: str | None = None

    def describe(self):
        """TF Serving's words for it in "Servable not found" errors."""
        return f"Specific({self.name}, {self.version})" if self.version else f"Latest({self.name})"


@dataclasses.dataclass(frozen=True)
class PredictRequest:
    """`POST /v1/models/NAME[/versions/V]:predict`.

    Args:
        model: the servable of the URL.
        signature_name: the signature to run ("serving_default" when the request names none).
        row_format: True for `{"instances": [...]}` (rows), False for `{"inputs": ...}` (columns).
        values: the JSON value of `instances` or `inputs`, tensors still as nested lists.
    """

    model: ModelSpec
    signature_name: str
    row_format: bool
    values: object

    @classmethod
    def parse(cls, model, body, default_signature):
        """Checks a predict request body (bytes) as TF Serving does; raises `APIError` (400)."""
        request = parse_json(body)
        if not isinstance(request, dict):
            raise APIError("JSON Value: request must be an object with 'instances' or 'inputs'.")
        row_format = "instances" in request
        if row_format == ("inputs" in request):
            raise APIError(
                "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist"
                if row_format else "Missing 'inputs' or 'instances' key"
            )
        signature_name = request.get("signature_name") or default_signature
        return cls(model, signature_name, row_format, request["instances" if row_format else "inputs"])


@dataclasses.dataclass(frozen=True)
class PredictResponse:
    """Named outputs as JSON values (`{name: nested lists}`), shaped as the request was."""

    outputs: dict
    row_format: bool

    def to_json(self):
        """`{"predictions": ...}` for rows, `{"outputs": ...}` for columns; one output unnamed."""
        outputs = dict(sorted(self.outputs.items()))
        key = "predictions" if self.row_format else "outputs"
        if len(outputs) == 1:
            return {key: next(iter(outputs.values()))}
        if self.row_format:
            rows = range(len(next(iter(outputs.values()))))
            return {key: [{name: value[row] for name, value in outputs.items()} for row in rows]}
        return {key: outputs}


@dataclasses.dataclass(frozen=True)
class StatusResponse:
    """`GET /v1/models/NAME[/versions/V]`: the one served version, available."""

    version: str

    def to_json(self):
        status = {"error_code": "OK", "error_message": ""}
        return {"model_version_status": [{"version": self.version, "state": "AVAILABLE", "status": status}]}


@dataclasses.dataclass(frozen=True)
class MetadataResponse:
    """`GET /v1/models/NAME[/versions/V]/metadata`: the SignatureDefs as JSON objects."""

    name: str
    version: str
    signature_defs: dict

    def to_json(self):
        return {
            "model_spec": {"name": self.name, "signature_name": "", "version": self.version},
            "metadata": {"signature_def": {"signature_def": self.signature_defs}},
        }


# OpenAI's completions API ---------------------------------------------------------------------

OPENAI_MAX_STOPS = 4  # OpenAI's limit
MAX_CHOICES = 16  # n: continuations per prompt
MAX_PROMPTS = 32
DEFAULT_MAX_TOKENS = 16  # OpenAI's default
_INT32 = 2**31 - 1

_IMPLEMENTED = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "n", "stream", "seed",
                "stream_options", "logprobs", "echo", "frequency_penalty", "presence_penalty",
                "top_k", "repetition_penalty"}  # the last two: extensions (vLLM has them too)
_IGNORED = {"user"}  # an end-user id for OpenAI's abuse monitoring
# Documented fields kgpt does not implement: accepted only at these defaults (or null).
_DEFAULT_ONLY = {"best_of": 1, "suffix": "", "logit_bias": {}}


def _integer(request, name, default, low, high, note=""):
    value = request.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise APIError(f"{name}={json.dumps(value)} must be an integer from {low} to {high}{note}.",
                       param=name)
    return value


def _number(request, name, default, low, high):
    value = request.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise APIError(f"{name}={json.dumps(value)} must be a number from {low} to {high}.", param=name)
    return float(value)


def _positive(request, name, default):
    value = request.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise APIError(f"{name}={json.dumps(value)[:80]} must be a number > 0.", param=name)
    return float(value)


def _strings(value, name, what):
    """`value` as a list of strings: a string, or a non-empty list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return value
    raise APIError(f"{name} must be {what}; got {json.dumps(value)[:80]}.", param=name)


def _sampling(fields):
    """`SamplingOptions(**fields)`, each field checked alone first, so a refusal names its field."""
    for name, value in fields.items():
        try:
            SamplingOptions(**{name: value})
        except ValueError as error:  # e.g. top_p=0
            raise APIError(str(error), param=name) from error
    try:
        return SamplingOptions(**fields)
    except ValueError as error:
        raise APIError(str(error)) from error


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """`POST /v1/completions`, checked: OpenAI's legacy completions request as kgpt honours it.

    Args:
        prompts: 1 to `MAX_PROMPTS` strings.
        max_tokens: new tokens per choice (past the model's context too, up to
            `kgpt.generation.decoding.MAX_NEW_TOKENS`).
        sampling: `SamplingOptions`; temperature 0 is greedy (`temperature=None`); the seed is
            drawn at random when the request has none.
        stops: up to `OPENAI_MAX_STOPS` non-empty strings.
        n: choices per prompt.
        stream: answer as server-sent events; `include_usage` adds a last chunk with usage.
        logprobs: None, or the alternatives per token (0 to `MAX_LOGPROBS`) returned with each
            token's own log-probability (OpenAI's legacy `logprobs`).
        echo: each choice's text (and logprobs) starts with its prompt's; with `max_tokens` 0 the
            prompt alone is scored, nothing generated.

    The penalties (`frequency_penalty`, `presence_penalty`, and `repetition_penalty`, an extension
    as in vLLM) are `sampling`'s fields.
    """

    prompts: list
    max_tokens: int
    sampling: SamplingOptions
    stops: list
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None = None
    echo: bool = False

    @classmethod
    def parse(cls, request, served_name):
        """Checks a request's JSON value as OpenAI checks it; raises `APIError` naming the field.

        Documented fields kgpt cannot honour are refused unless at their defaults, unknown fields
        are refused, `user` is ignored; another model than `served_name` is 404.
        """
        if not isinstance(request, dict):
            raise APIError("The request body must be a JSON object.")
        for name in request:
            if name in _DEFAULT_ONLY:
                if request[name] is not None and request[name] != _DEFAULT_ONLY[name]:
                    raise APIError(
                        f"{name}={json.dumps(request[name])[:80]} is not supported by kgpt serve; leave "
                        f"it out (or send {json.dumps(_DEFAULT_ONLY[name])}).", param=name,
                        code="unsupported_parameter")
            elif name not in _IMPLEMENTED | _IGNORED:
                raise APIError(f"Unrecognized request argument supplied: {name}", param=name)
        if "model" not in request:
            raise APIError(f"You must provide a model parameter (this server has {served_name!r}).",
                           param="model")
        if request["model"] != served_name:
            raise APIError(f"The model {request['model']!r} does not exist; this server serves "
                           f"{served_name!r}.", status=404, param="model", code="model_not_found")
        if "prompt" not in request:
            raise APIError("You must provide a prompt (a string or a list of strings).", param="prompt")
        prompts = _strings(request["prompt"], "prompt", "a string or a non-empty list of strings "
                           "(token-id prompts are not supported; send text)")
        if len(prompts) > MAX_PROMPTS:
            raise APIError(f"prompt has {len(prompts)} strings; send at most {MAX_PROMPTS} per request.",
                           param="prompt")
        stops = [] if request.get("stop") is None else _strings(
            request["stop"], "stop", f"a non-empty string or a list of 1 to {OPENAI_MAX_STOPS} of them")
        if len(stops) > OPENAI_MAX_STOPS or not all(stops):
            problem = (f"{len(stops)} stop sequences (at most {OPENAI_MAX_STOPS})"
                       if len(stops) > OPENAI_MAX_STOPS else "an empty one")
            raise APIError(f"stop has {problem}; send 1 to {OPENAI_MAX_STOPS} non-empty strings.",
                           param="stop")
        echo = request.get("echo") or False
        if not isinstance(echo, bool):
            raise APIError(f"echo={json.dumps(echo)[:80]} must be true or false.", param="echo")
        try:
            logprobs = check_logprobs(request.get("logprobs"))
        except ValueError as error:  # its words, with the value as JSON (true, not True)
            raise APIError(
                f"logprobs={json.dumps(request['logprobs'])[:80]} must be an integer from 0 to "
                f"{MAX_LOGPROBS} (the alternatives returned per token besides the chosen one) or null.",
                param="logprobs",
            ) from error
        # kgpt's limit of new tokens (`decoding.MAX_NEW_TOKENS`), not int32's: one range in every message.
        max_tokens = _integer(request, "max_tokens", DEFAULT_MAX_TOKENS, 0 if echo else 1, MAX_NEW_TOKENS,
                              " (past the model's context, generation continues from its last half"
                              + ("" if echo else "; 0, scoring the prompt alone, needs echo: true") + ")")
        seed = _integer(request, "seed", None, -_INT32 - 1, _INT32)
        sampling = _sampling(dict(
            temperature=_number(request, "temperature", 1.0, 0, 2) or None,  # 0: greedy
            top_p=_number(request, "top_p", 1.0, 0, 1), top_k=_integer(request, "top_k", 0, 0, _INT32),
            seed=secrets.randbelow(_INT32) if seed is None else seed,
            frequency_penalty=_number(request, "frequency_penalty", 0.0, -2, 2),
            presence_penalty=_number(request, "presence_penalty", 0.0, -2, 2),
            repetition_penalty=_positive(request, "repetition_penalty", 1.0),
        ))
        stream = request.get("stream") or False
        options = request.get("stream_options") or {}
        if not isinstance(stream, bool) or not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise APIError("stream must be true or false, stream_options {\"include_usage\": bool}.",
                           param="stream")
        if options and not stream:
            raise APIError("stream_options is only allowed with stream: true.", param="stream_options")
        return cls(prompts=prompts, max_tokens=max_tokens, sampling=sampling, stops=stops,
                   n=_integer(request, "n", 1, 1, MAX_CHOICES), stream=stream,
                   include_usage=bool(options.get("include_usage")), logprobs=logprobs, echo=echo)


# What OpenAI (and vLLM) write for a log-probability of -inf, which JSON cannot carry.
_LOWEST_LOGPROB = -9999.0


def _logprob(value):
    return max(value, _LOWEST_LOGPROB)


@dataclasses.dataclass(frozen=True)
class ChoiceLogprobs:
    """A choice's (or a streamed chunk's) tokens with their log-probabilities, in OpenAI's legacy
    `logprobs` shape.

    Args:
        tokens: `kgpt.generation.logprobs.TokenLogprob`s, in order (a prompt's first has no logprob).
        text_offset: where each token's text starts in the prompt + completion, in characters:
            a completion's first token at `len(prompt)`, echoed or not (OpenAI's), the next ones
            after their predecessors' texts (vLLM's way). The tokens of an echoed prompt end at
            `len(prompt)`, so a prompt left-truncated to fit the context starts past 0. A token that
            ends inside a UTF-8 character counts as one character (its text is U+FFFD), so after
            such tokens the offsets can run ahead of the text.
    """

    tokens: tuple
    text_offset: tuple

    @classmethod
    def of(cls, tokens, start):
        """`tokens` whose texts follow each other from character `start` (offsets below 0 are 0)."""
        offsets, offset = [], start
        for token in tokens:
            offsets.append(max(offset, 0))
            offset += len(token.text)
        return cls(tuple(tokens), tuple(offsets))

    def to_json(self):
        """`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`: each `top_logprobs` entry
        is `{text: logprob}` of the chosen token first, then the asked-for alternatives best first
        (k or k + 1 entries, as OpenAI's and vLLM's), null where `token_logprobs` is (the prompt's
        first token); tokens of the same text share one key (the first kept)."""
        tops = []
        for token in self.tokens:
            if token.logprob is None:
                tops.append(None)
                continue
            top = {token.text: _logprob(token.logprob)}
            for _, text, logprob in token.top:
                top.setdefault(text, _logprob(logprob))
            tops.append(top)
        return {
            "tokens": [token.text for token in self.tokens],
            "token_logprobs": [None if token.logprob is None else _logprob(token.logprob)
                               for token in self.tokens],
            "top_logprobs": tops,
            "text_offset": list(self.text_offset),
        }


@dataclasses.dataclass(frozen=True)
class CompletionChoice:
    """One choice of an answer, or what one streamed chunk adds to it.

    Args:
        text: its text (with `echo`, the prompt's first).
        index: which choice (prompt-major, `n` per prompt).
        finish_reason: "stop", "length", or None before a streamed choice's last chunk.
        logprobs: a `ChoiceLogprobs` when the request asked for them, else None (JSON null).
    """

    text: str
    index: int
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None

    def to_json(self):
        logprobs = None if self.logprobs is None else self.logprobs.to_json()
        return {"text": self.text, "index": self.index, "logprobs": logprobs,
                "finish_reason": self.finish_reason}


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def to_json(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclasses.dataclass(frozen=True)
class CompletionResponse:
    """A whole answer, or one chunk of a streamed one (the same object, fewer choices; a streamed
    answer's usage comes alone in its last chunk)."""

    id: str
    created: int
    model: str
    choices: list
    usage: Usage | None = None

    def to_json(self):
        answer = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                  "choices": [choice.to_json() for choice in self.choices]}
        if self.usage is not None:
            answer["usage"] = self.usage.to_json()
        return answer


@dataclasses.dataclass(frozen=True)
class ModelList:
    """`GET /v1/models`: the one served model."""

    name: str
    created: int

    def to_json(self):
        return {"object": "list", "data": [
            {"id": self.name, "object": "model", "created": self.created, "owned_by": "kgpt"}]}
