"""Configuration: TOML → validated, frozen settings; every problem reported at once."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from jobd.config import (
    DEFAULT_KILL_GRACE,
    DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_SOCKET_MODE,
    DEFAULT_WORKERS,
    SOCKET_PATH_MAX,
    PoolConfig,
    dev_config,
    load_config,
    parse_config,
)
from jobd.errors import ConfigError

BASE = Path("/srv/jobd")


def shapes(pools: Mapping[str, PoolConfig]) -> dict[str, tuple[str, int]]:
    """Each pool's kind and worker count (prefetch has its own tests)."""
    return {name: (pool.kind, pool.workers) for name, pool in pools.items()}


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="jobd.toml", base=BASE)
    assert info.value.hint
    return info.value.problems


def test_dev_config(tmp_path: Path) -> None:
    config = dev_config(tmp_path)
    assert shapes(config.pools) == {"default": ("process", 2), "python": ("thread", 2)}
    assert all(name == pool.name for name, pool in config.pools.items())
    assert config.state_dir == tmp_path / ".jobd"
    assert config.socket == tmp_path / ".jobd" / "jobd.sock"
    assert config.journal_path == tmp_path / ".jobd" / "journal.db"
    assert config.log_dir == tmp_path / ".jobd" / "logs"
    assert config.socket_mode == 0o600
    assert config.demo is True


def test_empty_config_gets_the_defaults() -> None:
    config = parse_config({}, base=BASE)
    assert config.state_dir == Path("/var/lib/jobd")
    assert config.socket == Path("/run/jobd/jobd.sock")
    assert config.socket_mode == DEFAULT_SOCKET_MODE
    assert config.shutdown_grace == DEFAULT_SHUTDOWN_GRACE
    assert config.kill_grace == DEFAULT_KILL_GRACE
    assert shapes(config.pools) == {"default": ("process", DEFAULT_WORKERS)}


def test_relative_paths_resolve_against_the_config_file() -> None:
    config = parse_config({"daemon": {"state_dir": "state", "socket": "/run/x.sock"}}, base=BASE)
    assert config.state_dir == BASE / "state"
    assert config.socket == Path("/run/x.sock")
    assert config.log_dir == BASE / "state" / "logs"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (10, 10.0),
        (2.5, 2.5),
        (0, 0.0),
        ("10", 10.0),
        ("10s", 10.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        (" 1.5 s ", 1.5),
    ],
)
def test_durations(value: Any, seconds: float) -> None:
    config = parse_config({"daemon": {"shutdown_grace": value, "kill_grace": value}}, base=BASE)
    assert config.shutdown_grace == seconds
    assert config.kill_grace == seconds


@pytest.mark.parametrize("value", ["soon", "-1s", "10 days", "", -1, True, [10], "1.5.2s"])
def test_bad_durations(value: Any) -> None:
    (problem,) = problems({"daemon": {"kill_grace": value}})
    assert problem.startswith("jobd.toml: daemon.kill_grace: expected a duration")
    assert repr(value) in problem


@pytest.mark.parametrize(("value", "mode"), [("0660", 0o660), ("600", 0o600), ("0777", 0o777)])
def test_socket_mode(value: str, mode: int) -> None:
    assert parse_config({"daemon": {"socket_mode": value}}, base=BASE).socket_mode == mode


@pytest.mark.parametrize("value", ["0999", "rw-rw----", "", "01777", 660, 0o660, True])
def test_bad_socket_mode(value: Any) -> None:
    (problem,) = problems({"daemon": {"socket_mode": value}})
    assert "daemon.socket_mode: expected an octal mode string" in problem


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"daemon": {"sokcet": "/x"}}, "daemon.sokcet"),
        ({"limits": {"max_lines": 5}}, "limits.max_lines"),
        ({"pools": {"default": {"workers": 1, "threads": 2}}}, "pools.default.threads"),
        ({"access": {"write": []}}, "access.write"),
    ],
)
def test_unknown_keys(data: dict[str, Any], key: str) -> None:
    (problem,) = problems(data)
    assert f"{key}: unknown key; known keys:" in problem


