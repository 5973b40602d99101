"""`kgpt serve` over loopback: TF Serving's REST URLs, JSON formats, status codes and errors.

The default run serves a small hand-made SavedModel (string signatures, one with a recorded
default), which exercises every path of the server in about a second; the test marked `export`
serves a real `kgpt export` of a tiny model.
"""

import base64
import contextlib
import http.client
import json
import logging
import pathlib
import select
import socket
import struct
import threading
import time

import pytest
import tensorflow as tf
from test_batching import in_threads  # the one concurrent-start helper

from kgpt.cli import main
from kgpt.serving.server import Server, exposure_warning, make_server


class Echo(tf.Module):
    """`serving_default`: prompts -> prompts + suffix; `repeat`: (prompts, times=2) -> two outputs."""

    def __init__(self, suffix):
        super().__init__()
        prompts = tf.TensorSpec([None], tf.string, name="prompts")
        self.serving_default = tf.function(
            lambda prompts: {"text": prompts + suffix}, input_signature=[prompts]
        )

        def repeat(prompts, times=tf.constant(2)):
            check = tf.debugging.assert_positive(times, message="times must be >= 1")
            with tf.control_dependencies([check]):
                times = tf.identity(times)
            repeated = tf.repeat(prompts[:, None], times, axis=1)
            return {
                "text": tf.strings.reduce_join(repeated, axis=1),
                "length": tf.strings.length(prompts, unit="UTF8_CHAR"),
            }

        self.repeat = tf.function(
            repeat, input_signature=[prompts, tf.TensorSpec([], tf.int32, name="times")]
        )

    def save(self, path):
        tf.saved_model.save(
            self, str(path), signatures={"serving_default": self.serving_default, "repeat": self.repeat}
        )


