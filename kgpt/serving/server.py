"""`kgpt serve`: the development server's HTTP side, Starlette routes on uvicorn for TF Serving's
REST API (`kgpt.serving.rest`), OpenAI's completions (`kgpt.serving.openai_api`) and the
playground page at `/`.

uvicorn parses requests with h11, keeps connections alive and notices clients that leave;
`kgpt.serving.connections` bounds its connections by `Limits` (how many, one deadline on each whole
request) and answers malformed request lines. This module routes requests to the APIs as their typed requests
(`kgpt.serving.protocol`), answers each `APIError` in its route's shape, bounds request bodies, and
streams server-sent events, whose decoding stops when the client goes away.
"""

import asyncio
import dataclasses
import errno
import functools
import importlib.resources
import ipaddress
import logging
import os
import socket
import sys
import threading

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from kgpt.serving.connections import MAX_HEAD_BYTES, BoundedProtocol
from kgpt.serving.model_server import ModelServer
from kgpt.serving.protocol import (
    API,
    APIError,
    CompletionRequest,
    ModelSpec,
    PredictRequest,
    compact_json,
    parse_json,
)
from kgpt.serving.tokenization import DetokenizeRequest, TokenizeRequest

logger = logging.getLogger(__name__)

# HTTP's methods: on a known route another one than the route's is 405; any other method is 501.
_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
# Seconds that requests in flight get to finish once the server is asked to stop.
_SHUTDOWN_GRACE = 3


class _Segment(Convertor):
    """A path segment of TF Serving's URLs: a model name (no ':', which starts `:predict`) or a
    version (digits), kept as a string."""

    def __init__(self, regex):
        self.regex = regex

    def convert(self, value):
        return value

    def to_string(self, value):
        return value


register_url_convertor("kgpt_name", _Segment("[^/:]+"))
register_url_convertor("kgpt_version", _Segment("[0-9]+"))


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one client may take.

    Args:
        max_connections: connections open at once. One more closes the connection that has waited
            longest for its request (idle, or still sending it); when all are being answered, its
            request gets 503 and it is closed.
        read_timeout: seconds to send a whole request, head and body, from connecting or from the
            last answer on a kept-alive connection: else 408 and the connection is closed (an idle
            one is closed without an answer).
        max_request_bytes: the largest request body (else 413); a chunked body too.
    """

    max_connections: int = 100
    read_timeout: float = 10.0
    max_request_bytes: int = 1 << 20

    def __post_init__(self):
        for name in ("max_connections", "read_timeout", "max_request_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r} must be a number > 0.")


def _json(status, payload, headers=None):
    body = compact_json(payload).encode("utf-8")
    return Response(body, status, headers=headers, media_type="application/json")


def _error(error, api, headers=None, close=False):
    """An `APIError` in `api`'s shape; `close` ends the connection after it."""
    headers = dict(headers or {})
    if close or error.status in (408, 413):  # what is left of the body is unknown
        headers["Connection"] = "close"
    return _json(error.status, error.body(api), headers)


def _event(value):
    return f"data: {compact_json(value)}\n\n".encode()


def _target(request):
    """The request target as sent (path and query, undecoded), for messages."""
    query = request.scope.get("query_string", b"")
    return request.scope["raw_path"].decode("latin-1") + ("?" + query.decode("latin-1") if query else "")


def _model_spec(request):
    return ModelSpec(request.path_params["name"], request.path_params.get("version"))


class _EventStream(StreamingResponse):
    """OpenAI's chunks as server-sent events: `data: {json}` as each chunk is made (one model step
    in a worker thread), then `data: [DONE]`; a failure mid-stream becomes the last event.

    When the client goes away, Starlette cancels the stream; the step in progress finishes (its
    thread is not abandoned), no other starts, and `chunks` is closed, which stops the decoding.
    """

    def __init__(self, chunks, in_thread):
        self.chunks = chunks
        super().__init__(self._events(in_thread), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, in_thread):
        try:
            while (chunk := await in_thread(next, self.chunks, None)) is not None:
                yield _event(chunk.to_json())
            yield b"data: [DONE]\n\n"
        except Exception as error:  # noqa: BLE001  (mid-stream: the error becomes the last event)
            yield _event(APIError.of(error).body(API.OPENAI))

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.chunks.close()  # no step runs now: a cancelled wait for a thread waits for its end


