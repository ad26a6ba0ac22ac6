"""``AvatarAudioOut``: the agent side of the protocol.

Wire-compatible with videosdk-agents' class of the same name: asks the
dispatcher to start an avatar (``connect``), streams PCM (UNRELIABLE, chunks of
at most 15,000 bytes), sends ``segment_end`` and ``INTERRUPT`` (RELIABLE), and
receives ``stream_ended`` acknowledgements.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import urllib.request
from collections.abc import Callable
from typing import Any

from . import protocol
from .auth import AvatarAuthCredentials, AvatarJoinInfo
from .listeners import DataListener

logger = logging.getLogger(__name__)


class AvatarAudioOut:
    """Agent-side handle for the avatar data channel."""

    def __init__(
        self,
        *,
        credentials: AvatarAuthCredentials,
        avatar_dispatcher_url: str | None = None,
        room_id: str | None = None,
        on_stream_ended: Callable[[float, bool], None] | None = None,
    ) -> None:
        self._credentials = credentials
        self._avatar_dispatcher_url = avatar_dispatcher_url
        self._room_id = room_id
        self._meeting: Any | None = None
        self._listener: DataListener | None = None
        self._on_stream_ended_cb = on_stream_ended
        self.acks: list[tuple[float, bool]] = []
        self.video_track = None
        self.audio_track = None

    @property
    def participant_id(self) -> str:
        return self._credentials.participant_id

    def set_room_id(self, room_id: str) -> None:
        self._room_id = room_id

    async def connect(self) -> None:
        """Ask the dispatcher to send the avatar into the room."""
        if not self._avatar_dispatcher_url:
            logger.info("no dispatcher URL: not starting an avatar")
            return
        if not self._room_id:
            raise ValueError("room_id must be set before calling connect()")
        info = AvatarJoinInfo(
            room_name=self._room_id,
            token=self._credentials.token,
            participant_id=self._credentials.participant_id,
        )
        body = json.dumps(dataclasses.asdict(info)).encode()
        await asyncio.to_thread(self._post, body)

    def _post(self, body: bytes) -> None:
        request = urllib.request.Request(
            self._avatar_dispatcher_url,
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def _set_meeting(self, meeting: Any) -> None:
        """Attach to the joined room and listen for acknowledgements."""
        self._meeting = meeting
        self._listener = DataListener(self._on_data)
        meeting.add_event_listener(self._listener)

    async def handle_audio_input(self, audio_data: bytes) -> None:
        """Send PCM s16le mono 24 kHz in chunks of at most 15,000 bytes."""
        if not self._meeting:
            return
        for i in range(0, len(audio_data), protocol.MAX_AUDIO_CHUNK):
            chunk = audio_data[i : i + protocol.MAX_AUDIO_CHUNK]
            if len(chunk) % 2:
                chunk += b"\x00"
            if not await self._send(chunk, protocol.UNRELIABLE):
                return

    async def send_segment_end(self) -> None:
        await self._send(protocol.segment_end(), protocol.RELIABLE)

    async def interrupt(self) -> None:
        await self._send(protocol.INTERRUPT, protocol.RELIABLE)

    async def _send(self, payload: bytes | str, mode: str) -> bool:
        if not self._meeting:
            return False
        try:
            await self._meeting.send(payload, {"reliability": mode})
        except Exception:
            logger.debug("data channel closed; stop sending", exc_info=True)
            self._meeting = None
            return False
        return True

    def _on_data(self, data: dict) -> None:
        if data.get("from") != self.participant_id:
            return  # acks from any other participant (another avatar) are not ours
        try:
            msg = protocol.classify(data.get("payload"))
        except protocol.ProtocolError:
            return
        if isinstance(msg, protocol.StreamEnded):
            ack = (msg.data.playback_position, msg.data.interrupted)
            self.acks.append(ack)
            logger.info("stream_ended: %.3f s, interrupted=%s", *ack)
            if self._on_stream_ended_cb is not None:
                self._on_stream_ended_cb(*ack)

    async def aclose(self) -> None:
        if self._meeting is not None and self._listener is not None:
            try:
                self._meeting.remove_event_listener(self._listener)
            except Exception:
                logger.debug("listener already removed", exc_info=True)
        self._listener = None
