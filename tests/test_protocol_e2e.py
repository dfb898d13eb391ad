"""Bad input against the real daemon (docs/protocol.md): every misbehaviour gets the
documented error code with a message naming what was wrong, and the daemon keeps
serving: after each case a *fresh* connection can still submit a command and wait
for it to succeed.

Most cases share one daemon per module (misbehaviour accumulates, which is the
point); cases that need their own ``[limits]``/``[access]`` or an empty journal
start their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LONG_LIVED, READY_DEADLINE, DaemonProcess, Raw, wait_for

DOCUMENTED_METHODS = ("hello", "submit", "get", "list", "cancel", "logs", "wait", "stats")
MISSING = 999_999  # a run id no test journal reaches
LARGEST_ID = 2**63 - 1  # SQLite's largest integer: a valid id, just not an existing one
NOBODY = 65534
ANY_ID = object()  # check_error: do not check the reply's id
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


# -- helpers ---------------------------------------------------------------------------


def check_error(
    reply: dict[str, Any] | None,
    code: str,
    *names: str,
    request_id: Any = ANY_ID,
) -> dict[str, Any]:
    """``reply`` is an error with ``code`` whose message mentions every one of ``names``."""
    assert reply is not None, f"the daemon closed the connection instead of answering {code}"
    assert "error" in reply, f"expected a {code} error, got {reply}"
    error = reply["error"]
    assert error["code"] == code, reply
    assert isinstance(error["message"], str) and error["message"], reply
    for name in names:
        assert name in error["message"], f"the message does not name {name!r}: {reply}"
    if request_id is not ANY_ID:
        assert reply["id"] == request_id, reply
    return error


def request_error(conn: Raw, method: str, params: Any, code: str, *names: str) -> dict[str, Any]:
    """Send one request; its reply (matched by id) must be a ``code`` error naming ``names``."""
    request_id = conn.next_id
    reply = conn.request(method, params)
    return check_error(reply, code, *names, request_id=request_id)


def line_error(conn: Raw, line: bytes, code: str, *names: str) -> dict[str, Any]:
    """Send a raw line that cannot be matched to a request: the error comes with id null."""
    conn.send_line(line)
    return check_error(conn.read(), code, *names, request_id=None)


def assert_closed(conn: Raw, *, reset_ok: bool = False) -> None:
    """The server has closed the connection: EOF. With ``reset_ok``, a reset counts too:
    a server that closes before reading all we sent makes Linux report ECONNRESET."""
    try:
        rest = conn.file.readline()
    except ConnectionResetError:
        if not reset_ok:
            raise
        return
    finally:
        conn.close()
    assert rest == b"", f"expected the server to close the connection, got {rest!r}"


def assert_usable(conn: Raw) -> None:
    """The same connection still answers a well-formed request."""
    assert "pools" in conn.result("stats")


def send_hello(conn: Raw) -> int:
    """Send ``hello`` straight to the socket, as a daemon that is full may close the
    connection before (or while) it is written; returns the request id."""
    request_id = conn.next_id
    conn.next_id += 1
    line = json.dumps({"id": request_id, "method": "hello", "params": {"protocol": 1}})
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        conn.sock.sendall(line.encode() + b"\n")
    return request_id


def read_first(conn: Raw) -> dict[str, Any] | None:
    """The next message, or None at EOF or reset: what a refused connection says first."""
    try:
        return conn.read()
    except ConnectionResetError:
        return None


def try_hello(d: DaemonProcess) -> Raw | None:
    """A connection that got through ``hello``, or None if the daemon was full (busy)."""
    conn = d.raw(hello=False)
    request_id = send_hello(conn)
    reply = read_first(conn)
    if reply is not None and "result" in reply and reply["id"] == request_id:
        return conn
    conn.close()
    check_error(reply, "busy", "connections")
    return None


def wait_runs(conn: Raw, ids: list[int]) -> list[dict[str, Any]]:
    """``wait`` until every run is terminal; their summaries, in the order of ``ids``."""
    reply = conn.result("wait", {"ids": ids, "timeout": READY_DEADLINE})
    assert reply["timed_out"] is False, reply
    assert [r["id"] for r in reply["runs"]] == ids, reply
    assert all(r["state"] in TERMINAL for r in reply["runs"]), reply
    return list(reply["runs"])


def new_log_text(d: DaemonProcess) -> str:
    """What the daemon logged since it started (the shared one: since the case began)."""
    with open(d.logs[-1], "rb") as log:
        log.seek(getattr(d, "log_offset", 0))
        return log.read().decode(errors="replace")


def assert_serves(d: DaemonProcess) -> int:
    """The daemon is alive, has logged no internal error, and a fresh connection can
    submit a command and wait for it to succeed. Returns the run's id."""
    assert d.proc is not None and d.proc.poll() is None, f"jobd exited:\n{d.log_text()}"
    conn = wait_for(lambda: try_hello(d), "a free connection slot")
    try:
        submitted = conn.result("submit", {"command": ["true"]})
        assert submitted["state"] == "queued", submitted
        waited = wait_runs(conn, [submitted["id"]])
    finally:
        conn.close()
    assert waited[0]["state"] == "succeeded", waited
    assert "Traceback" not in new_log_text(d), new_log_text(d)
    return int(submitted["id"])


def blocking_command(stopfile: Path, pause: str = "sleep 0.05") -> list[str]:
    """A command that runs until ``stopfile`` exists (no timing involved), or until its
    directory is gone: a failed test leaves no process behind once its tmp dir is removed."""
    return [
        "sh",
        "-c",
        f"while [ ! -e '{stopfile}' ] && [ -d '{stopfile.parent}' ]; do {pause}; done",
    ]


