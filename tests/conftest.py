"""Shared fixtures: a whole avatar session in one event loop, plus test signals.

``session`` (and ``make_session`` for custom settings) builds the network side
exactly as a deployment wires it, with the room in-process::

    agent: AvatarAudioOut ──LocalRoom──▶ avatar: AvatarAudioIn
                                               │
                            AvatarServer(InProcessRenderer(PatternRenderer))
                                   │ voice track         │ visual track
                                   ▼                     ▼
                          SessionHarness pullers: ``await track.recv()`` in a loop,
                          as a WebRTC sender does, recording every frame

on a :class:`~worker.clock.MediaClock` running ``speed`` times faster than
real time.  The whole session is scaled, not just the clock: every duration the
harness takes (room delay and jitter, :meth:`SessionHarness.sleep`) is in media
seconds, and AvatarAudioIn's wall-time constants (segment-end grace, interrupt
quiet time) are divided by ``speed``, so a test behaves as the same session
would in real time.  What was played is kept for assertions:

* ``audio_frames`` / ``audio_pts``: every pulled 20 ms frame (int16 PCM) and its pts;
  ``played()`` is the whole output as one array;
* ``video``: one :class:`VideoTick` per pulled frame (pts, clock position, idle or
  speech, sync marker lit, mouth openness read from the pixels);
* ``events``: what reached the avatar or the agent and when, in pulled frames and
  clock positions (``"interrupt"`` when the avatar received ``INTERRUPT``,
  ``"ack"`` when the agent received ``stream_ended``).

Usage::

    async def test_a_turn(session):              # or: await make_session(speed=2, ...)
        await session.send(speech(SR))           # the agent streams 1 s of PCM
        await session.end_segment()
        await session.wait_acks(1)
        assert session.acks == [(1.0, False)]    # what the agent was told
        assert locate(session.played(), ...) is not None

``session.inject(payload, sender=...)`` hands the avatar one raw ``on_data``
message (reordered, malformed or foreign traffic).  Assert on positions and
content, never on wall time.  ``PatternRenderer``
draws a white marker in every frame whose audio holds a sample of at least
``CLICK`` (see :func:`with_clicks`), so a click's frame can be found in the video.

Helpers: :func:`speech` (deterministic speech-like int16 that never holds a 0
nor reaches ``CLICK``), :func:`pcm`, :func:`locate`, :func:`played_prefix`, :func:`zero_runs`,
:func:`rendered` (what a renderer yields for a segment), and
:class:`ManualTime` (a ``time_fn`` for a :class:`~worker.clock.MediaClock` that
only moves when a test moves it, for fully deterministic track tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from av import AudioFrame, VideoFrame

from renderers.pattern import MARKER, PatternRenderer
from worker import protocol
from worker.audio_in import AvatarAudioIn
from worker.audio_out import AvatarAudioOut
from worker.auth import AvatarAuthCredentials
from worker.clock import MediaClock
from worker.inprocess_renderer import InProcessRenderer
from worker.listeners import DataListener
from worker.local_room import ChannelTiming, LocalRoom
from worker.server import AvatarServer
from worker.types import AudioSegmentEnd, AvatarSettings

SR = 24_000  # protocol sample rate
FPS = 25
SPF = SR // FPS  # samples per video frame (960)
AUDIO_FRAME = SR // 50  # samples per 20 ms voice-track frame (480)
VIDEO_PTS_STEP = 90_000 // FPS  # 90 kHz ticks per video frame (3600)
SIZE = 64  # small frames keep the tests fast; the marker is 32x32
CLICK = 30_000  # >= PatternRenderer.click_level
AGENT = "agent"
AVATAR = "avatar"


# -- signals -------------------------------------------------------------------


def speech(n: int, *, seed: int = 0, level: int = 6000) -> np.ndarray:
    """``n`` samples of deterministic speech-like audio.

    Syllable-rate amplitude modulation of a few partials plus noise; never 0
    (so inserted silence is visible) and always below the click level.  Each
    seed gives different content, so segments can be told apart in the output.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    f0 = 110 + 40 * rng.random()
    voiced = sum(np.sin(2 * np.pi * f0 * k * t + rng.random() * 6) / k for k in (1, 2, 3))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * (3 + rng.random()) * t)
    x = level * (envelope * voiced / 1.8 + 0.1 * rng.standard_normal(n))
    x = np.clip(np.round(x), -(CLICK - 10_000), CLICK - 10_000).astype(np.int16)
    x[x == 0] = 1
    return x


