"""A real daemon process: run lifecycle, ordering, cancel, crash recovery, shutdown."""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
from pathlib import Path
from typing import Any

import apsw
import pytest

from jobd.daemon import _Waiter
from tests.conftest import (
    JOBD,
    READY_DEADLINE,
    REPLY_DEADLINE,
    DaemonProcess,
    Raw,
    kill_group_if_same,
    pid_alive,
    start_ticks,
    wait_for,
)

# For the tests that signal the daemon while runs are running: no test step can outlast
# this grace period, however loaded the machine. A test that needs it to end sends the
# second signal; test_runs_still_running_when_the_grace_period_ends_... lets one expire.
LONG_GRACE = 'shutdown_grace = "300s"\nkill_grace = "2s"'


def wait_all(conn: Raw, ids: list[int], timeout: float = READY_DEADLINE) -> dict[int, dict]:
    conn.sock.settimeout(timeout + READY_DEADLINE)  # the daemon's timed_out answer comes first
    try:
        result = conn.result("wait", {"ids": ids, "timeout": timeout})
    finally:
        conn.sock.settimeout(REPLY_DEADLINE)
    assert not result["timed_out"], result
    return {r["id"]: r for r in result["runs"]}


def begun(conn: Raw, run_id: int) -> int | None:
    """The pid of the run's latest attempt once a worker has begun it. A run handed to
    a pool shows as running before that (prefetch; a worker yet to take it), and a
    SIGTERM then puts it back in the queue instead of waiting for it."""
    attempts = conn.result("get", {"id": run_id})["attempt_list"]
    return attempts[-1].get("pid") if attempts else None


def blocker(path: Path) -> list[str]:
    """A command that runs until ``path`` exists (no timing assumptions), or its
    directory is removed, so a failed test leaves no process behind."""
    return ["sh", "-c", f'while [ ! -e "{path}" ] && [ -d "{path.parent}" ]; do sleep 0.02; done']


def test_command_succeeds_with_captured_output(daemon: DaemonProcess) -> None:
    c = daemon.raw()
    run_id = c.result("submit", {"command": ["echo", "hi"]})["id"]
    runs = wait_all(c, [run_id])
    assert runs[run_id]["state"] == "succeeded"
    assert runs[run_id]["exit_code"] == 0
    c.send("logs", {"id": run_id})
    event = c.read()
    assert event is not None and event["event"] == {"data": "hi\n"}
    final = c.read()
    assert final is not None and final["result"]["state"] == "succeeded"
    listed = c.result("list", {"state": "succeeded"})["runs"]
    assert [r["id"] for r in listed] == [run_id]


def test_attempt_environment_and_exit_codes(daemon: DaemonProcess) -> None:
    c = daemon.raw()
    ok = c.result(
        "submit",
        {
            "shell": 'echo "$JOBD_RUN_ID/$JOBD_ATTEMPT/$GREETING"',
            "env": {"GREETING": "hello"},
            "cwd": "/tmp",
        },
    )["id"]
    bad = c.result("submit", {"shell": "echo oops >&2; exit 3"})["id"]
    missing = c.result("submit", {"command": ["/nonexistent/binary"]})["id"]
    runs = wait_all(c, [ok, bad, missing])
    assert runs[ok]["state"] == "succeeded"
    assert runs[bad]["state"] == "failed" and runs[bad]["exit_code"] == 3
    assert runs[missing]["state"] == "failed" and runs[missing]["exit_code"] == 127
    assert "cannot start" in c.result("get", {"id": missing})["reason"]
    c.send("logs", {"id": ok})
    assert c.read()["event"]["data"] == f"{ok}/1/hello\n"  # type: ignore[index]