def as_nobody(
    socket: Path, steps: list[tuple[str, dict[str, Any]]], *, then_read: bool = False
) -> list[dict[str, Any]]:
    """From a forked child running as uid/gid 65534: connect, ``hello``, send ``steps``
    one by one; returns the hello reply followed by one reply per step (and, with
    ``then_read``, every line after them until the daemon closes the connection)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 1
        try:
            os.close(read_end)
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                conn = Raw(socket, hello=False)
                replies = [conn.request("hello", {"protocol": 1})]
                replies += [conn.request(method, params) for method, params in steps]
                while then_read and (line := conn.read()) is not None:
                    replies.append(line)
                payload = {"replies": replies}
                status = 0
            except BaseException:
                payload = {"traceback": traceback.format_exc()}
            with os.fdopen(write_end, "w") as out:
                json.dump(payload, out)
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    result = json.loads(text) if text else {"traceback": "the child wrote nothing"}
    assert "replies" in result, f"the child (exit status {status}) failed:\n{result['traceback']}"
    return list(result["replies"])


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_daemon() -> Iterator[DaemonProcess]:
    root = Path(tempfile.mkdtemp(prefix="jobd-e", dir="/tmp"))
    (root / "d").mkdir(mode=0o700)  # jobd refuses a state directory others can write
    d = DaemonProcess(root / "d")
    LONG_LIVED.append(d)  # the check after each test spares the daemon itself, not its jobs
    try:
        d.start()
        yield d
    finally:
        LONG_LIVED.remove(d)
        d.kill_everything()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def shared(module_daemon: DaemonProcess) -> DaemonProcess:
    """One daemon for the cases that need no special configuration. Should a case kill
    it, that case fails (assert_serves) and the next one gets it restarted."""
    d = module_daemon
    if d.proc is not None and d.proc.poll() is None:
        try:
            d.raw().close()
        except (OSError, AssertionError):  # dying after the previous case crashed it
            d.proc.wait(READY_DEADLINE)
    if d.proc is None or d.proc.poll() is not None:
        d.start()
    # assert_serves looks for tracebacks in what the daemon logs during this case only
    d.log_offset = d.logs[-1].stat().st_size  # type: ignore[attr-defined]
    return d


@pytest.fixture
def conn(shared: DaemonProcess) -> Iterator[Raw]:
    """A connection to the shared daemon, past ``hello``."""
    c = shared.raw()
    yield c
    c.close()


# -- 1. garbage ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"not json", id="text"),
        pytest.param(b"{", id="brace"),
        pytest.param(b'{"id": 1, "method": "hello",', id="truncated"),
        pytest.param(b"\xff\xfe\x00garbage", id="not-utf8"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="too-deep-for-the-decoder"),
        # Not JSON numbers (RFC 8259), though Python's decoder takes them by default:
        pytest.param(
            b'{"id": 1, "method": "wait", "params": {"ids": [1], "timeout": NaN}}', id="nan"
        ),
        pytest.param(b'{"id": 1, "method": "list", "params": {"limit": Infinity}}', id="inf"),
        pytest.param(b'{"id": 1, "method": "get", "params": {"id": -Infinity}}', id="-inf"),
        # Python refuses to convert integers of over 4300 digits (this used to kill jobd)
        pytest.param(
            b'{"id": 1, "method": "get", "params": {"id": ' + b"1" * 5000 + b"}}", id="huge-int"
        ),
        # Text that is not Unicode, in any form (checked where it enters: an id like
        # this used to kill jobd when echoed in the reply, a name its commit).
        pytest.param(b'{"id": "\\ud800", "method": "stats"}', id="id-surrogate-escape"),
        pytest.param(b'{"id": "\xed\xa0\x80", "method": "stats"}', id="id-surrogate-bytes"),
        pytest.param(
            b'{"id": 1, "method": "submit", "params": {"command": ["echo", "\\udc80"]}}',
            id="command-surrogate-escape",
        ),
        pytest.param(
            b'{"id": 1, "method": "submit", "params": {"shell": "echo \\ud83d"}}',
            id="shell-high-surrogate-alone",
        ),
        pytest.param(
            b'{"id": 1, "method": "submit", "params": {"shell": "true", "env": {"\\udfff": "x"}}}',
            id="env-surrogate-escape",
        ),
        pytest.param(
            b'{"id": 1, "method": "list", "params": {"name": "\\ud800"}}',
            id="list-surrogate-escape",
        ),
        pytest.param(b'{"id": 1, "method": "\xc0\xae"}', id="overlong-encoding"),
        pytest.param(b'{"id": 1, "method": "st\x80ats"}', id="stray-continuation-byte"),
    ],
)
def test_invalid_json_gets_an_error_and_the_connection_is_closed(
    shared: DaemonProcess, conn: Raw, line: bytes
) -> None:
    line_error(conn, line, "invalid_json", "JSON")
    assert_closed(conn)
    assert_serves(shared)


def test_invalid_json_before_hello_closes_the_connection(shared: DaemonProcess) -> None:
    c = shared.raw(hello=False)
    line_error(c, b"GET / HTTP/1.1", "invalid_json", "JSON")
    assert_closed(c)
    assert_serves(shared)


# -- 2. and 3. JSON that is not a request ----------------------------------------------


@pytest.mark.parametrize(
    ("line", "names"),
    [
        pytest.param(b"[1, 2]", ["object"], id="array"),
        pytest.param(b'"x"', ["object"], id="string"),
        pytest.param(b"3", ["object"], id="number"),
        pytest.param(b"null", ["object"], id="null"),
        pytest.param(b'{"id": 1.5, "method": "stats"}', ["'id'"], id="id-float"),
        pytest.param(b'{"id": true, "method": "stats"}', ["'id'"], id="id-bool"),
        pytest.param(b'{"id": {"n": 1}, "method": "stats"}', ["'id'"], id="id-object"),
        pytest.param(b'{"id": [1], "method": "stats"}', ["'id'"], id="id-array"),
        pytest.param(b'{"id": 1}', ["'method'"], id="no-method"),
        pytest.param(b'{"id": 1, "method": 5}', ["'method'"], id="method-int"),
        pytest.param(b'{"id": 1, "method": null}', ["'method'"], id="method-null"),
        pytest.param(
            b'{"id": 1, "method": "stats", "params": [1]}', ["'params'"], id="params-array"
        ),
        pytest.param(
            b'{"id": 1, "method": "stats", "params": "x"}', ["'params'"], id="params-string"
        ),
        pytest.param(
            b'{"id": 1, "method": "stats", "params": 0}', ["'params'"], id="params-number"
        ),
    ],
)
def test_not_a_request_object_is_invalid_request_and_the_connection_stays_usable(
    shared: DaemonProcess, conn: Raw, line: bytes, names: list[str]
) -> None:
    conn.send_line(line)
    # Once the id has been read (it is valid), the error echoes it.
    request_id = 1 if names[0] in ("'method'", "'params'") else None
    check_error(conn.read(), "invalid_request", *names, request_id=request_id)
    assert_usable(conn)
    assert_serves(shared)


def test_blank_lines_are_ignored(shared: DaemonProcess, conn: Raw) -> None:
    conn.send_line(b"")
    conn.send_line(b"   \t ")
    request_id = conn.send("stats")
    reply = conn.read()  # the first reply is the one to stats: the blank lines got none
    assert reply is not None and reply["id"] == request_id and "result" in reply, reply


def test_escaped_surrogate_pairs_are_text(shared: DaemonProcess, conn: Raw) -> None:
    conn.send_line(
        b'{"id": 7, "method": "submit",'
        b' "params": {"command": ["true"], "name": "smile \\ud83d\\ude00"}}'
    )
    reply = conn.read()
    assert reply is not None and reply["id"] == 7 and "result" in reply, reply
    assert conn.result("get", {"id": reply["result"]["id"]})["name"] == "smile \U0001f600"
    wait_runs(conn, [reply["result"]["id"]])  # nothing of this test outlives it
    assert_serves(shared)


def test_string_ids_are_echoed(conn: Raw) -> None:
    conn.send_line(b'{"id": "req-a", "method": "get", "params": {"id": %d}}' % MISSING)
    check_error(conn.read(), "not_found", str(MISSING), request_id="req-a")


# -- 4. hello --------------------------------------------------------------------------


def test_hello_is_required_first_and_checks_the_version(shared: DaemonProcess) -> None:
    c = shared.raw(hello=False)
    try:
        error = request_error(c, "stats", {}, "hello_required", "hello")
        assert "hello" in error.get("hint", ""), error
        request_error(c, "submit", {"command": ["true"]}, "hello_required", "hello")
        request_error(c, "hello", {"protocol": 99}, "unsupported_version", "99")
        request_error(c, "hello", {"protocol": "1"}, "unsupported_version", "'1'")
        request_error(c, "hello", {"protocol": True}, "unsupported_version", "True")
        request_error(c, "hello", {"protocol": 1.0}, "unsupported_version", "1.0")
        request_error(c, "stats", {}, "hello_required")  # a refused hello does not count
        hello = c.result("hello", {"protocol": 1, "client": "test_protocol_e2e"})
        assert hello["protocol"] == 1, hello
        assert hello["server"].startswith("jobd "), hello
        assert shared.proc is not None and hello["pid"] == shared.proc.pid, hello
        assert hello["uid"] == os.getuid(), hello
        assert hello["roles"] == ["read", "submit", "admin"], hello  # the daemon's own uid
        assert_usable(c)
    finally:
        c.close()
    assert_serves(shared)


def test_a_second_hello_is_answered(shared: DaemonProcess, conn: Raw) -> None:
    """Nothing forbids repeating ``hello``; it must not be an 'unknown method'."""
    again = conn.result("hello", {"protocol": 1})
    assert again["protocol"] == 1 and again["roles"] == ["read", "submit", "admin"], again
    request_error(conn, "hello", {"protocol": 99}, "unsupported_version", "99")
    assert_usable(conn)
    assert_serves(shared)


# -- 5. unknown method -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["frobnicate", "", "SUBMIT", "handle_submit", "__init__"])
def test_unknown_method_lists_the_methods(shared: DaemonProcess, conn: Raw, method: str) -> None:
    error = request_error(conn, method, {}, "unknown_method", repr(method))
    hint = error.get("hint", "")
    for known in DOCUMENTED_METHODS:
        assert known in hint, f"{known!r} missing from the hint: {error}"
    assert_usable(conn)
    assert_serves(shared)


# -- 6. and 7. bad submissions ---------------------------------------------------------


def nested(depth: int) -> list[Any]:
    """``[[[...]]]``: ``depth`` arrays inside one another."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


