"""The request scheduler behind `kgpt serve`: batched calls give each request what a call of its
own gives, the queue and the wait are bounded, and only signatures and requests that batch without
changing their answers are batched."""

import threading
import time

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2

from kgpt.serving.batching import Busy, Scheduler, batch_key, batch_rows, split_outputs


class Model:
    """`call(inputs)`: per row, `value * scale` and `ids` padded (with -1) to the longest row's count;
    a negative row fails the whole call, as a graph assertion does. Records the rows of every call."""

    def __init__(self, hold=None):
        self.calls = []
        self.hold = hold  # an Event the call waits for

    def __call__(self, inputs):
        if self.hold is not None:
            self.hold.wait(10)
        values = np.asarray(inputs["values"])
        self.calls.append(values.tolist())
        if (values < 0).any():
            raise ValueError("values must be >= 0")
        counts = values % 4
        ids = np.full((len(values), int(counts.max(initial=0))), -1)
        for row, count in enumerate(counts):
            ids[row, :count] = np.arange(count) + 10 * values[row]
        return {"scaled": values * inputs["scale"], "ids": ids, "count": counts}


def in_threads(function, arguments):
    """`function(*a)` for each `a`, started together in threads; results (or exceptions) in order."""
    results = [None] * len(arguments)
    barrier = threading.Barrier(len(arguments))

    def work(index):
        barrier.wait()
        try:
            results[index] = function(*arguments[index])
        except Exception as error:  # noqa: BLE001
            results[index] = error

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(arguments))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)  # an export's first call traces and compiles
    return results


def request(values, scale=2):
    return {"values": np.array(values), "scale": np.array(scale)}


def run(scheduler, model, inputs):
    key = ("scaled", int(inputs["scale"]))
    return scheduler.run(model, inputs, key=key, rows="values", padded={"ids": "count"})


def assert_same(answers, expected):
    assert len(answers) == len(expected)
    for answer, reference in zip(answers, expected):
        assert not isinstance(answer, Exception), answer
        assert answer.keys() == reference.keys()
        for name in reference:
            assert answer[name].shape == reference[name].shape, name
            np.testing.assert_array_equal(answer[name], reference[name])


def test_concurrent_requests_of_one_key_run_as_one_call_and_get_their_own_rows():
    requests = [request([i]) for i in range(5)] + [request([5, 6, 7])]
    expected = [Model()(r) for r in requests]  # each alone; widths differ (0 to 3 ids)
    model = Model()
    scheduler = Scheduler(batch_timeout=1.0, max_batch_size=8)
    answers = in_threads(lambda r: run(scheduler, model, r), [(r,) for r in requests])
    assert_same(answers, expected)
    assert len(model.calls) == 1 and sorted(model.calls[0]) == list(range(8))
    assert (scheduler.calls, scheduler.requests) == (1, 6)


def test_different_keys_are_not_batched_together():
    requests = [request([i], scale=1 + i % 2) for i in range(6)]
    model = Model()
    scheduler = Scheduler(batch_timeout=0.5)
    answers = in_threads(lambda r: run(scheduler, model, r), [(r,) for r in requests])
    assert_same(answers, [Model()(r) for r in requests])
    assert sorted(map(sorted, model.calls)) == [[0, 2, 4], [1, 3, 5]]


def test_batches_hold_at_most_max_batch_size_rows():
    requests = [request([2 * i, 2 * i + 1]) for i in range(5)] + [request(list(range(10, 16)))]
    model = Model()
    scheduler = Scheduler(batch_timeout=0.5, max_batch_size=4)
    answers = in_threads(lambda r: run(scheduler, model, r), [(r,) for r in requests])
    assert_same(answers, [Model()(r) for r in requests])
    assert max(len(rows) for rows in model.calls) == 6  # the request larger than a batch ran alone
    assert sorted(len(rows) for rows in model.calls) == [2, 4, 4, 6]


def test_a_failing_batch_gives_each_request_its_own_answer():
    requests = [request([1]), request([-1]), request([2])]
    model, scheduler = Model(), Scheduler(batch_timeout=0.5)
    answers = in_threads(lambda r: run(scheduler, model, r), [(r,) for r in requests])
    assert isinstance(answers[1], ValueError) and "values must be >= 0" in str(answers[1])
    assert_same([answers[0], answers[2]], [Model()(requests[0]), Model()(requests[2])])
    assert len(model.calls) == 4  # the batch, then each request alone