def test_callables_run_in_thread_pool_with_context(daemon: DaemonProcess) -> None:
    c = daemon.raw()
    good = c.result("submit", {"call": "jobd.demo:whoami", "pool": "python"})["id"]
    failing = c.result(
        "submit", {"call": "jobd.demo:fail", "pool": "python", "kwargs": {"message": "boom"}}
    )["id"]
    unimportable = c.result("submit", {"call": "no.such.module:fn", "pool": "python"})["id"]
    runs = wait_all(c, [good, failing, unimportable])
    assert runs[good]["state"] == "succeeded"
    assert runs[failing]["state"] == "failed"
    assert runs[failing]["reason"] == "RuntimeError: boom"
    assert runs[unimportable]["state"] == "failed"
    assert "cannot import" in runs[unimportable]["reason"]
    c.send("logs", {"id": failing})
    assert "RuntimeError: boom" in c.read()["event"]["data"]  # type: ignore[index]


def test_priority_order_within_a_pool(daemon_factory: type[DaemonProcess], workdir: Path) -> None:
    d = daemon_factory('[pools.single]\nkind = "process"\nworkers = 1\n')
    d.start()
    c = d.raw()
    go, order = workdir / "go", workdir / "order"
    first = c.result("submit", {"command": blocker(go), "pool": "single"})["id"]
    wait_for(lambda: c.result("get", {"id": first})["state"] == "running", "blocker to run")
    ids = []
    for label, priority in [
        ("low1", "low"),
        ("normal1", "normal"),
        ("crit", "critical"),
        ("low2", "low"),
        ("high", 100),
        ("normal2", 0),
    ]:
        ids.append(
            c.result(
                "submit",
                {"shell": f"echo {label} >> {order}", "pool": "single", "priority": priority},
            )["id"]
        )
    go.touch()
    runs = wait_all(c, [first, *ids])
    assert all(r["state"] == "succeeded" for r in runs.values())
    assert order.read_text().split() == ["crit", "high", "normal1", "normal2", "low1", "low2"]


def test_cancel_queued_and_running_kills_the_process_group(
    daemon: DaemonProcess, workdir: Path
) -> None:
    c = daemon.raw()
    pidfile = workdir / "grandchild.pid"
    # The shell starts a grandchild that ignores nothing special; both must die.
    running = c.result("submit", {"shell": f"sleep 300 & echo $! > {pidfile}; wait"})["id"]
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), "grandchild pid")
    grandchild = int(pidfile.read_text())
    other = c.result("submit", {"command": blocker(workdir / "never")})["id"]
    queued = c.result("submit", {"command": ["true"]})["id"]  # both slots busy: stays queued
    assert c.result("get", {"id": queued})["state"] == "queued"
    results = c.result("cancel", {"ids": [queued, running]})["results"]
    assert results == {str(queued): "cancelled", str(running): "cancelling"}
    runs = wait_all(c, [queued, running])
    assert runs[queued]["state"] == "cancelled"
    assert runs[running]["state"] == "cancelled"
    wait_for(lambda: not pid_alive(grandchild), "the grandchild to die with its group")
    assert c.result("cancel", {"ids": [queued]})["results"] == {str(queued): "already_cancelled"}
    c.result("cancel", {"ids": [other]})
    wait_all(c, [other])


def test_cancel_kills_group_members_that_ignore_sigterm_after_the_leader_obeyed(
    daemon: DaemonProcess, workdir: Path
) -> None:
    # The leader (sh) dies of SIGTERM at once; a member ignores it. The SIGKILL
    # after kill_grace goes to the group, not only to a live leader. The member
    # writes its pid once it ignores SIGTERM: the cancel cannot come before.
    c = daemon.raw()
    pidfile = workdir / "member.pid"
    script = f"sh -c 'trap \"\" TERM; echo $$ > {pidfile}; exec sleep 300' & wait"
    run_id = c.result("submit", {"shell": script})["id"]
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), "the member's pid")
    member = int(pidfile.read_text())
    assert c.result("cancel", {"ids": [run_id]})["results"] == {str(run_id): "cancelling"}
    assert wait_all(c, [run_id])[run_id]["state"] == "cancelled"
    wait_for(lambda: not pid_alive(member), "the member to be killed after kill_grace")


