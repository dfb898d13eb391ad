"""Stateful test of the scheduler core: random submits, finishes, cancels and crashes.

Next to the real ``Scheduler`` the machine keeps three plain models:

- a *journal* (dicts of rows) that applies the journal effects the way
  ``jobd/journal.py`` does (including ``runs.cancel_requested``), and rebuilds
  the active runs from them the way ``Journal.load_active`` does;
- an *executor*: the attempts that are executing (started and not yet reported
  finished), including cancelled callables that still hold their slot;
- the pool configuration of the current daemon process.

A restart throws the scheduler and the executor away (the process died; its
threads died with it, and its processes are what ``KillLeftovers`` is for) and
recovers a fresh scheduler from the model journal, as ``Daemon.run`` does. An
interrupted command stays *fenced* (running, nothing starts it) until the
machine reports its leftovers gone; a restart meanwhile finds it again. A
quarantine (the journal refused a run's change) fails runs in any state.
Every effect list is checked against the models; no event loop, no clock.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

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
from jobd.core.model import (
    PRIORITIES,
    Kind,
    NewRun,
    Outcome,
    Result,
    Run,
    Spec,
    State,
    priority_value,
)
from jobd.core.scheduler import (
    MAX_LOST_REQUEUES,
    Cancel,
    Event,
    Finished,
    LeftoversGone,
    ProcessStarted,
    Quarantine,
    Recover,
    Scheduler,
    Submit,
    Withdraw,
)

POOLS = ("default", "python", "batch")
GHOST = "ghost"  # never configured: its runs wait for workers that never come

# A configuration: `default` always exists (config.py adds it), the others may not.
WORKERS = st.fixed_dictionaries(
    {"default": st.integers(1, 3)},
    optional={"python": st.integers(1, 3), "batch": st.integers(1, 3)},
)
SPECS = st.sampled_from(
    [
        Spec(Kind.COMMAND, command=("true",)),
        Spec(Kind.COMMAND, command=("sh", "-c", "exit 3"), env={"A": "1"}, cwd="/tmp"),
        Spec(Kind.SHELL, shell="sleep 1"),
        Spec(Kind.CALL, call="jobd.demo:add", args=(1, 2)),
        Spec(Kind.CALL, call="jobd.demo:fail", kwargs={"why": "x"}),
    ]
)
# Small integers give many ties; names give the far-apart levels.
PRIORITY = st.one_of(
    st.integers(-2, 2),
    st.sampled_from(sorted(PRIORITIES)).map(priority_value),
)
NEW_RUNS = st.builds(
    NewRun,
    spec=SPECS,
    pool=st.sampled_from((*POOLS, "default", GHOST)),
    priority=PRIORITY,
    name=st.sampled_from((None, "nightly")),
    tags=st.sampled_from(((), ("a", "b"))),
    owner=st.sampled_from((0, 1000)),
)
ATTEMPT_OUTCOMES = st.sampled_from((Outcome.SUCCEEDED, Outcome.FAILED, Outcome.ERROR))


# -- the model journal ---------------------------------------------------------


@dataclass
class Row:
    """A row of the ``runs`` table."""

    id: int
    spec_json: str
    pool: str
    priority: int
    name: str | None
    tags: tuple[str, ...]
    owner: int
    submitted_at: float
    state: State = State.QUEUED
    attempts: int = 0
    lost: int = 0
    cancel_requested: bool = False
    reason: str | None = None
    exit_code: int | None = None

    @property
    def kind(self) -> Kind:
        return Kind(json.loads(self.spec_json)["kind"])


@dataclass
class AttemptRow:
    """A row of the ``attempts`` table."""

    started_at: float
    outcome: Outcome | None = None  # None while running
    pid: int | None = None


class ModelJournal:
    """The journal's tables as dicts, written exactly as journal.py writes effects.

    The assertions are the constraints the real schema enforces (primary keys)
    plus the lifecycle the scheduler promises (only a queued run starts, and
    never one whose cancel was requested; only a running attempt ends; only
    active runs change state, and a running one only once its attempt ended;
    only a running command's cancel is requested, once)."""

    def __init__(self) -> None:
        self.runs: dict[int, Row] = {}
        self.attempts: dict[tuple[int, int], AttemptRow] = {}
        self.seq = 0  # sqlite_sequence for runs: the largest id ever inserted
        self.withdrawn: set[tuple[int, int]] = set()  # attempts undone, never begun
        self.quarantined: set[int] = set()  # runs failed because the journal refused them
        self.transactions: list[list[Effect]] = []  # every commit, in order

    def write(self, effects: list[Effect]) -> None:
        """One group-committed transaction."""
        if effects:
            self.transactions.append(effects)
        for effect in effects:
            match effect:
                case Created():
                    assert effect.run_id not in self.runs, f"run id {effect.run_id} reused"
                    assert effect.run_id > self.seq, f"run id {effect.run_id} not increasing"
                    self.seq = effect.run_id
                    self.runs[effect.run_id] = Row(
                        effect.run_id,
                        json.dumps(effect.spec.to_json()),
                        effect.pool,
                        effect.priority,
                        effect.name,
                        effect.tags,
                        effect.owner,
                        effect.submitted_at,
                    )
                case Started():
                    key = (effect.run_id, effect.attempt)
                    assert key not in self.attempts, f"attempt {key} started twice"
                    row = self.runs[effect.run_id]
                    assert row.state is State.QUEUED, f"run {row.id} started while {row.state}"
                    assert not row.cancel_requested, f"run {row.id} started after its cancel"
                    assert effect.attempt == row.attempts + 1, "attempt numbers must not skip"
                    assert effect.pool == row.pool
                    assert json.dumps(effect.spec.to_json()) == row.spec_json
                    self.attempts[key] = AttemptRow(effect.at)
                    row.state, row.attempts = State.RUNNING, effect.attempt
                case Ended(result=result):
                    key = (result.run_id, result.attempt)
                    attempt = self.attempts[key]
                    assert attempt.outcome is None, f"attempt {key} ended twice"
                    attempt.outcome = result.outcome
                    row = self.runs[result.run_id]
                    assert row.state is State.RUNNING, f"run {row.id} ended while {row.state}"
                    assert row.attempts == result.attempt, "ended an attempt that is not current"
                    if effect.state is not None:
                        assert effect.state.terminal, f"Ended with active state {effect.state}"
                        assert effect.state is State.CANCELLED or not row.cancel_requested, (
                            f"run {row.id} ended {effect.state} after its cancel was requested"
                        )
                        row.state, row.reason = effect.state, effect.reason
                        row.exit_code = result.exit_code
                case StateChanged():
                    row = self.runs[effect.run_id]
                    assert not row.state.terminal, f"run {row.id} changed after {row.state}"
                    assert effect.state is not State.RUNNING, "only Started makes a run running"
                    if row.state is State.RUNNING:
                        current = self.attempts[(row.id, row.attempts)]
                        assert current.outcome is not None, f"run {row.id} left an open attempt"
                    assert effect.state is State.CANCELLED or not row.cancel_requested, (
                        f"run {row.id} became {effect.state} after its cancel was requested"
                    )
                    row.state, row.reason = effect.state, effect.reason
                    if effect.lost is not None:
                        row.lost = effect.lost
                case CancelRequested():
                    row = self.runs[effect.run_id]
                    assert row.state is State.RUNNING, f"cancel requested for {row.state} run"
                    assert row.kind is not Kind.CALL, "a callable's cancel ends it instead"
                    assert not row.cancel_requested, f"run {row.id}: cancel requested twice"
                    row.cancel_requested = True
                case PidRecorded():
                    attempt = self.attempts[(effect.run_id, effect.attempt)]
                    assert attempt.outcome is None, "pid recorded for an attempt that ended"
                    attempt.pid = effect.pid
                case Withdrawn():
                    row = self.runs[effect.run_id]
                    assert row.state is State.RUNNING, f"withdrew a {row.state} run"
                    assert row.attempts == effect.attempt, "withdrew an attempt not current"
                    attempt = self.attempts.pop((row.id, effect.attempt))
                    assert attempt.outcome is None, "withdrew an attempt that ended"
                    row.state, row.attempts = State.QUEUED, row.attempts - 1
                    self.withdrawn.add((row.id, effect.attempt))
                case Quarantined():
                    # As journal.py writes it: close an open attempt, fail an active run.
                    row = self.runs[effect.run_id]
                    attempt = self.attempts.get((row.id, row.attempts))
                    if attempt is not None and attempt.outcome is None:
                        attempt.outcome = Outcome.ERROR
                    if not row.state.terminal:
                        row.state, row.reason = State.FAILED, effect.reason
                        self.quarantined.add(row.id)
                case Kill() | KillLeftovers():
                    pass  # actions only: no journal row

    def without_last_transaction(self) -> ModelJournal:
        """The journal as it was before its last commit (the commit never happened)."""
        journal = ModelJournal()
        for effects in self.transactions[:-1]:
            journal.write(effects)
        return journal

    def load_active(self) -> tuple[list[Run], int]:
        """What ``Journal.load_active`` returns: fresh Run objects, in id order."""
        runs = [
            Run(
                id=row.id,
                spec=Spec.from_json(json.loads(row.spec_json)),
                pool=row.pool,
                priority=row.priority,
                name=row.name,
                tags=row.tags,
                owner=row.owner,
                state=row.state,
                submitted_at=row.submitted_at,
                attempts=row.attempts,
                lost=row.lost,
                cancel_requested=row.cancel_requested,
                attempt_pid=_pid(self.attempts.get((row.id, row.attempts))),
            )
            for row in sorted(self.runs.values(), key=lambda r: r.id)
            if not row.state.terminal
        ]
        return runs, self.seq + 1

    def in_state(self, state: State, pool: str | None = None) -> list[Row]:
        return [
            row
            for row in self.runs.values()
            if row.state is state and (pool is None or row.pool == pool)
        ]


def checked(rule_body: Callable[..., None]) -> Callable[..., None]:
    """Mark the machine unhealthy while a step runs, so that teardown does not
    pile a second failure on top of the first one."""

    @functools.wraps(rule_body)
    def wrapper(self: SchedulerMachine, **kwargs: Any) -> None:
        self.healthy = False
        rule_body(self, **kwargs)
        self.healthy = True

    return wrapper


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.journal = ModelJournal()
        self.workers: dict[str, int] = {}
        self.scheduler = Scheduler({})
        self.now = 1_700_000_000.0
        self.submitted: list[int] = []
        # The executor: attempts started and not reported finished -> their pool.
        self.live: dict[tuple[int, int], str] = {}
        # Attempts that got a Kill in this daemon process.
        self.killed: set[tuple[int, int]] = set()
        # Interrupted commands whose leftovers are being killed: run -> attempt.
        self.fenced: dict[int, int] = {}
        self.healthy = True

    # -- driving the scheduler ----------------------------------------------------

    def handle(self, event: Event) -> list[Effect]:
        """Feed one event; check the effects, journal them and start what starts."""
        self.now += 1.0
        effects = self.scheduler.handle(event, self.now)
        for i, effect in enumerate(effects):
            if isinstance(effect, Kill):
                key = (effect.run_id, effect.attempt)
                row = self.journal.runs[effect.run_id]
                assert row.state is State.RUNNING, f"Kill for run {row.id} in {row.state}"
                assert row.attempts == effect.attempt, "Kill for an attempt that is not current"
                assert key in self.live
                if effects[i - 1 : i] == [Quarantined(effect.run_id, self.now, "refused")]:
                    pass  # a quarantined attempt that an executor holds is told to stop
                elif row.kind is Kind.CALL:
                    # A thread cannot be stopped; a Kill for a callable only goes with
                    # the cancel that ended its attempt (the executor may then skip a
                    # call no thread has taken yet).
                    assert any(
                        isinstance(e, Ended)
                        and (e.result.run_id, e.result.attempt) == key
                        and e.state is State.CANCELLED
                        for e in effects[:i]
                    ), f"Kill for callable attempt {key} without the cancel that ended it"
                else:
                    # A command is killed only right after its cancel is journaled
                    # (in the same transaction), so a crash before it exits cannot
                    # re-queue it.
                    assert key not in self.killed, f"Kill for {key} emitted twice"
                    assert i > 0 and effects[i - 1] == CancelRequested(effect.run_id, self.now), (
                        f"Kill for command attempt {key} without its CancelRequested"
                    )
                    self.killed.add(key)
            elif isinstance(effect, CancelRequested):
                assert isinstance(event, Cancel), "CancelRequested outside a cancel"
                row = self.journal.runs[effect.run_id]
                if effect.run_id in self.fenced:
                    # Nothing executes it: its leftovers are being killed already.
                    assert not any(isinstance(e, Kill) and e.run_id == row.id for e in effects)
                else:
                    assert effects[i + 1 : i + 2] == [Kill(effect.run_id, row.attempts)], (
                        f"CancelRequested for run {effect.run_id} not followed by its Kill"
                    )
            elif isinstance(effect, KillLeftovers):
                assert isinstance(event, Recover), "KillLeftovers outside recovery"
                row = self.journal.runs[effect.run_id]
                assert row.state is State.RUNNING and row.attempts == effect.attempt
                assert row.kind is not Kind.CALL, "a callable leaves nothing behind"
                self.fenced[effect.run_id] = effect.attempt
            elif isinstance(effect, Started):
                assert effect.run_id not in self.fenced, f"fenced run {effect.run_id} started"
        self.journal.write(effects)
        for effect in effects:
            if isinstance(effect, Started):
                running = {run_id for run_id, _ in self.live}
                assert effect.run_id not in running, f"run {effect.run_id} would run twice"
                self.live[(effect.run_id, effect.attempt)] = effect.pool
        self.check_priority_order(effects)
        self.check_pools()
        return effects

    def check_priority_order(self, effects: list[Effect]) -> None:
        """Nothing that stayed queued in a pool outranks a run that started in it."""
        for effect in effects:
            if not isinstance(effect, Started):
                continue
            started = self.journal.runs[effect.run_id]
            for row in self.journal.in_state(State.QUEUED, effect.pool):
                assert (-row.priority, row.id) > (-started.priority, started.id), (
                    f"run {started.id} (priority {started.priority}) started before queued"
                    f" run {row.id} (priority {row.priority}) in pool {effect.pool}"
                )

    def check_pools(self) -> None:
        """Limits hold, slots are never left idle while runs wait, stats add up."""
        busy = Counter(self.live.values())
        for pool in {*self.workers, *busy, GHOST}:
            workers = self.workers.get(pool, 0)
            assert busy[pool] <= workers, f"pool {pool}: {busy[pool]} busy > {workers} workers"
            if busy[pool] < workers:
                assert not self.journal.in_state(State.QUEUED, pool), (
                    f"pool {pool} has a free slot and queued runs"
                )
        for stats in self.scheduler.statistics():
            assert stats.workers == self.workers.get(stats.name, 0)
            assert stats.configured == (stats.name in self.workers)
            assert stats.running + stats.held == busy[stats.name]
            assert stats.queued == len(self.journal.in_state(State.QUEUED, stats.name))
            held = sum(
                1
                for (run_id, _), pool in self.live.items()
                if pool == stats.name and self.journal.runs[run_id].state.terminal
            )
            assert stats.held == held

    # -- rules ------------------------------------------------------------------------

    @initialize(workers=WORKERS)
    def configure(self, workers: dict[str, int]) -> None:
        self.workers = workers
        self.scheduler = Scheduler(workers)

    @rule(new_runs=st.lists(NEW_RUNS, min_size=1, max_size=5))
    @checked
    def submit(self, new_runs: list[NewRun]) -> None:
        first = self.journal.seq + 1
        effects = self.handle(Submit(tuple(new_runs)))
        created = effects[: len(new_runs)]
        # The daemon relies on this: one Created per submission, first, in order.
        assert all(isinstance(e, Created) for e in created)
        assert [e.run_id for e in created] == list(range(first, first + len(new_runs)))
        for effect, new in zip(created, new_runs, strict=True):
            assert isinstance(effect, Created)
            assert (effect.spec, effect.pool, effect.priority) == (new.spec, new.pool, new.priority)
            assert (effect.name, effect.tags, effect.owner) == (new.name, new.tags, new.owner)
        assert all(isinstance(e, Started) for e in effects[len(new_runs) :])
        self.submitted.extend(e.run_id for e in created)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    @checked
    def finish(self, data: st.DataObject) -> None:
        keys = data.draw(
            st.lists(st.sampled_from(sorted(self.live)), min_size=1, max_size=3, unique=True),
            label="attempts",
        )
        results = []
        expected: dict[tuple[int, int], tuple[State, Outcome]] = {}
        for key in keys:
            outcome = data.draw(ATTEMPT_OUTCOMES, label=f"outcome of {key}")
            exit_code = {Outcome.SUCCEEDED: 0, Outcome.FAILED: 1, Outcome.ERROR: None}[outcome]
            error = None if outcome is Outcome.SUCCEEDED else f"{outcome} on purpose"
            results.append(Result(*key, outcome, self.now, exit_code=exit_code, error=error))
            if self.journal.runs[key[0]].state.terminal:
                event("finish: a cancelled callable returned")
                continue  # it only frees its slot
            if key in self.killed:
                event("finish: a killed command ended")
                cancelled = Outcome.SUCCEEDED if outcome is Outcome.SUCCEEDED else Outcome.CANCELLED
                expected[key] = (State.CANCELLED, cancelled)
            elif outcome is Outcome.SUCCEEDED:
                expected[key] = (State.SUCCEEDED, Outcome.SUCCEEDED)
            else:
                expected[key] = (State.FAILED, outcome)
        for key in keys:
            self.live.pop(key, None)
        effects = self.handle(Finished(tuple(results)))
        ended = {(e.result.run_id, e.result.attempt): e for e in effects if isinstance(e, Ended)}
        assert set(ended) == set(expected)
        for key, (state, outcome) in expected.items():
            assert ended[key].state is state
            assert ended[key].result.outcome is outcome
        assert all(isinstance(e, Ended | Started) for e in effects)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), pid=st.integers(2, 2**22))
    @checked
    def process_started(self, data: st.DataObject, pid: int) -> None:
        key = data.draw(st.sampled_from(sorted(self.live)), label="attempt")
        held = self.journal.runs[key[0]].state.terminal
        effects = self.handle(ProcessStarted(*key, pid))
        assert effects == ([] if held else [PidRecorded(*key, pid)])

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    @checked
    def withdraw(self, data: st.DataObject) -> None:
        """The daemon stops: attempts handed to the executor that it never began are
        undone (the run is queued again, or cancelled if its cancel was requested)."""
        keys = data.draw(
            st.lists(st.sampled_from(sorted(self.live)), min_size=1, max_size=3, unique=True),
            label="attempts",
        )
        for key in keys:
            self.live.pop(key)
            self.killed.discard(key)
        effects = self.handle(Withdraw(tuple(keys)))
        withdrawn = {(e.run_id, e.attempt) for e in effects if isinstance(e, Withdrawn)}
        held = {key for key in keys if key not in withdrawn}
        for key in held:  # a cancelled callable's (or a quarantined run's) slot, freed
            assert self.journal.runs[key[0]].state in (State.CANCELLED, State.FAILED)
        for run_id, _ in withdrawn:
            state = self.journal.runs[run_id].state
            assert state in (State.QUEUED, State.CANCELLED, State.RUNNING), state

    @rule(data=st.data(), finished=st.booleans())
    @checked
    def stale_report(self, data: st.DataObject, finished: bool) -> None:
        """Reports for attempts that are not executing change nothing."""
        candidates = [key for key in self.journal.attempts if key not in self.live]
        candidates += [(row.id, row.attempts + 1) for row in self.journal.runs.values()]
        candidates.append((self.journal.seq + 1, 1))  # a run that does not exist
        key = data.draw(st.sampled_from(sorted(candidates)), label="attempt")
        if finished:
            event: Event = Finished((Result(*key, Outcome.SUCCEEDED, self.now, exit_code=0),))
        else:
            event = ProcessStarted(*key, 4242)
        assert self.handle(event) == []

    @rule(data=st.data())
    @checked
    def cancel(self, data: st.DataObject) -> None:
        running = self.journal.in_state(State.RUNNING)
        groups = {
            "queued": [r.id for r in self.journal.in_state(State.QUEUED)],
            "running command": [
                r.id for r in running if r.kind is not Kind.CALL and r.id not in self.fenced
            ],
            "fenced": sorted(self.fenced),
            "running call": [r.id for r in running if r.kind is Kind.CALL],
            "terminal": [r.id for r in self.journal.runs.values() if r.state.terminal],
            "unknown": [0, self.journal.seq + 1, self.journal.seq + 50],
        }
        choices = sorted(name for name, ids in groups.items() if ids)
        picks = data.draw(st.lists(st.sampled_from(choices), min_size=1, max_size=4), label="what")
        ids = list(dict.fromkeys(data.draw(st.sampled_from(groups[g])) for g in picks))

        expected_results: dict[int, str] = {}
        expected_effects: list[tuple[type, int]] = []
        for run_id in ids:
            row = self.journal.runs.get(run_id)
            if row is None or row.state.terminal:
                expected_results[run_id] = "unknown"
            elif row.state is State.QUEUED:
                expected_results[run_id] = "cancelled"
                expected_effects.append((StateChanged, run_id))
            elif run_id in self.fenced:
                expected_results[run_id] = "cancelling"
                if not row.cancel_requested:
                    expected_effects.append((CancelRequested, run_id))
            elif row.kind is Kind.CALL:
                expected_results[run_id] = "cancelled"
                expected_effects.append((Ended, run_id))
            else:
                expected_results[run_id] = "cancelling"
                if row.cancel_requested:
                    event("cancel: a command already cancelling")
                else:
                    expected_effects += [(CancelRequested, run_id), (Kill, run_id)]
        for name in picks:
            event(f"cancel: {name}")
        effects = self.handle(Cancel(tuple(ids)))
        assert self.scheduler.cancel_results == expected_results
        # Cancelling frees no slot a queued run could take (a callable keeps its
        # slot until it returns), so nothing starts.
        # (A Kill that follows a callable's cancel is checked in handle().)
        calls = {r for r in ids if expected_results[r] == "cancelled"}
        assert [
            (type(e), _run_id(e))
            for e in effects
            if not (isinstance(e, Kill) and e.run_id in calls)
        ] == expected_effects
        for effect in effects:
            if isinstance(effect, StateChanged | Ended):
                assert self.journal.runs[_run_id(effect)].state is State.CANCELLED
            if isinstance(effect, Ended):
                assert effect.result.outcome is Outcome.CANCELLED
        for run_id, result in expected_results.items():
            if result == "cancelling":
                row = self.journal.runs[run_id]
                assert (row.state, row.cancel_requested) == (State.RUNNING, True)
                assert (run_id, row.attempts) in self.killed or run_id in self.fenced

    @rule(workers=WORKERS, before_commit=st.booleans())
    @checked
    def restart(self, workers: dict[str, int], before_commit: bool) -> None:
        """The daemon dies (every attempt with it) and a new one recovers the journal.

        With ``before_commit`` it dies before the last transaction committed: no
        effect of it was carried out (nothing started, no client was answered), so
        its submissions may vanish and its ids be handed out again."""
        if before_commit:
            self.journal = self.journal.without_last_transaction()
            self.submitted = [i for i in self.submitted if i in self.journal.runs]
        runs, next_id = self.journal.load_active()
        # Snapshot: the scheduler takes the Run objects over and mutates them.
        interrupted = {
            r.id: (r.attempts, r.lost, r.cancel_requested, r.spec.kind, r.attempt_pid)
            for r in runs
            if r.state is State.RUNNING
        }
        self.live.clear()
        self.killed.clear()
        self.fenced.clear()
        self.workers = workers
        self.scheduler = Scheduler(workers)
        effects = self.handle(Recover(tuple(runs), next_id))

        # Each interrupted run, in id order: a command is fenced (its leftovers are
        # killed; nothing else happens to it yet); a callable (nothing of it
        # outlived the daemon) is closed as lost at once. Only then does anything
        # start.
        position = 0
        for run_id, (attempt, lost, cancel_requested, kind, pid) in interrupted.items():
            if kind is Kind.CALL:
                key = (run_id, attempt)
                self.check_lost(effects[position : position + 2], key, lost, cancel_requested)
                position += 2
            else:
                assert effects[position] == KillLeftovers(run_id, attempt, pid)
                assert self.journal.runs[run_id].state is State.RUNNING
                position += 1
        assert all(isinstance(e, Started) for e in effects[position:]), effects
        if any(kind is not Kind.CALL for *_, kind in interrupted.values()):
            event("restart: an interrupted command was fenced")

    def check_lost(
        self, effects: list[Effect], key: tuple[int, int], lost: int, cancel_requested: bool
    ) -> None:
        """The attempt closes as lost, and the run is cancelled (a cancel was
        journaled), failed (lost too often) or re-queued."""
        assert len(effects) == 2, f"too few effects for a lost attempt: {effects}"
        ended, changed = effects
        run_id, attempt = key
        assert isinstance(ended, Ended)
        assert ended.result == Result(
            run_id, attempt, Outcome.LOST, self.now, error=ended.result.error
        )
        assert ended.result.error and ended.state is None
        if cancel_requested:
            event("lost: a run cancelled before the crash ended cancelled")
            state = State.CANCELLED
        elif lost + 1 > MAX_LOST_REQUEUES:
            event("lost: a run lost too often failed")
            state = State.FAILED
        else:
            event("lost: a lost run was re-queued")
            state = State.QUEUED
        assert isinstance(changed, StateChanged)
        assert changed == StateChanged(run_id, state, self.now, changed.reason, lost=lost + 1)
        assert changed.reason
        row = self.journal.runs[run_id]
        assert row.lost == lost + 1
        if state is State.QUEUED:
            assert row.state in (State.QUEUED, State.RUNNING)  # it may start again
        else:
            assert row.state is state
            assert run_id not in self.scheduler.runs

    @precondition(lambda self: self.fenced)
    @rule(data=st.data(), stale=st.booleans())
    @checked
    def leftovers_gone(self, data: st.DataObject, stale: bool) -> None:
        """The daemon killed an interrupted command's leftovers and saw them gone:
        only now is its attempt closed as lost and the run free to go on. An
        attempt with no journaled pid and no process found never began: it is
        undone instead (not lost; cancelled if its cancel was journaled)."""
        ids = data.draw(
            st.lists(st.sampled_from(sorted(self.fenced)), min_size=1, max_size=3, unique=True),
            label="runs",
        )
        if stale:  # a report for another attempt changes nothing
            before = dict(self.fenced)
            effects = self.handle(LeftoversGone(tuple((i, self.fenced[i] + 1) for i in ids)))
            assert effects == [] and self.fenced == before
            return
        rows = {i: (self.journal.runs[i].lost, self.journal.runs[i].cancel_requested) for i in ids}
        keys = tuple((i, self.fenced.pop(i)) for i in ids)
        began = frozenset(
            k for k in keys if data.draw(st.booleans(), label=f"a process of {k} was found")
        )
        pids = {k: _pid(self.journal.attempts[k]) for k in keys}
        effects = self.handle(LeftoversGone(keys, began))
        position = 0
        for key in keys:
            lost, cancel_requested = rows[key[0]]
            if pids[key] is None and key not in began:
                event("leftovers gone: an attempt that never began was undone")
                expected: list[Effect] = [Withdrawn(*key, self.now)]
                if cancel_requested:
                    expected.append(StateChanged(key[0], State.CANCELLED, self.now, "cancelled"))
                assert effects[position : position + len(expected)] == expected
                assert self.journal.runs[key[0]].lost == lost
                position += len(expected)
            else:
                self.check_lost(effects[position : position + 2], key, lost, cancel_requested)
                position += 2
        assert all(isinstance(e, Started) for e in effects[position:])

    @rule(data=st.data())
    @checked
    def quarantine(self, data: st.DataObject) -> None:
        """The journal refused changes to some runs (in whatever state): they are
        failed, an executing attempt is told to stop and keeps its slot until it
        is reported; nothing else changes."""
        rows = self.journal.runs.values()
        groups = {
            "queued": [r.id for r in rows if r.state is State.QUEUED],
            "executing": [r.id for r in rows if (r.id, r.attempts) in self.live],
            "fenced": sorted(self.fenced),
            "terminal": [r.id for r in rows if r.state.terminal],
        }
        choices = sorted(name for name, ids in groups.items() if ids)
        if not choices:
            return
        picks = data.draw(st.lists(st.sampled_from(choices), min_size=1, max_size=3), label="what")
        ids = list(dict.fromkeys(data.draw(st.sampled_from(groups[g])) for g in picks))
        for name in picks:
            event(f"quarantine: {name}")
        in_executor: set[tuple[int, int]] = set()
        for run_id in ids:
            row = self.journal.runs[run_id]
            key = (run_id, row.attempts)
            if key not in self.live or row.state.terminal:
                continue
            if data.draw(st.booleans(), label=f"executor holds {key}"):
                in_executor.add(key)
            else:  # its start was what the journal refused: it was never handed over
                del self.live[key]
                self.killed.discard(key)
        for run_id in ids:
            self.fenced.pop(run_id, None)
        effects = self.handle(Quarantine(tuple(ids), "refused", frozenset(in_executor)))
        quarantined = [e.run_id for e in effects if isinstance(e, Quarantined)]
        assert quarantined == ids
        kills = {(e.run_id, e.attempt) for e in effects if isinstance(e, Kill)}
        assert kills == in_executor
        assert all(isinstance(e, Quarantined | Kill | Started) for e in effects)
        for run_id in ids:
            assert self.journal.runs[run_id].state.terminal
            assert run_id not in self.scheduler.runs

    # -- invariants ---------------------------------------------------------------

    @invariant()
    @checked
    def nothing_lost(self) -> None:
        """Every submitted run is active in the scheduler or terminal in the journal."""
        active = self.scheduler.runs
        assert set(active) <= set(self.submitted)
        for run_id in self.submitted:
            row = self.journal.runs[run_id]
            if row.state.terminal:
                assert run_id not in active, f"terminal run {run_id} still in the scheduler"
            else:
                assert run_id in active, f"run {run_id} ({row.state}) lost by the scheduler"
                run = active[run_id]
                assert (run.state, run.attempts) == (row.state, row.attempts)
                assert (run.lost, run.cancel_requested) == (row.lost, row.cancel_requested)

    @invariant()
    @checked
    def one_attempt_at_a_time(self) -> None:
        runs = Counter(run_id for run_id, _ in self.live)
        assert all(n == 1 for n in runs.values()), f"a run executes twice: {runs}"
        for (run_id, attempt), _pool in self.live.items():
            row = self.journal.runs[run_id]
            if not row.state.terminal:
                assert (row.state, row.attempts) == (State.RUNNING, attempt)

    @invariant()
    @checked
    def lost_attempts_bounded(self) -> None:
        """``runs.lost`` counts every lost attempt, the final one included."""
        lost = Counter(k[0] for k, a in self.journal.attempts.items() if a.outcome is Outcome.LOST)
        for row in self.journal.runs.values():
            n = lost[row.id]
            assert n <= MAX_LOST_REQUEUES + 1, f"run {row.id} lost {n} attempts"
            assert row.lost == n, f"run {row.id}: lost={row.lost} but {n} lost attempts"
            last = self.journal.attempts.get((row.id, row.attempts))
            if last is None or last.outcome is not Outcome.LOST:
                assert n <= MAX_LOST_REQUEUES, f"run {row.id} went on after {n} losses"
            elif row.cancel_requested:
                assert row.state is State.CANCELLED, f"run {row.id} cancelled, lost: {row.state}"
            elif n > MAX_LOST_REQUEUES:
                assert row.state is State.FAILED, f"run {row.id} lost {n}x: {row.state}"
            elif row.id in self.journal.quarantined:
                assert row.state is State.FAILED
            else:  # re-queued, and maybe cancelled while queued since
                assert row.state in (State.QUEUED, State.CANCELLED)

    @invariant()
    @checked
    def cancel_requests_journaled(self) -> None:
        """A journaled cancel request belongs to a command that is being killed in
        this daemon process, or that ended cancelled; it never runs again."""
        for row in self.journal.runs.values():
            if not row.cancel_requested:
                continue
            assert row.kind is not Kind.CALL, f"cancel requested for callable run {row.id}"
            key = (row.id, row.attempts)
            if row.state is State.RUNNING and row.id in self.fenced:
                continue  # ends cancelled once its leftovers are gone
            if row.state is State.RUNNING:
                assert key in self.live and key in self.killed, f"{key}: cancel without Kill"
            elif row.id in self.journal.quarantined:
                assert row.state is State.FAILED
            else:
                assert row.state is State.CANCELLED, f"run {row.id} cancelled, ended {row.state}"
                if (row.id, row.attempts + 1) in self.journal.withdrawn:
                    continue  # cancelled before its attempt began: that attempt was undone
                outcome = self.journal.attempts[key].outcome
                assert outcome in (Outcome.CANCELLED, Outcome.SUCCEEDED, Outcome.LOST), outcome
        for key in self.live:
            row = self.journal.runs[key[0]]
            if not row.state.terminal:
                assert (key in self.killed) == row.cancel_requested, f"{key}: Kill vs journal"

    @invariant()
    @checked
    def pools_consistent(self) -> None:
        self.check_pools()

    def teardown(self) -> None:
        """Finish everything: every run must end terminal in the journal."""
        if not self.healthy:
            return  # a step failed; that failure is the one to report
        for _ in range(2 * len(self.submitted) + 2):
            if self.live:
                keys = sorted(self.live)
                results = tuple(Result(*k, Outcome.SUCCEEDED, self.now, exit_code=0) for k in keys)
                self.live.clear()
                self.handle(Finished(results))
            elif self.fenced:
                gone = tuple(self.fenced.items())
                self.fenced.clear()
                self.handle(LeftoversGone(gone))
            elif self.scheduler.runs:
                # Only runs in pools without workers can be left waiting.
                for run in self.scheduler.runs.values():
                    assert run.state is State.QUEUED
                    assert self.workers.get(run.pool, 0) == 0
                ids = tuple(self.scheduler.runs)
                self.handle(Cancel(ids))
                assert set(self.scheduler.cancel_results.values()) == {"cancelled"}
            else:
                break
        assert not self.scheduler.runs
        assert not self.live
        for run_id in self.submitted:
            assert self.journal.runs[run_id].state.terminal, f"run {run_id} never ended"
        assert all(a.outcome is not None for a in self.journal.attempts.values())
        for stats in self.scheduler.statistics():
            assert (stats.queued, stats.running, stats.held) == (0, 0, 0)


def _pid(attempt: AttemptRow | None) -> int | None:
    return attempt.pid if attempt is not None else None


def _run_id(effect: Effect) -> int:
    if isinstance(effect, Ended):
        return effect.result.run_id
    return effect.run_id


SchedulerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestScheduler = SchedulerMachine.TestCase
