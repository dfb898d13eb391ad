"""Executors: named pools of worker threads that run commands and Python callables.

Each pool owns its worker threads (``trio.to_thread.run_sync`` manages about
5.5k calls/s here: far too slow as a per-job path). A worker takes an attempt
from its pool's queue, runs it (a callable in the thread; a command as a child
process in its own session, waited for in the thread) and appends the result
to a shared list. Only the first result after the loop last drained the list
schedules a wake-up (``TrioToken.run_sync_soon``), so a burst of thousands of
completions costs the event loop one wake-up.

Commands run in their own session and process group; cancel sends
``kill_signal`` (SIGTERM) to the whole group, then SIGKILL after
``kill_grace``, so grandchildren die too.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import queue
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from jobd import context, faults, files
from jobd.config import PoolConfig
from jobd.core.effects import KillLeftovers, Started
from jobd.core.model import ERROR_TEXT_LIMIT, Kind, Outcome, Result, clean_text
from jobd.core.scheduler import ProcessStarted
from jobd.errors import UnsafePathError

log = logging.getLogger("jobd.executor")

LOG_SHARD = 10_000  # runs per log sub-directory
KILL_SIGNAL = signal.SIGTERM


@dataclass(frozen=True, slots=True)
class PoolExecStatistics:
    name: str
    kind: str
    threads: int


@dataclass(frozen=True, slots=True)
class NotBegun:
    """An attempt handed to the executor that no worker began (the daemon is stopping)."""

    started: Started

    @property
    def run_id(self) -> int:
        return self.started.run_id

    @property
    def attempt(self) -> int:
        return self.started.attempt


Handback = Result | ProcessStarted | NotBegun


class Executor:
    def __init__(
        self,
        pools: Mapping[str, PoolConfig],
        log_dir: Path,
        instance: str,
        on_handback: Callable[[list[Handback]], None],
        kill_grace: float,
        *,
        child_umask: int = 0o022,
    ) -> None:
        self.log_dir = log_dir
        self.child_umask = child_umask  # commands get the umask jobd was started with
        self.instance = instance
        self.kill_grace = kill_grace
        self._on_handback = on_handback
        self._pools = dict(pools)
        self._queues: dict[str, queue.SimpleQueue[Started | None]] = {}
        self._threads: dict[str, list[threading.Thread]] = {}
        self._lock = threading.Lock()
        self._done: list[Handback] = []
        self._wake_scheduled = False
        self._procs: dict[tuple[int, int], int] = {}  # (run, attempt) -> pgid
        self._pending: set[tuple[int, int]] = set()  # handed over, result not handed back
        self._kill_requested: set[tuple[int, int]] = set()  # pending, not spawned yet
        self._shards: set[int] = set()
        self._functions: dict[str, Callable[..., Any]] = {}
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        #: set when the daemon begins to stop: no attempt is begun any more; what
        #: was handed over but not begun is handed back as NotBegun
        self.draining = False
        #: set when the daemon stops: workers take nothing more from their queues
        self.closing = False
        self._base_env = dict(os.environ)
        self._base_env.pop("JOBD_SOCKET", None)
        self._base_env.pop("JOBD_CRASH_AT", None)  # the daemon's test hook, not the jobs'

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the worker threads and the kill-escalation tasks until cancelled."""
        self._token = trio.lowlevel.current_trio_token()
        files.prepare_private_dir(self.log_dir, "log directory")
        for pool in self._pools.values():
            self._start_pool(pool)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._stop_threads()

    def _start_pool(self, pool: PoolConfig) -> None:
        q: queue.SimpleQueue[Started | None] = queue.SimpleQueue()
        self._queues[pool.name] = q
        threads = []
        for i in range(pool.workers):
            t = threading.Thread(
                target=self._worker, args=(q,), name=f"jobd-{pool.name}-{i}", daemon=True
            )
            t.start()
            threads.append(t)
        self._threads[pool.name] = threads

    def _stop_threads(self) -> None:
        for name, q in self._queues.items():
            for _ in self._threads[name]:
                q.put(None)

    # -- loop side ----------------------------------------------------------

    def start(self, started: Started) -> None:
        if self.draining:
            self._hand_back(NotBegun(started))
            return
        self._pending.add((started.run_id, started.attempt))
        self._queues[started.pool].put(started)

    def drain(self) -> list[Started]:
        """Stop beginning attempts; return those handed over but not yet taken.

        Workers finish what they began; anything they take from now on is
        handed back as NotBegun, never begun."""
        self.draining = True
        taken: list[Started] = []
        for q in self._queues.values():
            with contextlib.suppress(queue.Empty):
                while True:
                    item = q.get_nowait()
                    if item is not None:
                        taken.append(item)
        with self._lock:
            for item in taken:
                self._pending.discard((item.run_id, item.attempt))
                self._kill_requested.discard((item.run_id, item.attempt))
        return taken

    def kill(self, run_id: int, attempt: int, sig: int = KILL_SIGNAL) -> None:
        """Stop a running command's process group: ``sig`` now, SIGKILL after the grace."""
        key = (run_id, attempt)
        with self._lock:
            if key not in self._pending:
                return  # its result is already handed back: nothing left to stop
            pgid = self._procs.get(key)
            if pgid is None:
                self._kill_requested.add(key)  # not spawned yet: the worker will see it
                return
        _signal_group(pgid, sig)
        if sig != signal.SIGKILL:
            self._escalate_later(key, pgid)

    def _escalate_later(self, key: tuple[int, int], pgid: int) -> None:
        """SIGKILL the group after ``kill_grace`` unless it is gone (loop thread only)."""
        if self._nursery is not None:
            self._nursery.start_soon(self._escalate, key, pgid)

    async def _escalate(self, key: tuple[int, int], pgid: int) -> None:
        await trio.sleep(self.kill_grace)
        # The group, not only its leader: a member that ignores SIGTERM outlives
        # a leader that obeys it. While a group has members its id cannot be
        # reused; once it is empty the id may be, so never signal a group that
        # is now another attempt's.
        with self._lock:
            reused = any(p == pgid and k != key for k, p in self._procs.items())
        if not reused and _group_exists(pgid):
            log.warning("run %d attempt %d ignored SIGTERM; sending SIGKILL", *key)
            _signal_group(pgid, signal.SIGKILL)

    def kill_all(self, sig: int, also: Iterable[int] = ()) -> list[int]:
        """Signal every running command's process group, and the groups ``also``
        (signalled before, whose leader may have exited); returns the groups."""
        with self._lock:
            groups = set(self._procs.values())
        groups.update(also)
        for pgid in groups:
            _signal_group(pgid, sig)
        return sorted(groups)

    def holds(self, run_id: int, attempt: int) -> bool:
        """Whether this attempt was handed over and its result not handed back yet."""
        with self._lock:
            return (run_id, attempt) in self._pending

    @property
    def running_processes(self) -> int:
        with self._lock:
            return len(self._procs)

    def statistics(self) -> list[PoolExecStatistics]:
        return [
            PoolExecStatistics(p.name, p.kind, sum(t.is_alive() for t in self._threads[p.name]))
            for p in self._pools.values()
        ]

    def _drain(self) -> None:
        with self._lock:
            items, self._done = self._done, []
            self._wake_scheduled = False
        if items:
            self._on_handback(items)

    # -- worker threads -----------------------------------------------------

    def _hand_back(self, item: Handback) -> None:
        with self._lock:
            if isinstance(item, Result | NotBegun):
                key = (item.run_id, item.attempt)
                self._pending.discard(key)
                self._kill_requested.discard(key)
            self._done.append(item)
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        assert self._token is not None
        with contextlib.suppress(trio.RunFinishedError):
            # If the loop is gone the daemon is exiting; the run is recovered as lost.
            self._token.run_sync_soon(self._drain)

    def _worker(self, q: queue.SimpleQueue[Started | None]) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            if self.closing:
                continue  # stopping: left in the journal as running, recovered next start
            if self.draining:
                self._hand_back(NotBegun(item))
                continue
            try:
                run = self._call if item.spec.kind is Kind.CALL else self._spawn
                result = self._cancelled_before_start(item) or run(item)
            except BaseException as exc:  # never let a worker thread die
                log.exception("executor bug while running run %d", item.run_id)
                result = Result(
                    item.run_id,
                    item.attempt,
                    Outcome.ERROR,
                    time.time(),
                    error=clean_text(f"internal executor error: {exc!r}", ERROR_TEXT_LIMIT),
                )
            self._hand_back(result)

    def _cancelled_before_start(self, item: Started) -> Result | None:
        """A result if the attempt was cancelled before this worker took it."""
        if not self._kill_requested:  # cheap check first: cancels are rare
            return None
        key = (item.run_id, item.attempt)
        with self._lock:
            if key not in self._kill_requested:
                return None
            self._kill_requested.discard(key)
        return Result(
            item.run_id,
            item.attempt,
            Outcome.CANCELLED,
            time.time(),
            error="cancelled before a worker took it",
        )

    def _call(self, item: Started) -> Result:
        spec = item.spec
        started = time.time()
        try:
            fn = self._functions.get(spec.call) or self._resolve(spec.call)
        except Exception as exc:
            return Result(
                item.run_id,
                item.attempt,
                Outcome.ERROR,
                time.time(),
                error=clean_text(
                    f"cannot import {spec.call}: {type(exc).__name__}: {exc}", ERROR_TEXT_LIMIT
                ),
                started_at=started,
            )
        context._set(context.RunContext(item.run_id, item.attempt, item.pool))
        try:
            fn(*spec.args, **spec.kwargs)
        except BaseException as exc:
            return Result(
                item.run_id,
                item.attempt,
                Outcome.FAILED,
                time.time(),
                error=clean_text(f"{type(exc).__name__}: {exc}", ERROR_TEXT_LIMIT),
                output=self._write_traceback(item, exc),
                started_at=started,
            )
        finally:
            context._set(None)
        return Result(item.run_id, item.attempt, Outcome.SUCCEEDED, time.time(), started_at=started)

    def _write_traceback(self, item: Started, exc: BaseException) -> str | None:
        """A failed callable's traceback is its attempt's output; returns its path."""
        try:
            output = self._log_path(item.run_id, item.attempt)
            fd = files.create_private_file(output)
            with open(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
                f.write("".join(traceback.format_exception(exc)))
        except (OSError, UnsafePathError) as error:
            run, attempt = item.run_id, item.attempt
            log.error("run %d attempt %d: cannot write the traceback: %s", run, attempt, error)
            return None
        return str(output)

    def _resolve(self, target: str) -> Callable[..., Any]:
        module_name, _, attr = target.partition(":")
        obj: object = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        if not callable(obj):
            raise TypeError(f"{target} is not callable")
        self._functions[target] = obj
        return obj

    def _spawn(self, item: Started) -> Result:
        spec = item.spec
        key = (item.run_id, item.attempt)
        argv = list(spec.command) if spec.kind is Kind.COMMAND else ["/bin/sh", "-c", spec.shell]
        env = self._base_env | spec.env
        env["JOBD_RUN_ID"] = str(item.run_id)
        env["JOBD_ATTEMPT"] = str(item.attempt)
        env["JOBD_INSTANCE"] = self.instance
        try:
            output = self._log_path(item.run_id, item.attempt)
            out = files.create_private_file(output)
        except (OSError, UnsafePathError) as exc:
            message = f"cannot create the output file: {exc}"
            log.error("run %d attempt %d: %s", *key, message)
            return Result(item.run_id, item.attempt, Outcome.ERROR, time.time(), error=message)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=spec.cwd,
                start_new_session=True,
                close_fds=True,
                umask=self.child_umask,
            )
        except OSError as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            message = f"cannot start {argv[0]!r}: {exc.strerror or exc}"
            if isinstance(exc, FileNotFoundError) and spec.cwd and not os.path.isdir(spec.cwd):
                message = f"cannot start: working directory {spec.cwd!r} does not exist"
            with contextlib.suppress(OSError):
                os.write(out, f"jobd: {message}\n".encode())
            return Result(
                item.run_id,
                item.attempt,
                Outcome.ERROR,
                time.time(),
                exit_code=code,
                error=message,
                output=str(output),
            )
        finally:
            os.close(out)
        with self._lock:
            self._procs[key] = proc.pid
            kill_now = key in self._kill_requested
            self._kill_requested.discard(key)
        self._hand_back(ProcessStarted(item.run_id, item.attempt, proc.pid, _start_ticks(proc.pid)))
        if kill_now:  # cancelled while it was being spawned
            _signal_group(proc.pid, KILL_SIGNAL)
            assert self._token is not None
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._escalate_later, key, proc.pid)
        returncode = proc.wait()
        with self._lock:
            del self._procs[key]
        if returncode == 0:
            return Result(
                item.run_id,
                item.attempt,
                Outcome.SUCCEEDED,
                time.time(),
                exit_code=0,
                output=str(output),
            )
        if returncode < 0:
            name = _signal_name(-returncode)
            return Result(
                item.run_id,
                item.attempt,
                Outcome.FAILED,
                time.time(),
                exit_code=128 - returncode,
                error=f"killed by {name}",
                output=str(output),
            )
        return Result(
            item.run_id,
            item.attempt,
            Outcome.FAILED,
            time.time(),
            exit_code=returncode,
            error=f"exited with status {returncode}",
            output=str(output),
        )

    def _log_path(self, run_id: int, attempt: int) -> Path:
        """The attempt's output path; its shard directory checked once per daemon."""
        path = output_path(self.log_dir, run_id, attempt)
        shard = run_id // LOG_SHARD
        if shard not in self._shards:
            files.prepare_private_dir(path.parent, "log directory")
            self._shards.add(shard)
        return path


