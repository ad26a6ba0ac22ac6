"""Measure the agent -> avatar path in real time: this project against the seed's behaviour.

A synthetic 30 s conversation (speech-like tone bursts with pauses, five turns,
one barge-in) is streamed by ``AvatarAudioOut`` through a ``LocalRoom`` with
network-like delays, in real time, into two avatars in turn:

* **ours**: ``AvatarAudioIn -> AvatarServer(InProcessRenderer) -> tracks``;
* **seed model**: a small re-implementation, for comparison only, of how the
  videosdk-agents reference avatar behaves:

  - the receiver drops every ``str`` payload that is not JSON (so silent PCM,
    which the SDK delivers as ``str``, is lost), drops all audio for 300 ms after
    ``INTERRUPT`` and then plays whatever arrives, and listens to everybody;
  - the renderer runs inline on the event loop, one frame at a time;
  - video is paced by sleeping one frame interval *relative* to the previous
    frame before handing it to the video track, which serves frames as soon as
    they are queued (no idle frames: nothing is sent while nobody speaks);
  - audio goes into a byte buffer capped at 2 s (the oldest bytes are dropped);
    the voice track plays 20 ms from it, or silence, on an absolute schedule;
  - on ``INTERRUPT`` the audio buffer is cleared; queued video is not.

Both use the same frame renderer: ``PatternRenderer`` plus ``--render-ms`` of
simulated inference per frame (sleeping, like a GPU call).  Each pulled video
frame carries a tag (the first nonzero 4-sample window of its audio and that
window's offset) so it can be traced back to the audio it was rendered from.

Reported, from what the tracks were pulled (as a WebRTC sender pulls them):

* output fps (frames pulled per wall second) and the longest video freeze;
* audio gaps: silence inserted inside a turn (count, total ms), found by aligning
  the played samples with the source;
* samples dropped: source samples of a turn that never played (for the
  interrupted turn only before the interrupt);
* interrupt-to-silence: ms of the interrupted turn played after ``INTERRUPT``
  reached the avatar, in played audio;
* A/V offset: wall time a frame was pulled minus the wall time the middle of its
  audio was pulled (median, p95 and worst |offset|);
* the ``stream_ended`` acks and their error against what was actually played.

Usage::

    python scripts/measure_protocol.py [--duration 30] [--speed 1] [--render-ms 15]
        [--reliable-ms 10] [--reliable-jitter-ms 30] [--unreliable-ms 30] [--json out.json]

``--speed`` > 1 runs both avatars faster than real time (quick checks only:
the numbers of record are taken at speed 1).
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from av import AudioFrame, VideoFrame

from renderers.base import RenderJob
from renderers.pattern import PatternRenderer
from worker import protocol
from worker.audio_in import AvatarAudioIn
from worker.audio_out import AvatarAudioOut
from worker.auth import AvatarAuthCredentials
from worker.clock import MediaClock
from worker.inprocess_renderer import InProcessRenderer
from worker.local_room import ChannelTiming, LocalRoom
from worker.server import AvatarServer
from worker.types import AudioSegmentEnd, AvatarInput, AvatarRenderer, AvatarSettings

SR = 24_000
FPS = 25
SIZE = 128
AUDIO_FRAME = SR // 50
TAG_BYTES = 10  # 4 samples (8 bytes) + offset (uint16)


# -- the conversation -----------------------------------------------------------------------------


@dataclass
class Turn:
    start: float  # seconds after the session starts
    audio: np.ndarray  # int16, starts and ends with speech
    rate: float | None  # TTS speed (x real time) in 100 ms chunks; None = one burst
    interrupt_after: float | None = None  # seconds after the turn starts


def _word(rng: np.random.Generator, seconds: float) -> np.ndarray:
    n = int(seconds * SR)
    t = np.arange(n) / SR
    f0 = 100 + 80 * rng.random()
    glide = 1 + 0.1 * np.sin(2 * np.pi * rng.random() * t)
    voiced = sum(np.sin(2 * np.pi * f0 * k * glide * t) / k for k in (1, 2, 3, 4))
    envelope = np.sin(np.pi * np.arange(n) / n) ** 0.5
    x = 5000 * envelope * voiced / 2 + rng.normal(0, 250, n)
    x = np.clip(np.round(x), -20_000, 20_000).astype(np.int16)
    x[x == 0] = 1
    return x


def _speech(seconds: float, seed: int) -> np.ndarray:
    """Words of 150-450 ms, 40-120 ms gaps, a 300 ms chunk-aligned pause per sentence."""
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    total = 0
    while total < seconds * SR:
        sentence: list[np.ndarray] = []
        for _ in range(rng.integers(3, 7)):
            sentence.append(_word(rng, rng.uniform(0.15, 0.45)))
            sentence.append(np.zeros(int(rng.uniform(0.04, 0.12) * SR), np.int16))
        body = np.concatenate(sentence[:-1])
        parts.append(body)
        total += len(body)
        if total < seconds * SR:  # pad to a chunk boundary, then 3 all-zero chunks
            pad = (-total) % 2400  # a faint, never-zero tail up to the boundary
            tail = rng.normal(0, 40, pad).round().astype(np.int16)
            tail[tail == 0] = 1
            parts.append(tail)
            parts.append(np.zeros(7200, np.int16))
            total += pad + 7200
    audio = np.concatenate(parts)[: int(seconds * SR)]
    last = np.flatnonzero(audio)[-1]
    return audio[: last + 1]


def conversation(duration: float) -> list[Turn]:
    scale = duration / 30.0
    return [
        Turn(0.5 * scale, _speech(4.0 * scale, 1), rate=2.0),
        Turn(6.0 * scale, _speech(6.0 * scale, 2), rate=None),
        Turn(13.5 * scale, _speech(5.0 * scale, 3), rate=1.5, interrupt_after=2.5 * scale),
        Turn(17.0 * scale, _speech(3.0 * scale, 4), rate=3.0),
        Turn(22.0 * scale, _speech(4.0 * scale, 5), rate=None),
    ]


class SourceIndex:
    """Maps any nonzero 4-sample window of the conversation to (turn, sample offset)."""

    def __init__(self, turns: Sequence[Turn]) -> None:
        keys, owners = [], []
        for k, turn in enumerate(turns):
            key, valid = _window_keys(turn.audio)
            where = np.flatnonzero(valid)
            keys.append(key[where])
            owners.append(np.stack([np.full(len(where), k), where], axis=1))
        key = np.concatenate(keys)
        owner = np.concatenate(owners)
        order = np.argsort(key, kind="stable")
        key, owner = key[order], owner[order]
        unique = np.ones(len(key), bool)  # ambiguous windows map to nothing
        same = key[1:] == key[:-1]
        unique[1:] &= ~same
        unique[:-1] &= ~same
        self.keys, self.owners = key[unique], owner[unique]

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """(turn, offset) per key, (-1, -1) where unknown."""
        at = np.clip(np.searchsorted(self.keys, keys), 0, len(self.keys) - 1)
        found = self.keys[at] == keys
        out = np.full((len(keys), 2), -1, np.int64)
        out[found] = self.owners[at[found]]
        return out


def _window_keys(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A uint64 key per 4-sample window, and whether the window holds no zero."""
    if len(samples) < 4:
        return np.zeros(0, np.uint64), np.zeros(0, bool)
    u = samples.astype(np.int16).view(np.uint16).astype(np.uint64)
    w = np.lib.stride_tricks.sliding_window_view(u, 4)
    key = (w[:, 0] << 48) | (w[:, 1] << 32) | (w[:, 2] << 16) | w[:, 3]
    valid = np.lib.stride_tricks.sliding_window_view(samples != 0, 4).all(axis=1)
    return key, valid


