"""Files are private: modes whatever the umask, no symlinks followed, only jobd's own dirs.

The unit tests drive jobd.files (and the journal's use of it) on real files;
the rest run a real daemon, started with a permissive umask where modes matter.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobd import files
from jobd.errors import UnsafePathError
from jobd.journal import Journal, StateDirLock
from tests.conftest import READY_DEADLINE, DaemonProcess, Raw, wait_for

NOBODY = 65534
GRACES = 'shutdown_grace = "5s"\nkill_grace = "2s"'
SECRET = "root:TOP-SECRET-HASH:19000:0:99999:7:::\n"


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Set this process's umask (a daemon started meanwhile inherits it)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def need_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why} (CI runs the suite as root)")


# -- jobd.files ------------------------------------------------------------------------


def test_missing_directories_are_created_0700_with_their_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "logs"
    with umask(0):
        files.prepare_private_dir(target, "log directory")
    for directory in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert mode(directory) == 0o700, directory


def test_create_dirs_sets_the_exact_mode_whatever_the_umask(tmp_path: Path) -> None:
    with umask(0o077):
        created = files.create_dirs(tmp_path / "run" / "jobd", 0o755)
    assert created == [tmp_path / "run", tmp_path / "run" / "jobd"]
    assert mode(tmp_path / "run") == mode(tmp_path / "run" / "jobd") == 0o755
    assert files.create_dirs(tmp_path / "run" / "jobd", 0o700) == []  # existing: left alone
    assert mode(tmp_path / "run" / "jobd") == 0o755


def test_an_own_directory_readable_by_others_is_tightened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "state"
    target.mkdir()
    os.chmod(target, 0o755)  # systemd's StateDirectory= default
    with caplog.at_level(logging.WARNING, logger="jobd.files"):
        files.prepare_private_dir(target, "state directory")
    assert mode(target) == 0o700
    assert "0755" in caplog.text and str(target) in caplog.text


@pytest.mark.parametrize(
    ("dir_mode", "who"),
    [
        (0o770, "its group"),
        (0o757, "others"),
        (0o777, "its group and others"),
        (0o1777, "its group and others"),
    ],
)
def test_a_directory_others_can_write_is_refused(tmp_path: Path, dir_mode: int, who: str) -> None:
    target = tmp_path / "state"
    target.mkdir()
    os.chmod(target, dir_mode)
    with pytest.raises(UnsafePathError) as info:
        files.prepare_private_dir(target, "state directory")
    assert str(target) in info.value.message and f"writable by {who}" in info.value.message
    assert info.value.hint is not None and f"chmod 700 {target}" in info.value.hint
    assert mode(target) == dir_mode  # refused, not repaired: something may be planted in it


def test_a_file_where_a_directory_should_be_is_refused(tmp_path: Path) -> None:
    (tmp_path / "logs").write_text("")
    with pytest.raises(UnsafePathError, match="is not a directory"):
        files.prepare_private_dir(tmp_path / "logs", "log directory")


def test_a_symlink_to_a_private_directory_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    files.prepare_private_dir(tmp_path / "link", "state directory")
    assert mode(tmp_path / "real") == 0o700


def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    need_root("only root can give a directory to another user")
    target = tmp_path / "logs"
    target.mkdir(mode=0o700)
    os.chown(target, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError) as info:
        files.prepare_private_dir(target, "log directory")
    assert str(target) in info.value.message and f"uid {NOBODY}" in info.value.message
    assert info.value.hint is not None and f"chown root {target}" in info.value.hint


def test_a_new_private_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    for mask in (0, 0o277):  # 0277 would take the owner's write bit away
        path = tmp_path / f"out-{mask:o}"
        with umask(mask):
            fd = files.create_private_file(path)
        os.write(fd, b"data")
        os.close(fd)
        assert mode(path) == 0o600 and path.read_bytes() == b"data"


def test_a_new_private_file_replaces_what_is_planted_and_never_follows_it(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "shadow"
    secret.write_text(SECRET)
    planted = {
        "symlink": lambda p: p.symlink_to(secret),
        "dangling": lambda p: p.symlink_to(tmp_path / "nowhere"),
        "fifo": os.mkfifo,
        "stale": lambda p: p.write_text("old output"),
    }
    for name, plant in planted.items():
        path = tmp_path / f"{name}.log"
        plant(path)
        fd = files.create_private_file(path)  # a FIFO would block a plain open()
        os.write(fd, b"new")
        os.close(fd)
        assert stat.S_ISREG(os.lstat(path).st_mode), name
        assert mode(path) == 0o600 and path.read_bytes() == b"new", name
    assert secret.read_text() == SECRET
    assert not (tmp_path / "nowhere").exists()


def test_a_directory_where_an_output_file_should_be_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "1.1.log").mkdir()
    with pytest.raises(OSError):
        files.create_private_file(tmp_path / "1.1.log")


def test_opening_for_read_refuses_symlinks_fifos_and_directories(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET)
    (tmp_path / "link").symlink_to(tmp_path / "secret")
    os.mkfifo(tmp_path / "fifo")  # no writer: a blocking open would never return
    (tmp_path / "dir").mkdir()
    for name in ("link", "fifo", "dir"):
        with pytest.raises(UnsafePathError):
            files.open_private_for_read(tmp_path / name).close()
    with pytest.raises(FileNotFoundError):
        files.open_private_for_read(tmp_path / "missing")
    with files.open_private_for_read(tmp_path / "secret") as f:
        assert f.read() == SECRET.encode()


def test_a_kept_file_is_created_0600_and_tightened_if_more_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with umask(0):
        fd = files.open_private_file(tmp_path / "new")
    assert fd is not None
    os.close(fd)
    assert mode(tmp_path / "new") == 0o600
    (tmp_path / "old").write_text("kept")
    os.chmod(tmp_path / "old", 0o644)
    with caplog.at_level(logging.WARNING, logger="jobd.files"):
        fd = files.open_private_file(tmp_path / "old", create=False)
    assert fd is not None
    os.close(fd)
    assert mode(tmp_path / "old") == 0o600 and (tmp_path / "old").read_text() == "kept"
    assert "0644" in caplog.text
    assert files.open_private_file(tmp_path / "missing", create=False) is None
    (tmp_path / "link").symlink_to(tmp_path / "old")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        files.open_private_file(tmp_path / "link")


# -- the journal and the lock file --------------------------------------------------------


def test_the_journal_and_its_wal_and_shm_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with umask(0):
        journal = Journal(str(path), "normal")
        try:
            journal.set_meta("probe", "x")  # a write: SQLite creates -wal and -shm
            created = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
            for p in created:
                assert p.exists(), p
                assert mode(p) == 0o600, f"{p} is {mode(p):04o}"
        finally:
            journal.close()


def test_a_journal_more_open_than_0600_is_tightened_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.db"
    with umask(0):
        journal = Journal(str(path), "normal")
        journal.set_meta("probe", "x")
        # Open the files while the journal still holds them (a closed journal
        # removes its -wal and -shm): as an older jobd left them.
        names = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
        for p in names:
            os.chmod(p, 0o644)
        with caplog.at_level(logging.WARNING, logger="jobd.files"):
            second = Journal(str(path), "normal")
        try:
            for p in names:
                assert f"{p} was mode 0644; made it 0600" in caplog.text
                assert mode(p) == 0o600, p
        finally:
            second.close()
            journal.close()


def test_a_symlink_in_place_of_the_journal_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere.db").write_text("")
    (tmp_path / "journal.db").symlink_to(tmp_path / "elsewhere.db")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        Journal(str(tmp_path / "journal.db"))


def test_the_lock_file_is_0600_and_never_followed(tmp_path: Path) -> None:
    with umask(0):
        lock = StateDirLock(tmp_path)
    assert mode(tmp_path / "jobd.lock") == 0o600
    lock.release()
    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / "victim").write_text(SECRET)
    (other / "jobd.lock").symlink_to(tmp_path / "victim")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        StateDirLock(other)
    assert (tmp_path / "victim").read_text() == SECRET


# -- a real daemon -------------------------------------------------------------------------


def blocker(path: Path) -> list[str]:
    """Runs until ``path`` exists, or its directory is removed (no timing assumptions)."""
    return ["sh", "-c", f'while [ ! -e "{path}" ] && [ -d "{path.parent}" ]; do sleep 0.02; done']


def wait_all(conn: Raw, ids: list[int]) -> dict[int, dict[str, Any]]:
    result = conn.result("wait", {"ids": ids, "timeout": 60})
    assert not result["timed_out"], result
    return {r["id"]: r for r in result["runs"]}


def logs(conn: Raw, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The output a ``logs`` request streams, and its final reply."""
    request_id = conn.send("logs", params)
    text = ""
    while True:
        reply = conn.read()
        assert reply is not None, "the daemon closed the connection"
        assert reply["id"] == request_id, reply
        if "event" not in reply:
            return text, reply
        text += reply["event"]["data"]


