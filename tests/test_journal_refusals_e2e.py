"""A real daemon whose journal refuses some writes for their data (issue 13).

SQLite triggers added to the journal file before the daemon starts raise a
constraint error for chosen runs: the stand-in for a bug or for data that slipped
past validation. The promises (groupcommit.py's docstring, "data"): the refused
units of runs are left out of the commit and everything else commits; the runs
whose change was refused are quarantined (failed, with a reason naming the
refusal); the request that carried the refused change gets ``internal``; everyone
else goes on and the daemon stays healthy. Only if even the quarantine's own write
is refused does the daemon stop, with exit status 70, and the next start recovers.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import apsw

from jobd.journal import Journal
from tests.conftest import READY_DEADLINE, REPLY_DEADLINE, DaemonProcess, Raw, pid_alive, wait_for

POISON_INSERT = """
CREATE TRIGGER poison_insert BEFORE INSERT ON runs WHEN NEW.name = 'poison'
BEGIN SELECT RAISE(ABORT, 'poisoned by the test'); END;
"""
# The end of an attempt as a result writes it (outcome succeeded/failed/...), not as the
# quarantine closes it (outcome 'error'): only the run's own end is refused.
POISON_END = """
CREATE TRIGGER poison_end BEFORE UPDATE OF ended_at ON attempts
WHEN NEW.ended_at IS NOT NULL AND NEW.outcome IS NOT 'error'
  AND (SELECT name FROM runs WHERE id = NEW.run_id) = 'poison-end'
