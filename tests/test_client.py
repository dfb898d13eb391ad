"""jobd.client against a real daemon: the blocking Client and the trio AsyncClient.

Every wait here is for a condition (a run's state, a marker file), never a
fixed sleep. Commands that must stay running block on a file in the test's
temp dir and exit by themselves when that dir is removed.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from jobd.client import AsyncClient, Client, default_socket_path
from jobd.config import DEFAULT_SOCKET
from jobd.errors import ClientError, DaemonNotRunning, RemoteError, RequestTooLarge
from tests.conftest import DaemonProcess, wait_for

TIMEOUT = 60.0  # seconds a reply may take: only matters when something is broken
WHOLE_TEST = 300.0  # seconds an async test may take in all: only matters when something hangs


def blocker(path: Path) -> list[str]:
    """Runs until ``path`` exists, or its directory is removed (no process outlives a test)."""
    return ["sh", "-c", f'while [ ! -e "{path}" ] && [ -d "{path.parent}" ]; do sleep 0.02; done']


def noop_runs(count: int, tag: str) -> list[dict[str, Any]]:
    """Cheap submissions (a callable that does nothing), each named after its position."""
    return [
        {"call": "jobd.demo:noop", "pool": "python", "tags": [tag], "name": f"{tag}-{i}"}
        for i in range(count)
    ]


def stale_socket(path: Path) -> Path:
    """A socket file nobody listens on (what a killed daemon leaves behind)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    finally:
        sock.close()
    return path


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[Client]:
    with Client(daemon.socket, timeout=TIMEOUT) as c:
        yield c


def wait_until_finished(client: Client, **filters: Any) -> None:
    """Poll until no matching run is queued or running (``wait`` would need every id)."""
    wait_for(
        lambda: not client.list(state=["queued", "running"], limit=1, **filters)["runs"],
        "the runs to finish",
    )


def state_of(client: Client, run_id: int) -> str:
    state: str = client.get(run_id)["state"]
    return state


# -- the blocking client ----------------------------------------------------


def test_submit_get_wait_logs_list_stats(client: Client, daemon: DaemonProcess) -> None:
    info = client.server_info
    assert info["protocol"] == 1 and info["pid"] == daemon.proc.pid  # type: ignore[union-attr]
    assert "admin" in info["roles"]

    run_id = client.submit(command=["echo", "hi"], name="greet", tags=["a", "b"])
    failing = client.submit(shell="echo oops >&2; exit 3")
    assert isinstance(run_id, int)
    assert client.wait(run_id)["runs"][0]["id"] == run_id  # a single id, not a list
    client.wait([failing])
    done = client.wait([run_id, failing])  # both over: answered at once, in the order asked
    assert done["timed_out"] is False
    assert [r["id"] for r in done["runs"]] == [run_id, failing]
    ok, bad = done["runs"]
    assert ok["state"] == "succeeded" and ok["exit_code"] == 0
    assert bad["state"] == "failed" and bad["exit_code"] == 3

    run = client.get(run_id)
    assert run["command"] == ["echo", "hi"] and run["kind"] == "command"
    assert run["name"] == "greet" and run["tags"] == ["a", "b"]
    assert [a["outcome"] for a in run["attempt_list"]] == ["succeeded"]

    assert "".join(client.logs(run_id)) == "hi\n"
    assert "".join(client.logs(run_id, attempt=1)) == "hi\n"
    assert "".join(client.logs(failing)) == "oops\n"

    page = client.list(state="succeeded")
    assert [r["id"] for r in page["runs"]] == [run_id] and page["next_cursor"] is None
    assert [r["id"] for r in client.list()["runs"]] == [failing, run_id]  # newest first
    assert [r["id"] for r in client.list(tag="b", pool=None)["runs"]] == [run_id]
    assert [r["id"] for r in client.iter_runs(state=["failed"])] == [failing]

    stats = client.stats()
    assert stats["daemon"]["socket"] == str(daemon.socket)
    assert stats["daemon"]["healthy"] is True
    assert {p["name"] for p in stats["pools"]} >= {"default", "python"}
    assert stats["states"] == {"succeeded": 1, "failed": 1}


