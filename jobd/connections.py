"""One client connection, and the limits that keep any one of them, or any one
user, from stopping, slowing down or exhausting the daemon for the others.

Every local user may be hostile, and jobd usually runs as root. So:

- **Slots.** Each non-admin uid may hold ``max_connections_per_uid``
  connections, and non-admins together all but ``admin_reserved_connections``
  of ``max_connections``: one user cannot lock the socket, and an operator
  can always get in. A caller with no role is answered ``hello`` and closed.
  A refused connection gets its ``busy`` error *delivered*: what the client
  sent is read (briefly) before the close, so the error is not destroyed by
  a reset.
- **Time.** A connection must say hello within ``hello_timeout``; one with
  nothing in flight is closed after ``idle_timeout`` (an ``idle`` error is
  sent first; whatever the client sent after it was never read, so a client
  may reconnect and send it again). A client that leaves a reply unread for
  ``send_timeout`` is gone: its connection is closed and all its work stops.
- **Memory.** Request bytes a non-admin uid has buffered (an unfinished line)
  or being served count against ``max_input_per_uid``, and all non-admins
  together against ``max_input_total``: past that the daemon stops reading
  from them (backpressure through the socket) until some are answered.
  Replies waiting for a slow reader stop the reading too. A connection
  computes ``REQUESTS_AT_ONCE`` replies at a time (the rest wait their turn,
  so a connection pipelining a thousand requests cannot starve the others)
  and streams ``STREAMS_AT_ONCE`` logs at a time (each holds one chunk).
- **Abandoned work stops.** When the client is gone (a send fails, or it
  left a reply unread for ``send_timeout``) its reads, log streams and long
  polls are cancelled and nothing more is read from it. A change it asked
  for (``submit``, ``cancel``) that the daemon received is still made: only
  its reply is dropped. A client that merely half-closes still gets its
  answers, except long polls (``wait``, ``logs`` with ``follow``), which
  nobody could read after its last request.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from jobd.errors import ProtocolError
from jobd.protocol import ErrorCode, Role, encode

RECEIVE_CHUNK = 65536  # bytes read from a client socket at a time
LINGER_SECONDS = 5.0  # seconds spent reading and discarding input after a fatal error
LINGER_BYTES = 16 * 1024 * 1024  # bytes discarded at most after a fatal error
REFUSAL_LINGER_SECONDS = 1.0  # seconds a refused connection is read before it is closed
REFUSAL_LINGER_BYTES = 64 * 1024  # bytes read at most from a refused connection
MAX_LINGERING = 64  # refused connections being drained at once; more are closed at once
REQUESTS_AT_ONCE = 4  # requests of one connection being answered at once
STREAMS_AT_ONCE = 2  # logs streams of one connection sending at once


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


@dataclass(eq=False)
class Connection:
    stream: trio.SocketStream
    peer: Peer
    role: Role
    send_timeout: float
    hello: bool = False
    inflight: int = 0
    unsent: int = 0  # bytes of replies computed but not yet written
    sent: trio.Event = field(default_factory=trio.Event)  # set (and replaced) per reply written
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    closed: bool = False
    #: the scopes of the work that stops when the client is gone (reads, long polls)
    cancellable: tuple[trio.CancelScope, ...] = ()
    work: trio.CapacityLimiter = field(
        default_factory=lambda: trio.CapacityLimiter(REQUESTS_AT_ONCE)
    )
    streams: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(STREAMS_AT_ONCE))
    #: when the connection last had nothing in flight (trio time), for idle_timeout
    idle_since: float = field(default_factory=trio.current_time)
    #: the reader's scope; its deadline is hello_timeout, then follows idleness
    receiving: trio.CancelScope | None = None
    idle_timeout: float = math.inf
    #: bytes of an unfinished request line, counted against the uid's input budget
    buffered: int = 0

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_line(encode(message))

    async def send_line(self, line: bytes) -> None:
        """Write a line; a client that does not take it within ``send_timeout``,
        or that is gone, ends the connection and everything it runs."""
        if self.closed:
            return  # gone: the scope is cancelled, the caller stops at its next checkpoint
        lock = self.send_lock
        try:
            lock.acquire_nowait()  # free, as it nearly always is: no scheduler pass
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if self.closed:  # it may have closed while this waited for the lock
                return
            # Most lines fit in the socket's buffer: one write, no timer. A write
            # that would block goes on through trio, bounded in time.
            sock = getattr(self.stream, "socket", None)  # a SocketStream's; tests use others
            try:
                # fileno() each time: -1 once closed, never a number reused since.
                sent = os.write(sock.fileno(), line) if sock is not None else 0
            except BlockingIOError:
                sent = 0
            if sent == len(line):
                return
            with trio.move_on_after(self.send_timeout) as timer:
                await self.stream.send_all(memoryview(line)[sent:])
            if timer.cancelled_caught:
                self.gone()  # it stopped reading: part of a line may be out; nothing more can be
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.gone()  # EPIPE, ECONNRESET: the client went away
        finally:
            lock.release()

    def gone(self) -> None:
        """The client went away or stopped reading: stop what it asked to read."""
        self.closed = True
        for scope in self.cancellable:
            scope.cancel()
        self.sent.set()  # a reader waiting for room sees the connection closed

    async def reply(self, line: bytes) -> None:
        """Send a computed reply, accounted in ``unsent`` until it is written."""
        self.unsent += len(line)
        try:
            await self.send_line(line)
        finally:
            self.unsent -= len(line)
            self.sent.set()
            self.sent = trio.Event()

    async def room_to_read(self, limit: int) -> None:
        """Wait while more than ``limit`` bytes of replies wait for the client."""
        while self.unsent > limit and not self.closed:
            await self.sent.wait()

    def started(self) -> None:
        """A request is now in flight: the connection is not idle."""
        self.inflight += 1
        if self.inflight == 1 and self.receiving is not None:
            self.receiving.deadline = math.inf

    def finished(self) -> None:
        """A request left flight; with none left, the idle clock starts."""
        self.inflight -= 1
        if self.inflight == 0:
            self.idle_now()

    def idle_now(self) -> None:
        """Nothing in flight from now on: closed after idle_timeout unless a request comes."""
        self.idle_since = trio.current_time()
        if self.receiving is not None:
            self.receiving.deadline = self.idle_since + self.idle_timeout

    async def error(self, request_id: Any, exc: ProtocolError) -> None:
        await self.send_line(error_line(request_id, exc))

    async def fatal(
        self,
        exc: ProtocolError,
        *,
        linger: float = LINGER_SECONDS,
        linger_bytes: int = LINGER_BYTES,
    ) -> None:
        """Send an error after which the connection is closed, and make sure it arrives.

        The client may still be writing (the rest of an oversized line, or its
        hello): closing with unread input would reset the connection and
        destroy the error before the client reads it. So: send, shut our side,
        then read and discard (for a bounded time and size) until the client
        closes."""
        await self.error(exc.request_id, exc)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            # Under the send lock like every send: replies queued behind the
            # error must not write while the stream shuts down (trio refuses
            # two senders at once), and after it nothing more is sent.
            async with self.send_lock:
                self.closed = True
                await self.stream.send_eof()
            with trio.move_on_after(linger):
                discarded = 0
                while discarded < linger_bytes:
                    data = await self.stream.receive_some(RECEIVE_CHUNK)
                    if not data:
                        break
                    discarded += len(data)


def error_line(request_id: Any, exc: ProtocolError) -> bytes:
    err: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.hint:
        err["hint"] = exc.hint
    return encode({"id": request_id, "error": err})


class Slots:
    """Connection slots per uid and in total, with a reserve for admins."""

    def __init__(self, total: int, per_uid: int, admin_reserved: int) -> None:
        self.total = total
        self.per_uid = per_uid
        self.admin_reserved = admin_reserved
        self.used = 0
        self.by_uid: dict[int, int] = {}
        self.lingering = 0  # refused connections being drained before their close

    def refusal(self, uid: int, role: Role) -> ProtocolError | None:
        """Why a new connection of ``uid`` is refused, or None: take a slot."""
        if role >= Role.ADMIN:
            if self.used >= self.total:
                return _busy(f"too many connections (limit {self.total}, admins included)")
            return None
        if self.by_uid.get(uid, 0) >= self.per_uid:
            return _busy(
                f"too many connections from uid {uid} (limit {self.per_uid} per user)",
                hint="close idle clients, or raise limits.max_connections_per_uid",
            )
        if self.used >= self.total - self.admin_reserved:
            return _busy(
                f"too many connections (limit {self.total}, of which"
                f" {self.admin_reserved} are kept for admins)"
            )
        return None

    @contextlib.contextmanager
    def held(self, uid: int) -> Iterator[None]:
        self.used += 1
        self.by_uid[uid] = self.by_uid.get(uid, 0) + 1
        try:
            yield
        finally:
            self.used -= 1
            if self.by_uid[uid] == 1:
                del self.by_uid[uid]
            else:
                self.by_uid[uid] -= 1


def _busy(
    message: str, hint: str = "close idle clients, or raise limits.max_connections"
) -> ProtocolError:
    return ProtocolError(ErrorCode.BUSY, message, hint=hint)


class InputBudget:
    """Bytes of request lines buffered or being served, per non-admin uid and
    for all non-admins together. Admins are not counted: root always gets in."""

    def __init__(self, per_uid: int, total: int) -> None:
        self.per_uid = per_uid
        self.total = total
        self.used = 0
        self.by_uid: dict[int, int] = {}
        self._freed = trio.Event()

    def charge(self, uid: int, delta: int) -> None:
        """Count ``delta`` more bytes (negative: fewer) against ``uid``."""
        if delta == 0:
            return
        self.used += delta
        left = self.by_uid.get(uid, 0) + delta
        if left:
            self.by_uid[uid] = left
        else:
            self.by_uid.pop(uid, None)
        if delta < 0:
            self._freed.set()
            self._freed = trio.Event()

    def full(self, uid: int) -> bool:
        return self.by_uid.get(uid, 0) >= self.per_uid or self.used >= self.total

    async def freed(self) -> None:
        """Wait until some bytes are released (by anyone: check ``full`` again)."""
        await self._freed.wait()
