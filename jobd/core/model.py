"""Runs, their states, priorities and specs: plain data shared by every layer."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

ERROR_TEXT_LIMIT = 4000  # characters of an attempt's error text (a callable's message)


class State(enum.StrEnum):
    """Run states (DESIGN.md, "Run lifecycle").

    ``scheduled``, ``waiting``, ``retrying``, ``dead`` and ``skipped`` belong to
    later capabilities (delays, retries, workflows); they are declared here so
    the journal and the protocol already know their names.
    """

    WAITING = "waiting"
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.DEAD, State.CANCELLED, State.SKIPPED})
ACTIVE = frozenset(State) - TERMINAL


class Outcome(enum.StrEnum):
    """How one attempt ended."""

    SUCCEEDED = "succeeded"  # exit status 0 / the callable returned
    FAILED = "failed"  # non-zero exit, killed by a signal, or an exception
    ERROR = "error"  # could not be started at all (no such executable, bad import)
    CANCELLED = "cancelled"  # cancelled by a client while running
    LOST = "lost"  # the daemon died while the attempt ran
    TIMED_OUT = "timed_out"  # reserved for per-attempt timeouts


PRIORITIES: dict[str, int] = {
    "critical": 200,
    "high": 100,
    "normal": 0,
    "low": -100,
    "background": -200,
}
PRIORITY_LIMIT = 1_000_000  # raw integer priorities are accepted within ±this


def priority_value(value: int | str) -> int:
    """Map a priority name or integer to an integer; raise ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("priority must be a name or an integer, not a boolean")
    if isinstance(value, int):
        if -PRIORITY_LIMIT <= value <= PRIORITY_LIMIT:
            return value
        raise ValueError(f"priority {value} is outside ±{PRIORITY_LIMIT}")
    if isinstance(value, str):
        name = value.strip().lower()
        if name in PRIORITIES:
            return PRIORITIES[name]
        try:
            number = int(name)
        except ValueError:
            pass
        else:
            # Outside the try: an out-of-range "2000000" must say so, not that
            # it is an unknown name.
            return priority_value(number)
    names = ", ".join(PRIORITIES)
    raise ValueError(f"unknown priority {value!r}; use one of {names} or an integer")


def priority_name(value: int) -> str:
    for name, number in PRIORITIES.items():
        if number == value:
            return name
    return str(value)


class Kind(enum.StrEnum):
    COMMAND = "command"  # argv, no shell
    SHELL = "shell"  # /bin/sh -c
    CALL = "call"  # "package.module:function" in the pool's threads


@dataclass(frozen=True, slots=True)
class Spec:
    """What to run and how: immutable once a run is created."""

    kind: Kind
    command: tuple[str, ...] = ()
    shell: str = ""
    call: str = ""
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind.value}
        if self.kind is Kind.COMMAND:
            out["command"] = list(self.command)
        elif self.kind is Kind.SHELL:
            out["shell"] = self.shell
        else:
            out["call"] = self.call
            out["args"] = list(self.args)
            out["kwargs"] = self.kwargs
        if self.env:
            out["env"] = self.env
        if self.cwd is not None:
            out["cwd"] = self.cwd
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Spec:
        return cls(
            kind=Kind(data["kind"]),
            command=tuple(data.get("command", ())),
            shell=data.get("shell", ""),
            call=data.get("call", ""),
            args=tuple(data.get("args", ())),
            kwargs=dict(data.get("kwargs", {})),
            env=dict(data.get("env", {})),
            cwd=data.get("cwd"),
        )


@dataclass(frozen=True, slots=True)
class NewRun:
    """A validated submission, before it has an id."""

    spec: Spec
    pool: str = "default"
    priority: int = 0
    name: str | None = None
    tags: tuple[str, ...] = ()
    owner: int = 0  # uid of the submitter


@dataclass(slots=True)
class Run:
    """One execution request. Mutable, owned by the scheduler core."""

    id: int
    spec: Spec
    pool: str
    priority: int
    name: str | None
    tags: tuple[str, ...]
    owner: int
    state: State
    submitted_at: float
    attempts: int = 0  # attempts started so far (the current one while running)
    lost: int = 0  # attempts lost to a daemon crash
    cancel_requested: bool = False
    reason: str | None = None
    # The current attempt's process (its group's leader): pid, and start time
    # in clock ticks after boot, which together name that one process. Known
    # from the journal at recovery only.
    attempt_pid: int | None = None
    attempt_pid_started: int | None = None


@dataclass(frozen=True, slots=True)
class Result:
    """What an executor reports when an attempt ends."""

    run_id: int
    attempt: int
    outcome: Outcome
    ended_at: float
    exit_code: int | None = None
    error: str | None = None
    output: str | None = None  # path of the captured output, if any
    started_at: float | None = None  # when a worker really began (may be after Started.at)


def clean_text(text: str, limit: int | None = None) -> str:
    """``text`` as valid Unicode (lone surrogates replaced), at most ``limit`` characters.

    For text that enters from outside the protocol (a callable's exception, an
    OS error, a row an earlier version wrote): whatever reaches the journal or
    a reply must be encodable, and one run's message must not be megabytes."""
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    try:
        text.encode()
    except UnicodeEncodeError:
        text = _LONE_SURROGATE_RE.sub("\ufffd", text)
    return text


_LONE_SURROGATE_RE = re.compile("[\ud800-\udfff]")
