"""The control protocol, shared by the server and every client.

Newline-delimited JSON over a Unix stream socket (docs/protocol.md)::

    → {"id": 1, "method": "submit", "params": {...}}
    ← {"id": 1, "result": {...}}
    ← {"id": 1, "error": {"code": "invalid_params", "message": "...", "hint": "..."}}
    ← {"id": 1, "event": {...}}          streaming methods, before their result

The first request on a connection must be ``hello``. This module holds the
framing, the codec, the method table and the validation of submissions; it
does no I/O.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from jobd.core.model import Kind, NewRun, Spec, priority_value
from jobd.errors import ProtocolError

PROTOCOL_VERSION = 1
# Bytes per message line, both directions: 10,000 plain submissions fit; a
# parsed line takes several times its size in memory, so more is not free.
DEFAULT_MAX_LINE = 1024 * 1024
DEFAULT_MAX_BATCH = 10_000  # runs per submit request
DEFAULT_LIST_LIMIT = 100  # runs per list page
MAX_LIST_LIMIT = 1_000  # runs per list page, upper bound
MAX_NESTING = 32  # levels of arrays/objects inside a callable's args or kwargs
NOT_FOUND_LISTED = 20  # ids named in a not_found message; the rest are counted
MAX_RUN_ID = 2**63 - 1  # SQLite's largest INTEGER: a larger id cannot even be looked up
PATH_MAX = 4096  # characters of a cwd (Linux's PATH_MAX, in bytes, bounds any real one)


class ErrorCode(enum.StrEnum):
    INVALID_JSON = "invalid_json"  # the line is not JSON (the connection is closed)
    INVALID_REQUEST = "invalid_request"  # JSON, but not a request object
    TOO_LARGE = "too_large"  # a line or batch over the limit
    UNSUPPORTED_VERSION = "unsupported_version"
    HELLO_REQUIRED = "hello_required"
    UNKNOWN_METHOD = "unknown_method"
    INVALID_PARAMS = "invalid_params"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    BUSY = "busy"  # too many requests in flight on this connection, or connections
    IDLE = "idle"  # the connection had nothing in flight for limits.idle_timeout: closed
    SHUTTING_DOWN = "shutting_down"
    UNAVAILABLE = "unavailable"  # the journal cannot commit (disk full, I/O error)
    INTERNAL = "internal"


class Role(enum.IntEnum):
    """Access levels; each includes the ones below it."""

    NONE = 0
    READ = 1
    SUBMIT = 2
    ADMIN = 3


# Every method and the role it needs. Later capabilities add rows here.
METHODS: dict[str, Role] = {
    "hello": Role.NONE,
    "submit": Role.SUBMIT,
    "get": Role.READ,
    "list": Role.READ,
    "cancel": Role.SUBMIT,  # submitters may cancel their own runs; admins any
    "logs": Role.READ,
    "wait": Role.READ,
    "stats": Role.READ,
}

SPEC_FIELDS = frozenset(
    {"command", "shell", "call", "args", "kwargs", "env", "cwd", "pool", "priority", "name", "tags"}
)
# The parameters each method accepts: any other is refused, so that a typo
# ("folow") is an error instead of a silently different request. hello is
# the exception: newer clients may introduce themselves with more.
PARAMS: dict[str, frozenset[str]] = {
    "submit": SPEC_FIELDS | {"runs"},
    "get": frozenset({"id"}),
    "list": frozenset({"state", "pool", "name", "tag", "limit", "cursor"}),
    "cancel": frozenset({"ids"}),
    "logs": frozenset({"id", "attempt", "follow"}),
    "wait": frozenset({"ids", "timeout"}),
    "stats": frozenset(),
}


def encode(message: dict[str, Any]) -> bytes:
    """One message line. Raises ValueError for NaN/Infinity (not JSON) and
    UnicodeEncodeError for text that is not valid Unicode."""
    return (
        json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        + b"\n"
    )


def check_params(method: str, params: dict[str, Any]) -> None:
    """Refuse parameters ``method`` does not know (``invalid_params``)."""
    accepted = PARAMS.get(method)
    if accepted is None or accepted.issuperset(params):
        return
    unknown = ", ".join(repr(k) for k in sorted(set(params) - accepted))
    known = ", ".join(repr(k) for k in sorted(accepted)) or "no parameters"
    raise invalid(f"{method}: unknown parameter(s) {unknown}; it accepts {known}")


class LineBuffer:
    """Splits a byte stream into lines, refusing any line longer than ``max_line``."""

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The complete lines ``data`` finishes; the rest is kept for the next call."""
        self._buf += data
        lines: list[bytes] = []
        start = 0
        while True:
            end = self._buf.find(b"\n", start)
            if end < 0:
                break
            if end - start > self.max_line:
                raise _too_large(self.max_line)
            lines.append(bytes(self._buf[start:end]))
            start = end + 1
        if start and start == len(self._buf):
            self._buf = bytearray()  # let a large buffer go once its lines are taken
        else:
            del self._buf[:start]
        if len(self._buf) > self.max_line:
            raise _too_large(self.max_line)
        return lines

    @property
    def pending(self) -> int:
        return len(self._buf)

    @property
    def rest(self) -> bytes:
        """The bytes of an unfinished line."""
        return bytes(self._buf)