def test_unknown_top_level_table() -> None:
    (problem,) = problems({"webhooks": {}})
    assert "webhooks: unknown key; known keys: access, daemon, limits, pools" in problem


def test_unknown_top_level_key_is_named_without_a_leading_dot() -> None:
    (problem,) = problems({"webhooks": {}})
    assert problem.startswith("jobd.toml: webhooks: unknown key")


def test_bad_pool_kind() -> None:
    (problem,) = problems({"pools": {"gpu": {"kind": "gpu", "workers": 1}}})
    assert "pools.gpu.kind" in problem
    assert "'gpu'" in problem


@pytest.mark.parametrize("workers", [0, -1, "4", 1.5, True])
def test_bad_pool_workers(workers: Any) -> None:
    (problem,) = problems({"pools": {"default": {"workers": workers}}})
    assert "pools.default.workers: expected an integer >= 1" in problem


def test_bad_pool_name_and_table() -> None:
    found = problems({"pools": {"bad name!": {"workers": 1}, "flat": 3}})
    assert any("pools.bad name!" in p for p in found)
    assert any("pools.flat: expected a table" in p for p in found)


def test_pools() -> None:
    config = parse_config(
        {"pools": {"python": {"kind": "thread", "workers": 8}, "io": {}}}, base=BASE
    )
    assert shapes(config.pools) == {
        "python": ("thread", 8),
        "io": ("process", DEFAULT_WORKERS),
        "default": ("process", DEFAULT_WORKERS),
    }


def test_socket_path_too_long() -> None:
    path = "/" + "s" * SOCKET_PATH_MAX  # one byte over
    (problem,) = problems({"daemon": {"socket": path}})
    assert "daemon.socket" in problem
    assert f"at most {SOCKET_PATH_MAX}" in problem


def test_socket_path_at_the_limit_is_fine() -> None:
    path = "/" + "s" * (SOCKET_PATH_MAX - 1)
    assert str(parse_config({"daemon": {"socket": path}}, base=BASE).socket) == path


def test_relative_socket_path_counts_after_resolution(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    with pytest.raises(ConfigError) as info:
        parse_config({"daemon": {"socket": "jobd.sock"}}, base=deep)
    assert any("daemon.socket" in p for p in info.value.problems)


def test_several_problems_are_reported_together() -> None:
    found = problems(
        {
            "daemon": {
                "shutdown_grace": "soon",
                "socket_mode": "0999",
                "synchronous": "off",
                "demo": "yes",
                "colour": True,
            },
            "limits": {"max_line": 10, "max_batch": 0},
            "pools": {"gpu": {"kind": "cuda", "workers": 0}},
            "access": {"admin": "root"},
        }
    )
    for key in (
        "daemon.shutdown_grace",
        "daemon.socket_mode",
        "daemon.synchronous",
        "daemon.demo",
        "daemon.colour",
        "limits.max_line",
        "limits.max_batch",
        "pools.gpu.kind",
        "pools.gpu.workers",
        "access.admin",
    ):
        assert sum(f"jobd.toml: {key}:" in p for p in found) == 1, key
    assert len(found) == 10


def test_config_error_message_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"daemon": {"demo": 1, "synchronous": 2}}, source="x.toml", base=BASE)
    text = str(info.value)
    assert text.startswith("invalid configuration:")
    assert "x.toml: daemon.demo" in text
    assert "x.toml: daemon.synchronous" in text
    assert "hint:" in text


def test_a_table_that_is_not_a_table() -> None:
    (problem,) = problems({"daemon": "fast"})
    assert "daemon: expected a table ([daemon]), found str" in problem


# -- load_config ---------------------------------------------------------------------


