"""TOML → frozen, validated settings. No side effects: nothing here touches the disk
except reading the file it is asked to read.

Every problem in a file is collected and reported together, each with the key
path, what was expected and what was found.
"""

from __future__ import annotations

import grp
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobd.errors import ConfigError
from jobd.protocol import DEFAULT_MAX_BATCH, DEFAULT_MAX_LINE

DEFAULT_STATE_DIR = "/var/lib/jobd"
DEFAULT_SOCKET = "/run/jobd/jobd.sock"
DEFAULT_CONFIG = "/etc/jobd/jobd.toml"
DEFAULT_SOCKET_MODE = 0o660  # owner and the socket group may connect
DEFAULT_SHUTDOWN_GRACE = 10.0  # seconds running attempts get to finish on SIGTERM
DEFAULT_KILL_GRACE = 5.0  # seconds between kill_signal (TERM) and SIGKILL
DEFAULT_MAX_CONNECTIONS = 256  # simultaneous client connections, all users together
DEFAULT_MAX_CONNECTIONS_PER_UID = 32  # simultaneous connections of one non-admin uid
DEFAULT_ADMIN_RESERVED = 16  # of max_connections, kept for admins: an operator always gets in
DEFAULT_HELLO_TIMEOUT = 10.0  # seconds a new connection has to say hello before it is closed
DEFAULT_IDLE_TIMEOUT = 600.0  # seconds a connection may wait with no request in flight
DEFAULT_SEND_TIMEOUT = 60.0  # seconds a client may leave a reply unread before it is dropped
DEFAULT_MAX_INFLIGHT = 64  # requests accepted at once on one connection (more: busy)
# Bytes of request lines one non-admin uid may have buffered (unfinished) or being
# served, and all non-admins together; past that the daemon stops reading from
# them until some are answered (a parsed request takes several times its size).
DEFAULT_MAX_INPUT_PER_UID = 4 * 1024 * 1024
DEFAULT_MAX_INPUT_TOTAL = 16 * 1024 * 1024
DEFAULT_WORKERS = 4  # slots of a pool that does not say
# Runs handed to a pool beyond its free workers, so that a worker finishing one
# run finds the next already journaled as started instead of waiting for a
# commit. Thread pools run short calls where that wait dominates; process
# pools default to none, so "running" means a process exists (or is spawning).
DEFAULT_THREAD_PREFETCH = 64  # runs per worker thread
DEFAULT_PROCESS_PREFETCH = 0  # runs per worker
POOL_KINDS = ("process", "thread")
MAX_DURATION = 366 * 86400.0  # seconds; longer (or inf) is a mistake, not a setting
SOCKET_PATH_MAX = 107  # bytes; sun_path is 108 including the NUL

# The embedded configuration of `jobd --dev` / `make run`: unprivileged paths
# under ./.jobd, a command pool and a Python pool, and demo runs on first start.
DEV_CONFIG = """
[daemon]
state_dir = ".jobd"
socket = ".jobd/jobd.sock"
socket_mode = "0600"
synchronous = "full"
demo = true

[pools.default]
kind = "process"
workers = 2

[pools.python]
kind = "thread"
workers = 2
"""


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    kind: str  # "process": commands and shell lines; "thread": Python callables
    workers: int
    prefetch: int = 0  # runs handed to the pool ahead of free workers (see above)

    @property
    def capacity(self) -> int:
        """Runs of this pool that may be in the running state at once."""
        return self.workers + self.prefetch