# -- the frame renderer (shared) ------------------------------------------------------------------


class TracedRenderer(PatternRenderer):
    """PatternRenderer + simulated inference time + a source tag in the bottom row."""

    def __init__(self, render_ms: float, max_batch: int, speed: float) -> None:
        super().__init__(SIZE, SIZE, FPS, SR, max_batch=max_batch)
        self.render_s = render_ms / 1000 / speed  # wall time per frame at this clock speed

    def render(self, jobs: Sequence[RenderJob]) -> list[np.ndarray]:
        images = super().render(jobs)
        time.sleep(self.render_s * len(jobs))
        for job, image in zip(jobs, images, strict=True):
            image[SIZE - 1, :TAG_BYTES] = _tag(job.span.audio)
        return images


def _tag(audio: np.ndarray) -> np.ndarray:
    tag = np.zeros(TAG_BYTES, np.uint8)
    _, valid = _window_keys(audio)
    hits = np.flatnonzero(valid)
    if len(hits):
        offset = int(hits[0])
        tag[:8] = audio[offset : offset + 4].astype("<i2").view(np.uint8)
        tag[8:] = np.array([offset], "<u2").view(np.uint8)
    return tag


def _read_tag(image: np.ndarray) -> tuple[np.ndarray, int]:
    row = image[SIZE - 1, :TAG_BYTES]
    samples = row[:8].copy().view("<i2").astype(np.int16)
    return samples, int(row[8:].copy().view("<u2")[0])


