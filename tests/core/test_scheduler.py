"""Example-based tests of the scheduler core, one behaviour each.

The stateful test (test_scheduler_stateful.py) explores random histories;
these pin down the exact effects of the cases that matter most.
"""

from __future__ import annotations

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
from jobd.core.model import Kind, NewRun, Outcome, Result, Run, Spec, State, priority_value
from jobd.core.scheduler import (
    MAX_LOST_REQUEUES,
    Cancel,
    Finished,
    LeftoversGone,
    ProcessStarted,
    Quarantine,
    Recover,
    Scheduler,
    Submit,
)

COMMAND = Spec(Kind.COMMAND, command=("true",))
CALL = Spec(Kind.CALL, call="jobd.demo:add", args=(1, 2))


def new(pool: str = "default", priority: int | str = 0, spec: Spec = COMMAND) -> NewRun:
    return NewRun(spec, pool=pool, priority=priority_value(priority))


def started(effects: list[Effect]) -> list[int]:
    return [e.run_id for e in effects if isinstance(e, Started)]


def finish(
    scheduler: Scheduler, run_id: int, attempt: int = 1, outcome: Outcome = Outcome.SUCCEEDED
) -> list[Effect]:
    code = 0 if outcome is Outcome.SUCCEEDED else 1
    result = Result(run_id, attempt, outcome, 10.0, exit_code=code)
    return scheduler.handle(Finished((result,)), 10.0)


def stats(scheduler: Scheduler, pool: str = "default") -> tuple[int, int, int]:
    (s,) = [s for s in scheduler.statistics() if s.name == pool]
    return s.queued, s.running, s.held


def recovered_run(
    run_id: int,
    state: State,
    attempts: int = 0,
    lost: int = 0,
    cancel_requested: bool = False,
    *,
    pid: int | None = 4242,
) -> Run:
    """A run as ``Journal.load_active`` rebuilds it (a running one with its
    attempt's journaled pid, unless ``pid`` is None)."""
    return Run(
        id=run_id,
        spec=COMMAND,
        pool="default",
        priority=0,
        name=None,
        tags=(),
        owner=0,
        state=state,
        submitted_at=1.0,
        attempts=attempts,
        lost=lost,
        cancel_requested=cancel_requested,
        attempt_pid=pid if state is State.RUNNING else None,
    )


def lost_result(run_id: int, attempt: int, at: float) -> Result:
    return Result(
        run_id, attempt, Outcome.LOST, at, error="the daemon stopped while this attempt ran"
    )


def run_order(scheduler: Scheduler, first: list[Effect]) -> list[int]:
    """Finish whatever runs, one at a time, and return the order runs started in."""
    order = started(first)
    pending = list(order)
    while pending:
        run_id = pending.pop(0)
        later = started(finish(scheduler, run_id))
        order += later
        pending += later
    return order


# -- submission and ordering -----------------------------------------------------------


def test_submit_emits_created_in_order_then_starts() -> None:
    scheduler = Scheduler({"default": 1})
    effects = scheduler.handle(Submit((new(), new(), new())), 5.0)
    assert [type(e) for e in effects] == [Created, Created, Created, Started]
    assert [e.run_id for e in effects] == [1, 2, 3, 1]
    assert effects[0] == Created(1, COMMAND, "default", 0, None, (), 0, 5.0)
    assert effects[3] == Started(1, 1, 5.0, "default", COMMAND)
    assert stats(scheduler) == (2, 1, 0)


def test_fifo_within_a_priority() -> None:
    scheduler = Scheduler({"default": 1})
    first = scheduler.handle(Submit(tuple(new() for _ in range(5))), 1.0)
    assert run_order(scheduler, first) == [1, 2, 3, 4, 5]


def test_higher_priority_first_then_submission_order() -> None:
    scheduler = Scheduler({"default": 1})
    first = scheduler.handle(Submit((new(priority=0),)), 1.0)  # takes the only slot
    scheduler.handle(Submit((new(priority=-1), new(priority=5), new(priority=5))), 2.0)
    scheduler.handle(Submit((new(priority=7), new(priority=-1))), 3.0)
    assert run_order(scheduler, first) == [1, 5, 3, 4, 2, 6]


