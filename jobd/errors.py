"""The error tree. Every error an operator can see says what to do next (``hint``).

::

    JobdError                    base; carries ``hint``
    ├── ConfigError              invalid configuration (file, key, what was expected)
    ├── JournalError             the journal cannot be opened, read or committed; a
    │   │                        commit failing with it is transient (disk full, I/O):
    │   │                        retried with the same batch
    │   ├── JournalLockedError   another daemon holds the state directory (names its pid)
    │   ├── JournalVersionError  the journal was written by a newer jobd
    │   ├── JournalDataError     the journal refused a batch because of what it held (a
    │   │                        value it cannot store, a constraint a bug broke): never
    │   │                        retried as is; the guilty runs are isolated
    │   └── JournalDamagedError  the file is not a usable database (corrupt): stop
    ├── UnsafePathError          a directory or file jobd would use is not its own and
    │                            private (owner, mode, a symlink or FIFO in its place)
    ├── ProtocolError            a message broke the wire protocol; carries a stable ``code``
    │   └── RequestError         a well-formed request that cannot be served (not_found, …)
    └── ClientError              raised by jobd.client
        ├── DaemonNotRunning     nothing listens on the socket
        ├── ConnectionLost       the daemon closed the connection or stopped answering
        ├── RequestTooLarge      a request over the daemon's line limit (nothing was sent)
        └── RemoteError          the daemon answered with an error (``code``, ``message``)

Run outcomes (a command exiting 1, a callable raising) are *not* errors: they
are data on the attempt (STYLE.md: outcomes are data).
"""

from __future__ import annotations


class JobdError(Exception):
    """Base of every error jobd raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class ConfigError(JobdError):
    """The configuration is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str], *, hint: str | None = None) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems), hint=hint)


class JournalError(JobdError):
    """The journal could not be opened, read or written."""


class JournalLockedError(JournalError):
    """Another live daemon holds the state directory."""


class JournalVersionError(JournalError):
    """The journal's schema is newer than this jobd understands."""


class JournalDataError(JournalError):
    """A batch was refused for its data, not for the disk: retrying it cannot help."""


class JournalDamagedError(JournalError):
    """The journal file is damaged; nothing more can be committed to it."""


class UnsafePathError(JobdError):
    """A directory or file jobd would use is not safe: another owner, writable by
    others, or not what it should be (a symlink, a FIFO). See jobd.files."""


class ProtocolError(JobdError):
    """A protocol violation; ``code`` is one of protocol.ErrorCode.

    ``request_id`` is the id of the offending request when it could be read."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        hint: str | None = None,
        request_id: int | str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.code = code
        self.request_id = request_id


class RequestError(ProtocolError):
    """A valid request that cannot be served (unknown run, forbidden, …)."""


class ClientError(JobdError):
    """Raised by jobd.client."""


class DaemonNotRunning(ClientError):
    """Nothing is listening on the control socket."""


class ConnectionLost(ClientError):
    """The connection broke, or the daemon stopped answering, after it was made."""


class RequestTooLarge(ClientError):
    """A request would be longer than the daemon accepts; it was not sent."""


class RemoteError(ClientError):
    """The daemon answered a request with an error."""

    def __init__(self, code: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code
