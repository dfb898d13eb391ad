"""jobctl's text at its edges: what comes in from the command line is checked
(UTF-8, strict JSON, run ids, timeouts), and what a submission carries is
escaped before it reaches a terminal (a run must not be able to move the
operator's cursor or rewrite their screen).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import typer
from rich.text import Text

MAX_RUN_ID = 2**63 - 1  # the largest run id (docs/protocol.md)

# C0 controls, DEL, C1 controls (\x9b is a one-byte CSI), and lone surrogates
# (undecodable bytes of argv or a path, as Python's surrogateescape carries them).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SHORT_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte that was not UTF-8
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def clean(value: object) -> str:
    """``value`` as text safe for a terminal: control characters become visible escapes."""
    return _UNSAFE.sub(_escape, str(value))


def cell(value: object, style: str = "") -> Text:
    """A table cell from a submission: escaped, and never parsed as rich markup."""
    return Text(clean(value), style=style)


def json_safe(value: str | None) -> str | None:
    """Text that can be written as UTF-8 (lone surrogates as \\udcXX), for --json errors."""
    return None if value is None else value.encode("utf-8", "backslashreplace").decode()


def is_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_utf8(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
    """Refuse text that is not UTF-8 before it is sent (argv bytes arrive as surrogates)."""
    for i, item in enumerate(value if isinstance(value, list) else [value], 1):
        if isinstance(item, str) and not is_utf8(item):
            if param.name == "command":
                raise typer.BadParameter(
                    f"argument {i} of the command is not valid UTF-8 ({clean(item)}):"
                    " jobd commands are UTF-8 text"
                )
            raise typer.BadParameter(f"{clean(item)} is not valid UTF-8: jobd takes UTF-8 text")
    return value


class _NotFinite(Exception):
    """A JSON number jobd refuses: NaN, Infinity, or one too large for a double."""


def _not_finite(token: str) -> Any:
    raise _NotFinite(token)


def _finite(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise _NotFinite(token)
    return value


def strict_json(text: str, param_hint: str) -> Any:
    """Strict JSON, as the daemon takes it; ValueError if ``text`` is not JSON at all."""
    try:
        return json.loads(text, parse_constant=_not_finite, parse_float=_finite)
    except _NotFinite as exc:
        raise typer.BadParameter(
            f"NaN/Infinity are not JSON numbers jobd accepts (got {clean(exc)})",
            param_hint=param_hint,
        ) from None


def parse_run_id(value: str) -> int:
    """Parse a run id; with ignore_unknown_options, ``-1`` gets here instead of failing
    as an unknown option."""
    try:
        run_id = int(value)
    except ValueError:
        if value.startswith("-"):
            raise typer.BadParameter(f"no such option: {clean(value)}") from None
        raise typer.BadParameter(f"'{clean(value)}' is not a run id") from None
    if not 0 < run_id <= MAX_RUN_ID:
        raise typer.BadParameter("ID must be a positive run id")
    return run_id


def parse_timeout(value: float | None) -> float | None:
    if value is None:
        return None
    if math.isnan(value) or value < 0:
        raise typer.BadParameter("must be a number of seconds, 0 or more (inf: no timeout)")
    return None if math.isinf(value) else value
