"""Group commit: the one task that writes the journal.

Callers append effects to the *pending batch* and await its ``settled``
event. The writer takes the whole pending batch, writes it in one
transaction in a worker thread (so the event loop never blocks on fsync),
then runs the post-commit hook (start runs, wake waiters) and wakes
everyone. While one batch commits, the next accumulates: idle, one commit
per request (lowest latency); loaded, thousands of mutations per commit
(highest throughput).

Failures are classified (``jobd.journal``'s docstring) and each class has
one answer, because a writer that stops, or retries a poisoned batch for
ever, stops the whole daemon:

- *transient* (disk full, I/O error): the batch is kept and retried with
  backoff; ``healthy`` turns false so the server refuses new work with a
  clear error instead of acknowledging what cannot be made durable. The
  failing batch *and the one queued behind it* are ``settled`` at once, so
  no requester hangs until the disk has room (``add`` settles at once while
  unhealthy).
- *data* (a value the journal refuses, a constraint a bug violated): the
  journal commits everything but the guilty units of runs and reports them
  in ``batch.refused``; the post-commit hook quarantines those runs and
  their requesters get an error. Everyone else is unaffected.
- *fatal* (a damaged journal file, a bug in the writer or in the post-commit
  hook): the writer records why, fails the batch, and calls ``on_fatal`` so
  the daemon stops cleanly; the next start recovers from the journal, which
  holds exactly what was acknowledged.

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
from jobd.errors import JournalDamagedError, JournalDataError, JournalError
from jobd.journal import AuditEntry, Journal

log = logging.getLogger("jobd.journal")

RETRY_BACKOFF_INITIAL = 0.1  # seconds before retrying a failed commit
RETRY_BACKOFF_MAX = 5.0  # seconds, cap of the commit retry backoff


@dataclass(slots=True)
class Batch:
    """Everything that will be committed together."""

    effects: list[Effect] = field(default_factory=list)
    audit: list[AuditEntry] = field(default_factory=list)
    audit_units: list[tuple[int, ...]] = field(default_factory=list)
    # Runs that commit or fail together (the runs one request created or changed).
    units: list[tuple[int, ...]] = field(default_factory=list)
    # Set when the batch is committed.
    committed: trio.Event = field(default_factory=trio.Event)
    # Set when a requester should stop waiting: committed, failed for good, or
    # failed for now (it is kept and retried; the disk is full).
    settled: trio.Event = field(default_factory=trio.Event)
    # Set when the batch's fate is final: committed, or failed for good.
    finished: trio.Event = field(default_factory=trio.Event)
    #: runs the journal refused (run id -> why); filled in when committed
    refused: dict[int, str] = field(default_factory=dict)
    #: why the batch can never commit (the writer stopped), if it cannot
    failure: str | None = None

    def done(self) -> None:
        """Committed (or nothing to commit): wake everyone waiting on it."""
        self.committed.set()
        self.settled.set()
        self.finished.set()

    def fail(self, why: str) -> None:
        self.failure = why
        self.settled.set()
        self.finished.set()


@dataclass(frozen=True, slots=True)
class WriterStatistics:
    commits: int
    effects: int
    largest_batch: int
    failed_commits: int
    refused_runs: int
    checkpoints: int
    healthy: bool
    last_error: str | None


class GroupCommitter:
    """The single writer task. ``add`` never blocks; await ``batch.settled``."""

    def __init__(
        self,
        journal: Journal,
        on_commit: Callable[[Batch], None],
        on_fatal: Callable[[str], None] = lambda why: None,
    ) -> None:
        self.journal = journal
        self.on_commit = on_commit
        self.on_fatal = on_fatal
        self._pending = Batch()
        self._wakeup = trio.Event()
        self._closing = False
        self.healthy = True
        #: why the writer stopped for good (nothing commits any more), if it did
        self.fatal: str | None = None
        self.last_error: str | None = None
        self.last_hint: str | None = None
        self._commits = self._effects = self._largest = self._failed = self._checkpoints = 0
        self._refused = 0
        self._checkpointing = False
        self._checkpointed_to = 0  # WAL pages when the last checkpoint started

    def add(
        self,
        effects: Iterable[Effect],
        audit: AuditEntry | None = None,
        runs: tuple[int, ...] = (),
    ) -> Batch:
        """Queue effects for the next commit. ``runs`` (the runs a request
        created or changed) commit or fail together; ``audit`` goes with them."""
        batch = self._pending
        batch.effects.extend(effects)
        if runs:
            batch.units.append(runs)
        if audit is not None:
            batch.audit.append(audit)
            batch.audit_units.append(runs)
        if not self.healthy:
            batch.settled.set()  # the writer is stuck on an earlier batch: say so at once
        if self.fatal is not None:
            batch.fail(self.fatal)
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
                if self.fatal is not None:
                    batch.fail(self.fatal)
                elif not batch.effects and not batch.audit:
                    batch.done()
                elif await self._commit(batch):
                    try:
                        self.on_commit(batch)
                    except Exception:
                        # The batch is durable; what was to follow it (runs to
                        # start, waiters to wake) is now uncertain: stop cleanly
                        # and let recovery start from the journal.
                        log.exception("bug in the actions after a commit")
                        self._stop("a bug in the actions after a commit (see the daemon log)")
                    finally:
                        batch.done()
                    self._maybe_checkpoint(nursery)
                if self._closing and not self._pending.effects and not self._pending.audit:
                    self._pending.done()
                    return

    def _maybe_checkpoint(self, nursery: trio.Nursery) -> None:
        pages = self.journal.wal_pages
        if pages < self._checkpointed_to:  # the WAL started over
            self._checkpointed_to = 0
        if (
            self.fatal is not None
            or self._checkpointing
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

    async def _commit(self, batch: Batch) -> bool:
        """Commit ``batch`` (retrying transient failures); False if it never will."""
        delay = RETRY_BACKOFF_INITIAL
        while True:
            try:
                with trio.CancelScope(shield=True):
                    refused = await trio.to_thread.run_sync(self._write, batch)
            except (JournalDamagedError, JournalDataError) as exc:
                # Damaged: nothing can be committed any more. Data refused even
                # with every guilty unit left out: a bug in the isolation.
                log.critical("the journal cannot go on: %s", exc)
                self._stop(str(exc), exc.hint)
                batch.fail(self.fatal or str(exc))
                return False
            except JournalError as exc:
                self._failed += 1
                self.healthy = False
                self.last_error = exc.message
                self.last_hint = exc.hint
                # Its requesters, and those of the batch queued behind it, are
                # told now instead of when the disk has room again.
                batch.settled.set()
                self._pending.settled.set()
                log.error("journal commit failed (retrying in %.1fs): %s", delay, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_BACKOFF_MAX)
                continue
            except Exception as exc:
                log.exception("bug in the journal writer")
                self._stop(f"a bug in the journal writer: {exc!r}")
                batch.fail(self.fatal or repr(exc))
                return False
            if not self.healthy:
                log.warning("journal commits work again")
                if not self._pending.finished.is_set():
                    # Settled while the writer was stuck; its requesters have been
                    # answered. Whoever adds to it from now on waits for its commit.
                    self._pending.settled = trio.Event()
            self.healthy = True
            self.last_error = self.last_hint = None
            batch.refused = refused
            self._commits += 1
            self._effects += len(batch.effects)
            self._largest = max(self._largest, len(batch.effects))
            self._refused += len(refused)
            return True

    def _write(self, batch: Batch) -> dict[int, str]:
        return self.journal.write_isolating(
            batch.effects, batch.audit, units=batch.units, audit_units=batch.audit_units
        )

    def _stop(self, why: str, hint: str | None = None) -> None:
        """The writer cannot go on: record why, fail what waits, tell the daemon."""
        if self.fatal is not None:
            return
        self.fatal = why
        self.healthy = False
        self.last_error = why
        self.last_hint = hint or "the daemon stops; the next start recovers from the journal"
        self._pending.fail(why)
        self._wakeup.set()
        self.on_fatal(why)

    async def flush(self) -> None:
        """Commit everything added so far (returns early if the writer stopped for good)."""
        batch = self._pending
        self._wakeup.set()
        await batch.finished.wait()

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
            self._refused,
            self._checkpoints,
            self.healthy,
            self.last_error,
        )