def test_wait_timeout_and_cancel(client: Client, workdir: Path) -> None:
    go = workdir / "go"
    running = client.submit(command=blocker(go))
    other = client.submit(command=blocker(go))
    wait_for(
        lambda: state_of(client, running) == state_of(client, other) == "running",
        "both workers to be busy",
    )
    queued = client.submit(command=["true"])
    assert state_of(client, queued) == "queued"

    result = client.wait([running, queued], timeout=0.05)
    assert result["timed_out"] is True
    assert [r["state"] for r in result["runs"]] == ["running", "queued"]

    missing = 10**6
    assert client.cancel([queued, running, missing]) == {
        "results": {str(queued): "cancelled", str(running): "cancelling", str(missing): "not_found"}
    }
    assert client.wait(running, timeout=TIMEOUT)["timed_out"] is False
    result = client.wait([queued, running])
    assert [r["state"] for r in result["runs"]] == ["cancelled", "cancelled"]
    assert client.cancel(queued) == {"results": {str(queued): "already_cancelled"}}

    go.touch()
    assert client.wait(other)["runs"][0]["state"] == "succeeded"


def test_logs_follow_streams_until_the_run_ends(client: Client, workdir: Path) -> None:
    go = workdir / "go"
    script = (
        f'echo first; while [ ! -e "{go}" ] && [ -d "{workdir}" ]; do sleep 0.02; done; echo second'
    )
    run_id = client.submit(shell=script)
    received = ""
    for chunk in client.logs(run_id, follow=True):
        received += chunk
        if "first\n" in received and not go.exists():
            # Other requests on the same connection while the stream is open: their
            # replies and the stream's events are told apart by request id.
            assert state_of(client, run_id) == "running"
            assert client.stats()["states"] == {"running": 1}
            go.touch()  # the run can only finish after its first output reached us
    assert received == "first\nsecond\n"
    assert state_of(client, run_id) == "succeeded"
    # A stream abandoned half-way (the daemon keeps sending it) leaves the client usable.
    follow = client.submit(shell=script.replace(str(go), str(workdir / "never")))
    stream = client.logs(follow, follow=True)
    assert next(stream) == "first\n"
    stream.close()
    assert state_of(client, follow) == "running"
    assert client.cancel(follow)["results"] == {str(follow): "cancelling"}
    assert client.wait(follow)["runs"][0]["state"] == "cancelled"


def test_reply_timeout(daemon: DaemonProcess, workdir: Path) -> None:
    with Client(daemon.socket, timeout=TIMEOUT) as client:
        blocked = client.submit(command=blocker(workdir / "never"))
        client.timeout = 0.05
        with pytest.raises(ClientError, match="no reply from jobd") as info:
            client.call("wait", {"ids": [blocked]})  # nothing ends it
        assert info.value.hint is not None
        client.timeout = TIMEOUT
        # The late reply, if it ever comes, is dropped; the connection goes on.
        assert state_of(client, blocked) == "running"
        result = client.wait(blocked, timeout=0)  # the daemon's timeout: timed_out
        assert result["timed_out"] is True
        client.cancel(blocked)
        assert client.wait(blocked)["runs"][0]["state"] == "cancelled"


def test_submit_many_splits_batches_and_iter_runs_follows_cursors(client: Client) -> None:
    client.max_batch = 300  # 1,001 runs: four requests, one after the other
    runs = noop_runs(1001, "many")
    ids = client.submit_many(runs)
    assert len(ids) == len(set(ids)) == 1001
    assert client.submit_many([]) == []

    first = client.list(tag="many", limit=1000)
    assert len(first["runs"]) == 1000 and first["next_cursor"] is not None
    listed = list(client.iter_runs(tag="many"))  # pages of 1,000: two of them
    assert [r["id"] for r in listed] == sorted(ids, reverse=True)
    # Each id is that of the submission in its position.
    assert {r["id"]: r["name"] for r in listed} == {
        i: r["name"] for i, r in zip(ids, runs, strict=True)
    }

    small_pages = list(client.iter_runs(tag="many", limit=7))  # 143 pages
    assert [r["id"] for r in small_pages] == [r["id"] for r in listed]
    wait_until_finished(client, tag="many")
    assert client.stats()["states"] == {"succeeded": 1001}


def test_submit_batches_pipelines_and_returns_every_id_once(client: Client) -> None:
    client.max_batch = 50
    sizes = [120, 30, 75, 1, 40]  # split into 8 requests, up to 3 in flight
    batches = [noop_runs(n, f"batch{b}") for b, n in enumerate(sizes)]
    ids = client.submit_batches(batches, window=3)
    submitted = [run for batch in batches for run in batch]
    assert len(ids) == len(set(ids)) == len(submitted) == sum(sizes)
    names = {r["id"]: r["name"] for r in client.iter_runs(state=None, pool="python")}
    assert {i: names[i] for i in ids} == {i: r["name"] for i, r in zip(ids, submitted, strict=True)}
    assert len(names) == len(ids)  # no run created twice, none missing
    wait_until_finished(client)
    assert client.stats()["states"] == {"succeeded": len(ids)}
    with pytest.raises(ValueError, match="window"):
        client.submit_batches(batches, window=0)