def with_clicks(signal: np.ndarray, positions: list[int]) -> np.ndarray:
    """A copy of ``signal`` with one click sample at each position."""
    out = signal.copy()
    out[np.asarray(positions, dtype=np.int64)] = CLICK
    return out


def pcm(samples: np.ndarray) -> bytes:
    """int16 samples as s16le bytes (the wire format)."""
    return np.asarray(samples, dtype="<i2").tobytes()


def locate(haystack: np.ndarray, needle: np.ndarray) -> int | None:
    """Index of the first occurrence of ``needle`` (exactly) in ``haystack``, or None."""
    n = len(needle)
    if n == 0 or n > len(haystack):
        return None
    probe = min(n, 16)
    windows = np.lib.stride_tricks.sliding_window_view(haystack, probe)
    for i in np.flatnonzero((windows == needle[:probe]).all(axis=1)):
        if i + n <= len(haystack) and np.array_equal(haystack[i : i + n], needle):
            return int(i)
    return None


def played_prefix(played: np.ndarray, signal: np.ndarray) -> tuple[int, int]:
    """(start, length) of the longest prefix of ``signal`` played contiguously.

    For an interrupted segment: where it started and how much of it was heard.
    """
    start = locate(played, signal[:64])
    assert start is not None, "the segment's start was never played"
    tail = played[start : start + len(signal)]
    mismatch = np.flatnonzero(tail != signal[: len(tail)])
    return start, int(mismatch[0]) if len(mismatch) else len(tail)


