"""The in-process :class:`~worker.local_room.LocalRoom` as a transport.

For running a whole session inside one event loop (tests, debugging): the
tracks stay in this process and whoever holds them pulls them.  The room has
no peer types; ``agent_id`` stands in for a room that names its agent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..local_room import LocalMeeting, LocalRoom
from .base import REASON_AGENT_LEFT, JoinError, Meeting, RoomTransport


class LocalRoomTransport(RoomTransport):
    def __init__(self, room: LocalRoom, *, agent_id: str | None = None) -> None:
        super().__init__()
        self.room = room
        self.room_agent_id = agent_id
        self.meeting: LocalMeeting | None = None
        self.audio_track: Any = None
        self.video_track: Any = None

    async def _join(
        self, *, participant_id: str, audio_track: Any, video_track: Any, listeners: Sequence[Any]
    ) -> Meeting:
        try:
            self.meeting = self.room.join(participant_id)
        except ValueError as exc:
            raise JoinError(str(exc)) from exc
        for listener in listeners:
            self.meeting.add_event_listener(listener)
        self.audio_track, self.video_track = audio_track, video_track
        if self.room_agent_id is not None:
            self._name_agent(self.room_agent_id)
        return self.meeting

    def agent_left(self) -> None:
        """Test hook: what the room does when the agent leaves."""
        self._close(REASON_AGENT_LEFT)

    async def leave(self) -> None:
        if self.meeting is not None:
            self.meeting.leave()
            self.meeting = None