def test_without_batching_or_a_key_every_request_runs_alone():
    requests = [request([i]) for i in range(4)]
    model = Model()
    scheduler = Scheduler(batching=False, batch_timeout=0.5)
    answers = in_threads(lambda r: run(scheduler, model, r), [(r,) for r in requests])
    assert_same(answers, [Model()(r) for r in requests])
    assert len(model.calls) == 4
    model = Model()
    scheduler = Scheduler(batch_timeout=0.5)
    answers = in_threads(lambda r: scheduler.run(model, r), [(r,) for r in requests])  # key=None
    assert_same(answers, [Model()(r) for r in requests])
    assert len(model.calls) == 4


def wait_until(condition, seconds=10):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_full_queue_refuses_at_once_and_a_long_wait_times_out():
    hold = threading.Event()
    model = Model(hold=hold)
    scheduler = Scheduler(max_concurrent_calls=1, max_queued_requests=1, timeout=30, batching=False)
    running = threading.Thread(target=scheduler.run, args=(model, request([1])))
    running.start()
    wait_until(lambda: scheduler._queued == 0 and scheduler.calls == 1)  # holds the only call slot
    queued = threading.Thread(target=scheduler.run, args=(model, request([2])))
    queued.start()
    wait_until(lambda: scheduler._queued == 1)
    started = time.monotonic()
    with pytest.raises(Busy, match=r"1 requests already wait \(--max-queued-requests 1\)"):
        scheduler.run(model, request([3]))
    assert time.monotonic() - started < 1
    hold.set()
    running.join(10)
    queued.join(10)
    assert model.calls == [[1], [2]]

    hold.clear()
    scheduler = Scheduler(max_concurrent_calls=1, timeout=0.3)
    running = threading.Thread(target=scheduler.run, args=(model, request([1])))
    running.start()
    wait_until(lambda: scheduler.calls == 1)
    started = time.monotonic()
    with pytest.raises(Busy, match="no model call became free within 0.3 s"):
        run(scheduler, model, request([2]))
    assert 0.25 < time.monotonic() - started < 5
    hold.set()
    running.join(10)
    assert scheduler._queued == 0


@pytest.mark.parametrize(
    "arguments, match",
    [
        (dict(max_concurrent_calls=0), "max_concurrent_calls=0 must be an integer >= 1"),
        (dict(max_batch_size=2.5), "max_batch_size=2.5"),
        (dict(timeout=-1), "timeout=-1 must be a number of seconds >= 0"),
        (dict(batch_timeout=float("nan")), "batch_timeout=nan"),
    ],
)
def test_bad_settings_are_refused(arguments, match):
    with pytest.raises(ValueError, match=match):
        Scheduler(**arguments)


def test_split_outputs_needs_a_batch_axis():
    parts = split_outputs({"a": np.arange(5)}, [2, 3])
    assert [p["a"].tolist() for p in parts] == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match="output 'total' has no batch axis of 5 rows"):
        split_outputs({"a": np.arange(5), "total": np.array(7)}, [2, 3])


def signature(inputs, outputs):
    """A SignatureDef of `{name: (shape, dtype)}` inputs and outputs."""
    signature_def = meta_graph_pb2.SignatureDef()
    for target, specs in ((signature_def.inputs, inputs), (signature_def.outputs, outputs)):
        for name, (shape, dtype) in specs.items():
            target[name].dtype = dtype.as_datatype_enum
            target[name].tensor_shape.CopyFrom(tf.TensorShape(shape).as_proto())
    return signature_def


GENERATE_OUTPUTS = {"text": ([None], tf.string), "token_ids": ([None, None], tf.int32),
                    "token_count": ([None], tf.int32), "truncated": ([None], tf.bool)}


