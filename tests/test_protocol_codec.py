"""The protocol codec: framing, request decoding and submission validation (no I/O)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobd.core.model import Kind, NewRun, Spec
from jobd.errors import ProtocolError
from jobd.protocol import (
    ErrorCode,
    LineBuffer,
    Request,
    check_params,
    encode,
    not_found,
    parse_request,
    parse_submission,
    parse_submissions,
)

# -- framing -------------------------------------------------------------------------

LINES = st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=8)


@given(
    lines=LINES, tail=st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), data=st.data()
)
def test_line_buffer_reassembles_lines_across_any_chunking(
    lines: list[bytes], tail: bytes, data: st.DataObject
) -> None:
    stream = b"".join(line + b"\n" for line in lines) + tail
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10), label="cuts"))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    buffer = LineBuffer(max_line=64)
    got = [line for chunk in chunks for line in buffer.feed(chunk)]
    assert got == lines
    assert buffer.pending == len(tail)


def test_line_buffer_accepts_a_line_of_exactly_max_line() -> None:
    buffer = LineBuffer(max_line=8)
    assert list(buffer.feed(b"12345678")) == []
    assert buffer.pending == 8
    assert list(buffer.feed(b"\n12345678\n")) == [b"12345678", b"12345678"]
    assert buffer.pending == 0


def test_line_buffer_empty_lines_are_lines() -> None:
    assert list(LineBuffer().feed(b"\n\na\n")) == [b"", b"", b"a"]


@pytest.mark.parametrize(
    "chunks",
    [
        [b"123456789\n"],  # terminated, in one piece
        [b"ok\n123456789\n"],  # after a good line
        [b"12345", b"6789\n"],  # terminated, arriving in pieces
        [b"123456789"],  # never terminated: refused before it grows further
        [b"1234", b"5678", b"9"],  # unterminated, in pieces
    ],
)
def test_line_buffer_refuses_an_oversized_line(chunks: list[bytes]) -> None:
    buffer = LineBuffer(max_line=8)
    with pytest.raises(ProtocolError) as info:
        for chunk in chunks:
            for _ in buffer.feed(chunk):
                pass
    assert info.value.code == ErrorCode.TOO_LARGE
    assert "8 bytes" in info.value.message
    assert info.value.hint


def test_encode_is_one_compact_line() -> None:
    line = encode({"id": 1, "result": {"text": "é\n"}})
    assert line == '{"id":1,"result":{"text":"é\\n"}}\n'.encode()
    assert line.count(b"\n") == 1


# -- requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            b'{"id": 1, "method": "hello", "params": {"version": 1}}',
            Request(1, "hello", {"version": 1}),
        ),
        (b'{"id": "a", "method": "stats"}', Request("a", "stats", {})),
        (b'{"method": "stats", "params": null}', Request(None, "stats", {})),
        (b'{"id": null, "method": "x", "params": {}}', Request(None, "x", {})),
    ],
)
def test_parse_request_valid(line: bytes, expected: Request) -> None:
    assert parse_request(line) == expected


@pytest.mark.parametrize(
    "line", [b"", b"{", b"not json", b"\xff\xfe", b"[" * 100_000, b'{"id": 1,}']
)
def test_parse_request_invalid_json(line: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    assert info.value.code == ErrorCode.INVALID_JSON


@pytest.mark.parametrize(
    ("line", "mentions"),
    [
        (b"[]", "object"),
        (b"1", "object"),
        (b'"hello"', "object"),
        (b"null", "object"),
        (b'{"id": true, "method": "hello"}', "'id'"),
        (b'{"id": 1.5, "method": "hello"}', "'id'"),
        (b'{"id": [1], "method": "hello"}', "'id'"),
        (b'{"id": {}, "method": "hello"}', "'id'"),
        (b'{"id": 1}', "'method'"),
        (b'{"id": 1, "method": 3}', "'method'"),
        (b'{"id": 1, "method": null}', "'method'"),
        (b'{"id": 1, "method": "submit", "params": []}', "'params'"),
        (b'{"id": 1, "method": "submit", "params": "x"}', "'params'"),
    ],
)
def test_parse_request_invalid_request(line: bytes, mentions: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    assert info.value.code == ErrorCode.INVALID_REQUEST
    assert mentions in info.value.message
    # Once the id itself is valid, the error carries it (the reply echoes it).
    assert info.value.request_id == (1 if mentions in ("'method'", "'params'") else None)


def test_check_params_names_the_unknown_and_the_accepted() -> None:
    check_params("logs", {"id": 1, "follow": True})
    check_params("hello", {"protocol": 1, "client": "anything"})  # hello is open-ended
    with pytest.raises(ProtocolError) as info:
        check_params("logs", {"id": 1, "folow": True})
    assert info.value.code == ErrorCode.INVALID_PARAMS
    assert "'folow'" in info.value.message and "'follow'" in info.value.message


def test_not_found_names_a_bounded_number_of_ids() -> None:
    assert not_found([7]).message == "no run with id 7"
    message = not_found(range(1, 10_001)).message
    assert message.endswith("and 9980 more") and len(message) < 200


def test_encode_refuses_what_is_not_json() -> None:
    with pytest.raises(ValueError):
        encode({"x": float("nan")})
    with pytest.raises(UnicodeEncodeError):
        encode({"x": "\udcff"})


# -- submissions -----------------------------------------------------------------------


def invalid_params(data: Any, where: str = "params") -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_submission(data, where)
    assert info.value.code == ErrorCode.INVALID_PARAMS
    return info.value


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"command": []}, "params.command"),
        ({"command": "ls -l"}, "params.command"),
        ({"command": ["ls", 1]}, "params.command"),
        ({"command": ["ls", "a\0b"]}, "params.command"),
        ({"shell": ""}, "params.shell"),
        ({"shell": "   "}, "params.shell"),
        ({"shell": 1}, "params.shell"),
        ({"shell": "echo \0"}, "params.shell"),
        ({"call": "no_colon"}, "params.call"),
        ({"call": "a:b:c"}, "params.call"),
        ({"call": "1mod:f"}, "params.call"),
        ({"call": 7}, "params.call"),
        ({"call": "m:f", "args": {"a": 1}}, "params.args"),
        ({"call": "m:f", "kwargs": [1]}, "params.kwargs"),
        ({"command": ["ls"], "args": [1]}, "'args'"),
        ({"shell": "ls", "kwargs": {}}, "'kwargs'"),
        ({"command": ["ls"], "env": ["A=1"]}, "params.env"),
        ({"command": ["ls"], "env": {"A": 1}}, "params.env"),
        ({"command": ["ls"], "env": {"A=B": "1"}}, "params.env"),
        ({"command": ["ls"], "env": {"": "1"}}, "params.env"),
        ({"command": ["ls"], "env": {"A": "x\0"}}, "params.env"),
        ({"command": ["ls"], "cwd": "relative/dir"}, "params.cwd"),
        ({"command": ["ls"], "cwd": 3}, "params.cwd"),
        ({"command": ["ls"], "pool": ""}, "params.pool"),
        ({"command": ["ls"], "pool": 1}, "params.pool"),
        ({"command": ["ls"], "priority": "urgent"}, "params.priority"),
        ({"command": ["ls"], "priority": True}, "params.priority"),
        ({"command": ["ls"], "priority": 10**7}, "params.priority"),
        ({"command": ["ls"], "priority": "2000000"}, "params.priority: priority 2000000 is"),
        ({"command": ["ls"], "priority": 1.5}, "params.priority"),
        ({"command": ["ls"], "name": ""}, "params.name"),
        ({"command": ["ls"], "name": "x" * 201}, "params.name"),
        ({"command": ["ls"], "name": 5}, "params.name"),
        ({"command": ["ls"], "tags": "a,b"}, "params.tags"),
        ({"command": ["ls"], "tags": [""]}, "params.tags"),
        ({"command": ["ls"], "tags": ["x" * 101]}, "params.tags"),
        ({"command": ["ls"], "tags": [1]}, "params.tags"),
        ({"command": ["ls"], "retries": 3}, "retries"),
        ({}, "exactly one of"),
        ({"command": ["ls"], "shell": "ls"}, "exactly one of"),
        ("ls", "JSON object"),
    ],
)
def test_parse_submission_names_the_invalid_field(data: Any, field: str) -> None:
    assert field in invalid_params(data).message


def test_parse_submission_unknown_field_hint_lists_the_accepted_ones() -> None:
    error = invalid_params({"command": ["ls"], "retries": 3, "delay": 1})
    assert "delay, retries" in error.message
    assert error.hint is not None and "command" in error.hint


def test_parse_submission_command() -> None:
    data = {
        "command": ["echo", "hi"],
        "pool": "batch",
        "priority": "high",
        "name": "greet",
        "tags": ["a", "b", "a"],
        "env": {"LANG": "C"},
        "cwd": "/tmp",
    }
    spec = Spec(Kind.COMMAND, command=("echo", "hi"), env={"LANG": "C"}, cwd="/tmp")
    assert parse_submission(data) == NewRun(spec, "batch", 100, "greet", ("a", "b"))


def test_parse_submission_defaults() -> None:
    assert parse_submission({"shell": "echo hi | wc -c"}) == NewRun(
        Spec(Kind.SHELL, shell="echo hi | wc -c"), "default", 0, None, ()
    )


def test_parse_submission_call() -> None:
    data = {"call": "jobd.demo:add", "args": [1, [2]], "kwargs": {"x": None}, "priority": -5}
    spec = Spec(Kind.CALL, call="jobd.demo:add", args=(1, [2]), kwargs={"x": None})
    assert parse_submission(data) == NewRun(spec, "default", -5, None, ())


def test_parse_submission_priority_as_string_of_an_integer() -> None:
    assert parse_submission({"command": ["ls"], "priority": "-300"}).priority == -300


def test_parse_submissions_single() -> None:
    assert parse_submissions({"command": ["ls"]}, 10) == [NewRun(Spec(Kind.COMMAND, ("ls",)))]


def test_parse_submissions_batch() -> None:
    runs = parse_submissions({"runs": [{"command": ["ls"]}, {"shell": "ls", "pool": "p"}]}, 2)
    assert runs == [
        NewRun(Spec(Kind.COMMAND, ("ls",))),
        NewRun(Spec(Kind.SHELL, shell="ls"), pool="p"),
    ]


def test_parse_submissions_batch_names_the_bad_item() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_submissions({"runs": [{"command": ["ls"]}, {"shell": ""}]}, 10)
    assert info.value.code == ErrorCode.INVALID_PARAMS
    assert "runs[1].shell" in info.value.message


def test_parse_submissions_batch_over_the_limit_is_too_large() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_submissions({"runs": [{"command": ["ls"]}] * 4}, 3)
    assert info.value.code == ErrorCode.TOO_LARGE
    assert "4" in info.value.message
    assert "3" in info.value.message


@pytest.mark.parametrize(
    "params",
    [
        {"runs": []},
        {"runs": {"command": ["ls"]}},
        {"runs": None},
        {"runs": [{"command": ["ls"]}], "priority": 1},
    ],
)
def test_parse_submissions_bad_batch(params: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_submissions(params, 10)
    assert info.value.code == ErrorCode.INVALID_PARAMS
    assert "runs" in info.value.message
