"""Crash points, for the tests of recovery.

``JOBD_CRASH_AT=<name>`` in the daemon's environment makes it SIGKILL itself
when it reaches the point of that name, so that a test can kill it at each
step of recovery deterministically instead of by luck. Unset (in production,
always) a point costs one comparison. Points: ``recovery-loaded`` (the journal
was read, nothing done), ``leftovers-signalled`` (a lost attempt's leftovers
got SIGKILL, not yet seen gone), ``leftovers-gone`` (seen gone, not yet
journaled), ``lost-committed`` (the lost attempt is journaled, its retry not
yet started).
"""

from __future__ import annotations

import os
import signal

CRASH_AT = os.environ.get("JOBD_CRASH_AT") or None


def crash_point(name: str) -> None:
    if CRASH_AT is not None and name == CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)