# -- the seed model -------------------------------------------------------------------------------


class SeedModelAudioIn(AvatarInput):
    """The reference receiver's behaviour (see the module docstring)."""

    COOLDOWN = 0.3

    def __init__(self, meeting: Any, speed: float) -> None:
        super().__init__()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._until = 0.0
        self._speed = speed
        self._meeting = meeting
        self._sending: set[asyncio.Future] = set()
        self.dropped = 0
        meeting.add_event_listener(self)

    def on_data(self, data: dict) -> None:
        payload = data.get("payload")
        if payload in (b"INTERRUPT", "INTERRUPT"):
            self._until = time.monotonic() + self.COOLDOWN / self._speed
            while not self._queue.empty():
                self._queue.get_nowait()
            self.emit("reset_stream")
        elif isinstance(payload, bytes):
            if time.monotonic() < self._until:
                self.dropped += len(payload) // 2
                return
            frame = AudioFrame.from_ndarray(
                np.frombuffer(payload, np.int16).reshape(1, -1), format="s16", layout="mono"
            )
            frame.sample_rate = SR
            self._queue.put_nowait(frame)
        elif isinstance(payload, str):
            try:
                msg = json.loads(payload)
            except ValueError:
                self.dropped += len(payload.encode("utf-8")) // 2  # silence, lost
                return
            if isinstance(msg, dict) and msg.get("type") == "segment_end":
                self._queue.put_nowait(AudioSegmentEnd())

    def notify_stream_ended(self, playback_position: float, interrupted: bool) -> None:
        payload = protocol.stream_ended(playback_position, interrupted)
        task = asyncio.ensure_future(self._meeting.send(payload, {"reliability": "RELIABLE"}))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._queue.get()