def test_remote_errors_carry_the_code(client: Client) -> None:
    def code_of(fn: Any, /, *args: Any, **kwargs: Any) -> RemoteError:
        with pytest.raises(RemoteError) as info:
            fn(*args, **kwargs)
        return info.value

    exc = code_of(client.submit, command="echo hi")  # a string, not an argv list
    assert exc.code == "invalid_params" and "command" in exc.message
    exc = code_of(client.submit, command=["true"], pool="nope")
    assert exc.code == "invalid_params" and exc.hint is not None and "default" in exc.hint
    exc = code_of(client.submit, call="jobd.demo:noop", pool="default")
    assert exc.code == "invalid_params"
    exc = code_of(client.submit_many, [{"command": ["true"]}, {"shell": 1}])
    assert exc.code == "invalid_params" and "runs[1]" in exc.message
    assert code_of(client.get, 10**6).code == "not_found"
    assert code_of(client.wait, [10**6]).code == "not_found"
    assert code_of(lambda: list(client.logs(10**6))).code == "not_found"
    assert code_of(client.list, limit=0).code == "invalid_params"
    assert code_of(client.call, "frobnicate").code == "unknown_method"
    assert isinstance(exc, ClientError)
    assert client.list()["runs"] == []  # nothing was submitted, and the connection still works


def test_connection_closed_or_lost(daemon: DaemonProcess) -> None:
    closed = Client(daemon.socket, timeout=TIMEOUT)
    closed.close()
    closed.close()  # idempotent
    with pytest.raises(ClientError, match="closed by this client"):
        closed.stats()
    with Client(daemon.socket, timeout=TIMEOUT) as client:
        client.stats()
        daemon.kill()
        with pytest.raises(ClientError) as info:
            client.stats()
        assert not isinstance(info.value, RemoteError)
        assert info.value.hint is not None and "daemon" in info.value.hint


def test_default_socket_path(monkeypatch: pytest.MonkeyPatch, workdir: Path) -> None:
    monkeypatch.delenv("JOBD_SOCKET", raising=False)
    monkeypatch.chdir(workdir)
    assert default_socket_path() == DEFAULT_SOCKET
    (workdir / ".jobd").mkdir()
    stale_socket(workdir / ".jobd" / "jobd.sock")
    assert default_socket_path() == str(workdir / ".jobd" / "jobd.sock")
    monkeypatch.setenv("JOBD_SOCKET", "")  # empty: as if unset
    assert default_socket_path() == str(workdir / ".jobd" / "jobd.sock")
    monkeypatch.setenv("JOBD_SOCKET", "/elsewhere/jobd.sock")
    assert default_socket_path() == "/elsewhere/jobd.sock"


def test_clients_find_the_daemon_through_the_environment(
    monkeypatch: pytest.MonkeyPatch, daemon: DaemonProcess
) -> None:
    monkeypatch.setenv("JOBD_SOCKET", str(daemon.socket))
    with Client(timeout=TIMEOUT) as client:
        assert client.path == str(daemon.socket)
        assert client.stats()["daemon"]["socket"] == str(daemon.socket)


def test_daemon_not_running_without_a_socket(workdir: Path) -> None:
    for path in (workdir / "missing.sock", workdir / "no" / "such" / "dir.sock"):
        with pytest.raises(DaemonNotRunning) as info:
            Client(path, timeout=TIMEOUT)
        assert str(path) in info.value.message
        assert info.value.hint is not None and "JOBD_SOCKET" in info.value.hint


def test_daemon_not_running_with_a_stale_socket(workdir: Path) -> None:
    path = stale_socket(workdir / "stale.sock")
    with pytest.raises(DaemonNotRunning, match="nothing listens") as info:
        Client(path, timeout=TIMEOUT)
    assert info.value.hint is not None and "JOBD_SOCKET" in info.value.hint
    # A regular file is not a stopped daemon: it is the wrong path.
    (workdir / "file").write_text("")
    with pytest.raises(ClientError, match="not a socket") as other:
        Client(workdir / "file", timeout=TIMEOUT)
    assert not isinstance(other.value, DaemonNotRunning)


def test_socket_left_by_a_killed_daemon(daemon: DaemonProcess) -> None:
    daemon.kill()
    assert daemon.socket.exists()
    with pytest.raises(DaemonNotRunning, match="nothing listens"):
        Client(daemon.socket, timeout=TIMEOUT)