BAD_SUBMISSIONS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("nothing", {}, ["command", "shell", "call"]),
    ("only-options", {"name": "x", "priority": "high"}, ["command", "shell", "call"]),
    ("command-and-shell", {"command": ["true"], "shell": "true"}, ["exactly one"]),
    ("shell-and-call", {"shell": "true", "call": "jobd.demo:noop"}, ["exactly one"]),
    ("empty-command", {"command": []}, ["command"]),
    ("command-string", {"command": "true"}, ["command"]),
    ("command-non-string", {"command": ["echo", 1]}, ["command"]),
    ("command-nul", {"command": ["echo", "a\0b"]}, ["command", "NUL"]),
    ("empty-shell", {"shell": "  "}, ["shell"]),
    ("bad-call", {"call": "os.system", "pool": "python"}, ["call"]),
    ("unknown-field", {"command": ["true"], "retries": 3}, ["retries"]),
    ("priority-name", {"command": ["true"], "priority": "urgent"}, ["priority", "urgent"]),
    ("priority-huge", {"command": ["true"], "priority": 10**9}, ["priority"]),
    ("priority-bool", {"command": ["true"], "priority": True}, ["priority"]),
    ("priority-float", {"command": ["true"], "priority": 1.5}, ["priority"]),
    ("env-int", {"command": ["true"], "env": {"A": 1}}, ["env"]),
    ("env-list", {"command": ["true"], "env": ["A=1"]}, ["env"]),
    ("env-name-with-equals", {"command": ["true"], "env": {"A=B": "1"}}, ["env"]),
    ("relative-cwd", {"command": ["true"], "cwd": "relative/dir"}, ["cwd"]),
    ("cwd-int", {"command": ["true"], "cwd": 3}, ["cwd"]),
    ("args-on-command", {"command": ["true"], "args": [1]}, ["args"]),
    ("kwargs-on-shell", {"shell": "true", "kwargs": {}}, ["kwargs"]),
    ("call-args-object", {"call": "jobd.demo:add", "pool": "python", "args": {}}, ["args"]),
    ("call-kwargs-list", {"call": "jobd.demo:add", "pool": "python", "kwargs": []}, ["kwargs"]),
    ("unknown-pool", {"command": ["true"], "pool": "nope"}, ["pool", "nope"]),
    ("empty-pool", {"command": ["true"], "pool": ""}, ["pool"]),
    ("name-int", {"command": ["true"], "name": 5}, ["name"]),
    ("name-too-long", {"command": ["true"], "name": "n" * 201}, ["name"]),
    ("tags-string", {"command": ["true"], "tags": "a"}, ["tags"]),
    ("tags-empty-tag", {"command": ["true"], "tags": ["ok", ""]}, ["tags"]),
    ("callable-in-process-pool", {"call": "jobd.demo:add", "args": [1, 2]}, ["thread"]),
    ("command-in-thread-pool", {"command": ["true"], "pool": "python"}, ["python", "process"]),
    ("shell-in-thread-pool", {"shell": "true", "pool": "python"}, ["python", "process"]),
    ("empty-batch", {"runs": []}, ["runs"]),
    ("batch-not-list", {"runs": {"command": ["true"]}}, ["runs"]),
    ("batch-with-extra", {"runs": [{"command": ["true"]}], "pool": "default"}, ["runs"]),
    ("batch-item-not-object", {"runs": [{"command": ["true"]}, "true"]}, ["runs[1]"]),
    ("batch-item-bad", {"runs": [{"command": ["true"]}, {"command": []}]}, ["runs[1]"]),
    ("batch-item-bad-pool", {"runs": [{"command": ["true"], "pool": "x"}]}, ["runs[0]", "x"]),
    # Arguments nested so deeply that the run could not be encoded into a reply again.
    ("args-too-deep", {"call": "jobd.demo:add", "pool": "python", "args": [nested(33)]}, ["args"]),
    (
        "kwargs-too-deep",
        {"call": "jobd.demo:add", "pool": "python", "kwargs": {"a": nested(200)}},
        ["kwargs"],
    ),
]


