"""How a session enters a room, and how it learns that it must leave.

A :class:`RoomTransport` joins with the avatar's two tracks and hands back a
*meeting*: the data-channel surface of ``videosdk.Meeting`` that
:class:`~worker.audio_in.AvatarAudioIn` uses (``send``,
``add_event_listener``, ``remove_event_listener``).  Whatever ends the
session from the room's side (the agent left, the room closed, the
connection failed) sets :attr:`RoomTransport.closed` with a reason.

Transports: :mod:`.videosdk` (real rooms), :mod:`.webrtc` (one WebRTC peer on
127.0.0.1: tests and demos without an account), :mod:`.local` (the in-process
:class:`~worker.local_room.LocalRoom`).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any, Protocol


class Meeting(Protocol):
    async def send(self, payload: bytes | str, options: dict | None = None) -> Any: ...

    def add_event_listener(self, listener: Any) -> None: ...

    def remove_event_listener(self, listener: Any) -> None: ...


class JoinError(Exception):
    """The room could not be joined; the message says why in plain words."""


class RoomTransport(ABC):
    """One session's way into one room."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.close_reason: str | None = None
        self.agent_id: str | None = None

    @abstractmethod
    async def join(self, *, participant_id: str, audio_track: Any, video_track: Any) -> Meeting:
        """Enter the room publishing both tracks; raise :class:`JoinError` on failure."""

    @abstractmethod
    async def leave(self) -> None:
        """Leave the room and release everything the join created (idempotent)."""

    def set_agent(self, participant_id: str) -> None:
        """The agent's participant id once known: its departure ends the session."""
        self.agent_id = participant_id

    def _close(self, reason: str) -> None:
        if not self.closed.is_set():
            self.close_reason = reason
            self.closed.set()
