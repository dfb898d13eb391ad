"""The connection limits of issue 13 against a real daemon (jobd.connections states
the promises): refusals arrive intact, one uid cannot lock the socket and root can
always get in, callers with no role and idle connections do not keep their slots,
abandoned work stops, memory stays bounded across connections, one pipelining
connection does not starve another, and file descriptors come back.

Other users are played by uid 65534 (nobody) and 65533 (OTHER_UID):
a small agent process (``Agent``) runs as that uid, holds its connections and does
what the test tells it over a pipe. These tests need root and skip without it.

Nothing here depends on how fast the machine is: every wait is for a condition with
a generous deadline (``wait_for``), and short timeouts in the configuration
(``idle_timeout = "1s"``) only decide *when* an event happens, never whether the
test sees it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import socket
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import READY_DEADLINE, DaemonProcess, Raw, wait_for
from tests.test_protocol_e2e import (
    NOBODY,
    _open_to_everyone,
    assert_closed,
    assert_serves,
    assert_usable,
    blocking_command,
    check_error,
    read_first,
    send_hello,
    try_hello,
    wait_runs,
)

OTHER_UID = 65533  # another non-admin uid (no passwd entry needed): no role unless named
BIG_OUTPUT = 64_000_000  # bytes a run writes for the log-streaming cases
KIB = 1024
MIB = 1024 * KIB
DEFAULT_MAX_INPUT_PER_UID = 4 * MIB  # jobd.config's default
RECEIVE_CHUNK = 64 * KIB  # what the daemon reads from a socket at a time
LOG_CHUNK = 64 * KIB  # bytes of output per logs event
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REQUEST_START = '{"id": 2, "method": "list", "params": {"name": "'  # never finished
REQUESTS_AT_ONCE = 4  # of one connection's requests, computed at once
JOURNAL_READS_AT_ONCE = 40  # trio's default thread limiter: the journal's reads at once

pytestmark = pytest.mark.usefixtures("need_root")


@pytest.fixture
def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid (65534)")


# -- another user: an agent process running as that uid -------------------------------

# Runs as the other uid with the system's Python (the test's interpreter may live
# where that uid cannot read). One JSON command per line on stdin, one JSON answer
# per line on stdout; every socket operation has a timeout, so no command hangs.
AGENT_SCRIPT = r"""
import json, socket, sys, threading

path, timeout = sys.argv[1], float(sys.argv[2])
conns = {}
HELLO = b'{"id": 1, "method": "hello", "params": {"protocol": 1}}\n'

def next_message(conn):
    try:
        line = conn["file"].readline()
    except ConnectionResetError:
        return {"reset": True}
    except TimeoutError:
        return {"timeout": True}
    return {"message": json.loads(line)} if line else {"eof": True}

def send_quietly(sock, data):
    try:
        sock.sendall(data)
    except OSError:
        pass

for command in sys.stdin:
    cmd = json.loads(command)
    op, i = cmd["op"], cmd.get("i")
    try:
        if op == "open":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(cmd.get("timeout", timeout))
            sock.connect(path)
            i = max(conns, default=0) + 1  # never 0: wait_for wants a true value
            conns[i] = {"sock": sock, "file": sock.makefile("rb")}
            answer = {"i": i}
            if cmd.get("hello"):
                send_quietly(sock, HELLO)  # a full daemon may close before it is written
                answer.update(next_message(conns[i]))
        elif op == "send":
            conns[i]["sock"].sendall(cmd["data"].encode())
            answer = {"ok": True}
        elif op == "send_in_background":  # may block for ever: the daemon stops reading
            data = cmd["data"].encode() + b"x" * cmd["fill"]
            threading.Thread(
                target=send_quietly, args=(conns[i]["sock"], data), daemon=True
            ).start()
            answer = {"ok": True}
        elif op == "read":
            conns[i]["sock"].settimeout(cmd.get("timeout", timeout))
            answer = next_message(conns[i])
        elif op == "close":
            conn = conns.pop(i)
            # shutdown first: a thread blocked sending on the socket would keep
            # a plain close from reaching the daemon.
            try:
                conn["sock"].shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn["file"].close()
            conn["sock"].close()
            answer = {"ok": True}
        else:
            answer = {"unknown_op": op}
    except OSError as exc:
        answer = {"oserror": repr(exc)}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
