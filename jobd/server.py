"""The control server: the Unix socket, peer-credential authorisation, framing,
and one handler per method (``handle_<method>``), which call into the daemon.

A connection is served by one reader task. Requests after ``hello`` run
concurrently (up to ``max_inflight`` per connection) and reply in any order.
A client that disconnects mid-request does not disturb anything: state
changes already handed to the daemon are committed, the reply is dropped,
and long-polls (``wait``, ``logs --follow``) are cancelled.

Memory per connection is bounded: at most ``max_inflight`` requests are
being answered, and while more than ``max_line`` bytes of replies wait for a
client that does not read them, the reader stops reading its requests
(backpressure through the socket, instead of an ever-growing reply queue).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import math
import os
import pwd
import socket as stdsocket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from jobd import __version__, files
from jobd.config import AccessConfig, Config
from jobd.core.model import Kind, State
from jobd.errors import JobdError, JournalError, ProtocolError, RequestError
from jobd.protocol import (
    DEFAULT_LIST_LIMIT,
    MAX_LIST_LIMIT,
    MAX_RUN_ID,
    METHODS,
    PROTOCOL_VERSION,
    ErrorCode,
    LineBuffer,
    Request,
    Role,
    check_params,
    encode,
    invalid,
    not_found,
    parse_request,
    parse_submissions,
    run_id_param,
    run_ids_param,
)

if TYPE_CHECKING:
    from jobd.daemon import Daemon

log = logging.getLogger("jobd.server")

RECEIVE_CHUNK = 65536  # bytes read from a client socket at a time
LINGER_SECONDS = 5.0  # seconds spent reading and discarding input after a fatal error
LINGER_BYTES = 64 * 1024 * 1024  # bytes discarded at most after a fatal error
LIST_REPLY_OVERHEAD = 256  # bytes of a list reply besides its runs (id, cursor, framing)


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: trio.socket.SocketType) -> Peer:
    raw = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


class Access:
    """Maps a uid to its role from ``[access]``. Root and the daemon's uid are admins."""

    def __init__(self, config: AccessConfig) -> None:
        self.config = config
        self.daemon_uid = os.getuid()

    def role_for(self, uid: int, gid: int) -> Role:
        if uid in (0, self.daemon_uid):
            return Role.ADMIN
        try:
            user = pwd.getpwuid(uid).pw_name
            groups = {grp.getgrgid(g).gr_name for g in os.getgrouplist(user, gid)}
        except (KeyError, OSError):
            user, groups = str(uid), set()
        names = {user, str(uid)} | {f"@{g}" for g in groups}
        for role, members in (
            (Role.ADMIN, self.config.admin),
            (Role.SUBMIT, self.config.submit),
            (Role.READ, self.config.read),
        ):
            if names.intersection(members):
                return role
        return Role.NONE