# -- the trio client --------------------------------------------------------


async def test_async_client_methods(daemon: DaemonProcess, workdir: Path) -> None:
    go = workdir / "go"
    with trio.fail_after(WHOLE_TEST):
        async with AsyncClient(daemon.socket) as client:
            assert client.server_info["protocol"] == 1
            run_id = await client.submit(command=["echo", "hi"], tags=["t"])
            done = await client.wait([run_id])
            assert done["timed_out"] is False
            assert done["runs"][0]["state"] == "succeeded"
            run = await client.get(run_id)
            assert run["command"] == ["echo", "hi"] and len(run["attempt_list"]) == 1
            assert [chunk async for chunk in client.logs(run_id)] == ["hi\n"]

            ids = await client.submit_many(noop_runs(5, "few"))
            assert len(set(ids)) == 5
            listed = [r["id"] async for r in client.iter_runs(tag="few", limit=2)]  # 3 pages
            assert listed == sorted(ids, reverse=True)
            page = await client.list(tag="few", limit=2)
            assert len(page["runs"]) == 2 and page["next_cursor"] is not None

            client.max_batch = 10
            batches = [noop_runs(25, "a"), noop_runs(12, "b"), noop_runs(3, "c")]
            batch_ids = await client.submit_batches(batches, window=4)
            assert len(batch_ids) == len(set(batch_ids)) == 40
            names = {r["id"]: r["name"] async for r in client.iter_runs(pool="python")}
            submitted = [run for batch in batches for run in batch]
            assert {i: names[i] for i in batch_ids} == {
                i: r["name"] for i, r in zip(batch_ids, submitted, strict=True)
            }
            assert len(names) == 45

            blocked = await client.submit(command=blocker(go), name="blocked")
            with trio.move_on_after(0.05) as scope:
                await client.wait(blocked)  # never ends by itself
            assert scope.cancelled_caught  # harmless: the connection goes on
            result = await client.wait(blocked, timeout=0)
            assert result["timed_out"] is True
            assert result["runs"][0]["state"] in ("queued", "running")
            cancelled = await client.cancel([blocked])
            assert cancelled["results"][str(blocked)] in ("cancelled", "cancelling")
            result = await client.wait(blocked)
            assert result["runs"][0]["state"] == "cancelled"

            with pytest.raises(RemoteError) as info:
                await client.get(10**6)
            assert info.value.code == "not_found"
            with pytest.raises(RemoteError) as info:
                await client.submit(command=[])
            assert info.value.code == "invalid_params"

            stats = await client.stats()
            assert stats["states"]["succeeded"] >= 1 and stats["states"]["cancelled"] == 1


async def test_async_client_logs_follow(daemon: DaemonProcess, workdir: Path) -> None:
    go = workdir / "go"
    script = (
        f'echo first; while [ ! -e "{go}" ] && [ -d "{workdir}" ]; do sleep 0.02; done; echo second'
    )
    with trio.fail_after(WHOLE_TEST):
        async with AsyncClient(daemon.socket) as client:
            run_id = await client.submit(shell=script)
            received = ""
            async for chunk in client.logs(run_id, follow=True):
                received += chunk
                if "first\n" in received:
                    go.touch()
            assert received == "first\nsecond\n"


async def test_async_client_serves_concurrent_tasks_on_one_connection(
    daemon: DaemonProcess, workdir: Path
) -> None:
    go = workdir / "go"
    finished: dict[int, int] = {}  # task → its run id
    long_result: dict[str, Any] = {}
    with trio.fail_after(WHOLE_TEST):
        async with AsyncClient(daemon.socket) as client:
            long_id = await client.submit(command=blocker(go), name="long")

            async def wait_long() -> None:
                long_result.update(await client.wait(long_id))

            async def one(task: int) -> None:
                run_id = await client.submit(shell=f"echo task-{task}", name=f"task-{task}")
                done = await client.wait([run_id])
                assert [(r["id"], r["state"]) for r in done["runs"]] == [(run_id, "succeeded")]
                assert (await client.get(run_id))["name"] == f"task-{task}"
                assert "".join([c async for c in client.logs(run_id)]) == f"task-{task}\n"
                finished[task] = run_id

            async with trio.open_nursery() as outer:
                outer.start_soon(wait_long)  # asked first, answered last
                async with trio.open_nursery() as tasks:
                    for task in range(20):
                        tasks.start_soon(one, task)
                assert not long_result
                go.touch()
            assert long_result["runs"][0]["id"] == long_id
            assert long_result["runs"][0]["state"] == "succeeded"
            names = {r["id"]: r["name"] async for r in client.iter_runs()}
    assert len(finished) == 20
    assert {run_id: names[run_id] for run_id in finished.values()} == {
        run_id: f"task-{task}" for task, run_id in finished.items()
    }


