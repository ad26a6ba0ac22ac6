"""The shared-memory rings: properties of both rings, and a transfer between two processes."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import selectors
from collections import deque
from multiprocessing import resource_tracker

import numpy as np
import pytest
from conftest import shm_entries
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from renderers.audio_ring import PCM, RECORD_HEADER, SEGMENT_END, AudioRing, RingFullError
from renderers.control import SessionRings
from renderers.frame_ring import IDLE, SPEECH, FrameRing
from renderers.frame_ring import SEGMENT_END as FRAME_END
from renderers.shm import Doorbell, Segment

SR = 24_000


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- audio ring ------------------------------------------------------------------


class AudioRingMachine(RuleBasedStateMachine):
    """Random writes, segment ends, epoch bumps and reads against a plain model.

    The model is the sequence of samples and segment ends written, each with
    its epoch.  The reader must get exactly that sequence back (PCM may come
    in different pieces), the writer must never overwrite unread data, and a
    write may only come up short when the ring is (nearly) full.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ring = AudioRing.create(SR, capacity=512)
        self.expected: deque = deque()  # ("pcm", epoch, samples) | ("end", epoch)
        self.rng = np.random.default_rng(0)

    @rule(n=st.integers(1, 400))
    def write(self, n: int) -> None:
        pcm = self.rng.integers(-32768, 32768, n, dtype=np.int16)
        free_before = self.ring.free_bytes
        written = self.ring.write_pcm(pcm)
        assert 0 <= written <= n
        if written < n:  # only when (nearly) full
            assert self.ring.free_bytes < 3 * RECORD_HEADER
        if written:
            self.expected.append(("pcm", self.ring.epoch, pcm[:written].copy()))
        assert self.ring.free_bytes <= free_before

    @rule()
    def end_segment(self) -> None:
        if self.ring.end_segment():
            self.expected.append(("end", self.ring.epoch))
        else:
            assert self.ring.free_bytes < RECORD_HEADER

    @rule()
    def bump_epoch(self) -> None:
        before = self.ring.epoch
        assert self.ring.bump_epoch() == before + 1 == self.ring.epoch

    @precondition(lambda self: self.ring.unread_bytes)
    @rule(k=st.integers(1, 8))
    def read(self, k: int) -> None:
        for _ in range(k):
            record = self.ring.read()
            if record is None:
                assert not self.expected
                return
            if record.kind == SEGMENT_END:
                assert self.expected.popleft() == ("end", record.epoch)
                continue
            assert record.kind == PCM and record.pcm is not None and record.pcm.size
            got = record.pcm
            while got.size:
                kind, epoch, want = self.expected[0]
                assert kind == "pcm" and epoch == record.epoch
                n = min(got.size, want.size)
                np.testing.assert_array_equal(got[:n], want[:n])
                got = got[n:]
                if n == want.size:
                    self.expected.popleft()
                else:
                    self.expected[0] = (kind, epoch, want[n:])

    @invariant()
    def never_overfull(self) -> None:
        assert 0 <= self.ring.unread_bytes <= self.ring.capacity
        if not self.expected:
            assert self.ring.read() is None

    def teardown(self) -> None:
        self.ring.close()


