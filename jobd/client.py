"""The reference client of the control protocol (docs/protocol.md), sync and async.

Both clients share one sans-I/O core, ``_Session``: it numbers requests,
frames them, splits the incoming byte stream into replies and files each reply
under the id of the request it answers (the daemon serves the requests of a
connection concurrently, so replies may come out of order). The clients only
move bytes: ``Client`` with a blocking ``socket``, ``AsyncClient`` with a trio
stream. A reply for a request nobody waits for any more (an abandoned log
stream, a timed-out call) is dropped.

``AsyncClient`` supports concurrent requests from several tasks on one
connection without a background task: whichever waiting task finds its reply
missing and nobody reading becomes the reader, files everything that arrives
and wakes the others. So it needs no nursery and ``async with`` is all it takes.
"""

from __future__ import annotations

import builtins
import contextlib
import itertools
import json
import os
import socket
import stat
from collections import deque
from collections.abc import AsyncIterator, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Self

import trio

from jobd import __version__
from jobd.config import DEFAULT_SOCKET
from jobd.errors import (
    ClientError,
    ConnectionLost,
    DaemonNotRunning,
    ProtocolError,
    RemoteError,
    RequestTooLarge,
)
from jobd.protocol import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_LINE,
    MAX_LIST_LIMIT,
    PROTOCOL_VERSION,
    LineBuffer,
    encode,
)

__all__ = ["AsyncClient", "Client", "default_socket_path"]

DEV_SOCKET = os.path.join(".jobd", "jobd.sock")  # where `jobd --dev` listens, relative to its cwd
RECV_SIZE = 256 * 1024  # bytes read from the socket at a time
# A reply may exceed the daemon's max_line a little (one run as large as the
# request that created it, plus its state), never by this factor.
REPLY_LINE_FACTOR = 4

START_HINT = (
    "start it with `make run` (development) or `systemctl start jobd`,"
    " or point JOBD_SOCKET at its socket"
)
PERMISSION_HINT = (
    "the socket's group and mode decide who may connect (default: mode 0660, group jobd):"
    " ask an admin to add you to that group, or check `ls -l` on the socket (and its"
    " directories) and [daemon] socket_group / socket_mode in jobd.toml"
)
LOST_HINT = "the daemon may have stopped or restarted; check its log (journalctl -u jobd) and retry"

Json = dict[str, Any]


def default_socket_path() -> str:
    """``$JOBD_SOCKET``, else ``./.jobd/jobd.sock`` if it exists (``jobd --dev``), else
    the system socket."""
    env = os.environ.get("JOBD_SOCKET")
    if env:
        return env
    if os.path.exists(DEV_SOCKET):
        return os.path.abspath(DEV_SOCKET)
    return DEFAULT_SOCKET


# -- the sans-I/O core shared by both clients ----------------------------------


@dataclass(frozen=True, slots=True)
class _Reply:
    id: int
    kind: str  # "result", "error" or "event"
    body: Any

    @property
    def final(self) -> bool:
        """Whether this reply ends its request (events come before the final reply)."""
        return self.kind != "event"


