"""Request scheduling for `kgpt serve`: a bounded queue, a per-request timeout and TF Serving-style
batching (concurrent requests with the same key run as one model call, rows concatenated), and
which signatures and requests may batch without changing their answers.

Threads only: the server's worker threads call `Scheduler.run`; the first request of a batch
leads it (waits the batch window, takes a call slot, runs the call, hands out the rows), the others
wait for their rows. `ScheduledSignatures` calls a SavedModel's signatures through a scheduler, for
TF Serving's predict and OpenAI's whole answers alike.
"""

import threading
import time

import numpy as np
import tensorflow as tf

from kgpt.generation.sampling import draws_at_random
from kgpt.serving.protocol import APIError
from kgpt.serving.signatures import ASKED_OUTPUTS, PADDED_OUTPUTS, REQUEST_LISTS, REQUEST_WIDTH_OUTPUTS, Name


class Busy(APIError):
    """The queue is full, or a request waited past its timeout without starting: HTTP 503."""

    def __init__(self, message):
        super().__init__(message, status=503, code="overloaded")


def batch_rows(signature_def, signature_name=None):
    """The input whose rows a signature may batch, or None.

    Batched: one input of shape `[-1]` (the rows; the others are scalars or request-wide lists,
    `REQUEST_LISTS` such as stop sequences, equal within a batch),
    and outputs that are exact (no floats: their last bits follow the batch's padded width; but
    `ASKED_OUTPUTS`, whose requests `batch_key` runs alone) and
    split by row (first axis -1; a further variable axis only in `PADDED_OUTPUTS`, or in
    `REQUEST_WIDTH_OUTPUTS`, whose width the equal scalars of a batch set, such as `num_beams`).
    """
    def dims(info):
        shape = tf.TensorShape(info.tensor_shape)
        return None if shape.rank is None else shape.as_list()

    inputs = {key: dims(info) for key, info in signature_def.inputs.items() if key not in REQUEST_LISTS}
    rows = [key for key, shape in inputs.items() if shape == [None]]
    if len(rows) != 1 or any(shape != [] for key, shape in inputs.items() if key != rows[0]):
        return None
    for key, info in signature_def.outputs.items():
        shape, dtype = dims(info), tf.dtypes.as_dtype(info.dtype)
        inexact = (dtype.is_floating or dtype.is_complex) and (signature_name, key) not in ASKED_OUTPUTS
        if not shape or shape[0] is not None or inexact:
            return None
        padded = key in PADDED_OUTPUTS and PADDED_OUTPUTS[key] in signature_def.outputs
        if None in shape[1:] and not padded and not (key in REQUEST_WIDTH_OUTPUTS and len(shape) == 2):
            return None
    return rows[0]


def batch_key(signature_name, rows, arrays):
    """Requests of equal key may run as one call: the same signature and scalar inputs, rows to
    join, and no random draw (a seeded draw depends on the row's place in the batch). None: alone.

    Args:
        rows: `batch_rows` of the signature.
        arrays: the request's `{input: np.ndarray}`.
    """
    if rows is None or not len(arrays[rows]):  # an empty request keeps its own error
        return None
    scalars = {
        key: tuple(value.tolist()) if key in REQUEST_LISTS else value.item()
        for key, value in arrays.items() if key != rows
    }
    asked = [(input_name, default) for (name, _), (input_name, default) in ASKED_OUTPUTS.items()
             if name == signature_name and input_name in scalars]
    if draws_at_random(scalars) or any(scalars[name] != default for name, default in asked):
        return None  # a draw, or outputs of floats (log-probabilities) asked for
    scalars.pop(Name.SEED, None)  # no draw: the seed changes nothing
    return signature_name, arrays[rows].dtype.str, tuple(sorted(scalars.items()))


class _Task:
    """One request: its inputs, its row count, and where its outcome goes."""

    def __init__(self, inputs, rows):
        self.inputs = inputs
        self.rows = rows
        self.done = threading.Event()
        self.result = None
        self.error = None

    def finish(self, result=None, error=None):
        self.result, self.error = result, error
        self.done.set()

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.result