@dataclass(eq=False)
class Connection:
    stream: trio.SocketStream
    peer: Peer
    role: Role
    hello: bool = False
    inflight: int = 0
    unsent: int = 0  # bytes of replies computed but not yet written
    sent: trio.Event = field(default_factory=trio.Event)  # set (and replaced) per reply written
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    closed: bool = False

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_line(encode(message))

    async def send_line(self, line: bytes) -> None:
        if self.closed:
            return
        try:
            async with self.send_lock:
                if not self.closed:  # it may have closed while this waited for the lock
                    await self.stream.send_all(line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed = True  # the client went away; nothing to do

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

    async def error(self, request_id: Any, exc: ProtocolError) -> None:
        await self.send_line(_error_line(request_id, exc))

    async def fatal(self, exc: ProtocolError) -> None:
        """Send an error after which the connection is closed, and make sure it arrives.

        The client may still be writing the rest of an oversized line: closing
        with unread input would reset the connection and destroy the error
        before the client reads it. So: send, shut our side, then read and
        discard (for a bounded time and size) until the client closes."""
        await self.error(exc.request_id, exc)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            # Under the send lock like every send: replies queued behind the
            # error must not write while the stream shuts down (trio refuses
            # two senders at once), and after it nothing more is sent.
            async with self.send_lock:
                self.closed = True
                await self.stream.send_eof()
            with trio.move_on_after(LINGER_SECONDS):
                discarded = 0
                while discarded < LINGER_BYTES:
                    data = await self.stream.receive_some(RECEIVE_CHUNK)
                    if not data:
                        break
                    discarded += len(data)


Handler = Callable[["Server", Connection, dict[str, Any], Request], Awaitable[Any]]


class Server:
    def __init__(self, config: Config, daemon: Daemon) -> None:
        self.config = config
        self.daemon = daemon
        self.access = Access(config.access)
        self.connections = 0
        self._accept_scope = trio.CancelScope()
        self.bound = False  # whether the socket file is ours to remove

    # -- the socket ---------------------------------------------------------

    async def open_socket(self) -> trio.SocketListener:
        """Bind the control socket with a restrictive mode, replacing a stale one.

        Called before the executor starts: the umask is process-wide."""
        path = self.config.socket
        try:
            # Reachable by the socket's users (the daemon's umask is 077):
            # the socket's own mode is what restricts access.
            files.create_dirs(path.parent, 0o755)
        except OSError as exc:
            raise JobdError(
                f"cannot create {path.parent}: {exc.strerror}",
                hint="create it, or set daemon.socket to a writable place",
            ) from exc
        _replace_stale_socket(path)
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # never more open than 0600, not even for an instant
        try:
            await sock.bind(str(path))
            self.bound = True
        except OSError as exc:
            sock.close()
            raise JobdError(
                f"cannot bind the control socket {path}: {exc.strerror}",
                hint="check the directory's permissions",
            ) from exc
        finally:
            os.umask(old_umask)
        os.chmod(path, self.config.socket_mode)
        if self.config.socket_group:
            # Access depends on it: a socket its users cannot reach is a failed start.
            try:
                os.chown(path, -1, grp.getgrnam(self.config.socket_group).gr_gid)
            except (KeyError, OSError) as exc:
                sock.close()
                reason = exc.strerror if isinstance(exc, OSError) else "no such group"
                raise JobdError(
                    f"cannot give the control socket {path} to group"
                    f" {self.config.socket_group}: {reason}",
                    hint="run jobd as root or as a member of that group, or change"
                    " daemon.socket_group",
                ) from exc
        sock.listen(128)
        return trio.SocketListener(sock)

    async def serve(
        self,
        listener: trio.SocketListener,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections until ``stop_accepting``; serve the open ones until cancelled."""
        async with trio.open_nursery() as handlers:
            with self._accept_scope:
                task_status.started()
                await trio.serve_listeners(
                    self._serve_connection, [listener], handler_nursery=handlers
                )

    def stop_accepting(self) -> None:
        """Close the listening socket; connections already open are still served."""
        self._accept_scope.cancel()

    # -- one connection -----------------------------------------------------

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            peer = peer_credentials(stream.socket)
        except OSError:
            await stream.aclose()
            return
        conn = Connection(stream, peer, self.access.role_for(peer.uid, peer.gid))
        self.connections += 1
        try:
            if self.connections > self.config.max_connections:
                await conn.error(
                    None,
                    ProtocolError(
                        ErrorCode.BUSY,
                        f"too many connections (limit {self.config.max_connections})",
                        hint="close idle clients, or raise limits.max_connections",
                    ),
                )
                return
            async with trio.open_nursery() as requests, trio.open_nursery() as polls:
                await self._read_requests(conn, requests, polls)
                polls.cancel_scope.cancel()  # nobody is left to hear a long-poll's answer
        except* Exception:
            # A bug in serving one connection closes that connection, never the
            # daemon: the other clients and every run go on. (except*: the error
            # may come in a group with trio.Cancelled, which goes on up.)
            log.exception("internal error serving a connection of uid %d; closing it", peer.uid)
        finally:
            self.connections -= 1
            conn.closed = True
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.aclose()

    async def _read_requests(
        self, conn: Connection, requests: trio.Nursery, polls: trio.Nursery
    ) -> None:
        buffer = LineBuffer(self.config.max_line)
        # A connection that never says hello would hold one of max_connections
        # slots for ever: it gets hello_timeout to do so.
        hello_deadline = trio.CancelScope(deadline=trio.current_time() + self.config.hello_timeout)
        with hello_deadline:
            while True:
                await conn.room_to_read(self.config.max_line)
                try:
                    data = await conn.stream.receive_some(RECEIVE_CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    if buffer.rest.strip():
                        await conn.error(
                            None,
                            ProtocolError(
                                ErrorCode.INVALID_REQUEST,
                                "the connection ended inside a line: a request must end"
                                " with a newline",
                            ),
                        )
                    return
                try:
                    lines = buffer.feed(data)
                except ProtocolError as exc:
                    await conn.fatal(exc)
                    return
                for line in lines:
                    if not line.strip():
                        continue
                    try:
                        request = parse_request(line)
                    except ProtocolError as exc:
                        if exc.code == ErrorCode.INVALID_JSON:
                            await conn.fatal(exc)  # garbage: the stream cannot be trusted
                            return
                        await conn.error(exc.request_id, exc)
                        continue
                    if not conn.hello or request.method == "hello":  # hello has no handler
                        await self._hello(conn, request)
                        if conn.hello:
                            hello_deadline.deadline = math.inf
                        continue
                    if conn.inflight >= self.config.max_inflight:
                        await conn.error(
                            request.id,
                            ProtocolError(
                                ErrorCode.BUSY,
                                f"more than {self.config.max_inflight} requests in"
                                " flight on this connection",
                                hint="wait for replies before sending more",
                            ),
                        )
                        continue
                    conn.inflight += 1
                    nursery = polls if _is_long_poll(request) else requests
                    nursery.start_soon(self._dispatch, conn, request)
        if hello_deadline.cancelled_caught:
            await conn.error(
                None,
                ProtocolError(
                    ErrorCode.HELLO_REQUIRED,
                    f"no hello within {self.config.hello_timeout:g}s: closing the connection",
                    hint="send hello first (docs/protocol.md)",
                ),
            )

    async def _hello(self, conn: Connection, request: Request) -> None:
        if request.method != "hello":
            await conn.error(
                request.id,
                ProtocolError(
                    ErrorCode.HELLO_REQUIRED,
                    "the first request must be 'hello'",
                    hint=f'send {{"id": 1, "method": "hello", "params": {{"protocol":'
                    f" {PROTOCOL_VERSION}}}}}",
                ),
            )
            return
        version = request.params.get("protocol", PROTOCOL_VERSION)
        if type(version) is not int or version != PROTOCOL_VERSION:  # not true, not 1.0
            await conn.error(
                request.id,
                ProtocolError(
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"protocol version {version!r} is not supported; this daemon speaks"
                    f" {PROTOCOL_VERSION}",
                    hint="use a jobctl of the same release as the daemon",
                ),
            )
            return
        conn.hello = True
        roles = [r.name.lower() for r in Role if Role.NONE < r <= conn.role]
        c = self.config
        await conn.send(
            {
                "id": request.id,
                "result": {
                    "protocol": PROTOCOL_VERSION,
                    "server": f"jobd {__version__}",
                    "pid": os.getpid(),
                    "uid": conn.peer.uid,
                    "roles": roles,
                    "limits": {
                        "max_line": c.max_line,
                        "max_batch": c.max_batch,
                        "max_inflight": c.max_inflight,
                    },
                },
            }
        )

    async def _dispatch(self, conn: Connection, request: Request) -> None:
        try:
            line = await self._answer(conn, request)
        finally:
            conn.inflight -= 1  # free the slot before the client can see the answer
        await conn.reply(line)

    async def _answer(self, conn: Connection, request: Request) -> bytes:
        """The reply line to a request (streaming methods send their events themselves)."""
        try:
            handler = HANDLERS.get(request.method)
            needed = METHODS.get(request.method)
            if handler is None or needed is None:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_METHOD,
                    f"unknown method {request.method!r}",
                    hint=f"methods: {', '.join(sorted(METHODS))}",
                )
            if conn.role < needed:
                raise _forbidden(f"{request.method} needs the {needed.name.lower()} role")
            check_params(request.method, request.params)
            result = await handler(self, conn, request.params, request)
            return encode({"id": request.id, "result": result})
        except ProtocolError as exc:
            return _error_line(request.id, exc)
        except JournalError as exc:
            return _error_line(
                request.id, ProtocolError(ErrorCode.UNAVAILABLE, exc.message, hint=exc.hint)
            )
        except Exception:
            log.exception("internal error serving %s", request.method)
            return _error_line(
                request.id,
                ProtocolError(
                    ErrorCode.INTERNAL,
                    f"internal error serving {request.method}",
                    hint="this is a bug in jobd; the daemon log has the traceback",
                ),
            )

    # -- handlers -------------------------------------------------------------

    async def handle_submit(
        self, conn: Connection, params: dict[str, Any], request: Request
    ) -> Any:
        new_runs = parse_submissions(params, self.config.max_batch, conn.peer.uid)
        pools = self.config.pools
        for i, run in enumerate(new_runs):
            where = f"runs[{i}]" if "runs" in params else "params"
            pool = pools.get(run.pool)
            if pool is None:
                raise invalid(
                    f"{where}.pool: no pool named {run.pool!r}",
                    hint=f"configured pools: {', '.join(sorted(pools))}",
                )
            is_call = run.spec.kind is Kind.CALL
            if is_call and pool.kind != "thread":
                threads = [p.name for p in pools.values() if p.kind == "thread"] or ["none"]
                raise invalid(
                    f"{where}: pool {run.pool!r} runs commands; callables need a"
                    f' pool of kind "thread"',
                    hint=f"thread pools: {', '.join(threads)}",
                )
            if not is_call and pool.kind != "process":
                raise invalid(
                    f"{where}: pool {run.pool!r} runs Python callables; commands"
                    ' need a pool of kind "process"'
                )
            if is_call and conn.role < Role.ADMIN:
                raise _forbidden(
                    "ad-hoc Python callables run inside the daemon: admins only",
                    hint="ask an admin to submit it",
                )
        ids = await self.daemon.submit(new_runs, conn.peer.uid, conn.peer.pid)
        if "runs" in params:
            return {"ids": ids}
        return {"id": ids[0], "state": State.QUEUED.value}

    async def handle_get(self, conn: Connection, params: dict[str, Any], request: Request) -> Any:
        run_id = run_id_param(params)
        run = await trio.to_thread.run_sync(self.daemon.journal.get_run, run_id)
        if run is None:
            raise not_found([run_id])
        return run

    async def handle_list(self, conn: Connection, params: dict[str, Any], request: Request) -> Any:
        states = params.get("state", [])
        if isinstance(states, str):
            states = [states]
        known = {s.value for s in State}
        if not isinstance(states, list) or not all(s in known for s in states):
            raise invalid(
                "'state' must be a state name or a list of them",
                hint=f"states: {', '.join(sorted(known))}",
            )
        filters: dict[str, Any] = {}
        for key in ("pool", "name", "tag"):
            value = params.get(key)
            if value is not None and not isinstance(value, str):
                raise invalid(f"'{key}' must be a string")
            filters[key] = value
        limit = params.get("limit", DEFAULT_LIST_LIMIT)
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 1 <= limit <= MAX_LIST_LIMIT
        ):
            raise invalid(f"'limit' must be an integer from 1 to {MAX_LIST_LIMIT}")
        cursor = params.get("cursor")
        before = None
        if cursor is not None:
            if not (
                isinstance(cursor, str)
                and cursor.isascii()
                and cursor.isdigit()
                and len(cursor) <= 19
                and int(cursor) <= MAX_RUN_ID
            ):
                raise invalid("'cursor' must be a next_cursor value from a previous list")
            before = int(cursor)
        runs = await trio.to_thread.run_sync(
            lambda: self.daemon.journal.list_runs(
                states=states, before=before, limit=limit + 1, **filters
            )
        )
        # A page is also bounded in bytes, so that its reply line stays within
        # max_line however large the runs' commands are: at least one run,
        # then as many as fit.
        budget = self.config.max_line - LIST_REPLY_OVERHEAD
        page = min(limit, len(runs))
        for i, run in enumerate(runs[:limit]):
            budget -= len(encode(run))
            if budget < 0 and i > 0:
                page = i
                break
        next_cursor = str(runs[page - 1]["id"]) if len(runs) > page else None
        return {"runs": runs[:page], "next_cursor": next_cursor}

    async def handle_cancel(
        self, conn: Connection, params: dict[str, Any], request: Request
    ) -> Any:
        ids = run_ids_param(params)
        results = await self.daemon.cancel(
            ids, conn.peer.uid, conn.peer.pid, admin=conn.role >= Role.ADMIN
        )
        return {"results": {str(k): v for k, v in results.items()}}

    async def handle_wait(self, conn: Connection, params: dict[str, Any], request: Request) -> Any:
        ids = run_ids_param(params)
        timeout = params.get("timeout")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0
        ):
            raise invalid("'timeout' must be a number of seconds >= 0")
        runs, timed_out = await self.daemon.wait(ids, timeout)
        missing = [i for i in ids if i not in runs]
        if missing:
            raise not_found(missing)
        return {"runs": [runs[i] for i in ids], "timed_out": timed_out}

    async def handle_logs(self, conn: Connection, params: dict[str, Any], request: Request) -> Any:
        run_id = run_id_param(params)
        attempt = params.get("attempt")
        if attempt is not None and (
            isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1
        ):
            raise invalid("'attempt' must be a positive integer")
        follow = params.get("follow", False)
        if not isinstance(follow, bool):
            raise invalid("'follow' must be true or false")

        async def emit(text: str) -> None:
            await conn.send({"id": request.id, "event": {"data": text}})

        return await self.daemon.stream_logs(run_id, attempt, follow, emit)

    async def handle_stats(self, conn: Connection, params: dict[str, Any], request: Request) -> Any:
        return await self.daemon.stats()


HANDLERS: dict[str, Handler] = {
    "submit": Server.handle_submit,
    "get": Server.handle_get,
    "list": Server.handle_list,
    "cancel": Server.handle_cancel,
    "logs": Server.handle_logs,
    "wait": Server.handle_wait,
    "stats": Server.handle_stats,
}


def _is_long_poll(request: Request) -> bool:
    """Requests that wait for the future: cancelled when the client goes away."""
    return request.method == "wait" or (
        request.method == "logs" and request.params.get("follow") is True
    )


def _error_line(request_id: Any, exc: ProtocolError) -> bytes:
    err: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.hint:
        err["hint"] = exc.hint
    return encode({"id": request_id, "error": err})


def _forbidden(message: str, hint: str | None = None) -> RequestError:
    return RequestError(
        ErrorCode.FORBIDDEN,
        message,
        hint=hint or "an admin can grant roles in the [access] table of jobd.toml",
    )


def _replace_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead daemon; refuse to touch a live one."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise JobdError(
            f"{path} exists and is not a socket",
            hint="remove it or choose another daemon.socket path",
        )
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise JobdError(f"cannot check the existing socket {path}: {exc.strerror}") from exc
        path.unlink(missing_ok=True)
        log.info("replaced the stale socket %s", path)
        return
    finally:
        probe.close()
    raise JobdError(
        f"another daemon is listening on {path}",
        hint="stop it first, or give this daemon another socket path",
    )
