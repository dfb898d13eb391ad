"""Shared fixtures: a real jobd process on a temp socket, with a real journal file.

Waiting here is always for a condition (the socket answers, a process exits),
with a generous deadline that only matters when something is broken.

Nothing the suite starts outlives it. Every process it starts carries
``JOBD_TEST_SUITE=<this session>`` in its environment, and every daemon also
``JOBD_TEST_DAEMON=<its directory>``, which its jobs inherit (a job's
environment is the daemon's). Jobs run in sessions of their own: killing a
daemon leaves them running, so a daemon's teardown kills everything carrying
its mark. After every test, whatever of this session is still alive (but for
daemons a longer-lived fixture holds) is killed and the test fails, naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

READY_DEADLINE = 60.0  # seconds a daemon may take to start answering, or a condition to hold
REPLY_DEADLINE = 2 * READY_DEADLINE  # seconds a reply may take: more than any `wait` timeout
ROOT = Path(__file__).resolve().parent.parent  # the project whose code is under test

# How fast the machine is is no property of any test: a loaded machine must not fail
# one (hypothesis's default deadline is 200 ms per example).
settings.register_profile("jobd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("jobd")

SUITE_MARK = "JOBD_TEST_SUITE"
DAEMON_MARK = "JOBD_TEST_DAEMON"
SUITE_ID = uuid.uuid4().hex
os.environ[SUITE_MARK] = SUITE_ID  # inherited by every process the suite starts

# Python children run like `python -m MODULE`, but first set the disposition of the
# signals tests send them. A shell without job control starts a background command
# (`make test &`, nohup, some CI runners) with SIGINT ignored, an ignored signal stays
# ignored across fork and exec, and Python then installs no KeyboardInterrupt handler:
# a test's Ctrl-C would never arrive. (Done here, in the child, rather than with
# preexec_fn: no Python code runs between fork and exec.) The project's root comes
# first on sys.path: the child runs the code under test whatever its working directory.
_RUN_MODULE = f"""\
import runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGINT, signal.SIGTERM}})
sys.path.insert(0, {str(ROOT)!r})
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""


def python_module(module: str) -> list[str]:
    """The argv that runs ``module`` as ``python -m`` would, with SIGINT and SIGTERM
    as a foreground shell hands them on (see above)."""
    return [sys.executable, "-c", _RUN_MODULE, module]


JOBD = python_module("jobd.daemon")


def base_config(state: Path, extra: str = "", daemon_keys: str = "") -> str:
    """``extra`` adds tables; ``daemon_keys`` replaces the grace settings of [daemon]."""
    graces = daemon_keys or 'shutdown_grace = "5s"\nkill_grace = "2s"'
    return f"""
[daemon]
state_dir = "{state}"
socket = "{state}/jobd.sock"
socket_mode = "0600"
synchronous = "normal"
{graces}

[pools.default]
kind = "process"
workers = 2

[pools.python]
kind = "thread"
workers = 2
{extra}
"""


class Raw:
    """A bare protocol connection for tests that need to misbehave on purpose."""

    opened: list[Raw] = []  # closed by the fixtures at teardown

    def __init__(self, path: Path, hello: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(REPLY_DEADLINE)
        try:
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise
        self.file = self.sock.makefile("rwb")
        Raw.opened.append(self)
        self.next_id = 1
        if hello:
            reply = self.request("hello", {"protocol": 1})
            assert "result" in reply, reply

    def send_line(self, data: bytes) -> None:
        self.file.write(data + b"\n")
        self.file.flush()

    def send(self, method: str, params: dict[str, Any] | None = None) -> int:
        request_id = self.next_id
        self.next_id += 1
        self.send_line(
            json.dumps({"id": request_id, "method": method, "params": params or {}}).encode()
        )
        return request_id

    def read(self) -> dict[str, Any] | None:
        line = self.file.readline()
        return json.loads(line) if line else None

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        request_id = self.send(method, params)
        while True:
            reply = self.read()
            assert reply is not None, "the daemon closed the connection"
            if reply.get("id") == request_id and "event" not in reply:
                return reply

    def result(self, method: str, params: dict[str, Any] | None = None) -> Any:
        reply = self.request(method, params)
        assert "result" in reply, reply
        return reply["result"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


@dataclass
class DaemonProcess:
    dir: Path
    extra: str = ""
    daemon_keys: str = ""
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.dir / "jobd.toml"

    @property
    def socket(self) -> Path:
        return self.dir / "jobd.sock"

    @property
    def journal(self) -> Path:
        return self.dir / "journal.db"

    def write_config(self) -> None:
        self.config.write_text(base_config(self.dir, self.extra, self.daemon_keys))

    def start(self, *, wait: bool = True) -> None:
        self.write_config()
        log = self.dir / f"daemon-{len(self.logs)}.log"
        self.logs.append(log)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.marks)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [*JOBD, "--config", str(self.config)], stdout=out, stderr=subprocess.STDOUT, env=env
            )
        if wait:
            self.wait_ready()

    @property
    def marks(self) -> dict[str, str]:
        """What this daemon and its jobs carry in their environment."""
        return {SUITE_MARK: SUITE_ID, DAEMON_MARK: str(self.dir)}

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + READY_DEADLINE
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"jobd exited with {self.proc.returncode}:\n{self.log_text()}")
            with contextlib.suppress(OSError):
                Raw(self.socket).close()
                return
            time.sleep(0.02)
        raise AssertionError(f"jobd did not answer within {READY_DEADLINE}s:\n{self.log_text()}")

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def kill_everything(self) -> list[Leftover]:
        """SIGKILL the daemon, then whatever carries its mark (its jobs, which run in
        sessions of their own and outlive it), and wait until all are gone."""
        if self.proc is not None:
            self.kill()
        return kill_marked(f"the processes of the daemon in {self.dir}", self.marks)

    def raw(self, hello: bool = True) -> Raw:
        return Raw(self.socket, hello)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short paths under /tmp: a Unix socket path must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="jobd-t", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon_factory(workdir: Path) -> Iterator[type[DaemonProcess]]:
    started: list[DaemonProcess] = []

    class Factory(DaemonProcess):
        def __init__(self, extra: str = "", sub: str = "d", daemon_keys: str = "") -> None:
            directory = workdir / sub
            directory.mkdir(mode=0o700, exist_ok=True)  # jobd refuses one others can write
            super().__init__(directory, extra, daemon_keys)
            started.append(self)

    yield Factory
    for conn in Raw.opened:
        conn.close()
    Raw.opened.clear()
    for d in started:
        d.kill_everything()