def test_a_real_time_signal_is_an_ordinary_failure(daemon: DaemonProcess) -> None:
    c = daemon.raw()
    run_id = c.result("submit", {"shell": "kill -40 $$"})["id"]
    wait_all(c, [run_id])
    attempt = c.result("get", {"id": run_id})["attempt_list"][0]
    assert (attempt["outcome"], attempt["exit_code"]) == ("failed", 128 + 40), attempt
    assert attempt["error"] == "killed by signal 40" and attempt["output"], attempt


def test_sigkill_mid_way_loses_no_acknowledged_run(daemon_factory: type[DaemonProcess]) -> None:
    """The issue's acceptance test: 1,000 runs over two pools, SIGKILL mid-way, restart."""
    d = daemon_factory('[pools.cmd]\nkind = "process"\nworkers = 4\n')
    d.start()
    c = d.raw()
    acknowledged: list[int] = []
    rng = random.Random(2)
    for batch in range(10):
        runs = []
        for _ in range(100):
            if rng.random() < 0.5:
                runs.append({"call": "time:sleep", "args": [0.002], "pool": "python"})
            else:
                runs.append({"command": ["sh", "-c", "sleep 0.01"], "pool": "cmd"})
        acknowledged += c.result("submit", {"runs": runs})["ids"]
        if batch == 5:
            # Kill while runs of both pools are in flight and more are queued.
            wait_for(
                lambda: c.result("stats")["states"].get("succeeded", 0) > 50, "some runs to finish"
            )
            break
    d.kill()
    assert len(acknowledged) == 600
    d.start()
    c = d.raw()
    more = c.result("submit", {"runs": [{"command": ["true"], "pool": "cmd"}] * 400})["ids"]
    acknowledged += more
    runs = wait_all(c, acknowledged, timeout=300)
    assert len(runs) == 1000
    bad = [r for r in runs.values() if r["state"] != "succeeded"]
    assert not bad, [c.result("get", {"id": r["id"]}) for r in bad[:3]]
    assert len(set(acknowledged)) == 1000
    d.stop()
    db = apsw.Connection(str(d.journal))
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    # Every acknowledged run is in the journal exactly once, terminal, and every
    # attempt is closed; at most one attempt per run was lost (to the one crash).
    rows = db.execute("SELECT id, state, attempts, lost FROM runs").fetchall()
    assert sorted(r[0] for r in rows) == sorted(acknowledged)
    assert all(r[3] <= 1 and r[2] == r[3] + 1 for r in rows)
    open_attempts = db.execute("SELECT count(*) FROM attempts WHERE ended_at IS NULL").fetchall()
    assert open_attempts == [(0,)]
    lost = db.execute("SELECT count(*) FROM attempts WHERE outcome = 'lost'").fetchall()[0][0]
    assert lost == sum(r[3] for r in rows)


def test_leftover_process_of_a_lost_attempt_is_killed_before_retry(
    daemon: DaemonProcess, workdir: Path
) -> None:
    c = daemon.raw()
    marker = workdir / "starts"
    pidfile = workdir / "pid"
    run_id = c.result(
        "submit",
        {
            "shell": f"echo $JOBD_ATTEMPT >> {marker}; [ $JOBD_ATTEMPT -gt 1 ] && exit 0;"
            f" sleep 300 & echo $! > {pidfile}; wait"
        },
    )["id"]
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), "the first attempt")
    survivor = int(pidfile.read_text())
    daemon.kill()
    assert pid_alive(survivor)  # own session: it outlives the daemon
    daemon.start()
    c = daemon.raw()
    run = wait_all(c, [run_id])[run_id]
    assert run["state"] == "succeeded" and run["attempts"] == 2
    # Killed, and the SIGKILL takes effect (asynchronously).
    wait_for(lambda: not pid_alive(survivor), "the leftover to be killed")
    attempts = c.result("get", {"id": run_id})["attempt_list"]
    assert [a["outcome"] for a in attempts] == ["lost", "succeeded"]
    assert marker.read_text().split() == ["1", "2"]