class _Session:
    """Request ids, framing and reply matching for one connection; does no I/O."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.max_request = DEFAULT_MAX_LINE  # the daemon's limits.max_line, once known
        self._lines = LineBuffer(REPLY_LINE_FACTOR * DEFAULT_MAX_LINE)
        self._ids = itertools.count(1)
        self._pending: dict[int, deque[_Reply]] = {}  # request id → replies not yet taken
        self._failure: ClientError | None = None  # set once the connection is unusable

    def learn_limits(self, server_info: Json, max_batch: int) -> int:
        """Adopt the limits the daemon announced in its hello result; returns its
        max_batch (``max_batch`` if it announced none)."""
        limits = server_info.get("limits")
        limits = limits if isinstance(limits, dict) else {}
        max_line = limits.get("max_line")
        if isinstance(max_line, int) and max_line > 0:
            self.max_request = max_line
            self._lines.max_line = REPLY_LINE_FACTOR * max(max_line, DEFAULT_MAX_LINE)
        announced = limits.get("max_batch")
        return announced if isinstance(announced, int) and announced > 0 else max_batch

    def request(self, method: str, params: Json) -> tuple[int, bytes]:
        """Number a request; returns its id and the line to send.

        Raises ClientError for what cannot be sent (nothing is sent then):
        NaN or invalid Unicode in the parameters, or a line over the limit."""
        self._raise_failure()
        rid = next(self._ids)
        try:
            line = encode({"id": rid, "method": method, "params": params})
        except (ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
            raise ClientError(
                f"cannot send this {method} request: {_unencodable_reason(exc)}",
                hint="jobd takes strict JSON: UTF-8 text, finite numbers",
            ) from None
        if len(line) - 1 > self.max_request:
            raise RequestTooLarge(
                f"the {method} request is {len(line) - 1} bytes, over the daemon's limit"
                f" of {self.max_request} (limits.max_line); nothing was sent",
                hint="send fewer or smaller runs per request",
            )
        self._pending[rid] = deque()
        return rid, line

    def receive(self, data: bytes) -> None:
        """File the replies in ``data``; ``b""`` means the daemon closed the connection."""
        if not data:
            self.fail(
                ConnectionLost(f"the daemon closed the connection on {self.path}", hint=LOST_HINT)
            )
            return
        try:
            for line in self._lines.feed(data):
                self._file(line)
        except ProtocolError:
            self.fail(
                ClientError(
                    f"a reply from the daemon is longer than this client accepts"
                    f" ({self._lines.max_line} bytes)",
                    hint="ask for less at a time (a smaller list page, fewer ids)",
                )
            )

    def next_reply(self, rids: Collection[int]) -> _Reply | None:
        """The next reply to one of ``rids`` already received, or None: read more."""
        for rid in rids:
            queue = self._pending[rid]
            if queue:
                reply = queue.popleft()
                if reply.final:
                    del self._pending[rid]
                return reply
        self._raise_failure()
        return None

    def forget(self, rid: int) -> None:
        """Nobody waits for ``rid`` any more: drop its replies, now and later."""
        self._pending.pop(rid, None)

    def fail(self, error: ClientError) -> ClientError:
        """Mark the connection unusable (the first reason wins); returns the reason."""
        if self._failure is None:
            self._failure = error
        return self._failure

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure.with_traceback(None)

    def _file(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            self.fail(ClientError("the daemon sent a line that is not JSON", hint=LOST_HINT))
            return
        is_object = isinstance(message, dict)
        kinds = [k for k in ("result", "error", "event") if is_object and k in message]
        if len(kinds) != 1:
            self.fail(ClientError(f"the daemon sent an unexpected message: {line[:200]!r}"))
            return
        rid, kind = message.get("id"), kinds[0]
        if rid is None and kind == "error":
            # An error for no request (invalid_json, too_large): the daemon
            # closes the connection after it, so every waiter gets it.
            self.fail(_remote_error(message["error"]))
        elif isinstance(rid, int) and rid in self._pending:
            self._pending[rid].append(_Reply(rid, kind, message[kind]))

    @staticmethod
    def unwrap(reply: _Reply) -> Any:
        """The result of a final reply, or its error raised as RemoteError."""
        if reply.kind == "error":
            raise _remote_error(reply.body)
        return reply.body


def _remote_error(body: Any) -> RemoteError:
    if not isinstance(body, dict):
        return RemoteError("internal", f"malformed error reply: {body!r}")
    code = str(body.get("code") or "internal")
    hint = body.get("hint")
    return RemoteError(
        code, str(body.get("message") or code), hint=hint if isinstance(hint, str) else None
    )


def _connect_error(path: str, exc: OSError) -> ClientError:
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return DaemonNotRunning(f"jobd is not running: no socket at {path}", hint=START_HINT)
    if isinstance(exc, ConnectionRefusedError) and _is_other_file(path):
        return ClientError(
            f"{path} is not a socket", hint="point JOBD_SOCKET or --socket at the daemon's socket"
        )
    if isinstance(exc, ConnectionRefusedError):
        return DaemonNotRunning(f"jobd is not running: nothing listens on {path}", hint=START_HINT)
    if isinstance(exc, PermissionError):
        return ClientError(f"permission denied connecting to {path}", hint=PERMISSION_HINT)
    return ClientError(
        f"cannot connect to jobd at {path}: {exc.strerror or exc}",
        hint="point JOBD_SOCKET or --socket at the daemon's socket",
    )


def _is_other_file(path: str) -> bool:
    try:
        return not stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _lost(path: str, exc: BaseException) -> ClientError:
    if isinstance(exc, trio.ClosedResourceError):
        return ClientError(f"the connection to {path} was closed by this client")
    return ConnectionLost(f"lost the connection to the daemon on {path}: {exc}", hint=LOST_HINT)


def _unencodable_reason(exc: BaseException) -> str:
    if isinstance(exc, UnicodeEncodeError):
        return "a string is not valid UTF-8 text (undecodable bytes in an argument?)"
    if isinstance(exc, RecursionError):
        return "the parameters are nested too deeply"
    return f"{exc} (NaN and Infinity are not JSON)"


def _hello_params() -> Json:
    return {"protocol": PROTOCOL_VERSION, "client": f"jobd.client {__version__}"}


def _ids(ids: int | Iterable[int]) -> builtins.list[int]:
    return [ids] if isinstance(ids, int) else builtins.list(ids)


def _present(params: dict[str, Any]) -> Json:
    """Leave out parameters that are None, so that callers can pass options through."""
    return {k: v for k, v in params.items() if v is not None}


def _logs_params(run_id: int, attempt: int | None, follow: bool) -> Json:
    return _present({"id": run_id, "attempt": attempt, "follow": follow})


def _event_data(reply: _Reply) -> str | None:
    data = reply.body.get("data") if isinstance(reply.body, dict) else None
    return data if isinstance(data, str) else None


def _first_page(filters: dict[str, Any]) -> Json:
    params = _present(filters)
    params.setdefault("limit", MAX_LIST_LIMIT)  # fewest round trips when reading everything
    return params


def _next_page(params: Json, page: Json) -> Json | None:
    cursor = page.get("next_cursor")
    return {**params, "cursor": cursor} if cursor else None


def _chunks(runs: Sequence[Json], size: int) -> Iterator[builtins.list[Json]]:
    for start in range(0, len(runs), size):
        yield builtins.list(runs[start : start + size])


@dataclass(slots=True)
class _Chunk:
    index: tuple[int, ...]  # position in submission order; halves of a split extend it
    runs: builtins.list[Json]


class _Pipeline:
    """Submit chunks in flight (at most ``window``) and their run ids, in submission order.

    Chunks hold at most ``max_batch`` runs; one whose request line would be
    over the daemon's ``max_line`` is split in halves (``split``)."""

    def __init__(self, batches: Iterable[Sequence[Json]], window: int, size: int) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        chunks = (chunk for batch in batches for chunk in _chunks(batch, size))
        self._chunks = (_Chunk((i,), runs) for i, runs in enumerate(chunks))
        self._halves: builtins.list[_Chunk] = []  # split chunks, sent before the rest
        self._window = window
        self._done = False
        self.in_flight: dict[int, tuple[int, ...]] = {}  # request id → chunk index
        self._ids: dict[tuple[int, ...], builtins.list[int]] = {}  # chunk index → run ids

    def next_chunk(self) -> _Chunk | None:
        """The next chunk to send, or None while the window is full or all are sent."""
        if len(self.in_flight) >= self._window:
            return None
        if self._halves:
            return self._halves.pop()
        if self._done:
            return None
        chunk = next(self._chunks, None)
        self._done = chunk is None
        return chunk

    def split(self, chunk: _Chunk, too_large: RequestTooLarge) -> None:
        """``chunk`` was too large to send: send its halves instead."""
        if len(chunk.runs) < 2:
            raise too_large
        half = len(chunk.runs) // 2
        self._halves.append(_Chunk((*chunk.index, 1), chunk.runs[half:]))
        self._halves.append(_Chunk((*chunk.index, 0), chunk.runs[:half]))

    def sent(self, rid: int, chunk: _Chunk) -> None:
        self.in_flight[rid] = chunk.index

    def answered(self, rid: int, result: Json) -> None:
        self._ids[self.in_flight.pop(rid)] = [int(i) for i in result["ids"]]

    def ids(self) -> builtins.list[int]:
        return [i for index in sorted(self._ids) for i in self._ids[index]]


