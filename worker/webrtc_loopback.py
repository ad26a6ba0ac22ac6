"""A room of two WebRTC peers on 127.0.0.1: the ``local`` transport and its agent side.

The avatar session answers; the agent side (a test, a demo, an agent
without a VideoSDK account) offers.  The agent's offer carries two data
channels and asks to receive one audio and one video track::

    agent peer (offerer)                          avatar session (answerer)
      data channel "reliable"   (ordered)      ─▶  RELIABLE messages
      data channel "unreliable" (unordered,    ─▶  UNRELIABLE messages
                                  no retransmits)
      audio transceiver (recvonly)             ◀─  AvatarVoiceTrack
      video transceiver (recvonly, VP8|H264)   ◀─  AvatarVisualTrack

:class:`DataChannelMeeting` gives both ends the data-channel surface of
``videosdk.Meeting`` with the SDK's delivery facts: ``send`` takes ``bytes``
or ``str`` of at most 15,360 bytes, and a received payload that decodes as
UTF-8 is handed over as ``str``.

No STUN/TURN servers are used, and host candidates are restricted to
127.0.0.1 (:func:`restrict_ice_to_loopback`): aioice normally gathers every
interface address except loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from vsaiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from vsaiortc.mediastreams import MediaStreamTrack

from .ice import LOOPBACK, gather_on, gathering_on
from .protocol import RELIABLE, UNRELIABLE, check_outgoing

logger = logging.getLogger(__name__)

CHANNEL_MODES = {"reliable": RELIABLE, "unreliable": UNRELIABLE}


def restrict_ice_to_loopback() -> None:
    """From now on, gather ICE host candidates on 127.0.0.1 only (this process)."""
    gather_on([LOOPBACK])


def ice_on_loopback() -> contextlib.AbstractContextManager[None]:
    """:func:`restrict_ice_to_loopback` for the duration of a ``with`` block."""
    return gathering_on([LOOPBACK])


def new_peer_connection() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


class DataChannelMeeting:
    """The data-channel surface of ``videosdk.Meeting`` over two RTCDataChannels.

    Messages reach listeners as in the SDK: ``listener.handle_event("data",
    data)``, unguarded (a listener must be a ``MeetingEventHandler``; one that
    raises stops that message's delivery to the listeners after it).  Not
    modelled: the SDK's signalling (peer announcements, ``meeting-joined`` /
    ``meeting-left``), its mediasoup consumers and its join sequence.
    """

    def __init__(self, local_id: str, remote_id: str) -> None:
        self.participant_id = local_id
        self.remote_id = remote_id
        self._channels: dict[str, RTCDataChannel] = {}
        self._listeners: list[Any] = []
        self._both_open = asyncio.Event()
        self.closed = asyncio.Event()

    def attach(self, channel: RTCDataChannel) -> None:
        mode = CHANNEL_MODES.get(channel.label)
        if mode is None:
            logger.info("ignoring data channel %r", channel.label)
            return
        self._channels[mode] = channel
        channel.on("message", lambda message: self._dispatch(message, mode))
        channel.on("open", self._check_open)
        channel.on("close", self.closed.set)
        self._check_open()

    def _check_open(self) -> None:
        if len(self._channels) == 2 and all(
            c.readyState == "open" for c in self._channels.values()
        ):
            self._both_open.set()

    async def wait_open(self) -> None:
        await self._both_open.wait()

    async def send(self, payload: bytes | str, options: dict | None = None) -> bool:
        mode = (options or {}).get("reliability", RELIABLE)
        payload = check_outgoing(payload)
        channel = self._channels.get(mode)
        if channel is None or channel.readyState != "open":
            raise ConnectionError("Cannot send message, Network is not available.")
        channel.send(payload)
        return True

    def add_event_listener(self, listener: Any) -> None:
        self._listeners.append(listener)

    def remove_event_listener(self, listener: Any) -> None:
        self._listeners.remove(listener)

    def _dispatch(self, message: bytes | str, mode: str) -> None:
        if isinstance(message, bytes):
            try:
                message = message.decode("utf-8")  # what the SDK does on receipt
            except UnicodeDecodeError:
                pass
        data = {
            "payload": message,
            "from": self.remote_id,
            "timestamp": int(time.time() * 1000),
            "reliability": mode,
        }
        # Exactly what ``Meeting.__emit`` does: ``handle_event`` with no guard.
        for listener in list(self._listeners):
            listener.handle_event("data", data)


def prefer_codec(transceiver: Any, mime_type: str) -> None:
    """Offer only ``mime_type`` (e.g. ``video/VP8``, ``video/H264``) on a transceiver."""
    codecs = [
        c
        for c in RTCRtpSender.getCapabilities(transceiver.kind).codecs
        if c.mimeType.lower() == mime_type.lower() or c.mimeType.lower() == "video/rtx"
    ]
    if not any(c.mimeType.lower() == mime_type.lower() for c in codecs):
        raise ValueError(f"codec {mime_type} is not available")
    transceiver.setCodecPreferences(codecs)


@dataclass
class AgentPeer:
    """The agent side of a loopback room: a data-channel meeting plus the received tracks."""

    pc: RTCPeerConnection
    meeting: DataChannelMeeting
    tracks: dict[str, MediaStreamTrack] = field(default_factory=dict)

    @property
    def audio(self) -> MediaStreamTrack:
        return self.tracks["audio"]

    @property
    def video(self) -> MediaStreamTrack:
        return self.tracks["video"]

    async def close(self) -> None:
        await self.pc.close()


Signal = Callable[[str, str], Awaitable[tuple[str, str]]]


async def connect_agent(
    signal: Signal,
    *,
    participant_id: str,
    avatar_id: str = "avatar",
    video_codec: str | None = None,
    timeout: float = 10.0,
) -> AgentPeer:
    """Offer to an avatar session and wait until both data channels are open.

    ``signal(sdp, type)`` delivers the offer (e.g. POST to the dispatcher's
    ``/local/{room}/offer``) and returns the answer's ``(sdp, type)``.
    """
    pc = new_peer_connection()
    meeting = DataChannelMeeting(participant_id, avatar_id)
    peer = AgentPeer(pc, meeting)
    meeting.attach(pc.createDataChannel("reliable"))
    meeting.attach(pc.createDataChannel("unreliable", ordered=False, maxRetransmits=0))
    pc.addTransceiver("audio", direction="recvonly")
    video = pc.addTransceiver("video", direction="recvonly")
    if video_codec:
        prefer_codec(video, video_codec)
    pc.on("track", lambda track: peer.tracks.__setitem__(track.kind, track))
    try:
        await pc.setLocalDescription(await pc.createOffer())
        sdp, kind = await signal(pc.localDescription.sdp, pc.localDescription.type)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        await asyncio.wait_for(meeting.wait_open(), timeout)
    except BaseException:
        await pc.close()
        raise
    return peer
