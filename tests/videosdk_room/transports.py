"""The room's end of a mediasoup WebRTC transport, built from vsaiortc's ORTC objects.

One :class:`ServerTransport` per ``createWebRtcTransport``: an ICE-lite endpoint
(aioice in controlled mode that never sends its own checks: it answers the
client's checks and takes the pair the client nominates), a DTLS transport with
its own certificate, and an SCTP association when the client asked for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import aioice.ice
from aioice.ice import CandidatePair, Connection
from vsaiortc import (
    RTCCertificate,
    RTCDtlsFingerprint,
    RTCDtlsParameters,
    RTCDtlsTransport,
    RTCIceGatherer,
    RTCIceParameters,
    RTCIceTransport,
    RTCSctpTransport,
)
from vsaiortc.rtcrtpparameters import (
    RTCRtcpFeedback,
    RTCRtcpParameters,
    RTCRtpCodecParameters,
    RTCRtpDecodingParameters,
    RTCRtpEncodingParameters,
    RTCRtpHeaderExtensionParameters,
    RTCRtpReceiveParameters,
    RTCRtpRtxParameters,
    RTCRtpSendParameters,
)

from worker.ice import LOOPBACK, host_addresses_on

logger = logging.getLogger(__name__)

SCTP_PORT = 5000
SCTP_STREAMS = 1024
SCTP_MAX_MESSAGE_SIZE = 262144

VIDEO_FEEDBACK = [
    {"type": "nack", "parameter": ""},
    {"type": "nack", "parameter": "pli"},
    {"type": "goog-remb", "parameter": ""},
]

# Payload types and extension ids equal aiortc's own (the SDK's "native" capabilities),
# so producers' and consumers' parameters need no mapping (mediasoup would remap).
ROUTER_RTP_CAPABILITIES: dict[str, Any] = {
    "codecs": [
        {
            "kind": "audio",
            "mimeType": "audio/opus",
            "clockRate": 48000,
            "channels": 2,
            "preferredPayloadType": 96,
            "parameters": {},
            "rtcpFeedback": [],
        },
        {
            "kind": "audio",
            "mimeType": "audio/PCMU",
            "clockRate": 8000,
            "channels": 1,
            "preferredPayloadType": 0,
            "parameters": {},
            "rtcpFeedback": [],
        },
        {
            "kind": "audio",
            "mimeType": "audio/PCMA",
            "clockRate": 8000,
            "channels": 1,
            "preferredPayloadType": 8,
            "parameters": {},
            "rtcpFeedback": [],
        },
        {
            "kind": "video",
            "mimeType": "video/VP8",
            "clockRate": 90000,
            "preferredPayloadType": 97,
            "parameters": {},
            "rtcpFeedback": VIDEO_FEEDBACK,
        },
        {
            "kind": "video",
            "mimeType": "video/rtx",
            "clockRate": 90000,
            "preferredPayloadType": 98,
            "parameters": {"apt": 97},
            "rtcpFeedback": [],
        },
        {
            "kind": "video",
            "mimeType": "video/H264",
            "clockRate": 90000,
            "preferredPayloadType": 101,
            "parameters": {
                "level-asymmetry-allowed": 1,
                "packetization-mode": 1,
                "profile-level-id": "42e01f",
            },
            "rtcpFeedback": VIDEO_FEEDBACK,
        },
        {
            "kind": "video",
            "mimeType": "video/rtx",
            "clockRate": 90000,
            "preferredPayloadType": 102,
            "parameters": {"apt": 101},
            "rtcpFeedback": [],
        },
    ],
    "headerExtensions": [
        {
            "kind": "audio",
            "uri": "urn:ietf:params:rtp-hdrext:sdes:mid",
            "preferredId": 1,
            "preferredEncrypt": False,
            "direction": "sendrecv",
        },
        {
            "kind": "audio",
            "uri": "urn:ietf:params:rtp-hdrext:ssrc-audio-level",
            "preferredId": 2,
            "preferredEncrypt": False,
            "direction": "sendrecv",
        },
        {
            "kind": "video",
            "uri": "urn:ietf:params:rtp-hdrext:sdes:mid",
            "preferredId": 1,
            "preferredEncrypt": False,
            "direction": "sendrecv",
        },
        {
            "kind": "video",
            "uri": "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
            "preferredId": 3,
            "preferredEncrypt": False,
            "direction": "sendrecv",
        },
        {
            "kind": "video",
            "uri": "http://www.webrtc.org/experiments/rtp-hdrext/abs-capture-time",
            "preferredId": 7,
            "preferredEncrypt": False,
            "direction": "sendrecv",
        },
    ],
}


# -- loopback ICE ---------------------------------------------------------------------

_original_get_host_addresses = aioice.ice.get_host_addresses
_loopback_users = 0


_loopback_host_addresses = host_addresses_on([LOOPBACK])


def patch_loopback_ice() -> Callable[[], None]:
    """Make aioice gather only 127.0.0.1 host candidates (process-wide, reference counted).

    aioice skips the loopback address by default.  Returns the function that undoes
    this call; the original is back once every caller has undone its call.
    """
    global _loopback_users
    _loopback_users += 1
    aioice.ice.get_host_addresses = _loopback_host_addresses
    undone = False

    def undo() -> None:
        global _loopback_users
        nonlocal undone
        if undone:
            return
        undone = True
        _loopback_users -= 1
        if _loopback_users == 0:
            aioice.ice.get_host_addresses = _original_get_host_addresses

    return undo


@contextlib.contextmanager
def loopback_ice() -> Iterator[None]:
    undo = patch_loopback_ice()
    try:
        yield
    finally:
        undo()


class _LiteConnection(Connection):
    """aioice in ICE-lite manners: answer checks, never send any, accept the nomination.

    The client's ICE password is never signalled to a mediasoup server, so the room
    cannot run checks of its own; like mediasoup it learns the client's address from
    the client's (authenticated) checks and uses the pair the client nominates.
    """

    def _valid_username(self, username: str) -> bool:
        local_username, colon, _ = username.partition(":")
        return colon == ":" and local_username == self.local_username

    async def check_start(self, pair: CandidatePair) -> None:
        # The client's check on this pair just succeeded (we answered it).
        self.check_state(pair, CandidatePair.State.SUCCEEDED)
        if pair.remote_nominated:
            pair.nominated = True
        self.check_complete(pair)

    async def query_consent(self) -> None:  # consent checks need the client's password
        return None


def _lite_gatherer() -> RTCIceGatherer:
    gatherer = RTCIceGatherer(iceServers=[])
    gatherer._connection.__class__ = _LiteConnection
    return gatherer


# -- parameter conversion ---------------------------------------------------------------


def _codec(c: dict[str, Any]) -> RTCRtpCodecParameters:
    return RTCRtpCodecParameters(
        mimeType=c["mimeType"],
        clockRate=int(c["clockRate"]),
        channels=c.get("channels"),
        payloadType=int(c["payloadType"]),
        rtcpFeedback=[
            RTCRtcpFeedback(type=f["type"], parameter=f.get("parameter") or None)
            for f in c.get("rtcpFeedback") or []
        ],
        parameters=dict(c.get("parameters") or {}),
    )


def receive_parameters(rtp: dict[str, Any]) -> RTCRtpReceiveParameters:
    """Producer ``rtpParameters`` (as the SDK sends them) -> receiver parameters."""
    codecs = [_codec(c) for c in rtp.get("codecs") or []]
    media_pt = next(c.payloadType for c in codecs if not c.mimeType.lower().endswith("/rtx"))
    encodings = []
    for e in rtp.get("encodings") or []:
        if e.get("ssrc") is None:
            continue
        rtx = e.get("rtx") or {}
        encodings.append(
            RTCRtpDecodingParameters(
                ssrc=int(e["ssrc"]),
                payloadType=media_pt,
                rtx=RTCRtpRtxParameters(ssrc=int(rtx["ssrc"])) if rtx.get("ssrc") else None,
            )
        )
    rtcp = rtp.get("rtcp") or {}
    return RTCRtpReceiveParameters(
        codecs=codecs,
        headerExtensions=[
            RTCRtpHeaderExtensionParameters(id=int(h["id"]), uri=h["uri"])
            for h in rtp.get("headerExtensions") or []
        ],
        muxId=str(rtp.get("mid") or ""),
        rtcp=RTCRtcpParameters(cname=rtcp.get("cname"), mux=True),
        encodings=encodings,
    )


def consumer_rtp_parameters(
    producer_rtp: dict[str, Any], *, mid: str, ssrc: int, cname: str
) -> dict[str, Any]:
    """What a consumer is told (newConsumer): the producer's media codec, no RTX."""
    codecs = [
        c for c in producer_rtp.get("codecs") or [] if not c["mimeType"].lower().endswith("/rtx")
    ][:1]
    return {
        "mid": mid,
        "codecs": codecs,
        "headerExtensions": list(producer_rtp.get("headerExtensions") or []),
        "encodings": [{"ssrc": ssrc}],
        "rtcp": {"cname": cname, "reducedSize": True, "mux": True},
    }


