"""`kgpt serve`'s HTTP/1.1 connections: uvicorn's h11 protocol with `Limits` (a cap on connections
and one deadline on each whole request) and answers to request lines h11 refuses or lets through.
"""

import http

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from kgpt.serving.protocol import API, APIError, compact_json

# The longest request line, and request head, that h11 reads (its max_incomplete_event_size).
MAX_HEAD_BYTES = 16 * 1024


class _Connection(h11.Connection):
    """h11's server side, refusing what h11 lets through or refuses vaguely: an HTTP version other
    than 1.0 and 1.1 (505), a request line longer than `MAX_HEAD_BYTES` (414) and a longer head
    (431). `refusal` is the last `h11.RemoteProtocolError` raised, its status and message the answer."""

    def __init__(self):
        super().__init__(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.refusal = None

    def next_event(self):
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as error:
            self.refusal = self._explained(error)
            raise self.refusal from None
        if isinstance(event, h11.Request):
            self.refusal = _refusal(event)
            if self.refusal is not None:
                raise self.refusal
        return event

    def _explained(self, error):
        if error.error_status_hint == 431:  # more than MAX_HEAD_BYTES arrived, the head unfinished
            return _too_long(line=b"\n" not in self.trailing_data[0])
        # h11's messages, e.g. "illegal request line: bytearray(b'...')"
        message = str(error).partition(": bytearray(")[0]
        return h11.RemoteProtocolError(f"Malformed HTTP request: {message}.", error.error_status_hint)


def _refusal(request):
    """What is wrong with a request head h11 parsed whole, as an `h11.RemoteProtocolError`, or None."""
    if request.http_version not in (b"1.0", b"1.1"):
        return h11.RemoteProtocolError(f"HTTP/{request.http_version.decode()} is not supported; use "
                                       "HTTP/1.1.", error_status_hint=505)
    if len(request.target) > MAX_HEAD_BYTES:
        return _too_long(line=True)
    if sum(len(name) + len(value) + 4 for name, value in request.headers) > MAX_HEAD_BYTES:
        return _too_long(line=False)
    return None


def _too_long(line):
    if line:
        return h11.RemoteProtocolError(f"The request line is longer than {MAX_HEAD_BYTES} bytes; send "
                                       "long inputs in a POST body.", error_status_hint=414)
    return h11.RemoteProtocolError(f"The request head is longer than {MAX_HEAD_BYTES} bytes.", 431)


class BoundedProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with `Limits` on connections and one deadline per request.

    A request must arrive whole, head and body, `read_timeout` seconds after its connection opened
    or its previous answer: a head still incomplete then gets 408 (an idle connection, nothing) and
    is closed; the body's 408 is `_App._body`'s, which reads the deadline from `request.state`.
    (uvicorn's keep-alive timer stops at a connection's first byte, so a client sending a head
    slowly, or nothing, would hold its connection for ever.) A connection beyond `max_connections`
    closes the one that has waited longest for its request, so that slow clients cannot fill the
    server (slowloris). Malformed request lines get 400, 414, 431 or 505 (`_Connection`) and the
    connection is closed; uvicorn logs one line for each.
    """

    def __init__(self, *args, limits, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn = _Connection()
        self.limits = limits
        self.deadline = None  # of the request expected or arriving, in the event loop's time
        self._timer = None

    def connection_made(self, transport):
        super().connection_made(transport)
        self._await_request()
        peers = [peer for peer in self.connections if isinstance(peer, BoundedProtocol) and peer.is_open()]
        if len(peers) > self.limits.max_connections:
            waiting = [peer for peer in peers if peer is not self and peer.is_waiting()]
            if waiting:
                min(waiting, key=lambda peer: peer.deadline).drop(
                    503, f"The server is busy: {self.limits.max_connections} connections are open "
                    "(--max-connections); send requests without pausing, or retry later.")

    def handle_events(self):
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_started:
            self.cycle.scope["state"]["deadline"] = self.deadline  # `request.state.deadline`

    def on_response_complete(self):
        if not self.transport.is_closing():
            self._await_request()  # before uvicorn's `handle_events` of a pipelined request
        super().on_response_complete()

    def connection_lost(self, exc):
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)

    def is_open(self):
        return not self.transport.is_closing()

    def is_waiting(self):
        """Whether the connection waits for its request: idle, or still receiving its head or body."""
        cycle = self.cycle
        return (cycle is None or cycle.response_complete
                or (cycle.more_body and not cycle.response_started))

    def drop(self, status, message):
        """Closes the connection; one that has sent part of a request head gets `status` first."""
        if self.cycle is None or self.cycle.response_complete:
            if self.conn.trailing_data[0].strip():
                self.conn.refusal = h11.RemoteProtocolError(message, status)
                self.send_400_response(message)
                return
        self.transport.close()  # mid-body, `_App._body` sees the client leave, and answers no one

    def send_400_response(self, msg):
        """uvicorn's answer to a request h11 refused: the refusal's status and message, as JSON."""
        refusal = self.conn.refusal or h11.RemoteProtocolError(msg)
        status = refusal.error_status_hint
        body = compact_json(APIError(str(refusal), status).body(API.TF_SERVING)).encode("utf-8")
        headers = self.server_state.default_headers + [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=status, headers=headers,
                                       reason=http.HTTPStatus(status).phrase.encode()),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # an answer is already on its way
            pass
        self.transport.close()

    def _await_request(self):
        if self._timer is not None:
            self._timer.cancel()
        self.deadline = self.loop.time() + self.limits.read_timeout
        self._timer = self.loop.call_at(self.deadline, self._request_overdue)

    def _request_overdue(self):
        if self.is_open() and (self.cycle is None or self.cycle.response_complete):
            self.drop(408, "Request incomplete: its head did not arrive within "
                      f"{self.limits.read_timeout:g} s (--read-timeout).")
