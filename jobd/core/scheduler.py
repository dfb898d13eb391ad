"""The scheduler: a pure state machine from events to effects.

``Scheduler.handle(event, now) -> list[Effect]``. It owns every *active* run
(queued, running); terminal runs leave memory once their last effect is
emitted, because the journal is the source of truth and the heap is a cache.

Each pool has a ready heap ordered by (-priority, run id): higher priority
first, submission order within a priority (run ids are assigned in
submission order). Cancelled runs are deleted lazily: they stay in the heap
and are skipped when popped, which keeps cancel O(1).

A pool's ``busy`` count is the number of its slots in use. It is usually the
number of running runs, except for *held* slots: a cancelled Python callable
cannot be interrupted, so its run ends at once but its thread keeps the slot
until the call returns (DESIGN.md, "Timeouts").

Recovery kills before it forgets. A run found running at start-up was
interrupted; its attempt may have left processes behind. The run is *fenced*:
it stays running, in no pool's count, while the daemon kills whatever is left
of the attempt (``KillLeftovers``) and waits until those processes are gone.
Only ``LeftoversGone`` closes the attempt as lost (or undoes it, if it never
began: no pid journaled, no process or output file found) and lets the run
be queued again. Until then the journal still says ``running``, so a daemon that dies
meanwhile finds the same attempt at its next start and kills again: the kill
is owed until it is known to be done, and a retry never overlaps the attempt.

A run whose change the journal refused (``Quarantine``: a bug, or data that
slipped past validation) leaves memory and is closed as failed, so that
memory and journal agree again without stopping the daemon.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from jobd.core.effects import (
    CancelRequested,
    Created,
    Effect,
    Ended,
    Kill,
    KillLeftovers,
    PidRecorded,
    Quarantined,
    Started,
    StateChanged,
    Withdrawn,
)
from jobd.core.model import Kind, NewRun, Outcome, Result, Run, State

# A run whose attempt is lost to a crash is re-queued this many times; lost
# again after that, it fails. (Retry policies replace this with issue 3.)
MAX_LOST_REQUEUES = 1


@dataclass(frozen=True, slots=True)
class Submit:
    runs: tuple[NewRun, ...]


@dataclass(frozen=True, slots=True)
class ProcessStarted:
    """The executor spawned an attempt's process."""

    run_id: int
    attempt: int
    pid: int
    started: int | None = None  # the process's start time, clock ticks after boot


@dataclass(frozen=True, slots=True)
class Finished:
    """A batch of attempt results handed back by the executors."""

    results: tuple[Result, ...]


@dataclass(frozen=True, slots=True)
class Cancel:
    run_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Recover:
    """Start-up: the active runs found in the journal."""

    runs: tuple[Run, ...]
    next_id: int


@dataclass(frozen=True, slots=True)
class LeftoversGone:
    """The processes of these lost attempts (run, attempt) are known dead: killed
    and waited for. Their runs may go on.

    ``began`` names the attempts the daemon found signs of (a process, or the
    output file the executor creates just before spawning). One with neither
    those nor a journaled pid never began (the daemon died between journaling
    its start and spawning it; no process ever saw its attempt number): it is
    undone, not counted as lost."""

    attempts: tuple[tuple[int, int], ...]
    began: frozenset[tuple[int, int]] = frozenset()


@dataclass(frozen=True, slots=True)
class Quarantine:
    """The journal refused changes to these runs: forget them and fail them.

    ``in_executor`` names the attempts an executor holds (they get a ``Kill``,
    and their slot stays taken until the executor reports them)."""

    run_ids: tuple[int, ...]
    reason: str
    in_executor: frozenset[tuple[int, int]] = frozenset()


@dataclass(frozen=True, slots=True)
class Withdraw:
    """Attempts the executors never began (the daemon is stopping): (run, attempt)."""

    attempts: tuple[tuple[int, int], ...]


Event = (
    Submit | ProcessStarted | Finished | Cancel | Recover | LeftoversGone | Withdraw | Quarantine
)


@dataclass(slots=True)
class PoolState:
    name: str
    workers: int
    configured: bool = True
    heap: list[tuple[int, int]] = field(default_factory=list)
    queued: int = 0
    running: int = 0
    held: int = 0  # slots held by cancelled callables still executing

    @property
    def busy(self) -> int:
        return self.running + self.held


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    name: str
    workers: int
    configured: bool
    queued: int
    running: int
    held: int


