"""The composition root: wiring, signals, lifetime.

Start-up: make sure the state and log directories are private (jobd.files:
created 0700, or refused unless they are the daemon's own and writable by no
one else), lock the state directory, open (and migrate) the journal, bind the
socket, rebuild the heaps from the journal, then serve. Runs found running
were interrupted: their leftover processes are killed and *waited for*
before their attempt is closed as lost and they are re-queued (the core
keeps them fenced until then; see ``jobd.core.scheduler``), so a daemon
dying at any step of recovery leaves the kill owed, and the next start
repeats it.

A bug the daemon cannot contain (the journal writer's, or a damaged journal)
stops it cleanly with exit status 70 (EX_SOFTWARE); systemd restarts it and
recovery starts again from the journal, which holds exactly what was
acknowledged.

Shutdown (SIGTERM/SIGINT): refuse new work (``shutting_down``; reads are
still served) and start no more runs, give running attempts
``shutdown_grace`` to finish, then stop their process groups (TERM, then
KILL after ``kill_grace``) without journaling their end, so the next start
recovers them like any interrupted attempt. Exit 0; exit 1 if changes could
not be journaled before exit (none of them was acknowledged).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import trio

from jobd import __version__, faults, files
from jobd import executor as executor_mod
from jobd.config import DEFAULT_CONFIG, Config, dev_config, load_config
from jobd.core.effects import (
    Created,
    Effect,
    Ended,
    Kill,
    KillLeftovers,
    Quarantined,
    Started,
    StateChanged,
)
from jobd.core.model import Kind, NewRun, Outcome, Result, Spec, State
from jobd.core.scheduler import (
    Cancel,
    Finished,
    LeftoversGone,
    ProcessStarted,
    Quarantine,
    Recover,
    Scheduler,
    Submit,
    Withdraw,
)
from jobd.errors import JobdError, ProtocolError, UnsafePathError
from jobd.executor import Executor, Handback, NotBegun
from jobd.groupcommit import Batch, GroupCommitter
from jobd.journal import AuditEntry, Journal, StateDirLock
from jobd.protocol import ErrorCode, not_found
from jobd.server import Server

log = logging.getLogger("jobd")

LOG_CHUNK = 65536  # bytes of captured output per logs event (and per read of the file)
FINAL_FLUSH_SECONDS = 10.0  # seconds the last commit may take at exit before jobd gives up
FOLLOW_POLL = 0.25  # seconds between reads of a growing output file (only while followed)
EXIT_SOFTWARE = 70  # exit status after a bug or a damaged journal stopped the daemon
REAP_SECONDS = 10.0  # seconds recovery waits for SIGKILLed leftovers to be gone, per try
REAP_RETRY_MAX = 60.0  # seconds, cap of the backoff between tries for unkillable leftovers


class _Waiter:
    """Wakes when every watched run has committed a terminal state."""

    __slots__ = ("done", "remaining", "watched")

    def __init__(self, ids: set[int]) -> None:
        self.watched = frozenset(ids)
        self.remaining = set(ids)
        self.done = trio.Event()
        if not ids:
            self.done.set()

    def discard(self, run_id: int) -> None:
        self.remaining.discard(run_id)
        if not self.remaining:
            self.done.set()


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.stopping = False
        self.exit_code = 0
        self._same_boot = False  # whether the journal's attempts ran in this boot
        self._discard_results = False
        self._waiters: dict[int, list[_Waiter]] = {}
        self._grace_scope = trio.CancelScope()  # cut short by a second SIGTERM/SIGINT
        self._quiet = trio.Event()  # while stopping: nothing (left) running
        self._stop_requested = trio.Event()  # a signal, or a bug that stops the daemon
        self._quarantining: set[int] = set()  # runs whose Quarantined is being committed
        self._child_umask = 0o022  # the umask jobd was started with (set in run())
        self.scheduler = Scheduler({p.name: p.capacity for p in config.pools.values()})
        self.server = Server(config, self)
        # Set up in run():
        self.journal: Journal
        self.writer: GroupCommitter
        self.executor: Executor

    # -- lifetime -----------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Belt and braces: every file the daemon creates has its mode set
        # explicitly (jobd.files), and with this umask one that is not (a
        # library's, a callable's) is private too. Commands get back the umask
        # jobd was started with (Popen(umask=...)).
        self._child_umask = os.umask(0o077)
        try:
            await self._run(task_status)
        finally:
            os.umask(self._child_umask)

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        config = self.config
        _make_dirs(config)
        lock = StateDirLock(config.state_dir)
        try:
            self.journal = Journal(str(config.journal_path), config.synchronous)
            try:
                await self._serve(task_status)
            finally:
                self.journal.close()
        finally:
            if self.server.bound:
                with contextlib.suppress(OSError):
                    config.socket.unlink()
            lock.release()

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        config = self.config
        listener = await self.server.open_socket()
        self.writer = GroupCommitter(self.journal, self._after_commit, self.fatal)
        self.executor = Executor(
            config.pools,
            config.log_dir,
            self.journal.instance,
            self._on_handback,
            config.kill_grace,
            child_umask=self._child_umask,
        )
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._on_signals, signals)
                await self._run_tasks(nursery, listener, task_status)

    async def _run_tasks(
        self,
        nursery: trio.Nursery,
        listener: trio.SocketListener,
        task_status: trio.TaskStatus[None],
    ) -> None:
        config = self.config
        await nursery.start(self.writer.run)
        await nursery.start(self.executor.run)
        found = await trio.to_thread.run_sync(self.journal.load_active)
        runs, next_id = found.runs, found.next_id
        recovered = sum(r.state is State.RUNNING for r in runs)
        faults.crash_point("recovery-loaded")
        # Journaled pids name processes only within the boot they ran in:
        # the boot of the last start (recorded once its recovery committed).
        boot = executor_mod.boot_id()
        previous = await trio.to_thread.run_sync(self.journal.meta, "boot_id")
        self._same_boot = boot is not None and boot == previous
        # Interrupted commands are fenced: their leftovers are killed and
        # waited for before anything lets them run again.
        effects = self.scheduler.handle(Recover(tuple(runs), next_id), time.time())
        leftovers = [e for e in effects if isinstance(e, KillLeftovers)]
        self.writer.add(effects)
        for why, ids in _grouped(found.unreadable).items():
            log.error("run(s) %s: %s; failing them", ", ".join(map(str, ids)), why)
            self._quarantine(ids, why)
        await self.writer.flush()
        if leftovers:
            # Before serving, so that a restart shows the runs settled; what
            # survives SIGKILL for long is left to a background task.
            if alive := await self._reap(leftovers):
                nursery.start_soon(self._reap_until_gone, alive)
            await self.writer.flush()
        if boot is not None and boot != previous:
            await trio.to_thread.run_sync(self.journal.set_meta, "boot_id", boot)
        if recovered:
            log.warning("recovered %d interrupted run(s) from the journal", recovered)
        async with trio.open_nursery() as serving:
            await serving.start(self.server.serve, listener)
            if config.demo and next_id == 1:
                await self._submit_demo_runs()
            self._print_banner(len(runs))
            _notify_ready()
            task_status.started()
            await self._stop_requested.wait()
            await self._shutdown()
            self.server.stop_accepting()
            serving.cancel_scope.cancel()  # close the connections still open
        self.writer.close()
        with trio.move_on_after(FINAL_FLUSH_SECONDS):
            await self.writer.flush()
        if not self.writer.healthy:
            # Nothing in the pending batch was acknowledged; runs whose end
            # is lost are recovered (and re-run) at the next start.
            log.error(
                "exiting with changes not journaled (%s): nothing unjournaled was"
                " acknowledged; runs whose end was not recorded are recovered at"
                " the next start",
                self.writer.last_error,
            )
            self.exit_code = self.exit_code or 1
        nursery.cancel_scope.cancel()

    async def _on_signals(self, signals: Any) -> None:
        """SIGTERM/SIGINT: the first stops the daemon, a second cuts the grace
        period short, and any later one changes nothing (the final commit is
        never interrupted). Listened to from the start of recovery to the exit."""
        async for signum in signals:
            name = signal.Signals(signum).name
            if not self._stop_requested.is_set():
                log.info("received %s: shutting down", name)
                self._stop_requested.set()
            elif not self._grace_scope.cancel_called:
                log.warning("received %s again: stopping running attempts now", name)
                self._grace_scope.cancel()
            else:
                log.info("received %s again: already stopping", name)

    def fatal(self, why: str) -> None:
        """A failure the daemon cannot contain: stop cleanly, exit EX_SOFTWARE.

        The journal holds exactly what was acknowledged; systemd restarts the
        daemon (Restart=on-failure) and recovery starts from there."""
        if self.exit_code != EXIT_SOFTWARE:
            log.critical("stopping: %s; the next start recovers from the journal", why)
        self.exit_code = EXIT_SOFTWARE
        self._stop_requested.set()

    async def _shutdown(self) -> None:
        self.stopping = True
        self.scheduler.draining = True
        # Runs handed to the executors ahead of free workers (prefetch) have not
        # begun: they go back to the queue instead of waiting out the grace
        # period and being recovered as lost.
        self._withdraw(self.executor.drain())
        with self._grace_scope:
            self._grace_scope.deadline = trio.current_time() + self.config.shutdown_grace
            if self._running_count():
                await self._quiet.wait()  # set by _on_handback when the last run ends
        running = self._running_count()
        if running:
            # Leave them to be recovered at the next start, like a crash would.
            self._discard_results = True
            self.executor.closing = True
            log.warning(
                "%d run(s) still running after %.0fs: stopping them; they will be"
                " re-queued at the next start",
                running,
                self.config.shutdown_grace,
            )
            self._quiet = trio.Event()
            if terminated := self.executor.kill_all(signal.SIGTERM):
                with trio.move_on_after(self.config.kill_grace):
                    await self._quiet.wait()
            # Every group told to stop, even if its leader obeyed: other members may not have.
            self.executor.kill_all(signal.SIGKILL, also=terminated)
        log.info("jobd stopped")

    def _running_count(self) -> int:
        return sum(p.running for p in self.scheduler.pools.values())

    def _print_banner(self, active: int) -> None:
        c = self.config
        pools = ", ".join(f"{p.name} ({p.kind}, {p.workers} workers)" for p in c.pools.values())
        lines = [
            f"jobd {__version__} (pid {os.getpid()}) ready; {active} active run(s) in the journal",
            f"  config:  {c.source}",
            f"  socket:  {c.socket}",
            f"  journal: {c.journal_path} (synchronous={c.synchronous})",
            f"  logs:    {c.log_dir}",
            f"  pools:   {pools}",
        ]
        if c.demo:
            lines.append(f"  try:     JOBD_SOCKET={c.socket} jobctl submit -- echo hi")
        print("\n".join(lines), file=sys.stderr, flush=True)

    async def _submit_demo_runs(self) -> None:
        demo = [
            NewRun(
                Spec(Kind.COMMAND, command=("echo", "hello from jobd")),
                name="demo-echo",
                tags=("demo",),
                owner=os.getuid(),
            ),
            NewRun(
                Spec(Kind.SHELL, shell='uname -sr; date; echo "run $JOBD_RUN_ID"'),
                name="demo-shell",
                tags=("demo",),
                owner=os.getuid(),
            ),
            NewRun(
                Spec(Kind.CALL, call="jobd.demo:fib", args=(30,)),
                pool="python",
                name="demo-fib",
                tags=("demo",),
                owner=os.getuid(),
            ),
        ]
        runnable = [r for r in demo if r.pool in self.config.pools]
        if runnable:
            await self.submit(runnable, os.getuid(), os.getpid())

    # -- the hot path -------------------------------------------------------

    def _withdraw(self, items: Iterable[Started]) -> None:
        attempts = tuple((s.run_id, s.attempt) for s in items)
        if attempts:
            self.writer.add(self.scheduler.handle(Withdraw(attempts), time.time()))
        if self.stopping and not self._running_count():
            self._quiet.set()

    def _on_handback(self, items: list[Handback]) -> None:
        """Executor results, delivered in batches on the event loop."""
        self._withdraw(item.started for item in items if type(item) is NotBegun)
        if self._discard_results:
            # Stopping: results are left for recovery; only notice the last exit.
            if not self.executor.running_processes:
                self._quiet.set()
            return
        now = time.time()
        handle = self.scheduler.handle
        effects: list[Effect] = []
        results: list[Result] = []
        for item in items:
            if isinstance(item, ProcessStarted):
                effects += handle(item, now)
            elif isinstance(item, Result):
                results.append(item)
        if results:
            effects += handle(Finished(tuple(results)), now)
        if effects:
            self.writer.add(effects)
        if self.stopping and not self._running_count():
            self._quiet.set()

    def _after_commit(self, batch: Batch) -> None:
        """Carry out the actions of a committed batch, then wake whoever waits on it.

        Actions of runs the journal refused are not carried out (nothing about
        them is durable); those runs are quarantined. An action that fails
        fails its run, never the batch: the rest of the batch goes on."""
        if faults.CRASH_AT is not None and any(
            isinstance(e, Ended) and e.result.outcome is Outcome.LOST for e in batch.effects
        ):
            faults.crash_point("lost-committed")
        refused = batch.refused
        waiters = self._waiters
        start = self.executor.start
        for effect in batch.effects:
            if refused and effect.run_id in refused:
                continue
            try:
                if type(effect) is Started:
                    if not self._discard_results:
                        start(effect)
                elif type(effect) is Ended:
                    if waiters and effect.state is not None and effect.state.terminal:
                        self._notify(effect.run_id)
                elif type(effect) is StateChanged:
                    if waiters and effect.state.terminal:
                        self._notify(effect.run_id)
                elif type(effect) is Kill:
                    self.executor.kill(effect.run_id, effect.attempt)
                elif type(effect) is Quarantined:
                    self._quarantining.discard(effect.run_id)
                    if waiters:
                        self._notify(effect.run_id)
            except Exception as exc:
                log.exception("could not carry out %r", effect)
                self._action_failed(effect, exc)
        for why, ids in _grouped(refused).items():
            self._quarantine(ids, f"the journal refused a change to this run ({why})")

    def _action_failed(self, effect: Effect, exc: Exception) -> None:
        """A bug carrying out a committed effect: fail the run it touched."""
        if type(effect) is Started:
            result = Result(
                effect.run_id,
                effect.attempt,
                Outcome.ERROR,
                time.time(),
                error=f"internal error starting the attempt: {exc!r} (a bug in jobd)",
            )
            self._on_handback([result])

    def _quarantine(self, run_ids: list[int], why: str) -> None:
        """Fail runs whose changes the journal refused, so memory and journal agree."""
        again = [r for r in run_ids if r in self._quarantining]
        if again:
            # Even closing them as failed was refused: nothing sane is left to try.
            self.fatal(f"the journal refuses to fail run(s) {again}: {why}")
            return
        in_executor = frozenset(
            (r, run.attempts)
            for r in run_ids
            if (run := self.scheduler.runs.get(r)) is not None
            and run.state is State.RUNNING
            and self.executor.holds(r, run.attempts)
        )
        reason = f"{why}: failed so that the journal stays true (a bug in jobd; see the daemon log)"
        effects = self.scheduler.handle(
            Quarantine(tuple(run_ids), reason, in_executor), time.time()
        )
        self._quarantining.update(run_ids)
        self.writer.add(effects)

    async def _reap(self, leftovers: list[KillLeftovers]) -> list[KillLeftovers]:
        """Kill what is left of lost attempts and wait until it is gone (up to
        REAP_SECONDS); the runs of those seen gone go on. Returns the rest.

        ``KillLeftovers`` comes only from recovery; ``_serve`` carries it out
        once the recovery batch has committed."""
        reaped = await trio.to_thread.run_sync(
            functools.partial(
                executor_mod.reap_leftovers,
                self.journal.instance,
                leftovers,
                same_boot=self._same_boot,
                timeout=REAP_SECONDS,
            ),
            abandon_on_cancel=True,
        )
        if reaped.gone:
            faults.crash_point("leftovers-gone")
            keys = tuple((k.run_id, k.attempt) for k in reaped.gone)
            # An attempt began if a process of it was found, or if the executor
            # got as far as creating its output file (just before spawning it):
            # one without either never ran, and is not counted as tried.
            began = reaped.found | await trio.to_thread.run_sync(
                _with_output, self.config.log_dir, keys
            )
            event = LeftoversGone(keys, began)
            self.writer.add(self.scheduler.handle(event, time.time()))
            log.warning("leftovers of %d lost attempt(s) are gone", len(reaped.gone))
        return reaped.alive

    async def _reap_until_gone(self, leftovers: list[KillLeftovers]) -> None:
        """Leftovers that survive SIGKILL (a process stuck in the kernel): try again
        with backoff. Their runs stay fenced, never running beside them."""
        delay = 1.0
        while leftovers:
            log.error(
                "leftover processes of %d lost attempt(s) survive SIGKILL (runs %s);"
                " their runs wait; trying again in %.0fs",
                len(leftovers),
                ", ".join(str(k.run_id) for k in leftovers),
                delay,
            )
            await trio.sleep(delay)
            delay = min(delay * 2, REAP_RETRY_MAX)
            leftovers = await self._reap(leftovers)

    def _notify(self, run_id: int) -> None:
        for waiter in self._waiters.pop(run_id, ()):
            waiter.discard(run_id)

    # -- requests (called by the server) --------------------------------------

    def _check_accepting(self) -> None:
        if self.stopping:
            raise ProtocolError(
                ErrorCode.SHUTTING_DOWN, "the daemon is shutting down", hint="retry once it is back"
            )
        if not self.writer.healthy:
            raise ProtocolError(
                ErrorCode.UNAVAILABLE,
                f"the journal cannot commit ({self.writer.last_error}): nothing was accepted",
                hint=self.writer.last_hint or "see the daemon log",
            )

    async def _journaled(self, batch: Batch, what: str, runs: tuple[int, ...] = ()) -> None:
        """Wait until ``batch`` is committed; if its commit fails first, say so.

        A batch that failed for now is kept and retried: it is neither
        acknowledged nor forgotten. The requester learns that at once instead
        of hanging until the disk has room again. If the journal refused one
        of ``runs`` (this request's), the request failed: say which and why."""
        await batch.settled.wait()
        if batch.failure is not None:
            raise ProtocolError(
                ErrorCode.UNAVAILABLE,
                f"the journal cannot commit ({batch.failure}): {what} is not acknowledged;"
                " the daemon is stopping",
                hint="retry once it is back (check with `jobctl show` first)",
            )
        if batch.refused and (refused := [r for r in runs if r in batch.refused]):
            raise ProtocolError(
                ErrorCode.INTERNAL,
                f"the journal refused {what} ({batch.refused[refused[0]]}): nothing of it"
                " was recorded",
                hint="this is a bug in jobd; the daemon log has the details",
            )
        if not batch.committed.is_set():
            raise ProtocolError(
                ErrorCode.UNAVAILABLE,
                f"the journal cannot commit ({self.writer.last_error}): {what} is not"
                " acknowledged; it is kept in memory and takes effect if the journal"
                " recovers before the daemon stops",
                hint=(self.writer.last_hint or "see the daemon log")
                + "; check with `jobctl show` before trying again",
            )

    async def submit(self, new_runs: Iterable[NewRun], uid: int, pid: int | None) -> list[int]:
        """Create runs (owned by the uid they carry); return their ids once journaled.

        ``uid`` and ``pid`` are the caller's, for the audit."""
        self._check_accepting()
        now = time.time()
        runs = tuple(new_runs)
        effects = self.scheduler.handle(Submit(runs), now)
        ids = [e.run_id for e in effects[: len(runs)] if isinstance(e, Created)]
        assert len(ids) == len(runs)  # the Created effects come first, in order
        detail = {"runs": len(ids), "first": ids[0], "last": ids[-1]}
        unit = tuple(ids)
        batch = self.writer.add(effects, AuditEntry(now, uid, pid, "submit", detail), unit)
        first, last = ids[0], ids[-1]
        what = f"run {first}" if first == last else f"runs {first}-{last}"
        await self._journaled(batch, what, unit)
        return ids

    async def cancel(
        self, ids: list[int], uid: int, pid: int | None, *, admin: bool
    ) -> dict[int, str]:
        self._check_accepting()
        results: dict[int, str] = {}
        allowed: list[int] = []
        for run_id in ids:
            run = self.scheduler.runs.get(run_id)
            if run is not None and not admin and run.owner != uid:
                results[run_id] = "forbidden"
            elif run is not None:
                allowed.append(run_id)
        effects = self.scheduler.handle(Cancel(tuple(allowed)), time.time())
        results.update(self.scheduler.cancel_results)
        # The core has changed: its effects go to the writer before any await,
        # so that nothing can separate memory from the journal.
        done = [i for i, r in results.items() if r in ("cancelled", "cancelling")]
        audit = AuditEntry(time.time(), uid, pid, "cancel", {"runs": done}) if done else None
        # Each run's cancel stands on its own (no unit): one the journal refuses
        # does not undo the others.
        batch = self.writer.add(effects, audit)
        await self._journaled(batch, "the cancel")
        if refused := [i for i in done if i in batch.refused]:
            others = [i for i in done if i not in batch.refused]
            raise ProtocolError(
                ErrorCode.INTERNAL,
                f"the journal refused the cancel of run(s) {', '.join(map(str, refused))}"
                f" ({batch.refused[refused[0]]}); they were failed instead"
                + (f"; run(s) {', '.join(map(str, others))} were cancelled" if others else ""),
                hint="this is a bug in jobd; the daemon log has the details",
            )
        # Runs the core no longer knows ended (or never existed). Every commit
        # before this one is in the journal now, including the end of a run
        # that finished just before the cancel.
        unknown = [i for i in ids if i not in results or results[i] == "unknown"]
        if unknown:
            known = await trio.to_thread.run_sync(self.journal.run_summaries, unknown)
            for run_id in unknown:
                summary = known.get(run_id)
                results[run_id] = f"already_{summary['state']}" if summary else "not_found"
        return {i: results[i] for i in ids}

    @contextlib.contextmanager
    def _watching(self, ids: Iterable[int]) -> Iterator[_Waiter]:
        """A waiter woken when every run in ``ids`` has committed a terminal state."""
        waiter = _Waiter(set(ids))
        for run_id in waiter.remaining:
            self._waiters.setdefault(run_id, []).append(waiter)
        try:
            yield waiter
        finally:
            for run_id in waiter.watched:
                watchers = self._waiters.get(run_id)
                if watchers is not None and waiter in watchers:
                    watchers.remove(waiter)
                    if not watchers:
                        del self._waiters[run_id]

    async def wait(
        self, ids: list[int], seconds: float | None
    ) -> tuple[dict[int, dict[str, Any]], bool]:
        """Wait until every run is terminal; returns (summaries, timed_out)."""
        # Watch before reading the journal, so that a commit landing in between
        # still reaches this waiter.
        with self._watching(ids) as waiter:
            summaries = await trio.to_thread.run_sync(self.journal.run_summaries, ids)
            if len(summaries) < len(ids):
                return summaries, False  # unknown ids: the caller answers not_found at once
            active = False
            for run_id in ids:
                if State(summaries[run_id]["state"]).terminal:
                    waiter.discard(run_id)
                else:
                    active = True
            if not active:
                return summaries, False
            with trio.move_on_after(seconds if seconds is not None else float("inf")):
                await waiter.done.wait()
            timed_out = bool(waiter.remaining)
            # Read again even if everything ended during the first read: a run
            # must not be reported with its stale state.
            summaries = await trio.to_thread.run_sync(self.journal.run_summaries, ids)
            return summaries, timed_out

    async def stream_logs(
        self, run_id: int, attempt: int | None, follow: bool, emit: Callable[[str], Awaitable[None]]
    ) -> dict[str, Any]:
        run = await trio.to_thread.run_sync(self.journal.get_run, run_id)
        if run is None:
            raise not_found([run_id])
        offset = 0
        chosen = attempt
        # One decoder for the whole stream: a character split between two
        # reads is decoded whole, not replaced.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Only an attempt the journal knows has an output file to serve,
        # whatever the run's state: a file at a path of an attempt that never
        # ran is none of jobd's.
        if attempt is not None and attempt not in {a["attempt"] for a in run["attempt_list"]}:
            raise ProtocolError(
                ErrorCode.NOT_FOUND,
                f"run {run_id} has no attempt {attempt}",
                hint=f"`jobctl show {run_id}` lists its attempts",
            )
        while True:
            attempts = run["attempt_list"]
            if chosen is None and attempts:
                chosen = attempts[-1]["attempt"]
            if chosen is not None:
                path = executor_mod.output_path(self.config.log_dir, run_id, chosen)
                # A chunk at a time: a large output is never held in memory,
                # and a slow reader slows the reads (emit waits for the socket).
                while data := await trio.to_thread.run_sync(
                    _read_chunk, path, offset, run_id, chosen
                ):
                    offset += len(data)
                    if text := decoder.decode(data):
                        await emit(text)
            # A run's terminal state is committed after its process exited, so
            # the read above, which came after that state was fetched, is complete.
            if not follow or State(run["state"]).terminal:
                if text := decoder.decode(b"", final=True):
                    await emit(text)
                return {"id": run_id, "attempt": chosen, "state": run["state"]}
            with self._watching([run_id]) as waiter, trio.move_on_after(FOLLOW_POLL):
                await waiter.done.wait()
            run = await trio.to_thread.run_sync(self.journal.get_run, run_id)
            assert run is not None

    async def stats(self) -> dict[str, Any]:
        states = await trio.to_thread.run_sync(self.journal.count_by_state)
        c = self.config
        kinds = {p.name: p.kind for p in c.pools.values()}
        workers = {p.name: p.workers for p in c.pools.values()}
        w = self.writer.statistics()
        return {
            "daemon": {
                "version": __version__,
                "pid": os.getpid(),
                "uid": os.getuid(),
                "started_at": self.started_at,
                "socket": str(c.socket),
                "journal": str(c.journal_path),
                "log_dir": str(c.log_dir),
                "synchronous": c.synchronous,
                "healthy": w.healthy,
                "last_error": w.last_error,
                "stopping": self.stopping,
                # Interrupted runs whose leftover processes are being killed.
                "fenced": len(self.scheduler.fenced),
            },
            "server": dataclasses.asdict(self.server.statistics()),
            "pools": [
                {
                    "name": p.name,
                    "kind": kinds.get(p.name, "unconfigured"),
                    "workers": workers.get(p.name, 0),
                    "capacity": p.workers,  # workers + prefetch: runs that may be running
                    "queued": p.queued,
                    "running": p.running,
                    "held": p.held,
                    "configured": p.configured,
                }
                for p in self.scheduler.statistics()
            ],
            "states": states,
            "journal": {
                "commits": w.commits,
                "effects": w.effects,
                "largest_batch": w.largest_batch,
                "failed_commits": w.failed_commits,
                "refused_runs": w.refused_runs,
                "checkpoints": w.checkpoints,
                "wal_pages": self.journal.wal_pages,
            },
        }


def _with_output(log_dir: Path, attempts: Iterable[tuple[int, int]]) -> frozenset[tuple[int, int]]:
    """The attempts whose output file exists (the executor creates it before spawning)."""
    return frozenset(
        key for key in attempts if os.path.lexists(executor_mod.output_path(log_dir, *key))
    )


def _grouped(reasons: dict[int, str]) -> dict[str, list[int]]:
    """run id -> why, as why -> run ids."""
    out: dict[str, list[int]] = {}
    for run_id, why in reasons.items():
        out.setdefault(why, []).append(run_id)
    return out


def _read_chunk(path: Path, offset: int, run_id: int, attempt: int) -> bytes:
    """Up to LOG_CHUNK bytes of ``path`` from ``offset`` (b"" at its end, or if missing).

    Only a regular file, never through a symlink: the daemon usually runs as
    root, and this is read on a client's behalf."""
    try:
        with files.open_private_for_read(path) as f:
            f.seek(offset)
            return f.read(LOG_CHUNK)
    except FileNotFoundError:
        return b""
    except UnsafePathError as exc:
        log.warning("refused to serve the output of run %d attempt %d: %s", run_id, attempt, exc)
        raise ProtocolError(
            ErrorCode.INTERNAL,
            f"the output of run {run_id} attempt {attempt} is not a file jobd wrote;"
            " it is not served",
            hint="tell the administrator: the daemon log names the file",
        ) from exc


def _make_dirs(config: Config) -> None:
    """The state and log directories: created 0700, or refused unless they are
    the daemon's own and writable by nobody else (jobd.files)."""
    files.prepare_private_dir(config.state_dir, "state directory (daemon.state_dir)")
    files.prepare_private_dir(config.log_dir, "log directory (daemon.log_dir)")
    for private in (config.state_dir, config.log_dir):
        if config.socket.is_relative_to(private) and config.socket_mode & 0o077:
            log.warning(
                "the socket %s is inside the private directory %s (0700): only uid %d"
                " can reach it, whatever daemon.socket_mode says; put it elsewhere"
                " (the default is /run/jobd/jobd.sock)",
                config.socket,
                private,
                os.geteuid(),
            )


# Signals a job should start with at their default action, whatever the daemon
# was started with (nohup, `&` and some service managers ignore some of them).
_CHILD_DEFAULT_SIGNALS = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
)