def test_named_priorities() -> None:
    scheduler = Scheduler({"default": 1})
    first = scheduler.handle(Submit((new(priority="normal"),)), 1.0)
    names = ["background", "low", "normal", "high", "critical", "HIGH"]
    scheduler.handle(Submit(tuple(new(priority=name) for name in names)), 2.0)
    # critical(6), high(5), HIGH(7), normal(4), low(3), background(2)
    assert run_order(scheduler, first) == [1, 6, 5, 7, 4, 3, 2]


def test_pools_are_independent() -> None:
    scheduler = Scheduler({"default": 1, "python": 2})
    effects = scheduler.handle(
        Submit((new(), new(), new("python", spec=CALL), new("python", spec=CALL))), 1.0
    )
    assert started(effects) == [1, 3, 4]
    assert [e.pool for e in effects if isinstance(e, Started)] == ["default", "python", "python"]
    assert started(finish(scheduler, 3)) == []  # a python slot frees nothing in default
    assert started(finish(scheduler, 1)) == [2]


# -- finishing ---------------------------------------------------------------------------


def test_outcomes_map_to_states() -> None:
    scheduler = Scheduler({"default": 3})
    scheduler.handle(Submit((new(), new(), new())), 1.0)
    ok = Result(1, 1, Outcome.SUCCEEDED, 2.0, exit_code=0)
    bad = Result(2, 1, Outcome.FAILED, 2.0, exit_code=3, error="exit status 3")
    err = Result(3, 1, Outcome.ERROR, 2.0, error="no such file: true")
    effects = scheduler.handle(Finished((ok, bad, err)), 2.0)
    assert effects == [
        Ended(ok, State.SUCCEEDED, None),
        Ended(bad, State.FAILED, "exit status 3"),
        Ended(err, State.FAILED, "no such file: true"),
    ]
    assert scheduler.runs == {}
    assert stats(scheduler) == (0, 0, 0)


def test_stale_finished_reports_are_ignored() -> None:
    scheduler = Scheduler({"default": 1})
    scheduler.handle(Submit((new(), new())), 1.0)  # 1 running, 2 queued
    assert finish(scheduler, 99) == []  # no such run
    assert finish(scheduler, 1, attempt=2) == []  # not the current attempt
    assert finish(scheduler, 2) == []  # queued, never started
    assert stats(scheduler) == (1, 1, 0)
    assert started(finish(scheduler, 1)) == [2]
    assert finish(scheduler, 1) == []  # already ended
    assert stats(scheduler) == (0, 1, 0)


def test_process_started_records_the_pid_of_the_current_attempt_only() -> None:
    scheduler = Scheduler({"default": 1})
    scheduler.handle(Submit((new(), new())), 1.0)
    assert scheduler.handle(ProcessStarted(1, 1, 4321), 2.0) == [PidRecorded(1, 1, 4321)]
    assert scheduler.handle(ProcessStarted(1, 2, 4321), 2.0) == []
    assert scheduler.handle(ProcessStarted(2, 1, 4321), 2.0) == []  # queued
    assert scheduler.handle(ProcessStarted(7, 1, 4321), 2.0) == []  # unknown


# -- cancelling --------------------------------------------------------------------------


def test_cancelled_queued_run_is_skipped_by_dispatch_and_frees_nothing() -> None:
    scheduler = Scheduler({"default": 1})
    scheduler.handle(Submit((new(), new(), new())), 1.0)
    effects = scheduler.handle(Cancel((2,)), 2.0)
    assert effects == [StateChanged(2, State.CANCELLED, 2.0, "cancelled while queued")]
    assert scheduler.cancel_results == {2: "cancelled"}
    assert stats(scheduler) == (1, 1, 0)  # still one running; only run 3 waits
    # Lazy deletion: the cancelled entry is popped and skipped, run 3 starts.
    assert started(finish(scheduler, 1)) == [3]
    assert scheduler.handle(Cancel((2,)), 3.0) == []
    assert scheduler.cancel_results == {2: "unknown"}


