"""The journal: one suite over every storage mode, migrations, and group commit."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import apsw
import pytest
import trio
import trio.testing

from jobd.core.effects import Created, Effect, Ended, PidRecorded, Started, StateChanged
from jobd.core.model import Kind, Outcome, Result, Spec, State
from jobd.errors import JournalError, JournalLockedError, JournalVersionError
from jobd.groupcommit import GroupCommitter
from jobd.journal import (
    MIGRATIONS,
    SCHEMA_VERSION,
    AuditEntry,
    Journal,
    StateDirLock,
)

SPEC = Spec(Kind.COMMAND, command=("echo", "hi"), env={"A": "1"}, cwd="/tmp")
CALL = Spec(Kind.CALL, call="jobd.demo:add", args=(1, 2), kwargs={"x": [1]})


@pytest.fixture(params=["memory", "wal-file"])
def journal(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Journal]:
    path = ":memory:" if request.param == "memory" else str(tmp_path / "journal.db")
    j = Journal(path, "normal")
    yield j
    j.close()


def created(run_id: int, spec: Spec = SPEC, **kw: object) -> Created:
    fields: dict[str, object] = {
        "pool": "default",
        "priority": 0,
        "name": None,
        "tags": (),
        "owner": 1000,
        "submitted_at": 100.0 + run_id,
    }
    fields.update(kw)
    return Created(run_id, spec, **fields)  # type: ignore[arg-type]


def test_fresh_journal_is_at_the_current_schema(journal: Journal) -> None:
    assert journal.schema_version == SCHEMA_VERSION
    assert len(journal.instance) == 16
    assert journal.integrity_check() == "ok"


def test_lifecycle_round_trip(journal: Journal) -> None:
    journal.write(
        [created(1, tags=("a", "b"), name="n"), created(2, CALL, pool="python")],
        [AuditEntry(1.0, 1000, 42, "submit", {"runs": 2})],
    )
    journal.write([Started(1, 1, 200.0, "default", SPEC), PidRecorded(1, 1, 4321)])
    journal.write(
        [
            Ended(
                Result(
                    1,
                    1,
                    Outcome.FAILED,
                    201.0,
                    exit_code=3,
                    error="exited 3",
                    output="/x.log",
                    started_at=200.5,
                ),
                State.FAILED,
                "exited 3",
            )
        ]
    )
    run = journal.get_run(1)
    assert run is not None
    assert (run["state"], run["exit_code"], run["reason"]) == ("failed", 3, "exited 3")
    assert run["command"] == ["echo", "hi"] and run["env"] == {"A": "1"} and run["cwd"] == "/tmp"
    assert run["tags"] == ["a", "b"] and run["name"] == "n" and run["owner"] == 1000
    [attempt] = run["attempt_list"]
    assert attempt == {
        "attempt": 1,
        "started_at": 200.5,
        "ended_at": 201.0,
        "outcome": "failed",
        "exit_code": 3,
        "error": "exited 3",
        "output": "/x.log",
        "pid": 4321,
    }
    call = journal.get_run(2)
    assert call is not None
    assert (call["kind"], call["call"], call["args"], call["kwargs"]) == (
        "call",
        "jobd.demo:add",
        [1, 2],
        {"x": [1]},
    )
    assert journal.get_run(3) is None
    assert journal.audit_entries() == [
        {"id": 1, "at": 1.0, "uid": 1000, "pid": 42, "action": "submit", "detail": {"runs": 2}}
    ]


def test_effects_keep_their_order_within_one_transaction(journal: Journal) -> None:
    # Recovery emits: close the lost attempt, re-queue, start again: one batch.
    journal.write([created(1), Started(1, 1, 1.0, "default", SPEC)])
    journal.write(
        [
            Ended(Result(1, 1, Outcome.LOST, 2.0), None),
            StateChanged(1, State.QUEUED, 2.0, "re-queued", lost=1),
            Started(1, 2, 2.0, "default", SPEC),
        ]
    )
    run = journal.get_run(1)
    assert run is not None
    assert (run["state"], run["attempts"], run["lost"]) == ("running", 2, 1)
    assert [a["outcome"] for a in run["attempt_list"]] == ["lost", None]


def test_load_active_rebuilds_runs_and_next_id(journal: Journal) -> None:
    journal.write([created(i) for i in (1, 2, 3)] + [Started(2, 1, 5.0, "default", SPEC)])
    journal.write([StateChanged(3, State.CANCELLED, 6.0, "cancelled")])
    found = journal.load_active()
    runs, next_id = found.runs, found.next_id
    assert found.unreadable == {}
    assert [(r.id, r.state, r.attempts) for r in runs] == [
        (1, State.QUEUED, 0),
        (2, State.RUNNING, 1),
    ]
    assert runs[0].spec == SPEC
    assert next_id == 4


def test_list_filters_and_cursor(journal: Journal) -> None:
    journal.write(
        [created(i, tags=("even",) if i % 2 == 0 else (), name=f"job{i % 3}") for i in range(1, 11)]
    )
    journal.write([Started(4, 1, 1.0, "default", SPEC)])
    assert [r["id"] for r in journal.list_runs(limit=3)] == [10, 9, 8]
    assert [r["id"] for r in journal.list_runs(before=8, limit=3)] == [7, 6, 5]
    assert [r["id"] for r in journal.list_runs(tag="even")] == [10, 8, 6, 4, 2]
    assert [r["id"] for r in journal.list_runs(states=["running"])] == [4]
    assert [r["id"] for r in journal.list_runs(name="job0")] == [9, 6, 3]
    assert journal.list_runs(pool="nope") == []
    assert journal.count_by_state() == {"queued": 9, "running": 1}
    assert set(journal.run_summaries([4, 99])) == {4}


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "j.db")
    Journal(path).close()
    db = apsw.Connection(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(JournalVersionError, match="schema version") as info:
        Journal(path)
    assert info.value.hint


def test_unusable_file_is_a_journal_error_with_a_hint(tmp_path: Path) -> None:
    bad = tmp_path / "j.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JournalError) as info:
        Journal(str(bad))
    assert "damaged" in (info.value.hint or "") or "not a database" in str(info.value)


def test_state_dir_lock_names_the_holder(tmp_path: Path) -> None:
    lock = StateDirLock(tmp_path)
    with pytest.raises(JournalLockedError, match=r"another jobd \(pid \d+\)"):
        StateDirLock(tmp_path)
    lock.release()
    StateDirLock(tmp_path).release()


async def test_group_commit_batches_concurrent_adds(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "j.db"), "normal")
    committed: list[list[Effect]] = []
    writer = GroupCommitter(journal, lambda batch: committed.append(batch.effects))
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        # Many adds before the writer runs: one transaction, one post-commit call.
        batches = [writer.add([created(i)]) for i in range(1, 101)]
        assert len({id(b) for b in batches}) == 1
        await batches[0].committed.wait()
        assert writer.statistics().commits == 1
        assert [e.run_id for e in committed[0]] == list(range(1, 101))  # type: ignore[union-attr]
        # Idle: the next add is its own commit.
        await writer.add([created(101)]).committed.wait()
        assert writer.statistics().commits == 2
        writer.close()
    assert journal.count_by_state() == {"queued": 101}
    journal.close()


class FullDiskJournal(Journal):
    """A journal whose commits fail like a full disk until ``failing`` is cleared."""

    def __init__(self, path: str) -> None:
        super().__init__(path, "normal")
        self.failing = True
        self.attempts = threading.Semaphore(0)

    def write(self, effects: Sequence[Effect], audit: Sequence[AuditEntry] = ()) -> None:
        if self.failing:
            self.attempts.release()
            raise JournalError("journal commit failed: database or disk is full")
        super().write(effects, audit)


async def test_failed_commit_is_retried_and_marks_the_writer_unhealthy(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    journal = FullDiskJournal(str(tmp_path / "j.db"))
    writer = GroupCommitter(journal, lambda batch: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        batch = writer.add([created(1)])
        for _ in range(3):  # the same batch is tried again and again, with backoff
            await trio.to_thread.run_sync(journal.attempts.acquire)
        assert not writer.healthy and "full" in (writer.last_error or "")
        assert not batch.committed.is_set()  # nothing acknowledged that is not durable
        # ...but its requesters need not hang until the disk has room: the batch
        # is settled (failed for now, kept and retried).
        assert batch.settled.is_set()
        journal.failing = False
        await batch.committed.wait()
        assert writer.healthy and writer.last_error is None
        assert writer.statistics().failed_commits >= 3
        writer.close()
    assert journal.get_run(1) is not None
    journal.close()


def test_commits_do_not_checkpoint_by_themselves(tmp_path: Path) -> None:
    # The writer connection must not run SQLite's automatic checkpoint inside
    # a commit (its fsync was the submit ack p99): the WAL keeps every page
    # until a checkpoint is asked for.
    path = str(tmp_path / "j.db")
    journal = Journal(path, "normal", checkpoint_pages=10, checkpoint_pages_max=10**9)
    for i in range(1, 401):
        journal.write([created(i)])
    assert journal.wal_pages > 1000  # past SQLite's default autocheckpoint threshold
    assert journal.checkpoint() == (journal.wal_pages, journal.wal_pages)
    journal.close()


def test_writer_checkpoints_inline_when_the_wal_reaches_its_bound(tmp_path: Path) -> None:
    # No background checkpoint ever runs here (no GroupCommitter): the bound
    # alone keeps the WAL from growing without end under sustained writes.
    path = str(tmp_path / "j.db")
    journal = Journal(path, "normal", checkpoint_pages=10, checkpoint_pages_max=50)
    seen = []
    for i in range(1, 401):
        journal.write([created(i)])
        seen.append(journal.wal_pages)
    assert max(seen) < 60
    assert seen.count(min(seen)) > 1  # the WAL started over, more than once
    assert journal.count_by_state() == {"queued": 400}
    assert journal.integrity_check() == "ok"
    journal.close()


async def test_group_committer_checkpoints_in_the_background(tmp_path: Path) -> None:
    path = str(tmp_path / "j.db")
    journal = Journal(path, "normal", checkpoint_pages=20, checkpoint_pages_max=10**9)
    writer = GroupCommitter(journal, lambda batch: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for i in range(1, 201):
            await writer.add([created(i)]).committed.wait()
        writer.close()
    # run() returned only after its last checkpoint finished.
    assert writer.statistics().checkpoints >= 1
    assert journal.count_by_state() == {"queued": 200}
    assert journal.integrity_check() == "ok"
    journal.close()


def test_memory_journal_has_no_wal_to_checkpoint() -> None:
    journal = Journal(":memory:", "normal", checkpoint_pages=1, checkpoint_pages_max=2)
    for i in range(1, 21):
        journal.write([created(i)])
    assert journal.wal_pages == 0
    journal.close()


def test_reads_from_many_short_lived_threads_reuse_connections(tmp_path: Path) -> None:
    # trio retires idle worker threads: each read may come from a new thread. A
    # connection per thread leaked two fds per idle spell until the daemon ran out.
    journal = Journal(str(tmp_path / "j.db"), "normal")
    journal.write([created(1)])
    for _ in range(50):
        thread = threading.Thread(target=lambda: (journal.get_run(1), journal.count_by_state()))
        thread.start()
        thread.join()
    assert journal.read_connections == 1
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        thread = threading.Thread(target=lambda: journal.list_runs(limit=5))
        thread.start()
        thread.join()
    assert len(os.listdir("/proc/self/fd")) == fds
    journal.close()


def test_a_background_checkpoint_never_fails_a_commit(tmp_path: Path) -> None:
    # SQLite allows one checkpointer at a time: the writer's inline checkpoint
    # meeting a background one gets SQLITE_BUSY at once. That must not fail the
    # commit (it did: the daemon answered "cannot commit" under load).
    journal = Journal(str(tmp_path / "j.db"), "normal", checkpoint_pages=5, checkpoint_pages_max=10)
    stop = threading.Event()

    def checkpoints() -> None:
        while not stop.is_set():
            journal.checkpoint()

    thread = threading.Thread(target=checkpoints)
    thread.start()
    try:
        for i in range(1, 501):
            journal.write([created(i)])  # raised JournalError ("database is locked")
    finally:
        stop.set()
        thread.join()
    assert journal.count_by_state() == {"queued": 500}
    journal.close()


# A journal as schema version 1 wrote it: the migration to 2 must keep every row.
FROZEN_V1_ROWS = """
INSERT INTO meta VALUES ('instance', '0123456789abcdef');
INSERT INTO runs (id, name, pool, priority, state, kind, spec, tags, owner, submitted_at,
                  updated_at, attempts, lost, cancel_requested, exit_code, reason)