def _too_large(limit: int) -> ProtocolError:
    return ProtocolError(
        ErrorCode.TOO_LARGE,
        f"message line longer than {limit} bytes",
        hint="split large batches into several submit requests",
    )


@dataclass(frozen=True, slots=True)
class Request:
    id: int | str | None
    method: str
    params: dict[str, Any]


# A JSON string escape of a UTF-16 surrogate: after strict UTF-8 decoding, the
# only way left to smuggle text into a request that cannot be encoded back to
# UTF-8 (in replies, argv, the journal). A valid pair (\ud83d\ude00) is text.
_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")


def _finite_float(text: str) -> float:
    """1e400 would become an infinite timeout, and Infinity in replies: refuse it."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:20]} is too large")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _unencodable(message: Any) -> str | None:
    """Why ``message`` cannot be sent back as UTF-8 JSON, or None if it can."""
    try:
        json.dumps(message, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return "strings must be valid Unicode (a lone surrogate escape such as \\ud800 is not)"
    except RecursionError:
        return "the request is nested too deeply"
    return None


def decode_line(line: bytes) -> Any:
    """One line of JSON, checked where it enters: strict UTF-8 (no surrogates
    encoded as bytes, no overlong forms), strict JSON, and no lone surrogate
    escapes. Every string that comes out can be encoded again, into a reply,
    an argv or the journal. Raises ProtocolError ``invalid_json``.

    ``json.loads(bytes)`` would decode with ``surrogatepass``: ``ED A0 80``
    (a UTF-16 surrogate written as UTF-8 bytes) would become text that no
    encoder accepts. So the bytes are decoded here, strictly."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            ErrorCode.INVALID_JSON,
            f"not valid JSON: not UTF-8 text ({exc.reason} at byte {exc.start})",
            hint="send UTF-8 text; lone surrogates are not Unicode in any form",
        ) from None
    try:
        message = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError too
        raise ProtocolError(ErrorCode.INVALID_JSON, f"not valid JSON: {exc}") from None
    if _SURROGATE_ESCAPE_RE.search(text):  # rare: check the decoded text properly
        problem = _unencodable(message)
        if problem:
            raise ProtocolError(ErrorCode.INVALID_JSON, f"not valid JSON text: {problem}")
    return message


def parse_request(line: bytes) -> Request:
    """Decode one request line or raise ProtocolError (``invalid_json``/``invalid_request``)."""
    message = decode_line(line)
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "a request must be a JSON object")
    request_id = message.get("id")
    if request_id is not None and (
        isinstance(request_id, bool) or not isinstance(request_id, int | str)
    ):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "'id' must be an integer or a string")
    # From here on the id is known: errors echo it, so the client can match them.
    method = message.get("method")
    if not isinstance(method, str):
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST, "'method' must be a string", request_id=request_id
        )
    params = message.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST, "'params' must be a JSON object", request_id=request_id
        )
    return Request(request_id, method, params)


# -- parameter validation ---------------------------------------------------

_CALL_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_ENV_NAME_RE = re.compile(r"^[^=\0]+$")
_KINDS = (("command", Kind.COMMAND), ("shell", Kind.SHELL), ("call", Kind.CALL))


