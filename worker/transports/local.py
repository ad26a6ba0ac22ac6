"""The in-process :class:`~worker.local_room.LocalRoom` as a transport.

For running a whole session inside one event loop (tests, debugging): the
tracks stay in this process and whoever holds them pulls them.
"""

from __future__ import annotations

from typing import Any

from ..local_room import LocalMeeting, LocalRoom
from .base import JoinError, Meeting, RoomTransport


class LocalRoomTransport(RoomTransport):
    def __init__(self, room: LocalRoom) -> None:
        super().__init__()
        self.room = room
        self.meeting: LocalMeeting | None = None
        self.audio_track: Any = None
        self.video_track: Any = None

    async def join(self, *, participant_id: str, audio_track: Any, video_track: Any) -> Meeting:
        try:
            self.meeting = self.room.join(participant_id)
        except ValueError as exc:
            raise JoinError(str(exc)) from exc
        self.audio_track, self.video_track = audio_track, video_track
        return self.meeting

    def agent_left(self) -> None:
        """Test hook: what the room does when the agent leaves."""
        self._close("agent left")

    async def leave(self) -> None:
        if self.meeting is not None:
            self.meeting.leave()
            self.meeting = None
