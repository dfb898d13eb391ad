"""The journal: every SQL statement, the schema and its migrations.

``Journal.write`` writes a batch of effects in one transaction, in the order
they were emitted; consecutive effects of the same type go in one
``executemany``, which keeps the order while giving SQLite its batched speed.
The group commit writer that drives it (one task, batches, retries) is
``jobd.groupcommit``.

Checkpoints
-----------
SQLite's automatic checkpoint runs inside the commit that crosses its
threshold, and with ``synchronous=normal`` that commit then pays for the
fsync of the whole WAL: measured, one submission in 60 waited 11-16 ms for
it (ack p99 ~9 ms against a p50 of ~1 ms). So the writer connection does not
checkpoint by itself (a WAL hook replaces the automatic one and reports the
WAL's size). ``Journal.checkpoint`` runs a PASSIVE checkpoint on a connection
of its own, which the group commit writer starts in another thread every
``checkpoint_pages`` pages, alongside the following commits. Under
sustained load a passive checkpoint never catches up with the writer, so the
WAL cannot start over; once it holds ``checkpoint_pages_max`` pages the
writer checkpoints inline before its next transaction (cheap by then: the
background checkpoints have copied almost everything; background ones pause
meanwhile, as SQLite runs one checkpointer at a time), which bounds the WAL
file as far as readers allow: a reader's snapshot keeps the frames it may
need, and reads here are single short queries.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import apsw

from jobd import files
from jobd.core.effects import (
    CancelRequested,
    Created,
    Effect,
    Ended,
    PidRecorded,
    Started,
    StateChanged,
    Withdrawn,
)
from jobd.core.model import ACTIVE, Run, Spec, State
from jobd.errors import JournalError, JournalLockedError, JournalVersionError

log = logging.getLogger("jobd.journal")
P = ParamSpec("P")
R = TypeVar("R")

SYNCHRONOUS = ("full", "normal")
CHECKPOINT_PAGES = 1000  # WAL pages (of 4 KiB) added before a background checkpoint starts
CHECKPOINT_PAGES_MAX = 16_000  # WAL pages (~64 MiB) before the writer checkpoints inline

# Forward migrations; the schema version is len(MIGRATIONS) (PRAGMA user_version).
MIGRATIONS: list[str] = [
    # 1: runs, attempts, audit.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE runs (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        name         TEXT,
        pool         TEXT NOT NULL,
        priority     INTEGER NOT NULL,
        state        TEXT NOT NULL,
        kind         TEXT NOT NULL,
        spec         TEXT NOT NULL,       -- JSON: command/shell/call, args, env, cwd
        tags         TEXT,                -- JSON array, NULL when empty
        owner        INTEGER NOT NULL,    -- uid of the submitter
        submitted_at REAL NOT NULL,       -- unix time
        updated_at   REAL NOT NULL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        lost         INTEGER NOT NULL DEFAULT 0,  -- attempts lost to a daemon crash
        cancel_requested INTEGER NOT NULL DEFAULT 0,  -- cancelled while running
        exit_code    INTEGER,
        reason       TEXT
    );
    CREATE INDEX runs_state ON runs (state, id);
    CREATE INDEX runs_pool ON runs (pool, id);
    CREATE INDEX runs_name ON runs (name, id) WHERE name IS NOT NULL;
    CREATE TABLE attempts (
        run_id     INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        attempt    INTEGER NOT NULL,
        started_at REAL NOT NULL,
        ended_at   REAL,
        outcome    TEXT,                  -- NULL while running
        exit_code  INTEGER,
        error      TEXT,
        output     TEXT,                  -- path of the captured output
        pid        INTEGER,               -- process group of a command attempt
        PRIMARY KEY (run_id, attempt)
    ) WITHOUT ROWID;
    CREATE TABLE audit (
        id     INTEGER PRIMARY KEY,
        at     REAL NOT NULL,
        uid    INTEGER NOT NULL,
        pid    INTEGER,
        action TEXT NOT NULL,
        detail TEXT NOT NULL              -- JSON
    );
    CREATE INDEX audit_at ON audit (at);
    """,
    # 2: the start time of an attempt's process (group leader), so that recovery
    # can tell that process from any later one that reused its pid.
    """
    ALTER TABLE attempts ADD COLUMN pid_started INTEGER;  -- clock ticks after boot
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: float
    uid: int
    pid: int | None
    action: str
    detail: dict[str, Any]


def _translate(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: apsw.Error never leaves this module."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except apsw.Error as exc:
                raise JournalError(f"{what}: {exc}", hint=_hint_for(exc)) from exc

        return inner

    return wrap


def _hint_for(exc: apsw.Error) -> str:
    if isinstance(exc, apsw.FullError):
        return "the disk holding the journal is full: free space; jobd retries by itself"
    if isinstance(exc, apsw.ReadOnlyError | apsw.CantOpenError | apsw.PermissionsError):
        return "check that the state directory exists and is writable by the daemon's user"
    if isinstance(exc, apsw.CorruptError | apsw.NotADBError):
        return "the journal file is damaged: restore it from a backup"
    if isinstance(exc, apsw.IOError):
        return (
            "the disk refused a write: check free space, the kernel log (dmesg) and"
            " the daemon's file size limit (ulimit -f); jobd retries by itself"
        )
    return "see the daemon log for details"


class StateDirLock:
    """An exclusive ``flock`` on ``<state_dir>/jobd.lock`` for the daemon's lifetime."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "jobd.lock"
        try:
            fd = files.open_private_file(self.path)
            assert fd is not None  # created if missing
            self._fd = fd
        except OSError as exc:
            raise JournalError(
                f"cannot create the lock file {self.path}: {exc.strerror}",
                hint="check that the state directory exists and is writable by the daemon's user",
            ) from exc
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise JournalLockedError(
                f"another jobd (pid {holder}) holds {state_dir}",
                hint="stop that daemon first, or give this one another state directory",
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)