def test_cancelled_running_callable_holds_its_slot_until_it_returns() -> None:
    scheduler = Scheduler({"python": 1})
    scheduler.handle(Submit((new("python", spec=CALL), new("python", spec=CALL))), 1.0)
    effects = scheduler.handle(Cancel((1,)), 2.0)
    ended = [e for e in effects if isinstance(e, Ended)]
    assert len(ended) == 1
    assert ended[0].state is State.CANCELLED
    assert ended[0].result.outcome is Outcome.CANCELLED
    assert (ended[0].result.run_id, ended[0].result.attempt) == (1, 1)
    assert started(effects) == []  # the thread still runs the call: no free slot
    assert scheduler.cancel_results == {1: "cancelled"}
    assert stats(scheduler, "python") == (1, 0, 1)
    assert 1 not in scheduler.runs

    # The call returns: no second Ended, the slot goes to the next run.
    effects = finish(scheduler, 1)
    assert effects == [Started(2, 1, 10.0, "python", CALL)]
    assert stats(scheduler, "python") == (0, 1, 0)
    assert finish(scheduler, 1) == []  # and a duplicate report is stale


def test_cancel_running_command_journals_the_request_kills_once_and_ends_cancelled() -> None:
    scheduler = Scheduler({"default": 1})
    scheduler.handle(Submit((new(), new())), 1.0)
    # The request is journaled in the same transaction, before the Kill is carried out.
    assert scheduler.handle(Cancel((1,)), 2.0) == [CancelRequested(1, 2.0), Kill(1, 1)]
    assert scheduler.cancel_results == {1: "cancelling"}
    assert scheduler.runs[1].cancel_requested
    assert scheduler.handle(Cancel((1,)), 3.0) == []  # no second request, no second Kill
    assert scheduler.cancel_results == {1: "cancelling"}
    assert stats(scheduler) == (1, 1, 0)  # the process still holds the slot

    killed = Result(1, 1, Outcome.FAILED, 4.0, exit_code=-15, error="killed by SIGTERM")
    effects = scheduler.handle(Finished((killed,)), 4.0)
    assert effects[0] == Ended(
        Result(1, 1, Outcome.CANCELLED, 4.0, exit_code=-15, error="killed by SIGTERM"),
        State.CANCELLED,
        "cancelled while running",
    )
    assert started(effects) == [2]


def test_cancelled_command_that_exits_zero_anyway_ends_cancelled() -> None:
    scheduler = Scheduler({"default": 1})
    scheduler.handle(Submit((new(),)), 1.0)
    scheduler.handle(Cancel((1,)), 2.0)
    (effect,) = finish(scheduler, 1)
    assert isinstance(effect, Ended)
    assert effect.state is State.CANCELLED
    assert effect.result.outcome is Outcome.SUCCEEDED  # the attempt itself did succeed


def test_cancel_mixed_batch_reports_each_id() -> None:
    scheduler = Scheduler({"default": 1, "python": 1})
    scheduler.handle(Submit((new(), new(), new("python", spec=CALL))), 1.0)
    finish(scheduler, 1)  # 2 starts
    scheduler.handle(Submit((new(),)), 2.0)  # 4 queued
    effects = scheduler.handle(Cancel((4, 2, 3, 1, 99)), 3.0)
    assert effects[:3] == [
        StateChanged(4, State.CANCELLED, 3.0, "cancelled while queued"),
        CancelRequested(2, 3.0),
        Kill(2, 1),
    ]
    ended, kill = effects[3:]  # the callable ends at once
    assert isinstance(ended, Ended)
    assert (ended.result.run_id, ended.state) == (3, State.CANCELLED)
    assert kill == Kill(3, 1)
    assert scheduler.cancel_results == {
        4: "cancelled",
        2: "cancelling",
        3: "cancelled",
        1: "unknown",  # terminal: the daemon asks the journal
        99: "unknown",
    }


# -- pools that are not configured --------------------------------------------------


def test_run_in_an_unconfigured_pool_waits_instead_of_being_dropped() -> None:
    scheduler = Scheduler({"default": 2})
    effects = scheduler.handle(Submit((new("gpu"),)), 1.0)
    assert [type(e) for e in effects] == [Created]
    (gpu,) = [s for s in scheduler.statistics() if s.name == "gpu"]
    assert (gpu.workers, gpu.configured, gpu.queued, gpu.running) == (0, False, 1, 0)
    assert scheduler.runs[1].state is State.QUEUED
    assert started(scheduler.handle(Submit((new(),)), 2.0)) == [2]  # others unaffected
    assert scheduler.handle(Cancel((1,)), 3.0) == [
        StateChanged(1, State.CANCELLED, 3.0, "cancelled while queued")
    ]