def _nested_deeper(value: Any, limit: int) -> bool:
    """Whether arrays/objects nest more than ``limit`` levels below ``value`` (iterative:
    a run whose arguments nest too deeply could never be encoded into a reply again)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, list | dict):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def invalid(message: str, hint: str | None = None) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_PARAMS, message, hint=hint)


def not_found(run_ids: Iterable[int]) -> ProtocolError:
    listed = list(run_ids)
    ids = ", ".join(map(str, listed[:NOT_FOUND_LISTED]))
    if len(listed) > NOT_FOUND_LISTED:
        ids += f" and {len(listed) - NOT_FOUND_LISTED} more"
    return ProtocolError(
        ErrorCode.NOT_FOUND, f"no run with id {ids}", hint="`jobctl ls` lists runs"
    )


def parse_submission(data: Any, where: str = "params", owner: int = 0) -> NewRun:
    """Validate one submission object; ``owner`` is the uid of the submitting peer."""
    if not isinstance(data, dict):
        raise invalid(f"{where}: a submission must be a JSON object")
    if not SPEC_FIELDS.issuperset(data):
        unknown = set(data) - SPEC_FIELDS
        raise invalid(
            f"{where}: unknown field(s) {', '.join(sorted(unknown))}",
            hint=f"accepted fields: {', '.join(sorted(SPEC_FIELDS))}",
        )
    kinds = [kind for key, kind in _KINDS if key in data]
    if len(kinds) != 1:
        raise invalid(f"{where}: give exactly one of 'command', 'shell' or 'call'")
    kind = kinds[0]
    command: tuple[str, ...] = ()
    shell = call = ""
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    if kind is Kind.COMMAND:
        value = data["command"]
        if not (isinstance(value, list) and value and all(isinstance(a, str) for a in value)):
            raise invalid(f"{where}.command: must be a non-empty list of strings (argv)")
        if any("\0" in a for a in value):
            raise invalid(f"{where}.command: arguments cannot contain NUL bytes")
        command = tuple(value)
    elif kind is Kind.SHELL:
        value = data["shell"]
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            raise invalid(f"{where}.shell: must be a non-empty string")
        shell = value
    else:
        value = data["call"]
        if not isinstance(value, str) or not _CALL_RE.match(value):
            raise invalid(
                f"{where}.call: must look like 'package.module:function'",
                hint="for example 'jobd.demo:add'",
            )
        call = value
        raw_args = data.get("args", [])
        if not isinstance(raw_args, list):
            raise invalid(f"{where}.args: must be a JSON array")
        raw_kwargs = data.get("kwargs", {})
        if not isinstance(raw_kwargs, dict):
            raise invalid(f"{where}.kwargs: must be a JSON object")
        for key, raw in (("args", raw_args), ("kwargs", raw_kwargs)):
            if raw and _nested_deeper(raw, MAX_NESTING):
                raise invalid(f"{where}.{key}: nested more than {MAX_NESTING} levels deep")
        args, kwargs = tuple(raw_args), raw_kwargs
    if kind is not Kind.CALL and ("args" in data or "kwargs" in data):
        raise invalid(f"{where}: 'args' and 'kwargs' apply to 'call' submissions only")
    env = data.get("env", {})
    if not isinstance(env, dict) or (
        env
        and not all(
            isinstance(k, str) and isinstance(v, str) and _ENV_NAME_RE.match(k) and "\0" not in v
            for k, v in env.items()
        )
    ):
        raise invalid(f"{where}.env: must map variable names (no '=') to strings")
    cwd = data.get("cwd")
    if cwd is not None and (
        not isinstance(cwd, str) or not cwd.startswith("/") or "\0" in cwd or len(cwd) > PATH_MAX
    ):
        raise invalid(f"{where}.cwd: must be an absolute path (no NUL, at most {PATH_MAX} bytes)")
    pool = data.get("pool", "default")
    if not isinstance(pool, str) or not pool:
        raise invalid(f"{where}.pool: must be a pool name")
    try:
        priority = priority_value(data.get("priority", 0))
    except ValueError as exc:
        raise invalid(f"{where}.priority: {exc}") from None
    name = data.get("name")
    if name is not None and (
        not isinstance(name, str) or not name or len(name) > 200 or "\0" in name
    ):
        raise invalid(f"{where}.name: must be a string of 1 to 200 characters (no NUL)")
    tags = data.get("tags", [])
    if not isinstance(tags, list) or (
        tags and not all(isinstance(t, str) and t and len(t) <= 100 and "\0" not in t for t in tags)
    ):
        raise invalid(
            f"{where}.tags: must be a list of non-empty strings of at most 100 characters"
        )
    spec = Spec(kind, command, shell, call, args, kwargs, env, cwd)
    return NewRun(spec, pool, priority, name, tuple(dict.fromkeys(tags)) if tags else (), owner)


def parse_submissions(params: dict[str, Any], max_batch: int, owner: int = 0) -> list[NewRun]:
    """``{"runs": [...]}`` (a batch) or the fields of one submission."""
    if "runs" in params:
        batch = params["runs"]
        if not isinstance(batch, list) or not batch:
            raise invalid("'runs' must be a non-empty list of submissions")
        if len(batch) > max_batch:
            raise ProtocolError(
                ErrorCode.TOO_LARGE,
                f"a batch of {len(batch)} runs is over the limit of {max_batch}",
                hint="send several smaller batches",
            )
        if len(params) > 1:
            raise invalid("a batch submit takes only 'runs'")
        return [parse_submission(item, f"runs[{i}]", owner) for i, item in enumerate(batch)]
    return [parse_submission(params, owner=owner)]


def run_id_param(params: dict[str, Any], key: str = "id") -> int:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RUN_ID:
        raise invalid(f"'{key}' must be a positive integer run id")
    return value


def run_ids_param(
    params: dict[str, Any], key: str = "ids", limit: int = DEFAULT_MAX_BATCH
) -> list[int]:
    value = params.get(key)
    if not isinstance(value, list) or not value:
        raise invalid(f"'{key}' must be a non-empty list of run ids")
    if len(value) > limit:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"more than {limit} ids in one request")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= MAX_RUN_ID:
            raise invalid(f"'{key}' must contain positive integer run ids, got {item!r}")
    return list(dict.fromkeys(value))
