"""Text that enters from runs, not from the protocol (a callable's exception, an
OS error) is made valid Unicode and bounded before it reaches the journal: one
run's message can neither stop the daemon nor fail ``list``/``get`` for everyone."""

from __future__ import annotations

import json

from jobd.core.model import ERROR_TEXT_LIMIT
from tests.conftest import DaemonProcess, wait_for


def _finished(conn: object, run_id: int) -> dict[str, object]:
    def ended() -> dict[str, object] | None:
        run = conn.result("get", {"id": run_id})  # type: ignore[attr-defined]
        return run if run["state"] in ("succeeded", "failed") else None

    return wait_for(ended, f"run {run_id} to end")  # type: ignore[no-any-return]


def test_a_callable_raising_text_that_is_not_unicode_fails_only_its_run(
    daemon: DaemonProcess,
) -> None:
    c = daemon.raw()
    bad = c.result("submit", {"call": "tests.callables:raise_lone_surrogate", "pool": "python"})
    run = _finished(c, bad["id"])
    assert run["state"] == "failed"
    assert run["reason"] == "ValueError: bad \ufffd text \ufffd"
    # The traceback is its output, and logs serves it (not encodable as is: escaped).
    request_id = c.send("logs", {"id": bad["id"]})
    output = ""
    while (reply := c.read()) is not None and "event" in reply:
        assert reply["id"] == request_id
        output += reply["event"]["data"]
    assert reply is not None and "result" in reply, reply
    assert "ValueError: bad \\ud800 text \\udc80" in output
    assert c.result("list", {})["runs"]
    json.dumps(c.result("stats"))
    assert c.result("stats")["daemon"]["healthy"]
    assert c.result("stats")["journal"]["refused_runs"] == 0  # cleaned before, not refused
    daemon.stop()
    daemon.start()  # and the journal reads back after a restart
    c = daemon.raw()
    assert c.result("get", {"id": bad["id"]})["reason"] == "ValueError: bad \ufffd text \ufffd"


def test_a_callable_raising_a_huge_message_is_bounded(daemon: DaemonProcess) -> None:
    c = daemon.raw()
    run_id = c.result(
        "submit",
        {"call": "tests.callables:raise_huge", "args": [5_000_000], "pool": "python"},
    )["id"]
    run = _finished(c, run_id)
    assert run["state"] == "failed"
    reason = run["reason"]
    assert isinstance(reason, str) and len(reason) <= ERROR_TEXT_LIMIT
    assert reason.startswith("RuntimeError: xxx") and reason.endswith("…")
