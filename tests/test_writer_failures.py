"""The journal writer under every class of failure (groupcommit.py's docstring):

- transient (disk full): retried; requesters of the failing batch *and* of the
  one queued behind it are answered at once;
- data (the journal refuses a value, a constraint breaks): the guilty unit of
  runs is left out, everything else commits, the writer stays healthy;
- fatal (damaged file, a bug in the writer or in the post-commit actions):
  the daemon is told to stop, nothing waits for ever.

And the journal's reads: one bad row never fails ``list``/``get`` for everyone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import apsw
import pytest
import trio
import trio.testing

from jobd.core.effects import Created, Effect, Ended, Quarantined, Started
from jobd.core.model import Kind, Outcome, Result, Spec, State
from jobd.errors import JournalDamagedError, JournalDataError
from jobd.groupcommit import Batch, GroupCommitter
from jobd.journal import _WRITERS, AuditEntry, Journal, check_writers
from tests.test_journal import FullDiskJournal

SPEC = Spec(Kind.COMMAND, command=("echo", "hi"))


def created(run_id: int, name: str | None = None) -> Created:
    return Created(run_id, SPEC, "default", 0, name, (), 1000, 100.0 + run_id)


@pytest.fixture
def journal(tmp_path: Path) -> Any:
    j = Journal(str(tmp_path / "journal.db"), "normal")
    yield j
    j.close()


# -- the writer table ---------------------------------------------------------------


def test_every_effect_type_has_a_writer() -> None:
    # Checked at import too (jobd would not start); this shows the check bites.
    class NewEffect:
        run_id = 1

    with pytest.raises(TypeError, match="NewEffect"):
        check_writers(_WRITERS, [*_WRITERS, NewEffect])
    with pytest.raises(TypeError, match="Created"):
        check_writers({k: v for k, v in _WRITERS.items() if k is not Created}, _WRITERS)


# -- data: isolate the guilty, commit the rest ------------------------------------------


def test_a_value_the_journal_refuses_fails_only_its_own_unit(journal: Journal) -> None:
    bad = created(2, name="\ud800")  # slipped past validation (a bug)
    effects: list[Effect] = [created(1), bad, created(3), created(4)]
    with pytest.raises(JournalDataError):
        journal.write(effects)
    audit = [AuditEntry(1.0, 1000, 1, "submit", {"runs": 2}), AuditEntry(1.0, 1000, 1, "x", {})]
    refused = journal.write_isolating(
        effects, audit, units=[(1,), (2, 3)], audit_units=[(2, 3), (4,)]
    )
    # Runs 2 and 3 were one request's: they fail together; 1 and 4 commit.
    assert set(refused) == {2, 3}
    assert "UnicodeEncodeError" in refused[2]
    refused[2].encode()  # the reason itself can be journaled and sent
    assert journal.get_run(1) is not None and journal.get_run(4) is not None
    assert journal.get_run(2) is None and journal.get_run(3) is None
    assert [a["action"] for a in journal.audit_entries()] == ["x"]  # the failed one's is gone
    assert journal.integrity_check() == "ok"


def test_a_constraint_broken_by_a_bug_is_data_not_a_full_disk(journal: Journal) -> None:
    journal.write([created(1)])
    effects: list[Effect] = [created(1), created(2)]  # run 1 again: a primary key clash
    refused = journal.write_isolating(effects)
    assert list(refused) == [1] and "ConstraintError" in refused[1]
    assert journal.get_run(2) is not None


def test_quarantined_closes_whatever_the_journal_holds(journal: Journal) -> None:
    journal.write([created(1), created(2), Started(1, 1, 5.0, "default", SPEC)])
    ended = Ended(Result(2, 1, Outcome.SUCCEEDED, 6.0, exit_code=0), State.SUCCEEDED)
    journal.write([Started(2, 1, 5.5, "default", SPEC), ended])
    journal.write(
        [Quarantined(1, 7.0, "refused: x"), Quarantined(2, 7.0, "y"), Quarantined(3, 7.0, "z")]
    )
    one = journal.get_run(1)
    assert one is not None and (one["state"], one["reason"]) == ("failed", "refused: x")
    assert one["attempt_list"][0]["outcome"] == "error"
    two = journal.get_run(2)  # terminal already: untouched
    assert two is not None and two["state"] == "succeeded"
    assert two["attempt_list"][0]["outcome"] == "succeeded"


async def test_the_writer_commits_the_innocent_and_reports_the_guilty(journal: Journal) -> None:
    seen: list[Batch] = []
    writer = GroupCommitter(journal, seen.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        good = writer.add([created(1)], runs=(1,))
        bad = writer.add([created(2, name="\udcff")], runs=(2,))
        assert good is bad  # one batch
        await good.settled.wait()
        assert good.committed.is_set()
        assert set(good.refused) == {2}
        assert writer.healthy
        assert writer.statistics().refused_runs == 1
        # The writer goes on: the next batch commits as usual.
        await writer.add([created(3)]).committed.wait()
        writer.close()
    assert seen[0].refused == good.refused
    assert journal.get_run(1) is not None and journal.get_run(3) is not None


# -- transient: nobody hangs -----------------------------------------------------------


async def test_requests_queued_behind_a_failing_batch_are_answered_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    journal = FullDiskJournal(str(tmp_path / "j.db"))
    writer = GroupCommitter(journal, lambda batch: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        first = writer.add([created(1)])
        await trio.to_thread.run_sync(journal.attempts.acquire)
        # The writer is stuck retrying ``first``; this one waits behind it.
        behind = writer.add([created(2)])
        assert behind is not first
        await behind.settled.wait()  # while the disk is still full: not "when it has room"
        assert journal.failing and not behind.committed.is_set()
        later = writer.add([created(3)])  # while unhealthy: settled as it is added
        assert later.settled.is_set() and later is behind
        journal.failing = False
        await behind.committed.wait()  # kept, and committed once the disk has room
        assert writer.healthy
        # Healthy again: a new request waits for its own commit, not a stale settle.
        fresh = writer.add([created(4)])
        assert not fresh.settled.is_set()
        await fresh.committed.wait()
        writer.close()
    assert journal.count_by_state() == {"queued": 4}
    journal.close()


# -- fatal: stop cleanly, never hang ------------------------------------------------


class DamagedJournal(Journal):
    def write(self, effects: Sequence[Effect], audit: Sequence[AuditEntry] = ()) -> None:
        raise JournalDamagedError("journal commit failed: database disk image is malformed")


class BuggyJournal(Journal):
    def write_isolating(self, *args: Any, **kwargs: Any) -> dict[int, str]:
        raise RuntimeError("a bug in the writer")


@pytest.mark.parametrize("kind", [DamagedJournal, BuggyJournal])
async def test_a_fatal_failure_stops_the_daemon_and_answers_everyone(
    tmp_path: Path, kind: type[Journal]
) -> None:
    journal = kind(str(tmp_path / "j.db"), "normal")
    reasons: list[str] = []
    writer = GroupCommitter(journal, lambda batch: None, reasons.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        batch = writer.add([created(1)])
        await batch.finished.wait()
        assert batch.failure and not batch.committed.is_set()
        assert len(reasons) == 1 and writer.fatal == reasons[0]
        assert not writer.healthy
        # Whatever comes after fails at once too: nobody waits for a dead writer.
        after = writer.add([created(2)])
        assert after.failure is not None and after.settled.is_set()
        await writer.flush()  # returns: the writer stopped for good
        writer.close()
    journal.close()


async def test_a_bug_in_the_post_commit_actions_stops_cleanly(journal: Journal) -> None:
    reasons: list[str] = []

    def on_commit(batch: Batch) -> None:
        raise KeyError("no such pool")

    writer = GroupCommitter(journal, on_commit, reasons.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        batch = writer.add([created(1)])
        await batch.finished.wait()
        # It is durable, and its requesters hear so; the daemon is told to stop.
        assert batch.committed.is_set() and batch.failure is None
        assert reasons and "after a commit" in reasons[0]
        writer.close()
    assert journal.get_run(1) is not None


# -- reads: one bad row never fails everyone -------------------------------------------


def _poison(path: Path, sql: str) -> None:
    db = apsw.Connection(str(path))
    with db:
        db.execute(sql)
    db.close()


def test_rows_with_lone_surrogate_escapes_are_read_back(tmp_path: Path) -> None:
    # What an earlier version journaled for a command/env/tags holding a raw
    # surrogate (JSON escapes are ASCII, so the insert worked), and that made
    # every later list and get fail.
    path = tmp_path / "journal.db"
    journal = Journal(str(path), "normal")
    journal.write([created(1), created(2)])
    _poison(
        path,
        'UPDATE runs SET spec = \'{"kind":"command","command":["echo","\\ud800"],'
        '"env":{"K\\udfff":"v\\udc80"}}\', tags = \'["t\\ud83d"]\' WHERE id = 1',
    )
    listed = journal.list_runs()
    assert [r["id"] for r in listed] == [2, 1]
    one = journal.get_run(1)
    assert one is not None
    assert one["command"] == ["echo", "\ufffd"]
    assert one["env"] == {"K\ufffd": "v\ufffd"} and one["tags"] == ["t\ufffd"]
    assert one == next(r for r in listed if r["id"] == 1) | {"attempt_list": []}
    json.dumps(one, ensure_ascii=False).encode()  # can be sent
    found = journal.load_active()
    assert [r.id for r in found.runs] == [1, 2] and found.unreadable == {}
    journal.close()


def test_text_that_is_not_utf8_is_read_with_replacement(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(str(path), "normal")
    journal.write([created(1), created(2)])
    _poison(path, "UPDATE runs SET name = CAST(x'41ff42' AS TEXT) WHERE id = 1")
    assert [r["name"] for r in journal.list_runs()] == [None, "A\ufffdB"]
    one = journal.get_run(1)
    assert one is not None and one["name"] == "A\ufffdB"
    assert set(journal.run_summaries([1, 2])) == {1, 2}
    journal.close()


def test_a_row_that_cannot_be_read_back_is_listed_with_a_reason_and_quarantined(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(str(path), "normal")
    journal.write([created(1), created(2)])
    _poison(path, "UPDATE runs SET spec = 'not json' WHERE id = 1")
    listed = {r["id"]: r for r in journal.list_runs()}
    assert set(listed) == {1, 2}
    assert "cannot be read back" in listed[1]["reason"]
    found = journal.load_active()
    assert [r.id for r in found.runs] == [2]
    assert list(found.unreadable) == [1]
    journal.close()