TestAudioRing = AudioRingMachine.TestCase
TestAudioRing.settings = settings(
    max_examples=60,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_audio_ring_full_writer_times_out_and_keeps_data() -> None:
    ring = AudioRing.create(SR, capacity=256)
    pcm = np.arange(1000, dtype=np.int16)
    with pytest.raises(RingFullError, match="Nothing was dropped"):
        ring.put_pcm_blocking(pcm, timeout=0.05)
    got = []
    while (record := ring.read()) is not None:
        got.append(record.pcm)
    np.testing.assert_array_equal(np.concatenate(got), pcm[: sum(len(g) for g in got)])
    ring.close()


async def test_audio_ring_async_writer_waits_for_space() -> None:
    ring = AudioRing.create(SR, capacity=256)
    pcm = np.arange(2000, dtype=np.int16)
    got: list[np.ndarray] = []

    async def reader() -> None:
        while sum(map(len, got)) < pcm.size:
            await ring.data_bell.wait_async()
            while (record := ring.read()) is not None:
                got.append(record.pcm)
            ring.notify_space()

    task = asyncio.create_task(reader())
    await ring.put_pcm(pcm, timeout=5)
    await asyncio.wait_for(task, 5)
    np.testing.assert_array_equal(np.concatenate(got), pcm)
    ring.close()


def test_audio_ring_rejects_foreign_memory() -> None:
    segment = Segment.create("not-a-ring", 4096)
    fd = os.dup(segment.fd)
    segment.close()
    bells = [Doorbell.create(), Doorbell.create()]
    with pytest.raises(RuntimeError, match="not an audio ring"):
        AudioRing.from_fds(fd, bells[0].fd, bells[1].fd)
    os.close(fd)
    for bell in bells:
        bell.close()


# -- frame ring ------------------------------------------------------------------

W, H = 8, 6


class FrameRingMachine(RuleBasedStateMachine):
    """Random writes and reads: FIFO order, exact content, full and empty edges."""

    def __init__(self) -> None:
        super().__init__()
        self.ring = FrameRing.create(width=W, height=H, fps=25, sample_rate=SR, slots=3)
        self.expected: deque = deque()
        self.rng = np.random.default_rng(1)
        self.seq = 0

    @rule(
        n_audio=st.integers(0, SR // 25),
        epoch=st.integers(0, 2**40),
        flags=st.sampled_from([SPEECH, IDLE, SPEECH | FRAME_END]),
    )
    def write(self, n_audio: int, epoch: int, flags: int) -> None:
        video = self.rng.integers(0, 256, (H * 3 // 2, W), dtype=np.uint8)
        audio = self.rng.integers(-32768, 32768, n_audio, dtype=np.int16)
        pts = int(self.rng.integers(0, 2**50))
        full = self.ring.used == 3
        assert self.ring.write(video, audio, epoch=epoch, pts=pts, flags=flags) is not full
        if not full:
            self.expected.append((self.seq, epoch, pts, flags, video, audio))
            self.seq += 1

    @rule()
    def read(self) -> None:
        slot = self.ring.peek()
        if not self.expected:
            assert slot is None
            with pytest.raises(RuntimeError):
                self.ring.release()
            return
        seq, epoch, pts, flags, video, audio = self.expected.popleft()
        assert slot is not None
        assert (slot.seq, slot.epoch, slot.pts, slot.flags) == (seq, epoch, pts, flags)
        np.testing.assert_array_equal(slot.video, video)
        np.testing.assert_array_equal(slot.audio, audio)
        self.ring.release()

    @invariant()
    def counts(self) -> None:
        assert self.ring.used == len(self.expected)
        assert self.ring.free_slots == 3 - len(self.expected)

    def teardown(self) -> None:
        self.ring.close()


TestFrameRing = FrameRingMachine.TestCase
TestFrameRing.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)


def test_frame_ring_rejects_too_much_audio_and_odd_sizes() -> None:
    ring = FrameRing.create(width=W, height=H, fps=25, sample_rate=SR, slots=2)
    with pytest.raises(ValueError, match="do not fit"):
        ring.write(None, np.zeros(SR // 25 + 1, np.int16), epoch=0, pts=0, flags=SPEECH)
    assert ring.used == 0
    ring.close()
    with pytest.raises(ValueError, match="even dimensions"):
        FrameRing.create(width=7, height=6, fps=25, sample_rate=SR)


def test_frame_ring_29_97_fps_slot_holds_the_longest_frame() -> None:
    ring = FrameRing.create(width=W, height=H, fps=30000 / 1001, sample_rate=SR)
    assert ring.geometry.max_audio == 801  # ceil(24000 * 1001 / 30000)
    ring.close()


# -- two processes ---------------------------------------------------------------

AUDIO_CHUNKS = 60
FRAMES = 40


def _chunk(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(-32768, 32768, 97 + i * 13, dtype=np.int16)


def _producer(rings: SessionRings) -> None:
    """Child: audio into a tiny ring (many wrap-arounds, waits for space), frames into 3 slots."""
    for i in range(AUDIO_CHUNKS):
        rings.audio.put_pcm_blocking(_chunk(i), timeout=10)
        if i % 10 == 9:
            while not rings.audio.end_segment():
                rings.audio.space_bell.wait(10)
        if i == 30:
            rings.audio.bump_epoch()
    for i in range(FRAMES):
        while rings.frames.slot_for_write() is None:
            rings.frames.free_bell.wait(10)
        video = np.full((H * 3 // 2, W), i, np.uint8)
        rings.frames.write(video, _chunk(i)[:960], epoch=i // 10, pts=i * 960, flags=SPEECH)
    rings.close()


def test_two_processes_move_audio_and_frames() -> None:
    resource_tracker.ensure_running()
    fds_before = _fd_count()
    shm_before = shm_entries()
    rings = SessionRings.create(width=W, height=H, fps=25, sample_rate=SR, slots=3)
    rings.audio.close()  # replace with a tiny ring so the child wraps and waits
    rings.audio = AudioRing.create(SR, capacity=1024)
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_producer, args=(rings,))
    child.start()
    samples: list[np.ndarray] = []
    events: list[tuple[str, int]] = []
    frames: list[tuple[int, int, int, np.ndarray]] = []
    with selectors.DefaultSelector() as sel:
        sel.register(rings.audio.data_bell.fd, selectors.EVENT_READ, rings.audio.data_bell)
        sel.register(rings.frames.ready_bell.fd, selectors.EVENT_READ, rings.frames.ready_bell)
        while len(frames) < FRAMES:
            assert sel.select(10), "the producer stopped"
            rings.audio.data_bell.drain()
            rings.frames.ready_bell.drain()
            while (record := rings.audio.read()) is not None:
                if record.kind == PCM:
                    samples.append(record.pcm)
                    events.append(("pcm", record.epoch))
                else:
                    events.append(("end", record.epoch))
            rings.audio.notify_space()
            while (slot := rings.frames.peek()) is not None:
                frames.append((slot.epoch, slot.pts, int(slot.video[0, 0]), slot.audio.copy()))
                rings.frames.release()
    child.join(10)
    assert child.exitcode == 0
    child.close()
    expected = np.concatenate([_chunk(i) for i in range(AUDIO_CHUNKS)])
    np.testing.assert_array_equal(np.concatenate(samples), expected)
    ends = [e for e in events if e[0] == "end"]
    assert ends == [("end", 0)] * 3 + [("end", 1)] * 3
    for i, (epoch, pts, pixel, audio) in enumerate(frames):
        assert (epoch, pts, pixel) == (i // 10, i * 960, i)
        np.testing.assert_array_equal(audio, _chunk(i)[:960])
    rings.close()
    gc.collect()
    assert _fd_count() == fds_before
    assert shm_entries() == shm_before