def test_load_config(tmp_path: Path) -> None:
    path = tmp_path / "jobd.toml"
    path.write_text('[daemon]\nstate_dir = "state"\n\n[pools.python]\nkind = "thread"\n')
    config = load_config(path)
    assert config.state_dir == tmp_path / "state"
    assert config.source == str(path)
    assert shapes(config.pools) == {
        "python": ("thread", DEFAULT_WORKERS),
        "default": ("process", DEFAULT_WORKERS),
    }


def test_load_config_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "jobd.toml"
    path.write_text("[daemon\nstate_dir = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}: not valid TOML:")
    assert "line 1" in problem


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem == f"{path}: cannot read: No such file or directory"
    assert info.value.hint is not None and "--dev" in info.value.hint


def test_load_config_reports_the_file_in_each_problem(tmp_path: Path) -> None:
    path = tmp_path / "jobd.toml"
    path.write_text('[daemon]\nkill_grace = "forever"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].startswith(f"{path}: daemon.kill_grace:")


def test_unknown_socket_group_is_refused() -> None:
    (problem,) = problems({"daemon": {"socket_group": "no-such-group-here"}})
    assert "daemon.socket_group" in problem and "no-such-group-here" in problem


def test_hello_timeout() -> None:
    config = parse_config({"limits": {"hello_timeout": "250ms"}}, source="t", base=BASE)
    assert config.hello_timeout == 0.25
    (problem,) = problems({"limits": {"hello_timeout": "soon"}})
    assert "limits.hello_timeout" in problem


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "jobd.toml"
    path.write_bytes(b"[daemon]\nstate_dir = '\xff'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem == f"{path}: not UTF-8 text (byte 0xff at offset 22)"


def test_dev_config_in_a_too_deep_directory_says_what_to_do(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with pytest.raises(ConfigError) as info:
        dev_config(deep)
    assert "daemon.socket" in info.value.problems[0]
    assert info.value.hint is not None and "--config" in info.value.hint


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({"pools": {"default": {"kind": "thread"}}}, "pools.default.kind", "process"),
        (
            {"limits": {"max_connections": 10, "admin_reserved_connections": 10}},
            "limits.admin_reserved_connections",
            "leaves none",
        ),
        (
            {"limits": {"max_line": 2_000_000, "max_input_per_uid": 1_000_000}},
            "limits.max_input_per_uid",
            "max_line",
        ),
        (
            {"limits": {"max_input_per_uid": 8_000_000, "max_input_total": 4_000_000}},
            "limits.max_input_total",
            "max_input_per_uid",
        ),
        ({"limits": {"idle_timeout": 0}}, "limits", "more than 0"),
        ({"daemon": {"state_dir": "/srv/x", "log_dir": "/srv/x"}}, "daemon.log_dir", "state"),
    ],
    ids=["thread-default", "reserve-all", "budget-under-line", "total-under-uid", "idle-0", "logs"],
)
def test_configuration_that_cannot_work_is_refused(
    data: dict[str, Any], key: str, words: str
) -> None:
    (problem,) = problems(data)
    assert f"jobd.toml: {key}" in problem and words in problem, problem


def test_connection_limits_have_defaults_and_a_reserve_that_follows_a_small_total() -> None:
    config = parse_config({}, source="t", base=BASE)
    assert (config.max_connections, config.admin_reserved_connections) == (256, 16)
    assert config.max_connections_per_uid == 32
    assert config.max_line == 1024 * 1024
    assert config.max_input_per_uid >= config.max_line
    small = parse_config({"limits": {"max_connections": 8}}, source="t", base=BASE)
    assert small.admin_reserved_connections == 2
    timeouts = parse_config(
        {"limits": {"idle_timeout": "2m", "send_timeout": "30s"}}, source="t", base=BASE
    )
    assert (timeouts.idle_timeout, timeouts.send_timeout) == (120.0, 30.0)
