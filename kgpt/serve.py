"""`kgpt serve`: a local development server speaking TensorFlow Serving's REST API.

It serves an export's highest version with TF Serving's URLs, formats and errors, for trying it
without docker. One leniency: inputs a request leaves out take the SignatureDef's defaults.
"""

import base64
import errno
import ipaddress
import json
import os
import re
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import tensorflow as tf
from google.protobuf import json_format

from kgpt.batching import PADDED_OUTPUTS, Busy, Scheduler, batch_key, batch_rows
from kgpt.export import _read_saved_model, saved_model_version_path

_PREDICT = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?:predict$")
_STATUS = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?(/metadata)?$")
# Deep enough for any tensor (TensorFlow's rank limit is far below) inside a request object.
MAX_JSON_DEPTH = 100


class RequestError(Exception):
    """A request TF Serving would refuse: HTTP `status` and the `{"error": ...}` message."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def _decode_value(value):
    """JSON -> Python values for `np.array`: `{"b64": ...}` objects become bytes."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            return base64.b64decode(value["b64"])
        raise RequestError("JSON objects are only allowed as {\"b64\": ...} inside a tensor.")
    if isinstance(value, list):
        return [_decode_value(item) for item in value]
    if isinstance(value, str):
        return value.encode("utf-8")
    return value


def _to_json(array):
    """NumPy -> JSON values; strings are UTF-8 (the export already replaced invalid bytes)."""
    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind == "S":
        strings = [b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b) for b in array.flat]
        return np.array(strings, dtype=object).reshape(array.shape).tolist()
    return array.tolist()


def _error_message(error):
    """TF Serving's one-line message for a failed op: the assertion text, not the graph trace."""
    message = error.message
    match = re.search(r"assertion failed: \[(.*?)\] \[Condition", message, re.DOTALL)
    if match:
        return match.group(1).rstrip(". ")
    return message.splitlines()[-1] if "Graph execution error" in message else message


def _parse_json(body):
    """The request object; nesting deeper than `MAX_JSON_DEPTH` is refused before it can recurse."""
    deep = f"JSON Parse error: nested deeper than {MAX_JSON_DEPTH} levels; send tensors as nested lists"
    try:
        value = json.loads(body)
    except RecursionError as error:  # deeper than Python's recursion limit
        raise RequestError(deep) from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(f"JSON Parse error: {error}") from error
    level, containers = 0, [value]
    while containers:  # breadth first, one level at a time, without recursion
        level += 1
        if level > MAX_JSON_DEPTH:
            raise RequestError(deep)
        containers = [
            item for container in containers if isinstance(container, (list, dict))
            for item in (container.values() if isinstance(container, dict) else container)
            if isinstance(item, (list, dict))
        ]
    return value


def _plain(value, signature_def, message):
    """`{the only input: value}`; a signature of several inputs refuses a plain value with `message`."""
    if len(signature_def.inputs) > 1:
        raise RequestError(f"{message} as multiple input tensors required as per tensorinfo_map")
    return {next(iter(signature_def.inputs)): value}