"""


def _system_python() -> str:
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


class Agent:
    """Connections held by another uid, driven from the test."""

    def __init__(self, sock: Path, uid: int = NOBODY) -> None:
        self.uid = uid
        self.proc = subprocess.Popen(
            [_system_python(), "-I", "-c", AGENT_SCRIPT, str(sock), str(READY_DEADLINE)],
            user=uid,
            group=uid,
            extra_groups=[],
            cwd="/",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def call(self, op: str, **params: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **params}) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, f"the agent of uid {self.uid} died (exit status {self.proc.poll()})"
        result: dict[str, Any] = json.loads(answer)
        assert "oserror" not in result and "unknown_op" not in result, (op, result)
        return result

    def open(self) -> dict[str, Any]:
        """Connect and send hello at once; the answer holds ``i`` and what came first."""
        return self.call("open", hello=True)

    def hold(self) -> int:
        """A connection past hello (the first reply must be hello's result)."""
        opened = self.open()
        assert "result" in opened.get("message", {}), opened
        return int(opened["i"])

    def try_hold(self) -> int | None:
        """A connection past hello, or None (closed again) if the daemon said busy."""
        opened = self.open()
        message = opened.get("message")
        if message is not None and "result" in message:
            return int(opened["i"])
        self.close(opened["i"])
        check_error(message, "busy", "connections", request_id=None)
        return None

    def read(self, i: int) -> dict[str, Any]:
        return self.call("read", i=i)

    def close(self, i: int) -> None:
        self.call("close", i=i)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    """Append every Agent started; they are all stopped at teardown."""
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.stop()


def agent_for(agents: list[Agent], d: DaemonProcess, uid: int = NOBODY) -> Agent:
    _open_to_everyone(d)
    agent = Agent(d.socket, uid)
    agents.append(agent)
    return agent


def assert_refused(opened: dict[str, Any], *names: str) -> None:
    """An agent's connection was refused with a delivered busy error naming ``names``."""
    assert "message" in opened, f"the refusal did not arrive: {opened}"
    check_error(opened["message"], "busy", *names, request_id=None)


# -- the daemon seen from outside ------------------------------------------------------


def server_stats(d: DaemonProcess) -> dict[str, Any]:
    """``stats.server``, asked on a fresh root connection (which counts itself)."""
    c = wait_for(lambda: try_hello(d), "a connection slot for root")
    try:
        server: dict[str, Any] = c.result("stats")["server"]
        return server
    finally:
        c.close()


def daemon_pid(d: DaemonProcess) -> int:
    assert d.proc is not None
    return d.proc.pid


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KIB
    raise AssertionError("no VmRSS line")


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (every thread), in clock ticks."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def cpu_is_quiet(pid: int, ticks: int = 5) -> bool:
    """At most ``ticks`` clock ticks of CPU over the next half second."""
    before = cpu_ticks(pid)
    time.sleep(0.5)
    return cpu_ticks(pid) - before <= ticks


def open_fds(pid: int) -> dict[str, list[str]]:
    """The daemon's open file descriptors by kind: sockets, journal files, others."""
    kinds: dict[str, list[str]] = {"sockets": [], "journal": [], "other": []}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:"):
                kinds["sockets"].append(target)
            elif "/journal.db" in target:
                kinds["journal"].append(target)
            else:
                kinds["other"].append(target)
    return kinds


def unread_bytes(sock: socket.socket) -> int:
    """Bytes waiting in our receive queue: what the daemon has sent us so far."""
    queued = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, queued)
    return int.from_bytes(queued, sys.byteorder)


def finished_big_output(d: DaemonProcess) -> int:
    """A run that wrote BIG_OUTPUT bytes and succeeded; its id."""
    c = d.raw()
    try:
        shell = f"head -c {BIG_OUTPUT} /dev/zero | tr '\\0' x"
        run_id = int(c.result("submit", {"shell": shell})["id"])
        (run,) = wait_runs(c, [run_id])
        assert run["state"] == "succeeded", run
        return run_id
    finally:
        c.close()