def refused_at_start(d: DaemonProcess) -> str:
    """Start ``d``, expect it to exit 1 without serving; return what it said."""
    d.start(wait=False)
    assert d.proc is not None
    code = d.proc.wait(READY_DEADLINE)
    d.proc = None
    assert code == 1, d.log_text()
    assert not d.socket.exists()
    return d.log_text()


def test_everything_the_daemon_creates_is_private_whatever_the_umask(
    daemon_factory: type[DaemonProcess], workdir: Path
) -> None:
    log_dir = workdir / "var" / "log" / "jobd"  # parents missing: jobd creates them
    d = daemon_factory(daemon_keys=f'{GRACES}\nlog_dir = "{log_dir}"')
    os.chmod(d.dir, 0o755)  # as systemd's StateDirectory= makes it
    with umask(0):
        d.start()
    c = d.raw()
    command = c.result(
        "submit", {"shell": "echo out; umask; touch child-file", "cwd": str(workdir)}
    )["id"]
    failing = c.result("submit", {"call": "jobd.demo:fail", "pool": "python"})["id"]
    unstartable = c.result("submit", {"command": ["/nonexistent/binary"]})["id"]
    runs = wait_all(c, [command, failing, unstartable])
    assert runs[command]["state"] == "succeeded"
    # Commands keep the umask jobd was started with; only jobd's own files are private.
    text, _ = logs(c, {"id": command})
    assert text == "out\n0000\n" and mode(workdir / "child-file") == 0o666
    assert "RuntimeError" in logs(c, {"id": failing})[0]
    assert "cannot start" in logs(c, {"id": unstartable})[0]

    daemon_made = {"journal.db", "journal.db-wal", "journal.db-shm", "jobd.lock"}
    assert daemon_made <= {p.name for p in d.dir.iterdir()}
    test_made = {"jobd.toml", "jobd.sock"} | {p.name for p in d.logs}
    outputs = [p for p in log_dir.rglob("*") if p.is_file()]
    assert len(outputs) == 3, outputs
    for path in [*d.dir.iterdir(), *log_dir.rglob("*")]:
        if path.name in test_made:
            continue
        expected = 0o700 if path.is_dir() else 0o600
        assert mode(path) == expected, f"{path} is {mode(path):04o}"
    for directory in (d.dir, workdir / "var", workdir / "var" / "log", log_dir):
        assert mode(directory) == 0o700, directory
    assert "was mode 0755; made it 0700" in d.log_text()
    c.close()
    assert d.stop() == 0