@pytest.mark.parametrize(
    ("params", "names"),
    [(params, names) for _, params, names in BAD_SUBMISSIONS],
    ids=[case for case, _, _ in BAD_SUBMISSIONS],
)
def test_bad_submission_is_invalid_params(
    shared: DaemonProcess, conn: Raw, params: dict[str, Any], names: list[str]
) -> None:
    request_error(conn, "submit", params, "invalid_params", *names)
    assert_usable(conn)
    assert_serves(shared)


def test_arguments_nested_up_to_the_limit_are_accepted(shared: DaemonProcess, conn: Raw) -> None:
    args = [nested(31), []]  # 32 levels below the args array: add() concatenates the lists
    run_id = conn.result("submit", {"call": "jobd.demo:add", "pool": "python", "args": args})["id"]
    assert wait_runs(conn, [run_id])[0]["state"] == "succeeded"
    assert conn.result("get", {"id": run_id})["args"] == args
    assert_serves(shared)


def test_a_rejected_batch_creates_no_run(shared: DaemonProcess, conn: Raw) -> None:
    name = "atomic-batch"
    good = {"command": ["true"], "name": name}
    request_error(conn, "submit", {"runs": [good, good, {"shell": 1}]}, "invalid_params", "runs[2]")
    # The reply came after validation, which happens before anything is journaled.
    assert conn.result("list", {"name": name})["runs"] == []
    assert_serves(shared)


# -- 10. unknown and finished runs -----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("get", {"id": MISSING}),
        ("logs", {"id": MISSING}),
        ("logs", {"id": MISSING, "follow": True}),
        ("wait", {"ids": [MISSING]}),
        ("wait", {"ids": [MISSING], "timeout": 0}),
        ("get", {"id": LARGEST_ID}),
        ("wait", {"ids": [LARGEST_ID]}),
    ],
    ids=["get", "logs", "logs-follow", "wait", "wait-timeout", "get-largest", "wait-largest"],
)
def test_unknown_run_is_not_found(
    shared: DaemonProcess, conn: Raw, method: str, params: dict[str, Any]
) -> None:
    run_id = params.get("id") or params["ids"][0]
    request_error(conn, method, params, "not_found", str(run_id))
    assert_usable(conn)
    assert_serves(shared)


def test_cancel_reports_unknown_and_finished_runs_per_id(shared: DaemonProcess, conn: Raw) -> None:
    finished = assert_serves(shared)
    results = conn.result("cancel", {"ids": [MISSING, finished, LARGEST_ID]})["results"]
    assert results == {
        str(MISSING): "not_found",
        str(finished): "already_succeeded",
        str(LARGEST_ID): "not_found",
    }
    assert conn.result("get", {"id": finished})["state"] == "succeeded"
    assert_serves(shared)


# -- 11. wrong parameter types ---------------------------------------------------------


