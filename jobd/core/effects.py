"""Effects: what the scheduler core decided, for the daemon to journal and act on.

Effects carry immutable values only, because the journal writer serialises
them in a worker thread while the event loop goes on mutating ``Run`` objects.

Journal effects (``Created``, ``Started``, ``Ended``, ``StateChanged``,
``Withdrawn``, ``CancelRequested``, ``PidRecorded``, ``Quarantined``) are written
in one group-committed transaction; action effects (``Started`` again,
``Kill``, ``KillLeftovers``) are carried out only after the transaction holding
the effects emitted with them has committed. Every effect names its run
(``run_id``): the journal isolates a batch it refuses run by run.
That ordering is the whole durability promise: no run starts, and no client
hears about a change, before the journal has it.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobd.core.model import Result, Spec, State


@dataclass(frozen=True, slots=True)
class Created:
    """A new run (journal: insert)."""

    run_id: int
    spec: Spec
    pool: str
    priority: int
    name: str | None
    tags: tuple[str, ...]
    owner: int
    submitted_at: float


@dataclass(frozen=True, slots=True)
class Started:
    """An attempt begins (journal: attempt row, run running; action: execute)."""

    run_id: int
    attempt: int
    at: float
    pool: str
    spec: Spec


@dataclass(frozen=True, slots=True)
class Ended:
    """An attempt ended (journal: close the attempt; set the run's state if given)."""

    result: Result
    state: State | None  # None: the run stays active (e.g. re-queued after a loss)
    reason: str | None = None

    @property
    def run_id(self) -> int:
        return self.result.run_id


@dataclass(frozen=True, slots=True)
class StateChanged:
    """A run changed state outside an attempt (cancelled while queued, re-queued)."""

    run_id: int
    state: State
    at: float
    reason: str | None = None
    lost: int | None = None  # new lost-attempt count, when it changed


@dataclass(frozen=True, slots=True)
class CancelRequested:
    """A running attempt is being stopped because a client cancelled its run."""

    run_id: int
    at: float


@dataclass(frozen=True, slots=True)
class Withdrawn:
    """An attempt handed to an executor that never began it (the daemon is
    stopping): it is undone, and the run is queued again, not lost."""

    run_id: int
    attempt: int
    at: float


@dataclass(frozen=True, slots=True)
class PidRecorded:
    """A command's process (group leader): its pid and start time (clock ticks
    after boot, None if unknown), so a restart can find exactly that process."""

    run_id: int
    attempt: int
    pid: int
    started: int | None = None


@dataclass(frozen=True, slots=True)
class Quarantined:
    """The journal refused a change to this run (a bug, or a value that slipped
    past validation): whatever the journal holds of it is closed as failed with
    ``reason`` (journal: end an open attempt, fail the run if still active)."""

    run_id: int
    at: float
    reason: str


@dataclass(frozen=True, slots=True)
class Kill:
    """Stop a running attempt (action): its process group, TERM then KILL."""

    run_id: int
    attempt: int


@dataclass(frozen=True, slots=True)
class KillLeftovers:
    """Kill whatever survives of an attempt lost in a crash, before any retry (action).

    ``pid`` and ``pid_started`` (clock ticks after boot) name the journaled
    leader of the attempt's process group, if the daemon lived long enough
    to record it."""

    run_id: int
    attempt: int
    pid: int | None = None
    pid_started: int | None = None


Effect = (
    Created
    | Started
    | Ended
    | StateChanged
    | Withdrawn
    | CancelRequested
    | PidRecorded
    | Quarantined
    | Kill
    | KillLeftovers
)
