"""Shared fixtures: a real jobd process on a temp socket, with a real journal file.

Waiting here is always for a condition (the socket answers, a process exits),
with a generous deadline that only matters when something is broken.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

READY_DEADLINE = 30.0  # seconds a daemon may take to start answering (CI machines are slow)
ROOT = Path(__file__).resolve().parent.parent  # the project whose code is under test

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
        self.sock.settimeout(READY_DEADLINE)
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
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [*JOBD, "--config", str(self.config)], stdout=out, stderr=subprocess.STDOUT, env=env
            )
        if wait:
            self.wait_ready()

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
            directory.mkdir(exist_ok=True)
            super().__init__(directory, extra, daemon_keys)
            started.append(self)

    yield Factory
    for conn in Raw.opened:
        conn.close()
    Raw.opened.clear()
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait()


@pytest.fixture
def daemon(daemon_factory: type[DaemonProcess]) -> DaemonProcess:
    d = daemon_factory()
    d.start()
    return d


def wait_for(predicate: Any, what: str, deadline: float = READY_DEADLINE) -> Any:
    """Poll a condition (never a fixed sleep); fail with ``what`` after the deadline."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"
    return True