def test_a_state_dir_others_can_write_is_refused_at_start(
    daemon_factory: type[DaemonProcess],
) -> None:
    d = daemon_factory()
    os.chmod(d.dir, 0o777)
    said = refused_at_start(d)
    assert f"the state directory (daemon.state_dir) {d.dir} is writable by" in said, said
    assert f"chmod 700 {d.dir}" in said, said
    assert not (d.dir / "journal.db").exists() and not (d.dir / "jobd.lock").exists()


def test_a_log_dir_of_another_user_is_refused_at_start(
    daemon_factory: type[DaemonProcess], workdir: Path
) -> None:
    need_root("only root can give a directory to another user")
    log_dir = workdir / "logs"
    log_dir.mkdir(mode=0o700)
    os.chown(log_dir, NOBODY, NOBODY)
    d = daemon_factory(daemon_keys=f'{GRACES}\nlog_dir = "{log_dir}"')
    said = refused_at_start(d)
    assert f"the log directory (daemon.log_dir) {log_dir} belongs to" in said, said
    assert f"uid {NOBODY}" in said and f"chown root {log_dir}" in said, said


def test_a_symlink_planted_as_an_output_file_is_never_followed(
    daemon_factory: type[DaemonProcess], workdir: Path
) -> None:
    secret = workdir / "shadow"
    secret.write_text(SECRET)
    d = daemon_factory()
    shard = d.dir / "logs" / "00000"
    shard.parent.mkdir(mode=0o700)
    shard.mkdir(mode=0o700)
    (shard / "1.1.log").symlink_to(secret)  # where run 1's first output will go
    (shard / "1.7.log").symlink_to(secret)  # an attempt that will never exist
    d.start()
    c = d.raw()
    run_id = c.result("submit", {"command": ["echo", "hello"]})["id"]
    assert run_id == 1
    assert wait_all(c, [run_id])[run_id]["state"] == "succeeded"
    assert secret.read_text() == SECRET
    assert stat.S_ISREG(os.lstat(shard / "1.1.log").st_mode) and mode(shard / "1.1.log") == 0o600
    assert logs(c, {"id": run_id})[0] == "hello\n"
    # The original attack: logs of an attempt that does not exist, its file planted.
    text, reply = logs(c, {"id": run_id, "attempt": 7})
    assert text == "" and reply["error"]["code"] == "not_found", reply
    assert reply["error"]["message"] == "run 1 has no attempt 7"
    # An attempt that wrote nothing (a callable that succeeded), its file planted.
    quiet = c.result("submit", {"call": "jobd.demo:noop", "pool": "python"})["id"]
    wait_all(c, [quiet])
    (shard / f"{quiet}.1.log").symlink_to(secret)
    text, reply = logs(c, {"id": quiet, "attempt": 1})
    assert text == "" and reply["error"]["code"] == "internal", reply
    assert "TOP-SECRET" not in str(reply)
    assert f"{quiet}.1.log is a symbolic link" in d.log_text()
    c.close()