def start(model_dir, **kwargs):
    server = make_server(str(model_dir), port=0, **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(server):
    server.shutdown()
    server.server_close()


def call(server, method, path, body=None, response_headers=False):
    """Returns (HTTP status, parsed JSON body[, headers, looked up case-insensitively])."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
    try:
        if body is not None and not isinstance(body, (str, bytes)):
            body = json.dumps(body)
        connection.request(method, path, body=body)
        response = connection.getresponse()
        answer = response.status, json.loads(response.read())
        return answer + (response.headers,) if response_headers else answer
    finally:
        connection.close()


def wait_until(condition, seconds=10):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def echo_dir(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("saved_models") / "echo"
    Echo(b"-v1").save(model_dir / "1")
    Echo(b"-v2").save(model_dir / "2")
    (model_dir / ".tmp-9-unfinished").mkdir()  # a half-written export is never served
    return model_dir


@pytest.fixture(scope="module")
def server(echo_dir):
    server = start(echo_dir, max_request_bytes=4096)
    yield server
    stop(server)


def test_status_and_metadata_have_tf_servings_shape(server):
    assert call(server, "GET", "/v1/models/echo") == (
        200,
        {
            "model_version_status": [
                {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
            ]
        },
    )
    assert call(server, "GET", "/v1/models/echo/versions/2")[0] == 200
    status, metadata = call(server, "GET", "/v1/models/echo/metadata")
    assert status == 200
    assert metadata["model_spec"] == {"name": "echo", "signature_name": "", "version": "2"}
    signatures = metadata["metadata"]["signature_def"]["signature_def"]
    assert set(signatures) == {"serving_default", "repeat"}
    prompts = signatures["serving_default"]["inputs"]["prompts"]
    assert prompts["dtype"] == "DT_STRING" and prompts["tensor_shape"] == {"dim": [{"size": "-1"}]}
    assert set(signatures["repeat"]["outputs"]) == {"text", "length"}


def test_predict_with_instances_serves_the_highest_version(server):
    body = {"instances": ["a", "héllo"]}
    assert call(server, "POST", "/v1/models/echo:predict", body) == (
        200, {"predictions": ["a-v2", "héllo-v2"]}
    )
    assert call(server, "POST", "/v1/models/echo/versions/2:predict", body)[0] == 200
    # Only the latest version is loaded, as with TF Serving's default version policy.
    status, answer = call(server, "POST", "/v1/models/echo/versions/1:predict", body)
    assert status == 404 and "Servable not found" in answer["error"]
    # Binary strings as {"b64": ...}.
    encoded = {"instances": [{"b64": base64.b64encode(b"bytes").decode()}]}
    assert call(server, "POST", "/v1/models/echo:predict", encoded)[1] == {"predictions": ["bytes-v2"]}


def test_predict_with_inputs_and_several_outputs(server):
    # Columnar: {"inputs": {...}} -> {"outputs": {name: column}}; `times` takes its default (2).
    body = {"signature_name": "repeat", "inputs": {"prompts": ["ab", "é"]}}
    assert call(server, "POST", "/v1/models/echo:predict", body) == (
        200, {"outputs": {"length": [2, 1], "text": ["abab", "éé"]}}
    )
    body["inputs"]["times"] = 3
    assert call(server, "POST", "/v1/models/echo:predict", body)[1]["outputs"]["text"] == ["ababab", "ééé"]
    # Rows of objects: {"instances": [{...}]} -> {"predictions": [{name: value}]}.
    rows = {"signature_name": "repeat", "instances": [{"prompts": "x"}, {"prompts": "yz"}]}
    assert call(server, "POST", "/v1/models/echo:predict", rows) == (
        200, {"predictions": [{"length": 1, "text": "xx"}, {"length": 2, "text": "yzyz"}]}
    )
    # A single-input signature also takes a plain "inputs" value.
    assert call(server, "POST", "/v1/models/echo:predict", {"inputs": ["q"]}) == (
        200, {"outputs": ["q-v2"]}
    )


def test_answers_are_compact_json_in_utf_8(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        for method, path, body in [("POST", "/v1/models/echo:predict", '{"instances": ["a", "b"]}'),
                                   ("GET", "/v1/models/echo", None), ("GET", "/v2/none", None)]:
            connection.request(method, path, body=body)
            raw = connection.getresponse().read()
            # One line, no spaces between items: an answer of many token ids is not a line each.
            assert raw == json.dumps(json.loads(raw), separators=(",", ":")).encode()
        assert raw == b'{"error":"Malformed request: GET /v2/none"}'
        connection.request("POST", "/v1/models/echo:predict", body='{"instances": ["héllo"]}'.encode())
        assert connection.getresponse().read() == '{"predictions":["héllo-v2"]}'.encode()
    finally:
        connection.close()


@pytest.mark.parametrize(
    "body, message",
    [
        ('{"instances": [', "JSON Parse error"),
        ("[1, 2]", "must be an object"),
        ({"inputs": ["a"], "instances": ["a"]}, "only one of 'inputs' or 'instances'"),
        ({"prompts": ["a"]}, "Missing 'inputs' or 'instances' key"),
        ({"instances": []}, "No values in 'instances'"),
        ({"signature_name": "nope", "instances": ["a"]}, '"nope" not found'),
        ({"signature_name": "repeat", "instances": ["a"]}, "expecting list of objects"),
        ({"signature_name": "repeat", "inputs": {"prompts": ["a"], "extra": 1}}, "invalid name: extra"),
        ({"signature_name": "repeat", "inputs": {"prompts": ["a"], "times": "x"}}, "not a valid int32"),
        ({"signature_name": "repeat", "inputs": {"prompts": ["a"], "times": [1, 2]}}, "has shape [2]"),
        ({"inputs": {"prompts": [{"x": 1}]}}, "b64"),
    ],
)
def test_malformed_requests_get_400_and_an_error(server, body, message):
    status, answer = call(server, "POST", "/v1/models/echo:predict", body)
    assert status == 400
    assert list(answer) == ["error"] and message in answer["error"]


def test_bad_arguments_get_400_with_the_graphs_message(server):
    body = {"signature_name": "repeat", "inputs": {"prompts": ["a"], "times": 0}}
    assert call(server, "POST", "/v1/models/echo:predict", body) == (
        400, {"error": "times must be >= 1"}
    )


def test_unknown_models_and_paths_get_404(server):
    status, answer = call(server, "POST", "/v1/models/other:predict", {"instances": ["a"]})
    assert status == 404 and answer == {"error": "Servable not found for request: Latest(other)"}
    assert call(server, "GET", "/v1/models/other")[0] == 404
    assert call(server, "GET", "/v1/models/echo/versions/7/metadata")[0] == 404
    assert call(server, "GET", "/v2/anything")[0] == 404
    assert call(server, "POST", "/v1/models/echo:classify", {"instances": ["a"]})[0] == 404


def test_request_size_is_bounded(server):
    status, answer = call(server, "POST", "/v1/models/echo:predict", {"instances": ["x" * 5000]})
    assert status == 413 and "exceeds the limit of 4096" in answer["error"]
    # The server keeps answering afterwards.
    assert call(server, "POST", "/v1/models/echo:predict", {"instances": ["a"]})[0] == 200


def test_concurrent_requests_are_bounded(echo_dir):
    server = start(echo_dir, max_concurrent_requests=1, queue_timeout=0.2)
    try:
        assert server.model.scheduler._slots.acquire(timeout=1)  # one prediction "in flight"
        status, answer = call(server, "POST", "/v1/models/echo:predict", {"instances": ["a"]})
        assert status == 503 and "busy" in answer["error"]
        server.model.scheduler._slots.release()
        assert call(server, "POST", "/v1/models/echo:predict", {"instances": ["a"]})[0] == 200
    finally:
        stop(server)


def test_a_full_queue_gets_503_at_once(echo_dir):
    server = start(echo_dir, max_concurrent_requests=1, max_queued_requests=1, batching=False)
    slots = server.model.scheduler._slots
    try:
        assert slots.acquire(timeout=1)  # one prediction "in flight"
        waiting = threading.Thread(target=call, args=(server, "POST", "/v1/models/echo:predict",
                                                      {"instances": ["a"]}))
        waiting.start()
        wait_until(lambda: server.model.scheduler._queued == 1)
        status, answer = call(server, "POST", "/v1/models/echo:predict", {"instances": ["b"]})
        assert status == 503 and "1 requests already wait (--max-queued-requests 1)" in answer["error"]
        slots.release()
        waiting.join(30)
        assert call(server, "POST", "/v1/models/echo:predict", {"instances": ["a"]})[0] == 200
    finally:
        stop(server)


def test_concurrent_requests_are_batched_with_the_answers_of_unbatched_calls(echo_dir):
    requests = [{"instances": [f"p{i}"] * (1 + i % 2)} for i in range(8)]
    # `repeat` with different `times` must never share a call: the text would repeat wrongly.
    requests += [{"signature_name": "repeat", "inputs": {"prompts": [f"r{i}"], "times": 2 + i % 2}}
                 for i in range(8)]
    requests += [{"signature_name": "repeat", "instances": [{"prompts": "x"}, {"prompts": "yé"}]}]
    unbatched = start(echo_dir, batching=False)
    try:
        expected = [call(unbatched, "POST", "/v1/models/echo:predict", r) for r in requests]
    finally:
        stop(unbatched)
    assert expected[2] == (200, {"predictions": ["p2-v2"]})
    server = start(echo_dir, batch_timeout=1.0, max_batch_size=64)
    try:
        answers = in_threads(lambda r: call(server, "POST", "/v1/models/echo:predict", r),
                             [(r,) for r in requests])
        assert answers == expected
        scheduler = server.model.scheduler
        assert scheduler.requests == len(requests) and scheduler.calls <= 4  # 3 keys: 17 -> 3 calls
    finally:
        stop(server)


@pytest.mark.parametrize("depth", [150, 2000])
def test_json_nested_too_deep_gets_400(server, depth):
    body = '{"instances": ' + "[" * depth + '"a"' + "]" * depth + "}"
    status, answer = call(server, "POST", "/v1/models/echo:predict", body)
    assert status == 400 and answer["error"].startswith("JSON Parse error: nested deeper than 100 levels")
    assert call(server, "POST", "/v1/models/echo:predict", {"instances": ["a"]})[0] == 200


def test_json_nested_100000_deep_gets_400(echo_dir):
    server = start(echo_dir)
    try:
        status, answer = call(server, "POST", "/v1/models/echo:predict", "[" * 100_000 + "]" * 100_000)
        assert status == 400 and "nested deeper than 100 levels" in answer["error"]
    finally:
        stop(server)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
def test_other_methods_get_405_with_allow_or_404_in_json(server, method):
    status, answer, headers = call(server, method, "/v1/models/echo:predict", "{}", response_headers=True)
    assert status == 405 and headers["Allow"] == "POST" and headers["Content-Type"] == "application/json"
    assert answer == {"error": f"Method {method} is not allowed on /v1/models/echo:predict; use POST."}
    status, answer, headers = call(server, method, "/v1/models/echo/metadata", response_headers=True)
    assert status == 405 and headers["Allow"] == "GET, HEAD" and "not allowed" in answer["error"]
    assert call(server, method, "/elsewhere") == (404, {"error": f"Malformed request: {method} /elsewhere"})


def test_unknown_methods_get_501_and_head_gets_the_headers_of_get(server):
    status, answer = call(server, "BREW", "/v1/models/echo")
    assert status == 501 and answer == {"error": "Unsupported method ('BREW'): Server does not support this operation"}
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        connection.request("HEAD", "/v1/models/echo")
        response = connection.getresponse()
        assert response.status == 200 and response.read() == b""
        body = json.dumps(call(server, "GET", "/v1/models/echo")[1], separators=(",", ":"))
        assert int(response.getheader("Content-Length")) == len(body.encode())
        connection.request("HEAD", "/v1/models/echo:predict")
        response = connection.getresponse()
        assert response.status == 405 and response.getheader("Allow") == "POST" and response.read() == b""
    finally:
        connection.close()


def raw_connection(server):
    return socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30)


def read_all(connection):
    data = b""
    while chunk := connection.recv(1 << 16):
        data += chunk
    return data


def send_slowly(connection, *pieces, pause=0.0):
    """Sends `pieces` `pause` seconds apart and reads the answer: `(head, body, seconds taken)`."""
    started = time.monotonic()
    for index, piece in enumerate(pieces):
        if index:
            time.sleep(pause)
        connection.sendall(piece)
    head, _, body = read_all(connection).partition(b"\r\n\r\n")
    return head, body, time.monotonic() - started


def test_a_client_that_stalls_mid_upload_is_dropped(echo_dir):
    server = start(echo_dir, read_timeout=0.5)
    try:
        with raw_connection(server) as stalled:
            head, body, seconds = send_slowly(
                stalled, b"POST /v1/models/echo:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"inst")
            assert 0.4 < seconds < 10
        assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
        assert json.loads(body) == {
            "error": "Request incomplete: 6 of 100 bytes of its body arrived within 0.5 s (--read-timeout)."
        }
        with raw_connection(server) as idle:  # a connection that never sends is closed too
            assert read_all(idle) == b""
        assert call(server, "POST", "/v1/models/echo:predict", {"instances": ["a"]})[0] == 200
    finally:
        stop(server)


def test_a_client_that_sends_its_head_slowly_is_answered_408_and_disconnected(echo_dir):
    server = start(echo_dir, read_timeout=0.5)
    try:
        with raw_connection(server) as slow:  # bytes keep coming, the head never ends
            head, body, seconds = send_slowly(slow, b"GET /v1/models/echo HTTP/1.1\r\n", b"Host: x\r\n", pause=0.3)
            assert 0.4 < seconds < 10
        assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
        assert json.loads(body) == {
            "error": "Request incomplete: its head did not arrive within 0.5 s (--read-timeout)."
        }
        with raw_connection(server) as idle:  # kept alive after an answer, then idle: closed silently
            idle.sendall(b"GET /v1/models/echo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_all(idle).startswith(b"HTTP/1.1 200 ")
        wait_until(lambda: server.open_connections() == 0)
    finally:
        stop(server)


def test_the_read_timeout_bounds_head_and_body_together(echo_dir):
    server = start(echo_dir, read_timeout=1.0)
    try:
        with raw_connection(server) as slow:  # most of the deadline spent on the head
            head, body, seconds = send_slowly(slow, b"POST /v1/models/echo:predict HTTP/1.1\r\n",
                                              b"Host: x\r\nContent-Length: 30\r\n\r\n{", pause=0.7)
            assert seconds < 1.5  # not 0.7 s + another second for the body
        assert head.startswith(b"HTTP/1.1 408 ")
        assert json.loads(body)["error"].startswith("Request incomplete: 1 of 30 bytes of its body")
    finally:
        stop(server)


ILLEGAL_LINE = "Malformed HTTP request: illegal request line."
LINE_TOO_LONG = "The request line is longer than 16384 bytes; send long inputs in a POST body."
MALFORMED = {
    "garbage": (b"GARBAGE\r\n\r\n", 400, ILLEGAL_LINE),
    "NUL in the target": (b"GET /\x00 HTTP/1.1\r\n\r\n", 400, ILLEGAL_LINE),
    "TLS": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, ILLEGAL_LINE),
    "HTTP/9.9": (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 505, "HTTP/9.9 is not supported; use HTTP/1.1."),
    "HTTP/2.0": (b"GET /v1/models/echo HTTP/2.0\r\n\r\n", 505, "HTTP/2.0 is not supported; use HTTP/1.1."),
    "70 KB URL": (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, LINE_TOO_LONG),
    "20 KB URL, unfinished": (b"GET /" + b"a" * 20_000, 414, LINE_TOO_LONG),  # h11's own limit
    "70 KB header": (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n", 431,
                     "The request head is longer than 16384 bytes."),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_request_line_gets_its_status_and_the_connection_closes(server, name, caplog):
    line, status, message = MALFORMED[name]
    with raw_connection(server) as connection:
        connection.sendall(line)
        answer = read_all(connection)  # returns once the server has closed the connection
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status) and b"connection: close" in head.lower()
    assert json.loads(body) == {"error": message}
    # One line in the log, no traceback.
    assert [record.getMessage() for record in caplog.records] == ["Invalid HTTP request received."]
    assert not any(record.exc_info for record in caplog.records)
    assert call(server, "GET", "/v1/models/echo")[0] == 200


def test_clients_that_leave_mid_answer_leave_no_traceback(echo_dir, caplog):
    server = start(echo_dir)
    body = json.dumps({"instances": ["x" * 1000] * 1000})  # an answer of a megabyte
    request = (f"POST /v1/models/echo:predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
               f"{body}").encode()
    try:
        for reset in (False, True):
            for _ in range(3):
                connection = raw_connection(server)
                if reset:  # close with RST: the server's next write fails (EPIPE / ECONNRESET)
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.sendall(request)
                assert connection.recv(100).startswith(b"HTTP/1.1 200 ")
                connection.close()
        assert call(server, "GET", "/v1/models/echo")[0] == 200
    finally:
        stop(server)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING or record.exc_info]


def test_chunked_bodies_are_read_up_to_the_limit(server):
    def post(chunks):
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
        try:  # an iterable body without Content-Length goes chunked
            connection.request("POST", "/v1/models/echo:predict", body=iter(chunks))
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    assert post([b'{"instances": ', b'["a", ', b'"b"]}']) == (200, {"predictions": ["a-v2", "b-v2"]})
    status, answer = post([b'{"instances": ["', b"x" * 3000, b"x" * 3000, b'"]}'])
    assert status == 413 and answer == {"error": "Request body exceeds the limit of 4096 bytes."}


def test_at_the_connection_cap_the_longest_waiting_connection_makes_room(echo_dir):
    server = start(echo_dir, max_connections=2, read_timeout=30)
    stalled = [raw_connection(server) for _ in range(2)]
    try:
        stalled[0].sendall(b"POST /v1/models/echo:predict HTTP/1.1\r\n")  # the oldest, mid-head
        wait_until(lambda: server.open_connections() == 2)  # both held open
        started = time.monotonic()
        assert call(server, "GET", "/v1/models/echo")[0] == 200
        assert time.monotonic() - started < 5
        head, _, body = read_all(stalled[0]).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ")
        assert "2 connections are open (--max-connections)" in json.loads(body)["error"]
        stalled[1].sendall(b"GET /v1/models/echo HTTP/1.1\r\nHost: x\r\n\r\n")  # still served
        assert stalled[1].recv(100).startswith(b"HTTP/1.1 200 ")
        assert threading.active_count() < 50
    finally:
        for connection in stalled:
            connection.close()
        stop(server)


def test_connections_beyond_the_cap_get_503_at_once_when_all_are_being_answered(echo_dir):
    server = start(echo_dir, max_connections=2, max_concurrent_requests=1, queue_timeout=60)
    slots = server.model.scheduler._slots
    assert slots.acquire(timeout=1)  # predictions wait
    waiting = [threading.Thread(target=call, args=(server, "POST", "/v1/models/echo:predict",
                                                   {"instances": ["a"]})) for _ in range(2)]
    try:
        for thread in waiting:
            thread.start()
        wait_until(lambda: server.model.scheduler._queued == 2)
        started = time.monotonic()
        status, answer = call(server, "GET", "/v1/models/echo")
        assert status == 503 and "2 connections are open (--max-connections)" in answer["error"]
        assert time.monotonic() - started < 5
    finally:
        slots.release()
        for thread in waiting:
            thread.join(30)
    try:
        assert call(server, "GET", "/v1/models/echo")[0] == 200
    finally:
        stop(server)


def test_a_slowloris_of_110_connections_does_not_keep_requests_out(echo_dir):
    # The numbers at the default limits (100 connections, --read-timeout 10): 110 clients
    # that each send a header line every 3 s must not keep a normal request waiting 15 s.
    server = start(echo_dir)
    assert server.limits.max_connections == 100 and server.limits.read_timeout == 10
    slow = [raw_connection(server) for _ in range(110)]
    try:
        for connection in slow:
            connection.sendall(b"GET /v1/models/echo HTTP/1.1\r\nHost: x\r\n")
        wait_until(lambda: server.open_connections() <= 100)
        for round_ in range(2):
            started = time.monotonic()
            assert call(server, "GET", "/v1/models/echo")[0] == 200
            assert time.monotonic() - started < 15
            if round_ == 0:
                time.sleep(3)
                for connection in slow:
                    with contextlib.suppress(OSError):  # dropped ones may refuse it
                        connection.sendall(b"X-Slow: 1\r\n")
        # The oldest were closed to make room (with a 503 that says why once they had sent part of
        # their request); the others still wait.
        closed = select.select(slow, [], [], 5)[0]
        assert closed == slow[:11]  # 10, and one for the first request (the second found room)
        assert {read_all(connection)[:13] for connection in closed} <= {b"", b"HTTP/1.1 503 "}
    finally:
        for connection in slow:
            connection.close()
        stop(server)


@pytest.mark.parametrize(
    "host, warns", [("127.0.0.1", False), ("localhost", False), ("::1", False), ("0.0.0.0", True),
                    ("192.168.1.5", True), ("example.org", True)],
)
def test_binding_beyond_localhost_warns(host, warns):
    warning = exposure_warning(host)
    assert (warning is not None) == warns
    if warns:
        assert warning.startswith(f"kgpt serve: warning: listening on {host}, beyond this machine;")
        assert "no authentication and no TLS" in warning and "\n" not in warning


def test_kgpt_serve_warns_on_stderr_when_it_listens_on_every_address(echo_dir, monkeypatch, capsys):
    monkeypatch.setattr(Server, "serve_forever", lambda self: None)  # return at once
    assert main(["serve", str(echo_dir), "--host", "0.0.0.0", "--port", "0", "--no-batching"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("kgpt serve: warning: listening on 0.0.0.0") and captured.err.count("\n") == 1
    assert "DEVELOPMENT server" in captured.out
    assert main(["serve", str(echo_dir), "--port", "0", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size 0 is out of range: it must be an integer >= 1" in capsys.readouterr().err


def test_a_folder_without_a_saved_model_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="No SavedModel"):
        make_server(str(tmp_path), port=0)


def test_a_port_in_use_is_one_line_and_exit_2(server, echo_dir, capsys):
    port = server.server_address[1]  # held by the running server
    assert main(["serve", str(echo_dir), "--port", str(port)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"kgpt serve: error: port {port} on 127.0.0.1 is in use;"), error
    assert error.count("\n") == 1
    with pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is in use; .* --port"):
        make_server(str(echo_dir), port=port)


def test_a_port_out_of_range_is_one_line_not_another_port(echo_dir, capsys):
    # 99999 would otherwise bind 99999 % 65536 = 34463, and the banner would name that port.
    assert main(["serve", str(echo_dir), "--port", "99999"]) == 2
    error = capsys.readouterr().err
    assert error == ("kgpt serve: error: --port 99999 is out of range: it must be an integer from 0 to "
                     "65535; 0 picks a free port.\n")
    with pytest.raises(ValueError, match="port=-1 is out of range"):
        make_server(str(echo_dir), port=-1)


# The default max_new_tokens of conftest's tiny_run_export.
EXPORT_MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def tiny_export(tiny_run_export):
    """`saved_models/tiny`: conftest's `kgpt export` of a tiny random character model (shared: read only)."""
    return pathlib.Path(tiny_run_export[0]) / "tiny"


@pytest.mark.export
def test_serves_a_kgpt_export(tiny_export):
    from kgpt.serving.saved_model_generator import load_generator

    model_dir = tiny_export
    generator = load_generator(str(model_dir))
    expected = generator.generate(["the cat", "a"], max_new_tokens=EXPORT_MAX_NEW_TOKENS)
    server = start(model_dir)
    try:
        predict = "/v1/models/tiny:predict"
        status, answer = call(server, "POST", predict, {"instances": ["the cat", "a"]})
        assert status == 200
        rows = answer["predictions"]
        assert [row["text"] for row in rows] == expected
        assert [row["prompt_token_count"] for row in rows] == [7, 1]
        assert set(rows[0]) == {"text", "token_ids", "token_count", "prompt_token_count", "truncated",
                                "stopped"}
        # generate: the scalars left out take the defaults recorded at export.
        status, answer = call(
            server, "POST", predict,
            {"signature_name": "generate", "inputs": {"prompts": ["the cat"], "top_k": 1}},
        )
        assert status == 200 and answer["outputs"]["text"] == expected[:1]
        # Stop strings reach the graph: the text ends before the first one; past the context too.
        stops = [expected[0][2:4]]
        status, answer = call(
            server, "POST", predict, {"signature_name": "generate", "inputs": {
                "prompts": ["the cat"], "top_k": 1, "stop": stops, "max_new_tokens": 6}},
        )
        assert status == 200 and answer["outputs"]["text"] == [expected[0].split(stops[0])[0]]
        status, answer = call(
            server, "POST", predict, {"signature_name": "generate", "inputs": {
                "prompts": ["the cat"], "max_new_tokens": 80, "stop_token_ids": [0]}},
        )
        assert status == 200 and answer["outputs"]["token_count"][0] <= 80
        # Penalties and log-probabilities are generate's inputs like the sampling options.
        options = dict(frequency_penalty=1.5, repetition_penalty=1.2)
        [completion] = generator.complete(["the cat"], 10, logprobs=2, **options)
        status, answer = call(server, "POST", predict, {"signature_name": "generate", "inputs": {
            "prompts": ["the cat"], "top_k": 1, "max_new_tokens": 10, "logprobs": 2, **options}})
        outputs = answer["outputs"]
        assert status == 200 and outputs["text"] == [completion.text] != generator.generate(["the cat"], 10)
        assert outputs["top_token_ids"][0] == [[t for t, _, _ in token.top] for token in completion.logprobs]
        assert outputs["token_logprobs"][0] == pytest.approx([t.logprob for t in completion.logprobs], abs=1e-5)
        status, answer = call(server, "POST", predict, {"signature_name": "generate", "inputs": {
            "prompts": ["the cat"], "logprobs": 6}})
        assert status == 400 and "logprobs must be <= 5" in answer["error"]
        # beam_search: each prompt's beams, best first; the best is its text.
        status, answer = call(server, "POST", predict, {"signature_name": "beam_search", "inputs": {
            "prompts": ["the cat", "a"], "num_beams": 3, "max_new_tokens": 5}})
        beams = generator.generate(
            ["the cat", "a"], max_new_tokens=5, num_beams=3, num_return_sequences=3)
        assert status == 200 and answer["outputs"]["beam_text"] == [beams[:3], beams[3:]]
        assert answer["outputs"]["text"] == [beams[0], beams[3]]
        status, answer = call(server, "POST", predict, {"signature_name": "beam_search", "inputs": {
            "prompts": ["a"], "num_beams": 99}})
        assert status == 400 and "num_beams must be <= 16" in answer["error"]
        status, answer = call(
            server, "POST", predict, {"signature_name": "score", "instances": ["the cat sat"]}
        )
        assert status == 200 and answer["predictions"][0]["token_count"] == 11
        assert answer["predictions"][0]["log_likelihood"] < 0
        for inputs, message in [
            ({"prompts": ["a"], "temperature": 0.0}, "temperature must be > 0"),
            ({"prompts": ["a"], "max_new_tokens": 70000}, "max_new_tokens must be <= 65536"),
            ({"prompts": ["a"], "stop": ["a", ""]}, "stop sequences must be non-empty strings"),
            ({"prompts": ["a"], "stop": ["a"] * 17}, "too many stop sequences: at most 16"),
            ({"prompts": ["a"], "stop": [1]}, "Input 'stop' is not a valid string tensor"),
            ({"prompts": ["a"], "stop": "a"}, "Input 'stop' has shape []"),
            ({"prompts": ["a"], "stop_token_ids": [-1]}, "stop_token_ids must be >= 0"),
            ({"prompts": ["a"], "top_p": 1.5}, "top_p must be in (0, 1]"),
            ({"prompts": []}, "prompts is empty"),
        ]:
            status, answer = call(
                server, "POST", predict, {"signature_name": "generate", "inputs": inputs}
            )
            assert status == 400 and message in answer["error"], answer
            assert "\n" not in answer["error"]
    finally:
        stop(server)


@pytest.mark.export
def test_batched_generation_answers_as_unbatched_calls(tiny_export):
    predict = "/v1/models/tiny:predict"
    prompts = ["the cat", "a", "", "the mat. a dog ran! the cat sat on", "dog", "t"]
    requests = [{"instances": [p]} for p in prompts] + [{"instances": prompts[:3]}]
    for max_new_tokens in (3, 6):  # greedy generate: batched per max_new_tokens
        requests += [{"signature_name": "generate",
                      "inputs": {"prompts": [p], "top_k": 1, "max_new_tokens": max_new_tokens}}
                     for p in prompts]
    # Sampling with a seed: never batched, so the same seed still gives the same text.
    requests += [{"signature_name": "generate", "inputs": {"prompts": [p], "top_k": 0, "seed": 5}}
                 for p in prompts]
    unbatched = start(tiny_export, batching=False)
    try:
        expected = [call(unbatched, "POST", predict, r) for r in requests]
    finally:
        stop(unbatched)
    assert all(status == 200 for status, _ in expected)
    server = start(tiny_export, batch_timeout=2.0)
    try:
        answers = in_threads(lambda r: call(server, "POST", predict, r), [(r,) for r in requests])
        assert answers == expected  # text, token_ids (cut back to each request's width), counts
        # 3 batched keys (serving_default, generate x 2) and 6 sampled requests alone.
        assert server.model.scheduler.calls <= 3 + 6 < len(requests)
    finally:
        stop(server)
