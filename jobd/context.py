"""What a Python callable can learn about the run it executes in.

    from jobd.context import current
    def task(x):
        ctx = current()          # RunContext(run_id=…, attempt=…, pool=…)

Commands get the same facts as ``JOBD_RUN_ID`` and ``JOBD_ATTEMPT``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RunContext:
    run_id: int
    attempt: int
    pool: str


_local = threading.local()


def current() -> RunContext:
    """The run the calling thread executes; raises LookupError outside a jobd worker."""
    ctx: RunContext | None = getattr(_local, "ctx", None)
    if ctx is None:
        raise LookupError("jobd.context.current() called outside a jobd worker thread")
    return ctx


def _set(ctx: RunContext | None) -> None:
    _local.ctx = ctx
