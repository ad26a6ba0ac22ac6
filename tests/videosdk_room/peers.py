"""The room's per-peer state: transports, producers, consumers (internal)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from vsaiortc import RTCDataChannel, RTCRtpReceiver, RTCRtpSender
from vsaiortc.mediastreams import MediaStreamTrack

from .records import PeerRecord, ProducerRecord
from .transports import ServerTransport

logger = logging.getLogger(__name__)

MAX_PENDING_DATA = 10_000  # messages kept for a data consumer whose channel is not open yet


class Reject(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(eq=False)
class Producer:
    id: str
    peer: Peer
    kind: str
    rtp: dict[str, Any]
    app_data: dict[str, Any]
    transport: ServerTransport
    receiver: RTCRtpReceiver
    track: MediaStreamTrack  # the decoded track, tapped by the recorder (sfu.TappedTrack)
    record: ProducerRecord
    consumers: set[Consumer] = field(default_factory=set)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    frames: int = 0  # decoded so far (when recorded)
    closed: bool = False


@dataclass(eq=False)
class Consumer:
    id: str
    peer: Peer  # the receiving peer
    producer: Producer
    sender: RTCRtpSender
    track: MediaStreamTrack
    closed: bool = False


@dataclass(eq=False)
class DataProducer:
    id: str
    peer: Peer
    label: str
    protocol: str
    stream: dict[str, Any]  # the client's sctpStreamParameters
    app_data: Any
    channel: RTCDataChannel
    consumers: dict[str, DataConsumer] = field(default_factory=dict)  # by peer id


@dataclass(eq=False)
class DataConsumer:
    id: str
    peer: Peer
    channel: RTCDataChannel
    pending: list[bytes | str] = field(default_factory=list)
    # The client answered newDataConsumer: its channel exists.  Before that, data on
    # the stream would reach an SCTP stream the client does not know and be lost.
    accepted: bool = False

    @property
    def sendable(self) -> bool:
        return self.accepted and self.channel.readyState == "open"

    def deliver(self, message: bytes | str) -> None:
        if self.sendable and not self.pending:
            self._send(message)
        elif (
            self.channel.readyState in ("connecting", "open")
            and len(self.pending) < MAX_PENDING_DATA
        ):
            self.pending.append(message)

    def flush(self) -> None:
        if not self.sendable:
            return
        pending, self.pending = self.pending, []
        for message in pending:
            self._send(message)

    def _send(self, message: bytes | str) -> None:
        try:
            self.channel.send(message)
        except Exception:
            logger.debug("data consumer %s: send failed", self.id, exc_info=True)


@dataclass(eq=False)
class Peer:
    room_id: str
    peer_id: str
    ws: web.WebSocketResponse
    http_request: web.Request
    record: PeerRecord
    transports: dict[str, ServerTransport] = field(default_factory=dict)
    recv_transport: ServerTransport | None = None
    producers: dict[str, Producer] = field(default_factory=dict)
    data_producers: dict[str, DataProducer] = field(default_factory=dict)
    consumers: dict[str, Consumer] = field(default_factory=dict)
    pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    next_mid: int = 0
    closed: bool = False

    @property
    def joined(self) -> bool:
        return self.record.joined and not self.closed

    def info(self) -> dict[str, Any]:
        """A peer as ``newPeer`` and the join response describe it (meeting.py reads these)."""
        r = self.record
        return {
            "id": r.peer_id,
            "displayName": r.display_name,
            "device": r.device,
            "mode": r.mode,
            "peerType": r.peer_type,
            "metaData": r.meta_data,
        }