def test_a_fifo_planted_as_an_output_file_hangs_nothing(
    daemon_factory: type[DaemonProcess],
) -> None:
    d = daemon_factory()
    d.start()
    c = d.raw()
    quiet = c.result("submit", {"call": "jobd.demo:noop", "pool": "python"})["id"]
    wait_all(c, [quiet])
    shard = d.dir / "logs" / "00000"
    shard.mkdir(mode=0o700, exist_ok=True)  # a callable that succeeds writes no output
    os.mkfifo(shard / f"{quiet}.1.log")  # no writer: a plain open() for reading blocks
    os.mkfifo(shard / f"{quiet + 1}.1.log")  # and one for writing, where the next run writes
    # Raw's socket timeout fails the test if either hangs.
    text, reply = logs(c, {"id": quiet})
    assert text == "" and reply["error"]["code"] == "internal", reply
    for follow in (False, True):
        text, reply = logs(c, {"id": quiet, "follow": follow})
        assert reply["error"]["code"] == "internal", reply
    echo = c.result("submit", {"command": ["echo", "not in a fifo"]})["id"]
    assert echo == quiet + 1
    assert wait_all(c, [echo])[echo]["state"] == "succeeded"
    assert logs(c, {"id": echo})[0] == "not in a fifo\n"
    assert c.result("stats")["daemon"]["healthy"]
    c.close()


def test_logs_of_an_attempt_that_does_not_exist_is_not_found_in_any_state(
    daemon_factory: type[DaemonProcess], workdir: Path
) -> None:
    d = daemon_factory()
    d.start()
    c = d.raw()
    go = workdir / "go"
    running = [c.result("submit", {"command": blocker(go)})["id"] for _ in range(2)]
    queued = c.result("submit", {"command": ["echo", "queued"]})["id"]  # both workers busy
    for run_id in running:
        wait_for(lambda r=run_id: c.result("get", {"id": r})["state"] == "running", "running")
    assert c.result("get", {"id": queued})["state"] == "queued"
    cases = [(running[0], 2), (queued, 1)]
    for (run_id, attempt), follow in [(case, f) for case in cases for f in (False, True)]:
        text, reply = logs(c, {"id": run_id, "attempt": attempt, "follow": follow})
        assert "error" in reply and reply["error"]["code"] == "not_found", reply
        assert reply["error"]["message"] == f"run {run_id} has no attempt {attempt}"
    go.touch()
    runs = wait_all(c, [*running, queued])
    assert all(r["state"] == "succeeded" for r in runs.values()), runs
    text, reply = logs(c, {"id": queued, "attempt": 2})
    assert reply["error"]["code"] == "not_found", reply
    text, reply = logs(c, {"id": queued, "attempt": 1})
    assert text == "queued\n" and reply["result"]["attempt"] == 1, reply
    c.close()