def zero_runs(samples: np.ndarray) -> list[tuple[int, int]]:
    """``(start, length)`` of every run of zero samples."""
    zero = np.concatenate([[0], (samples == 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(zero))
    return [(int(s), int(e - s)) for s, e in zip(edges[::2], edges[1::2], strict=True)]


class ManualTime:
    """A clock ``time_fn`` that stands still until the test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def at(self, clock: MediaClock, position: int) -> None:
        """Move to the instant clock ``position`` is due (tracks then never sleep)."""
        self.now = max(self.now, clock.time_of(position))


def rendered(
    renderer: PatternRenderer, samples: np.ndarray, *, end: bool = True
) -> list[VideoFrame | AudioFrame | AudioSegmentEnd]:
    """What an AvatarRenderer yields for one segment: video, its audio, ..., segment end."""
    stream = renderer.open_stream()
    jobs = stream.push(samples) + (stream.end_segment() if end else [])
    out: list[VideoFrame | AudioFrame | AudioSegmentEnd] = []
    for job, image in zip(jobs, renderer.render(jobs), strict=True):
        out.append(VideoFrame.from_ndarray(image, format="yuv420p"))
        audio = AudioFrame.from_ndarray(job.span.audio.reshape(1, -1), format="s16", layout="mono")
        audio.sample_rate = renderer.sample_rate
        out.append(audio)
    if end:
        out.append(AudioSegmentEnd())
    return out


# -- the session harness --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VideoTick:
    """One pulled video frame."""

    index: int  # tick number since the visual track started
    pts: int  # 90 kHz
    position: int  # clock position (samples) of the tick
    idle: bool  # an idle-loop frame (nobody speaks)
    marker: bool  # the sync marker is lit: this frame's audio holds a click
    mouth: float  # share of the mouth box drawn open (0 = closed)


@dataclass(frozen=True, slots=True)
class Event:
    """Something that reached a participant, placed on the playout."""

    kind: str  # "interrupt" | "ack" | "data"
    audio_frames: int  # voice-track frames pulled before it
    video_ticks: int  # visual-track frames pulled before it
    position: int  # media clock position when it happened
    detail: Any = None


@dataclass
class SessionHarness:
    """One avatar session in this event loop; see the module docstring."""

    speed: float = 4.0
    reliable: ChannelTiming = field(default_factory=ChannelTiming)  # media seconds
    unreliable: ChannelTiming = field(default_factory=ChannelTiming)  # media seconds
    agent_participant_id: str | None = None  # passed to AvatarAudioIn
    audio_in_options: dict[str, Any] = field(default_factory=dict)  # wall seconds, as given
    jitter_frames: int = 3
    fps: int = FPS

    def __post_init__(self) -> None:
        self.room = LocalRoom(
            reliable=self._wall(self.reliable), unreliable=self._wall(self.unreliable), seed=1
        )
        self.agent = self.room.join(AGENT)
        self.avatar = self.room.join(AVATAR)
        self.out = AvatarAudioOut(
            credentials=AvatarAuthCredentials(participant_id=AVATAR, token="unused"),
            on_stream_ended=self._on_ack,
        )
        self.out._set_meeting(self.agent)
        self.audio_in = AvatarAudioIn(
            self.avatar,
            self_participant_id=AVATAR,
            agent_participant_id=self.agent_participant_id,
            **(_scaled_audio_in_defaults(self.speed) | self.audio_in_options),
        )
        self.renderer = PatternRenderer(SIZE, SIZE, self.fps, SR)
        self.settings = AvatarSettings(
            video_width=SIZE, video_height=SIZE, video_fps=self.fps, audio_sample_rate=SR
        )
        self.clock = MediaClock(SR, speed=self.speed)
        self.server = AvatarServer(
            self.avatar,
            audio_recv=self.audio_in,
            video_gen=InProcessRenderer(self.renderer),
            options=self.settings,
            jitter_frames=self.jitter_frames,
            clock=self.clock,
        )
        self.audio_frames: list[np.ndarray] = []
        self.audio_pts: list[int] = []
        self.video: list[VideoTick] = []
        self.events: list[Event] = []
        self.resets = 0
        self._idle_ids: set[int] = set()
        self._tasks: list[asyncio.Task] = []
        # Runs after AvatarAudioIn's listener (added first), so it sees the effect.
        self.avatar.add_event_listener(DataListener(self.on_data))

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> SessionHarness:
        await self.server.start()
        sync = self.server.av_sync
        self._idle_ids = {
            id(sync.idle_frame(k * SPF)) for k in range(len(self.renderer.idle_frames()))
        }
        self.audio_in.on("reset_stream", self._on_reset)
        self._tasks = [
            asyncio.create_task(self._pull_audio(), name="pull-audio"),
            asyncio.create_task(self._pull_video(), name="pull-video"),
        ]
        return self

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.aclose()
        await self.out.aclose()

    def _wall(self, timing: ChannelTiming) -> ChannelTiming:
        return ChannelTiming(timing.delay / self.speed, timing.jitter / self.speed)

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of media time (wall time / speed)."""
        await asyncio.sleep(seconds / self.speed)

    # -- the agent's side ------------------------------------------------------------

    async def send(self, samples: np.ndarray) -> None:
        """Stream PCM as the agent does (chunks of at most 15,000 bytes)."""
        await self.out.handle_audio_input(pcm(samples))

    async def end_segment(self) -> None:
        await self.out.send_segment_end()

    async def interrupt(self) -> None:
        await self.out.interrupt()

    def inject(
        self, payload: Any, *, sender: Any = AGENT, reliability: str = protocol.RELIABLE
    ) -> None:
        """Deliver one data message to the avatar now, as ``on_data`` gets it."""
        data = {"payload": payload, "from": sender, "timestamp": 0, "reliability": reliability}
        self.avatar._dispatch(data)

    # -- what was played -------------------------------------------------------------

    @property
    def acks(self) -> list[tuple[float, bool]]:
        """``stream_ended`` messages the agent received: (playback_position, interrupted)."""
        return self.out.acks

    @property
    def stats(self):
        return self.server.av_sync.stats

    @property
    def pulled(self) -> int:
        """Samples pulled from the voice track so far."""
        return len(self.audio_frames) * AUDIO_FRAME

    def played(self) -> np.ndarray:
        if not self.audio_frames:
            return np.zeros(0, np.int16)
        return np.concatenate(self.audio_frames)

    def events_of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    # -- waiting (real time bounds only guard against hangs) ---------------------------

    async def wait_until(
        self, predicate: Callable[[], bool], what: str, timeout: float = 20.0
    ) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}; acks={self.acks} stats={self.stats}"
                )
            await asyncio.sleep(0.005)

    async def wait_acks(self, n: int) -> None:
        await self.wait_until(lambda: len(self.acks) >= n, f"{n} stream_ended ack(s)")

    async def play_for(self, seconds: float) -> None:
        """Let ``seconds`` of media time be pulled from the voice track."""
        target = self.pulled + int(seconds * SR)
        await self.wait_until(lambda: self.pulled >= target, f"{seconds} s of playout")

    async def settle(self) -> None:
        """Play a little more (covers in-flight messages and the segment-end grace)."""
        await self.room.drain()
        await self.play_for(0.5)

    # -- internals ---------------------------------------------------------------------

    def _event(self, kind: str, detail: Any = None) -> None:
        position = self.clock.position() if self.clock.started else 0
        self.events.append(Event(kind, len(self.audio_frames), len(self.video), position, detail))

    def _on_ack(self, position: float, interrupted: bool) -> None:
        self._event("ack", (position, interrupted))

    def _on_reset(self) -> None:
        self.resets += 1

    def on_data(self, data: dict) -> None:  # the avatar's room listener
        payload = data.get("payload") if isinstance(data, dict) else None
        if payload in (protocol.INTERRUPT, "INTERRUPT"):
            self._event("interrupt", data.get("from"))
        else:
            self._event("data", data.get("from") if isinstance(data, dict) else None)

    async def _pull_audio(self) -> None:
        track = self.server.audio_track
        while True:
            frame = await track.recv()
            self.audio_pts.append(frame.pts)
            self.audio_frames.append(frame.to_ndarray().ravel().astype(np.int16))

    async def _pull_video(self) -> None:
        track = self.server.video_track
        x0, y0, x1, y1 = self.renderer.mouth_box()
        while True:
            frame = await track.recv()
            luma = frame.to_ndarray()[:SIZE]
            index = len(self.video)
            self.video.append(
                VideoTick(
                    index=index,
                    pts=frame.pts,
                    position=index * SR // self.fps,
                    idle=id(frame) in self._idle_ids,
                    marker=bool(luma[: MARKER // 2, : MARKER // 2].mean() > 128),
                    mouth=float((luma[y0:y1, x0:x1] == 20).mean()),
                )
            )


def _scaled_audio_in_defaults(speed: float) -> dict[str, float]:
    """AvatarAudioIn's wall-time defaults, scaled to a clock ``speed`` times real time."""
    names = ("segment_end_grace", "interrupt_quiet", "interrupt_max_drop")
    parameters = inspect.signature(AvatarAudioIn).parameters
    return {name: parameters[name].default / speed for name in names if name in parameters}


@pytest.fixture
async def make_session() -> AsyncIterator[Callable[..., Awaitable[SessionHarness]]]:
    """Factory: ``await make_session(speed=4, unreliable=ChannelTiming(...), ...)``."""
    sessions: list[SessionHarness] = []

    async def make(**options: Any) -> SessionHarness:
        harness = SessionHarness(**options)
        sessions.append(harness)
        return await harness.start()

    yield make
    for harness in sessions:
        await harness.aclose()


@pytest.fixture
async def session(make_session) -> SessionHarness:
    """A started session with default settings (clock speed 4, instant room)."""
    return await make_session()


def shm_entries() -> set[str]:
    """Entries of /dev/shm, less POSIX semaphores (``sem.*``).

    Our rings live in anonymous memfd memory and never appear there; named
    segments would.  Semaphores are left out because any concurrent Python
    process using multiprocessing creates them, which is not our leak.
    """
    return {name for name in os.listdir("/dev/shm") if not name.startswith("sem.")}
