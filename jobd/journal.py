"""The journal: every SQL statement, the schema and its migrations.

``Journal.write`` writes a batch of effects in one transaction, in the order
they were emitted; consecutive effects of the same type go in one
``executemany``, which keeps the order while giving SQLite its batched speed.
The group commit writer that drives it (one task, batches, retries) is
``jobd.groupcommit``.

Failures are classified where apsw's exceptions are translated:

- *transient* (``JournalError``): the disk or the environment (full, I/O
  error, locked, read-only, out of memory). Retrying the same batch can
  succeed once the operator has made room.
- *data* (``JournalDataError``): the batch held something the journal
  refuses (a value it cannot store, a constraint violated by a bug). Retrying
  it as is can never succeed, and one request's bad value must not hold up
  everyone else's: ``write_isolating`` writes the batch again with a
  savepoint per group of runs, commits the innocent ones and reports the
  guilty runs, which the daemon then quarantines.
- *damaged* (``JournalDamagedError``): the file is not a usable database.

Reads never fail for every caller because of one row: JSON columns are
scrubbed of lone surrogates (escaped ``\ud800`` in specs and tags, which
an earlier version let through), and text that is not UTF-8 is read with
replacement characters.

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
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, get_args

import apsw

from jobd import files
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
from jobd.core.model import ACTIVE, TERMINAL, Run, Spec, State, clean_text
from jobd.errors import (
    JournalDamagedError,
    JournalDataError,
    JournalError,
    JournalLockedError,
    JournalVersionError,
)

log = logging.getLogger("jobd.journal")
P = ParamSpec("P")
R = TypeVar("R")

SYNCHRONOUS = ("full", "normal")
CHECKPOINT_PAGES = 1000  # WAL pages (of 4 KiB) added before a background checkpoint starts
CHECKPOINT_PAGES_MAX = 16_000  # WAL pages (~64 MiB) before the writer checkpoints inline
REASON_MAX = 1000  # characters of an exception's text kept in a refused run's reason

# apsw errors that say nothing about the batch: the disk, a lock, the machine.
_TRANSIENT: tuple[type[BaseException], ...] = (
    apsw.BusyError,
    apsw.LockedError,
    apsw.FullError,
    apsw.IOError,
    apsw.CantOpenError,
    apsw.ReadOnlyError,
    apsw.PermissionsError,
    apsw.NoMemError,
    apsw.InterruptError,
    apsw.ProtocolError,  # SQLite's file locking protocol
    apsw.NoLFSError,
    apsw.AbortError,
)
# The file itself is not a usable database.
_DAMAGED: tuple[type[BaseException], ...] = (
    apsw.CorruptError,
    apsw.NotADBError,
    apsw.FormatError,
)

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
class Recovered:
    """What ``Journal.load_active`` finds at start-up."""

    runs: list[Run]
    next_id: int
    unreadable: dict[int, str]  # active runs whose rows cannot be read back: id -> why


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
            except _DAMAGED as exc:
                raise JournalDamagedError(f"{what}: {exc}", hint=_hint_for(exc)) from exc
            except apsw.Error as exc:
                raise JournalError(f"{what}: {exc}", hint=_hint_for(exc)) from exc

        return inner

    return wrap


def _hint_for(exc: BaseException) -> str:
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
        """Write effects and audit entries in one transaction.

        Raises JournalError (transient: retry), JournalDataError (the batch's
        data: retrying cannot help) or JournalDamagedError."""
        self._checkpoint_if_due()
        db = self._db
        try:
            with db:
                _write_effects(db, effects)
                if audit:
                    _write_audit(db, audit)
        except Exception as exc:
            raise _classified(exc) from exc

    def write_isolating(
        self,
        effects: Sequence[Effect],
        audit: Sequence[AuditEntry] = (),
        *,
        units: Sequence[Sequence[int]] = (),
        audit_units: Sequence[Sequence[int]] = (),
    ) -> dict[int, str]:
        """Write a batch; if the journal refuses it for its data, write it again
        with a savepoint per *unit* and leave out the units it refuses.

        Returns the refused runs (run id → why), normally none. ``units`` are
        groups of runs that commit or fail together (the runs one request
        created); a run in no unit is a unit of its own, and overlapping units
        merge. ``audit_units[i]`` names the runs of ``audit[i]``: an audit
        entry of a refused unit is left out with it. Raises JournalError
        (transient) or JournalDamagedError like ``write``."""
        try:
            self.write(effects, audit)
        except JournalDataError as exc:
            log.error("the journal refused a batch (%s); isolating the runs it refuses", exc)
        else:
            return {}
        db = self._db
        refused: dict[int, str] = {}
        try:
            with db:
                for runs, group in _by_unit(effects, units):
                    try:
                        with db:  # a savepoint: a refused unit leaves nothing behind
                            _write_effects(db, group)
                    except _TRANSIENT + _DAMAGED:
                        raise
                    except Exception as exc:
                        reason = _reason(exc)
                        log.error("the journal refused run(s) %s: %s", _ids(runs), reason)
                        refused.update(dict.fromkeys(runs, reason))
                for entry, its_runs in zip(audit, audit_units or [()] * len(audit), strict=True):
                    if any(r in refused for r in its_runs):
                        continue  # its request failed: nothing it did was written
                    try:
                        with db:
                            _write_audit(db, [entry])
                    except _TRANSIENT + _DAMAGED:
                        raise
                    except Exception as exc:
                        log.error("the journal refused an audit entry %r: %s", entry, _reason(exc))
        except Exception as exc:
            raise _classified(exc) from exc
        return refused

    def _checkpoint_if_due(self) -> None:
        if self.wal_pages < self.checkpoint_pages_max:
            return
        try:
            self._db.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
        except apsw.BusyError:
            pass  # a background checkpoint is finishing; the next commit tries again
        except apsw.Error as exc:
            # It must not fail a commit that could succeed; but the WAL
            # grows while it fails, so say so.
            log.warning("checkpoint failed (the WAL keeps growing): %s", exc)

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
    def load_active(self) -> Recovered:
        """Every non-terminal run (for recovery), the next free run id, and the
        active runs whose rows cannot be read back (to be quarantined)."""
        db = self._db
        states = tuple(s.value for s in ACTIVE)
        marks = ",".join("?" * len(states))
        columns = (
            "id, {spec}, {pool}, priority, {name}, {tags}, owner, state, submitted_at,"
            " runs.attempts, lost, cancel_requested, a.pid, a.pid_started"
        )
        sql = (
            "SELECT {columns} FROM runs LEFT JOIN attempts a ON a.run_id = runs.id"
            f" AND a.attempt = runs.attempts WHERE state IN ({marks}) ORDER BY id"
        )
        rows = _fetch_text_safely(db, sql, columns, ("spec", "pool", "name", "tags"), states)
        runs: list[Run] = []
        unreadable: dict[int, str] = {}
        for r in rows:
            try:
                runs.append(
                    Run(
                        id=r[0],
                        spec=Spec.from_json(_load_json(r[1])),
                        pool=r[2],
                        priority=r[3],
                        name=r[4],
                        tags=tuple(_load_json(r[5])) if r[5] else (),
                        owner=r[6],
                        state=State(r[7]),
                        submitted_at=r[8],
                        attempts=r[9],
                        lost=r[10],
                        cancel_requested=bool(r[11]),
                        attempt_pid=r[12],
                        attempt_pid_started=r[13],
                    )
                )
            except Exception as exc:  # one bad row must not stop recovery
                unreadable[r[0]] = f"its journal row cannot be read back: {_reason(exc)}"
        seq = _rows(db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'runs'"))
        return Recovered(runs, int(seq[0][0]) + 1 if seq else 1, unreadable)

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
        sql = "SELECT {columns} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        with self._reading() as db:
            rows = _fetch_text_safely(db, sql, _RUN_COLUMNS, _RUN_TEXT, args)
        return [_run_json(r) for r in rows]

    @_translate("cannot read the journal")
    def run_summaries(self, run_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """id → {state, exit_code, owner, attempts} for the given runs that exist.

        One statement for the whole list (a wait on 10,000 runs is one query,
        not 10,000)."""
        with self._reading() as db:
            rows = _fetch_text_safely(
                db,
                "SELECT {columns} FROM runs WHERE id IN (SELECT value FROM json_each(?))",
                "id, state, exit_code, owner, attempts, {reason}",
                ("reason",),
                (json.dumps(list(run_ids)),),
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
    rows = _fetch_text_safely(
        db, "SELECT {columns} FROM runs WHERE id = ?", _RUN_COLUMNS, _RUN_TEXT, (run_id,)
    )
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
        for a in _fetch_text_safely(
            db,
            "SELECT {columns} FROM attempts WHERE run_id = ? ORDER BY attempt",
            "attempt, started_at, ended_at, {outcome}, exit_code, {error}, {output}, pid",
            ("outcome", "error", "output"),
            (run_id,),
        )
    ]
    return run


def _rows(cursor: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows as plain tuples: column types come from the schema, not from apsw's stubs."""
    return list(cursor)