class ModelServer:
    """Loads the highest version of `model_dir` and answers TF Serving REST requests.

    Args:
        model_dir: `saved_models/NAME` (numbered version folders) or one version folder.
        name: the name in URLs; default: the model folder's name.
        max_concurrent_requests: model calls run at once; other requests wait up to `queue_timeout`
            seconds in a queue of at most `max_queued_requests` (then: 503).
        batching: run concurrent requests of one signature and equal options as one call (rows
            concatenated, at most `max_batch_size`, after waiting `batch_timeout` seconds for more),
            as TF Serving's `--enable_batching` does; greedy only, so the answers stay the same.
    """

    def __init__(self, model_dir, name=None, max_concurrent_requests=4, max_request_bytes=1 << 20,
                 queue_timeout=30.0, max_queued_requests=64, batching=True, max_batch_size=32,
                 batch_timeout=0.005):
        import tensorflow_text  # noqa: F401  (registers the tokenizer ops)

        self.path = saved_model_version_path(os.path.normpath(model_dir))
        version_dir = os.path.basename(self.path)
        numbered = version_dir.isdigit()
        self.version = version_dir if numbered else "1"
        self.name = name or os.path.basename(os.path.dirname(self.path) if numbered else self.path)
        self.module = tf.saved_model.load(self.path)
        signature_defs = _read_saved_model(self.path).meta_graphs[0].signature_def
        # Not `__saved_model_init_op`: TF Serving neither lists nor runs it.
        self.signature_defs = {k: v for k, v in signature_defs.items() if not k.startswith("__")}
        self.max_request_bytes = max_request_bytes
        self.scheduler = Scheduler(
            max_concurrent_calls=max_concurrent_requests, max_queued_requests=max_queued_requests,
            timeout=queue_timeout, batching=batching, max_batch_size=max_batch_size,
            batch_timeout=batch_timeout,
        )
        self._batch_rows = {key: batch_rows(value) for key, value in self.signature_defs.items()}

    def _check_model(self, name, version):
        if name != self.name or (version is not None and version != self.version):
            wanted = f"Specific({name}, {version})" if version else f"Latest({name})"
            raise RequestError(f"Servable not found for request: {wanted}", status=404)

    def status(self, name, version=None):
        self._check_model(name, version)
        status = {"error_code": "OK", "error_message": ""}
        return {"model_version_status": [{"version": self.version, "state": "AVAILABLE", "status": status}]}

    def metadata(self, name, version=None):
        self._check_model(name, version)
        signatures = {
            key: json_format.MessageToDict(value, preserving_proto_field_name=True)
            for key, value in self.signature_defs.items()
        }
        return {
            "model_spec": {"name": self.name, "signature_name": "", "version": self.version},
            "metadata": {"signature_def": {"signature_def": signatures}},
        }

    def predict(self, name, version, body):
        self._check_model(name, version)
        request = _parse_json(body)
        if not isinstance(request, dict):
            raise RequestError("JSON Value: request must be an object with 'instances' or 'inputs'.")
        signature_name = request.get("signature_name") or "serving_default"
        if signature_name not in self.signature_defs:
            raise RequestError(f'Serving signature name: "{signature_name}" not found in signature def')
        signature_def = self.signature_defs[signature_name]
        row_format = "instances" in request
        if row_format == ("inputs" in request):
            raise RequestError(
                "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist"
                if row_format
                else "Missing 'inputs' or 'instances' key"
            )
        read, key = (self._rows, "instances") if row_format else (self._columns, "inputs")
        arrays = self._tensors(read(request[key], signature_def), signature_def)
        try:
            batch_input = self._batch_rows[signature_name]
            outputs = self.scheduler.run(
                self._call(signature_name), arrays, rows=batch_input, padded=PADDED_OUTPUTS,
                key=batch_key(signature_name, batch_input, arrays),
            )
        except Busy as error:
            raise RequestError(str(error), status=503) from error
        except tf.errors.InvalidArgumentError as error:
            raise RequestError(_error_message(error)) from error
        outputs = dict(sorted(outputs.items()))
        answer = "predictions" if row_format else "outputs"
        if len(outputs) == 1:
            return {answer: _to_json(next(iter(outputs.values())))}
        if row_format:
            rows = range(len(next(iter(outputs.values()))))
            return {answer: [{key: _to_json(value[row]) for key, value in outputs.items()} for row in rows]}
        return {answer: {key: _to_json(value) for key, value in outputs.items()}}

    def _call(self, signature_name):
        signature = self.module.signatures[signature_name]

        def call(arrays):
            outputs = signature(**{key: tf.constant(value) for key, value in arrays.items()})
            return {key: value.numpy() for key, value in outputs.items()}

        return call

    @staticmethod
    def _rows(instances, signature_def):
        if not isinstance(instances, list):
            raise RequestError("Excepting 'instances' to be an list/array")
        if not instances:
            raise RequestError("No values in 'instances' array")
        if not isinstance(instances[0], dict) or set(instances[0]) == {"b64"}:
            message = "instances is a plain list, but expecting list of objects"
            return _plain(instances, signature_def, message)
        columns = {}
        for index, instance in enumerate(instances):
            if not isinstance(instance, dict):
                raise RequestError(f"Expecting object but got list at item {index} of input list")
            for key, value in instance.items():
                columns.setdefault(key, []).append(value)
        if any(len(values) != len(instances) for values in columns.values()):
            raise RequestError("Every object in 'instances' needs the same named inputs.")
        return columns

    @staticmethod
    def _columns(inputs, signature_def):
        if isinstance(inputs, dict) and set(inputs) != {"b64"}:
            return inputs
        return _plain(inputs, signature_def, "inputs is a plain value/list, but expecting an object")

    @staticmethod
    def _tensors(inputs, signature_def):
        tensors = {}
        for key in inputs:
            if key not in signature_def.inputs:
                raise RequestError(
                    f"Inputs contains invalid name: {key}; expected {sorted(signature_def.inputs)}"
                )
        for key, info in signature_def.inputs.items():
            dtype = tf.dtypes.as_dtype(info.dtype)
            if key in inputs:
                try:
                    numpy_dtype = object if dtype == tf.string else dtype.as_numpy_dtype
                    tensor = np.array(_decode_value(inputs[key]), dtype=numpy_dtype)
                    tf.constant(tensor, dtype)  # refuses what TensorFlow would
                except (TypeError, ValueError, OverflowError) as error:
                    message = f"Input {key!r} is not a valid {dtype.name} tensor: {error}"
                    raise RequestError(message) from error
            elif key in signature_def.defaults:
                tensor = tf.make_ndarray(signature_def.defaults[key])
            else:
                raise RequestError(f"Missing named input: {key} in 'inputs' object.")
            shape = tf.TensorShape(info.tensor_shape)
            if not shape.is_compatible_with(tensor.shape):
                raise RequestError(
                    f"Input {key!r} has shape {list(tensor.shape)}; the signature expects "
                    f"{shape.as_list() if shape.rank is not None else 'any'} (-1/None: any size)."
                )
            tensors[key] = tensor
        return tensors