async def test_async_client_daemon_not_running(workdir: Path) -> None:
    with pytest.raises(DaemonNotRunning) as info:
        async with AsyncClient(workdir / "missing.sock"):
            pass
    assert info.value.hint is not None
    with pytest.raises(DaemonNotRunning, match="nothing listens"):
        async with AsyncClient(stale_socket(workdir / "stale.sock")):
            pass
    with pytest.raises(ClientError, match="not connected"):
        await AsyncClient(workdir / "missing.sock").stats()
    assert os.listdir(workdir) == ["stale.sock"]


def test_batches_are_split_to_fit_the_daemon_line_limit(daemon_factory: Any) -> None:
    """max_batch counts runs; max_line counts bytes. The client learns both from hello
    and splits a batch until each request fits, keeping the ids in submission order."""
    d = daemon_factory("[limits]\nmax_line = 16384\n")
    d.start()
    runs = [{"command": ["true", "y" * 600], "name": f"wide-{i}"} for i in range(100)]
    with Client(d.socket, timeout=TIMEOUT) as client:
        assert client.server_info["limits"]["max_line"] == 16384
        ids = client.submit_many(runs)
        assert len(ids) == 100 and ids == sorted(ids)
        assert [client.get(i)["name"] for i in (ids[0], ids[57], ids[-1])] == [
            "wide-0",
            "wide-57",
            "wide-99",
        ]
        # One run larger than the limit cannot be split: a clear error, nothing sent,
        # and the connection stays usable.
        with pytest.raises(RequestTooLarge, match="16384"):
            client.submit(command=["true", "z" * 20_000])
        with pytest.raises(RequestTooLarge):
            client.submit_many([{"command": ["true"]}, {"command": ["true", "z" * 20_000]}])
        assert client.stats()["daemon"]["healthy"]


async def test_async_client_splits_batches_too(daemon_factory: Any) -> None:
    d = daemon_factory("[limits]\nmax_line = 16384\n")
    d.start()
    runs = [{"command": ["true", "y" * 600], "name": f"wide-{i}"} for i in range(120)]
    async with AsyncClient(d.socket) as client:
        ids = await client.submit_batches([runs[:60], runs[60:]], window=2)
        # In submission order (requests in flight may be served in any order, so
        # the ids themselves need not be ascending).
        assert len(set(ids)) == 120
        names = [(await client.get(i))["name"] for i in (ids[0], ids[45], ids[61], ids[-1])]
    assert names == ["wide-0", "wide-45", "wide-61", "wide-119"]


@pytest.mark.parametrize(
    "fields",
    [
        {"call": "jobd.demo:add", "args": [float("nan")], "pool": "python"},
        {"call": "jobd.demo:add", "kwargs": {"a": float("inf")}, "pool": "python"},
        {"command": ["echo", "caf\udce9"]},  # an undecodable byte, as os.fsdecode gives it
    ],
    ids=["nan", "infinity", "surrogate"],
)
def test_unsendable_parameters_are_a_client_error(client: Client, fields: dict[str, Any]) -> None:
    with pytest.raises(ClientError, match="cannot send") as info:
        client.submit(**fields)
    assert not isinstance(info.value, RemoteError)
    assert client.stats()["daemon"]["healthy"]  # nothing was sent: the connection is fine


def test_a_connection_closed_for_idleness_is_reopened_transparently(
    daemon_factory: type[DaemonProcess],
) -> None:
    """The daemon closes a connection idle for limits.idle_timeout after an ``idle``
    error, reading nothing after it: the sync client reconnects and sends again."""
    d = daemon_factory('[limits]\nidle_timeout = "1s"\n')
    d.start()
    with Client(d.socket, timeout=30) as client:
        first = client.stats()["server"]["refused_connections"]
        # Wait until the daemon has closed the idle connection (a second one, busy
        # asking, sees the count of connections drop to its own).
        with Client(d.socket, timeout=30) as watcher:
            wait_for(
                lambda: watcher.stats()["server"]["connections"] == 1,
                "the idle connection to be closed",
            )
        assert client.stats()["server"]["refused_connections"] == first  # reconnected
        run_id = client.submit(command=["true"])
        assert client.wait([run_id])["runs"][0]["state"] == "succeeded"