def output_path(log_dir: Path, run_id: int, attempt: int) -> Path:
    """Where an attempt's captured output lives (whether or not it exists yet)."""
    return log_dir / f"{run_id // LOG_SHARD:05d}" / f"{run_id}.{attempt}.log"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # real-time signals other than SIGRTMIN/SIGRTMAX have no member
        return f"signal {number}"


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def boot_id() -> str | None:
    """This boot's id: pids and start times name a process only within one boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def reap_leftovers(
    instance: str,
    attempts: Iterable[KillLeftovers],
    *,
    same_boot: bool,
    timeout: float,
    poll: float = 0.01,
) -> Reaped:
    """SIGKILL every process group left over from lost attempts and wait until
    they are gone; returns the attempts whose leftovers are gone, those still
    alive after ``timeout`` seconds, and those of which any process was found.
    Blocking: run it in a thread.

    A process belongs to a lost attempt if

    - its environment carries this journal's ``JOBD_INSTANCE`` and the
      attempt's ``JOBD_RUN_ID``/``JOBD_ATTEMPT``: this finds it even when the
      daemon died before it could journal the pid; or
    - it is the attempt's journaled process itself: same pid *and* same start
      time (clock ticks after boot), still leading its group, and this is the
      boot the attempts ran in (``same_boot``). This finds a job that cleared
      or replaced its environment (``env -i``, ``su -``), and never a later
      process that reused the pid (after a reboot, in a new pid namespace, or
      after the pids wrapped around); or
    - it is in the process group of one found so far.

    SIGKILL takes effect asynchronously (a process in uninterruptible sleep
    dies when it wakes), so "gone" means seen gone: every such process has
    left ``/proc`` or is a zombie. The daemon's own group is never signalled.
    """
    pending = list(attempts)
    if not pending:
        return Reaped([], [], frozenset())
    deadline = time.monotonic() + timeout
    groups: dict[tuple[int, int], set[int]] = {}  # attempt -> process groups found
    signalled = False
    while True:
        live = _find_leftovers(instance, pending, groups, same_boot=same_boot)
        if not live:
            return Reaped(pending, [], frozenset(groups))
        for pgid in {g for found in live.values() for g in found}:
            _signal_group(pgid, signal.SIGKILL)
        if not signalled:
            signalled = True
            faults.crash_point("leftovers-signalled")
        if time.monotonic() >= deadline:
            return Reaped(
                [a for a in pending if (a.run_id, a.attempt) not in live],
                [a for a in pending if (a.run_id, a.attempt) in live],
                frozenset(groups),
            )
        time.sleep(poll)


@dataclass(frozen=True, slots=True)
class Reaped:
    """What ``reap_leftovers`` did."""

    gone: list[KillLeftovers]  # every process found is dead (or none was found)
    alive: list[KillLeftovers]  # some survived SIGKILL until the timeout
    found: frozenset[tuple[int, int]]  # (run, attempt) of which any process was found


def _find_leftovers(
    instance: str,
    attempts: list[KillLeftovers],
    groups: dict[tuple[int, int], set[int]],
    *,
    same_boot: bool,
) -> dict[tuple[int, int], set[int]]:
    """One scan of /proc: attempt -> the process groups of its live (not zombie)
    leftovers. ``groups`` accumulates every group ever found, so that members
    that kept no marks are still found once their leader is gone."""
    marks = {
        (b"JOBD_RUN_ID=%d" % a.run_id, b"JOBD_ATTEMPT=%d" % a.attempt): (a.run_id, a.attempt)
        for a in attempts
    }
    leaders = {
        (a.pid, a.pid_started): (a.run_id, a.attempt)
        for a in attempts
        if same_boot and a.pid and a.pid_started is not None
    }
    known = {g: key for key, found in groups.items() for g in found}
    marker = f"JOBD_INSTANCE={instance}".encode()
    own = {os.getpid(), os.getpgrp()}
    live: dict[tuple[int, int], set[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        pid = int(entry.name)
        try:
            pgid, ticks, state = _stat(pid)
            if pgid in own or state == b"Z":
                continue  # ours, or dead already (a zombie runs nothing)
            key = known.get(pgid)
            if key is None and pgid == pid:
                key = leaders.get((pid, ticks))
            if key is None:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    environ = set(f.read().split(b"\0"))
                if marker in environ:
                    key = next(
                        (k for (r, t), k in marks.items() if r in environ and t in environ), None
                    )
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if key is not None:
            groups.setdefault(key, set()).add(pgid)
            live.setdefault(key, set()).add(pgid)
    return live


def _stat(pid: int) -> tuple[int, int, bytes]:
    """A process's group id, start time (clock ticks after boot) and state letter."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[2]), int(fields[19]), fields[0]  # fields 5, 22 and 3


def _start_ticks(pid: int) -> int | None:
    try:
        return _stat(pid)[1]
    except (OSError, ValueError, IndexError):
        return None  # already gone: nothing to find later either