@pytest.mark.parametrize(
    "inputs, outputs, rows",
    [
        ({"prompts": ([None], tf.string), "top_k": ([], tf.int32)}, GENERATE_OUTPUTS, "prompts"),
        # Float outputs change in their last bits with the batch's padded width.
        ({"texts": ([None], tf.string)}, {"log_likelihood": ([None], tf.float32)}, None),
        # Rows of several tokens: their widths would have to match.
        ({"token_ids": ([None, None], tf.int32)}, {"count": ([None], tf.int32)}, None),
        # Stop lists are one per request (an option), not rows.
        ({"prompts": ([None], tf.string), "stop": ([None], tf.string)}, GENERATE_OUTPUTS, "prompts"),
        # beam_search: each prompt's beams, as many as the batch's equal num_beams asks for.
        ({"prompts": ([None], tf.string), "num_beams": ([], tf.int32)},
         {**GENERATE_OUTPUTS, "beam_text": ([None, None], tf.string),
          "beam_token_count": ([None, None], tf.int32)}, "prompts"),
        # Any other output of a variable second axis cannot be split back.
        ({"prompts": ([None], tf.string)}, {**GENERATE_OUTPUTS, "beams": ([None, None], tf.string)}, None),
        # Two inputs of rows: which one is the batch is not known.
        ({"prompts": ([None], tf.string), "suffixes": ([None], tf.string)}, GENERATE_OUTPUTS, None),
        # A padded output without its count cannot be cut back to each request's width.
        ({"prompts": ([None], tf.string)}, {"token_ids": ([None, None], tf.int32)}, None),
        ({"prompts": ([None], tf.string)}, {"total": ([], tf.int32)}, None),
    ],
)
def test_batch_rows_only_for_signatures_that_batch_exactly(inputs, outputs, rows):
    assert batch_rows(signature(inputs, outputs)) == rows


def test_batch_key_keeps_options_apart_and_never_batches_a_random_draw():
    def key(prompts, **scalars):
        arrays = {"prompts": np.array(prompts, dtype=object)}
        arrays.update({name: np.array(value) for name, value in scalars.items()})
        return batch_key("generate", "prompts", arrays)

    greedy = dict(max_new_tokens=8, temperature=1.0, top_k=1, top_p=1.0, seed=0)
    assert key([b"a"], **greedy) == key([b"b", b"c"], **greedy) is not None
    assert key([b"a"], **greedy) != key([b"a"], **{**greedy, "max_new_tokens": 9})
    assert key([b"a"], **{**greedy, "top_k": 0}) is None  # a draw: its row's place changes it
    assert key([b"a"], **greedy) == key([b"b"], **{**greedy, "seed": 7})  # no draw: the seed is unused
    assert key([], **greedy) is None  # an empty request runs alone and gets its own error
    assert batch_key("generate", None, {"prompts": np.array([b"a"])}) is None
    # Penalties are options like the others; log-probabilities (floats) asked for run alone.
    penalized = {**greedy, "frequency_penalty": 1.0}
    assert key([b"a"], **penalized) == key([b"b"], **penalized) != key([b"a"], **greedy)
    assert key([b"a"], **greedy, logprobs=-1) is not None and key([b"a"], **greedy, logprobs=0) is None


def test_generates_logprobs_outputs_batch_only_when_not_asked_for():
    # generate's float outputs are empty unless `logprobs` asks for them: the signature batches,
    # its requests with logprobs run alone; the same floats in another signature do not batch.
    outputs = {**GENERATE_OUTPUTS, "token_logprobs": ([None, None], tf.float32),
               "top_token_ids": ([None, None, None], tf.int32), "top_logprobs": ([None, None, None], tf.float32)}
    inputs = {"prompts": ([None], tf.string), "logprobs": ([], tf.int32)}
    assert batch_rows(signature(inputs, outputs), "generate") == "prompts"
    assert batch_rows(signature(inputs, outputs), "other") is None


def test_requests_batch_only_with_equal_stop_lists():
    def request(*stops):
        return {"prompts": np.array([b"a"]), "top_k": np.array(1), "stop": np.array(stops, dtype=object)}

    assert batch_key("generate", "prompts", request(b"\n")) == batch_key("generate", "prompts", request(b"\n"))
    assert batch_key("generate", "prompts", request(b"\n")) != batch_key("generate", "prompts", request(b"."))
    assert batch_key("generate", "prompts", request()) != batch_key("generate", "prompts", request(b"."))
