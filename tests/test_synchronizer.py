"""AvatarSynchronizer and the tracks on one media clock, driven deterministically.

A :class:`ManualTime` clock never sleeps: the rig moves time to each 20 ms
audio frame's due instant and pulls the voice track, then every visual tick
that is due by then (or the ticks first: the order of two pulls due at the same
instant must not matter).  Everything is asserted on positions, pts and content.
"""

from __future__ import annotations

import asyncio
from fractions import Fraction

import numpy as np
import pytest
from av import AudioFrame, VideoFrame
from conftest import (
    AUDIO_FRAME,
    CLICK,
    FPS,
    SIZE,
    SPF,
    SR,
    VIDEO_PTS_STEP,
    ManualTime,
    rendered,
    speech,
    with_clicks,
)

from renderers.pattern import PatternRenderer
from worker.clock import MediaClock
from worker.synchronizer import AvatarSynchronizer
from worker.tracks import AvatarVisualTrack, AvatarVoiceTrack
from worker.types import AudioSegmentEnd


class Rig:
    """A synchronizer with its two tracks, pulled on a manual clock."""

    def __init__(self, *, fps: float = FPS, jitter_frames: int = 3, max_queued_frames: int = 25):
        self.time = ManualTime()
        self.clock = MediaClock(SR, time_fn=self.time)
        self.audio = AvatarVoiceTrack(SR, 1, clock=self.clock)
        self.video = AvatarVisualTrack(SIZE, SIZE, fps, clock=self.clock)
        self.sync = AvatarSynchronizer(
            self.audio,
            self.video,
            fps,
            jitter_frames=jitter_frames,
            max_queued_frames=max_queued_frames,
            clock=self.clock,
        )
        self.renderer = PatternRenderer(SIZE, SIZE, FPS, SR)
        self.idle = [
            VideoFrame.from_ndarray(f, format="yuv420p") for f in self.renderer.idle_frames()
        ]
        self.sync.set_idle_frames(self.idle)
        self.segments_played: list[int] = []
        self.sync.on_segment_played = self.segments_played.append
        self.audio_frames: list[AudioFrame] = []
        self.video_frames: list[VideoFrame] = []
        self.video_pts: list[int] = []
        self.audio_pts: list[int] = []

    async def push(self, items) -> None:
        for item in items:
            await self.sync.push(item)

    async def run(self, n: int, *, video_first: bool = False) -> None:
        """Pull ``n`` audio frames and every video tick due meanwhile."""
        for _ in range(n):
            position = len(self.audio_frames) * AUDIO_FRAME
            self.time.at(self.clock, position)
            if video_first:
                await self._ticks_due(position)
                await self._audio()
            else:
                await self._audio()
                await self._ticks_due(position)

    async def _audio(self) -> None:
        frame = await self.audio.recv()
        self.audio_pts.append(frame.pts)
        self.audio_frames.append(frame)

    async def _ticks_due(self, position: int) -> None:
        while self.video.position_of(len(self.video_frames)) <= position:
            frame = await self.video.recv()
            self.video_pts.append(frame.pts)
            self.video_frames.append(frame)

    def played(self) -> np.ndarray:
        return np.concatenate([f.to_ndarray().ravel() for f in self.audio_frames])

    def is_idle(self, frame: VideoFrame) -> bool:
        return any(frame is f for f in self.idle)


def units(items) -> list[tuple[VideoFrame, np.ndarray]]:
    """(video frame, its audio) pairs of a renderer output."""
    pairs = []
    for video, audio in zip(items[0::2], items[1::2], strict=False):
        if isinstance(video, VideoFrame) and isinstance(audio, AudioFrame):
            pairs.append((video, audio.to_ndarray().ravel()))
    return pairs


async def test_audio_is_played_bit_exact_without_gaps() -> None:
    rig = Rig()
    signal = speech(20 * SPF)
    await rig.push(rendered(rig.renderer, signal))
    await rig.run(60)
    played = rig.played()
    start = int(np.flatnonzero(played)[0])
    assert np.array_equal(played[start : start + len(signal)], signal)
    assert not played[start + len(signal) :].any()
    assert rig.segments_played == [len(signal)]
    assert rig.sync.stats.stalls == rig.sync.stats.gap_samples == 0


