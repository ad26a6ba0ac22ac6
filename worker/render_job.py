"""``avatar-server render``: one local session end to end, written to an MP4.

The same parts as a live session: the agent-side ``AvatarAudioOut`` sends the
file through a :class:`~worker.local_room.LocalRoom` to ``AvatarAudioIn`` ->
``AvatarServer`` -> renderer -> synchronizer -> tracks.  A recorder pulls the
tracks the way a WebRTC sender does and keeps what the room would receive
from the first speech sample to the end of the segment, so the file lasts as
long as the input (within one video frame).  Unlike a live session, a render
waits for a renderer slower than real time instead of stalling, so a large
model on a small CPU still gives a complete, gap-free file (it just takes longer).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from . import protocol
from .audio_in import AvatarAudioIn
from .audio_out import AvatarAudioOut
from .auth import AvatarAuthCredentials
from .clock import FrameTiming, MediaClock
from .local_room import LocalRoom
from .mp4 import Mp4Writer
from .server import AvatarServer
from .synchronizer import DEFAULT_JITTER_FRAMES
from .types import AvatarRenderer, AvatarSettings

logger = logging.getLogger(__name__)

SAMPLE_SPEECH = Path(__file__).parent / "data" / "sample_speech.wav"


class RenderError(Exception):
    """A render that cannot run; the message says why in plain words."""


@dataclass
class RenderReport:
    out: Path
    input_seconds: float
    output_seconds: float
    video_frames: int
    fps: float
    stalls: int
    frames_dropped: int
    ack: tuple[float, bool] | None


def read_audio(path: str | Path, sample_rate: int = protocol.SAMPLE_RATE) -> np.ndarray:
    """Decode any audio file FFmpeg reads to int16 mono at ``sample_rate``."""
    path = Path(path)
    if not path.is_file():
        raise RenderError(f"audio file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise RenderError(f"{path} has no audio stream")
            resampler = av.AudioResampler("s16", "mono", sample_rate)
            chunks = []
            for frame in container.decode(audio=0):
                chunks += [f.to_ndarray().ravel() for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().ravel() for f in resampler.resample(None)]
    except av.FFmpegError as exc:
        raise RenderError(f"cannot read audio from {path}: {exc}") from exc
    if not chunks:
        raise RenderError(f"{path} contains no audio samples")
    return np.concatenate(chunks).astype(np.int16)


def check_output(out: str | Path) -> Path:
    """``out`` as a path an MP4 can be written to, else :class:`RenderError` saying why."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise RenderError(f"cannot write {path}: it is a directory; give a file such as out.mp4")
    parent = path.parent
    if not parent.is_dir():
        raise RenderError(f"cannot write {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise RenderError(f"cannot write {path}: permission denied")
    return path


class _Recorder:
    """Pulls both tracks and writes from the first speech sample to the segment end.

    The file's time origin is the last video tick at or before the first speech
    sample, so video frames keep their exact spacing; the audio starts with the
    few milliseconds of silence between that tick and the first sample.
    """

    def __init__(self, server: AvatarServer, writer: Mp4Writer) -> None:
        self.server = server
        self.writer = writer
        self.sync = server.av_sync
        self.timing = FrameTiming(server.video_track.fps, self.sync.sample_rate)
        self.end: int | None = None
        self.done = asyncio.Event()
        self._origin: int | None = None
        self._pending: list[tuple[int, av.VideoFrame]] = []

    @property
    def origin(self) -> int | None:
        start = self.sync.stats.first_speech_position
        if self._origin is None and start is not None:
            self._origin = self.timing.start(self.timing.frame_at(start))
            self.writer.write_audio(np.zeros(start - self._origin, np.int16))
        return self._origin

    async def pull_audio(self) -> None:
        track = self.server.audio_track
        while not self.done.is_set():
            frame = await track.recv()
            pos, pcm = frame.pts, frame.to_ndarray().ravel()
            if self.origin is None:
                continue
            lo = max(pos, self.sync.stats.first_speech_position)
            hi = pos + len(pcm) if self.end is None else min(pos + len(pcm), self.end)
            if hi > lo:
                self.writer.write_audio(pcm[lo - pos : hi - pos])
            if self.end is not None and pos + len(pcm) >= self.end:
                self.done.set()

    async def pull_video(self) -> None:
        track = self.server.video_track
        while not self.done.is_set():
            frame = await track.recv()
            pos = self.timing.start(self.timing.frame_of_pts(frame.pts))
            self._pending = [*self._pending[-1:], (pos, frame.reformat(format="yuv420p"))]
            origin = self.origin
            if origin is None:
                continue
            for p, f in self._pending:
                if p >= origin and (self.end is None or p < self.end):
                    self.writer.write_video(f, p - origin)
            self._pending.clear()


async def render(
    audio: np.ndarray,
    out: str | Path,
    renderer: AvatarRenderer,
    *,
    settings: AvatarSettings | None = None,
    speed: float = 1.0,
    jitter_frames: int = DEFAULT_JITTER_FRAMES,
    progress: Callable[[float], None] | None = None,
    timeout: float | None = None,
) -> RenderReport:
    """Send ``audio`` (int16 mono, 24 kHz) through a local session into ``out``."""
    settings = settings or AvatarSettings()
    if audio.size == 0:
        raise RenderError("the input audio is empty")
    out = check_output(out)
    room = LocalRoom()
    agent_meeting, avatar_meeting = room.join("agent"), room.join("avatar")
    agent = AvatarAudioOut(credentials=AvatarAuthCredentials("avatar", "local"))
    agent._set_meeting(agent_meeting)
    audio_in = AvatarAudioIn(
        avatar_meeting,
        sample_rate=settings.audio_sample_rate,
        agent_participant_id="agent",
        self_participant_id="avatar",
    )
    clock = MediaClock(settings.audio_sample_rate, speed=speed)
    server = AvatarServer(
        avatar_meeting,
        audio_recv=audio_in,
        video_gen=renderer,
        options=settings,
        jitter_frames=jitter_frames,
        clock=clock,
        wait_for_renderer=True,
    )
    try:
        writer = Mp4Writer(
            out,
            width=settings.video_width,
            height=settings.video_height,
            fps=settings.video_fps,
            sample_rate=settings.audio_sample_rate,
        )
    except OSError as exc:  # av's errors for a path it cannot open are OSErrors
        raise RenderError(f"cannot write {out}: {exc.strerror or exc}") from exc
    recorder = _Recorder(server, writer)
    server.av_sync.on_segment_played = _chain(
        server.av_sync.on_segment_played, lambda _: _mark_end(recorder)
    )
    await server.start()
    pullers = [
        asyncio.create_task(recorder.pull_audio()),
        asyncio.create_task(recorder.pull_video()),
    ]
    try:
        await agent.handle_audio_input(audio.tobytes())
        await agent.send_segment_end()
        total = len(audio) / settings.audio_sample_rate
        budget = timeout if timeout is not None else 30 + 3 * total / speed
        await asyncio.wait_for(_wait(recorder, server, total, progress), budget)
    except TimeoutError as exc:
        raise RenderError(
            f"the render did not finish within {budget:.0f} s: is the renderer running?"
        ) from exc
    finally:
        for task in pullers:
            task.cancel()
        await asyncio.gather(*pullers, return_exceptions=True)
        await server.aclose()
        await agent.aclose()
        writer.close()
    stats = server.av_sync.stats
    return RenderReport(
        out=Path(out),
        input_seconds=len(audio) / settings.audio_sample_rate,
        output_seconds=writer.audio_samples / settings.audio_sample_rate,
        video_frames=writer.video_frames,
        fps=settings.video_fps,
        stalls=stats.stalls,
        frames_dropped=stats.frames_dropped,
        ack=server.acks[-1] if server.acks else None,
    )


def _chain(first, second):
    def both(samples: int) -> None:
        if first is not None:
            first(samples)
        second(samples)

    return both


def _mark_end(recorder: _Recorder) -> None:
    recorder.end = recorder.sync.stats.last_segment_end


async def _wait(recorder: _Recorder, server: AvatarServer, total: float, progress) -> None:
    while not recorder.done.is_set():
        if progress is not None:
            progress(min(total, server.av_sync.stats.speech_samples / server.clock.sample_rate))
        await asyncio.sleep(0.1)
    if progress is not None:
        progress(total)
