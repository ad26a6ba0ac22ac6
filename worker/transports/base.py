"""How a session enters a room, and how it learns that it must leave.

A :class:`RoomTransport` joins with the avatar's two tracks and hands back a
*meeting*: the data-channel surface of ``videosdk.Meeting`` that
:class:`~worker.audio_in.AvatarAudioIn` uses (``send``,
``add_event_listener``, ``remove_event_listener``).

The contract, and why:

* **listeners before the join**: ``join(listeners=...)`` puts the session's
  listeners (``MeetingEventHandler`` subclasses) on the meeting before the
  room can deliver anything, so messages that arrive while the SDK is still
  joining (the agent may already be speaking) are not lost;
* **the agent, as the room names it**: ``join(on_agent=...)`` is called with
  the agent's participant id as soon as the room says who it is (during or
  after the join; the videosdk-agents agent joins with peer type ``agent``).
  After the join, :attr:`RoomTransport.agent_id` is None if the room named
  none; the session then falls back to the first protocol message's sender
  and reports it with :meth:`RoomTransport.set_agent`;
* **why it ended**: whatever ends the session from the room's side sets
  :attr:`RoomTransport.closed`, with :attr:`~RoomTransport.close_reason` (one
  of the ``REASON_*`` names below, short and stable: it labels metrics) and
  :attr:`~RoomTransport.close_detail` (plain words for ``/sessions``).

Transports: :mod:`.videosdk` (real rooms), :mod:`.webrtc` (one WebRTC peer on
127.0.0.1: tests and demos without an account), :mod:`.local` (the in-process
:class:`~worker.local_room.LocalRoom`).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Protocol

REASON_AGENT_LEFT = "agent left"
REASON_ROOM_CLOSED = "room closed"
REASON_ROOM_EMPTY = "room empty"
REASON_REMOVED = "removed from room"
REASON_CONNECTION_LOST = "connection lost"
REASON_PEER_FAILED = "peer connection failed"


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
        self.close_detail: str | None = None
        self.agent_id: str | None = None
        self.agent_named_by_room = False
        self._on_agent: Callable[[str], None] | None = None

    async def join(
        self,
        *,
        participant_id: str,
        audio_track: Any,
        video_track: Any,
        listeners: Sequence[Any] = (),
        on_agent: Callable[[str], None] | None = None,
    ) -> Meeting:
        """Enter the room publishing both tracks; raise :class:`JoinError` on failure.

        ``listeners`` are on the meeting before the room can deliver any
        event; ``on_agent`` hears the agent's id whenever the room names it.
        """
        self._on_agent = on_agent
        if self.agent_named_by_room and self.agent_id is not None and on_agent is not None:
            on_agent(self.agent_id)
        return await self._join(
            participant_id=participant_id,
            audio_track=audio_track,
            video_track=video_track,
            listeners=tuple(listeners),
        )

    @abstractmethod
    async def _join(
        self, *, participant_id: str, audio_track: Any, video_track: Any, listeners: Sequence[Any]
    ) -> Meeting:
        """The transport's join; add ``listeners`` before anything can be delivered."""

    @abstractmethod
    async def leave(self) -> None:
        """Leave the room and release everything the join created (idempotent)."""

    def set_agent(self, participant_id: str) -> None:
        """The agent the session identified by its first message: its leaving ends the session."""
        if not self.agent_named_by_room:
            self.agent_id = participant_id

    def _name_agent(self, participant_id: str) -> None:
        """The room says ``participant_id`` is the agent: tell the session."""
        if self.agent_named_by_room and self.agent_id is not None:
            return  # the first agent the room named stays the agent
        self.agent_id = participant_id
        self.agent_named_by_room = True
        if self._on_agent is not None:
            self._on_agent(participant_id)

    def _close(self, reason: str, detail: str | None = None) -> None:
        if not self.closed.is_set():
            self.close_reason = reason
            self.close_detail = detail
            self.closed.set()