def unread_logs(d: DaemonProcess, run_id: int, count: int) -> list[Raw]:
    """``count`` root connections that each ask for the run's logs and read nothing,
    once the daemon has sent a chunk or more to each."""
    conns = [d.raw() for _ in range(count)]
    for c in conns:
        c.send("logs", {"id": run_id})
    wait_for(
        lambda: all(unread_bytes(c.sock) >= LOG_CHUNK for c in conns),
        f"{count} log streams to fill their sockets",
    )
    return conns


def drain_to_end(sock: socket.socket) -> None:
    """Read until the daemon closes the connection (EOF, or a reset: both are fine)."""
    sock.settimeout(READY_DEADLINE)
    with contextlib.suppress(ConnectionResetError):
        while sock.recv(1 << 20):
            pass


# -- 1. refusals arrive ----------------------------------------------------------------


def test_refusals_arrive_intact_then_eof(daemon_factory: Any) -> None:
    """A connection refused for the limit reads its ``busy`` error whole (code busy,
    id null), then EOF: never a reset, even when it had sent hello at once (the
    daemon reads it before closing) and thirty arrive together."""
    d = daemon_factory("[limits]\nmax_connections = 2\n")
    d.start()
    held = [wait_for(lambda: try_hello(d), f"root connection {n}") for n in (1, 2)]
    refused = [d.raw(hello=False) for _ in range(30)]
    for c in refused:
        send_hello(c)
    for n, c in enumerate(refused):
        try:
            first = c.file.readline()
        except ConnectionResetError:
            pytest.fail(f"refused connection {n}: reset before its busy error arrived")
        assert first.endswith(b"\n"), f"refused connection {n}: a cut line {first!r}"
        check_error(json.loads(first), "busy", "connections", "2", request_id=None)
        assert_closed(c)  # EOF, a reset fails
    stats = held[0].result("stats")["server"]
    assert stats["refused_connections"] >= 30, stats
    assert stats["connections"] == 2, stats
    for c in held:
        assert_usable(c)
        c.close()
    assert_serves(d)


# -- 2. and 3. slots per uid, and the admins' reserve ----------------------------------


def test_one_uid_cannot_take_more_than_its_connections(
    daemon_factory: Any, agents: list[Agent]
) -> None:
    """With ``max_connections_per_uid = 2`` a user (nobody, role read) holds two
    connections; a third is refused with ``busy`` naming its uid and the per-user
    limit; root still gets in, several times, and is served; once the user closes
    one, it may connect again."""
    d = daemon_factory('[limits]\nmax_connections_per_uid = 2\n[access]\nread = ["nobody"]\n')
    d.start()
    nobody = agent_for(agents, d)
    mine = [nobody.hold(), nobody.hold()]
    for _ in range(3):  # refused every time, not once
        third = nobody.open()
        assert_refused(third, f"uid {NOBODY}", "per user")
        assert nobody.read(third["i"]) == {"eof": True}
        nobody.close(third["i"])

    roots = [d.raw() for _ in range(5)]  # the readiness probe is no longer counted
    for c in roots:
        assert_usable(c)
    assert roots[0].result("stats")["server"]["connections"] == 2 + 5

    nobody.close(mine.pop())
    mine.append(wait_for(nobody.try_hold, "nobody's freed slot"))
    for c in roots:
        c.close()
    assert_serves(d)


def test_admins_keep_their_reserve(daemon_factory: Any, agents: list[Agent]) -> None:
    """Of ``max_connections = 6`` three are kept for admins: other users together get
    three (the fourth is refused, ``kept for admins``), root gets the rest, six in
    all with theirs counted; a seventh root connection is refused too."""
    d = daemon_factory(
        "[limits]\nmax_connections = 6\nadmin_reserved_connections = 3\n"
        'max_connections_per_uid = 10\n[access]\nread = ["nobody"]\n'
    )
    d.start()
    nobody = agent_for(agents, d)
    # The readiness probe may hold a slot for a moment: retry until it is gone.
    held = [wait_for(nobody.try_hold, f"nobody's connection {n}") for n in (1, 2, 3)]
    for _ in range(3):
        fourth = nobody.open()
        assert_refused(fourth, "limit 6", "3 are kept for admins")
        nobody.close(fourth["i"])

    roots = [wait_for(lambda: try_hello(d), f"root connection {n}") for n in (1, 2, 3)]
    for c in roots:
        assert_usable(c)
    assert roots[0].result("stats")["server"]["connections"] == 6
    seventh = d.raw(hello=False)
    send_hello(seventh)
    check_error(read_first(seventh), "busy", "limit 6", "admins included", request_id=None)
    assert_closed(seventh)

    # A root connection closed frees a slot for root, not for the others.
    roots.pop().close()
    wait_for(lambda: try_hello(d), "root's freed slot").close()
    still = nobody.open()
    assert_refused(still, "kept for admins")
    nobody.close(still["i"])
    for i in held:
        nobody.close(i)
    for c in roots:
        c.close()
    assert_serves(d)