def test_leftover_without_jobd_environment_is_found_by_its_journaled_pid(
    daemon: DaemonProcess, workdir: Path
) -> None:
    """A job that replaced its environment (env -i, su -) carries no JOBD_* marks: the
    journaled pid and start time of the attempt's process find it instead."""
    c = daemon.raw()
    run_id = c.result(
        "submit", {"shell": "[ $JOBD_ATTEMPT -gt 1 ] && exit 0; exec env -i /bin/sleep 300"}
    )["id"]
    wait_for(
        lambda: (c.result("get", {"id": run_id})["attempt_list"] or [{}])[0].get("pid"),
        "the attempt's pid in the journal",
    )
    leader = c.result("get", {"id": run_id})["attempt_list"][0]["pid"]
    ticks = start_ticks(leader)
    try:
        wait_for(
            lambda: Path(f"/proc/{leader}/cmdline").read_bytes().startswith(b"/bin/sleep"),
            "the exec",
        )
        assert b"JOBD_" not in Path(f"/proc/{leader}/environ").read_bytes()
        daemon.kill()
        assert pid_alive(leader)
        daemon.start()
        c = daemon.raw()
        run = wait_all(c, [run_id])[run_id]
        assert run["state"] == "succeeded" and run["attempts"] == 2
        wait_for(lambda: not pid_alive(leader), "the leftover to be killed")
    finally:  # it carries none of the suite's marks either: no teardown would find it
        kill_group_if_same(leader, ticks)


def test_sigterm_puts_prefetched_runs_back_in_the_queue_unbegun(
    daemon_factory: type[DaemonProcess], workdir: Path
) -> None:
    """Runs handed to a pool ahead of its free workers (prefetch) have not begun when
    the daemon is told to stop: they go back to the queue at once, none begins during
    the grace period, and none counts as lost (a graceful restart loses nothing)."""
    d = daemon_factory(
        "[pools.lane]\nkind = 'process'\nworkers = 1\nprefetch = 4\n", daemon_keys=LONG_GRACE
    )
    d.start()
    c = d.raw()
    release, starts = workdir / "release", workdir / "starts"
    blocking = c.result("submit", {"command": blocker(release), "pool": "lane"})["id"]
    waiting = [
        c.result("submit", {"shell": f"echo $JOBD_RUN_ID >> {starts}", "pool": "lane"})["id"]
        for _ in range(4)
    ]
    wait_for(lambda: begun(c, blocking), "the blocking run to begin")
    wait_for(
        lambda: all(c.result("get", {"id": i})["state"] == "running" for i in waiting),
        "the prefetched runs to be handed to the pool",
    )
    d.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    # Reads are still served while the daemon stops: the prefetched runs are queued
    # again, with no attempt, while the begun one runs on.
    wait_for(
        lambda: all(
            c.result("get", {"id": i})["state"] == "queued"
            and c.result("get", {"id": i})["attempt_list"] == []
            for i in waiting
        ),
        "the prefetched runs to be withdrawn",
    )
    assert c.result("get", {"id": blocking})["state"] == "running"
    release.touch()
    assert d.proc.wait(60) == 0  # type: ignore[union-attr]
    d.proc = None
    assert not starts.exists()  # none of them began
    d.start()
    c = d.raw()
    runs = wait_all(c, waiting)
    assert {r["state"] for r in runs.values()} == {"succeeded"}
    infos = [c.result("get", {"id": i}) for i in waiting]
    assert {(r["attempts"], r["lost"]) for r in infos} == {(1, 0)}
    assert sorted(map(int, starts.read_text().split())) == waiting
    assert c.result("get", {"id": blocking})["state"] == "succeeded"