def _fetch_text_safely(
    db: apsw.Connection, sql: str, columns: str, text: Sequence[str], args: Any
) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (whose ``{columns}`` is ``columns``, whose ``{name}``
    placeholders are the ``text`` columns).

    apsw decodes TEXT strictly: one value that is not UTF-8 (written by another
    tool, or by a bug) would fail the query for every caller. Then the query
    runs again with those columns read as bytes, decoded with replacement."""
    plain = sql.format(columns=columns.format(**{c: c for c in text}))
    try:
        return _rows(db.execute(plain, args))
    except UnicodeDecodeError:
        pass
    raw = sql.format(columns=columns.format(**{c: f"CAST({c} AS BLOB)" for c in text}))
    return [
        tuple(v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in row)
        for row in db.execute(raw, args)
    ]


_RUN_COLUMNS = (
    "id, {name}, {pool}, priority, {state}, {kind}, {spec}, {tags}, owner, submitted_at,"
    " updated_at, attempts, lost, exit_code, {reason}"
)
_RUN_TEXT = ("name", "pool", "state", "kind", "spec", "tags", "reason")


def _run_json(r: Sequence[Any]) -> dict[str, Any]:
    """A run row as the protocol's run object. A row that cannot be read back
    (JSON a bug damaged) still appears, with what can be read and a reason."""
    out: dict[str, Any] = {
        "id": r[0],
        "name": r[1],
        "pool": r[2],
        "priority": r[3],
        "state": r[4],
        "kind": r[5],
        "tags": [],
        "owner": r[8],
        "submitted_at": r[9],
        "updated_at": r[10],
        "attempts": r[11],
        "lost": r[12],
        "exit_code": r[13],
        "reason": r[14],
    }
    try:
        spec = _load_json(r[6])
        spec.pop("kind", None)
        tags = _load_json(r[7]) if r[7] else []
    except Exception as exc:  # one bad row must not fail a whole list
        out["reason"] = f"this run's journal row cannot be read back: {_reason(exc)}"
        return out
    out["tags"] = tags
    out.update(spec)
    return out


# A JSON escape of a UTF-16 surrogate (\ud800): an earlier version stored such
# text in specs and tags. Valid pairs decode to text; lone ones are replaced.
_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")


def _load_json(text: str) -> Any:
    value = json.loads(text)
    if _SURROGATE_ESCAPE_RE.search(text):
        value = _scrubbed(value)
    return value


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    if isinstance(value, dict):
        return {clean_text(k): _scrubbed(v) for k, v in value.items()}
    return value


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


def _write_quarantined(db: apsw.Connection, effects: list[Quarantined]) -> None:
    # Whatever the journal holds of the run: an open attempt is closed, an active
    # run failed (a run whose insert was refused is not there: nothing to do).
    db.executemany(
        "UPDATE attempts SET ended_at = ?, outcome = 'error', error = ?"
        " WHERE run_id = ? AND ended_at IS NULL",
        [(e.at, e.reason, e.run_id) for e in effects],
    )
    db.executemany(
        f"UPDATE runs SET state = 'failed', reason = ?, updated_at = ?"
        f" WHERE id = ? AND state NOT IN ({_TERMINAL_SQL})",
        [(e.reason, e.at, e.run_id) for e in effects],
    )


_TERMINAL_SQL = ",".join(f"'{state.value}'" for state in sorted(TERMINAL))


def _write_nothing(db: apsw.Connection, effects: list[Any]) -> None:
    """Action-only effects (Kill, KillLeftovers) have no journal row."""


# Every effect type has its writer, action-only ones included (explicitly a
# no-op): a new effect can never fall through to "not journaled" unnoticed.
_WRITERS: dict[type, Callable[[apsw.Connection, list[Any]], None]] = {
    Created: _write_created,
    Started: _write_started,
    Ended: _write_ended,
    StateChanged: _write_state_changed,
    Withdrawn: _write_withdrawn,
    CancelRequested: _write_cancel_requested,
    PidRecorded: _write_pid,
    Quarantined: _write_quarantined,
    Kill: _write_nothing,
    KillLeftovers: _write_nothing,
}


def check_writers(writers: Mapping[type, object], effect_types: Iterable[type]) -> None:
    """Raise TypeError unless ``writers`` covers exactly ``effect_types``."""
    missing = set(effect_types) - set(writers)
    extra = set(writers) - set(effect_types)
    if missing or extra:
        names = ", ".join(sorted(t.__name__ for t in missing | extra))
        raise TypeError(
            f"journal writers out of step with jobd.core.effects.Effect ({names}): every"
            " effect type needs an entry in journal._WRITERS (_write_nothing for actions)"
        )


check_writers(_WRITERS, get_args(Effect))  # at import: jobd does not start without it


def _write_effects(db: apsw.Connection, effects: Sequence[Effect]) -> None:
    """In emission order; consecutive effects of one type in one executemany."""
    for kind, group in groupby(effects, type):
        _WRITERS[kind](db, list(group))


def _write_audit(db: apsw.Connection, audit: Sequence[AuditEntry]) -> None:
    db.executemany(
        "INSERT INTO audit (at, uid, pid, action, detail) VALUES (?,?,?,?,?)",
        [(a.at, a.uid, a.pid, a.action, json.dumps(a.detail)) for a in audit],
    )


def _by_unit(
    effects: Sequence[Effect], units: Sequence[Sequence[int]]
) -> list[tuple[list[int], list[Effect]]]:
    """Effects grouped by unit (runs that commit or fail together), each group
    in emission order. Effects of different runs touch different rows, so the
    groups can be written in any order."""
    parent: dict[int, int] = {}

    def root(run_id: int) -> int:
        while (up := parent.setdefault(run_id, run_id)) != run_id:
            run_id = up
        return run_id

    for unit in units:
        for other in unit[1:]:
            a, b = root(other), root(unit[0])
            if a != b:
                parent[a] = b
    groups: dict[int, tuple[list[int], list[Effect]]] = {}
    for effect in effects:
        run_id = effect.run_id
        runs, group = groups.setdefault(root(run_id), ([], []))
        if run_id not in runs:
            runs.append(run_id)
        group.append(effect)
    for unit in units:  # a unit's runs all fail with it, even those without effects
        if unit and (found := groups.get(root(unit[0]))) is not None:
            found[0].extend(r for r in unit if r not in found[0])
    return list(groups.values())


def _classified(exc: Exception) -> JournalError:
    """The JournalError that says what kind of failure ``exc`` is."""
    if isinstance(exc, JournalError):
        return exc
    if isinstance(exc, _TRANSIENT):
        return JournalError(f"journal commit failed: {exc}", hint=_hint_for(exc))
    if isinstance(exc, _DAMAGED):
        return JournalDamagedError(f"journal commit failed: {exc}", hint=_hint_for(exc))
    # Any other apsw error (a constraint, a value SQLite refuses) and any Python
    # error while binding values (text that is not Unicode, an integer out of
    # range): the batch's data, or a bug that produced it.
    return JournalDataError(
        f"the journal refused the batch: {_reason(exc)}",
        hint="this is a bug in jobd (the request's data should have been refused"
        " before it reached the journal); the daemon log names the runs",
    )


def _reason(exc: BaseException) -> str:
    """An exception as text that can itself be journaled (it may quote bad data)."""
    return clean_text(f"{type(exc).__name__}: {exc}", REASON_MAX)


def _ids(runs: Sequence[int]) -> str:
    shown = ", ".join(map(str, runs[:10]))
    return shown + (f" and {len(runs) - 10} more" if len(runs) > 10 else "")


@contextlib.contextmanager
def open_journal(path: str, synchronous: str = "full") -> Iterator[Journal]:
    journal = Journal(path, synchronous)
    try:
        yield journal
    finally:
        journal.close()