# -- 4. no role --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_caller_without_a_role_holds_no_slot(daemon_factory: Any, agents: list[Agent]) -> None:
    """A user with no role gets hello's result (roles []) and then an id-null
    ``forbidden`` error and EOF; even if it keeps its end open, its slot is freed:
    it may do so more times than ``max_connections_per_uid`` allows connections."""
    d = daemon_factory("[limits]\nmax_connections_per_uid = 2\n")
    d.start()
    root = wait_for(lambda: try_hello(d), "root's connection")
    wait_for(
        lambda: root.result("stats")["server"]["connections"] == 1, "the readiness probe to go"
    )
    nobody = agent_for(agents, d)
    kept_open = []
    for _ in range(3):
        opened = nobody.open()
        hello = opened.get("message", {})
        assert hello.get("result", {}).get("roles") == [], opened
        assert hello["result"]["uid"] == NOBODY, opened
        closing = nobody.read(opened["i"])
        check_error(closing.get("message"), "forbidden", "no role", request_id=None)
        assert nobody.read(opened["i"]) == {"eof": True}
        kept_open.append(opened["i"])  # never closed by the client
        wait_for(
            lambda: root.result("stats")["server"]["connections"] == 1,
            "the no-role connection's slot to be freed",
        )
    for i in kept_open:
        nobody.close(i)
    root.close()
    assert_serves(d)


# -- 5. idle connections -----------------------------------------------------------------


@pytest.mark.slow
def test_idle_connections_are_closed_but_not_while_they_wait(daemon_factory: Any) -> None:
    """With ``idle_timeout = "1s"``:

    - a connection past hello that sends nothing gets an ``idle`` error (id null),
      then EOF;
    - a connection with a ``wait`` in flight is not idle: it outlives a connection
      that was opened after its wait began and was closed as idle, and then gets
      the wait's answer (and, idle at last, its own ``idle`` error);
    - a connection trickling an unfinished line byte by byte is still idle
      (receiving part of a line does not restart the idle clock)."""
    d = daemon_factory('[limits]\nidle_timeout = "1s"\n')
    d.start()

    quiet = d.raw()
    check_error(quiet.read(), "idle", "idle", request_id=None)
    assert_closed(quiet)

    stop = d.dir / "stop-idle"
    submitter = d.raw()
    run_id = submitter.result("submit", {"command": blocking_command(stop)})["id"]
    submitter.close()
    waiting = d.raw()
    wait_id = waiting.send("wait", {"ids": [run_id]})
    # The wait is in flight (the stats request counts itself).
    wait_for(lambda: server_stats(d)["requests_in_flight"] >= 2, "the wait to be in flight")
    later = d.raw()
    check_error(later.read(), "idle", request_id=None)
    assert_closed(later)
    # `waiting` has now had its wait in flight for longer than idle_timeout.
    stop.touch()
    answer = waiting.read()
    assert answer is not None and answer.get("id") == wait_id, answer
    assert answer["result"]["runs"][0]["state"] == "succeeded", answer
    check_error(waiting.read(), "idle", request_id=None)
    assert_closed(waiting)

    trickling = d.raw()
    unfinished = iter(REQUEST_START.encode() + b"x" * 100_000)
    deadline = time.monotonic() + READY_DEADLINE
    while not select.select([trickling.sock], [], [], 0.05)[0]:
        assert time.monotonic() < deadline, "a trickling connection was never closed as idle"
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            trickling.sock.send(bytes([next(unfinished)]))
    check_error(trickling.read(), "idle", request_id=None)
    # A byte sent just as the daemon closed may have gone unread: a reset is fine here.
    assert_closed(trickling, reset_ok=True)
    assert_serves(d)


# -- 6. abandoned log streams stop -------------------------------------------------------


