"""The streamlet error tree.

Every error streamlet raises derives from :class:`StreamletError`. The
``retriable`` class attribute tells a caller whether trying the same
operation again may succeed (a broker that is still starting) or never will
(a corrupt file, a bad setting); a failure that may pass is raised as a
class that says so (:class:`SinkUnavailableError`,
:class:`SourceUnavailableError`), never by setting the flag on an
instance. Messages name what happened, where (file and offset,
topic-partition, batch) and what the user can do about it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ClientError",
    "ConfigError",
    "DecodeError",
    "FencedError",
    "HandlerError",
    "OutputError",
    "RecordTooLargeError",
    "RejectedError",
    "SinkError",
    "SinkUnavailableError",
    "SourceError",
    "SourceUnavailableError",
    "StateError",
    "StreamletError",
    "TaskNotHeldError",
    "UnreachableError",
    "WALClosedError",
    "WALCorruptionError",
    "WALError",
    "WALFailedError",
]


class StreamletError(Exception):
    """Root of every error streamlet raises.

    Attributes:
        retriable: True when the same call may succeed if tried again later.
    """

    retriable: bool = False


class ConfigError(StreamletError):
    """A setting is invalid; raised at start, before any data is touched."""


class WALError(StreamletError):
    """Base of the write-ahead log's errors."""


class WALCorruptionError(WALError):
    """A record before the tail of the log fails its checksum or framing.

    A torn tail (the incomplete last write of a crash) is not corruption and
    never raises this; it is truncated on open with a warning.

    Attributes:
        path: the segment file holding the bad record.
        offset: byte offset of the first bad record in that file.
    """

    def __init__(self, message: str, *, path: str, offset: int) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset


class WALFailedError(WALError):
    """A write or fsync of the log failed; the log refuses all further appends.

    An fsync error leaves the file's durable contents unknown (the kernel may
    have dropped the dirty pages), so retrying and carrying on could report
    lost data as durable. The original OSError is the ``__cause__``.
    """


class DecodeError(StreamletError):
    """A record could not be decoded by its source's ``decode`` function.

    Raised only when the app has no dead-letter sink; with one, the record
    goes there with its bytes, position and the error, and the batch goes on.
    """


class RecordTooLargeError(WALError):
    """A record is larger than the log's ``max_record_size``; nothing was written.

    The limit bounds the memory a reader needs for one record, so it is
    checked before a record is queued rather than discovered on replay.
    """


class WALClosedError(WALError):
    """The log was closed by its owner; an append or read came after that."""


class HandlerError(StreamletError):
    """A user handler raised; the user's exception is the ``__cause__``."""


class SinkError(StreamletError):
    """A sink could not write or commit a batch's outputs."""


class SinkUnavailableError(SinkError):
    """The sink failed in a way that may pass: a service down, a busy database, a full disk.

    Nothing of the batch became visible, so the commit is tried again with
    backoff (the app's ``max_retries``).
    """

    retriable = True


class FencedError(SinkError):
    """Another worker of the same app took over the sink; retrying cannot help.

    One worker per app: the scheduler stops the app at once, with the batch
    not done, as two workers writing one app's outputs would break
    exactly-once. Group mode: the batch's task moved to another worker; the
    batch is dropped and the task released (and taken over again if the
    group still assigns it here).
    """


class TaskNotHeldError(SinkError):
    """Group mode: a sink was asked to commit a batch of a task it does not hold.

    Not a fence (no other worker is known to have taken the task), but the
    scheduler treats it alike: the batch is dropped and the task released,
    then taken over again if the group still assigns it here, which reads
    where its input resumes. Whatever left the sink without the task, that
    is always safe.
    """


class OutputError(SinkError):
    """A handler's output cannot be written by its sink: the output is at fault.

    Raised when an output cannot be encoded, is too large, or is refused by
    the user's own code in the sink (a partitioner, an apply function). The
    same outputs would fail again, so it is never retried; the scheduler
    treats it as the handler failing on the batch (``on_failure`` applies:
    with ``"dead_letter"`` the handler's input goes to the dead-letter sink).
    """


class SourceError(StreamletError):
    """A source could not deliver a batch's input (a broker refused, a range cannot be read)."""


class SourceUnavailableError(SourceError):
    """A source's server cannot be reached or answered too late; a later try may pass."""

    retriable = True


class StateError(StreamletError):
    """A handler's keyed state cannot be used as it is.

    A key of the wrong type or a value that cannot be encoded (the handler
    counts as failed on the batch, without retries), or a state store that
    is damaged, foreign, or does not fit the state directory (the app does
    not start).
    """


class CheckpointError(StreamletError):
    """A checkpoint file is unreadable (bad header, length, checksum or version) or unwritable."""


class ClientError(StreamletError):
    """Base of :class:`~streamlet.tcp.TcpClient`'s errors."""


class UnreachableError(ClientError):
    """No connection to the server could be made within ``connect_timeout``."""

    retriable = True


class RejectedError(ClientError):
    """The server answered ``@error``: it refuses what this client sends.

    Sending the same lines again would be refused again, so the client
    stops; the server's text says what to change.
    """
