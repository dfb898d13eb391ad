"""Group commit: the one task that writes the journal.

Callers append effects to the *pending batch* and await its ``committed``
event. The writer takes the whole pending batch, writes it in one
transaction in a worker thread (so the event loop never blocks on fsync),
then runs the post-commit hook (start runs, wake waiters) and wakes
everyone. While one batch commits, the next accumulates: idle, one commit
per request (lowest latency); loaded, thousands of mutations per commit
(highest throughput).

If a commit fails (disk full, I/O error) the batch is kept and retried with
backoff, ``healthy`` turns false so the server refuses new work with a clear
error instead of acknowledging what cannot be made durable, and the batch
is ``settled`` so that its requesters are told at once.

After a commit that leaves ``checkpoint_pages`` more pages in the WAL, the
writer starts a background checkpoint (``Journal.checkpoint``; the reasons
are in ``jobd.journal``'s docstring).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import trio

from jobd.core.effects import Effect
from jobd.errors import JournalError
from jobd.journal import AuditEntry, Journal

log = logging.getLogger("jobd.journal")

RETRY_BACKOFF_INITIAL = 0.1  # seconds before retrying a failed commit
RETRY_BACKOFF_MAX = 5.0  # seconds, cap of the commit retry backoff


@dataclass(slots=True)
class Batch:
    """Everything that will be committed together."""

    effects: list[Effect] = field(default_factory=list)
    audit: list[AuditEntry] = field(default_factory=list)
    committed: trio.Event = field(default_factory=trio.Event)
    # Set when the batch is committed, or when a commit of it failed (it is
    # kept and retried): a requester need not hang while the disk is full.
    settled: trio.Event = field(default_factory=trio.Event)

    def done(self) -> None:
        """Committed (or nothing to commit): wake everyone waiting on it."""
        self.committed.set()
        self.settled.set()


@dataclass(frozen=True, slots=True)
class WriterStatistics:
    commits: int
    effects: int
    largest_batch: int
    failed_commits: int
    checkpoints: int
    healthy: bool
    last_error: str | None


class GroupCommitter:
    """The single writer task. ``add`` never blocks; await ``batch.committed``."""

    def __init__(self, journal: Journal, on_commit: Callable[[list[Effect]], None]) -> None:
        self.journal = journal
        self.on_commit = on_commit
        self._pending = Batch()
        self._wakeup = trio.Event()
        self._closing = False
        self.healthy = True
        self.last_error: str | None = None
        self.last_hint: str | None = None
        self._commits = self._effects = self._largest = self._failed = self._checkpoints = 0
        self._checkpointing = False
        self._checkpointed_to = 0  # WAL pages when the last checkpoint started

    def add(self, effects: Iterable[Effect], audit: AuditEntry | None = None) -> Batch:
        batch = self._pending
        batch.effects.extend(effects)
        if audit is not None:
            batch.audit.append(audit)
        self._wakeup.set()
        return batch

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # The nursery holds at most one background checkpoint; on close it
        # waits for that checkpoint to finish.
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                batch, self._pending = self._pending, Batch()
                if not batch.effects and not batch.audit:
                    batch.done()
                    if self._closing:
                        return
                    continue
                await self._commit(batch)
                self.on_commit(batch.effects)
                batch.done()
                self._maybe_checkpoint(nursery)

    def _maybe_checkpoint(self, nursery: trio.Nursery) -> None:
        pages = self.journal.wal_pages
        if pages < self._checkpointed_to:  # the WAL started over
            self._checkpointed_to = 0
        if (
            self._checkpointing
            or pages - self._checkpointed_to < self.journal.checkpoint_pages
            or pages >= self.journal.checkpoint_pages_max  # the writer's inline one is due
        ):
            return
        self._checkpointing = True
        self._checkpointed_to = pages
        nursery.start_soon(self._checkpoint)

    async def _checkpoint(self) -> None:
        try:
            done = await trio.to_thread.run_sync(self.journal.checkpoint)
        except JournalError as exc:
            # Not fatal: the next one retries, and the writer's inline
            # checkpoint still bounds the WAL.
            log.warning("background checkpoint failed: %s", exc)
        else:
            self._checkpoints += done is not None
        finally:
            self._checkpointing = False

    async def _commit(self, batch: Batch) -> None:
        delay = RETRY_BACKOFF_INITIAL
        while True:
            try:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.journal.write, batch.effects, batch.audit)
            except JournalError as exc:
                self._failed += 1
                self.healthy = False
                self.last_error = exc.message
                self.last_hint = exc.hint
                batch.settled.set()
                log.error("journal commit failed (retrying in %.1fs): %s", delay, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_BACKOFF_MAX)
                continue
            if not self.healthy:
                log.warning("journal commits work again")
            self.healthy = True
            self.last_error = self.last_hint = None
            self._commits += 1
            self._effects += len(batch.effects)
            self._largest = max(self._largest, len(batch.effects))
            return

    async def flush(self) -> None:
        """Commit everything added so far."""
        batch = self._pending
        self._wakeup.set()
        await batch.committed.wait()

    def close(self) -> None:
        """Let ``run`` return once the pending batch is committed."""
        self._closing = True
        self._wakeup.set()

    def statistics(self) -> WriterStatistics:
        return WriterStatistics(
            self._commits,
            self._effects,
            self._largest,
            self._failed,
            self._checkpoints,
            self.healthy,
            self.last_error,
        )