class InlineRenderer(AvatarRenderer):
    """Renders one frame at a time on the event loop (blocking it), as the reference does."""

    def __init__(self, renderer: TracedRenderer) -> None:
        self.renderer = renderer
        self._stream = renderer.open_stream()
        self._items: asyncio.Queue = asyncio.Queue()
        self._epoch = 0

    async def push_stream_chunk(self, frame) -> None:
        if isinstance(frame, AudioSegmentEnd):
            jobs = self._stream.end_segment()
        else:
            jobs = self._stream.push(frame.to_ndarray().ravel())
        for job in jobs:
            self._items.put_nowait((self._epoch, job))
        if isinstance(frame, AudioSegmentEnd):
            self._items.put_nowait((self._epoch, None))

    def reset_stream(self) -> None:
        self._epoch += 1
        self._stream.reset()

    def __aiter__(self):
        return self._frames()

    async def _frames(self):
        while True:
            epoch, job = await self._items.get()
            if epoch != self._epoch:
                continue
            if job is None:
                yield AudioSegmentEnd()
                continue
            (image,) = self.renderer.render([job])  # inline: blocks the loop
            yield VideoFrame.from_ndarray(image, format="yuv420p")
            pcm = job.span.audio.reshape(1, -1)
            audio = AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            audio.sample_rate = SR
            yield audio


class SeedModelVoiceTrack:
    """2 s capped byte buffer, 20 ms frames on an absolute schedule."""

    def __init__(self, speed: float) -> None:
        self.buffer = bytearray()
        self.cap = int(2.0 * SR) * 2
        self.dropped = 0
        self._start: float | None = None
        self._pts = 0
        self._speed = speed

    def put(self, pcm: bytes) -> None:
        self.buffer.extend(pcm)
        if len(self.buffer) > self.cap:
            over = len(self.buffer) - self.cap
            self.dropped += over // 2
            del self.buffer[:over]

    async def recv(self) -> AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        size = AUDIO_FRAME * 2
        if len(self.buffer) >= size:
            chunk = bytes(self.buffer[:size])
            del self.buffer[:size]
        else:
            chunk = bytes(size)
        wait = self._start + self._pts / (SR * self._speed) - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        frame = AudioFrame.from_ndarray(
            np.frombuffer(chunk, np.int16).reshape(1, -1), format="s16", layout="mono"
        )
        frame.pts, frame.sample_rate = self._pts, SR
        frame.time_base = fractions.Fraction(1, SR)
        self._pts += AUDIO_FRAME
        return frame


