"""Local sessions to measure: an agent on a local room, our server, and a run of speech.

The pieces are the ones a live session uses (``AvatarAudioOut`` ->
``LocalRoom`` -> ``AvatarAudioIn`` -> ``AvatarServer`` -> renderer ->
synchronizer -> tracks); only the network is replaced by the local room.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from fractions import Fraction
from typing import Any, Protocol

import numpy as np

from worker.audio_in import AvatarAudioIn
from worker.audio_out import AvatarAudioOut
from worker.auth import AvatarAuthCredentials
from worker.local_room import LocalRoom
from worker.renderer_factory import load_factory
from worker.server import AvatarServer
from worker.tracks import VIDEO_CLOCK_RATE
from worker.types import AvatarRenderer, AvatarSettings

from .common import BenchConfig, Skip
from .trace import Consumer, Trace

CHUNK_MS = 40  # a streaming TTS's chunk


def avatar_settings(config: BenchConfig) -> AvatarSettings:
    """The session's output format for this benchmark run."""
    return AvatarSettings(
        video_width=config.width,
        video_height=config.height,
        video_fps=config.fps,
        audio_sample_rate=config.sample_rate,
    )


class LocalAgent:
    """The agent's end of a local room, and the avatar's receiver at the other end."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self.room = LocalRoom()
        agent_meeting = self.room.join("agent")
        self.avatar_meeting = self.room.join("avatar")
        self.out = AvatarAudioOut(credentials=AvatarAuthCredentials("avatar", "local"))
        self.out._set_meeting(agent_meeting)
        self.audio_in = AvatarAudioIn(
            self.avatar_meeting,
            sample_rate=sample_rate,
            agent_participant_id="agent",
            self_participant_id="avatar",
        )
        self.first_send: float | None = None  # monotonic time of the first audio byte sent

    async def speak(self, pcm: np.ndarray, *, speed: float) -> None:
        """Send one segment in 40 ms chunks, ``speed`` times faster than real time
        (as a streaming TTS produces it); ``speed=0``: all at once."""
        chunk = self.sample_rate * CHUNK_MS // 1000
        start = time.monotonic()
        for i, offset in enumerate(range(0, len(pcm), chunk)):
            if speed > 0:
                delay = start + i * CHUNK_MS / 1000 / speed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if self.first_send is None:
                self.first_send = time.monotonic()
            await self.out.handle_audio_input(pcm[offset : offset + chunk].tobytes())
        await self.out.send_segment_end()

    async def interrupt(self) -> None:
        await self.out.interrupt()

    async def aclose(self) -> None:
        await self.out.aclose()
        await self.audio_in.aclose()


class Session(Protocol):
    """What :func:`run_speech` needs of a design: its two tracks and its progress."""

    audio_track: Any
    video_track: Any

    async def start(self) -> None: ...
    def played(self, segments: int = 1) -> bool: ...
    def first_frame_time(self, trace: Trace, after: float = 0.0) -> float | None: ...
    async def aclose(self) -> None: ...


class ServerSession:
    """This design: ``AvatarServer`` with its synchronizer, around any ``AvatarRenderer``."""

    def __init__(
        self,
        agent: LocalAgent,
        renderer: AvatarRenderer,
        settings: AvatarSettings,
        jitter_frames: int,
    ) -> None:
        self.server = AvatarServer(
            agent.avatar_meeting,
            audio_recv=agent.audio_in,
            video_gen=renderer,
            options=settings,
            jitter_frames=jitter_frames,
        )
        self.audio_track = self.server.audio_track
        self.video_track = self.server.video_track
        self.stats = self.server.av_sync.stats

    async def start(self) -> None:
        await self.server.start()

    def played(self, segments: int = 1) -> bool:
        return len(self.server.acks) >= segments

    def first_frame_time(self, trace: Trace, after: float = 0.0) -> float | None:
        """When the first picture of the first speech received after ``after`` came out.

        The synchronizer shows a speech frame from the first video tick at or
        after the clock position where its audio starts.
        """
        position = trace.first_speech_position(after)
        if position is None:
            return None
        fps = self.video_track.fps
        rate = Fraction(self.server.clock.sample_rate)
        for t, pts in zip(trace.video_times, trace.video_pts, strict=True):
            tick = round(pts * fps / VIDEO_CLOCK_RATE)
            if t >= after and int(tick * rate / fps) >= position:
                return t
        return None

    async def aclose(self) -> None:
        await self.server.aclose()


@contextlib.asynccontextmanager
async def open_avatar_renderer(
    factory: str, kwargs: dict[str, Any], settings: AvatarSettings, *, in_process: bool
) -> AsyncIterator[AvatarRenderer]:
    """A frame renderer behind the renderer process (or in this process, for debugging)."""
    if in_process:
        from worker.inprocess_renderer import InProcessRenderer

        frame_renderer = load_factory(factory)(**kwargs)
        try:
            yield InProcessRenderer(frame_renderer)
        finally:
            frame_renderer.close()
        return
    try:
        from worker.shm_renderer import ShmRenderer
    except ImportError as exc:
        raise Skip(f"the renderer process is not available ({exc})") from exc
    renderer = await ShmRenderer.open(factory, kwargs, settings=settings)
    try:
        yield renderer
    finally:
        await renderer.aclose()


async def run_speech(
    session: Session,
    agent: LocalAgent,
    pcm: np.ndarray,
    *,
    fps: float,
    speed: float,
    lead_in: float = 0.5,
    timeout: float | None = None,
) -> Trace:
    """Start the session, idle for ``lead_in`` s, speak ``pcm`` at ``speed`` times real
    time and record until it played."""
    consumer = Consumer(session.audio_track, session.video_track, fps, agent.sample_rate)
    seconds = len(pcm) / agent.sample_rate
    timeout = timeout if timeout is not None else 20.0 + 3.0 * seconds
    await session.start()
    consumer.start()
    speaking: asyncio.Task | None = None
    try:
        await asyncio.sleep(lead_in)
        speaking = asyncio.create_task(agent.speak(pcm, speed=speed))
        deadline = time.monotonic() + timeout
        while not session.played():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the session did not play {seconds:.1f} s of speech in time")
            await asyncio.sleep(0.02)
        await speaking
        await asyncio.sleep(2.0 / fps)  # a last tick or two after the speech
    finally:
        if speaking is not None and not speaking.done():
            speaking.cancel()
        await consumer.stop()
    return consumer.trace