def test_sigterm_waits_for_short_runs_and_requeues_long_ones(
    daemon_factory: type[DaemonProcess], workdir: Path
) -> None:
    daemon = daemon_factory(daemon_keys=LONG_GRACE)
    daemon.start()
    c = daemon.raw()
    release = workdir / "release"
    short = c.result("submit", {"command": blocker(release)})["id"]
    long_run = c.result("submit", {"command": ["sleep", "300"], "pool": "default"})["id"]
    wait_for(lambda: begun(c, short) and begun(c, long_run), "both to begin")
    daemon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    wait_for(lambda: "shutting down" in daemon.log_text(), "the shutdown to begin")
    # New work is refused while draining, on connections that were open.
    reply = c.request("submit", {"command": ["true"]})
    assert reply.get("error", {}).get("code") == "shutting_down", reply
    release.touch()  # the short run finishes within the grace period
    wait_for(lambda: c.result("get", {"id": short})["state"] == "succeeded", "the short run")
    assert c.result("get", {"id": long_run})["state"] == "running"  # still waited for
    # Enough: the second signal stops the long one now, as the grace period's end would.
    daemon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert daemon.proc.wait(60) == 0  # type: ignore[union-attr]
    daemon.proc = None
    daemon.start()
    c = daemon.raw()
    assert c.result("get", {"id": short})["state"] == "succeeded"
    long_info = c.result("get", {"id": long_run})
    assert long_info["attempt_list"][0]["outcome"] == "lost"
    c.result("cancel", {"ids": [long_run]})
    wait_all(c, [long_run])


def test_runs_still_running_when_the_grace_period_ends_are_stopped_and_requeued(
    daemon_factory: type[DaemonProcess],
) -> None:
    daemon = daemon_factory(daemon_keys='shutdown_grace = "1s"\nkill_grace = "2s"')
    daemon.start()
    c = daemon.raw()
    run_id = c.result("submit", {"command": ["sleep", "300"]})["id"]
    pid = wait_for(lambda: begun(c, run_id), "it to begin")
    daemon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert daemon.proc.wait(60) == 0  # type: ignore[union-attr]
    daemon.proc = None
    assert "re-queued at the next start" in daemon.log_text()
    wait_for(lambda: not pid_alive(pid), "the attempt's process to be stopped")
    daemon.start()
    c = daemon.raw()
    run = c.result("get", {"id": run_id})
    assert run["attempt_list"][0]["outcome"] == "lost", run
    assert run["state"] in ("queued", "running"), run  # again
    c.result("cancel", {"ids": [run_id]})
    assert wait_all(c, [run_id])[run_id]["state"] == "cancelled"


def test_second_sigterm_cuts_the_grace_period_short(daemon_factory: type[DaemonProcess]) -> None:
    daemon = daemon_factory(daemon_keys=LONG_GRACE)  # no waiting it out: exit 0 is the cut
    daemon.start()
    c = daemon.raw()
    run_id = c.result("submit", {"command": ["sleep", "300"]})["id"]
    wait_for(lambda: begun(c, run_id), "it to begin")
    daemon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    wait_for(lambda: "shutting down" in daemon.log_text(), "the shutdown to begin")
    daemon.proc.send_signal(signal.SIGINT)  # type: ignore[union-attr]
    assert daemon.proc.wait(60) == 0  # type: ignore[union-attr]
    assert "again: stopping running attempts now" in daemon.log_text()
    daemon.proc = None


