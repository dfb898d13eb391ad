"""The rules for the files jobd keeps: private, never through a symlink.

The journal holds every run's argv and environment, and the log directory
every run's output, so everything jobd creates under its state and log
directories is ``0600`` and every directory ``0700``, whatever the umask or
the parent directory's mode (systemd's ``StateDirectory=`` alone makes
``0755``). Modes are set with ``chmod`` after ``mkdir``/``open``, because a
mode passed to those only ever loses bits to the umask.

A directory jobd uses must be its own: owned by the daemon's user and
writable by nobody else. A directory that others can write lets them plant
a symlink where jobd will write or read (``1.1.log → /etc/shadow``), so it is
refused, not repaired: what is in it may already be planted. One that is
merely readable by others is tightened (and logged). Files are opened with
``O_NOFOLLOW``, new output files exclusively, and a file read on a client's
behalf must be a regular file (a FIFO would block the reading thread).

No trio here: these are plain system calls, run in whichever thread needs them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import stat
from pathlib import Path
from typing import BinaryIO

from jobd.errors import UnsafePathError

log = logging.getLogger("jobd.files")

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
_CREATE = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def create_dirs(path: Path, mode: int) -> list[Path]:
    """Create ``path`` and its missing parents, each with exactly ``mode``.

    Returns the directories created (outermost first). An existing one is
    left as it is."""
    missing: list[Path] = []
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            break
        missing.append(candidate)
    created: list[Path] = []
    for directory in reversed(missing):
        try:
            directory.mkdir(mode)
        except FileExistsError:
            continue  # created meanwhile by someone else: checked like any existing one
        os.chmod(directory, mode)  # mkdir's mode loses the umask's bits
        created.append(directory)
    return created


def prepare_private_dir(path: Path, purpose: str) -> None:
    """Make sure ``path`` is a directory only the daemon's user can use.

    Created ``0700`` if missing. An existing one must be a directory owned by
    the daemon's user and writable by no one else (else UnsafePathError,
    with what to do); one readable by others is tightened to ``0700``.
    ``purpose`` names it in messages (e.g. "state directory (daemon.state_dir)").
    A symlink to such a directory is accepted: only an administrator can
    have put it in a directory that is not writable by others."""
    try:
        create_dirs(path, PRIVATE_DIR_MODE)
        st = os.stat(path)
    except OSError as exc:
        raise UnsafePathError(
            f"cannot create the {purpose} {path}: {exc.strerror}",
            hint="create it (mode 0700) with the daemon's user as owner, or point the"
            " configuration elsewhere (--dev uses ./.jobd)",
        ) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(
            f"the {purpose} {path} is not a directory",
            hint="remove it, or point the configuration elsewhere",
        )
    me = os.geteuid()
    if st.st_uid != me:
        raise UnsafePathError(
            f"the {purpose} {path} belongs to {_user(st.st_uid)}, not to jobd's user"
            f" {_user(me)}: jobd uses only directories of its own",
            hint=f"`chown {_user_name(me)} {path}` (after checking what is in it), or"
            " give jobd a directory of its own",
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        who = " and ".join(w for bit, w in ((0o020, "its group"), (0o002, "others")) if mode & bit)
        raise UnsafePathError(
            f"the {purpose} {path} is writable by {who} (mode {mode:04o}): they could"
            " plant files or symlinks where jobd reads and writes",
            hint=f"`chmod 700 {path}` after checking that nothing in it was planted,"
            " or give jobd a directory of its own",
        )
    if mode != PRIVATE_DIR_MODE:
        os.chmod(path, PRIVATE_DIR_MODE)
        log.warning("%s %s was mode %04o; made it 0700", purpose, path, mode)


def create_private_file(path: Path) -> int:
    """A new file at ``path``, mode ``0600``, open for writing; returns its fd.

    Created exclusively and never through a symlink: whatever is already at
    ``path`` (a stale file, a planted symlink or FIFO) is unlinked first
    (``unlink`` removes a symlink, never its target)."""
    flags = os.O_WRONLY | os.O_EXCL | _CREATE
    try:
        fd = os.open(path, flags, PRIVATE_FILE_MODE)
    except FileExistsError:
        os.unlink(path)
        fd = os.open(path, flags, PRIVATE_FILE_MODE)  # exists again: someone races us; fail
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # exact, whatever the umask took away
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private_file(path: Path, *, create: bool = True) -> int | None:
    """Open (or create) a file that must stay private, read-write; returns its fd.

    For files kept across starts (the journal, the lock file): created
    ``0600``; an existing one must be a regular file (not a symlink) and is
    tightened to ``0600`` if it is more open (logged). With ``create=False``
    a missing file is None."""
    flags = os.O_RDWR | os.O_NONBLOCK | (_CREATE if create else os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = os.open(path, flags, PRIVATE_FILE_MODE)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as exc:
        if _is_symlink(path):
            raise UnsafePathError(
                f"{path} is a symbolic link: jobd does not follow links in its directories",
                hint="remove the link (check where it points and who made it)",
            ) from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(
                f"{path} is not a regular file",
                hint="remove it (check who made it)",
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
            if mode & ~PRIVATE_FILE_MODE:
                log.warning("%s was mode %04o; made it 0600", path, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private_for_read(path: Path) -> BinaryIO:
    """Open a file jobd wrote, for reading on a client's behalf.

    Never through a symlink, and only a regular file: a FIFO opens at once
    (``O_NONBLOCK``) and is then refused, instead of blocking the thread.
    FileNotFoundError if there is nothing at ``path``; UnsafePathError for
    anything that is not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if _is_symlink(path):
            raise UnsafePathError(f"{path} is a symbolic link") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _is_symlink(path: Path) -> bool:
    with contextlib.suppress(OSError):
        return stat.S_ISLNK(os.lstat(path).st_mode)
    return False


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _user(uid: int) -> str:
    name = _user_name(uid)
    return f"uid {uid}" if name == str(uid) else f"{name} (uid {uid})"
