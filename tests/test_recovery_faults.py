"""Recovery kills before it forgets (issue 13), proved by killing the daemon at each
step of recovery.

A run found ``running`` at start-up was interrupted; its attempt may have left
processes behind. The promise: those processes are known dead (killed *and* seen
gone) before anything lets the run start again, and until then the journal still
says ``running``, so a daemon that dies at any step of recovery finds the same
attempt at its next start and kills again. A retry never runs beside the attempt
it replaces.

``JOBD_CRASH_AT=<point>`` (jobd/faults.py) makes the daemon SIGKILL itself at a
step of recovery. Every job here runs ``watcher.py`` first, which records
"overlap" if any process of an *other* attempt of the same run (same journal
instance, same run id) is alive when it starts: the one thing the rule forbids.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import apsw
import pytest

from tests.conftest import (
    DAEMON_MARK,
    READY_DEADLINE,
    DaemonProcess,
    Raw,
    find_marked,
    pid_alive,
    start_ticks,
    wait_for,
)

CRASH_POINTS = ["recovery-loaded", "leftovers-signalled", "leftovers-gone", "lost-committed"]

# Run at the start of every attempt: is anything of another attempt of this run alive?
# It reads each environment once (a process may vanish meanwhile: then it is gone, not
# an overlap), skips zombies (their environment reads empty) and compares the attempt
# number, so the job's own processes (the shell, this interpreter) never count.
WATCHER = """\
import os, sys

mine = os.environ
instance = b"JOBD_INSTANCE=" + mine["JOBD_INSTANCE"].encode()
run = b"JOBD_RUN_ID=" + mine["JOBD_RUN_ID"].encode()
attempt = b"JOBD_ATTEMPT=" + mine["JOBD_ATTEMPT"].encode()
others = []
for name in os.listdir("/proc"):
    if not name.isdigit():
        continue
    try:
        with open(f"/proc/{name}/environ", "rb") as f:
            environ = set(f.read().split(b"\\0"))
    except OSError:
        continue
    if instance in environ and run in environ and attempt not in environ:
        theirs = [v.decode() for v in environ if v.startswith(b"JOBD_ATTEMPT=")]
        others.append(f"pid {name} {' '.join(theirs)}")
if others:
    with open(sys.argv[1], "a") as f:
        f.write(f"overlap: attempt {mine['JOBD_ATTEMPT']} began beside {others}\\n")
"""


class Journaled:
    """A run as the journal file holds it, read while no daemon runs."""

    def __init__(self, journal: Path, run_id: int) -> None:
        db = apsw.Connection(str(journal))
        try:
            self.state, self.attempts, self.lost = db.execute(
                "SELECT state, attempts, lost FROM runs WHERE id = ?", (run_id,)
            ).fetchone()
            self.outcomes = [
                row[0]
                for row in db.execute(
                    "SELECT outcome FROM attempts WHERE run_id = ? ORDER BY attempt", (run_id,)
                )
            ]
        finally:
            db.close()


def job(workdir: Path, body: str) -> str:
    """A shell job that records its start, runs the watcher, then ``body``.

    ``starts`` gets "<attempt> <pid>" per attempt begun; ``pid.<run>.<attempt>`` is
    written (atomically) once the watcher has run, so a test that sees it knows the
    overlap check of that attempt is done."""
    watcher = workdir / "watcher.py"
    if not watcher.exists():
        watcher.write_text(WATCHER)
    pid = f"{workdir}/pid.$JOBD_RUN_ID.$JOBD_ATTEMPT"
    return (
        f'echo "$JOBD_RUN_ID $JOBD_ATTEMPT $$" >> {workdir}/starts;'
        f" {sys.executable} -I -S {watcher} {workdir}/overlaps;"
        f' echo $$ > "{pid}.tmp"; mv "{pid}.tmp" "{pid}"; {body}'
    )


def recorded_pid(workdir: Path, run_id: int, attempt: int) -> int | None:
    path = workdir / f"pid.{run_id}.{attempt}"
    with contextlib.suppress(FileNotFoundError, ValueError):
        return int(path.read_text())
    return None


def wait_pid(workdir: Path, run_id: int, attempt: int) -> int:
    return wait_for(
        lambda: recorded_pid(workdir, run_id, attempt),
        f"attempt {attempt} of run {run_id} to begin",
    )


def starts(workdir: Path) -> list[tuple[int, int]]:
    """(run, attempt) of every attempt begun, in order."""
    path = workdir / "starts"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(int(r), int(a)) for r, a, _ in (line.split() for line in lines)]


def no_overlap(workdir: Path) -> None:
    overlaps = workdir / "overlaps"
    assert not overlaps.exists(), overlaps.read_text()


def crash_during_recovery(d: DaemonProcess, point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start ``d`` with the crash point set; it must kill itself there (SIGKILL)."""
    with monkeypatch.context() as m:
        m.setenv("JOBD_CRASH_AT", point)
        d.start(wait=False)
    assert d.proc is not None
    code = d.proc.wait(READY_DEADLINE)
    d.proc = None
    assert code == -signal.SIGKILL, f"it did not crash at {point} (exit {code}):\n{d.log_text()}"


