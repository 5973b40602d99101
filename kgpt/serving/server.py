"""`kgpt serve`: a local development server speaking TensorFlow Serving's REST API
(`kgpt.model_server`) and OpenAI's completions API (`kgpt.openai_api`), with a playground at `/`.

It serves an export's highest version with TF Serving's URLs, formats and errors, for trying it
without docker, and an export or a run directory over `/v1/completions`.
"""

import errno
import importlib.resources
import ipaddress
import json
import os
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kgpt.serving.openai_api import OpenAIError, server_sent_events
from kgpt.serving.rest import PREDICT_PATH, STATUS_PATH, ModelServer, RequestError, parse_json

# OpenAI's routes and the playground: path -> allowed method.
_OPENAI = {"/v1/completions": "POST", "/v1/models": "GET"}
_PLAYGROUND = ("/", "/index.html")


class _Handler(BaseHTTPRequestHandler):
    """TF Serving's REST routes, answered by `self.server.model` (a `ModelServer`), OpenAI's by its
    `completions`, and the playground page; every other answer, errors included, is JSON."""

    server_version = "kgpt-serve"
    protocol_version = "HTTP/1.1"

    def setup(self):
        self.timeout = self.server.read_timeout  # idle keep-alive connections close after it too
        super().setup()

    def _send(self, status, payload, headers=(), content_type="application/json"):
        body = payload if isinstance(payload, bytes) else json.dumps(
            payload, ensure_ascii=False, indent=1).encode("utf-8")
        self.send_response(status)
        for header in headers:
            self.send_header(*header)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status, message, headers=()):
        """An error in the route's shape: OpenAI's `{"error": {...}}` or TF Serving's `{"error": "..."}`."""
        if self.path.split("?")[0] in _OPENAI:
            return self._send(status, OpenAIError(message, status=status).body(), headers)
        self._send(status, {"error": message}, headers)

    def send_error(self, code, message=None, explain=None):
        """The standard library's own refusals (a bad request line, an unknown method, ...) as JSON."""
        self.close_connection = True
        short, long = self.responses.get(code, ("Error", ""))
        try:
            self._error(code, f"{message or short}: {explain or long}".rstrip(": "))
        except OSError:
            pass

    def _answer(self, work):
        try:
            self._send(200, work())
        except RequestError as error:
            self._send(error.status, {"error": str(error)})
        except Exception as error:  # noqa: BLE001  (a bug must not kill the server)
            self._send(500, {"error": f"{type(error).__name__}: {error}"})

    def do_GET(self):  # noqa: N802
        path = self.path.split("?")[0]
        if path in _PLAYGROUND:
            page = importlib.resources.files("kgpt.serving").joinpath("playground.html").read_bytes()
            return self._send(200, page, content_type="text/html; charset=utf-8")
        if _OPENAI.get(path) == "POST":
            return self._refuse_method()
        if path in _OPENAI:
            return self._openai(lambda completions: completions.models())
        match = STATUS_PATH.match(self.path)
        if not match:
            return self._send(404, {"error": f"Malformed request: {self.command} {self.path}"})
        name, version, metadata = match.groups()
        method = self.server.model.metadata if metadata else self.server.model.status
        self._answer(lambda: method(name, version))

    def do_HEAD(self):  # noqa: N802  (GET's status and headers, without the body)
        posts = PREDICT_PATH.match(self.path) or _OPENAI.get(self.path.split("?")[0]) == "POST"
        return self._refuse_method() if posts else self.do_GET()

    def do_POST(self):  # noqa: N802
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            return self._error(411, "A Content-Length header is required.")
        limit = self.server.model.max_request_bytes
        if int(length) > limit:
            self.close_connection = True
            return self._error(413, f"Request body of {length} bytes exceeds the limit of {limit}.")
        body = self._read_body(int(length))
        if body is None:
            return
        if self.path.split("?")[0] == "/v1/completions":
            return self._openai(lambda completions: completions.create(parse_json(body)))
        match = PREDICT_PATH.match(self.path)
        if not match:
            return self._send(404, {"error": f"Malformed request: POST {self.path}"})
        self._answer(lambda: self.server.model.predict(match.group(1), match.group(2), body))

    def _openai(self, work):
        """OpenAI's routes: `work(completions)` gives a JSON object, or an iterator of events to stream."""
        completions = self.server.model.completions
        try:
            if completions is None:
                raise OpenAIError(
                    f"{self.server.model.path} has no 'generate' signature, which completions need; "
                    "serve a kgpt export or a run directory.", status=404, code="model_not_found")
            answer = work(completions)
        except RequestError as error:  # the request body is not JSON
            return self._send(error.status, OpenAIError(str(error), status=error.status).body())
        except OpenAIError as error:
            return self._send(error.status, error.body())
        except Exception as error:  # noqa: BLE001  (a bug must not kill the server)
            error = OpenAIError(f"{type(error).__name__}: {error}", status=500, kind="server_error")
            return self._send(500, error.body())
        if isinstance(answer, dict):
            return self._send(200, answer)
        self._stream(answer)

    def _stream(self, events):
        """Server-sent events, each written as soon as it is made; the connection closes after
        `data: [DONE]` (no length to announce). A client that leaves stops the decoding."""
        self.close_connection = True
        self.send_response(200)
        for header in [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                       ("Connection", "close"), ("X-Accel-Buffering", "no")]:
            self.send_header(*header)
        self.end_headers()
        try:
            try:
                for chunk in server_sent_events(events):
                    self.wfile.write(chunk)
            except OSError:
                return  # the client went away
            except Exception as error:  # noqa: BLE001  (mid-stream: the error becomes the last event)
                body = (error if isinstance(error, OpenAIError) else
                        OpenAIError(f"{type(error).__name__}: {error}", kind="server_error")).body()
                try:
                    self.wfile.write(f"data: {json.dumps(body)}\n\n".encode())
                except OSError:
                    pass
        finally:
            events.close()

    def _read_body(self, length):
        """The body, read within `read_timeout` seconds in all (a client that stalls mid-upload
        gets 408 and is disconnected); None after a 408."""
        deadline = time.monotonic() + self.server.read_timeout
        chunks, left = [], length
        try:
            while left:
                self.connection.settimeout(max(deadline - time.monotonic(), 1e-3))
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    raise TimeoutError
                chunks.append(chunk)
                left -= len(chunk)
        except TimeoutError:
            self.close_connection = True
            received = length - left
            message = (f"Request body incomplete: {received} of {length} bytes arrived within "
                       f"{self.server.read_timeout:g} s (--read-timeout).")
            try:
                self._error(408, message)
            except OSError:
                pass
            return None
        finally:
            self.connection.settimeout(self.server.read_timeout)
        return b"".join(chunks)

    def _refuse_method(self):
        """405 with `Allow` on the known routes (the body is not read, so the connection closes)."""
        self.close_connection = True
        path = self.path.split("?")[0]
        if PREDICT_PATH.match(self.path) or _OPENAI.get(path) == "POST":
            allowed = "POST"
        elif STATUS_PATH.match(self.path) or path in _OPENAI or path in _PLAYGROUND:
            allowed = "GET, HEAD"
        else:
            return self._send(404, {"error": f"Malformed request: {self.command} {self.path}"})
        self._error(405, f"Method {self.command} is not allowed on {self.path}; use {allowed}.",
                    headers=[("Allow", allowed)])

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse_method

    def log_message(self, format, *args):  # noqa: A002
        pass


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` of them; one more gets a 503 at once."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog; the standard library's 5 resets bursts of clients

    def __init__(self, address, model, max_connections, read_timeout):
        for name, value in [("max_connections", max_connections), ("read_timeout", read_timeout)]:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r} must be a number > 0.")
        self.model = model
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self._connections = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        if not self._connections.acquire(blocking=False):
            return self._refuse(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def _refuse(self, request):
        """503 from the accepting thread, without reading the request (it never blocks for long)."""
        body = json.dumps({"error": (
            f"The server is busy: {self.max_connections} connections are open "
            "(--max-connections); retry later."
        )}).encode("utf-8")
        head = (f"HTTP/1.1 {HTTPStatus.SERVICE_UNAVAILABLE.value} Service Unavailable\r\n"
                "Content-Type: application/json\r\nConnection: close\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("ascii")
        try:
            request.settimeout(1.0)
            request.sendall(head + body)
            request.shutdown(socket.SHUT_WR)
            request.setblocking(False)
            while request.recv(1 << 16):  # what has arrived of the request, so close sends no reset
                pass
        except OSError:
            pass
        request.close()


def make_server(model_dir, host="127.0.0.1", port=8501, name=None, max_connections=100, read_timeout=10.0,
                **kwargs):
    """A `ThreadingHTTPServer` (not started) serving `model_dir`, its `ModelServer` as `server.model`.

    `port=0` picks a free port; `kwargs` go to `ModelServer`. At most `max_connections` are
    served at once (one more gets 503); a request must arrive within `read_timeout` seconds (else
    408), which also closes idle connections. An address that cannot be bound raises `ValueError`.

    Example:
        server = make_server("saved_models/shakespeare", port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    """
    model = ModelServer(model_dir, name=name, **kwargs)
    try:
        server = _Server((host, port), model, max_connections, read_timeout)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ValueError(
                f"port {port} on {host} is in use; stop the process that holds it (e.g. another "
                "kgpt serve or TF Serving) or pass another --port (0 picks a free one)."
            ) from error
        raise ValueError(
            f"Cannot listen on {host}:{port}: {error.strerror or error}; pass another --host or "
            "--port (ports below 1024 need privileges)."
        ) from error
    return server


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
    if model.module is not None:
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
    print("\n".join(lines), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