def test_abandoned_log_streams_stop(daemon_factory: Any) -> None:
    """Sixteen clients ask for a 64 MB output and vanish without reading: the
    daemon soon stops using CPU, having spent less than a second of it after they
    left (reading and encoding the ~1 GB they did not take would cost several),
    and every stream has stopped (``stats.server.streams`` back to 0)."""
    d = daemon_factory()
    d.start()
    run_id = finished_big_output(d)
    conns = unread_logs(d, run_id, 16)
    assert server_stats(d)["streams"] == 16
    pid = daemon_pid(d)
    at_close = cpu_ticks(pid)
    for c in conns:
        c.close()
    wait_for(lambda: cpu_is_quiet(pid), "the daemon's CPU use to stop")
    # CPU time is work done, not how fast: streaming the ~1 GB left to nobody
    # costs several seconds of it; stopping costs next to nothing.
    spent = cpu_ticks(pid) - at_close
    assert spent < CLOCK_TICKS, f"{spent / CLOCK_TICKS:.1f}s of CPU after the clients left"
    wait_for(lambda: server_stats(d)["streams"] == 0, "the abandoned streams to stop")
    assert_serves(d)


@pytest.mark.slow
def test_a_client_that_stops_reading_is_dropped(daemon_factory: Any) -> None:
    """With ``send_timeout = "2s"``, a client that asks for logs and never reads,
    but keeps its socket open, is gone: its stream stops and the daemon closes the
    connection (the client reaches EOF, or a reset, after what was already sent)."""
    d = daemon_factory('[limits]\nsend_timeout = "2s"\n')
    d.start()
    run_id = finished_big_output(d)
    (stuck,) = unread_logs(d, run_id, 1)
    wait_for(lambda: server_stats(d)["streams"] == 0, "the stuck stream to stop")
    wait_for(lambda: server_stats(d)["connections"] == 1, "the stuck connection to close")
    drain_to_end(stuck.sock)
    stuck.close()
    assert_serves(d)


# -- 7. memory stays bounded across connections ----------------------------------------


def test_memory_stays_bounded_across_connections(daemon_factory: Any, agents: list[Agent]) -> None:
    """Thirty-two root clients streaming a 64 MB output without reading grow the
    daemon's RSS by far less than the output (each stream holds one chunk, not the
    output). A user (role read) holding eight unfinished 900 KB lines is held to its
    input budget (``max_input_per_uid`` plus at most one 64 KiB read per
    connection), with little more RSS, while root is still served. (That closing
    them frees it all is the next test's, an expected failure.)"""
    d = daemon_factory('[access]\nread = ["nobody"]\n')
    d.start()
    pid = daemon_pid(d)
    run_id = finished_big_output(d)

    before = rss_bytes(pid)
    streams = unread_logs(d, run_id, 32)
    assert server_stats(d)["streams"] == 32
    grown = rss_bytes(pid) - before
    print(f"RSS grew by {grown / MIB:.1f} MiB for 32 unread streams")
    assert grown < 64 * MIB, f"RSS grew by {grown / MIB:.1f} MiB for 32 unread streams"
    for c in streams:
        c.close()
    wait_for(lambda: server_stats(d)["streams"] == 0, "the streams to stop")

    nobody = agent_for(agents, d)
    before = rss_bytes(pid)
    lines = [nobody.hold() for _ in range(8)]
    for i in lines:
        nobody.call(
            "send_in_background",
            i=i,
            data=REQUEST_START,
            fill=900_000,
        )
    bound = DEFAULT_MAX_INPUT_PER_UID + 8 * RECEIVE_CHUNK

    def budget_reached() -> bool:
        used = server_stats(d)["input_bytes"]
        assert used <= bound, f"{used} bytes buffered for one uid (bound {bound})"
        return used >= DEFAULT_MAX_INPUT_PER_UID

    wait_for(budget_reached, "the user's input to fill its budget")
    root = d.raw()
    run = root.result("submit", {"command": ["true"]})["id"]  # root is not held back
    assert wait_runs(root, [run])[0]["state"] == "succeeded"
    assert root.result("list", {"limit": 5})["runs"]
    used = root.result("stats")["server"]["input_bytes"]
    print(f"input_bytes {used} (bound {bound})")
    assert DEFAULT_MAX_INPUT_PER_UID <= used <= bound, used
    grown = rss_bytes(pid) - before
    print(f"RSS grew by {grown / MIB:.1f} MiB for 7.2 MB of unfinished lines")
    assert grown < 64 * MIB, f"RSS grew by {grown / MIB:.1f} MiB for 7.2 MB of input"
    # Once the user closes them nothing should be left counted, but today whether
    # it is depends on where each reader waits when they close (a bug, which the
    # next test shows every time), so that is not checked here.
    for i in lines:
        nobody.close(i)
    root.close()
    assert_serves(d)