def test_second_daemon_on_the_same_state_dir_is_refused(daemon: DaemonProcess) -> None:
    out = subprocess.run(
        [*JOBD, "--config", str(daemon.config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert f"another jobd (pid {daemon.proc.pid})" in out.stderr  # type: ignore[union-attr]
    daemon.raw().result("stats")  # the first one is unaffected


def test_journal_from_a_newer_version_is_refused(daemon_factory: type[DaemonProcess]) -> None:
    d = daemon_factory()
    d.start()
    d.stop()
    db = apsw.Connection(str(d.journal))
    db.execute("PRAGMA user_version = 99")
    db.close()
    d.write_config()
    out = subprocess.run(
        [*JOBD, "--config", str(d.config)], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1
    assert "schema version 99" in out.stderr and "hint:" in out.stderr


@pytest.mark.parametrize("problem", ["file-in-the-way", "invalid-toml", "bad-value"])
def test_bad_configuration_or_state_dir_gives_a_clear_error(workdir: Path, problem: str) -> None:
    config = workdir / "jobd.toml"
    if problem == "file-in-the-way":
        blocker_file = workdir / "notadir"
        blocker_file.write_text("")
        config.write_text(
            f'[daemon]\nstate_dir = "{blocker_file}/state"\nsocket = "{workdir}/s.sock"\n'
        )
        expected = "cannot create"
    elif problem == "invalid-toml":
        config.write_text("[daemon\nstate_dir = 1\n")
        expected = "not valid TOML"
    else:
        config.write_text('[daemon]\nsynchronous = "sometimes"\n[pools.p]\nworkers = 0\n')
        expected = "pools.p.workers"
    out = subprocess.run(
        [*JOBD, "--config", str(config)], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1
    assert expected in out.stderr
    if problem == "bad-value":
        assert "daemon.synchronous" in out.stderr  # every problem reported at once


def test_stale_socket_is_replaced_and_non_socket_refused(
    daemon_factory: type[DaemonProcess],
) -> None:
    d = daemon_factory()
    d.start()
    d.kill()
    assert d.socket.exists()  # left behind by SIGKILL
    d.start()  # replaced
    d.stop()
    d.socket.write_text("not a socket")
    out = subprocess.run(
        [*JOBD, "--config", str(d.config)], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1 and "is not a socket" in out.stderr
    assert os.path.isfile(d.socket)


def test_logs_follow_streams_until_the_run_ends(daemon: DaemonProcess, workdir: Path) -> None:
    c = daemon.raw()
    go = workdir / "go"
    script = (
        f'echo first; while [ ! -e "{go}" ] && [ -d "{workdir}" ]; do sleep 0.02; done; echo second'
    )
    run_id = c.result("submit", {"shell": script})["id"]
    wait_for(lambda: c.result("get", {"id": run_id})["state"] == "running", "it to run")
    request_id = c.send("logs", {"id": run_id, "follow": True})
    received = ""
    while "first" not in received:
        reply = c.read()
        assert reply is not None and reply["id"] == request_id and "event" in reply, reply
        received += reply["event"]["data"]
    go.touch()
    while True:
        reply = c.read()
        assert reply is not None and reply["id"] == request_id
        if "result" in reply:
            break
        received += reply["event"]["data"]
    assert received == "first\nsecond\n"
    assert reply["result"] == {"id": run_id, "attempt": 1, "state": "succeeded"}


def test_a_cancel_acknowledged_before_a_crash_is_not_undone(
    daemon_factory: type[DaemonProcess], workdir: Path
) -> None:
    # A long kill_grace and a job that ignores SIGTERM: the daemon dies while
    # the run is still "cancelling". It must come back cancelled, not re-run.
    d = daemon_factory(daemon_keys='shutdown_grace = "5s"\nkill_grace = "300s"')
    d.start()
    c = d.raw()
    starts, pidfile = workdir / "starts", workdir / "pid"
    script = (
        f"trap '' TERM; echo $JOBD_ATTEMPT >> {starts}; echo $$ > {pidfile};"
        f' while [ -d "{workdir}" ]; do sleep 0.02; done'
    )
    run_id = c.result("submit", {"shell": script})["id"]
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), "the attempt to start")
    pid = int(pidfile.read_text())
    assert c.result("cancel", {"ids": [run_id]})["results"] == {str(run_id): "cancelling"}
    assert pid_alive(pid)  # ignores SIGTERM
    d.kill()
    d.start()
    c = d.raw()
    run = c.result("get", {"id": run_id})
    assert run["state"] == "cancelled"
    assert [a["outcome"] for a in run["attempt_list"]] == ["lost"]
    assert starts.read_text().split() == ["1"]  # never started again
    wait_for(lambda: not pid_alive(pid), "the leftover to be killed")


def test_wait_wakes_when_some_runs_had_already_ended(daemon: DaemonProcess, workdir: Path) -> None:
    # The scenario of a bug: a run already terminal when the wait began was
    # dropped from the waiter without waking it, so the wait slept until its
    # timeout if the other run ended during the first journal read. That window
    # cannot be forced from outside; test_waiter_wakes_however_its_last_run_goes
    # pins the mechanism, this test the behaviour around it.
    c = daemon.raw()
    done = c.result("submit", {"command": ["true"]})["id"]
    wait_all(c, [done])
    for _ in range(20):
        quick = c.result("submit", {"command": ["true"]})["id"]
        # A missed wake-up would outlast the client socket deadline and fail.
        result = c.result("wait", {"ids": [done, quick], "timeout": 600})
        assert not result["timed_out"]
        assert [r["state"] for r in result["runs"]] == ["succeeded", "succeeded"]
    go = workdir / "go"
    slow = c.result("submit", {"command": blocker(go)})["id"]
    request = c.send("wait", {"ids": [done, slow], "timeout": 600})
    wait_for(lambda: c.result("get", {"id": slow})["state"] == "running", "it to run")
    go.touch()
    while (reply := c.read()) is not None and reply["id"] != request:
        pass
    assert reply is not None and not reply["result"]["timed_out"]


def test_waiter_wakes_however_its_last_run_goes() -> None:
    for order in ([1, 2], [2, 1]):
        waiter = _Waiter({1, 2})
        for run_id in order:  # one by a commit notification, one by the journal read
            assert not waiter.done.is_set()
            waiter.discard(run_id)
        assert waiter.done.is_set() and not waiter.remaining
    assert _Waiter(set()).done.is_set()


def test_a_full_disk_is_refused_clearly_and_loses_nothing(
    daemon_factory: type[DaemonProcess], workdir: Path
) -> None:
    """A real write failure: the daemon's file size limit (RLIMIT_FSIZE) set below the
    journal's WAL, so every commit fails with EFBIG, as on a full disk."""
    daemon = daemon_factory("[pools.one]\nkind = 'process'\nworkers = 1\n")
    daemon.start()
    c = daemon.raw()
    release, finish = workdir / "release", workdir / "finish"
    busy = [
        c.result("submit", {"command": blocker(release), "pool": "one"})["id"],
        c.result("submit", {"command": blocker(finish)})["id"],
    ]
    queued = c.result("submit", {"command": ["true"], "pool": "one"})["id"]  # one is busy
    wait_for(  # nothing of theirs left to commit once the disk is "full"
        lambda: all(c.result("get", {"id": i})["attempt_list"][0]["pid"] for i in busy),
        "the busy runs' pids in the journal",
    )
    assert daemon.proc is not None
    pid = daemon.proc.pid
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)

    def disk_full() -> None:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, hard))

    def disk_has_room() -> None:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
        wait_for(lambda: c.result("stats")["daemon"]["healthy"], "the journal to commit again")

    def not_acknowledged(reply: dict[str, Any]) -> None:
        # Answered at once (not after the disk has room), and saying what it means.
        error = reply.get("error", {})
        assert error.get("code") == "unavailable", reply
        assert "not acknowledged" in error["message"] and error.get("hint"), reply

    try:
        disk_full()
        not_acknowledged(c.request("cancel", {"ids": [queued]}))
        # Later requests are refused up front; reads still work.
        reply = c.request("submit", {"command": ["true"]})
        assert reply.get("error", {}).get("code") == "unavailable", reply
        assert "nothing was accepted" in reply["error"]["message"], reply
        stats = c.result("stats")
        assert stats["daemon"]["healthy"] is False and stats["daemon"]["last_error"]
        assert c.result("get", {"id": busy[0]})["state"] == "running"
        disk_has_room()
        # The held cancel took effect once it could be journaled: the run never ran.
        assert wait_all(c, [queued])[queued]["state"] == "cancelled"
        assert c.result("get", {"id": queued})["attempt_list"] == []

        disk_full()
        not_acknowledged(c.request("submit", {"command": ["true"], "name": "held"}))
        disk_has_room()
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
    # The held submission is committed and runs, as the error said it might.
    held = c.result("list", {"name": "held"})["runs"]
    assert len(held) == 1
    release.touch()
    finish.touch()
    assert wait_all(c, [held[0]["id"]])[held[0]["id"]]["state"] == "succeeded"
    assert {r["state"] for r in wait_all(c, busy).values()} == {"succeeded"}
    assert daemon.stop() == 0
    db = apsw.Connection(str(daemon.journal))
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


@pytest.mark.slow
def test_sigterm_while_the_journal_cannot_commit_exits_1_in_bounded_time(
    daemon: DaemonProcess,
) -> None:
    c = daemon.raw()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, hard))
    reply = c.request("submit", {"command": ["true"], "name": "never-acknowledged"})
    assert reply.get("error", {}).get("code") == "unavailable", reply
    # It does not hang in its last commit: it gives up after FINAL_FLUSH_SECONDS and
    # exits 1. (What it logs cannot reach this test: the daemon's log is a file, under
    # the same size limit.)
    assert daemon.stop() == 1
    daemon.start()
    c = daemon.raw()
    assert c.result("list", {"name": "never-acknowledged"})["runs"] == []
    assert c.result("stats")["daemon"]["healthy"] is True


