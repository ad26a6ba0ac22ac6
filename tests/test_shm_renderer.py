"""``ShmRenderer``: the session side of the renderer process, as an ``AvatarRenderer``."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading
from fractions import Fraction
from multiprocessing import resource_tracker

import numpy as np
import pytest
from av import AudioFrame, VideoFrame
from conftest import shm_entries

from renderers.control import SessionRings
from renderers.idle_loop import IdleLoop
from renderers.pattern import PatternRenderer
from renderers.supervisor import RestartEvent, Supervisor
from worker.inprocess_renderer import InProcessRenderer
from worker.shm_renderer import ShmRenderer
from worker.types import AudioSegmentEnd, AvatarSettings

W = H = 64
SR, FPS = 24_000, 25
FACTORY = "renderers.pattern:PatternRenderer"
KWARGS = {"width": W, "height": H, "fps": FPS, "sample_rate": SR, "max_batch": 4, "idle_length": 4}
SETTINGS = AvatarSettings(video_width=W, video_height=H, video_fps=FPS, audio_sample_rate=SR)


def _children() -> set[int]:
    pids = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            pids.update(int(p) for p in f.read().split())
    return pids


@pytest.fixture
def no_leaks():
    resource_tracker.ensure_running()
    gc.collect()
    fds, shm, children = len(os.listdir("/proc/self/fd")), shm_entries(), _children()
    yield
    gc.collect()
    assert _children() - children == set()
    assert len(os.listdir("/proc/self/fd")) == fds
    assert shm_entries() == shm


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * SR)) * 4000).astype(np.int16)


def chunks(pcm: np.ndarray, size: int = SR // 50):
    """20 ms AudioFrames, as AvatarAudioIn produces them."""
    for i in range(0, len(pcm), size):
        frame = AudioFrame.from_ndarray(pcm[None, i : i + size], format="s16", layout="mono")
        frame.sample_rate = SR
        yield frame


async def push(renderer, pcm: np.ndarray, end: bool = True) -> None:
    for frame in chunks(pcm):
        await renderer.push_stream_chunk(frame)
    if end:
        await renderer.push_stream_chunk(AudioSegmentEnd())


async def take_segment(items) -> list[tuple[VideoFrame, AudioFrame]]:
    """Video/audio pairs up to the next AudioSegmentEnd."""
    pairs = []
    async with asyncio.timeout(20):
        while True:
            item = await anext(items)
            if isinstance(item, AudioSegmentEnd):
                return pairs
            assert isinstance(item, VideoFrame)
            audio = await anext(items)
            assert isinstance(audio, AudioFrame)
            pairs.append((item, audio))


def check_pairs(pairs, pcm: np.ndarray, first_pts: int = 0) -> None:
    pts = first_pts
    for video, audio in pairs:
        assert video.format.name == "yuv420p" and (video.width, video.height) == (W, H)
        assert (
            audio.format.name == "s16" and audio.layout.name == "mono" and audio.sample_rate == SR
        )
        assert video.pts == audio.pts == pts
        assert video.time_base == audio.time_base == Fraction(1, SR)
        pts += audio.samples
    played = np.concatenate([a.to_ndarray().ravel() for _, a in pairs])
    np.testing.assert_array_equal(played, pcm)


async def test_frames_and_exact_audio_round_trip(no_leaks) -> None:
    renderer = await ShmRenderer.open(FACTORY, KWARGS, settings=SETTINGS)
    try:
        assert len(renderer.idle_frames()) == 4
        items = aiter(renderer)
        first, second = speech(0.7, 1), speech(0.33, 2)
        await push(renderer, first)
        check_pairs(await take_segment(items), first)
        await push(renderer, second)
        check_pairs(await take_segment(items), second, first_pts=first.size)
    finally:
        await renderer.aclose()


async def test_same_frames_as_in_process(no_leaks) -> None:
    pcm = speech(0.5, 3)
    pcm[3000:3120] = 30_000  # a click lights the pattern's sync marker
    shm = await ShmRenderer.open(FACTORY, KWARGS, settings=SETTINGS)
    local = InProcessRenderer(PatternRenderer(**KWARGS))
    try:
        results = []
        for renderer in (shm, local):
            await push(renderer, pcm)
            results.append(await take_segment(aiter(renderer)))
        assert len(results[0]) == len(results[1])
        for (v1, a1), (v2, a2) in zip(*results, strict=True):
            assert v1.pts == v2.pts
            np.testing.assert_array_equal(v1.to_ndarray(), v2.to_ndarray())
            np.testing.assert_array_equal(a1.to_ndarray(), a2.to_ndarray())
        idle_shm = [f.to_ndarray() for f in shm.idle_frames()]
        idle_local = [f.to_ndarray() for f in local.idle_frames()]
        np.testing.assert_array_equal(np.stack(idle_shm), np.stack(idle_local))
    finally:
        await shm.aclose()
        await local.aclose()


async def test_reset_stream_drops_stale_frames(no_leaks) -> None:
    renderer = await ShmRenderer.open(FACTORY, KWARGS, settings=SETTINGS)
    try:
        items = aiter(renderer)
        await push(renderer, speech(4.0, 4), end=False)
        for _ in range(6):  # three frames of the long segment
            await anext(items)
        renderer.reset_stream()
        fresh = speech(0.4, 5)
        await push(renderer, fresh)
        pairs = await take_segment(items)
        check_pairs(pairs, fresh)  # nothing of the interrupted segment, pts from 0
    finally:
        await renderer.aclose()


async def test_renderer_killed_mid_segment(no_leaks) -> None:
    restarted = threading.Event()
    events: list[RestartEvent] = []

    def on_restart(event: RestartEvent) -> None:
        events.append(event)
        restarted.set()

    supervisor = Supervisor(FACTORY, KWARGS, on_restart=on_restart)
    await asyncio.to_thread(supervisor.start)
    renderer = await ShmRenderer.open(FACTORY, settings=SETTINGS, supervisor=supervisor)
    try:
        items = aiter(renderer)
        broken = speech(3.0, 6)
        await push(renderer, broken[:SR], end=False)
        got = [await anext(items) for _ in range(4)]  # two frames played
        os.kill(supervisor.pid, signal.SIGKILL)
        assert await asyncio.to_thread(restarted.wait, 10)
        assert not events[0].failed
        await push(renderer, broken[SR:], end=True)  # the rest of that segment: void
        # Whatever the old process finished, then exactly one end for the broken segment.
        rest = await take_segment(items)
        played = [a for _, a in rest] + [i for i in got if isinstance(i, AudioFrame)]
        assert sum(a.samples for a in played) < broken.size
        fresh = speech(0.4, 7)
        await push(renderer, fresh)
        check_pairs(await take_segment(items), fresh)
        assert renderer.restarts_seen == 1
    finally:
        await renderer.aclose()
        await asyncio.to_thread(supervisor.close)


async def test_rings_attached_by_another_owner(no_leaks) -> None:
    """The dispatcher's way: rings made and attached elsewhere, handed over as descriptors."""
    supervisor = Supervisor(FACTORY, KWARGS)
    await asyncio.to_thread(supervisor.start)
    made = SessionRings.create(width=W, height=H, fps=FPS, sample_rate=SR)
    supervisor.attach(made)
    renderer = ShmRenderer.from_rings(
        SessionRings.from_fds([os.dup(fd) for fd in made.fds()]),
        idle=IdleLoop.from_fd(supervisor.idle_loop_fd()),
    )
    made.close()
    try:
        await renderer.wait_ready(10)
        assert len(renderer.idle_frames()) == 4
        pcm = speech(0.3, 8)
        await push(renderer, pcm)
        check_pairs(await take_segment(aiter(renderer)), pcm)
    finally:
        await renderer.aclose()
        await asyncio.to_thread(supervisor.close)


async def test_settings_that_do_not_match_the_renderer() -> None:
    rings = SessionRings.create(width=W, height=H, fps=FPS, sample_rate=SR, audio_seconds=1)
    try:
        with pytest.raises(ValueError, match="128x64"):
            ShmRenderer(rings, settings=AvatarSettings(video_width=128, video_height=64))
    finally:
        rings.close()


async def test_a_slow_consumer_keeps_memory_bounded(no_leaks) -> None:
    """A long burst must not be copied out of the ring faster than it is consumed."""
    renderer = await ShmRenderer.open(FACTORY, KWARGS, settings=SETTINGS)
    try:
        items = aiter(renderer)
        pcm = speech(20.0, 7)
        await push(renderer, pcm)
        capacity = renderer.rings.frames.geometry.slots
        peak = 0
        pairs = 0
        async with asyncio.timeout(30):
            while not isinstance(item := await anext(items), AudioSegmentEnd):
                if isinstance(item, AudioFrame):
                    pairs += 1
                    if pairs % 50 == 0:
                        await asyncio.sleep(0.02)  # the renderer races ahead meanwhile
                peak = max(peak, len(renderer._out))
        assert pairs == 500
        assert peak <= capacity
    finally:
        await renderer.aclose()