class _Endpoint:
    """One route as an ASGI app: its `method` (GET also answers HEAD; None: no route, 404), its
    `api` (the shape of its errors) and `handler(request) -> Response`."""

    def __init__(self, app, method, api, handler):
        self.app, self.method, self.api, self.handler = app, method, api, handler

    async def __call__(self, scope, receive, send):
        response = await self._respond(Request(scope, receive))
        await response(scope, receive, send)

    async def _respond(self, request):
        limits, method = self.app.limits, request.method
        if self.app.open_connections() > limits.max_connections:
            return _error(APIError(f"The server is busy: {limits.max_connections} connections are open "
                                   "(--max-connections); retry later.", 503), self.api, close=True)
        if method not in _METHODS:
            return _error(APIError(f"Unsupported method ({method!r}): Server does not support this "
                                   "operation", 501), self.api)
        if self.method is None:
            return _error(APIError(f"Malformed request: {method} {_target(request)}", 404), self.api)
        if method != self.method and not (self.method == "GET" and method == "HEAD"):
            allowed = "GET, HEAD" if self.method == "GET" else self.method
            error = APIError(f"Method {method} is not allowed on {_target(request)}; use {allowed}.", 405)
            return _error(error, self.api, {"Allow": allowed})
        try:
            return await self.handler(request)
        except APIError as error:
            return _error(error, self.api)
        except Exception as error:  # noqa: BLE001  (a bug must not kill the server)
            logger.exception("kgpt serve: %s %s failed", method, _target(request))
            return _error(APIError.of(error), self.api)