@dataclass(frozen=True, slots=True)
class AccessConfig:
    """User names and ``@group`` names per role. Root and the daemon's uid are admins."""

    read: tuple[str, ...] = ()
    submit: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    state_dir: Path
    socket: Path
    log_dir: Path
    socket_mode: int = DEFAULT_SOCKET_MODE
    socket_group: str | None = None
    synchronous: str = "full"
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    kill_grace: float = DEFAULT_KILL_GRACE
    max_line: int = DEFAULT_MAX_LINE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID
    admin_reserved_connections: int = DEFAULT_ADMIN_RESERVED
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    max_batch: int = DEFAULT_MAX_BATCH
    max_input_per_uid: int = DEFAULT_MAX_INPUT_PER_UID
    max_input_total: int = DEFAULT_MAX_INPUT_TOTAL
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    pools: Mapping[str, PoolConfig] = field(default_factory=dict)
    access: AccessConfig = AccessConfig()
    demo: bool = False
    source: str = "<defaults>"

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.db"


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_POOL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Collector:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.problems.append(f"{self.source}: {key}: {message}")


def _table(c: _Collector, data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        c.add(key, f"expected a table ([{key}]), found {type(value).__name__}")
        return {}
    return value


def _unknown(c: _Collector, table: Mapping[str, Any], prefix: str, known: set[str]) -> None:
    for key in table:
        if key not in known:
            path = f"{prefix}.{key}" if prefix else key
            c.add(path, f"unknown key; known keys: {', '.join(sorted(known))}")


@dataclass(frozen=True, slots=True)
class _Section:
    """One table of the document, reporting problems under its key path."""

    c: _Collector
    table: Mapping[str, Any]
    prefix: str

    def problem(self, key: str, message: str) -> None:
        self.c.add(f"{self.prefix}.{key}", message)

    def duration(self, key: str, default: float) -> float:
        value = self.table.get(key, default)
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and 0 <= value < MAX_DURATION
        ):
            return float(value)
        if isinstance(value, str):
            match = _DURATION_RE.match(value)
            if match:
                seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
                if seconds < MAX_DURATION:
                    return seconds
        self.problem(
            key, f'expected a duration such as 10, "10s", "500ms" or "2m", found {value!r}'
        )
        return default

    def integer(self, key: str, default: int, minimum: int = 1) -> int:
        value = self.table.get(key, default)
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return value
        self.problem(key, f"expected an integer >= {minimum}, found {value!r}")
        return default

    def path(self, key: str, default: str, base: Path) -> Path:
        value = self.table.get(key, default)
        if not isinstance(value, str) or not value:
            self.problem(key, f"expected a path string, found {value!r}")
            value = default
        path = Path(value)
        return path if path.is_absolute() else (base / path)

    def names(self, key: str) -> tuple[str, ...]:
        value = self.table.get(key, [])
        if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
            return tuple(value)
        self.problem(key, f'expected a list of user names and "@group" names, found {value!r}')
        return ()