def test_recovered_run_in_a_removed_pool_waits() -> None:
    run = recovered_run(1, State.QUEUED)
    run.pool = "gone"
    scheduler = Scheduler({"default": 1})
    assert scheduler.handle(Recover((run,), 2), 5.0) == []
    assert scheduler.runs[1].state is State.QUEUED


def test_draining_starts_nothing() -> None:
    scheduler = Scheduler({"default": 1})
    scheduler.handle(Submit((new(), new())), 1.0)
    scheduler.draining = True
    assert started(finish(scheduler, 1)) == []
    assert stats(scheduler) == (1, 0, 0)


# -- recovery -------------------------------------------------------------------------


def test_recovery_fences_an_interrupted_command_until_its_leftovers_are_gone() -> None:
    scheduler = Scheduler({"default": 2})
    runs = (recovered_run(3, State.RUNNING, attempts=1), recovered_run(5, State.QUEUED))
    effects = scheduler.handle(Recover(runs, 8), 50.0)
    # Nothing is journaled for run 3 yet: until its leftovers are known dead the
    # journal keeps it running, so a crash now finds the same attempt again.
    assert effects == [KillLeftovers(3, 1, 4242), Started(5, 1, 50.0, "default", COMMAND)]
    assert scheduler.fenced == {3: 1}
    assert stats(scheduler) == (0, 1, 0)  # fenced runs take no slot
    # Reports about the fenced attempt are stale: only LeftoversGone moves it on.
    assert finish(scheduler, 3) == []
    assert scheduler.handle(ProcessStarted(3, 1, 999), 50.5) == []
    assert scheduler.handle(LeftoversGone(((3, 2),)), 50.7) == []  # another attempt

    effects = scheduler.handle(LeftoversGone(((3, 1),)), 51.0)
    assert effects == [
        Ended(lost_result(3, 1, 51.0), None),
        StateChanged(3, State.QUEUED, 51.0, "re-queued after attempt 1 was lost", lost=1),
        Started(3, 2, 51.0, "default", COMMAND),
    ]
    assert scheduler.fenced == {}
    # Ids continue where the journal left off.
    assert [e.run_id for e in scheduler.handle(Submit((new(),)), 52.0)] == [8]


def test_an_attempt_that_never_began_is_undone_not_lost() -> None:
    # The daemon journaled attempt 2's start and died before spawning it: no pid
    # journaled, no process found. It was not tried; the run goes on, lost once.
    scheduler = Scheduler({"default": 1})
    runs = (recovered_run(1, State.RUNNING, attempts=2, lost=1, pid=None),)
    assert scheduler.handle(Recover(runs, 2), 5.0) == [KillLeftovers(1, 2)]
    effects = scheduler.handle(LeftoversGone(((1, 2),)), 6.0)
    assert effects == [Withdrawn(1, 2, 6.0), Started(1, 2, 6.0, "default", COMMAND)]
    run = scheduler.runs[1]
    assert (run.attempts, run.lost) == (2, 1)


def test_an_attempt_whose_process_was_found_counts_even_without_a_journaled_pid() -> None:
    # Spawned, but the daemon died before the pid was journaled: it began.
    scheduler = Scheduler({"default": 1})
    runs = (recovered_run(1, State.RUNNING, attempts=1, pid=None),)
    scheduler.handle(Recover(runs, 2), 5.0)
    effects = scheduler.handle(LeftoversGone(((1, 1),), frozenset({(1, 1)})), 6.0)
    assert effects[0] == Ended(lost_result(1, 1, 6.0), None)


def test_a_cancelled_attempt_that_never_began_ends_cancelled() -> None:
    scheduler = Scheduler({"default": 1})
    runs = (recovered_run(1, State.RUNNING, attempts=1, cancel_requested=True, pid=None),)
    scheduler.handle(Recover(runs, 2), 5.0)
    effects = scheduler.handle(LeftoversGone(((1, 1),)), 6.0)
    assert effects == [Withdrawn(1, 1, 6.0), StateChanged(1, State.CANCELLED, 6.0, "cancelled")]
    assert scheduler.runs == {}


