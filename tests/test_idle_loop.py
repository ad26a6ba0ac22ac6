"""The idle loop once per renderer (shared, read-only in sessions) and frames composed
straight into frame ring slots."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from renderers.base import FrameRenderer, RenderJob, RenderStream, i420_shape
from renderers.frame_ring import FrameRing
from renderers.idle_loop import IdleLoop
from renderers.pattern import PatternRenderer
from renderers.shm import PassFd
from renderers.supervisor import Supervisor
from worker.shm_renderer import SharedIdleFrames, ShmRenderer
from worker.types import AudioSegmentEnd, AvatarSettings

W, H, SR, FPS = 32, 24, 24_000, 25
SETTINGS = AvatarSettings(video_width=W, video_height=H, video_fps=FPS, audio_sample_rate=SR)


def loop_frames(n: int, first: int, width: int = W, height: int = H) -> list[np.ndarray]:
    """``n`` flat frames of values ``first``, ``first + 1``, ..."""
    return [np.full(i420_shape(width, height), first + i, np.uint8) for i in range(n)]


def value(loop: IdleLoop, index: int) -> int:
    got = loop.read(index, lambda v: (int(v.min()), int(v.max())))
    assert got is not None
    low, high = got[2]
    assert low == high
    return low


class AvatarToy(FrameRenderer):
    """An idle loop that comes from the "weights": ``IDLE:<count>:<first value>``."""

    max_batch = 2

    def __init__(self) -> None:
        self.width, self.height, self.fps, self.sample_rate = W, H, FPS, SR
        self._idle = loop_frames(3, 16)

    def open_stream(self) -> RenderStream:
        return RenderStream(self.sample_rate, self.fps)

    def idle_frames(self) -> list[np.ndarray]:
        return self._idle

    def render(self, jobs: Sequence[RenderJob]) -> list[np.ndarray]:
        raise AssertionError("the render loop must draw into the slots (render_into)")

    def render_into(self, jobs: Sequence[RenderJob], out: Sequence[np.ndarray]) -> None:
        for job, target in zip(jobs, out, strict=True):
            assert not target.flags.owndata  # a view of the frame ring slot
            target[:] = 200
            target[0, :8] = np.frombuffer(np.uint64(job.span.pts).tobytes(), np.uint8)

    def swap_weights(self, path: str) -> None:
        _, count, first = Path(path).read_text().split(":")
        self._idle = loop_frames(int(count), int(first))


TOY = f"{AvatarToy.__module__}:AvatarToy"


# -- the segment ------------------------------------------------------------------------


def test_publish_and_read_a_loop_through_a_read_only_mapping() -> None:
    loop = IdleLoop.create(W, H, capacity=8)
    reader = IdleLoop.from_fd(os.dup(loop.fd))
    try:
        assert reader.readonly and reader.generation == 0 and len(reader) == 0
        assert reader.read(0, bytes) is None
        assert loop.publish(loop_frames(3, 10)) == 1
        assert (reader.generation, len(reader)) == (1, 3)
        assert [value(reader, i) for i in range(5)] == [10, 11, 12, 10, 11]  # wraps around
        with pytest.raises(ValueError, match="read-only"):
            reader.publish(loop_frames(1, 0))
        with pytest.raises(ValueError):  # the mapping itself is read-only
            reader.read(0, lambda view: view.__setitem__((0, 0), 1))
        # A new avatar: another length, in the other bank; readers switch at the next frame.
        assert loop.publish(loop_frames(5, 50)) == 2
        assert (reader.generation, len(reader)) == (2, 5)
        assert [value(reader, i) for i in range(5)] == [50, 51, 52, 53, 54]
        assert loop.publish(loop_frames(20, 0)) == 3  # longer than it holds: cut
        assert len(reader) == 8
    finally:
        reader.close()
        loop.close()


def test_a_publish_cut_short_by_a_killed_renderer_does_not_wedge_the_loop() -> None:
    loop = IdleLoop.create(W, H, capacity=4)
    reader = IdleLoop.from_fd(os.dup(loop.fd))
    try:
        loop.publish(loop_frames(2, 10))
        loop._words[16] += 1  # bank 0 (generation 2) left half-written: seq odd
        assert value(reader, 1) == 11  # readers stay on generation 1
        assert loop.publish(loop_frames(3, 20)) == 2  # the replacement renderer
        assert [value(reader, i) for i in range(3)] == [20, 21, 22]
        assert loop.publish(loop_frames(1, 30)) == 3 and value(reader, 0) == 30
    finally:
        reader.close()
        loop.close()


def _republish(fd: PassFd, rounds: int, started) -> None:
    loop = IdleLoop.from_fd(fd.fd, readonly=False)
    started.set()
    width, height = loop.width, loop.height
    for g in range(rounds):
        loop.publish(loop_frames(4, (g * 4) % 200, width, height))
    loop.close()


def test_a_frame_read_while_the_renderer_republishes_is_never_torn() -> None:
    """Another process republishes as fast as it can; every frame read is whole."""
    width, height = 640, 480  # big frames: a copy takes long enough to be overtaken
    loop = IdleLoop.create(width, height, capacity=4)
    loop.publish(loop_frames(4, 0, width, height))
    reader = IdleLoop.from_fd(os.dup(loop.fd))
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    writer = ctx.Process(target=_republish, args=(PassFd(loop.fd), 3000, started))
    writer.start()
    try:
        assert started.wait(30)
        reads, generations = 0, set()
        while writer.is_alive() or reads < 50:
            got = reader.read(reads, np.array)  # a copy, as a VideoFrame makes
            assert got is not None
            generation, _, frame = got
            generations.add(generation)
            assert frame.min() == frame.max(), f"torn frame in generation {generation}"
            reads += 1
        writer.join(30)
        assert writer.exitcode == 0
        assert len(generations) > 10  # the reads really overlapped republishing
    finally:
        if writer.is_alive():
            writer.kill()
        reader.close()
        loop.close()


def test_shared_idle_frames_build_one_frame_at_a_time() -> None:
    loop = IdleLoop.create(W, H, capacity=8)
    loop.publish(loop_frames(4, 30))
    frames = SharedIdleFrames(IdleLoop.from_fd(os.dup(loop.fd)))
    try:
        assert len(frames) == 4
        first = frames[1]
        assert frames[1] is first and frames.built == 1  # shown again: no new copy
        assert int(first.to_ndarray()[0, 0]) == 31
        assert int(frames[6].to_ndarray()[0, 0]) == 32 and frames.built == 2
        assert [int(f.to_ndarray()[0, 0]) for f in frames] == [30, 31, 32, 33]
        loop.publish(loop_frames(2, 90))  # a swap: picked up at the next frame
        assert len(frames) == 2 and int(frames[1].to_ndarray()[0, 0]) == 91
        frames.close()
        assert len(frames) == 0
    finally:
        frames.close()
        loop.close()


# -- sessions and the renderer process ----------------------------------------------------


async def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _idle_values(renderer: ShmRenderer) -> list[int]:
    return [int(f.to_ndarray()[0, 0]) for f in renderer.idle_frames()]


async def test_sessions_show_the_one_shared_loop_and_pick_up_swaps_and_restarts(
    tmp_path,
) -> None:
    supervisor = Supervisor(TOY, heartbeat_timeout=2.0)
    await asyncio.to_thread(supervisor.start)
    a = b = None
    try:
        a = await ShmRenderer.open(TOY, settings=SETTINGS, supervisor=supervisor)
        b = await ShmRenderer.open(TOY, settings=SETTINGS, supervisor=supervisor)
        for renderer in (a, b):
            idle = renderer.idle_frames()
            # Not a per-session copy: a view of the renderer's segment, mapped read-only.
            assert isinstance(idle, SharedIdleFrames) and not isinstance(idle, list)
            assert idle._loop is not None and idle._loop.readonly
            assert idle.generation == 1 and _idle_values(renderer) == [16, 17, 18]
        # Both sessions map the same memory (one memfd inode).
        inodes = {os.fstat(supervisor._idle_loop.fd).st_ino}
        for pid_fd in os.listdir("/proc/self/map_files"):
            target = os.readlink(f"/proc/self/map_files/{pid_fd}")
            if "avatar-idle-loop" in target:
                inodes.add(os.stat(f"/proc/self/map_files/{pid_fd}").st_ino)
        assert len(inodes) == 1

        weights = tmp_path / "avatar.txt"
        weights.write_text("IDLE:5:100")
        await asyncio.to_thread(supervisor.swap_weights, weights, 30)
        await _wait_for(lambda: a.idle_frames().generation == 2)
        assert _idle_values(a) == _idle_values(b) == [100, 101, 102, 103, 104]

        old_pid = supervisor.pid
        os.kill(old_pid, signal.SIGKILL)  # the replacement re-applies the swap, republishes
        await _wait_for(
            lambda: supervisor.pid not in (None, old_pid) and a.idle_frames().generation >= 4
        )
        assert _idle_values(b) == [100, 101, 102, 103, 104]

        # Speech still renders (straight into the slots: AvatarToy.render raises).
        pcm = np.full(SR // 5, 1000, np.int16)
        from av import AudioFrame

        frame = AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate = SR
        await a.push_stream_chunk(frame)
        await a.push_stream_chunk(AudioSegmentEnd())
        items = aiter(a)
        pts = []
        async with asyncio.timeout(20):
            while not isinstance(item := await anext(items), AudioSegmentEnd):
                if item.__class__.__name__ == "VideoFrame":
                    image = item.to_ndarray()
                    pts.append(int(np.frombuffer(image[0, :8].tobytes(), np.uint64)[0]))
                    assert int(image[1, 0]) == 200
        assert pts == [0, 960, 1920, 2880, 3840]
    finally:
        for renderer in (a, b):
            if renderer is not None:
                await renderer.aclose()
        await asyncio.to_thread(supervisor.close)


# -- compose straight into the slot --------------------------------------------------------


def _jobs(renderer: FrameRenderer, seconds: float = 0.4) -> list[RenderJob]:
    rng = np.random.default_rng(5)
    pcm = (rng.standard_normal(int(seconds * renderer.sample_rate)) * 4000).astype(np.int16)
    stream = renderer.open_stream()
    return stream.push(pcm) + stream.end_segment()


def _into_slots(renderer: FrameRenderer, jobs: list[RenderJob]) -> list[np.ndarray]:
    ring = FrameRing.create(
        width=renderer.width,
        height=renderer.height,
        fps=renderer.fps,
        sample_rate=renderer.sample_rate,
        slots=len(jobs),
    )
    try:
        views = ring.slots_for_write(len(jobs))
        assert views is not None and ring.slots_for_write(len(jobs) + 1) is None
        renderer.render_into(jobs, [video for video, _ in views])
        return [video.copy() for video, _ in views]
    finally:
        del views
        ring.close()


def test_pattern_renderer_composes_into_the_slot_the_same_pixels() -> None:
    renderer = PatternRenderer(64, 48, FPS, SR)
    jobs = _jobs(renderer)
    np.testing.assert_array_equal(
        np.stack(_into_slots(renderer, jobs)), np.stack(renderer.render(jobs))
    )


@pytest.mark.parametrize("composer", ["numpy", "torch"])
def test_lipsync_composes_into_the_slot_the_same_pixels(composer: str) -> None:
    from renderers.lipsync import LipSyncRenderer

    renderer = LipSyncRenderer(
        "builtin", backend="onnx", device="cpu", composer=composer, fps=FPS, sample_rate=SR
    )
    try:
        jobs = _jobs(renderer)[: renderer.max_batch]
        expected = np.stack(renderer.render(jobs))
        got = np.stack(_into_slots(renderer, jobs))
        np.testing.assert_array_equal(got, expected)
        assert not all(np.array_equal(f, renderer.avatar.i420[0]) for f in got)
    finally:
        renderer.close()