@pytest.mark.parametrize(
    ("video_first", "lead_in"),
    [
        (False, 0),
        (False, 3),
        (True, 3),
        pytest.param(True, 0),
    ],
    ids=["audio-on-tick", "audio-off-tick", "video-off-tick", "video-on-tick"],
)
async def test_each_tick_shows_the_frame_whose_audio_is_playing(
    video_first: bool, lead_in: int
) -> None:
    rig = Rig()
    await rig.run(lead_in, video_first=video_first)  # 3 audio frames: speech starts off a tick
    items = rendered(rig.renderer, speech(12 * SPF + 700))
    await rig.push(items)
    await rig.run(40, video_first=video_first)
    start = rig.sync.stats.first_speech_position
    assert start == lead_in * AUDIO_FRAME
    pairs = units(items)
    for index, frame in enumerate(rig.video_frames):
        position = index * SPF
        unit = (position - start) // SPF if position >= start else -1
        if 0 <= unit < len(pairs):
            assert frame is pairs[unit][0], f"tick {index} shows the wrong frame"
        else:
            assert rig.is_idle(frame), f"tick {index} outside speech is not idle"


async def test_click_lights_the_marker_in_the_frame_that_contains_it() -> None:
    rig = Rig()
    # Clicks in the middle of frames 3, 7 and 11 of the segment.
    clicks = [k * SPF + SPF // 2 for k in (3, 7, 11)]
    await rig.push(rendered(rig.renderer, with_clicks(speech(14 * SPF), clicks)))
    await rig.run(40)
    heard = np.flatnonzero(rig.played() == CLICK)
    assert len(heard) == len(clicks)
    lit = [i for i, f in enumerate(rig.video_frames) if f.to_ndarray()[:8, :8].mean() > 128]
    assert lit == [int(p) // SPF for p in heard]  # offset 0 frames


@pytest.mark.parametrize(
    ("fps", "step"),
    [(25, 3600), (30, 3000), (Fraction(30000, 1001), 3003), (50, 1800)],
    ids=["25", "30", "29.97", "50"],
)
async def test_pts_come_from_the_clock(fps, step) -> None:
    rig = Rig(fps=float(fps))
    await rig.push(rendered(rig.renderer, speech(10 * SPF)))
    await rig.run(100)
    assert rig.audio_pts == [i * AUDIO_FRAME for i in range(100)]
    assert rig.video_pts == [i * step for i in range(len(rig.video_pts))]
    last_audio = 99 * AUDIO_FRAME
    assert len(rig.video_pts) == int(last_audio * Fraction(fps) / SR) + 1
    if fps == FPS:
        assert step == VIDEO_PTS_STEP


async def test_playout_waits_for_the_jitter_buffer() -> None:
    rig = Rig(jitter_frames=3)
    items = rendered(rig.renderer, speech(6 * SPF), end=False)
    await rig.push(items[:4])  # two frames
    await rig.run(4)
    assert not rig.played().any()
    await rig.push(items[4:6])  # the third
    await rig.run(1)
    assert rig.played()[-AUDIO_FRAME:].all()


async def test_a_short_segment_plays_once_its_end_is_queued() -> None:
    rig = Rig(jitter_frames=3)
    signal = speech(SPF + 100)
    await rig.push(rendered(rig.renderer, signal))
    await rig.run(8)
    played = rig.played()
    start = int(np.flatnonzero(played)[0])
    assert np.array_equal(played[start : start + len(signal)], signal)


async def test_full_queue_blocks_the_producer_and_drops_nothing() -> None:
    rig = Rig(max_queued_frames=10)
    signal = speech(40 * SPF)
    producer = asyncio.create_task(rig.push(rendered(rig.renderer, signal)))
    await asyncio.sleep(0.01)
    assert not producer.done()
    assert rig.sync.queued_frames == 10
    while not producer.done():
        await rig.run(2)
        await asyncio.sleep(0)
    await rig.run(40)
    played = rig.played()
    start = int(np.flatnonzero(played)[0])
    assert np.array_equal(played[start : start + len(signal)], signal)
    assert rig.segments_played == [len(signal)]


async def test_flush_silences_the_next_pull_and_shows_idle_at_the_next_tick() -> None:
    rig = Rig(max_queued_frames=10)
    items = rendered(rig.renderer, speech(30 * SPF))
    await rig.push(items[:20])  # ten frames: the queue is full
    blocked = asyncio.create_task(rig.push(items[20:22]))
    await asyncio.sleep(0)
    assert not blocked.done()
    await rig.run(9)  # 180 ms: speech is playing
    assert rig.played()[-AUDIO_FRAME:].all()
    played = rig.sync.flush()
    await asyncio.sleep(0)
    assert blocked.done()  # the waiting push gave up instead of queuing a stale frame
    assert rig.sync.queued_frames == 0
    ticks_before = len(rig.video_frames)
    await rig.run(1)
    assert not rig.audio_frames[-1].to_ndarray().any()
    await rig.run(2)
    assert len(rig.video_frames) > ticks_before
    assert all(rig.is_idle(f) for f in rig.video_frames[ticks_before:])
    assert played == int(np.count_nonzero(rig.played()))
    assert rig.sync.stats.interrupts == 1
    assert rig.segments_played == []  # acknowledging an interrupt is the server's job


async def test_running_dry_mid_segment_is_a_counted_stall_not_a_loss() -> None:
    rig = Rig(jitter_frames=2)
    signal = speech(8 * SPF)
    items = rendered(rig.renderer, signal)
    await rig.push(items[:8])  # four frames, no end yet
    await rig.run(12)
    assert rig.sync.stats.stalls == 1
    assert rig.sync.stats.gap_samples > 0
    await rig.push(items[8:])
    await rig.run(12)
    played = rig.played()
    assert np.array_equal(played[played != 0], signal)
    assert rig.segments_played == [len(signal)]


async def test_frames_shorter_than_a_tick_are_counted_dropped() -> None:
    rig = Rig()
    rig.renderer = PatternRenderer(SIZE, SIZE, 2 * FPS, SR)  # 480-sample frames
    items = rendered(rig.renderer, speech(20 * AUDIO_FRAME))
    await rig.push(items)
    await rig.run(30)
    stats = rig.sync.stats
    assert stats.frames_shown == 10
    assert stats.frames_shown + stats.frames_dropped == len(units(items))


async def test_frames_longer_than_a_tick_are_held() -> None:
    rig = Rig()
    rig.renderer = PatternRenderer(SIZE, SIZE, FPS / 2, SR)  # 1920-sample frames
    items = rendered(rig.renderer, speech(6 * 2 * SPF))
    await rig.push(items)
    await rig.run(40)
    stats = rig.sync.stats
    assert stats.frames_shown == 6
    assert stats.frames_held == 6
    assert stats.frames_dropped == 0


async def test_back_to_back_segments_are_reported_once_each() -> None:
    rig = Rig()
    first, second = speech(5 * SPF, seed=1), speech(7 * SPF, seed=2)
    await rig.push(rendered(rig.renderer, first) + rendered(rig.renderer, second))
    await rig.run(50)
    assert rig.segments_played == [len(first), len(second)]
    played = rig.played()
    assert np.array_equal(played[played != 0], np.concatenate([first, second]))


async def test_segments_report_every_sample_played() -> None:
    rig = Rig()
    first, second = speech(5 * SPF + 100, seed=1), speech(7 * SPF + 37, seed=2)
    await rig.push(rendered(rig.renderer, first) + rendered(rig.renderer, second))
    await rig.run(50)
    assert rig.segments_played == [len(first), len(second)]


async def test_standalone_voice_track_keeps_everything_put_into_it() -> None:
    time = ManualTime()
    clock = MediaClock(SR, time_fn=time)
    track = AvatarVoiceTrack(SR, 1, clock=clock)
    signal = speech(10 * SR)
    for chunk in np.array_split(signal, 37):
        frame = AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SR
        await track.put_frame(frame)
    out = []
    for i in range(len(signal) // AUDIO_FRAME + 1):
        time.at(clock, i * AUDIO_FRAME)
        out.append((await track.recv()).to_ndarray().ravel())
    played = np.concatenate(out)
    assert np.array_equal(played[: len(signal)], signal)


async def test_segment_end_alone_is_not_a_segment() -> None:
    rig = Rig()
    await rig.push([AudioSegmentEnd()])
    await rig.run(5)
    assert not rig.played().any()


async def test_each_speech_frame_reports_its_tick_and_audio_start_once() -> None:
    rig = Rig()
    shown: list[tuple[int, int]] = []
    rig.sync.on_frame_shown = lambda tick, start: shown.append((tick, start))
    await rig.push(rendered(rig.renderer, speech(10 * SPF)))
    await rig.run(25)
    assert len(shown) == 10  # once per frame, held ticks not repeated
    for tick, start in shown:
        assert 0 <= tick - start < SPF  # shown on the first tick inside its audio span