BAD_PARAMS: list[tuple[str, str, dict[str, Any], list[str]]] = [
    ("get-id-string", "get", {"id": "1"}, ["'id'"]),
    ("get-id-missing", "get", {}, ["'id'"]),
    ("get-id-zero", "get", {"id": 0}, ["'id'"]),
    ("get-id-bool", "get", {"id": True}, ["'id'"]),
    ("get-id-float", "get", {"id": 1.0}, ["'id'"]),
    ("logs-id-string", "logs", {"id": "1"}, ["'id'"]),
    ("logs-follow-string", "logs", {"id": 1, "follow": "yes"}, ["'follow'"]),
    ("logs-attempt-zero", "logs", {"id": 1, "attempt": 0}, ["'attempt'"]),
    ("cancel-ids-empty", "cancel", {"ids": []}, ["'ids'"]),
    ("cancel-ids-missing", "cancel", {}, ["'ids'"]),
    ("cancel-ids-int", "cancel", {"ids": 1}, ["'ids'"]),
    ("cancel-ids-strings", "cancel", {"ids": ["1"]}, ["'ids'", "'1'"]),
    ("cancel-ids-negative", "cancel", {"ids": [-1]}, ["'ids'", "-1"]),
    ("wait-ids-empty", "wait", {"ids": []}, ["'ids'"]),
    ("wait-id-instead-of-ids", "wait", {"id": 1}, ["'ids'"]),
    ("wait-timeout-negative", "wait", {"ids": [1], "timeout": -1}, ["'timeout'"]),
    ("wait-timeout-string", "wait", {"ids": [1], "timeout": "5"}, ["'timeout'"]),
    ("wait-timeout-bool", "wait", {"ids": [1], "timeout": True}, ["'timeout'"]),
    ("list-limit-zero", "list", {"limit": 0}, ["'limit'"]),
    ("list-limit-huge", "list", {"limit": 5000}, ["'limit'", "1000"]),
    ("list-limit-bool", "list", {"limit": True}, ["'limit'"]),
    ("list-limit-string", "list", {"limit": "10"}, ["'limit'"]),
    ("list-state-bogus", "list", {"state": "bogus"}, ["'state'"]),
    ("list-state-list-bogus", "list", {"state": ["queued", "bogus"]}, ["'state'"]),
    ("list-state-int", "list", {"state": 1}, ["'state'"]),
    ("list-cursor-abc", "list", {"cursor": "abc"}, ["'cursor'"]),
    ("list-cursor-int", "list", {"cursor": 5}, ["'cursor'"]),
    ("list-pool-int", "list", {"pool": 1}, ["'pool'"]),
    ("list-tag-list", "list", {"tag": ["a"]}, ["'tag'"]),
    # Beyond SQLite's integers (these used to be 'internal' errors):
    ("get-id-huge", "get", {"id": 2**63}, ["'id'"]),
    ("logs-id-huge", "logs", {"id": 2**64}, ["'id'"]),
    ("cancel-id-huge", "cancel", {"ids": [1, 2**63]}, ["'ids'"]),
    ("wait-id-huge", "wait", {"ids": [2**70]}, ["'ids'"]),
    ("list-cursor-huge", "list", {"cursor": "9" * 30}, ["'cursor'"]),
    ("list-cursor-superscript", "list", {"cursor": "\u00b2"}, ["'cursor'"]),  # "²".isdigit()
    ("list-cursor-negative", "list", {"cursor": "-5"}, ["'cursor'"]),
]


@pytest.mark.parametrize(
    ("method", "params", "names"),
    [(method, params, names) for _, method, params, names in BAD_PARAMS],
    ids=[case for case, _, _, _ in BAD_PARAMS],
)
def test_wrong_parameter_type_is_invalid_params(
    shared: DaemonProcess, conn: Raw, method: str, params: dict[str, Any], names: list[str]
) -> None:
    request_error(conn, method, params, "invalid_params", *names)
    assert_usable(conn)
    assert_serves(shared)


# -- 12. and 13. clients that go away --------------------------------------------------


def _submit_and_vanish(d: DaemonProcess, name: str, *, read_hello: bool) -> None:
    """Send a submit and close the socket without reading its reply."""
    c = d.raw(hello=read_hello)
    if not read_hello:  # hello and submit in one go, leaving the hello reply unread too
        c.send("hello", {"protocol": 1})
    c.send("submit", {"command": ["true"], "name": name})
    c.close()


@pytest.mark.parametrize("read_hello", [True, False], ids=["after-hello", "hello-unread"])
def test_client_gone_mid_request_still_gets_its_run(
    shared: DaemonProcess, conn: Raw, read_hello: bool
) -> None:
    name = f"vanished-{read_hello}"
    _submit_and_vanish(shared, name, read_hello=read_hello)
    runs = wait_for(
        lambda: conn.result("list", {"name": name})["runs"], "the abandoned submit to be journaled"
    )
    assert len(runs) == 1, runs
    assert wait_runs(conn, [runs[0]["id"]])[0]["state"] == "succeeded"
    assert_serves(shared)


def test_client_gone_during_long_polls(shared: DaemonProcess, conn: Raw) -> None:
    """A client that leaves while its wait and logs --follow are pending."""
    stopfile = Path(shared.dir) / "stop-long-poll"
    run_id = conn.result("submit", {"command": blocking_command(stopfile)})["id"]
    c = shared.raw()
    c.send("wait", {"ids": [run_id]})
    c.send("logs", {"id": run_id, "follow": True})
    c.close()
    assert_serves(shared)
    stopfile.touch()
    assert wait_runs(conn, [run_id])[0]["state"] == "succeeded"
    assert_serves(shared)


@pytest.mark.parametrize(
    ("hello", "data"),
    [
        (False, b""),  # connect and close without a word
        (True, b""),  # hello, then close
        (False, b'{"id": 1, "method": "hel'),  # half a line before hello
        (True, b'{"id": 2, "method": "submit", "params": {"command": ["tr'),
        (True, b"\xff\xfe"),  # half a line of garbage: no newline, so never parsed
    ],
    ids=["silent", "hello-only", "half-hello", "half-submit", "half-garbage"],
)
def test_client_that_leaves_early_does_not_disturb_the_daemon(
    shared: DaemonProcess, hello: bool, data: bytes
) -> None:
    c = shared.raw(hello=hello)
    if data:
        c.file.write(data)
        c.file.flush()
    c.close()
    assert_serves(shared)


def test_many_clients_that_vanish(shared: DaemonProcess) -> None:
    for i in range(50):
        c = shared.raw(hello=i % 2 == 0)
        c.file.write(b'{"id": 9, "method": "li')
        c.file.flush()
        c.close()
    assert_serves(shared)


# -- 8. and 9. size limits -------------------------------------------------------------


def _padded(request: dict[str, Any], size: int) -> bytes:
    """A request line of exactly ``size`` bytes (JSON allows trailing whitespace)."""
    line = json.dumps(request).encode()
    assert len(line) <= size
    return line + b" " * (size - len(line))