VALUES (1, 'old', 'default', 0, 'running', 'command',
        '{"kind":"command","command":["sleep","9"]}', '["t"]', 1000, 1.0, 2.0, 1, 0, 0,
        NULL, NULL);
INSERT INTO attempts (run_id, attempt, started_at, pid) VALUES (1, 1, 2.0, 4242);
PRAGMA user_version = 1;
"""


def test_a_version_1_journal_is_migrated_keeping_its_rows(tmp_path: Path) -> None:
    path = str(tmp_path / "v1.db")
    db = apsw.Connection(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(MIGRATIONS[0])
    db.execute(FROZEN_V1_ROWS)
    db.close()
    journal = Journal(path, "normal")
    assert journal.schema_version == SCHEMA_VERSION == 2
    assert journal.instance == "0123456789abcdef"
    found = journal.load_active()
    runs, next_id = found.runs, found.next_id
    assert [(r.id, r.name, r.state, r.attempt_pid, r.attempt_pid_started) for r in runs] == [
        (1, "old", State.RUNNING, 4242, None)  # v1 never recorded start times
    ]
    assert next_id == 2
    run = journal.get_run(1)
    assert run is not None and run["attempt_list"][0]["pid"] == 4242
    assert journal.integrity_check() == "ok"
    journal.close()


def test_meta_values(journal: Journal) -> None:
    assert journal.meta("boot_id") is None
    journal.set_meta("boot_id", "b1")
    journal.set_meta("boot_id", "b2")
    assert journal.meta("boot_id") == "b2"
    assert journal.meta("instance") == journal.instance
