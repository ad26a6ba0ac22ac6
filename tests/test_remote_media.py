"""Remote media is dropped at the receiver from the first packet (transports/remote_media.py).

A real ``vsaiortc.RTCRtpReceiver`` is fed real Opus RTP packets.  Only its
DTLS transport is a stand-in (it records what the receiver registers and the
RTCP it sends; no ICE/DTLS/SRTP).  The old fix (``_handle_disconnect()`` when
the SDK reports the consumer, before ``receive()`` has started the decoder)
leaves a decoder thread running and the track's unbounded queue filling up;
the test checks both, with and without the fix.
"""

from __future__ import annotations

import asyncio
import fractions
import threading
from typing import Any

import numpy as np
import pytest
from av import AudioFrame
from vsaiortc.codecs import get_encoder
from vsaiortc.rtcrtpparameters import (
    RTCRtpCodecParameters,
    RTCRtpDecodingParameters,
    RTCRtpReceiveParameters,
)
from vsaiortc.rtcrtpreceiver import RemoteStreamTrack, RTCRtpReceiver
from vsaiortc.rtp import RtpPacket

from worker.transports.remote_media import discard_remote_media

OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
SSRC = 1234


class StandInDtlsTransport:
    """What the receiver touches on its ``RTCDtlsTransport``; no network."""

    state = "connected"
    _stats_id = "transport"

    def __init__(self) -> None:
        self.registered: list[Any] = []
        self.rtcp: list[bytes] = []

    def _register_rtp_receiver(self, receiver: Any, parameters: Any) -> None:
        self.registered.append(receiver)

    def _unregister_rtp_receiver(self, receiver: Any) -> None:
        self.registered.remove(receiver)

    async def _send_rtp(self, data: bytes) -> None:
        self.rtcp.append(data)


def opus_packets(count: int) -> list[RtpPacket]:
    """``count`` 20 ms Opus packets of a 440 Hz tone."""
    encoder = get_encoder(OPUS)
    packets = []
    t = np.arange(960) / 48000
    for i in range(count):
        tone = (8000 * np.sin(2 * np.pi * 440 * (t + i * 0.02))).astype(np.int16)
        frame = AudioFrame.from_ndarray(
            np.repeat(tone, 2).reshape(1, -1), format="s16", layout="stereo"
        )
        frame.sample_rate = 48000
        frame.pts = i * 960
        frame.time_base = fractions.Fraction(1, 48000)
        payloads, _ = encoder.encode(frame)
        for payload in payloads:
            packets.append(
                RtpPacket(
                    payload_type=111,
                    sequence_number=i & 0xFFFF,
                    timestamp=i * 960,
                    ssrc=SSRC,
                    payload=payload,
                )
            )
    return packets


def new_receiver() -> tuple[RTCRtpReceiver, StandInDtlsTransport]:
    transport = StandInDtlsTransport()
    receiver = RTCRtpReceiver("audio", transport)
    receiver._track = RemoteStreamTrack(kind="audio", track_buffer_size=1)  # as the SDK asks
    return receiver, transport


async def feed(receiver: RTCRtpReceiver, packets: list[RtpPacket]) -> None:
    await receiver.receive(
        RTCRtpReceiveParameters(
            codecs=[OPUS], encodings=[RTCRtpDecodingParameters(ssrc=SSRC, payloadType=111)]
        )
    )
    for packet in packets:
        await receiver._handle_rtp_packet(packet, arrival_time_ms=0)
    await asyncio.sleep(0.3)  # let a decoder thread, if any, catch up


def decoder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "audio-decoder" and t.is_alive()]


def queued_frames(receiver: RTCRtpReceiver) -> int:
    queue = receiver.track._queue
    return sum(1 for item in list(queue._queue) if item is not None)


async def test_old_fix_still_decodes_everything() -> None:
    """The SDK reports the consumer before receive(): stopping the decoder then is a no-op."""
    receiver, _ = new_receiver()
    before = len(decoder_threads())
    receiver._handle_disconnect()  # what the transport used to do on ADD_CONSUMER
    try:
        await feed(receiver, opus_packets(100))
        assert len(decoder_threads()) == before + 1
        assert queued_frames(receiver) >= 90  # unbounded: every packet decoded and kept
    finally:
        await receiver.stop()


async def test_discarded_receiver_decodes_and_keeps_nothing() -> None:
    receiver, transport = new_receiver()
    before = len(decoder_threads())
    assert discard_remote_media(receiver)  # on ADD_CONSUMER, before receive()
    try:
        await feed(receiver, opus_packets(100))
        assert len(decoder_threads()) == before  # the decoder thread was stopped at once
        assert receiver._RTCRtpReceiver__decoder_thread is None
        assert queued_frames(receiver) == 0
        assert transport.registered == [receiver]  # still registered: RTCP keeps flowing
        stats = receiver._RTCRtpReceiver__remote_streams[SSRC]
        assert stats.packets_received == 100  # receiver reports stay truthful
    finally:
        await receiver.stop()


async def test_discarding_after_receive_started_stops_the_decoder() -> None:
    receiver, _ = new_receiver()
    before = len(decoder_threads())
    await feed(receiver, [])
    assert len(decoder_threads()) == before + 1
    assert discard_remote_media(receiver)
    try:
        for packet in opus_packets(50):
            await receiver._handle_rtp_packet(packet, arrival_time_ms=0)
        await asyncio.sleep(0.2)
        assert len(decoder_threads()) == before
        assert queued_frames(receiver) == 0
    finally:
        await receiver.stop()


def test_discard_refuses_what_it_does_not_know() -> None:
    class NotAReceiver:
        pass

    assert not discard_remote_media(NotAReceiver())


@pytest.mark.parametrize("count", [500])
async def test_memory_stays_flat(count: int) -> None:
    """A receiver fed ``count`` packets keeps no frames (the old one keeps one per packet)."""
    import tracemalloc

    receiver, _ = new_receiver()
    discard_remote_media(receiver)
    packets = opus_packets(count)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        await feed(receiver, packets)
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
        await receiver.stop()
    assert grown < 256 * 1024, f"{grown} bytes kept for {count} packets"