def test_oversized_lines_are_too_large_and_close_the_connection(daemon_factory: Any) -> None:
    d = daemon_factory("[limits]\nmax_line = 2048\n")
    d.start()

    c = d.raw()  # just under the limit: fine
    c.send_line(_padded({"id": 50, "method": "stats"}, 2047))
    reply = c.read()
    assert reply is not None and reply["id"] == 50 and "result" in reply, reply
    c.send_line(_padded({"id": 51, "method": "stats"}, 2049))  # just over
    check_error(c.read(), "too_large", "2048", request_id=None)
    assert_closed(c, reset_ok=True)

    big = {"id": 1, "method": "submit", "params": {"command": ["echo", "x" * 10_000]}}
    c = d.raw()
    c.send_line(json.dumps(big).encode())
    check_error(c.read(), "too_large", "2048", request_id=None)
    assert_closed(c, reset_ok=True)

    c = d.raw()  # no newline at all: refused without waiting for one
    c.file.write(b"y" * 10_240)
    c.file.flush()
    check_error(c.read(), "too_large", "2048", request_id=None)
    assert_closed(c, reset_ok=True)

    c = d.raw(hello=False)  # before hello too
    c.file.write(b"z" * 10_240)
    c.file.flush()
    check_error(c.read(), "too_large", request_id=None)
    assert_closed(c, reset_ok=True)

    assert_serves(d)


def test_batches_over_the_limit_are_too_large(daemon_factory: Any) -> None:
    d = daemon_factory("[limits]\nmax_batch = 10\n")
    d.start()
    c = d.raw()
    runs = [{"command": ["true"], "name": f"b{i}"} for i in range(11)]
    request_error(c, "submit", {"runs": runs}, "too_large", "11", "10")
    assert c.result("list", {})["runs"] == []  # nothing of it was accepted

    ids = c.result("submit", {"runs": runs[:10]})["ids"]
    assert len(ids) == 10 and len(set(ids)) == 10, ids
    assert ids == sorted(ids), ids
    names = [c.result("get", {"id": i})["name"] for i in ids]
    assert names == [f"b{i}" for i in range(10)], names  # in the order submitted
    assert {r["state"] for r in wait_runs(c, ids)} == {"succeeded"}
    c.close()
    assert_serves(d)


# -- 14. and 15. concurrency limits ----------------------------------------------------


def test_too_many_requests_in_flight_is_busy(daemon_factory: Any) -> None:
    d = daemon_factory("[limits]\nmax_inflight = 3\n")
    d.start()
    stopfile = d.dir / "stop-inflight"
    c = d.raw()
    run_id = c.result("submit", {"command": blocking_command(stopfile)})["id"]
    waits = [c.send("wait", {"ids": [run_id]}) for _ in range(3)]  # these stay in flight
    for method, params in [("stats", {}), ("get", {"id": run_id}), ("wait", {"ids": [run_id]})]:
        request_error(c, method, params, "busy", "3")
    # The connection is not dropped, and other connections are not limited by it.
    assert_serves(d)

    stopfile.touch()
    replies = {}
    while len(replies) < len(waits):
        reply = c.read()
        assert reply is not None, "the daemon closed the connection"
        replies[reply["id"]] = reply
    assert sorted(replies) == waits, replies
    for reply in replies.values():
        assert reply["result"]["timed_out"] is False, reply
    assert c.result("get", {"id": run_id})["state"] == "succeeded"
    assert_usable(c)  # the slots are free again
    c.close()
    assert_serves(d)


def test_a_client_that_keeps_the_limit_in_flight_is_never_busy(daemon_factory: Any) -> None:
    """A request is no longer in flight once its reply has arrived: a client that sends
    the next request as soon as it reads a reply never exceeds the limit."""
    d = daemon_factory("[limits]\nmax_inflight = 3\n")
    d.start()
    c = d.raw()
    sent = [c.send("list", {"limit": 1}) for _ in range(3)]
    for _ in range(300):
        reply = c.read()
        assert reply is not None and "result" in reply, reply
        sent.remove(reply["id"])
        sent.append(c.send("list", {"limit": 1}))
    for _ in sent:
        reply = c.read()
        assert reply is not None and "result" in reply, reply
    c.close()
    assert_serves(d)


def test_too_many_connections_is_busy(daemon_factory: Any) -> None:
    d = daemon_factory("[limits]\nmax_connections = 2\n")
    d.start()
    # The readiness probe's connection may still be counted for a moment.
    held = [wait_for(lambda: try_hello(d), f"connection {n} to be accepted") for n in (1, 2)]
    try:
        third = d.raw(hello=False)  # says nothing: the daemon speaks first
        check_error(read_first(third), "busy", "connections", "2", request_id=None)
        assert_closed(third)

        fourth = d.raw(hello=False)  # says hello: still refused
        send_hello(fourth)
        check_error(read_first(fourth), "busy", "connections", request_id=None)
        assert_closed(fourth)  # its hello was read: the error arrives, no reset

        for c in held:  # the held connections were not disturbed
            assert_usable(c)
        held.pop().close()
        held.append(wait_for(lambda: try_hello(d), "a freed connection slot"))
        assert_usable(held[-1])
    finally:
        for c in held:
            c.close()
    assert_serves(d)


# -- 16. pagination and filters --------------------------------------------------------