def test_an_interrupted_callable_is_closed_as_lost_at_once() -> None:
    scheduler = Scheduler({"python": 1})
    run = recovered_run(4, State.RUNNING, attempts=1)
    run.spec, run.pool = CALL, "python"
    effects = scheduler.handle(Recover((run,), 5), 50.0)
    # Its thread died with the daemon: nothing to kill, nothing to wait for.
    assert effects == [
        Ended(lost_result(4, 1, 50.0), None),
        StateChanged(4, State.QUEUED, 50.0, "re-queued after attempt 1 was lost", lost=1),
        Started(4, 2, 50.0, "python", CALL),
    ]
    assert scheduler.fenced == {}


def test_a_run_whose_leftovers_were_gone_queues_behind_older_runs() -> None:
    scheduler = Scheduler({"default": 1})
    runs = (recovered_run(1, State.QUEUED), recovered_run(2, State.RUNNING, attempts=1))
    effects = scheduler.handle(Recover(runs, 3), 50.0)
    assert effects[0] == KillLeftovers(2, 1, 4242)
    assert started(effects) == [1]
    scheduler.handle(LeftoversGone(((2, 1),)), 51.0)
    # Run 1 is older: it has the slot; the interrupted run 2 waits behind it.
    assert scheduler.runs[2].state is State.QUEUED


def test_a_run_lost_twice_fails() -> None:
    assert MAX_LOST_REQUEUES == 1
    scheduler = Scheduler({"default": 1})
    scheduler.handle(Recover((recovered_run(1, State.RUNNING, attempts=1),), 2), 5.0)
    effects = scheduler.handle(LeftoversGone(((1, 1),)), 5.0)
    assert started(effects) == [1]
    run = scheduler.runs[1]
    assert (run.attempts, run.lost) == (2, 1)

    # The daemon dies again during attempt 2: the second loss is counted too,
    # and the run fails instead of being re-queued.
    again = Scheduler({"default": 1})
    runs = (recovered_run(1, State.RUNNING, attempts=2, lost=1),)
    assert again.handle(Recover(runs, 2), 9.0) == [KillLeftovers(1, 2, 4242)]
    effects = again.handle(LeftoversGone(((1, 2),)), 9.0)
    assert effects == [
        Ended(lost_result(1, 2, 9.0), None),
        StateChanged(1, State.FAILED, 9.0, "attempt 2 lost (2 lost)", lost=2),
    ]
    assert again.runs == {}
    assert stats(again) == (0, 0, 0)


def test_a_cancel_requested_before_a_crash_ends_the_run_cancelled_at_recovery() -> None:
    scheduler = Scheduler({"default": 1})
    scheduler.handle(Submit((new(),)), 1.0)
    assert scheduler.handle(Cancel((1,)), 2.0) == [CancelRequested(1, 2.0), Kill(1, 1)]

    # The daemon dies before the process exits; the journal has the request.
    # A free slot and a queued run: the cancelled run must not take the slot.
    recovered = Scheduler({"default": 1})
    runs = (
        recovered_run(1, State.RUNNING, attempts=1, cancel_requested=True),
        recovered_run(2, State.QUEUED),
    )
    effects = recovered.handle(Recover(runs, 3), 9.0)
    assert effects == [KillLeftovers(1, 1, 4242), Started(2, 1, 9.0, "default", COMMAND)]
    effects = recovered.handle(LeftoversGone(((1, 1),)), 9.5)
    assert effects == [
        Ended(lost_result(1, 1, 9.5), None),
        StateChanged(
            1, State.CANCELLED, 9.5, "cancelled; the daemon stopped before it exited", lost=1
        ),
    ]
    assert 1 not in recovered.runs
    assert stats(recovered) == (0, 1, 0)
    # It is gone from the scheduler: a late report or cancel changes nothing.
    assert finish(recovered, 1) == []
    assert recovered.handle(Cancel((1,)), 10.0) == []
    assert recovered.cancel_results == {1: "unknown"}