def send_parameters(consumer_rtp: dict[str, Any], *, ssrc: int) -> RTCRtpSendParameters:
    rtcp = consumer_rtp.get("rtcp") or {}
    return RTCRtpSendParameters(
        codecs=[_codec(c) for c in consumer_rtp["codecs"]],
        headerExtensions=[
            RTCRtpHeaderExtensionParameters(id=int(h["id"]), uri=h["uri"])
            for h in consumer_rtp.get("headerExtensions") or []
        ],
        muxId=consumer_rtp["mid"],
        rtcp=RTCRtcpParameters(cname=rtcp.get("cname"), ssrc=ssrc, mux=True),
        encodings=[RTCRtpEncodingParameters(ssrc=ssrc, payloadType=0)],
    )


# -- the transport ------------------------------------------------------------------------


class ServerTransport:
    """ICE-lite + DTLS (+ SCTP) endpoint for one client transport."""

    def __init__(self, *, producing: bool, sctp: bool) -> None:
        self.id = str(uuid.uuid4())
        self.producing = producing
        self._gatherer = _lite_gatherer()
        self.ice = RTCIceTransport(self._gatherer)
        self.certificate = RTCCertificate.generateCertificate()
        self.dtls = RTCDtlsTransport(self.ice, [self.certificate])
        self.sctp: RTCSctpTransport | None = RTCSctpTransport(self.dtls) if sctp else None
        self.connected = asyncio.Event()
        self.closed = False
        self._connect_task: asyncio.Task[None] | None = None
        self._next_stream_id = 0

    async def gather(self) -> None:
        await self._gatherer.gather()

    def describe(self) -> dict[str, Any]:
        """The createWebRtcTransport response data."""
        params = self._gatherer.getLocalParameters()
        candidates = [
            {
                "foundation": c.foundation,
                "priority": c.priority,
                "ip": c.ip,
                "protocol": c.protocol.lower(),
                "port": c.port,
                "type": c.type,
            }
            for c in self._gatherer.getLocalCandidates()
        ]
        return {
            "id": self.id,
            "iceParameters": {
                "usernameFragment": params.usernameFragment,
                "password": params.password,
                "iceLite": True,
            },
            "iceCandidates": candidates,
            "dtlsParameters": {
                "role": "auto",
                "fingerprints": [
                    {"algorithm": f.algorithm, "value": f.value}
                    for f in self.certificate.getFingerprints()
                ],
            },
            "sctpParameters": (
                {
                    "port": SCTP_PORT,
                    "OS": SCTP_STREAMS,
                    "MIS": SCTP_STREAMS,
                    "maxMessageSize": SCTP_MAX_MESSAGE_SIZE,
                }
                if self.sctp is not None
                else None
            ),
        }

    def connect(self, client_dtls: dict[str, Any]) -> None:
        """connectWebRtcTransport: start ICE/DTLS/SCTP in the background."""
        if self._connect_task is not None:
            return
        client_role = client_dtls.get("role", "auto")
        self.dtls._set_role("client" if client_role == "server" else "server")
        fingerprints = [
            RTCDtlsFingerprint(algorithm=f["algorithm"], value=f["value"])
            for f in client_dtls.get("fingerprints") or []
        ]
        self._connect_task = asyncio.ensure_future(self._connect(fingerprints))

    async def _connect(self, fingerprints: list[RTCDtlsFingerprint]) -> None:
        try:
            # The client's credentials are unknown (never signalled): dummies, see _LiteConnection.
            await self.ice.start(RTCIceParameters(usernameFragment="-", password="-"))
            if self.closed or self.ice.state != "completed":
                return
            await self.dtls.start(RTCDtlsParameters(fingerprints=fingerprints))
            if self.closed or self.dtls.state != "connected":
                return
            if self.sctp is not None:
                await self.sctp.start(RTCSctpTransport.getCapabilities(), SCTP_PORT)
            self.connected.set()
        except Exception:
            if not self.closed:
                logger.warning("transport %s failed to connect", self.id, exc_info=True)

    def next_stream_id(self) -> int:
        sid = self._next_stream_id
        self._next_stream_id += 1
        return sid

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.sctp is not None:
            with contextlib.suppress(Exception):
                await self.sctp.stop()
        with contextlib.suppress(Exception):
            await self.dtls.stop()
        with contextlib.suppress(Exception):
            await self.ice.stop()
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
            with contextlib.suppress(BaseException):
                await self._connect_task
