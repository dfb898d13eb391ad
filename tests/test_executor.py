"""The executor on its own: a real pool of worker threads on a trio loop."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import trio

from jobd.config import PoolConfig
from jobd.core.effects import KillLeftovers, Started
from jobd.core.model import Kind, Outcome, Result, Spec
from jobd.executor import Executor, Handback, _start_ticks, reap_leftovers
from tests.conftest import SUITE_ID, SUITE_MARK


async def test_a_kill_that_comes_after_the_result_leaves_nothing_behind(tmp_path: Path) -> None:
    # A cancel can be committed after the attempt's result was handed back (the
    # two race). Such a late kill must not be remembered for ever.
    results: list[Handback] = []
    arrived = trio.Event()

    def on_handback(items: list[Handback]) -> None:
        results.extend(items)
        arrived.set()

    executor = Executor(
        {"python": PoolConfig("python", "thread", 1)}, tmp_path, "test", on_handback, 1.0
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        executor.start(Started(1, 1, 0.0, "python", Spec(Kind.CALL, call="jobd.demo:noop")))
        await arrived.wait()
        assert isinstance(results[0], Result) and results[0].outcome is Outcome.SUCCEEDED
        executor.kill(1, 1)
        assert not executor._kill_requested and not executor._pending
        nursery.cancel_scope.cancel()


def reap(
    instance: str, attempts: list[KillLeftovers], *, same_boot: bool
) -> tuple[list[KillLeftovers], list[KillLeftovers], bool]:
    reaped = reap_leftovers(instance, attempts, same_boot=same_boot, timeout=60)
    return reaped.gone, reaped.alive, bool(reaped.found)


def test_leftovers_are_matched_by_pid_and_start_time_never_by_pid_alone() -> None:
    # A process that reused a journaled pid (after a reboot, in a new pid namespace,
    # after the pids wrapped) has another start time: it is left alone.
    # No JOBD_INSTANCE, JOBD_RUN_ID or JOBD_ATTEMPT: only pid and start time can match.
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True, env={SUITE_MARK: SUITE_ID})
    try:
        ticks = _start_ticks(proc.pid)
        assert ticks is not None
        stranger = KillLeftovers(7, 1, pid=proc.pid, pid_started=ticks - 1)
        assert reap("some-instance", [stranger], same_boot=True) == ([stranger], [], False)
        ours = KillLeftovers(7, 1, pid=proc.pid, pid_started=ticks)
        # Journaled in another boot: pid and ticks may match a stranger by chance.
        assert reap("some-instance", [ours], same_boot=False) == ([ours], [], False)
        assert proc.poll() is None
        # Found, killed, and seen gone (a zombie until we reap it: dead) before it returns.
        assert reap("some-instance", [ours], same_boot=True) == ([ours], [], True)
        assert proc.poll() == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