def test_a_fenced_run_can_be_cancelled_and_ends_cancelled_once_its_leftovers_are_gone() -> None:
    scheduler = Scheduler({"default": 1})
    scheduler.handle(Recover((recovered_run(1, State.RUNNING, attempts=1),), 2), 5.0)
    # Journaled (a crash now still ends it cancelled); no Kill: nothing executes it.
    assert scheduler.handle(Cancel((1,)), 6.0) == [CancelRequested(1, 6.0)]
    assert scheduler.cancel_results == {1: "cancelling"}
    assert scheduler.handle(Cancel((1,)), 6.5) == []
    effects = scheduler.handle(LeftoversGone(((1, 1),)), 7.0)
    assert [type(e) for e in effects] == [Ended, StateChanged]
    assert effects[1] == StateChanged(
        1, State.CANCELLED, 7.0, "cancelled; the daemon stopped before it exited", lost=1
    )


def test_a_cancel_requested_before_a_second_crash_still_ends_cancelled_not_failed() -> None:
    scheduler = Scheduler({"default": 1})
    runs = (recovered_run(1, State.RUNNING, attempts=2, lost=1, cancel_requested=True),)
    assert scheduler.handle(Recover(runs, 2), 9.0) == [KillLeftovers(1, 2, 4242)]
    effects = scheduler.handle(LeftoversGone(((1, 2),)), 9.0)
    assert effects == [
        Ended(lost_result(1, 2, 9.0), None),
        StateChanged(
            1, State.CANCELLED, 9.0, "cancelled; the daemon stopped before it exited", lost=2
        ),
    ]
    assert scheduler.runs == {}
    assert stats(scheduler) == (0, 0, 0)


# -- quarantine: the journal refused a run's change -------------------------------------


def test_quarantine_fails_a_queued_run_and_frees_nothing_else() -> None:
    scheduler = Scheduler({"default": 1})
    scheduler.handle(Submit((new(), new(), new())), 1.0)
    effects = scheduler.handle(Quarantine((2,), "refused: bad"), 2.0)
    assert effects == [Quarantined(2, 2.0, "refused: bad")]
    assert stats(scheduler) == (1, 1, 0)
    # The queued run 2 is skipped: 3 starts after 1.
    assert started(finish(scheduler, 1)) == [3]


def test_quarantine_of_an_executing_attempt_stops_it_and_holds_its_slot() -> None:
    scheduler = Scheduler({"default": 1})
    scheduler.handle(Submit((new(), new())), 1.0)
    effects = scheduler.handle(Quarantine((1,), "refused", frozenset({(1, 1)})), 2.0)
    assert effects == [Quarantined(1, 2.0, "refused"), Kill(1, 1)]
    assert stats(scheduler) == (1, 0, 1)  # run 2 waits until the killed attempt is reported
    assert started(finish(scheduler, 1)) == [2]


def test_quarantine_of_an_attempt_never_handed_over_frees_its_slot_at_once() -> None:
    scheduler = Scheduler({"default": 1})
    scheduler.handle(Submit((new(), new())), 1.0)
    effects = scheduler.handle(Quarantine((1,), "refused"), 2.0)
    assert effects == [Quarantined(1, 2.0, "refused"), Started(2, 1, 2.0, "default", COMMAND)]


def test_quarantine_of_a_run_memory_no_longer_holds_still_closes_it_in_the_journal() -> None:
    scheduler = Scheduler({"default": 1})
    scheduler.handle(Submit((new(),)), 1.0)
    finish(scheduler, 1)  # its end is what the journal refused
    assert scheduler.handle(Quarantine((1,), "refused"), 2.0) == [Quarantined(1, 2.0, "refused")]


def test_quarantine_of_a_fenced_run_unfences_it() -> None:
    scheduler = Scheduler({"default": 1})
    scheduler.handle(Recover((recovered_run(1, State.RUNNING, attempts=1),), 2), 5.0)
    assert scheduler.handle(Quarantine((1,), "refused"), 6.0) == [Quarantined(1, 6.0, "refused")]
    assert scheduler.fenced == {}
    assert scheduler.handle(LeftoversGone(((1, 1),)), 7.0) == []


def test_recovery_never_lowers_next_id() -> None:
    scheduler = Scheduler({"default": 1})
    scheduler.handle(Submit((new(), new())), 1.0)
    scheduler.handle(Recover((), 1), 2.0)
    assert [e.run_id for e in scheduler.handle(Submit((new(),)), 3.0)][:1] == [3]