class _Handler(BaseHTTPRequestHandler):
    """TF Serving's REST routes, answered by `self.server.model` (a `ModelServer`); every answer,
    errors included, is JSON."""

    server_version = "kgpt-serve"
    protocol_version = "HTTP/1.1"

    def setup(self):
        self.timeout = self.server.read_timeout  # idle keep-alive connections close after it too
        super().setup()

    def _send(self, status, payload, headers=()):
        body = json.dumps(payload, ensure_ascii=False, indent=1).encode("utf-8")
        self.send_response(status)
        for header in headers:
            self.send_header(*header)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        """The standard library's own refusals (a bad request line, an unknown method, ...) as JSON."""
        self.close_connection = True
        short, long = self.responses.get(code, ("Error", ""))
        try:
            self._send(code, {"error": f"{message or short}: {explain or long}".rstrip(": ")})
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
        match = _STATUS.match(self.path)
        if not match:
            return self._send(404, {"error": f"Malformed request: {self.command} {self.path}"})
        name, version, metadata = match.groups()
        method = self.server.model.metadata if metadata else self.server.model.status
        self._answer(lambda: method(name, version))

    def do_HEAD(self):  # noqa: N802  (GET's status and headers, without the body)
        return self._refuse_method() if _PREDICT.match(self.path) else self.do_GET()

    def do_POST(self):  # noqa: N802
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            return self._send(411, {"error": "A Content-Length header is required."})
        limit = self.server.model.max_request_bytes
        if int(length) > limit:
            self.close_connection = True
            return self._send(413, {"error": f"Request body of {length} bytes exceeds the limit of {limit}."})
        body = self._read_body(int(length))
        if body is None:
            return
        match = _PREDICT.match(self.path)
        if not match:
            return self._send(404, {"error": f"Malformed request: POST {self.path}"})
        self._answer(lambda: self.server.model.predict(match.group(1), match.group(2), body))

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
                self._send(408, {"error": message})
            except OSError:
                pass
            return None
        finally:
            self.connection.settimeout(self.server.read_timeout)
        return b"".join(chunks)

    def _refuse_method(self):
        """405 with `Allow` on TF Serving's routes (the body is not read, so the connection closes)."""
        self.close_connection = True
        if _PREDICT.match(self.path):
            allowed = "POST"
        elif _STATUS.match(self.path):
            allowed = "GET, HEAD"
        else:
            return self._send(404, {"error": f"Malformed request: {self.command} {self.path}"})
        self._send(405, {"error": f"Method {self.command} is not allowed on {self.path}; use {allowed}."},
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
    address = f"http://{host}:{server.server_address[1]}/v1/models/{model.name}"
    print(
        f"kgpt serve: DEVELOPMENT server for {model.path} (version {model.version}) at {address}\n"
        "  TensorFlow Serving is the production path:\n"
        f"  docker run -p 8501:8501 -v \"{os.path.abspath(os.path.dirname(model.path))}:"
        f"/models/{model.name}\" -e MODEL_NAME={model.name} tensorflow/serving:2.20.0\n"
        f"  try: curl -d '{{\"instances\": [\"Hello\"]}}' {address}:predict",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