class _App:
    """The routes of `kgpt serve` over a `ModelServer`, as a Starlette app (`starlette`)."""

    def __init__(self, model, limits, open_connections):
        self.model = model
        self.limits = limits
        self.open_connections = open_connections
        self._limiter = None  # made in the server's event loop
        self._page = importlib.resources.files("kgpt.serving").joinpath("playground.html").read_bytes()
        tf_serving, openai = API.TF_SERVING, API.OPENAI
        model_path, version_path = "/v1/models/{name:kgpt_name}", "/versions/{version:kgpt_version}"
        table = [
            ("/", "GET", tf_serving, self._playground),
            ("/index.html", "GET", tf_serving, self._playground),
            ("/v1/models", "GET", openai, self._models),
            ("/v1/completions", "POST", openai, self._completions),
            (model_path + ":predict", "POST", tf_serving, self._predict),
            (model_path + version_path + ":predict", "POST", tf_serving, self._predict),
            (model_path + "/metadata", "GET", tf_serving, self._metadata),
            (model_path + version_path + "/metadata", "GET", tf_serving, self._metadata),
            (model_path, "GET", tf_serving, self._status),
            (model_path + version_path, "GET", tf_serving, self._status),
            ("/tokenize", "POST", openai, self._tokenize),  # vLLM's tokenizer routes
            ("/detokenize", "POST", openai, self._detokenize),
            ("/tokenizer_info", "GET", openai, self._tokenizer_info),
            ("/{path:path}", None, tf_serving, None),
        ]
        routes = [Route(path, _Endpoint(self, method, api, handler)) for path, method, api, handler in table]
        self.starlette = Starlette(routes=routes)

    async def in_thread(self, function, *args):
        """`function(*args)` in a worker thread (model calls block); at most one per connection."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.limits.max_connections)
        return await anyio.to_thread.run_sync(function, *args, limiter=self._limiter)

    async def _body(self, request):
        """The request body, within `max_request_bytes` (else 413) and the request's deadline, which
        `BoundedProtocol` set `read_timeout` after its connection or previous answer (else 408)."""
        limit, timeout = self.limits.max_request_bytes, self.limits.read_timeout
        length = request.headers.get("content-length")  # digits: uvicorn refuses others
        if length is not None and int(length) > limit:
            raise APIError(f"Request body of {length} bytes exceeds the limit of {limit}.", 413)
        chunks, received = [], 0
        try:
            with anyio.fail_after(max(0.0, request.state.deadline - anyio.current_time())):
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > limit:
                        raise APIError(f"Request body exceeds the limit of {limit} bytes.", 413)
                    chunks.append(chunk)
        except TimeoutError:
            of = "" if length is None else f" of {length}"
            raise APIError(f"Request incomplete: {received}{of} bytes of its body arrived within "
                           f"{timeout:g} s (--read-timeout).", 408) from None
        except ClientDisconnect:
            raise APIError("The client closed the connection before its request body arrived.") from None
        return b"".join(chunks)

    async def _playground(self, request):
        return Response(self._page, media_type="text/html")

    async def _status(self, request):
        return _json(200, self.model.tf_serving().status(_model_spec(request)).to_json())

    async def _metadata(self, request):
        return _json(200, self.model.tf_serving().metadata(_model_spec(request)).to_json())

    async def _predict(self, request):
        rest, model = self.model.tf_serving(), _model_spec(request)
        rest.check_model(model)
        body = await self._body(request)
        answer = await self.in_thread(
            lambda: rest.predict(PredictRequest.parse(model, body, rest.default_signature)))
        return _json(200, answer.to_json())

    async def _models(self, request):
        return _json(200, self.model.openai().models().to_json())

    async def _completions(self, request):
        completions = self.model.openai()
        parsed = CompletionRequest.parse(parse_json(await self._body(request)), completions.name)
        if not parsed.stream:
            return _json(200, (await self.in_thread(completions.create, parsed)).to_json())
        return _EventStream(await self.in_thread(completions.stream, parsed), self.in_thread)

    async def _tokenize(self, request):
        tokenization = self.model.tokenizer()
        parsed = TokenizeRequest.parse(parse_json(await self._body(request)), tokenization.name)
        return _json(200, (await self.in_thread(tokenization.tokenize, parsed)).to_json())

    async def _detokenize(self, request):
        tokenization = self.model.tokenizer()
        parsed = DetokenizeRequest.parse(parse_json(await self._body(request)), tokenization.name,
                                         tokenization.generator.vocabulary_size)
        return _json(200, (await self.in_thread(tokenization.detokenize, parsed)).to_json())

    async def _tokenizer_info(self, request):
        return _json(200, (await self.in_thread(self.model.tokenizer().info)).to_json())


class Server:
    """uvicorn serving `kgpt serve`'s app on a socket bound when the server is made.

    `serve_forever()` runs it until `shutdown()` (from another thread) or Ctrl-C; `server_close()`
    releases the socket. `model` is the `ModelServer`, `server_address` the bound `(host, port)`.
    """

    def __init__(self, model, sock, limits):
        self.model = model
        self.socket = sock
        self.limits = limits
        app = _App(model, limits, self.open_connections)
        config = uvicorn.Config(
            app.starlette, http=functools.partial(BoundedProtocol, limits=limits), interface="asgi3",
            lifespan="off", log_config=None, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
            access_log=False, proxy_headers=False, server_header=False, headers=[("Server", "kgpt-serve")],
            timeout_keep_alive=limits.read_timeout, timeout_graceful_shutdown=_SHUTDOWN_GRACE,
        )
        self._uvicorn = uvicorn.Server(config)
        self._stopped = threading.Event()

    @property
    def server_address(self):
        return self.socket.getsockname()[:2]

    def open_connections(self):
        """Connections open now, idle ones and ones still sending included (not ones closing)."""
        return sum(not peer.transport.is_closing() for peer in self._uvicorn.server_state.connections)

    def serve_forever(self):
        self._stopped.clear()
        try:
            asyncio.run(self._uvicorn.serve(sockets=[self.socket]))
        finally:
            self._stopped.set()

    def shutdown(self):
        """Stops `serve_forever` (requests in flight get `_SHUTDOWN_GRACE` seconds) and waits for it."""
        self._uvicorn.should_exit = True
        self._stopped.wait()

    def server_close(self):
        self.socket.close()


def _bind(host, port):
    """A listening TCP socket on `host:port`; `ValueError` with a fix if there is none."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, protocol)
    except OSError as error:
        raise ValueError(f"Cannot listen on {host}:{port}: {error.strerror or error}; pass another "
                         "--host.") from error
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)  # the backlog: bursts of clients wait instead of being reset
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise ValueError(
                f"port {port} on {host} is in use; stop the process that holds it (e.g. another "
                "kgpt serve or TF Serving) or pass another --port (0 picks a free one)."
            ) from error
        raise ValueError(
            f"Cannot listen on {host}:{port}: {error.strerror or error}; pass another --host or "
            "--port (ports below 1024 need privileges)."
        ) from error
    return sock


