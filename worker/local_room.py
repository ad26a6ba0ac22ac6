"""An in-process room with the data-channel surface of a VideoSDK ``Meeting``.

It connects an agent-side ``AvatarAudioOut`` and an avatar-side
``AvatarAudioIn`` for the demo and the tests, and reproduces the transport
facts the protocol must survive:

* ``send(payload, {"reliability": "RELIABLE" | "UNRELIABLE"})`` accepts only
  ``bytes`` / ``str`` of at most 15,360 bytes (the SDK's limit);
* every *other* participant's listeners get the message the way
  ``videosdk.Meeting`` hands it over: ``listener.handle_event("data",
  {"payload", "from", "timestamp", "reliability"})`` (so a listener must be a
  ``MeetingEventHandler``), with any payload that decodes as UTF-8 handed over
  as ``str``; as in the SDK, nothing guards the call: a listener that raises
  stops the delivery of that message to the listeners after it (the error
  reaches the event loop's exception handler);
* optional per-message delay and jitter per mode: with jitter, messages
  overtake each other (both channels of the real SDK are unordered).

What it does not model: signalling (no ``meeting-joined``, peer or
``meeting-left`` events, no peer types), media, connection loss, the SDK's
threads and its join; only the data channel.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from .protocol import RELIABLE, UNRELIABLE, check_outgoing

logger = logging.getLogger(__name__)


@dataclass
class ChannelTiming:
    """Delivery delay of one data channel: ``delay + uniform(0, jitter)`` seconds."""

    delay: float = 0.0
    jitter: float = 0.0


class LocalRoom:
    """A room whose participants live in this process and event loop."""

    def __init__(
        self,
        *,
        reliable: ChannelTiming | None = None,
        unreliable: ChannelTiming | None = None,
        seed: int | None = 0,
        room_id: str = "local-room",
    ) -> None:
        self.id = room_id
        self.timing = {
            RELIABLE: reliable or ChannelTiming(),
            UNRELIABLE: unreliable or ChannelTiming(),
        }
        self._rng = random.Random(seed)
        self.participants: dict[str, LocalMeeting] = {}
        self.in_flight = 0

    def join(self, participant_id: str) -> LocalMeeting:
        if participant_id in self.participants:
            raise ValueError(f"participant {participant_id!r} is already in the room")
        meeting = LocalMeeting(self, participant_id)
        self.participants[participant_id] = meeting
        return meeting

    def leave(self, participant_id: str) -> None:
        self.participants.pop(participant_id, None)

    async def drain(self) -> None:
        """Wait until every message sent so far has been delivered."""
        while self.in_flight:
            await asyncio.sleep(0.001)

    def _deliver(self, sender: str, payload: bytes | str, mode: str) -> None:
        if isinstance(payload, bytes):
            try:
                payload = payload.decode("utf-8")  # what the SDK does on receipt
            except UnicodeDecodeError:
                pass
        data = {
            "payload": payload,
            "from": sender,
            "timestamp": int(time.time() * 1000),
            "reliability": mode,
        }
        for pid, meeting in list(self.participants.items()):
            if pid != sender:
                meeting._dispatch(dict(data))

    def _schedule(self, sender: str, payload: bytes | str, mode: str) -> None:
        timing = self.timing[mode]
        delay = timing.delay + (self._rng.uniform(0, timing.jitter) if timing.jitter else 0.0)
        self.in_flight += 1

        def deliver() -> None:
            self.in_flight -= 1
            self._deliver(sender, payload, mode)

        asyncio.get_running_loop().call_later(delay, deliver)


class LocalMeeting:
    """One participant's handle: the subset of ``videosdk.Meeting`` the protocol uses."""

    def __init__(self, room: LocalRoom, participant_id: str) -> None:
        self._room = room
        self.participant_id = participant_id
        self.id = room.id
        self._listeners: list[Any] = []

    async def send(self, payload: bytes | str, options: dict | None = None) -> None:
        mode = (options or {}).get("reliability", RELIABLE)
        if mode not in (RELIABLE, UNRELIABLE):
            raise ValueError(f"unknown reliability mode {mode!r}")
        payload = check_outgoing(payload)
        if self.participant_id not in self._room.participants:
            raise ConnectionError("Cannot send message, Network is not available.")
        self._room._schedule(self.participant_id, payload, mode)

    def add_event_listener(self, listener: Any) -> None:
        self._listeners.append(listener)

    def remove_event_listener(self, listener: Any) -> None:
        self._listeners.remove(listener)

    def leave(self) -> None:
        self._room.leave(self.participant_id)

    def _dispatch(self, data: dict) -> None:
        # Exactly what ``Meeting.__emit`` does: no guard around the listeners.
        for listener in list(self._listeners):
            listener.handle_event("data", data)