def _list_all(c: Raw, params: dict[str, Any], limit: int) -> tuple[list[int], list[int]]:
    """Follow next_cursor to the end; returns (ids in order, page sizes)."""
    ids: list[int] = []
    sizes: list[int] = []
    cursor = None
    while True:
        page = c.result(
            "list", {**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        )
        ids += [r["id"] for r in page["runs"]]
        sizes.append(len(page["runs"]))
        cursor = page["next_cursor"]
        if cursor is None:
            return ids, sizes
        assert isinstance(cursor, str), page
        assert len(sizes) <= 100, "next_cursor never ends"


def test_list_pages_and_filters(daemon_factory: Any) -> None:
    d = daemon_factory()
    d.start()
    c = d.raw()

    def submission(i: int) -> dict[str, Any]:
        run: dict[str, Any] = {"name": f"run-{i}", "tags": ["even" if i % 2 == 0 else "odd"]}
        if i == 24:
            run.update(call="jobd.demo:add", args=[1, 2], pool="python")
        elif i % 10 == 3:
            run["command"] = ["false"]
        else:
            run["command"] = ["true"]
        return run

    ids = c.result("submit", {"runs": [submission(i) for i in range(25)]})["ids"]
    wait_runs(c, ids)
    by_index = dict(enumerate(ids))
    newest_first = sorted(ids, reverse=True)

    listed, sizes = _list_all(c, {}, 10)
    assert sizes == [10, 10, 5], sizes
    assert listed == newest_first  # 25 distinct ids, newest first, nothing twice

    assert _list_all(c, {}, 25) == (newest_first, [25])
    assert _list_all(c, {}, 1000) == (newest_first, [25])

    failed = sorted((by_index[i] for i in (3, 13, 23)), reverse=True)
    assert _list_all(c, {"state": "failed"}, 10)[0] == failed
    assert _list_all(c, {"state": ["failed", "succeeded"]}, 10)[0] == newest_first
    assert _list_all(c, {"state": ["queued", "running"]}, 10)[0] == []
    assert _list_all(c, {"pool": "python"}, 10)[0] == [by_index[24]]
    assert _list_all(c, {"pool": "default"}, 10)[0] == newest_first[1:]
    assert _list_all(c, {"pool": "nope"}, 10)[0] == []
    assert _list_all(c, {"name": "run-7"}, 10)[0] == [by_index[7]]
    even = sorted((by_index[i] for i in range(0, 25, 2)), reverse=True)
    assert _list_all(c, {"tag": "even"}, 5) == (even, [5, 5, 3])
    assert _list_all(c, {"tag": "even", "state": "failed"}, 5)[0] == []
    assert _list_all(c, {"tag": "odd", "state": "failed"}, 5)[0] == failed

    run = c.result("list", {"name": "run-24"})["runs"][0]
    assert (run["kind"], run["state"], run["pool"], run["tags"]) == (
        "call",
        "succeeded",
        "python",
        ["even"],
    )
    c.close()
    assert_serves(d)


# -- wait ------------------------------------------------------------------------------


def test_wait_never_answers_with_an_active_run(daemon_factory: Any) -> None:
    """``wait`` answers once every run is terminal (or with timed_out true)."""
    d = daemon_factory()
    d.start()
    c = d.raw()
    # Many finished runs make wait's first read of the journal last a while...
    noop = {"call": "jobd.demo:noop", "pool": "python"}
    finished = c.result("submit", {"runs": [noop] * 2000})["ids"]
    wait_runs(c, finished)
    for attempt in range(10):
        stopfile = d.dir / f"stop-wait-{attempt}"
        run_id = c.result("submit", {"command": blocking_command(stopfile, pause=":")})["id"]
        request_id = c.send("wait", {"ids": [run_id, *finished]})
        stopfile.touch()  # ...and the run is likely to end during it
        reply = c.read()
        assert reply is not None and reply["id"] == request_id, reply
        assert reply["result"]["timed_out"] is False, reply
        first = reply["result"]["runs"][0]
        assert first["state"] in TERMINAL, f"attempt {attempt}: wait answered with {first}"
    c.close()


# -- 17. authorisation -----------------------------------------------------------------


def _open_to_everyone(d: DaemonProcess) -> None:
    """Let uid 65534 reach the socket (base_config fixes socket_mode 0600)."""
    for directory in (d.dir.parent, d.dir):
        os.chmod(directory, 0o755)
    os.chmod(d.socket, 0o666)


@pytest.fixture
def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")


@pytest.mark.usefixtures("need_root")
def test_a_user_without_roles_is_answered_hello_and_closed(daemon_factory: Any) -> None:
    """No role, nothing to do: such a caller must not hold a connection slot."""
    d = daemon_factory()
    d.start()
    _open_to_everyone(d)
    hello, *rest = as_nobody(d.socket, [], then_read=True)
    assert hello["result"]["uid"] == NOBODY, hello
    assert hello["result"]["roles"] == [], hello
    (closing,) = rest  # then the connection ends
    error = check_error(closing, "forbidden", "no role", str(NOBODY), request_id=None)
    assert "[access]" in error.get("hint", ""), error
    assert_serves(d)


@pytest.mark.usefixtures("need_root")
def test_a_submitter_may_submit_and_cancel_only_its_own_runs(daemon_factory: Any) -> None:
    d = daemon_factory('[access]\nsubmit = ["nobody"]\n')
    d.start()
    _open_to_everyone(d)
    stopfile = d.dir / "stop-auth"
    root = d.raw()
    roots_run = root.result("submit", {"command": blocking_command(stopfile)})["id"]
    wait_for(lambda: root.result("get", {"id": roots_run})["state"] == "running", "root's run")

    hello, mine, listed, call, cancel_roots, get_roots = as_nobody(
        d.socket,
        [
            ("submit", {"command": blocking_command(stopfile), "name": "nobody's"}),
            ("list", {}),
            ("submit", {"call": "jobd.demo:add", "args": [1, 2], "pool": "python"}),
            ("cancel", {"ids": [roots_run]}),
            ("get", {"id": roots_run}),
        ],
    )
    assert hello["result"]["uid"] == NOBODY, hello
    assert hello["result"]["roles"] == ["read", "submit"], hello
    my_run = mine["result"]["id"]
    assert {r["id"] for r in listed["result"]["runs"]} == {roots_run, my_run}, listed
    check_error(call, "forbidden", "admin")
    assert cancel_roots["result"]["results"] == {str(roots_run): "forbidden"}, cancel_roots
    assert get_roots["result"]["state"] == "running", get_roots

    mine_again = root.result("get", {"id": my_run})
    assert mine_again["owner"] == NOBODY, mine_again
    _, cancel_mine = as_nobody(d.socket, [("cancel", {"ids": [my_run, MISSING]})])
    results = cancel_mine["result"]["results"]
    assert results[str(my_run)] in ("cancelled", "cancelling"), cancel_mine
    assert results[str(MISSING)] == "not_found", cancel_mine

    stopfile.touch()
    waited = wait_runs(root, [roots_run, my_run])
    assert [r["state"] for r in waited] == ["succeeded", "cancelled"], waited
    root.close()
    assert_serves(d)


# -- the shared daemon survived everything ---------------------------------------------


def test_the_shared_daemon_is_still_healthy(shared: DaemonProcess) -> None:
    assert_serves(shared)
    c = shared.raw()
    stats = c.result("stats")
    assert stats["daemon"]["healthy"] is True, stats
    assert stats["journal"]["failed_commits"] == 0, stats
    assert "failed" not in stats["states"], stats  # every run of the shared daemon succeeded
    # Every run that got in can still be encoded into a reply: nothing poisons `list`.
    listed, _ = _list_all(c, {}, 1000)
    assert len(listed) == sum(stats["states"].values()), stats
    c.close()


# -- review fixes: limits that clients can see and live with -------------------------


def test_an_oversized_line_gets_its_error_even_while_the_client_is_still_writing(
    daemon_factory: Any,
) -> None:
    """A line far larger than the socket buffers: the daemon answers too_large, then
    reads and discards the rest, so the client finishes writing and reads the error
    instead of a reset connection."""
    d = daemon_factory("[limits]\nmax_line = 2048\n")
    d.start()
    c = d.raw()
    c.sock.sendall(b"x" * (8 * 1024 * 1024) + b"\n")  # no EPIPE, no reset
    check_error(c.read(), "too_large", "2048", request_id=None)
    assert_closed(c)  # a clean EOF, not ECONNRESET
    assert_serves(d)


def test_hello_announces_the_limits(daemon_factory: Any) -> None:
    d = daemon_factory("[limits]\nmax_line = 65536\nmax_batch = 7\nmax_inflight = 5\n")
    d.start()
    c = d.raw(hello=False)
    hello = c.result("hello", {"protocol": 1, "client": "a newer client, say"})
    assert hello["limits"] == {"max_line": 65536, "max_batch": 7, "max_inflight": 5}


@pytest.mark.parametrize(
    ("method", "params", "unknown"),
    [
        ("logs", {"id": 1, "folow": True}, "'folow'"),
        ("list", {"states": "queued"}, "'states'"),
        ("get", {"id": 1, "extra": 1}, "'extra'"),
        ("stats", {"verbose": True}, "'verbose'"),
        ("submit", {"runs": [{"command": ["true"]}], "window": 4}, "'window'"),
    ],
)
def test_unknown_parameters_are_refused(
    shared: DaemonProcess, conn: Raw, method: str, params: dict[str, Any], unknown: str
) -> None:
    request_error(conn, method, params, "invalid_params", unknown, method)
    assert_usable(conn)


def test_list_pages_stay_within_max_line(daemon_factory: Any) -> None:
    """Runs as large as a request allows: a list page holds as many as fit in one
    reply line (at least one), and the cursor leads to the rest."""
    d = daemon_factory("[limits]\nmax_line = 65536\n")
    d.start()
    c = d.raw()
    ids = [
        c.result("submit", {"command": ["true", str(i) * 30_000], "name": f"big{i}"})["id"]
        for i in range(5)
    ]
    seen: list[int] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        c.send("list", params)
        line = c.file.readline()
        assert len(line) <= 65536 + 1024, len(line)
        page = json.loads(line)["result"]
        assert 1 <= len(page["runs"]) < 5
        seen += [r["id"] for r in page["runs"]]
        if page["next_cursor"] is None:
            break
        params = {"limit": 100, "cursor": page["next_cursor"]}
    assert sorted(seen) == sorted(ids)
    wait_runs(c, ids)


def test_a_connection_without_hello_is_closed_after_hello_timeout(daemon_factory: Any) -> None:
    # Long enough for any client here to say hello in time, however loaded the machine
    # (the readiness probe and raw() send it as soon as they are connected).
    d = daemon_factory('[limits]\nhello_timeout = "2s"\n')
    d.start()
    said_hello = d.raw()
    c = d.raw(hello=False)  # says nothing at all
    check_error(c.read(), "hello_required", "hello", request_id=None)
    assert_closed(c)
    assert_usable(said_hello)  # connected earlier, yet not timed out: it said hello


def test_a_last_line_without_newline_gets_an_error(shared: DaemonProcess, conn: Raw) -> None:
    conn.file.write(b'{"id": 9, "method": "stats"}')
    conn.file.flush()
    conn.sock.shutdown(socket.SHUT_WR)
    check_error(conn.read(), "invalid_request", "newline", request_id=None)
    assert_closed(conn)


def test_logs_without_follow_is_answered_after_the_client_half_closes(
    shared: DaemonProcess, conn: Raw
) -> None:
    run_id = assert_serves(shared)
    request_id = conn.send("logs", {"id": run_id})
    conn.sock.shutdown(socket.SHUT_WR)  # as `nc -N` does after its input
    reply = conn.read()
    while reply is not None and "event" in reply:
        reply = conn.read()
    assert reply is not None and reply["id"] == request_id and "result" in reply, reply


def test_wait_for_an_unknown_run_is_not_found_at_once(shared: DaemonProcess, conn: Raw) -> None:
    stopfile = Path(tempfile.mkdtemp(prefix="jobd-w", dir="/tmp")) / "stop"
    try:
        running = conn.result("submit", {"command": blocking_command(stopfile)})["id"]
        # The other run never ends while this request is served: not_found cannot
        # have waited for it.
        request_error(conn, "wait", {"ids": [running, MISSING]}, "not_found", str(MISSING))
    finally:
        stopfile.touch()
        shutil.rmtree(stopfile.parent, ignore_errors=True)
    wait_runs(conn, [running])


def test_logs_keep_multibyte_characters_whole_across_chunks(
    shared: DaemonProcess, conn: Raw
) -> None:
    # 65,535 ASCII bytes, then two-byte characters: the first straddles the
    # daemon's 64 KiB read and event boundary.
    script = "import sys; sys.stdout.write('a' * 65535 + '\u00e9' * 10)"
    run_id = conn.result("submit", {"command": ["python3", "-c", script]})["id"]
    wait_runs(conn, [run_id])
    request_id = conn.send("logs", {"id": run_id})
    text = ""
    while (reply := conn.read()) is not None and "event" in reply:
        text += reply["event"]["data"]
    assert reply is not None and reply["id"] == request_id and "result" in reply, reply
    assert text == "a" * 65535 + "\u00e9" * 10