@pytest.fixture
def daemon(daemon_factory: type[DaemonProcess]) -> DaemonProcess:
    d = daemon_factory()
    d.start()
    return d


def wait_for(predicate: Any, what: str, deadline: float = READY_DEADLINE) -> Any:
    """Poll a condition (never a fixed sleep); fail with ``what`` after the deadline."""
    end = time.monotonic() + deadline
    while True:
        past_deadline = time.monotonic() >= end  # read first: the last try comes after it
        value = predicate()
        if value:
            return value
        if past_deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"
    return True


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot): with the pid, names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def kill_group_if_same(pid: int, ticks: int | None) -> None:
    """SIGKILL the process group led by ``pid`` if that is still the process that
    started at ``ticks`` (never a stranger that reused the pid), and wait until it is gone."""
    if ticks is None or start_ticks(pid) != ticks:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), f"process {pid} to be gone")


# -- nothing outlives its test ------------------------------------------------------------


@dataclass(frozen=True)
class Leftover:
    """A live process that carries marks of this session."""

    pid: int
    pgid: int
    cmdline: str
    jobd_env: dict[str, str]  # its JOBD_* variables: which daemon, run and attempt

    def __str__(self) -> str:
        marks = " ".join(f"{k}={v}" for k, v in sorted(self.jobd_env.items()) if k != SUITE_MARK)
        return f"pid {self.pid} (group {self.pgid}): {self.cmdline!r} [{marks}]"


def find_marked(marks: dict[str, str]) -> list[Leftover]:
    """Live processes whose environment holds every ``NAME=value`` of ``marks``.

    A zombie is gone for our purposes (its environment cannot be read either).
    """
    wanted = {f"{name}={value}".encode() for name, value in marks.items()}
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            if not wanted <= set(environ):
                continue
            stat = Path(f"/proc/{pid}/stat").read_bytes()
            fields = stat[stat.rindex(b")") + 2 :].split()  # the name may hold spaces
            if fields[0] in (b"Z", b"X"):
                continue
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
        jobd_env = {}
        for variable in environ:
            if variable.startswith(b"JOBD_"):
                name, _, value = variable.decode(errors="replace").partition("=")
                jobd_env[name] = value
        argv = cmdline.decode(errors="replace").rstrip("\0").split("\0")
        if argv[1:3] == ["-c", _RUN_MODULE]:  # say python_module() as `python -m` would
            argv[1:3] = ["-m"]
        command = " ".join(argv)
        found.append(Leftover(pid, int(fields[2]), command, jobd_env))
    return found


def kill_marked(what: str, marks: dict[str, str], spare: Iterable[int] = ()) -> list[Leftover]:
    """SIGKILL every live process carrying ``marks`` (but ``spare``), with its process
    group unless that is the suite's own, until none is left; returns what was found.

    Killed processes are waited for: a SIGKILL takes effect asynchronously.
    """
    spared = set(spare)
    found: dict[int, Leftover] = {}

    def none_left() -> bool:
        alive = [p for p in find_marked(marks) if p.pid not in spared]
        for p in alive:
            found.setdefault(p.pid, p)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if p.pgid > 1 and p.pgid != os.getpgrp():
                    os.killpg(p.pgid, signal.SIGKILL)
                else:  # a daemon or jobctl: in the suite's own group
                    os.kill(p.pid, signal.SIGKILL)
        return not alive

    wait_for(none_left, f"{what} to be gone")
    return list(found.values())


# Daemons that outlive a test (a module-scoped fixture's): spared by the check after it.
LONG_LIVED: list[DaemonProcess] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    """After a test and its fixtures, nothing it started may be alive."""
    try:
        return (yield)
    finally:
        spare = [d.proc.pid for d in LONG_LIVED if d.proc is not None and d.proc.poll() is None]
        left = kill_marked("what the test left", {SUITE_MARK: SUITE_ID}, spare)
        if left:
            raise AssertionError(
                f"{item.nodeid} left {len(left)} process(es) running (killed now):\n"
                + "\n".join(f"  {p}" for p in left)
            )


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The last line of defence, also after Ctrl-C: nothing of this session survives it."""
    left = kill_marked("what the suite left", {SUITE_MARK: SUITE_ID})
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"the suite left {len(left)} process(es) running (killed now):"]
        lines += [f"  {p}" for p in left]
        if reporter is not None:
            reporter.write_line("\n".join(lines), red=True, bold=True)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