def kill_if_same(pid: int, ticks: int | None) -> None:
    """SIGKILL ``pid`` if it is still the process that started at ``ticks``; wait till gone."""
    if ticks is None or start_ticks(pid) != ticks:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), f"process {pid} to be gone")


def recorded_member(workdir: Path, attempt: int, name: str) -> int:
    """The pid a member of the group of ``attempt`` wrote to ``group.<attempt>.<name>``."""
    path = workdir / f"group.{attempt}.{name}"

    def read() -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(path.read_text())
        return None

    return wait_for(read, f"attempt {attempt}'s {name} member to write its pid")


def get(c: Raw, run_id: int) -> dict[str, Any]:
    return c.result("get", {"id": run_id})


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_at_any_step_of_recovery_leaves_the_kill_owed(
    daemon_factory: type[DaemonProcess],
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    point: str,
) -> None:
    """Killed at any step of recovery, the next start still kills attempt 1's process
    before the retry begins; the attempt is closed as lost once (not before its
    process is known dead), and no retry ever runs beside it."""
    d = daemon_factory()
    d.start()
    c = d.raw()
    run_id = c.result("submit", {"shell": job(workdir, "exec sleep 300")})["id"]
    first = wait_pid(workdir, run_id, 1)
    d.kill()  # the job runs in a session of its own: it outlives the daemon
    assert pid_alive(first)

    crash_during_recovery(d, point, monkeypatch)
    journaled = Journaled(d.journal, run_id)
    if point == "recovery-loaded":
        assert pid_alive(first)  # nothing was done yet: the kill is still owed
    if point != "lost-committed":
        # Not forgotten: the journal still names the attempt, so the next start kills again.
        assert (journaled.state, journaled.outcomes, journaled.lost) == ("running", [None], 0)
    else:
        # Journaled lost only once its process was seen gone; the retry never began.
        assert not pid_alive(first)
        assert journaled.outcomes[0] == "lost" and journaled.lost == 1
        assert starts(workdir) == [(run_id, 1)]

    d.start()
    # Recovery reaps before the daemon answers: attempt 1 is dead by now, no waiting.
    assert not pid_alive(first)
    c = d.raw()
    run = get(c, run_id)
    if point != "lost-committed":
        assert run["lost"] == 1, run
        assert run["attempt_list"][0]["outcome"] == "lost", run
        second = wait_pid(workdir, run_id, 2)
        assert second != first
        run = get(c, run_id)
        assert run["state"] == "running" and run["attempts"] == 2, run
        assert [a["outcome"] for a in run["attempt_list"]] == ["lost", None], run
        assert starts(workdir) == [(run_id, 1), (run_id, 2)]
    else:
        # Safety only here: that the retry then runs is the promise of
        # test_a_crash_after_the_lost_commit_still_runs_the_retry.
        assert run["attempt_list"][0]["outcome"] == "lost", run
    no_overlap(workdir)
    c.result("cancel", {"ids": [run_id]})
    wait_for(lambda: get(c, run_id)["state"] in ("cancelled", "failed"), "the run to end")