def parse_config(
    data: Mapping[str, Any], *, source: str = "<config>", base: Path | None = None
) -> Config:
    """Validate a parsed TOML document. Relative paths are resolved against ``base``."""
    base = (base or Path.cwd()).absolute()
    c = _Collector(source)
    _unknown(c, data, "", {"daemon", "limits", "pools", "access"})
    daemon = _table(c, data, "daemon")
    d = _Section(c, daemon, "daemon")
    _unknown(
        c,
        daemon,
        "daemon",
        {
            "state_dir",
            "socket",
            "socket_mode",
            "socket_group",
            "log_dir",
            "synchronous",
            "shutdown_grace",
            "kill_grace",
            "demo",
        },
    )
    state_dir = d.path("state_dir", DEFAULT_STATE_DIR, base)
    socket = d.path("socket", DEFAULT_SOCKET, base)
    if len(str(socket).encode()) > SOCKET_PATH_MAX:
        c.add(
            "daemon.socket",
            f"path is {len(str(socket).encode())} bytes; a Unix socket path"
            f" must be at most {SOCKET_PATH_MAX}: choose a shorter path",
        )
    log_dir = d.path("log_dir", str(state_dir / "logs"), base)
    mode_raw = daemon.get("socket_mode", f"{DEFAULT_SOCKET_MODE:04o}")
    socket_mode = DEFAULT_SOCKET_MODE
    try:
        socket_mode = int(mode_raw, 8) if isinstance(mode_raw, str) else -1
        if not 0 <= socket_mode <= 0o777:
            raise ValueError
    except ValueError:
        c.add(
            "daemon.socket_mode",
            f'expected an octal mode string such as "0660", found {mode_raw!r}',
        )
    group = daemon.get("socket_group")
    if group is not None and not (isinstance(group, str) and group):
        c.add("daemon.socket_group", f"expected a group name, found {group!r}")
        group = None
    elif group is not None and not _group_exists(group):
        # Access through the socket depends on it: a daemon whose users
        # cannot connect must not start as if all were well.
        c.add("daemon.socket_group", f"no group named {group!r} on this host")
        group = None
    synchronous = daemon.get("synchronous", "full")
    if synchronous not in ("full", "normal"):
        c.add(
            "daemon.synchronous",
            f'expected "full" (survives power loss) or "normal"'
            f" (survives process crashes only), found {synchronous!r}",
        )
        synchronous = "full"
    demo = daemon.get("demo", False)
    if not isinstance(demo, bool):
        c.add("daemon.demo", f"expected true or false, found {demo!r}")
        demo = False

    limits = _table(c, data, "limits")
    lim = _Section(c, limits, "limits")
    _unknown(
        c,
        limits,
        "limits",
        {
            "max_line",
            "max_connections",
            "max_connections_per_uid",
            "admin_reserved_connections",
            "max_inflight",
            "max_batch",
            "max_input_per_uid",
            "max_input_total",
            "hello_timeout",
            "idle_timeout",
            "send_timeout",
        },
    )

    pools: dict[str, PoolConfig] = {}
    for name, table in _table(c, data, "pools").items():
        prefix = f"pools.{name}"
        if not _POOL_NAME_RE.match(name):
            c.add(prefix, "pool names are 1-64 letters, digits, '_', '.', '-'")
        if not isinstance(table, dict):
            c.add(prefix, "expected a table")
            continue
        _unknown(c, table, prefix, {"kind", "workers", "prefetch"})
        pool = _Section(c, table, prefix)
        kind = table.get("kind", "process")
        if kind not in POOL_KINDS:
            c.add(
                f"{prefix}.kind",
                f'expected "process" (commands) or "thread" (Python callables), found {kind!r}',
            )
            kind = "process"
        workers = pool.integer("workers", DEFAULT_WORKERS)
        per_worker = DEFAULT_THREAD_PREFETCH if kind == "thread" else DEFAULT_PROCESS_PREFETCH
        prefetch = pool.integer("prefetch", per_worker * workers, minimum=0)
        pools[name] = PoolConfig(name, kind, workers, prefetch)
    pools.setdefault(
        "default",
        PoolConfig(
            "default", "process", DEFAULT_WORKERS, DEFAULT_PROCESS_PREFETCH * DEFAULT_WORKERS
        ),
    )

    access = _table(c, data, "access")
    acc = _Section(c, access, "access")
    _unknown(c, access, "access", {"read", "submit", "admin"})
    max_connections = lim.integer("max_connections", DEFAULT_MAX_CONNECTIONS)
    config = Config(
        state_dir=state_dir,
        socket=socket,
        log_dir=log_dir,
        socket_mode=socket_mode,
        socket_group=group,
        synchronous=synchronous,
        shutdown_grace=d.duration("shutdown_grace", DEFAULT_SHUTDOWN_GRACE),
        kill_grace=d.duration("kill_grace", DEFAULT_KILL_GRACE),
        max_line=lim.integer("max_line", DEFAULT_MAX_LINE, 1024),
        max_connections=max_connections,
        max_connections_per_uid=lim.integer(
            "max_connections_per_uid", DEFAULT_MAX_CONNECTIONS_PER_UID
        ),
        admin_reserved_connections=lim.integer(
            "admin_reserved_connections",
            # Unset, the reserve follows a small max_connections down.
            min(DEFAULT_ADMIN_RESERVED, max_connections // 4),
            minimum=0,
        ),
        max_inflight=lim.integer("max_inflight", DEFAULT_MAX_INFLIGHT),
        max_batch=lim.integer("max_batch", DEFAULT_MAX_BATCH),
        max_input_per_uid=lim.integer("max_input_per_uid", DEFAULT_MAX_INPUT_PER_UID, 1024),
        max_input_total=lim.integer("max_input_total", DEFAULT_MAX_INPUT_TOTAL, 1024),
        hello_timeout=lim.duration("hello_timeout", DEFAULT_HELLO_TIMEOUT),
        idle_timeout=lim.duration("idle_timeout", DEFAULT_IDLE_TIMEOUT),
        send_timeout=lim.duration("send_timeout", DEFAULT_SEND_TIMEOUT),
        pools=pools,
        access=AccessConfig(
            acc.names("read"),
            acc.names("submit"),
            acc.names("admin"),
        ),
        demo=demo,
        source=source,
    )
    _impossible(c, config)
    if c.problems:
        raise ConfigError(
            c.problems,
            hint="fix the keys above; jobd.toml.example documents every key with its default",
        )
    return config


def _impossible(c: _Collector, config: Config) -> None:
    """Combinations of valid values that cannot work: refused at start-up, not
    discovered by the first user who trips over them."""
    default = config.pools.get("default")
    if default is not None and default.kind != "process":
        c.add(
            "pools.default.kind",
            'the "default" pool runs plain command submissions: it must be of kind'
            ' "process" (put Python callables in a pool of their own)',
        )
    if config.admin_reserved_connections >= config.max_connections:
        c.add(
            "limits.admin_reserved_connections",
            f"{config.admin_reserved_connections} reserved of {config.max_connections}"
            " connections leaves none for anyone else: keep it below limits.max_connections",
        )
    if config.max_input_per_uid < config.max_line:
        c.add(
            "limits.max_input_per_uid",
            f"{config.max_input_per_uid} bytes cannot hold one line of limits.max_line"
            f" ({config.max_line}): make it at least max_line",
        )
    if config.max_input_total < config.max_input_per_uid:
        c.add(
            "limits.max_input_total",
            f"{config.max_input_total} bytes is less than one user's"
            f" limits.max_input_per_uid ({config.max_input_per_uid})",
        )
    if config.idle_timeout <= 0 or config.send_timeout <= 0 or config.hello_timeout <= 0:
        c.add("limits", "hello_timeout, idle_timeout and send_timeout must be more than 0")
    if config.log_dir == config.state_dir:
        c.add(
            "daemon.log_dir",
            "must not be the state directory itself (output files would sit beside the"
            " journal): use a subdirectory, such as the default state_dir/logs",
        )


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def load_config(path: Path) -> Config:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            [f"{path}: cannot read: {exc.strerror}"],
            hint="pass --config PATH, or --dev for the built-in development configuration",
        ) from exc
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"],
            hint="TOML files are UTF-8; is this the right file?",
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            [f"{path}: not valid TOML: {exc}"],
            hint="jobd.toml.example shows the syntax of every key",
        ) from exc
    return parse_config(data, source=str(path), base=path.parent)


def dev_config(base: Path | None = None) -> Config:
    base = base or Path.cwd()
    try:
        return parse_config(tomllib.loads(DEV_CONFIG), source="<built-in --dev config>", base=base)
    except ConfigError as exc:
        # The only thing that can go wrong with the built-in file is the
        # working directory: there is no file for the user to fix.
        raise ConfigError(
            exc.problems,
            hint=f"--dev keeps everything under {base}/.jobd: run it from a shorter"
            " directory, or write a config file (see jobd.toml.example) and pass --config",
        ) from None