# -- the blocking client ----------------------------------------------------


class Client:
    """A blocking connection to jobd. Not thread-safe: one connection per thread.

    ``timeout`` (seconds, None: forever) bounds connecting and each wait for a
    reply, except where waiting is the point: ``wait(ids, timeout=t)`` allows
    ``t`` more (and blocks as long as it takes without ``t``), and
    ``logs(follow=True)`` waits for output as long as the run lasts.
    """

    max_batch = DEFAULT_MAX_BATCH  # runs per submit request (the daemon's limits.max_batch)

    def __init__(
        self, path: str | os.PathLike[str] | None = None, timeout: float | None = None
    ) -> None:
        self.path = os.fspath(path) if path is not None else default_socket_path()
        self.timeout = timeout
        self._connect()

    def _connect(self) -> None:
        self._session = _Session(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(self.timeout)
            try:
                self._sock.connect(self.path)
            except OSError as exc:
                raise _connect_error(self.path, exc) from exc
            self.server_info: Json = self.call("hello", _hello_params())
            self.max_batch = self._session.learn_limits(self.server_info, self.max_batch)
        except BaseException:
            self._sock.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.fail(ClientError(f"the connection to {self.path} was closed by this client"))
        self._sock.close()

    # -- the protocol's methods

    def call(self, method: str, params: Json | None = None) -> Any:
        """Send any request and return its result (events of a streaming method are dropped)."""
        return self._call(method, params or {}, self.timeout)

    def submit(self, **fields: Any) -> int:
        """Submit one run (``command=[...]``, ``shell=...`` or ``call=...``, and options)."""
        return int(self.call("submit", fields)["id"])

    def submit_many(self, runs: Sequence[Json]) -> builtins.list[int]:
        """Submit runs in batches of ``max_batch``, one after the other: ids come in order."""
        return self.submit_batches([runs], window=1)

    def submit_batches(
        self, batches: Iterable[Sequence[Json]], window: int = 4
    ) -> builtins.list[int]:
        """Submit batches with up to ``window`` requests in flight; run ids in batch order.

        Pipelining hides the round trip and the daemon's commit behind the
        next batch's transfer (the throughput benchmark's path). Batches over
        ``max_batch`` are split; ``window`` must stay within the daemon's
        ``limits.max_inflight`` (else ``busy``). On an error, other batches in
        flight may have been accepted.
        """
        pipe = _Pipeline(batches, window, self.max_batch)
        try:
            while True:
                while (chunk := pipe.next_chunk()) is not None:
                    try:
                        pipe.sent(self._send("submit", {"runs": chunk.runs}), chunk)
                    except RequestTooLarge as exc:
                        pipe.split(chunk, exc)
                if not pipe.in_flight:
                    return pipe.ids()
                reply = self._reply(pipe.in_flight, self.timeout)
                if reply.final:
                    pipe.answered(reply.id, self._session.unwrap(reply))
        finally:
            for rid in pipe.in_flight:
                self._session.forget(rid)

    def get(self, id: int) -> Json:
        """The run object with its ``attempt_list``."""
        result: Json = self.call("get", {"id": id})
        return result

    def list(self, **filters: Any) -> Json:
        """One page: ``{"runs": [...], "next_cursor": ...}``. None-valued filters are left out."""
        result: Json = self.call("list", _present(filters))
        return result

    def iter_runs(self, **filters: Any) -> Iterator[Json]:
        """Every run matching the filters, newest first, following cursors.

        ``limit`` is the page size here (default the maximum, 1000).
        """
        params: Json | None = _first_page(filters)
        while params is not None:
            page: Json = self.call("list", params)
            yield from page["runs"]
            params = _next_page(params, page)

    def cancel(self, ids: int | Iterable[int]) -> Json:
        """``{"results": {"7": "cancelled", ...}}``."""
        result: Json = self.call("cancel", {"ids": _ids(ids)})
        return result

    def wait(self, ids: int | Iterable[int], timeout: float | None = None) -> Json:
        """Block until every run is terminal or ``timeout`` seconds pass (``timed_out``)."""
        read_timeout = None if timeout is None or self.timeout is None else timeout + self.timeout
        result: Json = self._call(
            "wait", _present({"ids": _ids(ids), "timeout": timeout}), read_timeout
        )
        return result

    def logs(self, id: int, attempt: int | None = None, follow: bool = False) -> Iterator[str]:
        """The captured output of an attempt (default: the latest), chunk by chunk.

        With ``follow`` it streams until the run is terminal. Abandoning a
        followed stream early leaves the daemon sending it: close the client.
        """
        rid = self._send("logs", _logs_params(id, attempt, follow))
        timeout = None if follow else self.timeout
        try:
            while not (reply := self._reply((rid,), timeout)).final:
                if (data := _event_data(reply)) is not None:
                    yield data
            self._session.unwrap(reply)
        finally:
            self._session.forget(rid)

    def stats(self) -> Json:
        result: Json = self.call("stats", {})
        return result

    # -- moving bytes

    def _call(self, method: str, params: Json, timeout: float | None) -> Any:
        try:
            return self._call_once(method, params, timeout)
        except RemoteError as exc:
            if exc.code != "idle":
                raise
        # The daemon closed the connection for idleness and read nothing after
        # saying so: the request was not seen, and is sent again on a new one.
        self._sock.close()
        self._connect()
        return self._call_once(method, params, timeout)

    def _call_once(self, method: str, params: Json, timeout: float | None) -> Any:
        rid = self._send(method, params)
        try:
            while not (reply := self._reply((rid,), timeout)).final:
                pass
            return self._session.unwrap(reply)
        finally:
            self._session.forget(rid)

    def _send(self, method: str, params: Json) -> int:
        rid, line = self._session.request(method, params)
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(line)
        except OSError as exc:
            # Part of the line may be on the wire: nothing more can be sent after it.
            self._session.forget(rid)
            self._read_what_is_left()  # the daemon may have said why it closed
            raise self._session.fail(_lost(self.path, exc)) from exc
        return rid

    def _read_what_is_left(self) -> None:
        """File whatever the daemon sent before it closed (an ``idle`` error, say)."""
        with contextlib.suppress(OSError):
            self._sock.setblocking(False)
            while data := self._sock.recv(RECV_SIZE):
                self._session.receive(data)
            self._session.receive(b"")

    def _reply(self, rids: Collection[int], timeout: float | None) -> _Reply:
        while (reply := self._session.next_reply(rids)) is None:
            self._sock.settimeout(timeout)
            try:
                data = self._sock.recv(RECV_SIZE)
            except TimeoutError:
                raise ConnectionLost(
                    f"no reply from jobd on {self.path} within {timeout:g}s",
                    hint="the daemon may be overloaded or stuck: check its log, or allow a"
                    " longer timeout",
                ) from None
            except OSError as exc:
                self._session.fail(_lost(self.path, exc))
                continue
            self._session.receive(data)
        return reply


# -- the trio client --------------------------------------------------------


class AsyncClient:
    """A trio connection to jobd: ``async with AsyncClient(path) as client: ...``.

    Several tasks may send requests on one client at once. There is no
    timeout parameter: use trio's cancel scopes (``trio.fail_after``). A task
    cancelled while its request was being written leaves the connection
    unusable (the daemon would see half a line); cancelled while waiting for
    a reply, it is harmless.
    """

    max_batch = DEFAULT_MAX_BATCH  # runs per submit request (the daemon's limits.max_batch)

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = os.fspath(path) if path is not None else default_socket_path()
        self.server_info: Json = {}
        self._session = _Session(self.path)
        self._stream: trio.SocketStream | None = None
        self._send_lock = trio.Lock()
        self._reading = False  # a task is inside receive_some
        self._arrived = trio.Event()  # set (and replaced) after each read

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def connect(self) -> None:
        """Connect and say hello (done by ``async with``)."""
        try:
            self._stream = await trio.open_unix_socket(self.path)
        except OSError as exc:
            raise _connect_error(self.path, exc) from exc
        try:
            self.server_info = await self.call("hello", _hello_params())
            self.max_batch = self._session.learn_limits(self.server_info, self.max_batch)
        except BaseException:
            await trio.aclose_forcefully(self._stream)
            raise

    async def aclose(self) -> None:
        self._session.fail(ClientError(f"the connection to {self.path} was closed by this client"))
        if self._stream is not None:
            await self._stream.aclose()

    # -- the protocol's methods (see Client for what each returns)

    async def call(self, method: str, params: Json | None = None) -> Any:
        rid = await self._send(method, params or {})
        try:
            while not (reply := await self._reply((rid,))).final:
                pass
            return self._session.unwrap(reply)
        finally:
            self._session.forget(rid)

    async def submit(self, **fields: Any) -> int:
        return int((await self.call("submit", fields))["id"])

    async def submit_many(self, runs: Sequence[Json]) -> builtins.list[int]:
        return await self.submit_batches([runs], window=1)

    async def submit_batches(
        self, batches: Iterable[Sequence[Json]], window: int = 4
    ) -> builtins.list[int]:
        pipe = _Pipeline(batches, window, self.max_batch)
        try:
            while True:
                while (chunk := pipe.next_chunk()) is not None:
                    try:
                        pipe.sent(await self._send("submit", {"runs": chunk.runs}), chunk)
                    except RequestTooLarge as exc:
                        pipe.split(chunk, exc)
                if not pipe.in_flight:
                    return pipe.ids()
                reply = await self._reply(pipe.in_flight)
                if reply.final:
                    pipe.answered(reply.id, self._session.unwrap(reply))
        finally:
            for rid in pipe.in_flight:
                self._session.forget(rid)

    async def get(self, id: int) -> Json:
        result: Json = await self.call("get", {"id": id})
        return result

    async def list(self, **filters: Any) -> Json:
        result: Json = await self.call("list", _present(filters))
        return result

    async def iter_runs(self, **filters: Any) -> AsyncIterator[Json]:
        params: Json | None = _first_page(filters)
        while params is not None:
            page: Json = await self.call("list", params)
            for run in page["runs"]:
                yield run
            params = _next_page(params, page)

    async def cancel(self, ids: int | Iterable[int]) -> Json:
        result: Json = await self.call("cancel", {"ids": _ids(ids)})
        return result

    async def wait(self, ids: int | Iterable[int], **params: Any) -> Json:
        """``wait(ids, timeout=30)`` as in Client: ``timeout`` is the daemon's.

        It goes through ``params`` because an async function's own timeout
        parameter is an anti-pattern in trio (ruff ASYNC109), and this one is
        not local: the daemon answers with ``timed_out`` and the current
        states. A local deadline is a cancel scope (``trio.fail_after``).
        """
        result: Json = await self.call("wait", _present({**params, "ids": _ids(ids)}))
        return result

    async def logs(
        self, id: int, attempt: int | None = None, follow: bool = False
    ) -> AsyncIterator[str]:
        rid = await self._send("logs", _logs_params(id, attempt, follow))
        try:
            while not (reply := await self._reply((rid,))).final:
                if (data := _event_data(reply)) is not None:
                    yield data
            self._session.unwrap(reply)
        finally:
            self._session.forget(rid)

    async def stats(self) -> Json:
        result: Json = await self.call("stats", {})
        return result

    # -- moving bytes

    async def _send(self, method: str, params: Json) -> int:
        if self._stream is None:
            raise ClientError("AsyncClient is not connected: use `async with AsyncClient(...)`")
        rid, line = self._session.request(method, params)
        try:
            async with self._send_lock:
                # Raise a pending cancellation before a single byte is written...
                await trio.lowlevel.checkpoint_if_cancelled()
                try:
                    await self._stream.send_all(line)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise self._session.fail(_lost(self.path, exc)) from exc
                except BaseException as exc:
                    # ...because after that, part of the line may be on the wire.
                    self._session.fail(_lost(self.path, exc))
                    raise
        except BaseException:
            self._session.forget(rid)
            raise
        return rid

    async def _reply(self, rids: Collection[int]) -> _Reply:
        while (reply := self._session.next_reply(rids)) is None:
            if self._reading:
                await self._arrived.wait()  # the reader files our reply, if it comes
            else:
                await self._read()
        return reply

    async def _read(self) -> None:
        assert self._stream is not None
        self._reading = True
        try:
            data = await self._stream.receive_some(RECV_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._session.fail(_lost(self.path, exc))
        else:
            self._session.receive(data)
        finally:
            self._reading = False
            # Wake every waiter: its reply may have come, or it may be the next reader.
            self._arrived.set()
            self._arrived = trio.Event()
