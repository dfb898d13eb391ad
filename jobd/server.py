"""The control server: the Unix socket, peer-credential authorisation, framing,
and one handler per method (``handle_<method>``), which call into the daemon.

A connection is served by one reader task. Requests after ``hello`` run
concurrently (up to ``max_inflight`` per connection) and reply in any order.
A client that disconnects mid-request does not disturb anything: state
changes already handed to the daemon are committed, the reply is dropped,
and everything else it asked for stops.

The limits that keep one request, connection or user from stopping, slowing
down or exhausting the daemon for the others (connection slots per uid and
for admins, idle and send timeouts, input and reply memory, fairness between
connections) are in ``jobd.connections``, with the reasons.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import pwd
import select
import socket as stdsocket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from jobd import __version__, files
from jobd.config import AccessConfig, Config
from jobd.connections import (
    MAX_LINGERING,
    RECEIVE_CHUNK,
    REFUSAL_LINGER_BYTES,
    REFUSAL_LINGER_SECONDS,
    Connection,
    InputBudget,
    Peer,
    Slots,
    error_line,
)
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

LIST_REPLY_OVERHEAD = 256  # bytes of a list reply besides its runs (id, cursor, framing)
MAX_WAIT = 366 * 86400.0  # seconds a wait may ask for (longer: leave timeout out)
ROOM_CHECK = 1.0  # seconds between checks for a hang-up while a reader waits for budget
ROLE_CACHE_SECONDS = 60.0  # seconds a uid's role (from passwd and group lookups) is reused
LINES_PER_TURN = 64  # request lines parsed before the reader lets other tasks run
# Methods that change state: once received they are carried out even if their
# client goes away (their reply is dropped); everything else stops with it.
CHANGES = frozenset({"submit", "cancel"})


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    connections: int
    requests_in_flight: int  # being answered, all connections together
    streams: int  # logs requests sending output
    input_bytes: int  # request bytes of non-admins buffered or being served
    refused_connections: int  # since start: over a connection limit


@dataclass(frozen=True, slots=True)
class Nurseries:
    """Where a connection's requests run: changes are never cancelled; reads stop
    when the client is gone; long polls also when it half-closes."""

    changes: trio.Nursery
    reads: trio.Nursery
    polls: trio.Nursery


def peer_credentials(sock: trio.socket.SocketType) -> Peer:
    raw = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


class Access:
    """Maps a uid to its role from ``[access]``. Root and the daemon's uid are admins.

    Passwd and group lookups can block (NSS may ask the network): they run in
    a thread, and their answer is reused for ROLE_CACHE_SECONDS."""

    def __init__(self, config: AccessConfig) -> None:
        self.config = config
        self.daemon_uid = os.getuid()
        self._cache: dict[tuple[int, int], tuple[float, Role]] = {}

    async def role(self, uid: int, gid: int) -> Role:
        if uid in (0, self.daemon_uid):
            return Role.ADMIN
        now = trio.current_time()
        cached = self._cache.get((uid, gid))
        if cached is not None and now - cached[0] < ROLE_CACHE_SECONDS:
            return cached[1]
        role = await trio.to_thread.run_sync(self.role_for, uid, gid)
        if len(self._cache) > 10_000:
            self._cache.clear()  # bounded: uids are few on a host, but not trusted
        self._cache[(uid, gid)] = (now, role)
        return role

    def role_for(self, uid: int, gid: int) -> Role:
        """Blocking: looks the user and its groups up."""
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


Handler = Callable[["Server", Connection, dict[str, Any], Request], Awaitable[Any]]


class Server:
    def __init__(self, config: Config, daemon: Daemon) -> None:
        self.config = config
        self.daemon = daemon
        self.access = Access(config.access)
        self.slots = Slots(
            config.max_connections,
            config.max_connections_per_uid,
            config.admin_reserved_connections,
        )
        self.budget = InputBudget(config.max_input_per_uid, config.max_input_total)
        self._inflight = self._streams = self._refused = 0
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

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            self.slots.used, self._inflight, self._streams, self.budget.used, self._refused
        )

    def stop_accepting(self) -> None:
        """Close the listening socket; connections already open are still served."""
        self._accept_scope.cancel()

    # -- one connection -----------------------------------------------------

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            peer = peer_credentials(stream.socket)
            role = await self.access.role(peer.uid, peer.gid)
        except OSError:
            await stream.aclose()
            return
        refusal = self.slots.refusal(peer.uid, role)
        if refusal is not None:
            self._refused += 1
            await self._refuse(Connection(stream, peer, role, REFUSAL_LINGER_SECONDS), refusal)
            return
        conn = Connection(stream, peer, role, self.config.send_timeout)
        with self.slots.held(peer.uid):
            try:
                async with (
                    trio.open_nursery() as changes,
                    trio.open_nursery() as reads,
                    trio.open_nursery() as polls,
                ):
                    conn.cancellable = (reads.cancel_scope, polls.cancel_scope)
                    await self._read_requests(conn, Nurseries(changes, reads, polls))
                    polls.cancel_scope.cancel()  # nobody is left to hear a long-poll
            except* Exception:
                # A bug in serving one connection closes that connection, never the
                # daemon: the other clients and every run go on. (except*: the error
                # may come in a group with trio.Cancelled, which goes on up.)
                log.exception("internal error serving a connection of uid %d; closing it", peer.uid)
            finally:
                conn.closed = True
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.aclose()

    async def _refuse(self, conn: Connection, exc: ProtocolError) -> None:
        """Deliver a refusal, then close: read what the client sent meanwhile (its
        hello, usually), so that the close does not reset the connection and
        destroy the error. Under a flood of refusals, only so many are drained."""
        try:
            if self.slots.lingering >= MAX_LINGERING:
                with trio.move_on_after(REFUSAL_LINGER_SECONDS):
                    await conn.error(None, exc)
                return
            self.slots.lingering += 1
            try:
                await conn.fatal(
                    exc, linger=REFUSAL_LINGER_SECONDS, linger_bytes=REFUSAL_LINGER_BYTES
                )
            finally:
                self.slots.lingering -= 1
        finally:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await conn.stream.aclose()

    async def _read_requests(self, conn: Connection, nurseries: Nurseries) -> None:
        c = self.config
        budget_uid = None if conn.role >= Role.ADMIN else conn.peer.uid  # admins: uncounted
        buffer = LineBuffer(c.max_line)
        # A connection that never says hello would hold a slot for ever: it gets
        # hello_timeout to do so; after that, idle_timeout with nothing in flight.
        # One scope for the whole loop, its deadline moved as the connection goes
        # from pre-hello to busy to idle (Connection.started/finished): cheaper
        # than a scope per read. It also bounds the waits for room: a connection
        # stalled by its user's budget with nothing in flight is idle like any other.
        conn.receiving = trio.CancelScope(deadline=trio.current_time() + c.hello_timeout)
        conn.idle_timeout = c.idle_timeout
        try:
            with conn.receiving:
                await self._read_loop(conn, nurseries, buffer, budget_uid)
                return
            await self._timed_out(conn)  # the deadline passed
        finally:
            if budget_uid is not None:
                self.budget.charge(budget_uid, -conn.buffered)
                conn.buffered = 0

    async def _read_loop(
        self,
        conn: Connection,
        nurseries: Nurseries,
        buffer: LineBuffer,
        budget_uid: int | None,
    ) -> None:
        c = self.config
        while not conn.closed:
            await conn.room_to_read(c.max_line)
            # Hello is small and bounded by its timeout: it is always read.
            if (
                budget_uid is not None
                and conn.hello
                and self.budget.full(budget_uid)
                and not await self._wait_for_room(conn, budget_uid)
            ):
                return  # the client left while it waited
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
                            "the connection ended inside a line: a request must end with a newline",
                        ),
                    )
                return
            try:
                lines = buffer.feed(data)
            except ProtocolError as exc:
                await conn.fatal(exc)
                return
            if budget_uid is not None:
                self.budget.charge(budget_uid, buffer.pending - conn.buffered)
                conn.buffered = buffer.pending
            for n, line in enumerate(lines):
                if n and n % LINES_PER_TURN == 0:
                    await trio.lowlevel.checkpoint()  # a pipelining client shares the loop
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
                    if conn.closed:
                        return
                    await self._hello(conn, request)
                    if conn.hello:
                        conn.idle_now()
                    if conn.hello and conn.role is Role.NONE:
                        await conn.fatal(_no_role(conn.peer.uid), linger=REFUSAL_LINGER_SECONDS)
                        return
                    continue
                if conn.inflight >= c.max_inflight:
                    await conn.error(
                        request.id,
                        ProtocolError(
                            ErrorCode.BUSY,
                            f"more than {c.max_inflight} requests in flight on this connection",
                            hint="wait for replies before sending more",
                        ),
                    )
                    continue
                if request.method in CHANGES:
                    # Once received, a change is made even if its client has gone.
                    nursery = nurseries.changes
                elif conn.closed:
                    continue  # nobody is left to read the answer
                elif _is_long_poll(request):
                    nursery = nurseries.polls
                else:
                    nursery = nurseries.reads
                conn.started()
                if nursery is nurseries.polls:
                    # Long polls mostly wait, holding little: not counted while served.
                    nursery.start_soon(self._dispatch, conn, request, None, 0)
                else:
                    nursery.start_soon(self._dispatch, conn, request, budget_uid, len(line))

    async def _wait_for_room(self, conn: Connection, uid: int) -> bool:
        """Backpressure: wait until ``uid`` may send more. Nothing is read meanwhile,
        so a client that closes would go unnoticed: its socket is checked for a
        hang-up every ROOM_CHECK seconds (only while stalled). False if it left."""
        sock = conn.stream.socket
        hangup = select.poll()
        hangup.register(sock.fileno(), select.POLLHUP)
        while self.budget.full(uid):
            with trio.move_on_after(ROOM_CHECK):
                await self.budget.freed()
            if hangup.poll(0):
                return False  # POLLHUP: both directions closed (a half-close is not)
        return True

    async def _timed_out(self, conn: Connection) -> None:
        if not conn.hello:
            exc = ProtocolError(
                ErrorCode.HELLO_REQUIRED,
                f"no hello within {self.config.hello_timeout:g}s: closing the connection",
                hint="send hello first (docs/protocol.md)",
            )
        else:
            exc = ProtocolError(
                ErrorCode.IDLE,
                f"no request for {self.config.idle_timeout:g}s: closing the idle connection",
                hint="reconnect; nothing sent after this error was read"
                " (limits.idle_timeout sets the time)",
            )
        await conn.fatal(exc, linger=REFUSAL_LINGER_SECONDS, linger_bytes=REFUSAL_LINGER_BYTES)

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

    async def _dispatch(
        self, conn: Connection, request: Request, budget_uid: int | None, size: int
    ) -> None:
        """Answer one request, in its turn: a connection computes REQUESTS_AT_ONCE
        replies at a time (long polls, which mostly wait, and log streams, which
        have their own STREAMS_AT_ONCE, do not take a turn)."""
        # The hot path: no context managers and no extra checkpoint when the
        # connection has a turn free (measured: they cost ~10% of a submit).
        self._inflight += 1
        if budget_uid is not None:
            self.budget.charge(budget_uid, size)
        try:
            if request.method == "logs":
                async with conn.streams:
                    self._streams += 1
                    try:
                        line = await self._answer(conn, request)
                    finally:
                        self._streams -= 1
            elif _is_long_poll(request):
                line = await self._answer(conn, request)
            else:
                work = conn.work
                try:
                    work.acquire_nowait()
                except trio.WouldBlock:
                    await work.acquire()  # its turn comes in FIFO order
                try:
                    line = await self._answer(conn, request)
                finally:
                    work.release()
        finally:
            self._inflight -= 1
            if budget_uid is not None:
                self.budget.charge(budget_uid, -size)
            # Free the slot before the client can see the answer: a client that
            # keeps max_inflight requests in flight is never told busy.
            conn.finished()
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
            return error_line(request.id, exc)
        except JournalError as exc:
            return error_line(
                request.id, ProtocolError(ErrorCode.UNAVAILABLE, exc.message, hint=exc.hint)
            )
        except Exception:
            log.exception("internal error serving %s", request.method)
            return error_line(
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
        if not isinstance(states, list) or not all(
            isinstance(s, str) and s in known for s in states
        ):
            raise invalid(
                "'state' must be a state name or a list of them",
                hint=f"states: {', '.join(sorted(known))}",
            )
        states = sorted(set(states))  # at most one SQL variable per state, whatever was sent
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
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 <= timeout <= MAX_WAIT
        ):
            raise invalid(f"'timeout' must be a number of seconds from 0 to {MAX_WAIT:g}")
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


def _no_role(uid: int) -> ProtocolError:
    return ProtocolError(
        ErrorCode.FORBIDDEN,
        f"uid {uid} has no role on this daemon: closing the connection",
        hint="an admin can grant roles in the [access] table of jobd.toml",
    )


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
