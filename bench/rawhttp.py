"""The floor's client: HTTP/1.1 to llama-server over its Unix socket, at the least cost.

A floor must be at least as fast as mmd. httpx splits and decodes every
server-sent event of a stream (100+ µs of Python per token); on a fast GPU the
benchmark's direct client was the bottleneck and mmd "beat" it by 1.6-1.75x.
This client hands each network read to a small parser that de-chunks it, looks
at events only until the first text, and afterwards keeps just the latest event:
the closing one carries the token count and llama-server's own timings. When the
client falls behind, one read brings many tokens, so its cost stays well below
the server's.

llama-server (cpp-httplib) ends a connection after each streamed response, so a
completion opens a connection of its own, as httpx's pool ends up doing; a
plain response such as ``/health``'s keeps it, which lets the swap floor send
its first request on the connection of its last readiness poll, as mmd does.

The same client reads OpenAI-shaped streams (``/v1/chat/completions``): the first
text is a choice's ``delta.content`` (or ``text``), and the closing event the one
with a ``finish_reason`` (or ``usage``), whose ``timings`` give the token count.
It connects to a Unix socket (a path) or to TCP (``(host, port)``), so that mmd's
HTTP listener is read exactly as llama-server is.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Where a server listens: a Unix socket's path, or a TCP (host, port).
Address = Path | tuple[str, int]


class ConnectionClosed(ConnectionError):
    """The server closed the connection before the response was complete."""


def request_bytes(
    method: str, path: str, body: dict[str, Any] | None = None, host: str = "llama-server"
) -> bytes:
    payload = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    return head.encode() + b"\r\n" + payload


class ResponseReader:
    """One HTTP response parsed as its bytes arrive (no I/O of its own).

    For a streamed /completion or OpenAI-shaped stream: ``has_text`` turns true
    with the first event that carries text, and ``final`` is the closing event
    (``stop`` true, or a ``finish_reason`` or ``usage``).
    """

    def __init__(self, count_text: bool = False) -> None:
        self._buffer = bytearray()  # bytes not parsed yet
        # Decode every event and count those with text (about one per token): for the
        # real-model benchmarks, whose streams must be timed token by token; a few tokens
        # a millisecond at most, so the decoding costs nothing that matters there.
        self.count_text = count_text
        self.text_events = 0
        self._events = bytearray()  # de-chunked body not yet split into events
        self._in_body = False
        self._last_event = b""
        self.status = 0
        self.chunked = False
        self.length = 0
        self.keep_alive = True
        self.body = b""  # a plain (Content-Length) body
        self.has_text = False
        self.final: dict[str, Any] | None = None
        self.done = False

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if not self._in_body:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self._head(bytes(self._buffer[:end]).decode("latin-1"))
            del self._buffer[: end + 4]
            self._in_body = True
        if not self.chunked:
            if len(self._buffer) >= self.length:
                self.body = bytes(self._buffer[: self.length])
                self.done = True
            return
        self._dechunk()
        self._scan_events()
        if self.done:
            self._close_stream()

    def _head(self, head: str) -> None:
        status_line, *lines = head.split("\r\n")
        self.status = int(status_line.split(" ", 2)[1])
        for line in lines:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "transfer-encoding":
                self.chunked = "chunked" in value
            elif name == "content-length":
                self.length = int(value)
            elif name == "connection":
                self.keep_alive = value != "close"

    def _dechunk(self) -> None:
        while not self.done:
            line_end = self._buffer.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self._buffer[:line_end]).split(b";", 1)[0], 16)
            start = line_end + 2
            if size == 0:  # the last chunk; llama-server sends no trailers
                if len(self._buffer) < start + 2:
                    return
                del self._buffer[: start + 2]
                self.done = True
                return
            if len(self._buffer) < start + size + 2:
                return
            self._events += self._buffer[start : start + size]
            del self._buffer[: start + size + 2]

    def _scan_events(self) -> None:
        end = self._events.rfind(b"\n\n")
        if end < 0:
            return
        complete = bytes(self._events[:end])
        del self._events[: end + 2]
        events = [e for e in complete.split(b"\n\n") if e.startswith(b"data: ")]
        if self.count_text:
            self.text_events += sum(
                1 for e in events if e[6:].strip() != b"[DONE]" and _has_text(json.loads(e[6:]))
            )
        if not self.has_text:
            # Only until the first text is every event decoded: its time is the
            # first-token latency.
            for event in events:
                data = event[6:]
                if data.strip() == b"[DONE]":
                    continue
                if _has_text(json.loads(data)):
                    self.has_text = True
                    break
        for event in reversed(events):
            if event[6:].strip() != b"[DONE]":
                self._last_event = event
                break

    def _close_stream(self) -> None:
        if not self._last_event:
            return
        decoded = json.loads(self._last_event[6:])
        if isinstance(decoded, dict) and _closes(decoded):
            self.final = decoded


def _has_text(event: Any) -> bool:
    """Whether a decoded event carries text: /completion's or an OpenAI choice's."""
    if not isinstance(event, dict):
        return False
    if event.get("content"):
        return True
    for choice in event.get("choices") or ():
        if isinstance(choice, dict) and (
            (choice.get("delta") or {}).get("content") or choice.get("text")
        ):
            return True
    return False


def _closes(event: dict[str, Any]) -> bool:
    """Whether a decoded event is a stream's closing one."""
    if event.get("stop") or event.get("usage"):
        return True
    choices = event.get("choices") or ()
    return any(isinstance(c, dict) and c.get("finish_reason") for c in choices)


