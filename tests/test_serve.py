"""`kgpt serve` over loopback: TF Serving's REST URLs, JSON formats, status codes and errors.

The default run serves a small hand-made SavedModel (string signatures, one with a recorded
default), which exercises every path of the server in about a second; the test marked `export`
serves a real `kgpt export` of a tiny model.
"""

import base64
import http.client
import json
import threading

import pytest
import tensorflow as tf

from kgpt.cli import main
from kgpt.serve import make_server


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


def call(server, method, path, body=None):
    """Returns (HTTP status, parsed JSON body)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
    try:
        if body is not None and not isinstance(body, (str, bytes)):
            body = json.dumps(body)
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


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
        assert server.model._slots.acquire(timeout=1)  # one prediction "in flight"
        status, answer = call(server, "POST", "/v1/models/echo:predict", {"instances": ["a"]})
        assert status == 503 and "busy" in answer["error"]
        server.model._slots.release()
        assert call(server, "POST", "/v1/models/echo:predict", {"instances": ["a"]})[0] == 200
    finally:
        stop(server)


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


@pytest.mark.export
def test_serves_a_kgpt_export(tmp_path, write_run_directory):
    from kgpt.export import export
    from kgpt.generate import load_generator
    from kgpt.tokenizer import train_characters

    tokenizer = train_characters(["the cat sat on the mat. a dog ran!\n"])
    run_dir, _ = write_run_directory(tmp_path / "run", tokenizer)
    export(run_dir, "tiny", base_dir=str(tmp_path / "saved_models"), max_new_tokens=6)
    model_dir = tmp_path / "saved_models" / "tiny"
    expected = load_generator(str(model_dir)).generate(["the cat", "a"], max_new_tokens=6)
    server = start(model_dir)
    try:
        predict = "/v1/models/tiny:predict"
        status, answer = call(server, "POST", predict, {"instances": ["the cat", "a"]})
        assert status == 200
        rows = answer["predictions"]
        assert [row["text"] for row in rows] == expected
        assert [row["prompt_token_count"] for row in rows] == [7, 1]
        assert set(rows[0]) == {"text", "token_ids", "token_count", "prompt_token_count", "truncated"}
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