class Scheduler:
    def __init__(self, pools: Mapping[str, int]) -> None:
        """``pools`` maps each configured pool name to its capacity: how many of its
        runs may be running at once (the executor's workers plus its prefetch)."""
        self.pools: dict[str, PoolState] = {
            name: PoolState(name, workers) for name, workers in pools.items()
        }
        self.runs: dict[int, Run] = {}
        self.next_id = 1
        self._held: set[tuple[int, int]] = set()
        self._held_pools: dict[int, str] = {}
        #: runs whose lost attempt's leftovers are being killed: run id -> attempt
        self.fenced: dict[int, int] = {}
        self.cancel_results: dict[int, str] = {}
        #: when true, nothing new starts (the daemon is shutting down)
        self.draining = False

    # -- events -----------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Effect]:
        effects: list[Effect] = []
        match event:
            case Submit(runs):
                self._submit(runs, now, effects)
            case Finished(results):
                self._finished(results, effects)
            case ProcessStarted(run_id, attempt, pid, started):
                run = self.runs.get(run_id)
                if (
                    run is not None
                    and run.state is State.RUNNING
                    and run.attempts == attempt
                    and run_id not in self.fenced
                ):
                    effects.append(PidRecorded(run_id, attempt, pid, started))
                return effects
            case Cancel(run_ids):
                self._cancel(run_ids, now, effects)
            case Recover(runs, next_id):
                self._recover(runs, next_id, now, effects)
            case LeftoversGone(attempts, began):
                self._leftovers_gone(attempts, began, now, effects)
            case Withdraw(attempts):
                self._withdraw(attempts, now, effects)
            case Quarantine(run_ids, reason, in_executor):
                self._quarantine(run_ids, reason, in_executor, now, effects)
        self._dispatch(now, effects)
        return effects

    def _submit(self, new_runs: Iterable[NewRun], now: float, effects: list[Effect]) -> None:
        for new in new_runs:
            run_id = self.next_id
            self.next_id += 1
            run = Run(
                id=run_id,
                spec=new.spec,
                pool=new.pool,
                priority=new.priority,
                name=new.name,
                tags=new.tags,
                owner=new.owner,
                state=State.QUEUED,
                submitted_at=now,
            )
            effects.append(
                Created(
                    run_id, new.spec, new.pool, new.priority, new.name, new.tags, new.owner, now
                )
            )
            self._enqueue(run)

    def _enqueue(self, run: Run) -> None:
        self.runs[run.id] = run
        pool = self.pools.get(run.pool)
        if pool is None:
            # The pool was removed from the configuration while runs were queued
            # in it: keep them (nothing acknowledged is dropped) in a pool with no
            # workers until the pool is configured again.
            pool = self.pools[run.pool] = PoolState(run.pool, 0, configured=False)
        heapq.heappush(pool.heap, (-run.priority, run.id))
        pool.queued += 1

    def _finished(self, results: Iterable[Result], effects: list[Effect]) -> None:
        runs = self.runs
        for result in results:
            key = (result.run_id, result.attempt)
            if key in self._held:
                # A cancelled callable finally returned: its slot is free again.
                self._held.discard(key)
                self._pool_of_held(result.run_id).held -= 1
                continue
            run = runs.get(result.run_id)
            if (
                run is None
                or run.state is not State.RUNNING
                or run.attempts != result.attempt
                or run.id in self.fenced
            ):
                continue  # stale report (cannot happen unless an executor misbehaves)
            recorded = result
            if run.cancel_requested:
                state = State.CANCELLED
                reason: str | None = "cancelled while running"
                if result.outcome is not Outcome.SUCCEEDED:
                    recorded = _with_outcome(result, Outcome.CANCELLED)
            elif result.outcome is Outcome.SUCCEEDED:
                state, reason = State.SUCCEEDED, None
            else:
                state, reason = State.FAILED, result.error
            run.state = state
            self.pools[run.pool].running -= 1
            del runs[run.id]
            effects.append(Ended(recorded, state, reason))

    def _withdraw(
        self, attempts: Iterable[tuple[int, int]], now: float, effects: list[Effect]
    ) -> None:
        for key in attempts:
            run_id, attempt = key
            if key in self._held:
                # A cancelled callable that never began: its slot is free.
                self._held.discard(key)
                self._pool_of_held(run_id).held -= 1
                continue
            run = self.runs.get(run_id)
            if (
                run is None
                or run.state is not State.RUNNING
                or run.attempts != attempt
                or run_id in self.fenced
            ):
                continue
            self.pools[run.pool].running -= 1
            run.attempts -= 1
            if run.cancel_requested:
                # Its process was never spawned: the cancel is complete.
                run.state = State.CANCELLED
                del self.runs[run_id]
                effects.append(Withdrawn(run_id, attempt, now))
                effects.append(StateChanged(run_id, State.CANCELLED, now, "cancelled"))
                continue
            run.state = State.QUEUED
            effects.append(Withdrawn(run_id, attempt, now))
            self._enqueue(run)

    def _pool_of_held(self, run_id: int) -> PoolState:
        return self.pools[self._held_pools.pop(run_id)]

    def _cancel(self, run_ids: Iterable[int], now: float, effects: list[Effect]) -> None:
        """Cancel runs. ``cancel_results`` maps each id to what happened:
        ``cancelled`` (done now), ``cancelling`` (a process is being stopped) or
        ``unknown`` (not active: terminal or never existed; the daemon asks the
        journal which)."""
        results: dict[int, str] = {}
        for run_id in run_ids:
            run = self.runs.get(run_id)
            if run is None:
                results[run_id] = "unknown"
            elif run.state is State.QUEUED:
                run.state = State.CANCELLED
                self.pools[run.pool].queued -= 1
                del self.runs[run_id]
                effects.append(StateChanged(run_id, State.CANCELLED, now, "cancelled while queued"))
                results[run_id] = "cancelled"
            elif run_id in self.fenced:
                # Its leftovers are being killed: the cancel is journaled, and the
                # run ends cancelled once they are gone (nothing else to stop).
                if not run.cancel_requested:
                    run.cancel_requested = True
                    effects.append(CancelRequested(run_id, now))
                results[run_id] = "cancelling"
            elif run.state is State.RUNNING and run.spec.kind is Kind.CALL:
                # A thread cannot be interrupted: end the run now, hold the slot
                # until the call returns.
                run.state = State.CANCELLED
                pool = self.pools[run.pool]
                pool.running -= 1
                pool.held += 1
                self._held.add((run_id, run.attempts))
                self._held_pools[run_id] = run.pool
                del self.runs[run_id]
                result = Result(
                    run_id,
                    run.attempts,
                    Outcome.CANCELLED,
                    now,
                    error="cancelled while running; the call was left to return",
                )
                effects.append(Ended(result, State.CANCELLED, "cancelled while running"))
                # Lets the executor skip the call if no thread has taken it yet.
                effects.append(Kill(run_id, run.attempts))
                results[run_id] = "cancelled"
            elif run.state is State.RUNNING:
                if not run.cancel_requested:
                    # Journaled, so a crash before the process exits still ends
                    # the run cancelled instead of re-queuing it.
                    run.cancel_requested = True
                    effects.append(CancelRequested(run_id, now))
                    effects.append(Kill(run_id, run.attempts))
                results[run_id] = "cancelling"
            else:  # pragma: no cover - no other active states exist yet
                results[run_id] = "unknown"
        self.cancel_results = results

    def _recover(
        self, runs: Iterable[Run], next_id: int, now: float, effects: list[Effect]
    ) -> None:
        self.next_id = max(self.next_id, next_id)
        for run in runs:
            if run.state is State.RUNNING and run.spec.kind is not Kind.CALL:
                # Interrupted by a crash: fenced until its leftovers are known dead.
                self.runs[run.id] = run
                self.fenced[run.id] = run.attempts
                effects.append(
                    KillLeftovers(run.id, run.attempts, run.attempt_pid, run.attempt_pid_started)
                )
            elif run.state is State.RUNNING:
                # A callable ran in the daemon's own threads: nothing of it is left.
                self._close_lost(run, now, effects)
            elif run.state is State.QUEUED:
                self._enqueue(run)

    def _leftovers_gone(
        self,
        attempts: Iterable[tuple[int, int]],
        began: frozenset[tuple[int, int]],
        now: float,
        effects: list[Effect],
    ) -> None:
        for key in attempts:
            run_id, attempt = key
            if self.fenced.get(run_id) != attempt:
                continue  # not fenced (any more): quarantined meanwhile, or a stale report
            del self.fenced[run_id]
            run = self.runs.pop(run_id)
            if run.attempt_pid is not None or key in began:
                self._close_lost(run, now, effects)
                continue
            # Journaled as started, never spawned: not tried (DESIGN.md, "An
            # attempt counts once it began"). Undone like a withdrawn attempt.
            run.attempts -= 1
            effects.append(Withdrawn(run_id, attempt, now))
            if run.cancel_requested:
                run.state = State.CANCELLED
                effects.append(StateChanged(run_id, State.CANCELLED, now, "cancelled"))
            else:
                run.state = State.QUEUED
                self._enqueue(run)

    def _close_lost(self, run: Run, now: float, effects: list[Effect]) -> None:
        """Close an interrupted attempt as lost; re-queue the run (at-least-once) or end it."""
        lost = Result(
            run.id,
            run.attempts,
            Outcome.LOST,
            now,
            error="the daemon stopped while this attempt ran",
        )
        effects.append(Ended(lost, None))
        run.lost += 1
        if run.cancel_requested:
            state, reason = (State.CANCELLED, "cancelled; the daemon stopped before it exited")
        elif run.lost > MAX_LOST_REQUEUES:
            state, reason = State.FAILED, f"attempt {run.attempts} lost ({run.lost} lost)"
        else:
            state, reason = State.QUEUED, f"re-queued after attempt {run.attempts} was lost"
        run.state = state
        effects.append(StateChanged(run.id, state, now, reason, lost=run.lost))
        if state is State.QUEUED:
            self._enqueue(run)

    def _quarantine(
        self,
        run_ids: Iterable[int],
        reason: str,
        in_executor: frozenset[tuple[int, int]],
        now: float,
        effects: list[Effect],
    ) -> None:
        for run_id in run_ids:
            run = self.runs.pop(run_id, None)
            if run is not None and run_id in self.fenced:
                del self.fenced[run_id]  # its leftovers are still killed: it never runs again
            elif run is not None and run.state is State.QUEUED:
                self.pools[run.pool].queued -= 1  # its heap entry is skipped when popped
            elif run is not None and run.state is State.RUNNING:
                pool = self.pools[run.pool]
                pool.running -= 1
                key = (run_id, run.attempts)
                if key in in_executor:
                    # Stop it; its slot is free once the executor reports it.
                    pool.held += 1
                    self._held.add(key)
                    self._held_pools[run_id] = run.pool
                    effects.append(Quarantined(run_id, now, reason))
                    effects.append(Kill(*key))
                    continue
            if run is not None:
                run.state = State.FAILED
            # Also for a run memory no longer holds: the journal may still show it
            # active (its end was what the journal refused).
            effects.append(Quarantined(run_id, now, reason))

    def _dispatch(self, now: float, effects: list[Effect]) -> None:
        if self.draining:
            return
        for pool in self.pools.values():
            heap = pool.heap
            while heap and pool.busy < pool.workers:
                _, run_id = heapq.heappop(heap)
                run = self.runs.get(run_id)
                if run is None or run.state is not State.QUEUED:
                    continue  # lazily deleted (cancelled while queued)
                pool.queued -= 1
                pool.running += 1
                run.state = State.RUNNING
                run.attempts += 1
                effects.append(Started(run_id, run.attempts, now, run.pool, run.spec))
            if not heap and pool.queued:  # pragma: no cover - invariant guard
                raise AssertionError(f"pool {pool.name}: queued count out of step with heap")

    # -- inspection -------------------------------------------------------

    def statistics(self) -> list[PoolStatistics]:
        """Per pool. Fenced runs (``fenced``) are in no pool's counts."""
        return [
            PoolStatistics(p.name, p.workers, p.configured, p.queued, p.running, p.held)
            for p in self.pools.values()
        ]


def _with_outcome(result: Result, outcome: Outcome) -> Result:
    return dataclasses.replace(result, outcome=outcome)