BEGIN SELECT RAISE(ABORT, 'poisoned end'); END;
"""
POISON_CANCEL = """
CREATE TRIGGER poison_cancel BEFORE UPDATE OF cancel_requested ON runs
WHEN NEW.name = 'poison-cancel'
BEGIN SELECT RAISE(ABORT, 'poisoned cancel'); END;
"""
# Every end of the attempt, the quarantine's included, and the run's failure.
POISON_ALL = """
CREATE TRIGGER poison_all_end BEFORE UPDATE OF ended_at ON attempts
WHEN NEW.ended_at IS NOT NULL AND (SELECT name FROM runs WHERE id = NEW.run_id) = 'poison-all'
BEGIN SELECT RAISE(ABORT, 'poisoned end, always'); END;
CREATE TRIGGER poison_all_fail BEFORE UPDATE OF state ON runs
WHEN NEW.state = 'failed' AND NEW.name = 'poison-all'
BEGIN SELECT RAISE(ABORT, 'poisoned failure'); END;
"""
TRIGGERS = ("poison_insert", "poison_end", "poison_cancel", "poison_all_end", "poison_all_fail")


def poisoned_daemon(factory: type[DaemonProcess], *triggers: str, extra: str = "") -> DaemonProcess:
    """A daemon on a fresh journal that holds ``triggers``."""
    d = factory(extra)
    Journal(str(d.journal), "normal").close()  # created (and migrated) as jobd does
    db = apsw.Connection(str(d.journal))
    try:
        for sql in triggers:
            db.execute(sql)
    finally:
        db.close()
    d.start()
    return d


def drop_triggers(journal: Path) -> None:
    db = apsw.Connection(str(journal))
    try:
        for name in TRIGGERS:
            db.execute(f"DROP TRIGGER IF EXISTS {name}")
    finally:
        db.close()


def error_of(reply: dict[str, Any]) -> dict[str, Any]:
    assert "error" in reply, reply
    return reply["error"]


def reply_to(conn: Raw, request_id: int) -> dict[str, Any]:
    while True:
        reply = conn.read()
        assert reply is not None, "the daemon closed the connection"
        if reply.get("id") == request_id and "event" not in reply:
            return reply


def wait_all(conn: Raw, ids: list[int]) -> dict[int, dict[str, Any]]:
    result = conn.result("wait", {"ids": ids, "timeout": READY_DEADLINE})
    assert not result["timed_out"], result
    return {r["id"]: r for r in result["runs"]}


def pool(stats: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in stats["pools"] if p["name"] == name)


def blocker(path: Path) -> list[str]:
    """Runs until ``path`` exists (or its directory is removed)."""
    return ["sh", "-c", f'while [ ! -e "{path}" ] && [ -d "{path.parent}" ]; do sleep 0.02; done']


def test_a_refused_submit_fails_alone_and_everyone_else_goes_on(
    daemon_factory: type[DaemonProcess], workdir: Path
) -> None:
    """A submit the journal refuses gets ``internal`` naming the refusal, and nothing
    of it exists; a batch submit holding one refused run fails as a whole; submits
    sent alongside (other connections, very likely the same commit) are journaled and
    run; reads work; the daemon stays healthy and counts the refused runs."""
    d = poisoned_daemon(daemon_factory, POISON_INSERT)
    poison_conn, good_conns, batch_conn = d.raw(), [d.raw() for _ in range(3)], d.raw()
    # Everything is sent before any answer is read: the writer takes what is pending
    # as one batch, so the refused runs and the good ones commit together if they can.
    poison_req = poison_conn.send("submit", {"command": ["true"], "name": "poison"})
    good_reqs = [
        conn.send("submit", {"shell": f"echo {i} > {workdir}/good.{i}", "name": f"good-{i}"})
        for i, conn in enumerate(good_conns)
    ]
    batch_req = batch_conn.send(
        "submit",
        {
            "runs": [
                {"command": ["true"], "name": "batch-good"},
                {"command": ["true"], "name": "poison"},
                {"command": ["true"], "name": "batch-good"},
            ]
        },
    )

    refused = error_of(reply_to(poison_conn, poison_req))
    assert refused["code"] == "internal", refused
    assert "the journal refused run" in refused["message"], refused
    assert "poisoned by the test" in refused["message"], refused
    poison_id = int(re.search(r"refused run (\d+)", refused["message"])[1])  # type: ignore[index]

    batch = error_of(reply_to(batch_conn, batch_req))
    assert batch["code"] == "internal", batch
    assert "poisoned by the test" in batch["message"], batch
    first, last = map(int, re.search(r"refused runs (\d+)-(\d+)", batch["message"]).groups())  # type: ignore[union-attr]
    assert last - first == 2, batch

    good_ids = [
        reply_to(conn, req)["result"]["id"] for conn, req in zip(good_conns, good_reqs, strict=True)
    ]
    runs = wait_all(good_conns[0], good_ids)
    assert {r["state"] for r in runs.values()} == {"succeeded"}, runs
    assert all((workdir / f"good.{i}").exists() for i in range(3))

    c = d.raw()
    for run_id in [poison_id, *range(first, last + 1)]:
        reply = c.request("get", {"id": run_id})
        assert error_of(reply)["code"] == "not_found", reply
    listed = c.result("list", {})["runs"]
    assert sorted(r["id"] for r in listed) == sorted(good_ids), listed
    assert c.result("list", {"name": "batch-good"})["runs"] == []
    stats = c.result("stats")
    assert stats["daemon"]["healthy"] is True, stats
    assert stats["journal"]["refused_runs"] == 4, stats  # the single one and the batch's 3
    # The connections that were refused go on too.
    again = poison_conn.result("submit", {"command": ["true"]})["id"]
    assert wait_all(batch_conn, [again])[again]["state"] == "succeeded"
    log = d.log_text()
    assert f"the journal refused run(s) {poison_id}" in log, log[-3000:]
    assert "poisoned by the test" in log
    assert d.stop() == 0


def test_a_refused_end_is_quarantined_and_the_rest_keeps_running(
    daemon_factory: type[DaemonProcess], workdir: Path
) -> None:
    """A run whose end the journal refuses is quarantined: it ends failed, with a
    reason naming the refusal, its attempt closed as ``error``; a ``wait`` on it
    returns; runs already running, and runs submitted after, run and finish."""
    d = poisoned_daemon(daemon_factory, POISON_END)
    c = d.raw()
    release = workdir / "release"
    busy = c.result("submit", {"command": blocker(release), "name": "busy"})["id"]
    wait_for(lambda: c.result("get", {"id": busy})["state"] == "running", "the busy run")
    poisoned = c.result("submit", {"shell": "echo bye", "name": "poison-end"})["id"]
    run = wait_all(c, [poisoned])[poisoned]  # returns: the quarantine wakes the waiter
    assert run["state"] == "failed", run
    info = c.result("get", {"id": poisoned})
    assert "journal refused" in info["reason"] and "poisoned end" in info["reason"], info
    assert [a["outcome"] for a in info["attempt_list"]] == ["error"], info
    assert "journal refused" in info["attempt_list"][0]["error"], info

    assert c.result("get", {"id": busy})["state"] == "running"
    after = c.result("submit", {"shell": "echo after", "name": "after"})["id"]
    assert wait_all(c, [after])[after]["state"] == "succeeded"
    release.touch()
    assert wait_all(c, [busy])[busy]["state"] == "succeeded"
    stats = c.result("stats")
    assert stats["daemon"]["healthy"] is True, stats
    assert stats["journal"]["refused_runs"] == 1, stats
    default = pool(stats, "default")
    assert default["running"] == 0 and default["held"] == 0, stats
    assert "poisoned end" in d.log_text()
    assert d.stop() == 0
    # What the quarantine wrote is what a restart finds: nothing of it is recovered.
    d.start()
    c = d.raw()
    assert c.result("get", {"id": poisoned})["state"] == "failed"
    assert c.result("stats")["daemon"]["fenced"] == 0


def test_a_refused_cancel_fails_the_run_and_kills_its_process(
    daemon_factory: type[DaemonProcess], workdir: Path
) -> None:
    """A cancel the journal refuses gets ``internal``; the run it named is quarantined
    (failed, not left running with memory and journal disagreeing) and its process
    group is killed; another run named in the same request is cancelled all the same,
    and one not named goes on untouched."""
    d = poisoned_daemon(daemon_factory, POISON_CANCEL)
    c = d.raw()
    pidfile = workdir / "pid"
    poisoned = c.result(
        "submit", {"shell": f"echo $$ > {pidfile}; exec sleep 300", "name": "poison-cancel"}
    )["id"]
    release = workdir / "release"
    other = c.result("submit", {"command": blocker(release), "name": "other"})["id"]
    pid = wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), "the poisoned pid")
    pid = int(pid)
    wait_for(lambda: c.result("get", {"id": other})["state"] == "running", "the other run")

    queued = c.result("submit", {"command": ["true"], "name": "queued"})["id"]  # no slot left
    assert c.result("get", {"id": queued})["state"] == "queued"
    refused = error_of(c.request("cancel", {"ids": [poisoned, queued]}))
    assert refused["code"] == "internal", refused
    assert "poisoned cancel" in refused["message"], refused
    # Each run's cancel stands on its own: the other one in the request was made.
    assert f"run(s) {queued} were cancelled" in refused["message"], refused
    assert c.result("get", {"id": queued})["state"] == "cancelled"
    run = wait_all(c, [poisoned])[poisoned]
    assert run["state"] == "failed", run
    info = c.result("get", {"id": poisoned})
    assert "journal refused" in info["reason"], info
    assert [a["outcome"] for a in info["attempt_list"]] == ["error"], info
    wait_for(lambda: not pid_alive(pid), "the quarantined run's process to be killed")

    assert c.result("get", {"id": other})["state"] == "running"
    # Its slot comes back once the killed process is reaped: nothing is held for ever.
    wait_for(
        lambda: pool(c.result("stats"), "default")["held"] == 0,
        "the quarantined run's slot to free",
    )
    release.touch()
    assert wait_all(c, [other])[other]["state"] == "succeeded"
    stats = c.result("stats")
    assert stats["daemon"]["healthy"] is True and stats["journal"]["refused_runs"] == 1, stats
    assert d.stop() == 0


def test_a_refused_quarantine_stops_the_daemon_with_70_and_a_restart_recovers(
    daemon_factory: type[DaemonProcess], workdir: Path
) -> None:
    """If the journal refuses even to fail a run whose end it refused, nothing sane is
    left to try: the daemon stops cleanly with exit status 70 (EX_SOFTWARE) and logs
    why. The journal holds what was acknowledged: the run is still running there, so
    once the cause is gone, the next start recovers it like any interrupted run (lost,
    re-queued, run again)."""
    d = poisoned_daemon(daemon_factory, POISON_ALL)
    c = d.raw()
    done = c.result("submit", {"command": ["true"], "name": "innocent"})["id"]
    wait_all(c, [done])
    starts = workdir / "starts"
    poisoned = c.result(
        "submit", {"shell": f"echo $JOBD_ATTEMPT >> {starts}", "name": "poison-all"}
    )["id"]
    assert d.proc is not None
    assert d.proc.wait(REPLY_DEADLINE) == 70, d.log_text()[-3000:]
    d.proc = None
    log = d.log_text()
    assert f"the journal refuses to fail run(s) [{poisoned}]" in log, log[-3000:]
    assert "poisoned end, always" in log and "stopping:" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]

    drop_triggers(d.journal)
    d.start()
    c = d.raw()
    run = wait_all(c, [poisoned])[poisoned]
    assert run["state"] == "succeeded", run
    info = c.result("get", {"id": poisoned})
    assert [a["outcome"] for a in info["attempt_list"]] == ["lost", "succeeded"], info
    assert starts.read_text().split() == ["1", "2"]
    assert c.result("get", {"id": done})["state"] == "succeeded"
    assert c.result("stats")["daemon"]["healthy"] is True
    assert d.stop(signal.SIGTERM) == 0
