"""Priorities and specs: the plain data every layer shares."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobd.core.model import (
    PRIORITIES,
    PRIORITY_LIMIT,
    TERMINAL,
    Kind,
    Spec,
    State,
    priority_name,
    priority_value,
)


@pytest.mark.parametrize(
    ("given_value", "expected"),
    [
        ("critical", 200),
        ("high", 100),
        ("normal", 0),
        ("low", -100),
        ("background", -200),
        ("HIGH", 100),
        ("  Low\t", -100),
        (0, 0),
        (7, 7),
        (-7, -7),
        (PRIORITY_LIMIT, PRIORITY_LIMIT),
        (-PRIORITY_LIMIT, -PRIORITY_LIMIT),
        ("5", 5),
        ("-100", -100),
        (" 42 ", 42),
        ("+3", 3),
        (str(PRIORITY_LIMIT), PRIORITY_LIMIT),
    ],
)
def test_priority_value_accepts(given_value: int | str, expected: int) -> None:
    assert priority_value(given_value) == expected


@pytest.mark.parametrize(
    "bad",
    [
        True,
        False,
        PRIORITY_LIMIT + 1,
        -PRIORITY_LIMIT - 1,
        str(PRIORITY_LIMIT + 1),
        "urgent",
        "",
        "   ",
        "1.5",
        "true",
        1.5,
        None,
        [1],
    ],
)
def test_priority_value_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        priority_value(bad)


def test_priority_value_messages_say_what_is_accepted() -> None:
    with pytest.raises(ValueError, match="boolean"):
        priority_value(True)
    with pytest.raises(ValueError, match=r"outside ±1000000"):
        priority_value(10**7)
    with pytest.raises(ValueError, match="critical, high, normal, low, background"):
        priority_value("urgent")


@pytest.mark.parametrize("text", ["2000000", " -1000001 "])
def test_priority_string_out_of_range_says_so(text: str) -> None:
    # It used to be reported as an "unknown priority", though it is an integer.
    with pytest.raises(ValueError, match=r"outside ±1000000"):
        priority_value(text)


@pytest.mark.parametrize(("name", "value"), sorted(PRIORITIES.items()))
def test_priority_name_of_a_named_level(name: str, value: int) -> None:
    assert priority_name(value) == name


@given(st.integers(-PRIORITY_LIMIT, PRIORITY_LIMIT))
def test_priority_name_round_trips(value: int) -> None:
    name = priority_name(value)
    assert priority_value(name) == value
    if value not in PRIORITIES.values():
        assert name == str(value)


def test_terminal_states() -> None:
    assert {s for s in State if s.terminal} == TERMINAL
    assert not State.QUEUED.terminal
    assert not State.RUNNING.terminal


# -- Spec JSON -------------------------------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
COMMON = {
    "env": st.dictionaries(TEXT, TEXT, max_size=3),
    "cwd": st.none() | TEXT.map(lambda s: "/" + s),
}
SPECS = st.one_of(
    st.builds(
        Spec,
        kind=st.just(Kind.COMMAND),
        command=st.lists(TEXT, min_size=1, max_size=4).map(tuple),
        **COMMON,
    ),
    st.builds(Spec, kind=st.just(Kind.SHELL), shell=TEXT.filter(str.strip), **COMMON),
    st.builds(
        Spec,
        kind=st.just(Kind.CALL),
        call=st.sampled_from(["jobd.demo:add", "pkg.mod:fn"]),
        args=st.lists(JSON_VALUES, max_size=3).map(tuple),
        kwargs=st.dictionaries(TEXT, JSON_VALUES, max_size=3),
        **COMMON,
    ),
)


@given(SPECS)
def test_spec_json_round_trip(spec: Spec) -> None:
    # Through real JSON text, as the journal stores it.
    text = json.dumps(spec.to_json())
    assert Spec.from_json(json.loads(text)) == spec


def test_spec_to_json_holds_only_what_the_kind_uses() -> None:
    assert Spec(Kind.COMMAND, command=("ls", "-l")).to_json() == {
        "kind": "command",
        "command": ["ls", "-l"],
    }
    assert Spec(Kind.SHELL, shell="echo hi", cwd="/tmp").to_json() == {
        "kind": "shell",
        "shell": "echo hi",
        "cwd": "/tmp",
    }
    assert Spec(Kind.CALL, call="m:f", env={"A": "1"}).to_json() == {
        "kind": "call",
        "call": "m:f",
        "args": [],
        "kwargs": {},
        "env": {"A": "1"},
    }


def test_spec_from_json_rejects_an_unknown_kind() -> None:
    with pytest.raises(ValueError):
        Spec.from_json({"kind": "docker"})
