"""The ``local`` transport: the room is one WebRTC peer on 127.0.0.1.

The session waits for the agent side's offer (relayed by the dispatcher from
``POST /local/{room}/offer``), answers with its two tracks, and counts as
joined once both data channels are open.  The peer closing its connection
or a data channel means the agent left.  See :mod:`worker.webrtc_loopback`
for the channel layout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from vsaiortc import RTCPeerConnection, RTCSessionDescription

from ..webrtc_loopback import DataChannelMeeting, new_peer_connection
from .base import REASON_AGENT_LEFT, REASON_PEER_FAILED, JoinError, Meeting, RoomTransport

logger = logging.getLogger(__name__)


class WebRtcLoopbackTransport(RoomTransport):
    def __init__(self, *, join_timeout: float = 20.0) -> None:
        super().__init__()
        self.join_timeout = join_timeout
        self._pc: RTCPeerConnection | None = None
        self._meeting: DataChannelMeeting | None = None
        self._participant_id: str | None = None
        self._tracks: tuple[Any, Any] | None = None
        self._listeners: tuple[Any, ...] = ()
        self._tracks_ready = asyncio.Event()
        self._connected = asyncio.Event()

    async def _join(
        self, *, participant_id: str, audio_track: Any, video_track: Any, listeners: Sequence[Any]
    ) -> Meeting:
        self._participant_id = participant_id
        self._listeners = tuple(listeners)
        self._tracks = (audio_track, video_track)
        self._tracks_ready.set()
        try:
            await asyncio.wait_for(self._connected.wait(), self.join_timeout)
        except TimeoutError:
            raise JoinError(
                f"no WebRTC peer connected within {self.join_timeout:g} s "
                "(the local transport waits for POST /local/{room}/offer)"
            ) from None
        assert self._meeting is not None
        return self._meeting

    async def answer(self, sdp: str, kind: str, participant_id: str) -> tuple[str, str]:
        """Answer the agent side's offer with our tracks; raises ValueError for a bad offer."""
        if self._pc is not None:
            raise ValueError("this session already has a WebRTC peer")
        if kind != "offer":
            raise ValueError(f"expected an SDP offer, got type {kind!r}")
        await self._tracks_ready.wait()
        assert self._tracks is not None and self._participant_id is not None
        pc = self._pc = new_peer_connection()
        meeting = DataChannelMeeting(self._participant_id, participant_id)
        for listener in self._listeners:  # before any channel can open
            meeting.add_event_listener(listener)
        self._name_agent(participant_id)  # the peer that offers is the agent
        pc.on("datachannel", meeting.attach)
        pc.on("connectionstatechange", lambda: self._on_state(pc))
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        except Exception as exc:
            self._pc = None
            await pc.close()
            raise ValueError(f"the SDP offer could not be used: {exc}") from exc
        for track in self._tracks:
            pc.addTrack(track)
        await pc.setLocalDescription(await pc.createAnswer())
        asyncio.get_running_loop().create_task(self._wait_open(meeting))
        return pc.localDescription.sdp, pc.localDescription.type

    async def _wait_open(self, meeting: DataChannelMeeting) -> None:
        await meeting.wait_open()
        self._meeting = meeting
        self._connected.set()
        await meeting.closed.wait()
        self._close(REASON_AGENT_LEFT, "the agent's data channel closed")

    def _on_state(self, pc: RTCPeerConnection) -> None:
        logger.debug("peer connection state: %s", pc.connectionState)
        if pc.connectionState in ("failed", "closed"):
            if self._connected.is_set():
                self._close(REASON_AGENT_LEFT, f"the peer connection is {pc.connectionState}")
            else:
                self._close(REASON_PEER_FAILED, f"the peer connection is {pc.connectionState}")

    async def leave(self) -> None:
        pc, self._pc = self._pc, None
        if pc is not None:
            await pc.close()