class Journal:
    """Synchronous access to the journal file; the group commit writer drives ``write``."""

    def __init__(
        self,
        path: str,
        synchronous: str = "full",
        *,
        checkpoint_pages: int = CHECKPOINT_PAGES,
        checkpoint_pages_max: int = CHECKPOINT_PAGES_MAX,
    ) -> None:
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}")
        self.path = path
        self.synchronous = synchronous
        self.checkpoint_pages = checkpoint_pages
        self.checkpoint_pages_max = checkpoint_pages_max
        self.wal_pages = 0  # pages in the WAL after the last commit (the WAL hook says)
        # Read connections are pooled, not per thread: trio retires idle worker
        # threads, and a connection per thread leaked two fds per idle spell.
        self._idle_readers: queue.SimpleQueue[apsw.Connection] = queue.SimpleQueue()
        self._readers: list[apsw.Connection] = []  # every one opened, to close them
        self._readers_lock = threading.Lock()
        self._checkpointer: apsw.Connection | None = None
        if path != ":memory:":
            _make_private(Path(path))
        self._db = self._open_writer()
        self.instance = self._meta("instance")

    @_translate("cannot open the journal")
    def _open_writer(self) -> apsw.Connection:
        db = apsw.Connection(self.path)
        db.setbusytimeout(5000)
        mode = db.execute("PRAGMA journal_mode=WAL").fetchall()[0][0]
        if self.path != ":memory:" and mode != "wal":
            raise JournalError(f"{self.path}: could not switch to WAL mode (got {mode})")
        db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        db.execute("PRAGMA foreign_keys=ON")
        self._migrate(db)
        # A WAL hook replaces SQLite's automatic checkpoint (see the module
        # docstring): checkpoints are started by the writer task instead.
        db.setwalhook(self._on_wal)
        return db

    def _on_wal(self, db: apsw.Connection, name: str, pages: int) -> int:
        self.wal_pages = pages
        return apsw.SQLITE_OK

    def _migrate(self, db: apsw.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchall()[0][0]
        assert isinstance(version, int)
        if version > SCHEMA_VERSION:
            raise JournalVersionError(
                f"{self.path} has schema version {version}; this jobd knows up to {SCHEMA_VERSION}",
                hint="run the newer jobd that wrote it, or restore a backup made by this version",
            )
        for number in range(version, SCHEMA_VERSION):
            with db:
                db.execute(MIGRATIONS[number])
                if number == 0:
                    db.execute("INSERT INTO meta VALUES ('instance', lower(hex(randomblob(8))))")
                db.execute(f"PRAGMA user_version={number + 1}")
            log.info("journal %s migrated to schema version %d", self.path, number + 1)

    def _meta(self, key: str) -> str:
        rows = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchall()
        return str(rows[0][0])

    @_translate("cannot read the journal")
    def meta(self, key: str) -> str | None:
        with self._reading() as db:
            rows = _rows(db.execute("SELECT value FROM meta WHERE key = ?", (key,)))
        return str(rows[0][0]) if rows else None

    @_translate("cannot write the journal")
    def set_meta(self, key: str, value: str) -> None:
        """Write one meta value on a connection of its own (any thread; the group
        commit writer's transactions are never shared)."""
        if self.path == ":memory:":
            db = self._db
        else:
            db = apsw.Connection(self.path)
            db.setbusytimeout(5000)
        try:
            with db:
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
        finally:
            if db is not self._db:
                db.close()

    @property
    def schema_version(self) -> int:
        return int(_rows(self._db.execute("PRAGMA user_version"))[0][0])

    # -- writes (writer thread only) -------------------------------------

    def write(self, effects: Sequence[Effect], audit: Sequence[AuditEntry] = ()) -> None:
        """Write effects and audit entries in one transaction. Raises JournalError."""
        db = self._db
        if self.wal_pages >= self.checkpoint_pages_max:
            try:
                db.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
            except apsw.BusyError:
                pass  # a background checkpoint is finishing; the next commit tries again
            except apsw.Error as exc:
                # It must not fail a commit that could succeed; but the WAL
                # grows while it fails, so say so.
                log.warning("checkpoint failed (the WAL keeps growing): %s", exc)
        try:
            with db:
                for kind, group in groupby(effects, type):
                    _writer_for(kind)(db, list(group))
                if audit:
                    db.executemany(
                        "INSERT INTO audit (at, uid, pid, action, detail) VALUES (?,?,?,?,?)",
                        [(a.at, a.uid, a.pid, a.action, json.dumps(a.detail)) for a in audit],
                    )
        except apsw.Error as exc:
            raise JournalError(f"journal commit failed: {exc}", hint=_hint_for(exc)) from exc

    @_translate("checkpoint failed")
    def checkpoint(self) -> tuple[int, int] | None:
        """A PASSIVE checkpoint on a connection of its own, alongside the writer.

        Returns (pages in the WAL, pages copied into the database), or None if
        another checkpoint (the writer's inline one) was running. Run it in one
        thread at a time, never in the writer's."""
        if self._checkpointer is None:
            db = apsw.Connection(self.path)
            db.setbusytimeout(5000)
            db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            self._checkpointer = db
        try:
            pages, copied = self._checkpointer.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
        except apsw.BusyError:
            return None  # one checkpointer at a time: that one does the work
        return pages, copied

    # -- reads (any thread; a pooled connection per query) -------------------

    @contextlib.contextmanager
    def _reading(self) -> Iterator[apsw.Connection]:
        """A read connection for one read, in one transaction (a consistent
        snapshot), returned to the pool after. The pool holds as many
        connections as reads ever ran at once."""
        if self.path == ":memory:":
            yield self._db  # one private database: tests and tools only
            return
        try:
            db = self._idle_readers.get_nowait()
        except queue.Empty:
            db = apsw.Connection(self.path, flags=apsw.SQLITE_OPEN_READONLY)
            db.setbusytimeout(5000)
            with self._readers_lock:
                self._readers.append(db)
        try:
            with db:
                yield db
        finally:
            self._idle_readers.put(db)

    @property
    def read_connections(self) -> int:
        """Read connections opened so far (they are reused, never more than needed)."""
        return len(self._readers)

    @_translate("cannot read the journal")
    def load_active(self) -> tuple[list[Run], int]:
        """Every non-terminal run (for recovery) and the next free run id."""
        db = self._db
        states = tuple(s.value for s in ACTIVE)
        marks = ",".join("?" * len(states))
        rows = _rows(
            db.execute(
                f"SELECT id, spec, pool, priority, name, tags, owner, state, submitted_at,"
                f" runs.attempts, lost, cancel_requested, a.pid, a.pid_started FROM runs"
                f" LEFT JOIN attempts a ON a.run_id = runs.id AND a.attempt = runs.attempts"
                f" WHERE state IN ({marks}) ORDER BY id",
                states,
            )
        )
        runs = [
            Run(
                id=r[0],
                spec=Spec.from_json(json.loads(r[1])),
                pool=r[2],
                priority=r[3],
                name=r[4],
                tags=tuple(json.loads(r[5])) if r[5] else (),
                owner=r[6],
                state=State(r[7]),
                submitted_at=r[8],
                attempts=r[9],
                lost=r[10],
                cancel_requested=bool(r[11]),
                attempt_pid=r[12],
                attempt_pid_started=r[13],
            )
            for r in rows
        ]
        seq = _rows(db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'runs'"))
        return runs, (int(seq[0][0]) + 1 if seq else 1)

    @_translate("cannot read the journal")
    def get_run(self, run_id: int) -> dict[str, Any] | None:
        with self._reading() as db:
            return _run_with_attempts(db, run_id)

    @_translate("cannot read the journal")
    def list_runs(
        self,
        *,
        states: Sequence[str] = (),
        pool: str | None = None,
        name: str | None = None,
        tag: str | None = None,
        owner: int | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Runs newest first; ``before`` is the cursor (a run id, exclusive)."""
        conditions: list[tuple[str, Any]] = [
            ("pool = ?", pool),
            ("name = ?", name),
            (
                "tags IS NOT NULL AND EXISTS (SELECT 1 FROM json_each(runs.tags)"
                " WHERE json_each.value = ?)",
                tag,
            ),
            ("owner = ?", owner),
            ("id < ?", before),
        ]
        where = [f"state IN ({','.join('?' * len(states))})"] if states else []
        args: list[Any] = list(states)
        for condition, value in conditions:
            if value is not None:
                where.append(condition)
                args.append(value)
        sql = f"SELECT {_RUN_COLUMNS} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        with self._reading() as db:
            return [_run_json(r) for r in db.execute(sql, args)]

    @_translate("cannot read the journal")
    def run_summaries(self, run_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """id → {state, exit_code, owner, attempts} for the given runs that exist.

        One statement for the whole list (a wait on 10,000 runs is one query,
        not 10,000)."""
        with self._reading() as db:
            rows = _rows(
                db.execute(
                    "SELECT id, state, exit_code, owner, attempts, reason FROM runs"
                    " WHERE id IN (SELECT value FROM json_each(?))",
                    (json.dumps(list(run_ids)),),
                )
            )
        return {
            row[0]: {
                "id": row[0],
                "state": row[1],
                "exit_code": row[2],
                "owner": row[3],
                "attempts": row[4],
                "reason": row[5],
            }
            for row in rows
        }

    @_translate("cannot read the journal")
    def count_by_state(self) -> dict[str, int]:
        with self._reading() as db:
            return dict(db.execute("SELECT state, count(*) FROM runs GROUP BY state"))

    @_translate("cannot read the journal")
    def audit_entries(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._reading() as db:
            rows = _rows(
                db.execute(
                    "SELECT id, at, uid, pid, action, detail FROM audit ORDER BY id DESC LIMIT ?",
                    (limit,),
                )
            )
        return [
            {
                "id": r[0],
                "at": r[1],
                "uid": r[2],
                "pid": r[3],
                "action": r[4],
                "detail": json.loads(r[5]),
            }
            for r in rows
        ]

    @_translate("integrity check failed")
    def integrity_check(self) -> str:
        return "; ".join(str(r[0]) for r in self._db.execute("PRAGMA integrity_check"))

    def close(self) -> None:
        with self._readers_lock:
            for db in self._readers:
                with contextlib.suppress(apsw.Error):
                    db.close()
            self._readers.clear()
        with contextlib.suppress(apsw.Error):
            if self._checkpointer is not None:
                self._checkpointer.close()
        with contextlib.suppress(apsw.Error):
            self._db.close()


def _make_private(path: Path) -> None:
    """Create the journal file ``0600`` before SQLite does, and tighten one
    (and its ``-wal``/``-shm``) that is more open.

    It holds every run's argv and environment. SQLite creates a new database
    file ``0644`` (less the umask) and gives the ``-wal`` and ``-shm`` files
    it creates the database file's own permission bits, whatever the umask:
    so all three are private once the database file is."""
    try:
        wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
        for name, create in ((path, True), (wal, False), (shm, False)):
            fd = files.open_private_file(name, create=create)
            if fd is not None:
                os.close(fd)
    except OSError as exc:
        raise JournalError(
            f"cannot open the journal {path}: {exc.strerror}",
            hint="check that the state directory exists and is writable by the daemon's user",
        ) from exc


def _run_with_attempts(db: apsw.Connection, run_id: int) -> dict[str, Any] | None:
    rows = db.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchall()
    if not rows:
        return None
    run = _run_json(rows[0])
    run["attempt_list"] = [
        {
            "attempt": a[0],
            "started_at": a[1],
            "ended_at": a[2],
            "outcome": a[3],
            "exit_code": a[4],
            "error": a[5],
            "output": a[6],
            "pid": a[7],
        }
        for a in db.execute(
            "SELECT attempt, started_at, ended_at, outcome, exit_code, error, output, pid"
            " FROM attempts WHERE run_id = ? ORDER BY attempt",
            (run_id,),
        )
    ]
    return run


def _rows(cursor: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows as plain tuples: column types come from the schema, not from apsw's stubs."""
    return list(cursor)


_RUN_COLUMNS = (
    "id, name, pool, priority, state, kind, spec, tags, owner, submitted_at, updated_at,"
    " attempts, lost, exit_code, reason"
)


def _run_json(r: Sequence[Any]) -> dict[str, Any]:
    spec = json.loads(r[6])
    out: dict[str, Any] = {
        "id": r[0],
        "name": r[1],
        "pool": r[2],
        "priority": r[3],
        "state": r[4],
        "kind": r[5],
        "tags": json.loads(r[7]) if r[7] else [],
        "owner": r[8],
        "submitted_at": r[9],
        "updated_at": r[10],
        "attempts": r[11],
        "lost": r[12],
        "exit_code": r[13],
        "reason": r[14],
    }
    spec.pop("kind", None)
    out.update(spec)
    return out


# -- effect writers: one executemany per run of same-type effects ----------


def _write_created(db: apsw.Connection, effects: list[Created]) -> None:
    db.executemany(
        "INSERT INTO runs (id, name, pool, priority, state, kind, spec, tags, owner,"
        " submitted_at, updated_at) VALUES (?,?,?,?,'queued',?,?,?,?,?,?)",
        [
            (
                e.run_id,
                e.name,
                e.pool,
                e.priority,
                e.spec.kind.value,
                _spec_json(e.spec),
                _compact_json(e.tags) if e.tags else None,
                e.owner,
                e.submitted_at,
                e.submitted_at,
            )
            for e in effects
        ],
    )


# One encoder for every row: json.dumps with non-default arguments builds a
# new encoder per call, which costs more than the encoding of a small spec.
_compact_json = json.JSONEncoder(separators=(",", ":")).encode


def _spec_json(spec: Spec) -> str:
    return _compact_json(spec.to_json())


def _write_started(db: apsw.Connection, effects: list[Started]) -> None:
    db.executemany(
        "INSERT INTO attempts (run_id, attempt, started_at) VALUES (?,?,?)",
        [(e.run_id, e.attempt, e.at) for e in effects],
    )
    db.executemany(
        "UPDATE runs SET state = 'running', attempts = ?, updated_at = ? WHERE id = ?",
        [(e.attempt, e.at, e.run_id) for e in effects],
    )


def _write_ended(db: apsw.Connection, effects: list[Ended]) -> None:
    db.executemany(
        "UPDATE attempts SET ended_at = ?, outcome = ?, exit_code = ?, error = ?, output = ?,"
        " started_at = coalesce(?, started_at) WHERE run_id = ? AND attempt = ?",
        [
            (
                r.ended_at,
                r.outcome.value,
                r.exit_code,
                r.error,
                r.output,
                r.started_at,
                r.run_id,
                r.attempt,
            )
            for r in (e.result for e in effects)
        ],
    )
    db.executemany(
        "UPDATE runs SET state = ?, exit_code = ?, reason = ?, updated_at = ? WHERE id = ?",
        [
            (e.state.value, e.result.exit_code, e.reason, e.result.ended_at, e.result.run_id)
            for e in effects
            if e.state is not None
        ],
    )


def _write_state_changed(db: apsw.Connection, effects: list[StateChanged]) -> None:
    db.executemany(
        "UPDATE runs SET state = ?, reason = ?, updated_at = ?, lost = coalesce(?, lost)"
        " WHERE id = ?",
        [(e.state.value, e.reason, e.at, e.lost, e.run_id) for e in effects],
    )


def _write_withdrawn(db: apsw.Connection, effects: list[Withdrawn]) -> None:
    db.executemany(
        "DELETE FROM attempts WHERE run_id = ? AND attempt = ?",
        [(e.run_id, e.attempt) for e in effects],
    )
    db.executemany(
        "UPDATE runs SET state = 'queued', attempts = ?, updated_at = ? WHERE id = ?",
        [(e.attempt - 1, e.at, e.run_id) for e in effects],
    )


def _write_cancel_requested(db: apsw.Connection, effects: list[CancelRequested]) -> None:
    db.executemany(
        "UPDATE runs SET cancel_requested = 1, updated_at = ? WHERE id = ?",
        [(e.at, e.run_id) for e in effects],
    )


def _write_pid(db: apsw.Connection, effects: list[PidRecorded]) -> None:
    db.executemany(
        "UPDATE attempts SET pid = ?, pid_started = ? WHERE run_id = ? AND attempt = ?",
        [(e.pid, e.started, e.run_id, e.attempt) for e in effects],
    )


def _write_nothing(db: apsw.Connection, effects: list[Any]) -> None:
    """Action-only effects (Kill, KillLeftovers) have no journal row."""


_WRITERS: dict[type, Callable[[apsw.Connection, list[Any]], None]] = {
    Created: _write_created,
    Started: _write_started,
    Ended: _write_ended,
    StateChanged: _write_state_changed,
    Withdrawn: _write_withdrawn,
    CancelRequested: _write_cancel_requested,
    PidRecorded: _write_pid,
}


def _writer_for(kind: type) -> Callable[[apsw.Connection, list[Any]], None]:
    return _WRITERS.get(kind, _write_nothing)


@contextlib.contextmanager
def open_journal(path: str, synchronous: str = "full") -> Iterator[Journal]:
    journal = Journal(path, synchronous)
    try:
        yield journal
    finally:
        journal.close()
