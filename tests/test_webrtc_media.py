"""The whole path over real WebRTC on 127.0.0.1, without VideoSDK's cloud.

::

    AvatarAudioOut.connect() ──HTTP──▶ dispatcher ──spawns──▶ session process
    AvatarAudioOut ──data channels of a loopback RTCPeerConnection──▶ session
        ──audio ring──▶ renderer process (pattern) ──frame ring──▶ session
        ──▶ synchronizer ──▶ voice + visual tracks
        ──RTP (Opus + VP8 | H264)──▶ the agent-side RTCPeerConnection ──▶ decoded here

The audio carries loud clicks at the start of some frames; the pattern
renderer lights a corner marker in the frame whose audio holds a click.  At
the receiver, each marker onset is matched with its click on the RTP media
timeline (the timestamps a receiver lip-syncs by): that difference is the A/V
offset.  ICE candidates are restricted to 127.0.0.1 and no STUN/TURN server
is configured, so no packet leaves the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import pytest
from clicks import (
    AUDIO_RATE,
    FPS,
    VIDEO_RATE,
    click_onsets,
    clicked_speech,
    marker_level,
    marker_onsets,
)

from worker.audio_out import AvatarAudioOut
from worker.auth import generate_avatar_credentials
from worker.dispatcher.app import RunningServer
from worker.dispatcher.config import DispatcherConfig
from worker.webrtc_loopback import AgentPeer, connect_agent, ice_on_loopback

SIZE = 256
API_KEY = "media-test-key"
SECRET = "media-test-secret-0123456789abcdef0123"
BEARER = "media-bearer"
SPEECH_SECONDS = 4.0


@dataclass
class Received:
    video: list[tuple[float, int, float]] = field(default_factory=list)  # arrival, pts, marker
    audio: list[tuple[float, int, np.ndarray]] = field(default_factory=list)  # arrival, pts, pcm
    sizes: set[tuple[int, int]] = field(default_factory=set)

    async def pull_video(self, peer: AgentPeer) -> None:
        while True:
            frame = await peer.video.recv()
            self.sizes.add((frame.width, frame.height))
            self.video.append((time.monotonic(), frame.pts, marker_level(frame)))

    async def pull_audio(self, peer: AgentPeer) -> None:
        while True:
            frame = await peer.audio.recv()
            channels = len(frame.layout.channels)
            pcm = frame.to_ndarray().reshape(-1, channels)[:, 0].copy()
            self.audio.append((time.monotonic(), frame.pts, pcm))


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    config = DispatcherConfig(
        port=0,
        transport="local",
        renderer="pattern",
        in_process=False,  # the shared renderer process, through the rings
        api_key=API_KEY,
        secret=SECRET,
        token=BEARER,
        width=SIZE,
        height=SIZE,
        fps=FPS,
        log_level="warning",
    )
    config.validate()
    running = await RunningServer.start(config)
    yield running
    await running.close()


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["video/VP8", "video/H264"])
async def test_whole_path_is_in_sync_at_the_receiver(server: RunningServer, codec: str) -> None:
    credentials = generate_avatar_credentials(API_KEY, SECRET)
    out = AvatarAudioOut(
        credentials=credentials, avatar_dispatcher_url=f"{server.url}/launch", room_id="room-m"
    )
    await out.connect()  # the agent's join request, signed with the VideoSDK secret

    async with aiohttp.ClientSession() as http:

        async def signal(sdp: str, kind: str) -> tuple[str, str]:
            body = {"sdp": sdp, "type": kind, "participant_id": "agent-m"}
            headers = {"Authorization": f"Bearer {BEARER}"}
            async with http.post(
                f"{server.url}/local/room-m/offer", json=body, headers=headers
            ) as r:
                answer = await r.json()
                assert r.status == 200, answer
                return answer["sdp"], answer["type"]

        with ice_on_loopback():
            peer = await connect_agent(
                signal,
                participant_id="agent-m",
                avatar_id=credentials.participant_id,
                video_codec=codec,
            )
    received = Received()
    pullers = [
        asyncio.create_task(received.pull_video(peer)),
        asyncio.create_task(received.pull_audio(peer)),
    ]
    try:
        out._set_meeting(peer.meeting)
        await asyncio.sleep(0.5)  # idle frames first
        audio, n_clicks = clicked_speech(SPEECH_SECONDS)
        await out.handle_audio_input(audio.tobytes())
        await out.send_segment_end()
        deadline = time.monotonic() + SPEECH_SECONDS + 10
        while not out.acks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # the last frames in flight
    finally:
        for task in pullers:
            task.cancel()
        for task in pullers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await peer.close()
        await out.aclose()

    # The agent was told how much was played.
    assert out.acks, "no stream_ended from the avatar"
    position, interrupted = out.acks[0]
    assert not interrupted
    assert position == pytest.approx(SPEECH_SECONDS, abs=0.05)

    # Decoded video: the configured size, 25 fps on the media timeline, no frame missing.
    assert received.sizes == {(SIZE, SIZE)}
    video_pts = np.array([pts for _, pts, _ in received.video])
    steps = np.diff(video_pts)
    assert (steps == VIDEO_RATE // FPS).all(), f"video pts gaps: {sorted(set(steps.tolist()))}"
    span = (video_pts[-1] - video_pts[0]) / VIDEO_RATE
    assert len(video_pts) - 1 == round(span * FPS)
    assert span > SPEECH_SECONDS
    # Decoded audio: contiguous 20 ms frames.
    audio_pts = np.array([pts for _, pts, _ in received.audio])
    assert (np.diff(audio_pts) == AUDIO_RATE // 50).all()

    # Every click was heard and seen, and each marker shows with its click.
    clicks, onsets = click_onsets(received.audio), marker_onsets(received.video)
    assert len(clicks) == n_clicks
    assert len(onsets) == n_clicks
    offsets_ms = np.array([(v - a) * 1000 for (v, _), (a, _) in zip(onsets, clicks, strict=True)])
    p95 = float(np.percentile(np.abs(offsets_ms), 95))
    arrival_ms = [(v - a) * 1000 for (_, v), (_, a) in zip(onsets, clicks, strict=True)]
    print(
        f"{codec}: A/V offset on the RTP timeline p95 |{p95:.1f}| ms "
        f"(values {sorted(set(np.round(offsets_ms, 1)))}); by arrival median "
        f"{np.median(arrival_ms):.1f} ms (includes the receiver's audio jitter buffer)"
    )
    assert p95 <= 20.0, offsets_ms