class SeedModelVisualTrack:
    """Serves queued frames as soon as they exist."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self._pts = 0

    async def recv(self) -> VideoFrame:
        frame = await self.queue.get()
        self._pts += 90_000 // FPS
        frame.pts = self._pts
        return frame


class SeedModelServer:
    """Reads audio into the renderer; paces video relative to the last frame."""

    def __init__(self, audio_in: SeedModelAudioIn, renderer: InlineRenderer, speed: float):
        self.audio_in = audio_in
        self.renderer = renderer
        self.speed = speed
        self.audio_track = SeedModelVoiceTrack(speed)
        self.video_track = SeedModelVisualTrack()
        self._position = 0.0
        self._playing = False
        self._last_video = 0.0
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self.audio_in.on("reset_stream", self._on_reset)
        self._tasks = [
            asyncio.create_task(self._read()),
            asyncio.create_task(self._forward()),
        ]

    async def _read(self) -> None:
        async for frame in self.audio_in:
            if isinstance(frame, AudioFrame):
                self._playing = True
            await self.renderer.push_stream_chunk(frame)

    async def _forward(self) -> None:
        interval = 1 / (FPS * self.speed)
        async for frame in self.renderer:
            if isinstance(frame, AudioSegmentEnd):
                if self._playing:
                    self.audio_in.notify_stream_ended(self._position, False)
                    self._playing, self._position = False, 0.0
            elif isinstance(frame, VideoFrame):
                elapsed = time.monotonic() - self._last_video
                if elapsed < interval:
                    await asyncio.sleep(interval - elapsed)
                self.video_track.queue.put_nowait(frame)
                self._last_video = time.monotonic()
            else:
                self.audio_track.put(frame.to_ndarray().tobytes())
                self._position += frame.samples / SR

    def _on_reset(self) -> None:
        self.audio_track.buffer.clear()
        self.renderer.reset_stream()
        if self._playing:
            self.audio_in.notify_stream_ended(self._position, True)
        self._playing, self._position = False, 0.0

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# -- running a session ----------------------------------------------------------------------------


@dataclass
class Recording:
    audio: list[np.ndarray] = field(default_factory=list)
    audio_wall: list[float] = field(default_factory=list)  # when each 20 ms frame was pulled
    video_wall: list[float] = field(default_factory=list)
    video_tags: list[tuple[np.ndarray, int] | None] = field(default_factory=list)
    interrupt_at: int | None = None  # samples pulled when INTERRUPT reached the avatar
    acks: list[tuple[float, bool]] = field(default_factory=list)
    t0: float = 0.0
    t1: float = 0.0


async def _pull_audio(track, rec: Recording) -> None:
    while True:
        frame = await track.recv()
        rec.audio_wall.append(time.monotonic())
        rec.audio.append(frame.to_ndarray().ravel().astype(np.int16))


async def _pull_video(track, rec: Recording, idle_ids: set[int]) -> None:
    while True:
        frame = await track.recv()
        rec.video_wall.append(time.monotonic())
        rec.video_tags.append(None if id(frame) in idle_ids else _read_tag(frame.to_ndarray()))


class _InterruptWatch:
    def __init__(self, rec: Recording) -> None:
        self.rec = rec

    def on_data(self, data: dict) -> None:
        if data.get("payload") in (b"INTERRUPT", "INTERRUPT") and self.rec.interrupt_at is None:
            self.rec.interrupt_at = len(self.rec.audio) * AUDIO_FRAME


@dataclass
class Network:
    """Data-channel delays in seconds: ``delay + uniform(0, jitter)`` per message.

    Audio (UNRELIABLE) keeps its order here; RELIABLE messages may overtake it.
    """

    reliable: float = 0.01
    reliable_jitter: float = 0.03
    unreliable: float = 0.03


async def run_session(
    system: str,
    turns: list[Turn],
    duration: float,
    speed: float,
    render_ms: float,
    network: Network,
) -> Recording:
    room = LocalRoom(
        reliable=ChannelTiming(network.reliable / speed, network.reliable_jitter / speed),
        unreliable=ChannelTiming(network.unreliable / speed, 0.0),
        seed=7,
    )
    agent, avatar = room.join("agent"), room.join("avatar")
    out = AvatarAudioOut(credentials=AvatarAuthCredentials(participant_id="avatar", token="-"))
    out._set_meeting(agent)
    rec = Recording(acks=out.acks)
    idle_ids: set[int] = set()
    if system == "ours":
        audio_in = AvatarAudioIn(
            avatar,
            self_participant_id="avatar",
            segment_end_grace=0.2 / speed,
            interrupt_quiet=0.15 / speed,
            interrupt_max_drop=1.0 / speed,
        )
        server = AvatarServer(
            avatar,
            audio_recv=audio_in,
            video_gen=InProcessRenderer(TracedRenderer(render_ms, 8, speed)),
            options=AvatarSettings(SIZE, SIZE, FPS, SR),
            clock=MediaClock(SR, speed=speed),
        )
    else:
        audio_in = SeedModelAudioIn(avatar, speed)
        inline = InlineRenderer(TracedRenderer(render_ms, 1, speed))
        server = SeedModelServer(audio_in, inline, speed)
    avatar.add_event_listener(_InterruptWatch(rec))
    await server.start()
    if system == "ours":
        sync = server.av_sync
        idle_ids = {id(sync.idle_frame(k * SR // FPS)) for k in range(64)}
    pulls = [
        asyncio.create_task(_pull_audio(server.audio_track, rec)),
        asyncio.create_task(_pull_video(server.video_track, rec, idle_ids)),
    ]
    rec.t0 = time.monotonic()
    await asyncio.gather(*(_speak(out, turn, rec.t0, speed) for turn in turns))
    await asyncio.sleep(max(0.0, rec.t0 + duration / speed - time.monotonic()))
    rec.t1 = time.monotonic()
    for task in pulls:
        task.cancel()
    await asyncio.gather(*pulls, return_exceptions=True)
    await server.aclose()
    await out.aclose()
    return rec


async def _speak(out: AvatarAudioOut, turn: Turn, t0: float, speed: float) -> None:
    await asyncio.sleep(max(0.0, t0 + turn.start / speed - time.monotonic()))
    began = time.monotonic()
    if turn.rate is None:
        await out.handle_audio_input(turn.audio.tobytes())
        await out.send_segment_end()
        return
    chunk = SR // 10
    for i in range(0, len(turn.audio), chunk):
        cut = turn.interrupt_after
        if cut is not None and time.monotonic() - began >= cut / speed:
            await out.interrupt()
            # The TTS task notices the cancel a moment late: two more chunks go out.
            for j in (i, i + chunk):
                await out.handle_audio_input(turn.audio[j : j + chunk].tobytes())
                await asyncio.sleep(0.02 / speed)
            return
        await out.handle_audio_input(turn.audio[i : i + chunk].tobytes())
        await asyncio.sleep(0.1 / turn.rate / speed)
    await out.send_segment_end()


# -- analysis -------------------------------------------------------------------------------------


def analyse(rec: Recording, turns: list[Turn], index: SourceIndex, speed: float) -> dict:
    played = np.concatenate(rec.audio) if rec.audio else np.zeros(0, np.int16)
    keys, valid = _window_keys(played)
    owner = index.lookup(keys)
    owner[~valid] = -1
    mapped = np.flatnonzero(owner[:, 0] >= 0)
    gaps, gap_samples, dropped = 0, 0, 0
    played_per_turn: list[int] = []
    interrupted = next(k for k, t in enumerate(turns) if t.interrupt_after is not None)
    interrupt_to_silence = None
    for k, turn in enumerate(turns):
        mine = mapped[owner[mapped, 0] == k]
        if len(mine) == 0:
            played_per_turn.append(0)
            dropped += len(turn.audio) if k != interrupted else 0
            continue
        i, j = mine, owner[mine, 1]
        di, dj = np.diff(i), np.diff(j)
        jump = (di != 1) | (dj != 1)
        inserted = np.clip(di - dj, 0, None)[jump]
        lost = np.clip(dj - di, 0, None)[jump]
        gaps += int(np.count_nonzero(inserted))
        gap_samples += int(inserted.sum())
        lead, tail = int(j[0]), len(turn.audio) - int(j[-1] + 4)
        turn_dropped = int(lost.sum()) + lead + (tail if k != interrupted else 0)
        dropped += turn_dropped
        played_per_turn.append(int(j[-1] + 4 - j[0] - lost.sum()))
        if k == interrupted and rec.interrupt_at is not None:
            last = int(i[-1] + 4)
            interrupt_to_silence = max(0, last - rec.interrupt_at) / SR * 1000
    # A/V offset: when a frame was pulled against when the middle of its audio played.
    frame_wall = np.asarray(rec.audio_wall)
    where = {(int(owner[m, 0]), int(owner[m, 1])): int(m) for m in mapped}
    offsets = []
    half = SR // FPS // 2
    for wall, tag in zip(rec.video_wall, rec.video_tags, strict=True):
        if tag is None or not tag[0].all():
            continue
        samples, offset = tag
        (found,) = index.lookup(_window_keys(samples)[0])
        window_at = where.get((int(found[0]), int(found[1]))) if found[0] >= 0 else None
        if window_at is None:
            continue
        middle = window_at - offset + half  # played index of the frame's middle sample
        if 0 <= middle < len(frame_wall) * AUDIO_FRAME:
            heard = frame_wall[middle // AUDIO_FRAME] + (middle % AUDIO_FRAME) / (SR * speed)
            offsets.append((wall - heard) * speed * 1000)
    elapsed = (rec.t1 - rec.t0) * speed
    intervals = np.diff(np.asarray(rec.video_wall)) * speed * 1000 if rec.video_wall else []
    acks = [(round(p, 4), i) for p, i in rec.acks]
    ack_errors = [
        abs(p - played_per_turn[k] / SR) * 1000
        for k, (p, _) in enumerate(rec.acks[: len(turns)])
        if k < len(played_per_turn)
    ]
    return {
        "output_fps": round(len(rec.video_wall) / elapsed, 2),
        "longest_video_freeze_ms": round(float(np.max(intervals)), 1) if len(intervals) else None,
        "audio_gaps": gaps,
        "audio_gap_ms": round(gap_samples / SR * 1000, 1),
        "samples_dropped": dropped,
        "interrupt_to_silence_ms": (
            None if interrupt_to_silence is None else round(interrupt_to_silence, 1)
        ),
        "av_offset_median_ms": round(float(np.median(offsets)), 1) if offsets else None,
        "av_offset_p95_abs_ms": (
            round(float(np.percentile(np.abs(offsets), 95)), 1) if offsets else None
        ),
        "av_offset_max_abs_ms": round(float(np.max(np.abs(offsets))), 1) if offsets else None,
        "acks": acks,
        "ack_error_max_ms": round(max(ack_errors), 1) if ack_errors else None,
        "speech_samples_sent": int(sum(len(t.audio) for t in turns)),
    }


ROWS = [
    ("output fps", "output_fps"),
    ("longest video freeze (ms)", "longest_video_freeze_ms"),
    ("audio gaps inside turns (count)", "audio_gaps"),
    ("inserted silence inside turns (ms)", "audio_gap_ms"),
    ("samples dropped", "samples_dropped"),
    ("interrupt -> silence (ms of audio)", "interrupt_to_silence_ms"),
    ("A/V offset, median (ms)", "av_offset_median_ms"),
    ("A/V offset, p95 |x| (ms)", "av_offset_p95_abs_ms"),
    ("A/V offset, worst |x| (ms)", "av_offset_max_abs_ms"),
    ("stream_ended acks", "acks"),
    ("ack error vs played, worst (ms)", "ack_error_max_ms"),
]


def table(results: dict[str, dict]) -> str:
    names = list(results)
    width = max(len(label) for label, _ in ROWS)
    lines = [f"{'':{width}}  " + "  ".join(f"{n:>12}" for n in names)]
    for label, key in ROWS:
        if key == "acks":
            cells = [str(len(results[n][key])) for n in names]
        else:
            cells = [str(results[n][key]) for n in names]
        lines.append(f"{label:{width}}  " + "  ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0, help="session length (s)")
    parser.add_argument("--speed", type=float, default=1.0, help="clock speed (1 = real time)")
    parser.add_argument("--render-ms", type=float, default=15.0, help="inference time per frame")
    parser.add_argument("--reliable-ms", type=float, default=10.0, help="RELIABLE delay")
    parser.add_argument("--reliable-jitter-ms", type=float, default=30.0, help="RELIABLE jitter")
    parser.add_argument("--unreliable-ms", type=float, default=30.0, help="UNRELIABLE delay")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    network = Network(
        args.reliable_ms / 1000, args.reliable_jitter_ms / 1000, args.unreliable_ms / 1000
    )
    turns = conversation(args.duration)
    index = SourceIndex(turns)
    results = {}
    for system in ("ours", "seed-model"):
        rec = asyncio.run(
            run_session(system, turns, args.duration, args.speed, args.render_ms, network)
        )
        results[system] = analyse(rec, turns, index, args.speed)
    settings = {
        k: getattr(args, k)
        for k in (
            "duration",
            "speed",
            "render_ms",
            "reliable_ms",
            "reliable_jitter_ms",
            "unreliable_ms",
        )
    }
    print(table(results))
    print(json.dumps({"settings": settings, "results": results}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