class _Batch:
    def __init__(self, key, task):
        self.key = key
        self.tasks = [task]
        self.rows = task.rows


def split_outputs(outputs, sizes, padded=None):
    """Cuts a batched call's `{name: array}` back into one dict per request of `sizes` rows.

    Args:
        outputs: arrays whose first axis is the batch (`sum(sizes)` rows).
        sizes: rows per request, in the order they were concatenated.
        padded: `{output: count output}`: `output` is padded along axis 1 to the longest row's
            count, so each request's part is cut back to its own longest row (its unbatched width).

    Returns:
        One `{name: array}` per request.
    """
    padded = padded or {}
    total = sum(sizes)
    for name, value in outputs.items():
        if np.ndim(value) == 0 or len(value) != total:
            raise ValueError(f"output {name!r} has no batch axis of {total} rows; it cannot be split")
    parts, start = [], 0
    for size in sizes:
        part = {name: value[start:start + size] for name, value in outputs.items()}
        for name, count in padded.items():
            if name in part and count in part:
                width = int(np.max(part[count], initial=0))
                part[name] = part[name][:, :width]
        parts.append(part)
        start += size
    return parts


class Scheduler:
    """Runs model calls: at most `max_concurrent_calls` at once, a bounded queue, batching.

    Args:
        max_concurrent_calls: model calls running at once.
        max_queued_requests: requests admitted but not yet started; one more is refused (`Busy`).
        timeout: seconds a request may wait to start before it is refused (`Busy`).
        batching: join requests of equal `key` into one call.
        max_batch_size: rows per batched call (a larger request runs alone).
        batch_timeout: seconds a batch stays open for more requests before it runs.

    Example:
        scheduler = Scheduler(batching=True, max_batch_size=16)
        inputs = {"prompts": np.array([b"Hello"], object), "top_k": np.array(1)}
        scheduler.run(call, inputs, key=("generate", 1), rows="prompts")
    """

    def __init__(self, max_concurrent_calls=4, max_queued_requests=64, timeout=30.0, batching=True,
                 max_batch_size=32, batch_timeout=0.005):
        for name, value in [("max_concurrent_calls", max_concurrent_calls),
                            ("max_queued_requests", max_queued_requests), ("max_batch_size", max_batch_size)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")
        for name, value in [("timeout", timeout), ("batch_timeout", batch_timeout)]:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name}={value!r} must be a number of seconds >= 0.")
        self.max_queued_requests = max_queued_requests
        self.timeout = timeout
        self.batching = batching
        self.max_batch_size = max_batch_size
        self.batch_timeout = batch_timeout
        self._slots = threading.BoundedSemaphore(max_concurrent_calls)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._open = {}  # key -> the _Batch still taking requests
        self._queued = 0
        self.calls = 0  # model calls made, and the requests they answered
        self.requests = 0

    def run(self, call, inputs, key=None, rows=None, padded=None):
        """`call(inputs)`, possibly as part of a batch; returns its `{name: array}` outputs.

        Args:
            call: `{name: array} -> {name: array}`; every output's first axis is the batch.
            inputs: `{name: array}`; `rows` names the one input whose first axis is the batch,
                the others are equal within a key.
            key: hashable; requests of equal key (signature and option values) may be batched
                and then run the first one's `call`, so the key must identify `call` too; None
                runs the request alone.
            padded: see `split_outputs`.

        Raises:
            Busy: the queue is full or the request did not start within `timeout`.
        """
        batchable = self.batching and key is not None and rows is not None
        task = _Task(inputs, len(inputs[rows]) if batchable else 0)
        start = time.monotonic()
        with self._lock:
            if self._queued >= self.max_queued_requests:
                raise Busy(
                    f"The server is busy: {self._queued} requests already wait "
                    f"(--max-queued-requests {self.max_queued_requests}); retry later."
                )
            self._queued += 1
            batch = self._join(key, task) if batchable and task.rows else None
            leader = batch is None
            if leader:
                batch = _Batch(key, task)
                if batchable and 0 < task.rows < self.max_batch_size:
                    self._open[key] = batch
        if not leader:
            task.done.wait()  # the leader always finishes every task of its batch
            return task.outcome()
        self._lead(batch, call, rows, padded, start)
        return task.outcome()

    def _join(self, key, task):
        """The open batch of `key` with room for `task`, now holding it (lock held), or None."""
        batch = self._open.get(key)
        if batch is None or batch.rows + task.rows > self.max_batch_size:
            return None
        batch.tasks.append(task)
        batch.rows += task.rows
        if batch.rows >= self.max_batch_size:
            del self._open[key]
            self._changed.notify_all()
        return batch

    def _close(self, batch):
        with self._lock:
            if self._open.get(batch.key) is batch:
                del self._open[batch.key]
            self._queued -= len(batch.tasks)
            return list(batch.tasks)

    def _lead(self, batch, call, rows, padded, start):
        with self._lock:  # the batch window: until the batch is full or `batch_timeout` has passed
            self._changed.wait_for(lambda: self._open.get(batch.key) is not batch, self.batch_timeout)
        # The batch keeps taking requests while it waits for a free call slot.
        if not self._slots.acquire(timeout=max(0.0, start + self.timeout - time.monotonic())):
            busy = f"The server is busy: no model call became free within {self.timeout:g} s; retry later."
            for task in self._close(batch):
                task.finish(error=Busy(busy))
            return
        tasks = self._close(batch)
        try:
            with self._lock:
                self.requests += len(tasks)
            if len(tasks) == 1:
                self._run_alone(call, tasks[0])
                return
            inputs = dict(tasks[0].inputs)
            inputs[rows] = np.concatenate([task.inputs[rows] for task in tasks])
            try:
                self._count_call()
                parts = split_outputs(call(inputs), [task.rows for task in tasks], padded)
            except Exception:  # noqa: BLE001  (one bad request: each gets its own answer)
                for task in tasks:
                    self._run_alone(call, task)
                return
            for task, part in zip(tasks, parts):
                task.finish(result=part)
        finally:
            self._slots.release()
            for task in tasks:  # only after an interrupt: nobody waits forever
                if not task.done.is_set():
                    task.finish(error=RuntimeError("the batch this request was part of was interrupted"))

    def _run_alone(self, call, task):
        try:
            self._count_call()
            task.finish(result=call(task.inputs))
        except Exception as error:  # noqa: BLE001  (raised again in the request's thread)
            task.finish(error=error)

    def _count_call(self):
        with self._lock:
            self.calls += 1