def test_a_crash_after_the_lost_commit_still_runs_the_retry(
    daemon_factory: type[DaemonProcess], workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault point promises "the lost attempt is journaled, its retry not yet
    started": one crash lost one attempt, so the run has one loss and its retry runs.

    The batch that closes attempt 1 as lost also journals attempt 2 as started
    (the run is dispatched at once); the crash comes before it is spawned. The
    next recovery finds attempt 2 with no journaled pid and no process: it never
    began, so it is undone, not counted as a second loss (which used to fail the
    run, "attempt 2 lost (2 lost)", though nothing of it ever ran)."""
    d = daemon_factory()
    d.start()
    c = d.raw()
    run_id = c.result("submit", {"shell": job(workdir, "exec sleep 300")})["id"]
    wait_pid(workdir, run_id, 1)
    d.kill()
    crash_during_recovery(d, "lost-committed", monkeypatch)
    d.start()
    c = d.raw()
    try:
        run = wait_for(
            lambda: (r := get(c, run_id))["state"] != "queued" and r, "recovery to settle"
        )
        assert run["lost"] == 1, run
        assert [a["outcome"] for a in run["attempt_list"]] == ["lost", None], run
        wait_pid(workdir, run_id, 2)
    finally:
        c.result("cancel", {"ids": [run_id]})


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_every_process_of_the_leftover_group_dies_even_unmarked_or_ignoring_sigterm(
    daemon_factory: type[DaemonProcess],
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    point: str,
) -> None:
    """The leftover is a group: a leader that ignores SIGTERM, a child that ignores it
    too, and a grandchild that dropped every JOBD_* mark (``env -i``), found only as a
    member of the group. After a crash at any step of recovery and a clean start, all
    of them are dead before the daemon answers."""
    d = daemon_factory()
    d.start()
    c = d.raw()
    tag = f"{workdir}/group.$JOBD_ATTEMPT"
    body = (
        "trap '' TERM;"
        ' sh -c \'trap "" TERM; echo $$ > "$1"; exec sleep 300\''
        f' sh "{tag}.child" &'
        " env -i /bin/sh -c 'echo $$ > \"$1\"; exec /bin/sleep 300'"
        f' sh "{tag}.bare" &'
        " wait"
    )
    run_id = c.result("submit", {"shell": job(workdir, body)})["id"]
    leader = wait_pid(workdir, run_id, 1)
    members = {name: recorded_member(workdir, 1, name) for name in ("child", "bare")}
    bare = members["bare"]
    bare_ticks = {bare: start_ticks(bare)}
    try:
        wait_for(
            lambda: Path(f"/proc/{bare}/cmdline").read_bytes().startswith(b"/bin/sleep"),
            "the unmarked member's exec",
        )
        assert b"JOBD_" not in Path(f"/proc/{bare}/environ").read_bytes()
        d.kill()
        group = [leader, *members.values()]
        assert all(pid_alive(p) for p in group)

        crash_during_recovery(d, point, monkeypatch)
        d.start()
        still = [p for p in group if pid_alive(p)]
        assert not still, f"leftovers alive after recovery: {still}"
        c = d.raw()
        if point != "lost-committed":  # see test_a_crash_after_the_lost_commit_still_runs_the_retry
            wait_pid(workdir, run_id, 2)
            again = recorded_member(workdir, 2, "bare")
            bare_ticks[again] = start_ticks(again)
        no_overlap(workdir)
        c.result("cancel", {"ids": [run_id]})
        wait_for(lambda: get(c, run_id)["state"] in ("cancelled", "failed"), "the run to end")
    finally:  # they carry none of the suite's marks: no teardown would find them
        for pid, ticks in bare_ticks.items():
            kill_if_same(pid, ticks)


@pytest.mark.slow
def test_rapid_crash_restart_cycles_never_run_an_attempt_beside_its_retry(
    daemon_factory: type[DaemonProcess], workdir: Path
) -> None:
    """Twenty cycles of: a fresh run begins; SIGKILL the daemon; restart it and SIGKILL
    it again at a random moment (before, during or after recovery); start it cleanly.
    After every cycle, no run has processes of two attempts alive, each active run has
    exactly one attempt process alive (its current one), a run that failed (lost twice:
    MAX_LOST_REQUEUES = 1) has none, and no attempt ever began beside another."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    print(f"seed {seed}")
    d = daemon_factory("[pools.wide]\nkind = 'process'\nworkers = 8\n")
    d.start()
    c = d.raw()
    runs: list[int] = []
    moments: list[str] = []
    for cycle in range(20):
        run_id = c.result("submit", {"shell": job(workdir, "exec sleep 300"), "pool": "wide"})["id"]
        runs.append(run_id)
        settle(c, d, workdir, runs)
        d.kill()
        d.start(wait=False)
        # A random moment, the point of this test (nothing waits on it): a start takes
        # about 0.3 s here, so this lands before, during and after recovery.
        delay = rng.uniform(0, 0.6)
        time.sleep(delay)
        d.kill()
        moments.append(moment(d.logs[-1].read_text(errors="replace")))
        d.start()
        c = d.raw()
        try:
            settle(c, d, workdir, runs)
        except AssertionError as exc:
            raise AssertionError(f"cycle {cycle} (kill after {delay:.3f}s, seed {seed})") from exc
    print("killed:", {m: moments.count(m) for m in sorted(set(moments))})
    no_overlap(workdir)
    # Every run is running (one attempt lost at most) or failed (lost twice); which,
    # depends on where the random kills landed.
    states = {r: get(c, r)["state"] for r in runs}
    assert set(states.values()) <= {"running", "failed"}, states


def moment(log: str) -> str:
    """How far a start got before it was killed, from its log (for the record only)."""
    if " ready;" in log:
        return "serving"
    if "are gone" in log:
        return "leftovers gone"
    return "before or during the reap"


def settle(c: Raw, d: DaemonProcess, workdir: Path, runs: list[int]) -> None:
    """Wait until every run is running its current attempt (its watcher done) or has
    failed; then check that exactly that attempt's processes are alive."""

    def settled() -> dict[int, dict[str, Any]] | None:
        infos = {r: get(c, r) for r in runs}
        for r, info in infos.items():
            if info["state"] == "failed":
                continue
            if info["state"] != "running" or not info["attempt_list"]:
                return None
            if recorded_pid(workdir, r, info["attempts"]) is None:
                return None
        return infos

    infos = wait_for(settled, "every run to run its current attempt or fail")
    for r, info in infos.items():
        alive = find_marked({DAEMON_MARK: str(d.dir), "JOBD_RUN_ID": str(r)})
        attempts = {int(p.jobd_env["JOBD_ATTEMPT"]) for p in alive}
        if info["state"] == "failed":
            assert not alive, (info, [str(p) for p in alive])
            assert info["lost"] == 2, info
        else:
            pid = recorded_pid(workdir, r, info["attempts"])
            assert attempts == {info["attempts"]}, (info, [str(p) for p in alive])
            assert pid in {p.pid for p in alive}, (info, [str(p) for p in alive])
    no_overlap(workdir)