def _tokens(final: dict[str, Any]) -> int:
    """Generated tokens by the closing event: /completion's count, OpenAI's usage, or
    llama-server's timings (an OpenAI stream without ``stream_options``)."""
    if "tokens_predicted" in final:
        return int(final["tokens_predicted"])
    usage = final.get("usage") or {}
    if "completion_tokens" in usage:
        return int(usage["completion_tokens"])
    return int((final.get("timings") or {}).get("predicted_n", 0))


@dataclass
class Completion:
    """One streamed completion, timed with time.perf_counter()."""

    sent_at: float
    first_at: float  # 0 when no text came
    end_at: float
    tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # llama-server's own

    @property
    def total_ms(self) -> float:
        return (self.end_at - self.sent_at) * 1000

    @property
    def first_ms(self) -> float:
        return (self.first_at - self.sent_at) * 1000 if self.first_at else 0.0


def completed(reader: ResponseReader, sent_at: float, first_at: float, end_at: float) -> Completion:
    """The Completion a finished reader describes; raises for an error response."""
    if reader.status != 200 or reader.final is None:
        detail = reader.body[-300:].decode(errors="replace") or "no closing event"
        raise RuntimeError(f"the server answered {reader.status}: {detail}")
    timings = reader.final.get("timings") or {}
    return Completion(
        sent_at,
        first_at,
        end_at,
        _tokens(reader.final),
        {k: float(v) for k, v in timings.items() if isinstance(v, int | float)},
    )


class RawClient:
    """A blocking client for one server's socket (llama-server's, or mmd's HTTP)."""

    def __init__(self, path: Address, timeout: float = 120.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connected(self) -> socket.socket:
        if self._sock is None:
            if isinstance(self.path, tuple):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path if isinstance(self.path, tuple) else str(self.path))
            except OSError:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def _exchange(self, request: bytes) -> tuple[ResponseReader, float, float]:
        """(reader, perf_counter at the first text, at the end) of one request.

        Sent once more on a new connection when the server closed the old one
        without answering (a kept connection it had ended; llama-server also
        drops about 1 in 100 fresh ones under load).
        """
        for attempt in range(2):
            reader = ResponseReader()
            first_at = 0.0
            received = False
            try:
                sock = self._connected()
                sock.sendall(request)
                while not reader.done:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionClosed("llama-server closed the connection")
                    received = True
                    reader.feed(data)
                    if reader.has_text and not first_at:
                        first_at = time.perf_counter()
            except (ConnectionClosed, ConnectionResetError, BrokenPipeError):
                self.close()
                if received or attempt:
                    raise
                continue
            end_at = time.perf_counter()
            if not reader.keep_alive or reader.chunked:
                # llama-server closes its end once a streamed (chunked) answer is over,
                # whatever its headers say: a kept connection would fail on the next
                # request and be sent again, a cost mmd's relay does not pay (it asks for
                # streams on connections it does not pool). mmd's listener is read alike.
                self.close()
            # Else the connection is kept, as mmd keeps its own to the child: llama-server
            # answers a request on a kept connection ~5 ms sooner than on a new one. A kept
            # connection the server has closed meanwhile fails before any answer, and the
            # request goes out again on a new one (above).
            return reader, first_at, end_at
        raise AssertionError("unreachable")

    def status(self, path: str = "/health") -> int:
        reader, _, _ = self._exchange(request_bytes("GET", path))
        return reader.status

    def completion(self, body: dict[str, Any], path: str = "/completion") -> Completion:
        return self.send(request_bytes("POST", path, body))

    def send(self, request: bytes) -> Completion:
        """One streamed completion of a request made by ``request_bytes``."""
        sent_at = time.perf_counter()
        reader, first_at, end_at = self._exchange(request)
        return completed(reader, sent_at, first_at, end_at)


