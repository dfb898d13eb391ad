"""jobctl as a user runs it: a real subprocess talking to a real daemon.

jobctl finds the daemon through ``JOBD_SOCKET`` here, as in a shell. Commands
that are independent of each other run as parallel processes to keep the
suite fast (each jobctl process takes a few hundred milliseconds to start).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from jobd.client import Client
from tests.conftest import READY_DEADLINE, DaemonProcess, python_module, wait_for

JOBCTL = python_module("jobd.cli")  # with SIGINT as at a terminal: the tests press Ctrl-C
# Seconds a jobctl command may take: only matters when something is broken. Each takes
# ~0.5 s of CPU, and jobctl_all starts up to 22 at once: on a loaded 2-core machine
# they take a minute or more together.
TIMEOUT = 300.0

EXIT_ERROR = 1
EXIT_UNREACHABLE = 2
EXIT_TIMEOUT = 124
EXIT_CANCELLED = 130


def blocker(path: Path) -> list[str]:
    """Runs until ``path`` exists, or its directory is removed (no process outlives a test)."""
    return ["sh", "-c", f'while [ ! -e "{path}" ] && [ -d "{path.parent}" ]; do sleep 0.02; done']


def environment(sock: Path) -> dict[str, str]:
    # A wide terminal, so that tables are not cut; no colour codes either way (not a tty).
    return dict(os.environ, JOBD_SOCKET=str(sock), COLUMNS="200", NO_COLOR="1")


def start(sock: Path, *args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    return popen([*JOBCTL, *args], environment(sock), cwd)


def popen(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started.append(proc)
    return proc


started: list[subprocess.Popen[str]] = []  # what the running test started


@pytest.fixture(autouse=True)
def _no_jobctl_outlives_its_test() -> Iterator[None]:
    """A test that fails half-way may leave a jobctl waiting or following: kill and
    reap it (and close its pipes) before the next test."""
    yield
    while started:
        proc = started.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def jobctl(sock: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return finish(start(sock, *args, cwd=cwd))


def jobctl_all(sock: Path, *commands: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
    """Independent commands, run at the same time; results in the order given."""
    procs: list[subprocess.Popen[str]] = []
    try:
        procs = [start(sock, *args) for args in commands]
        return [finish(proc) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args, result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def as_json(result: subprocess.CompletedProcess[str], code: int = 0) -> Any:
    assert result.returncode == code, (result.args, result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)


def run_id_of(result: subprocess.CompletedProcess[str]) -> int:
    out = ok(result)
    assert out.strip().isdigit(), out  # nothing but the id, for `id=$(jobctl submit ...)`
    return int(out)


def one_line_error(
    result: subprocess.CompletedProcess[str], code: int, message: str, *, stdout: str = ""
) -> None:
    """A red line (and maybe a hint), the documented exit code, no traceback."""
    assert result.returncode == code, (result.args, result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert lines and lines[0].startswith("jobctl: ") and message in lines[0], result.stderr
    assert all(line.startswith("  hint: ") for line in lines[1:]), result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == stdout


def json_error(result: subprocess.CompletedProcess[str], code: int, error_code: str) -> Any:
    """With --json: the red line on stderr, and the same error as one object on stdout."""
    assert result.stdout.count("\n") == 1, result.stdout  # one line, also amid `logs --json`
    error = json.loads(result.stdout)["error"]
    assert set(error) == {"code", "message", "hint"} and error["code"] == error_code, error
    one_line_error(result, code, "", stdout=result.stdout)
    return error


def usage_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """click's usage error: exit 2, a message naming what is wrong, nothing on stdout."""
    assert result.returncode == EXIT_UNREACHABLE, (result.args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == "", (result.args, result.stderr)
    text = " ".join(result.stderr.replace("│", " ").split())  # the message may be wrapped
    for word in words:
        assert word in text, (result.args, word, result.stderr)


def read_until(proc: subprocess.Popen[str], text: str) -> str:
    """What ``proc`` printed, up to and including ``text`` (which must come)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()  # read below the text layer: select() cannot see its buffer
    received = ""
    deadline = time.monotonic() + TIMEOUT
    while text not in received:
        left = deadline - time.monotonic()
        assert left > 0, f"no {text!r} from {proc.args}; got {received!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            data = os.read(fd, 65536)
            assert data, f"{proc.args} ended before {text!r}; got {received!r}"
            received += data.decode()
    return received


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[Client]:
    """For what a test only prepares or checks: each jobctl process costs ~0.4 s of CPU."""
    with Client(daemon.socket, timeout=READY_DEADLINE) as c:
        yield c


def state_of(client: Client, run_id: int) -> str:
    state: str = client.get(run_id)["state"]
    return state


# -- the acceptance flow -----------------------------------------------


def test_submit_wait_logs_ls(daemon: DaemonProcess) -> None:
    sock = daemon.socket
    run_id = run_id_of(jobctl(sock, "submit", "--", "echo", "hi"))
    wait = jobctl(sock, "wait", str(run_id))
    assert ok(wait).split() == [str(run_id), "succeeded", "exit", "0"]
    logs, listing, listing_json = jobctl_all(sock, ["logs", str(run_id)], ["ls"], ["ls", "--json"])
    assert ok(logs) == "hi\n"
    header, *rows = ok(listing).splitlines()
    assert header.split()[:2] == ["ID", "STATE"]
    assert len(rows) == 1
    assert rows[0].split()[:5] == [str(run_id), "succeeded", "default", "normal", "echo"]
    page = as_json(listing_json)
    assert [(r["id"], r["state"], r["exit_code"]) for r in page["runs"]] == [
        (run_id, "succeeded", 0)
    ]
    assert page["next_cursor"] is None


# -- submit -----------------------------------------------------------------


def test_submit_shell_and_callable(daemon: DaemonProcess, client: Client) -> None:
    sock = daemon.socket
    line = 'echo "$((1 + 2))" | tr 3 x'
    shell, call = (
        run_id_of(r)
        for r in jobctl_all(
            sock,
            ["submit", "--shell", line],
            ["submit", "--call", "jobd.demo:add", "--arg", "1", "--arg", "2", "--pool", "python"],
        )
    )
    client.wait(shell)
    client.wait(call)
    logs, show_shell, show_call = jobctl_all(
        sock, ["logs", str(shell)], ["show", str(shell), "--json"], ["show", str(call), "--json"]
    )
    assert ok(logs) == "x\n"
    shell_run = as_json(show_shell)
    assert shell_run["kind"] == "shell" and shell_run["shell"] == line
    assert shell_run["state"] == "succeeded"
    call_run = as_json(show_call)
    assert call_run["kind"] == "call" and call_run["call"] == "jobd.demo:add"
    assert call_run["args"] == [1, 2] and call_run["pool"] == "python"
    assert call_run["state"] == "succeeded"
    assert [a["outcome"] for a in call_run["attempt_list"]] == ["succeeded"]


def test_submit_options_are_reflected_in_show(
    daemon: DaemonProcess, client: Client, workdir: Path
) -> None:
    sock = daemon.socket
    (workdir / "sub").mkdir()
    script = 'echo "$K[$EMPTY]"; pwd -P'
    options = ["--priority", "high", "--name", "n", "--tag", "t", "-t", "u"]
    options += ["--env", "K=V", "-e", "EMPTY=", "--cwd", "sub"]  # relative to jobctl's cwd
    run_id = run_id_of(jobctl(sock, "submit", *options, "--", "sh", "-c", script, cwd=workdir))
    client.wait(run_id)
    show_json, show, logs, by_tag = jobctl_all(
        sock,
        ["show", str(run_id), "--json"],
        ["show", str(run_id)],
        ["logs", str(run_id)],
        ["ls", "--tag", "u"],
    )
    run = as_json(show_json)
    assert run["priority"] == 100 and run["name"] == "n" and run["tags"] == ["t", "u"]
    assert run["env"] == {"K": "V", "EMPTY": ""}
    assert run["cwd"] == str(workdir / "sub")
    assert run["command"] == ["sh", "-c", script]
    assert run["state"] == "succeeded"
    human = ok(show)
    assert "high (100)" in human and "K=V" in human and "t, u" in human
    assert ok(logs) == f"V[]\n{(workdir / 'sub').resolve()}\n"
    assert ok(by_tag).splitlines()[1].split()[:5] == [
        str(run_id),
        "succeeded",
        "default",
        "high",
        "n",
    ]
    assert client.list(tag="nope")["runs"] == []


# -- wait, cancel -----------------------------------------------------------


@pytest.mark.slow
def test_wait_exit_codes_and_cancel(daemon: DaemonProcess, client: Client, workdir: Path) -> None:
    sock = daemon.socket
    failing = client.submit(command=["sh", "-c", "exit 3"])
    blocked = client.submit(command=blocker(workdir / "go"))
    wait_for(lambda: state_of(client, blocked) == "running", "the blocker to run")

    waiting = start(sock, "wait", str(blocked))  # blocks until the run is cancelled
    exit3, timed_out, timed_out_json = jobctl_all(
        sock,
        ["wait", str(failing)],
        ["wait", str(blocked), "--timeout", "0.05"],
        ["wait", "--timeout", "0", "--json", str(blocked)],
    )
    assert exit3.returncode == 3
    assert exit3.stdout.split()[:4] == [str(failing), "failed", "exit", "3"]
    assert timed_out.returncode == EXIT_TIMEOUT
    assert timed_out.stdout.split() == [str(blocked), "running"]
    assert "timed out" in timed_out.stderr
    result = as_json(timed_out_json, EXIT_TIMEOUT)
    assert result["timed_out"] is True and result["runs"][0]["state"] == "running"
    assert waiting.poll() is None  # still waiting

    cancel = jobctl(sock, "cancel", str(blocked))
    assert ok(cancel).split() == [str(blocked), "cancelling"]
    waited = finish(waiting)
    assert waited.returncode == EXIT_CANCELLED, waited
    assert waited.stdout.split()[:2] == [str(blocked), "cancelled"]

    succeeding = client.submit(command=["true"])
    client.wait(succeeding)
    both = jobctl(sock, "wait", str(succeeding), str(failing))
    assert both.returncode == EXIT_ERROR  # several runs: 0 only if every one succeeded
    assert [line.split()[:2] for line in both.stdout.splitlines()] == [
        [str(succeeding), "succeeded"],
        [str(failing), "failed"],
    ]


def test_cancel(daemon: DaemonProcess, client: Client, workdir: Path) -> None:
    sock = daemon.socket
    go = workdir / "go"
    busy = [client.submit(command=blocker(go)) for _ in range(2)]
    wait_for(lambda: [state_of(client, i) for i in busy] == ["running"] * 2, "busy workers")
    queued = client.submit(command=["true"])  # both workers are busy: it stays queued
    missing = str(queued + 100)
    waiting = start(sock, "submit", "--wait", "--", "true")  # queued too
    run_id = int(read_until(waiting, "\n"))  # the id comes at once, before the wait
    cancel, not_found = jobctl_all(
        sock, ["cancel", str(queued), str(run_id)], ["cancel", "--json", missing]
    )
    assert sorted(ok(cancel).splitlines()) == sorted([f"{queued} cancelled", f"{run_id} cancelled"])
    assert as_json(not_found, EXIT_ERROR) == {"results": {missing: "not_found"}}
    waited = finish(waiting)
    assert waited.returncode == EXIT_CANCELLED, waited
    assert state_of(client, queued) == state_of(client, run_id) == "cancelled"
    go.touch()


# -- logs -------------------------------------------------------------------


def test_logs_follow_a_running_job(daemon: DaemonProcess, client: Client, workdir: Path) -> None:
    sock = daemon.socket
    go = workdir / "go"
    script = (
        f'echo first; while [ ! -e "{go}" ] && [ -d "{workdir}" ]; do sleep 0.02; done; echo second'
    )
    run_id = client.submit(shell=script)
    wait_for(lambda: state_of(client, run_id) == "running", "the run to start")
    follow = start(sock, "logs", "-f", str(run_id))
    interrupted = start(sock, "logs", "--follow", str(run_id))
    try:
        assert read_until(follow, "first\n") == "first\n"
        assert read_until(interrupted, "first\n") == "first\n"
        interrupted.send_signal(signal.SIGINT)  # Ctrl-C
        stopped = finish(interrupted)
        assert stopped.returncode == EXIT_CANCELLED and "Traceback" not in stopped.stderr, stopped
        assert follow.poll() is None  # still following: the run has not finished
    finally:
        go.touch()
    assert ok(finish(follow)) == "second\n"
    assert state_of(client, run_id) == "succeeded"


# -- status -----------------------------------------------------------------


def test_status(daemon: DaemonProcess, client: Client) -> None:
    sock = daemon.socket
    client.wait(client.submit(command=["true"]))
    human, as_json_ = jobctl_all(sock, ["status"], ["status", "--json"])
    text = ok(human)
    assert "healthy" in text and "UNHEALTHY" not in text
    assert str(sock) in text and str(daemon.journal) in text
    assert "runs: 1 succeeded" in text
    rows = [line.split() for line in text.splitlines()]
    pools = {row[0]: row[1:] for row in rows if row}
    assert pools["default"][:2] == ["process", "2"] and pools["python"][:2] == ["thread", "2"]
    stats = as_json(as_json_)
    assert stats["daemon"]["socket"] == str(sock)
    assert stats["daemon"]["pid"] == daemon.proc.pid  # type: ignore[union-attr]
    assert stats["daemon"]["healthy"] is True
    assert stats["states"] == {"succeeded": 1}
    assert {p["name"] for p in stats["pools"]} >= {"default", "python"}


# -- --json everywhere --------------------------------------------------------


def test_every_command_prints_json(daemon: DaemonProcess, client: Client) -> None:
    sock = daemon.socket
    submit, submit_wait = jobctl_all(
        sock,
        ["submit", "--json", "--", "echo", "hi"],
        ["--json", "submit", "--wait", "--", "sh", "-c", "exit 4"],  # only the final summary
    )
    submitted = as_json(submit)
    run_id = submitted["id"]
    assert submitted == {"id": run_id, "state": "queued"}
    waited_submit = as_json(submit_wait, code=4)
    assert waited_submit["state"] == "failed" and waited_submit["exit_code"] == 4
    client.wait(run_id)  # so that cancelling it finds it over
    wait, listing, cancel, logs = jobctl_all(
        sock,
        ["wait", "--json", str(run_id)],
        ["ls", "--json", "--all"],
        ["cancel", "--json", str(run_id)],
        ["--json", "logs", str(run_id)],
    )
    assert as_json(wait) == {
        "runs": [
            {
                "id": run_id,
                "state": "succeeded",
                "exit_code": 0,
                "owner": os.getuid(),
                "attempts": 1,
                "reason": None,
            }
        ],
        "timed_out": False,
    }
    runs = as_json(listing)["runs"]
    assert sorted(r["id"] for r in runs) == sorted([waited_submit["id"], run_id])
    assert as_json(cancel) == {"results": {str(run_id): "already_succeeded"}}
    assert as_json(logs) == {"data": "hi\n"}  # one object per line; here one chunk


# -- errors -------------------------------------------------------------------


def test_daemon_not_running(workdir: Path) -> None:
    stale = workdir / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(stale))  # a socket file nobody listens on
    finally:
        sock.close()
    missing = workdir / "missing.sock"
    *results, status_json, stale_wait = jobctl_all(
        missing,
        ["ls"],
        ["submit", "--", "true"],
        ["logs", "-f", "1"],
        ["status", "--json"],
        ["--socket", str(stale), "wait", "1"],  # --socket wins over JOBD_SOCKET
    )
    for result in results:
        one_line_error(result, EXIT_UNREACHABLE, f"jobd is not running: no socket at {missing}")
        assert "JOBD_SOCKET" in result.stderr
    error = json_error(status_json, EXIT_UNREACHABLE, "not_running")
    assert error["message"] == f"jobd is not running: no socket at {missing}"
    assert "JOBD_SOCKET" in error["hint"]
    one_line_error(stale_wait, EXIT_UNREACHABLE, f"jobd is not running: nothing listens on {stale}")


def test_unknown_run_id_and_bad_usage(daemon: DaemonProcess, client: Client) -> None:
    missing = str(10**6)
    *unknown, nothing, bad_env = jobctl_all(
        daemon.socket,
        ["show", missing],
        ["logs", missing],
        ["wait", missing],
        ["submit"],  # nothing to run
        ["submit", "--env", "NOEQUALS", "--", "true"],
    )
    for result in unknown:
        one_line_error(result, EXIT_ERROR, f"no run with id {missing}")
    for result in nothing, bad_env:  # click's usage errors
        assert result.returncode == EXIT_UNREACHABLE, (result.args, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == ""
    assert "exactly one of" in nothing.stderr
    assert "K=V" in bad_env.stderr
    assert client.list()["runs"] == []  # nothing was submitted


def test_json_errors(daemon: DaemonProcess, workdir: Path) -> None:
    missing = str(10**6)
    odd = workdir / "\x1b[31modd.sock"  # a message carrying control characters
    show, wait, logs, not_running = jobctl_all(
        daemon.socket,
        ["show", "--json", missing],
        ["--json", "wait", missing],
        ["logs", "--json", missing],
        ["--json", "--socket", str(odd), "ls"],
    )
    for result in show, wait, logs:
        error = json_error(result, EXIT_ERROR, "not_found")  # the daemon's code
        assert error["message"] == f"no run with id {missing}"
        assert result.stderr.startswith(f"jobctl: no run with id {missing}\n")
    error = json_error(not_running, EXIT_UNREACHABLE, "not_running")
    assert error["message"] == f"jobd is not running: no socket at {odd}"  # JSON: as it is
    assert "\x1b" not in not_running.stderr and "\\x1b[31modd.sock" in not_running.stderr


# -- input jobd would refuse: caught before anything is sent ------------------


def test_bad_input_is_a_usage_error(daemon: DaemonProcess, client: Client) -> None:
    bad = "\udcff"  # how Python hands over the byte 0xff of argv: not UTF-8
    add = ["submit", "--pool", "python", "--call", "jobd.demo:add"]
    cases: list[tuple[list[str], list[str]]] = [
        (["submit", "--", "echo", bad], ["argument 2 of the command is not valid UTF-8"]),
        (["submit", "--env", f"A={bad}", "--", "true"], ["--env", "A=\\xff", "not valid UTF-8"]),
        (["submit", "--shell", f"echo {bad}"], ["--shell", "not valid UTF-8"]),
        (["submit", "--name", bad, "--", "true"], ["--name", "not valid UTF-8"]),
        (["submit", "-t", "ok", "--tag", bad, "--", "true"], ["--tag", "not valid UTF-8"]),
        (["submit", "--cwd", bad, "--", "true"], ["--cwd", "not valid UTF-8"]),
        ([*add, "--arg", f'"{bad}"'], ["--arg", "not valid UTF-8"]),
        (["ls", "--name", bad], ["--name", "not valid UTF-8"]),
        ([*add, "--arg", "NaN", "--arg", "1"], ["--arg", "NaN/Infinity are not JSON numbers"]),
        ([*add, "--arg", "-Infinity"], ["--arg", "NaN/Infinity are not JSON numbers"]),
        ([*add, "--arg", "[1e400]"], ["--arg", "NaN/Infinity are not JSON numbers"]),
        ([*add, "--kwargs", '{"a": Infinity}'], ["--kwargs", "NaN/Infinity are not JSON"]),
        (["wait", "--timeout", "nan", "1"], ["--timeout", "0 or more"]),
        (["wait", "--timeout", "-1", "1"], ["--timeout", "0 or more"]),
        (["show", "-1"], ["ID must be a positive run id"]),
        (["show", "0"], ["ID must be a positive run id"]),
        (["show", str(2**63)], ["ID must be a positive run id"]),
        (["cancel", "1", "-2"], ["ID must be a positive run id"]),
        (["logs", "-f", "-3"], ["ID must be a positive run id"]),
        (["wait", "--json", "-1"], ["ID must be a positive run id"]),
        (["show", "seven"], ["'seven' is not a run id"]),
        (["cancel", "1", "--forc"], ["no such option: --forc"]),
    ]
    results = jobctl_all(daemon.socket, *(args for args, _ in cases))
    for result, (_, words) in zip(results, cases, strict=True):
        usage_error(result, *words)
        assert "No such option" not in result.stderr
    assert client.list()["runs"] == []  # nothing was submitted


def test_wait_timeout_inf_is_no_timeout(daemon: DaemonProcess, client: Client) -> None:
    run_id = client.submit(command=["true"])
    client.wait(run_id)
    for result in jobctl_all(
        daemon.socket,
        ["wait", "--timeout", "inf", str(run_id)],
        ["wait", "--timeout", "1e400", str(run_id)],  # inf too, as a float
    ):
        assert ok(result).split() == [str(run_id), "succeeded", "exit", "0"]


# -- what a submission carries never reaches the terminal raw -----------------


def test_control_characters_are_escaped(
    daemon: DaemonProcess, client: Client, workdir: Path
) -> None:
    esc, csi, bel = "\x1b", "\x9b", "\x07"  # ESC, the one-byte C1 CSI, BEL
    cwd = workdir / f"d{esc}[1m"
    cwd.mkdir()
    named = client.submit(
        command=["true"],
        name=f"{esc}[2J[/]name{csi}",  # also rich markup, which must stay text
        tags=[f"{esc}[31mtag"],
        env={"K": f"{esc}[0m\n"},
        cwd=str(cwd),
    )
    command = client.submit(command=["printf", f"{esc}]0;title{bel}%s", "x"])
    shell = client.submit(shell=f"echo '{csi}31m'; exit 3")
    failed = client.submit(call="jobd.demo:fail", args=[f"{esc}[31mboom{bel}"], pool="python")
    ids = [str(i) for i in (named, command, shell, failed)]
    client.wait([named, command, shell, failed])
    results = jobctl_all(
        daemon.socket,
        ["ls"],
        *(["show", i] for i in ids),
        ["wait", *ids],
        ["cancel", *ids],
        ["status"],
    )
    for result in results:
        assert result.returncode in (0, EXIT_ERROR), result
        for raw in (esc, csi, bel):
            assert raw not in result.stdout and raw not in result.stderr, (result.args, raw)
    listing, show_named, show_command, show_shell, show_failed, wait, _, _ = results
    assert "\\x1b[2J[/]name\\x9b" in listing.stdout  # one line per run, escaped
    assert "\\x1b]0;title\\x07%s" in listing.stdout and "\\x9b31m" in listing.stdout
    for text in ("\\x1b[2J[/]name\\x9b", "\\x1b[31mtag", "K='\\x1b[0m\\n'", "d\\x1b[1m"):
        assert text in show_named.stdout, text
    assert "\\x1b]0;title\\x07%s" in show_command.stdout
    assert "\\x9b31m" in show_shell.stdout
    assert show_failed.stdout.count("RuntimeError: \\x1b[31mboom\\x07") == 2  # reason, error
    assert "RuntimeError: \\x1b[31mboom\\x07" in wait.stdout


# -- logs of a run that has not started ---------------------------------------


def test_logs_of_a_run_not_started(daemon: DaemonProcess, client: Client, workdir: Path) -> None:
    sock = daemon.socket
    go = workdir / "go"
    busy = [client.submit(command=blocker(go)) for _ in range(2)]
    wait_for(lambda: [state_of(client, i) for i in busy] == ["running"] * 2, "busy workers")
    queued = client.submit(command=["echo", "hi"])  # both workers are busy: it stays queued
    never = client.submit(command=["true"])
    client.cancel(never)
    try:
        plain, as_json_, cancelled = jobctl_all(
            sock, ["logs", str(queued)], ["logs", "--json", str(queued)], ["logs", str(never)]
        )
        following = start(sock, "logs", "-f", str(queued))
    finally:
        go.touch()
    for result in plain, as_json_:
        assert ok(result) == ""
        assert f"run {queued} has not started yet (queued); use -f to follow" in result.stderr
    assert ok(cancelled) == ""
    assert f"run {never} never started (cancelled)" in cancelled.stderr
    followed = finish(following)
    assert ok(followed) == "hi\n" and followed.stderr == ""


# -- losing the daemon, forbidden ----------------------------------------------


def test_lost_connection_exits_unreachable(
    daemon: DaemonProcess, client: Client, workdir: Path
) -> None:
    go = workdir / "go"
    try:
        waiting = start(daemon.socket, "submit", "--wait", "--", *blocker(go))
        run_id = int(read_until(waiting, "\n"))  # submitted: the wait comes next, same connection
        waiting_too = start(daemon.socket, "wait", str(run_id))  # connected yet or not: exit 2
        daemon.kill()
        lost, gone = finish(waiting), finish(waiting_too)
    finally:
        go.touch()
    assert lost.returncode == EXIT_UNREACHABLE, lost  # not 1, a job's failure
    assert lost.stdout == ""  # after the id, which read_until took
    assert lost.stderr.startswith("jobctl: ") and "connection" in lost.stderr, lost.stderr
    assert "Traceback" not in lost.stderr
    one_line_error(gone, EXIT_UNREACHABLE, "")


# Runs jobctl with the effective uid of nobody, the uid SO_PEERCRED reports to the
# daemon, but with root's file access (fsuid), to read this Python under /root.
AS_NOBODY = """
import ctypes, os, runpy, sys
os.setresuid(0, 65534, 0)
ctypes.CDLL(None, use_errno=True).setfsuid(0)
sys.argv[0] = "jobctl"
runpy.run_module("jobd.cli", run_name="__main__")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to ask as another uid")
def test_forbidden_names_the_uid(daemon: DaemonProcess) -> None:
    procs = [
        popen([sys.executable, "-c", AS_NOBODY, *args], environment(daemon.socket))
        for args in (["ls"], ["--json", "show", "1"])
    ]
    human, as_json_ = (finish(proc) for proc in procs)
    one_line_error(human, EXIT_UNREACHABLE, "uid 65534 has no role on this daemon")
    assert "  hint: you are uid 65534 (nobody); an admin can grant roles" in human.stderr
    error = json_error(as_json_, EXIT_UNREACHABLE, "forbidden")
    assert error["hint"].startswith("you are uid 65534 (nobody); ")