def make_server(model_dir, host="127.0.0.1", port=8501, name=None, max_connections=100, read_timeout=10.0,
                max_request_bytes=1 << 20, **kwargs):
    """A `Server` (not started) for `model_dir`, its `ModelServer` as `server.model`.

    `port=0` picks a free port; `max_connections`, `read_timeout` and `max_request_bytes` are its
    `Limits`; `kwargs` go to `ModelServer`. An address that cannot be bound raises `ValueError`.

    Example:
        server = make_server("saved_models/shakespeare", port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        ...
        server.shutdown(); server.server_close()
    """
    limits = Limits(max_connections, read_timeout, max_request_bytes)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        # Checked here: the socket layer would bind `port % 65536` without a word.
        raise ValueError(f"port={port!r} is out of range; choose 0 to 65535 (0 picks a free one).")
    sock = _bind(host, port)
    try:
        return Server(ModelServer(model_dir, name=name, **kwargs), sock, limits)
    except BaseException:
        sock.close()
        raise


def exposure_warning(host):
    """One line of warning when `host` is reachable beyond this machine, else None."""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        local = False
    if local:
        return None
    return (
        f"kgpt serve: warning: listening on {host}, beyond this machine; the development server has "
        "no authentication and no TLS: put it behind a proxy that has them, or use TF Serving."
    )


def serve(model_dir, host="127.0.0.1", port=8501, name=None, **kwargs):
    """Runs the development server until Ctrl-C (`kgpt serve`)."""
    server = make_server(model_dir, host=host, port=port, name=name, **kwargs)
    model = server.model
    warning = exposure_warning(host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    root = f"http://{host}:{server.server_address[1]}"
    address = f"{root}/v1/models/{model.name}"
    lines = [f"kgpt serve: DEVELOPMENT server for {model.path} (version {model.version}) at {root}"]
    if model.rest is not None:
        lines += [
            f"  TF Serving's REST API: {address}; TensorFlow Serving is the production path:",
            f"  docker run -p 8501:8501 -v \"{os.path.abspath(os.path.dirname(model.path))}:"
            f"/models/{model.name}\" -e MODEL_NAME={model.name} tensorflow/serving:2.20.0",
            f"  try: curl -d '{{\"instances\": [\"Hello\"]}}' {address}:predict",
        ]
    if model.completions is not None:
        lines += [
            f"  OpenAI completions: {root}/v1 (model {model.name!r}); playground: {root}/",
            f"  try: curl {root}/v1/completions -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{model.name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'",
        ]
    if model.tokenization is not None:
        lines.append(f"  tokenizer: POST {root}/tokenize and /detokenize, GET /tokenizer_info")
    print("\n".join(lines), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
