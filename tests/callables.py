"""Callables the daemon imports in tests (the daemon's cwd is the repository)."""

from __future__ import annotations


def raise_lone_surrogate() -> None:
    """An exception whose text is not valid Unicode: it must not reach the journal as is."""
    raise ValueError("bad \ud800 text " + chr(0xDC80))


def raise_huge(size: int) -> None:
    raise RuntimeError("x" * size)