# A line that fills a budget exactly: max_line (1 MiB) = max_input_per_uid.
FULL_BUDGET = """
[limits]
max_input_per_uid = 1048576
max_input_total = 1048576
hello_timeout = "1s"
idle_timeout = "1s"

[access]
read = ["nobody", "65533"]
"""
EVENT_DEADLINE = 10.0  # seconds for an event that takes milliseconds (a second's timeout)


@pytest.mark.slow
def test_a_client_that_leaves_while_over_its_budget_is_let_go(
    daemon_factory: Any, agents: list[Agent]
) -> None:
    """A user's unfinished line fills its input budget (``max_input_per_uid`` =
    ``max_line`` = 1 MiB), so the daemon stops reading it; then the client closes.
    The daemon must let the connection go: its slot and its buffered bytes are freed.

    (A reader used to wait for room without watching the socket or any deadline:
    the connection, its fd and its 1 MiB stayed for the daemon's lifetime.)"""
    d = daemon_factory(FULL_BUDGET)
    d.start()
    nobody = agent_for(agents, d)
    i = nobody.hold()
    nobody.call("send", i=i, data=REQUEST_START + "x" * (MIB - len(REQUEST_START)))
    wait_for(lambda: server_stats(d)["input_bytes"] == MIB, "the line to fill the budget")
    nobody.close(i)

    def let_go() -> bool:
        stats = server_stats(d)
        return stats["connections"] == 1 and stats["input_bytes"] == 0  # 1: the stats'

    wait_for(let_go, "the closed connection to be let go", EVENT_DEADLINE)


@pytest.mark.slow
def test_timeouts_apply_while_the_input_budget_is_full(
    daemon_factory: Any, agents: list[Agent]
) -> None:
    """A connection whose unfinished line fills the input budget has nothing in
    flight: like any idle one (a trickling one included) it is closed with ``idle``
    after ``idle_timeout``, which frees the budget. Meanwhile another user's new
    connection, though ``max_input_total`` is full, gets its hello answered.

    (Neither timeout used to apply while a reader waited for room: the full
    connection was kept for ever, and with ``max_input_total`` full every
    non-admin user's new connection hung unanswered, its hello never read. Hello
    is now always read.)"""
    d = daemon_factory(FULL_BUDGET)
    d.start()
    nobody = agent_for(agents, d)
    i = nobody.hold()
    nobody.call("send", i=i, data=REQUEST_START + "x" * (MIB - len(REQUEST_START)))
    wait_for(lambda: server_stats(d)["input_bytes"] == MIB, "the line to fill the budget")
    other = agent_for(agents, d, OTHER_UID)  # read, like nobody, in FULL_BUDGET
    opened = other.call("open", hello=True, timeout=EVENT_DEADLINE)
    assert "message" in opened, f"another user's hello was never answered: {opened}"
    idle = nobody.call("read", i=i, timeout=EVENT_DEADLINE)
    check_error(idle.get("message"), "idle", request_id=None)


# -- 8. fairness between connections ----------------------------------------------------


def _pipelined_lists(count: int, first_id: int) -> bytes:
    return b"".join(
        json.dumps({"id": first_id + n, "method": "list", "params": {"limit": 1000}}).encode()
        + b"\n"
        for n in range(count)
    )