class _Protocol(asyncio.Protocol):
    """Feeds a reader from the event loop's read callback: no task wakes up per token."""

    def __init__(self, reader: ResponseReader, finished: asyncio.Future[float]) -> None:
        self.reader = reader
        self.finished = finished
        self.received = False

    def data_received(self, data: bytes) -> None:
        self.received = True
        if self.finished.done():
            return
        try:
            self.reader.feed(data)
        except Exception as err:  # a malformed response ends this request, not the loop
            self.finished.set_exception(err)
            return
        if self.reader.done:
            self.finished.set_result(time.perf_counter())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self.finished.set_exception(ConnectionClosed(f"connection lost: {exc}"))


async def completion_async(path: Address, request: bytes) -> Completion:
    """One streamed completion on a connection of its own (see the module's note)."""
    loop = asyncio.get_running_loop()
    sent_at = time.perf_counter()
    for attempt in range(2):
        reader = ResponseReader()
        finished: asyncio.Future[float] = loop.create_future()
        factory = functools.partial(_Protocol, reader, finished)
        if isinstance(path, tuple):  # asyncio sets TCP_NODELAY on TCP connections
            transport, protocol = await loop.create_connection(factory, *path)
        else:
            transport, protocol = await loop.create_unix_connection(factory, str(path))
        try:
            transport.write(request)
            end_at = await finished
        except ConnectionClosed:
            if protocol.received or attempt:
                raise
            continue
        finally:
            transport.close()
        return completed(reader, sent_at, 0.0, end_at)
    raise AssertionError("unreachable")


def busy_rate(spans: list[tuple[float, float, int]]) -> float:
    """Tokens per second while llama-server was working, from its own timings.

    ``spans`` holds (end, busy seconds, tokens) per request: the end as the client
    saw it, busy = prompt_ms + predicted_ms as llama-server reported them. The
    union of the busy intervals excludes every gap a client leaves between
    requests, so no client of the same server can get more than this.
    """
    intervals = sorted((end - busy, end) for end, busy, _ in spans)
    covered = 0.0
    reach = float("-inf")
    for start, end in intervals:
        if end <= reach:
            continue
        covered += end - max(start, reach)
        reach = end
    tokens = sum(count for _, _, count in spans)
    return tokens / covered if covered > 0 else 0.0


@dataclass
class Timeline:
    """A streamed completion with the time each piece of text arrived, perhaps cut short.

    ``arrivals`` holds (perf_counter, text events so far) per network read, so that the
    tokens a stream had by any moment can be read back (``tokens_by``): the rate of
    several streams over the time they all ran, when they end at different moments.
    """

    sent_at: float
    end_at: float
    arrivals: list[tuple[float, int]]
    tokens: int  # by the closing event; the text events counted when cut
    timings: dict[str, float]  # llama-server's own, from the closing event; {} when cut
    cut: bool  # the deadline came first and the connection was closed

    def tokens_by(self, moment: float) -> int:
        """Text events that had arrived by ``moment`` (about one per token)."""
        found = 0
        for at, count in self.arrivals:
            if at > moment:
                break
            found = count
        return found

    @property
    def wall_rate(self) -> float:
        """Tokens per second from sending to the end, prompt included."""
        elapsed = self.end_at - self.sent_at
        return self.tokens / elapsed if elapsed > 0 else 0.0


class _TimedProtocol(_Protocol):
    def __init__(
        self,
        reader: ResponseReader,
        finished: asyncio.Future[float],
        arrivals: list[tuple[float, int]],
    ) -> None:
        super().__init__(reader, finished)
        self.arrivals = arrivals

    def data_received(self, data: bytes) -> None:
        before = self.reader.text_events
        super().data_received(data)
        if self.reader.text_events != before:
            self.arrivals.append((time.perf_counter(), self.reader.text_events))


async def timeline_async(path: Address, request: bytes, deadline: float) -> Timeline:
    """One streamed completion timed piece by piece, on a connection of its own, closed at
    ``deadline`` (a perf_counter moment) if it has not ended by then: a server that
    collapses under contention would otherwise hold a benchmark for minutes."""
    loop = asyncio.get_running_loop()
    reader = ResponseReader(count_text=True)
    finished: asyncio.Future[float] = loop.create_future()
    arrivals: list[tuple[float, int]] = []
    factory = functools.partial(_TimedProtocol, reader, finished, arrivals)
    sent_at = time.perf_counter()
    if isinstance(path, tuple):
        transport, _ = await loop.create_connection(factory, *path)
    else:
        transport, _ = await loop.create_unix_connection(factory, str(path))
    try:
        transport.write(request)
        try:
            end_at = await asyncio.wait_for(finished, max(0.0, deadline - time.perf_counter()))
        except TimeoutError:
            return Timeline(sent_at, time.perf_counter(), arrivals, reader.text_events, {}, True)
    finally:
        transport.close()
    done = completed(reader, sent_at, 0.0, end_at)
    return Timeline(sent_at, end_at, arrivals, done.tokens, done.timings, False)
