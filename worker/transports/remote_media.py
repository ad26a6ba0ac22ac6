"""Receive nobody's media: the avatar publishes tracks and never plays remote ones.

The ``videosdk`` SDK consumes every remote track (``autoConsume``) and its
``vsaiortc`` receiver decodes each one in a thread into the track's queue,
which for audio is unbounded: about 0.7 GB an hour of the agent's decoded
speech, plus the decode CPU.  Stopping the decoder when the SDK reports the
consumer (``ADD_CONSUMER``) is not enough: ``RTCRtpReceiver.receive()``, which
starts the decoder thread, runs later (when the transport's DTLS is up), and
``_handle_disconnect()`` before that does nothing.

:func:`discard_remote_media` therefore works at the receiver itself, whatever
its state:

* its ``_handle_rtp_packet`` becomes one that only keeps the per-SSRC
  reception statistics (so RTCP receiver reports stay truthful for the SFU)
  and drops the packet: no depacketizing, no jitter buffer, no decoder queue;
* its ``receive`` still registers it with the transport and starts RTCP, then
  stops the decoder thread it just started (the thread is idle: it has
  nothing to decode);
* if ``receive`` already ran, the decoder thread is stopped now.

The DTLS/ICE transport and RTCP keep running, so the connection stays
healthy.  It relies on ``vsaiortc`` internals (checked by the unit tests);
where they are missing it returns False and the caller drains the track.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

_STREAMS = "_RTCRtpReceiver__remote_streams"
_CODECS = "_RTCRtpReceiver__codecs"


def discard_remote_media(receiver: Any) -> bool:
    """Make ``receiver`` (a ``vsaiortc.RTCRtpReceiver``) drop all RTP; False if it cannot."""
    if getattr(receiver, "_avatar_discarding", False):
        return True
    stop_decoder = getattr(receiver, "_handle_disconnect", None)
    receive = getattr(receiver, "receive", None)
    if not callable(stop_decoder) or not callable(receive) or not hasattr(receiver, _STREAMS):
        return False
    from vsaiortc.rtcrtpreceiver import StreamStatistics

    streams: dict = getattr(receiver, _STREAMS)
    codecs: dict = getattr(receiver, _CODECS, {})

    async def handle_rtp_packet(packet: Any, arrival_time_ms: int = 0) -> None:
        codec = codecs.get(packet.payload_type)
        if codec is None:
            return
        stats = streams.get(packet.ssrc)
        if stats is None:
            stats = streams[packet.ssrc] = StreamStatistics(codec.clockRate)
        stats.add(packet)

    async def receive_without_decoder(parameters: Any) -> None:
        await receive(parameters)
        stop_decoder()  # the decoder thread receive() started: idle, it stops at once

    receiver._handle_rtp_packet = handle_rtp_packet
    receiver.receive = receive_without_decoder
    receiver._avatar_discarding = True
    stop_decoder()  # in case receive() already ran
    return True