@pytest.mark.slow
def test_a_pipelining_connection_does_not_starve_another(daemon_factory: Any) -> None:
    """Connection A writes 1,000 ``list`` requests (1,000 runs each, over a journal
    of 2,000) in one go; connection B then asks for ``stats``. Two promises:

    - B's answer arrives before A's last result: B was not queued behind all of
      A's work. Replies that arrive together are counted as A's first, so the
      client's reading order cannot help B. Once one of A's results has come after
      B's answer (and 64 in all) the test hangs up on A, with hundreds of its
      requests unanswered (their work must stop: the daemon serves on).
    - A's requests are computed a few at a time (REQUESTS_AT_ONCE), not all of its
      ``max_inflight`` (64) at once. Seen from outside: the journal's read
      connections are pooled, as many as reads ever ran at once, two files each; A
      and B together may have added at most REQUESTS_AT_ONCE + 1 of them.

    What is deterministic: the second promise is a count, enforced by a limiter,
    whatever the machine's speed. The first is not strictly (it is a race between
    one cheap request and hundreds of journal reads of 1,000 runs each, and it
    holds as long as the scheduler runs every ready task in turn), and it is weak:
    the daemon before the fix passes it too. Its starvation showed as latency (A's
    64 requests all computing at once in threads that B's shared; with four such
    connections B waited 2 to 5 s for ``stats``, now about 0.5 s), while about as
    few of A's replies arrived in the meantime; latency is not asserted here. The
    pre-fix daemon fails the second promise (16 read connections for one A)."""
    d = daemon_factory('[pools.parked]\nkind = "process"\nworkers = 1\n')
    d.start()
    stop = d.dir / "stop-fair"
    setup = d.raw()
    # The parked pool's one worker is busy: the 2,000 runs stay queued, none runs.
    setup.result("submit", {"command": blocking_command(stop), "pool": "parked"})
    for batch in range(4):
        runs = [
            {"command": ["true"], "pool": "parked", "name": f"fair-{batch}-{n}"} for n in range(500)
        ]
        setup.result("submit", {"runs": runs})
    setup.close()
    journal_files = len(open_fds(daemon_pid(d))["journal"])

    a, b = d.raw(), d.raw()
    a.sock.sendall(_pipelined_lists(1000, first_id=1000))
    b_id = b.send("stats")

    pending = {a.sock: b"", b.sock: b""}
    a_kinds: list[str] = []  # "result" or "busy", in the order they arrived
    a_before_b: list[str] | None = None

    def done() -> bool:
        if a_before_b is None:
            return False
        if len(a_kinds) == 1000:
            return True
        # One of A's results came after B's answer, and A's first max_inflight
        # requests have been computed (enough reads for the second promise).
        return "result" in a_kinds[len(a_before_b) :] and a_kinds.count("result") >= 64

    while not done():
        ready, _, _ = select.select(list(pending), [], [], READY_DEADLINE)
        assert ready, f"no reply for {READY_DEADLINE}s ({len(a_kinds)} of A's so far)"
        for sock in sorted(ready, key=lambda s: s is b.sock):  # A's first
            data = sock.recv(1 << 20)
            assert data, "the daemon closed a connection"
            *lines, pending[sock] = (pending[sock] + data).split(b"\n")
            for line in lines:
                if sock is b.sock:
                    reply = json.loads(line)
                    assert reply["id"] == b_id and "result" in reply, reply
                    a_before_b = list(a_kinds)
                elif line.startswith(b'{"id":') and b',"result":' in line[:32]:
                    a_kinds.append("result")  # (not decoded: 1,000 runs each)
                else:
                    check_error(json.loads(line), "busy", "in flight")
                    a_kinds.append("busy")
    assert a_before_b is not None
    print(
        f"B's stats arrived after {len(a_before_b)} of A's replies"
        f" ({a_before_b.count('result')} results)"
    )
    assert "result" in a_kinds[len(a_before_b) :], "B's answer waited for all of A's work"
    a.close()  # with hundreds of its requests unanswered
    b.close()
    added = len(open_fds(daemon_pid(d))["journal"]) - journal_files
    assert added <= 2 * (REQUESTS_AT_ONCE + 1), f"{added // 2} more journal reads at once"
    stop.touch()
    assert_serves(d)


# -- 9. file descriptors come back -------------------------------------------------------

ALL_LIMITS = """
[limits]
max_connections = 32
max_connections_per_uid = 3
admin_reserved_connections = 4
hello_timeout = "1s"
idle_timeout = "1s"
send_timeout = "2s"

[access]
read = ["nobody"]
"""


