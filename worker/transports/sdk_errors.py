"""What the ``videosdk`` SDK says went wrong, in its own words.

The SDK reports failures twice: as an ``error`` event with a generic text
("Error while Producing Video", "Failed to Join in the Meeting") and, just
before, as an ERROR log record with the cause ("RTC :: error while create
video producer :: <the exception>").  A join error that only repeats the
event says nothing useful, so the transport captures the SDK's ERROR
records (loggers under ``videosdk``) while it joins and quotes the most
specific one: the first, since the SDK logs the root cause before the
failures it leads to.

Which error events fail a join: the SDK emits ``error`` and then still
``meeting-joined`` when publishing the camera or microphone failed, so any
error during the join fails it, except those about *remote* media (the avatar
uses none) and the ones the SDK emits for a signalling message it could not
handle while its loop carries on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

#: ``error`` events that do not fail a join (remote media; a notification the SDK skipped).
HARMLESS_JOIN_ERRORS = frozenset(
    {
        "Error while Handling Consumer",
        "Not Able to Start Transcription",  # what the SDK says when resuming a consumer failed
        "Internal socket Error",
    }
)

SDK_LOGGER = "videosdk"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        if len(self.messages) < 50:
            self.messages.append(message)


class SdkErrorLog:
    """The SDK's ERROR log records while a ``capture()`` block runs."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    @contextlib.contextmanager
    def capture(self) -> Iterator[SdkErrorLog]:
        handler = _Collect()
        handler.messages = self.messages
        logger = logging.getLogger(SDK_LOGGER)
        saved = logger.level, logger.propagate
        if not logger.isEnabledFor(logging.ERROR):
            # Logging is turned down: capture anyway, without showing what nobody asked for.
            logger.setLevel(logging.ERROR)
            logger.propagate = False
        logger.addHandler(handler)
        try:
            yield self
        finally:
            logger.removeHandler(handler)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]

    def cause(self) -> str | None:
        """The most specific record: the first one (the root cause precedes its effects)."""
        return self.messages[0] if self.messages else None


def is_fatal_join_error(message: str) -> bool:
    return message not in HARMLESS_JOIN_ERRORS