def _unignore_signals() -> None:
    """A signal ignored when the daemon starts would stay ignored in every job
    (SIG_IGN survives exec; Popen restores only SIGPIPE and SIGXFSZ). A handler
    does not survive exec: the daemon keeps ignoring such a signal through a
    handler that does nothing, and its jobs start with the default action.
    SIGCHLD ignored would make the kernel reap jobs before the executor waits
    for them: it gets its default."""
    for signum in _CHILD_DEFAULT_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, _ignore)
    if signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _ignore(signum: int, frame: object) -> None:
    """Ignore a signal the daemon was started with ignored (see _unignore_signals)."""


def _notify_ready() -> None:
    """sd_notify READY=1 when run by systemd with Type=notify (issue 5 extends this)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1", address)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jobd", description="the jobd scheduler daemon")
    parser.add_argument(
        "--config", type=Path, help=f"configuration file (default {DEFAULT_CONFIG})"
    )
    parser.add_argument(
        "--dev",
        action="store_true",
        help="use the built-in development configuration (state in ./.jobd)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--version", action="version", version=f"jobd {__version__}")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.dev and args.config:
            parser.error("--dev and --config exclude each other")
        config = dev_config() if args.dev else load_config(args.config or Path(DEFAULT_CONFIG))
        _unignore_signals()
        daemon = Daemon(config)
        trio.run(daemon.run)
    except JobdError as exc:
        print(f"jobd: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(0)
    sys.exit(daemon.exit_code)


if __name__ == "__main__":
    main()