def _quiet_fds(d: DaemonProcess) -> dict[str, list[str]]:
    """The daemon's fds once it serves one connection (ours) and nothing else."""
    c = wait_for(lambda: try_hello(d), "a root connection")

    def serving_only_this() -> bool:
        s = c.result("stats")["server"]
        busy = (s["connections"], s["requests_in_flight"], s["streams"], s["input_bytes"])
        return busy == (1, 1, 0, 0)  # the stats request counts itself

    try:
        wait_for(serving_only_this, "the daemon to serve nothing but this connection")
        return open_fds(daemon_pid(d))
    finally:
        c.close()


@pytest.mark.slow
def test_file_descriptors_come_back_after_all_of_it(
    daemon_factory: Any, agents: list[Agent]
) -> None:
    """One daemon goes through every kind of misbehaviour above (refusals, callers
    with no role, connections without hello, idle and trickling connections,
    abandoned and unread log streams, unfinished lines held against the input
    budget, garbage, an oversized line, an abandoned pipeline); afterwards it holds
    as many sockets and other files as before. The journal's read connections are
    pooled (as many as reads ever ran at once, each two fds): they may grow, within
    the pool's bound, but nothing else may."""
    d = daemon_factory(ALL_LIMITS)
    d.start()
    warm = d.raw()
    run_id = warm.result("submit", {"shell": "head -c 4000000 /dev/zero | tr '\\0' x"})["id"]
    wait_runs(warm, [run_id])
    warm.send("logs", {"id": run_id})
    while (reply := warm.read()) is not None and "event" in reply:
        pass
    assert reply is not None and "result" in reply, reply
    warm.close()
    before = _quiet_fds(d)

    nobody = agent_for(agents, d)
    no_role = agent_for(agents, d, OTHER_UID)
    held = [wait_for(nobody.try_hold, f"nobody's connection {n}") for n in (1, 2, 3)]
    refused = nobody.open()
    assert_refused(refused, "per user")
    nobody.close(refused["i"])
    for _ in range(3):
        opened = no_role.open()
        assert no_role.read(opened["i"])["message"]["error"]["code"] == "forbidden"
        no_role.close(opened["i"])
    for i in held:  # unfinished lines, more than the budget takes
        nobody.call(
            "send_in_background",
            i=i,
            data=REQUEST_START,
            fill=900_000,
        )

    silent = d.raw(hello=False)  # never says hello
    idle = d.raw()
    trickling = d.raw()
    trickling.sock.sendall(b'{"id": 3, "method": "st')
    abandoned = [d.raw() for _ in range(4)]
    for c in abandoned:
        c.send("logs", {"id": run_id})
    unread = d.raw()
    unread.send("logs", {"id": run_id})
    garbage = d.raw()
    garbage.send_line(b"not json")
    oversized = d.raw()
    with contextlib.suppress(OSError):
        oversized.sock.sendall(b"x" * (2 * MIB))
    pipeline = d.raw()
    pipeline.sock.sendall(_pipelined_lists(200, first_id=10))

    check_error(silent.read(), "hello_required", request_id=None)
    check_error(idle.read(), "idle", request_id=None)
    check_error(trickling.read(), "idle", request_id=None)
    check_error(garbage.read(), "invalid_json", request_id=None)
    check_error(read_first(oversized), "too_large", request_id=None)
    wait_for(lambda: server_stats(d)["input_bytes"] >= 2 * MIB, "nobody's lines to be read")
    for c in [silent, idle, trickling, *abandoned, garbage, oversized, pipeline]:
        c.close()
    for i in held:
        nobody.close(i)
    # `unread` is dropped by the daemon after send_timeout; it stays open here.
    wait_for(lambda: server_stats(d)["streams"] == 0, "every log stream to stop")
    drain_to_end(unread.sock)
    unread.close()

    def settled() -> dict[str, list[str]] | None:
        after = _quiet_fds(d)
        same = len(after["sockets"]) == len(before["sockets"]) and sorted(after["other"]) == sorted(
            before["other"]
        )
        return after if same else None

    after = wait_for(settled, "the daemon's sockets and files to be closed")
    # The journal's read connections are pooled, never closed: as many as reads
    # ever ran at once, which trio's thread limiter bounds.
    grown = len(after["journal"]) - len(before["journal"])
    assert grown <= 2 * JOURNAL_READS_AT_ONCE, (before["journal"], after["journal"])
    print(f"fds before {sum(map(len, before.values()))}, after {sum(map(len, after.values()))}")
    assert_serves(d)
