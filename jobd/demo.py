"""Callables for the demo runs of `make run` and for benchmarks and tests."""

from __future__ import annotations

from jobd.context import current


def noop() -> None:
    """Does nothing: the benchmark's unit of work."""


def add(a: int, b: int) -> int:
    return a + b


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def whoami() -> str:
    ctx = current()
    return f"run {ctx.run_id} attempt {ctx.attempt} in pool {ctx.pool}"


def fail(message: str = "failed on purpose") -> None:
    raise RuntimeError(message)