def test_jobs_start_with_default_signal_actions_whatever_the_daemon_ignored(
    daemon_factory: type[DaemonProcess],
) -> None:
    """nohup and `&` start the daemon with SIGHUP/SIGQUIT ignored; SIG_IGN survives
    exec, so every job would ignore them too (and could not be stopped with them)."""
    d = daemon_factory()
    ignored = (signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)
    before = {s: signal.signal(s, signal.SIG_IGN) for s in ignored}
    try:
        d.start()  # inherits the ignored dispositions, as from nohup
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    c = d.raw()
    run_id = c.result("submit", {"shell": "grep SigIgn /proc/self/status"})["id"]
    (run,) = wait_all(c, [run_id]).values()
    assert run["state"] == "succeeded", run
    output = "".join(
        reply["event"]["data"]
        for reply in _replies_until_result(c, c.send("logs", {"id": run_id}))
        if "event" in reply
    )
    mask = int(output.split()[1], 16)
    for s in ignored:
        assert not mask & (1 << (s - 1)), f"the job ignores {s.name}: {output}"


def _replies_until_result(c: Any, request_id: int) -> list[dict[str, Any]]:
    replies = []
    while (reply := c.read()) is not None:
        assert reply["id"] == request_id, reply
        replies.append(reply)
        if "event" not in reply:
            break
    return replies


def test_more_signals_during_shutdown_never_make_it_unclean(
    daemon_factory: type[DaemonProcess],
) -> None:
    """The signal listener lives until the exit: a third or fourth signal (an
    impatient operator, a service manager) never interrupts the final commit."""
    d = daemon_factory()
    for _ in range(5):
        d.start()
        assert d.proc is not None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGINT):
            d.proc.send_signal(sig)
        assert d.stop() == 0, d.log_text()[-3000:]
        assert "Traceback" not in d.log_text(), d.log_text()[-3000:]