class ScheduledSignatures:
    """A loaded SavedModel's signatures, each call run by a `Scheduler` and batched with concurrent
    calls of equal options where `batch_rows` and `batch_key` allow.

    Args:
        module: the loaded SavedModel (`tf.saved_model.load`).
        signature_defs: its `{name: SignatureDef}` (`kgpt.serving.signatures.read_signature_defs`).
        scheduler: a `Scheduler`, shared with the server's other model calls.

    Example:
        calls = ScheduledSignatures(module, read_signature_defs(path), Scheduler())
        calls("serving_default", {"prompts": np.array([b"Hello"], object)})
    """

    def __init__(self, module, signature_defs, scheduler):
        self.module = module
        self.scheduler = scheduler
        self._rows = {name: batch_rows(signature_def, name) for name, signature_def in signature_defs.items()}

    def __call__(self, signature_name, arrays):
        """The signature's `{output: np.ndarray}` for `{input: np.ndarray}`; `Busy` when overloaded."""
        rows = self._rows[signature_name]
        return self.scheduler.run(
            self._call(signature_name), arrays, rows=rows, padded=PADDED_OUTPUTS,
            key=batch_key(signature_name, rows, arrays),
        )

    def _call(self, signature_name):
        signature = self.module.signatures[signature_name]

        def call(arrays):
            outputs = signature(**{key: tf.constant(value) for key, value in arrays.items()})
            return {key: value.numpy() for key, value in outputs.items()}

        return call
