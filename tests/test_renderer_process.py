"""The renderer process and its supervisor, with real processes and real faults."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from multiprocessing import resource_tracker
from pathlib import Path

import numpy as np
import pytest
from conftest import shm_entries

from renderers.base import FrameRenderer, RenderJob, RenderStream, i420_shape
from renderers.control import SessionRings
from renderers.frame_ring import IDLE, SEGMENT_END, SPEECH
from renderers.idle_loop import IdleLoop
from renderers.supervisor import RendererStartError, RestartEvent, Supervisor, SwapWeightsError

W, H, FPS, SR = 32, 24, 25, 24_000
SPF = SR // FPS  # samples per frame at 25 fps


class ToyRenderer(FrameRenderer):
    """Deterministic frames: the first 8 luma bytes hold the span's pts, byte 8 its loudness,
    the chroma planes the weights tag.  Optional per-frame delay and a log of batches."""

    def __init__(
        self,
        width: int = W,
        height: int = H,
        fps: float = FPS,
        sample_rate: int = SR,
        *,
        max_batch: int = 1,
        frame_delay: float = 0.0,
        batch_log: str | None = None,
    ) -> None:
        self.width, self.height, self.fps, self.sample_rate = width, height, fps, sample_rate
        self.max_batch, self.frame_delay, self.batch_log = max_batch, frame_delay, batch_log
        self.tag = 128
        self._shape = i420_shape(width, height)
        self._streams = 0

    def open_stream(self) -> RenderStream:
        stream = _PoisonableStream(self.sample_rate, self.fps)
        self._streams += 1
        stream.number = self._streams  # type: ignore[attr-defined]
        return stream

    def idle_frames(self) -> list[np.ndarray]:
        return [np.full(self._shape, 16 + i, np.uint8) for i in range(3)]

    def render(self, jobs: Sequence[RenderJob]) -> list[np.ndarray]:
        if self.batch_log:
            with open(self.batch_log, "a") as log:
                log.write(" ".join(str(job.stream.number) for job in jobs) + "\n")
        out = []
        for job in jobs:
            time.sleep(self.frame_delay)
            frame = np.full(self._shape, self.tag, np.uint8)
            frame[0, :8] = np.frombuffer(np.uint64(job.span.pts).tobytes(), np.uint8)
            rms = np.sqrt(np.mean(job.span.audio.astype(np.float64) ** 2))
            frame[0, 8] = min(255, int(rms / 128))
            out.append(frame)
        return out

    def swap_weights(self, path: str) -> None:
        text = Path(path).read_text()  # FileNotFoundError for a bad path
        if not text.startswith("WEIGHTS:"):
            raise ValueError(f"{path} is not a weights file")
        self.tag = int(text.split(":", 1)[1])


class _PoisonableStream(RenderStream):
    """Raises on a sample of -32768, as a real feature extractor may on bad input."""

    def _on_pcm(self, pcm: np.ndarray) -> None:
        if (pcm == POISON).any():
            raise ValueError("poisoned audio")


POISON = -32768
FACTORY = f"{ToyRenderer.__module__}:ToyRenderer"


def frame_pts(video: np.ndarray) -> int:
    return int(np.frombuffer(video[0, :8].tobytes(), np.uint64)[0])


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * SR)) * 3000).astype(np.int16)


class Reader:
    """Collects what arrives in a session's frame ring."""

    def __init__(self, rings: SessionRings) -> None:
        self.rings = rings
        self.idle: list[tuple[int, int]] = []  # (pts: the idle loop's generation, flags)
        self.slots: list[tuple[int, int, int, np.ndarray, np.ndarray]] = []

    def poll(self) -> None:
        frames = self.rings.frames
        while (slot := frames.peek()) is not None:
            if slot.flags & IDLE:
                self.idle.append((slot.pts, slot.flags))
            else:
                self.slots.append(
                    (slot.epoch, slot.pts, slot.flags, slot.video.copy(), slot.audio.copy())
                )
            frames.release()

    def until(self, done, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if done(self):
                return
            left = deadline - time.monotonic()
            assert left > 0, "timed out waiting for frames"
            self.rings.frames.ready_bell.wait(min(left, 0.5))

    def segment(self, epoch: int) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        return [(pts, fl, v, a) for e, pts, fl, v, a in self.slots if e == epoch]

    def has_segment_end(self, epoch: int) -> bool:
        return any(fl & SEGMENT_END for _, fl, _, _ in self.segment(epoch))


def _children() -> set[int]:
    pids = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            pids.update(int(p) for p in f.read().split())
    return pids


@pytest.fixture
def no_leaks():
    """Each test leaves no process, descriptor or /dev/shm entry behind."""
    resource_tracker.ensure_running()  # started once per interpreter by multiprocessing
    gc.collect()
    fds, shm, children = len(os.listdir("/proc/self/fd")), shm_entries(), _children()
    yield
    gc.collect()
    deadline = time.monotonic() + 5
    while _children() - children and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _children() - children == set()
    assert len(os.listdir("/proc/self/fd")) == fds
    assert shm_entries() == shm


@pytest.fixture
def make_rings(no_leaks):
    """Ring pairs for a test, closed before the leak check."""
    made: list[SessionRings] = []

    def make(slots: int = 16) -> SessionRings:
        rings = SessionRings.create(
            width=W, height=H, fps=FPS, sample_rate=SR, slots=slots, audio_seconds=20
        )
        made.append(rings)
        return rings

    yield make
    for rings in made:
        rings.close()


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def _check_segment(slots, pcm: np.ndarray, first_pts: int = 0) -> None:
    """Exact audio round trip, contiguous pts, frames drawn for their own span, one end flag."""
    audio = np.concatenate([a for _, _, _, a in slots])
    np.testing.assert_array_equal(audio, pcm)
    pts = first_pts
    for i, (slot_pts, flags, video, a) in enumerate(slots):
        assert slot_pts == pts and frame_pts(video) == pts
        assert flags & SPEECH
        assert bool(flags & SEGMENT_END) == (i == len(slots) - 1)
        pts += len(a)


# -- serving -----------------------------------------------------------------------


def test_frames_come_back_with_their_exact_audio(make_rings) -> None:
    with Supervisor(FACTORY, {"max_batch": 4}) as sup:
        rings = make_rings()
        sid = sup.attach(rings)
        reader = Reader(rings)
        first, second = speech(1.03, 1), speech(0.5, 2)
        rings.audio.put_pcm_blocking(first[:5000])
        rings.audio.put_pcm_blocking(first[5000:])
        assert rings.audio.end_segment()
        reader.until(lambda r: r.has_segment_end(0))
        rings.audio.put_pcm_blocking(second)
        assert rings.audio.end_segment()
        reader.until(lambda r: sum(bool(s[2] & SEGMENT_END) for s in r.slots) == 2)
        # The idle loop is not sent: one frameless notice says it is published, once per
        # renderer, in the shared segment (generation 1); it costs no render call.
        assert reader.idle == [(1, IDLE)]
        loop = IdleLoop.from_fd(sup.idle_loop_fd())
        try:
            assert len(loop) == 3 and loop.generation == 1
            assert [loop.read(i, lambda v: int(v[0, 0]))[2] for i in range(3)] == [16, 17, 18]
        finally:
            loop.close()
        slots = reader.segment(0)
        n_first = next(i for i, s in enumerate(slots) if s[1] & SEGMENT_END) + 1
        assert n_first == int(np.ceil(first.size / SPF))
        _check_segment(slots[:n_first], first)
        _check_segment(slots[n_first:], second, first_pts=first.size)
        assert sup.stats()["frames"] == len(slots)
        sup.detach(sid)


def test_epoch_bump_discards_stale_work(make_rings) -> None:
    with Supervisor(FACTORY, {"max_batch": 2}) as sup:
        rings = make_rings(slots=4)
        sup.attach(rings)
        reader = Reader(rings)
        reader.until(lambda r: len(r.idle) == 1)
        rings.audio.put_pcm_blocking(speech(10.0, 3))  # 250 frames, nobody reads them
        deadline = time.monotonic() + 10
        while rings.frames.used < 4 and time.monotonic() < deadline:
            rings.frames.ready_bell.wait(0.5)
        epoch = rings.audio.bump_epoch()
        fresh = speech(0.4, 4)
        rings.audio.put_pcm_blocking(fresh)
        assert rings.audio.end_segment()
        reader.until(lambda r: r.has_segment_end(epoch))
        stale = reader.segment(0)
        assert 0 < len(stale) <= 4 + 2  # what was in the ring and in flight, not 250 frames
        assert not any(fl & SEGMENT_END for _, fl, _, _ in stale)
        _check_segment(reader.segment(epoch), fresh)  # a fresh stream: pts restart at 0
        assert sup.stats()["frames"] < 20


def test_sessions_are_batched_together(make_rings, tmp_path) -> None:
    log = tmp_path / "batches.log"
    kwargs = {"max_batch": 4, "batch_log": str(log)}
    with Supervisor(FACTORY, kwargs, heartbeat_timeout=60) as sup:
        a, b = make_rings(), make_rings()
        sup.attach(a)
        sup.attach(b)
        ra, rb = Reader(a), Reader(b)
        ra.until(lambda r: len(r.idle) == 1)
        rb.until(lambda r: len(r.idle) == 1)
        # Freeze the renderer so both sessions' audio is waiting when it looks next.
        os.kill(sup.pid, signal.SIGSTOP)
        try:
            while not _stopped(sup.pid):
                time.sleep(0.01)
            pa, pb = speech(0.4, 5), speech(0.4, 6)
            for rings, pcm in ((a, pa), (b, pb)):
                rings.audio.put_pcm_blocking(pcm)
                assert rings.audio.end_segment()
        finally:
            os.kill(sup.pid, signal.SIGCONT)
        ra.until(lambda r: r.has_segment_end(0))
        rb.until(lambda r: r.has_segment_end(0))
        _check_segment(ra.segment(0), pa)
        _check_segment(rb.segment(0), pb)
        batches = [line.split() for line in log.read_text().splitlines()]
        # Earliest deadline first: both sessions' first frames share the first batch.
        assert sorted(batches[0]) == ["1", "1", "2", "2"]
        assert all(len(batch) <= 4 for batch in batches)


def test_hot_swap_and_bad_weights(make_rings, tmp_path) -> None:
    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    good.write_text("WEIGHTS:77")
    bad.write_text("garbage")
    with Supervisor(FACTORY) as sup:
        rings = make_rings()
        sup.attach(rings)
        reader = Reader(rings)
        sup.swap_weights(good, timeout=10)
        with pytest.raises(SwapWeightsError, match="No such file"):
            sup.swap_weights(tmp_path / "missing.bin", timeout=10)
        with pytest.raises(SwapWeightsError, match="not a weights file"):
            sup.swap_weights(bad, timeout=10)
        rings.audio.put_pcm_blocking(speech(0.2))
        rings.audio.end_segment()
        reader.until(lambda r: r.has_segment_end(0))
        assert {int(v[-1, -1]) for _, _, v, _ in reader.segment(0)} == {77}  # old weights kept


# -- faults ------------------------------------------------------------------------


class Restarts:
    def __init__(self) -> None:
        self.events: list[RestartEvent] = []
        self.happened = threading.Event()

    def __call__(self, event: RestartEvent) -> None:
        self.events.append(event)
        self.happened.set()


def _resume_after_restart(rings: SessionRings, reader: Reader, seed: int) -> None:
    """What a session does when the generation changes: new epoch, next segment renders."""
    epoch = rings.audio.bump_epoch(at_least=rings.audio.floor_epoch)
    pcm = speech(0.3, seed)
    rings.audio.put_pcm_blocking(pcm)
    assert rings.audio.end_segment()
    reader.until(lambda r: r.has_segment_end(epoch))
    _check_segment(reader.segment(epoch), pcm)


def test_killed_renderer_is_replaced_and_sessions_resume(make_rings) -> None:
    restarts = Restarts()
    with Supervisor(FACTORY, {"frame_delay": 0.01}, on_restart=restarts) as sup:
        rings = make_rings(slots=4)
        sid = sup.attach(rings)
        reader = Reader(rings)
        generation = rings.audio.generation
        rings.audio.put_pcm_blocking(speech(5.0))
        reader.until(lambda r: len(r.slots) >= 3)  # mid-speech
        old_pid = sup.pid
        os.kill(old_pid, signal.SIGKILL)
        assert restarts.happened.wait(10)
        event = restarts.events[0]
        assert not event.failed and event.pid not in (None, old_pid) and event.session_ids == (sid,)
        assert "exited" in event.reason
        assert rings.audio.generation == generation + 1
        _resume_after_restart(rings, reader, seed=7)


def _session_process(rings: SessionRings) -> None:
    """A session that keeps the renderer busy until it is killed."""
    pcm = speech(1.0, 8)
    while True:
        rings.audio.put_pcm_blocking(pcm)
        while (slot := rings.frames.peek()) is not None:
            del slot
            rings.frames.release()


def _ring_mappings(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum("memfd:avatar-" in line and "ring" in line for line in f)


def test_dead_session_is_dropped_and_others_keep_being_served(make_rings) -> None:
    with Supervisor(FACTORY) as sup:
        ctx = multiprocessing.get_context("spawn")
        theirs = make_rings()
        session = ctx.Process(target=_session_process, args=(theirs,), daemon=True)
        session.start()
        their_id = sup.attach(theirs, owner_pid=session.pid)
        theirs.close()  # the session process and the renderer hold them now
        ours = make_rings()
        our_id = sup.attach(ours)
        reader = Reader(ours)
        reader.until(lambda r: len(r.idle) == 1)
        deadline = time.monotonic() + 10
        while sup.stats()["frames"] < 5 and time.monotonic() < deadline:
            time.sleep(0.05)  # the other session is being served
        assert _ring_mappings(sup.pid) == 4
        session.kill()
        session.join()
        session.close()
        deadline = time.monotonic() + 10
        while (
            sup.stats()["sessions"] != 1 or their_id in sup.session_ids
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sup.session_ids == [our_id] and sup.stats()["sessions"] == 1
        assert _ring_mappings(sup.pid) == 2  # the renderer let go of the dead session's rings
        pcm = speech(0.3, 9)
        ours.audio.put_pcm_blocking(pcm)
        assert ours.audio.end_segment()
        reader.until(lambda r: r.has_segment_end(0))
        _check_segment(reader.segment(0), pcm)
        assert sup.restarts == 0


def test_hung_renderer_is_killed_and_replaced(make_rings) -> None:
    restarts = Restarts()
    with Supervisor(FACTORY, heartbeat_timeout=1.0, on_restart=restarts) as sup:
        rings = make_rings()
        sup.attach(rings)
        reader = Reader(rings)
        reader.until(lambda r: len(r.idle) == 1)
        hung = sup.pid
        os.kill(hung, signal.SIGSTOP)  # alive, but its loop no longer turns
        assert restarts.happened.wait(15)
        event = restarts.events[0]
        assert "hung" in event.reason and event.pid != hung
        assert not os.path.exists(f"/proc/{hung}")  # killed and reaped
        _resume_after_restart(rings, reader, seed=10)


def test_a_factory_that_fails_is_reported_in_words(no_leaks) -> None:
    sup = Supervisor("renderers.nonexistent:Thing", start_timeout=30)
    with pytest.raises(RendererStartError, match=r"module 'renderers\.nonexistent' not found"):
        sup.start()
    sup.close()
    with pytest.raises(ValueError, match=r"package\.module:callable"):
        Supervisor("no-colon")


def _owner_of_a_renderer(pid_out) -> None:
    """A process that starts a renderer and then dies without closing anything."""
    sup = Supervisor(FACTORY)
    sup.start()
    pid_out.send(sup.pid)
    time.sleep(60)


def test_renderer_exits_when_its_supervisor_dies(no_leaks) -> None:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    owner = ctx.Process(target=_owner_of_a_renderer, args=(theirs,))
    owner.start()
    theirs.close()
    assert ours.poll(30)
    renderer_pid = ours.recv()
    ours.close()
    owner.kill()
    owner.join()
    owner.close()
    # Orphaned, it sees its control socket close and exits.
    deadline = time.monotonic() + 10
    while _running(renderer_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(renderer_pid)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_a_failing_session_is_dropped_and_the_others_keep_being_served(make_rings) -> None:
    with Supervisor(FACTORY) as sup:
        bad, good = make_rings(), make_rings()
        bad_id, good_id = sup.attach(bad), sup.attach(good)
        reader = Reader(good)
        reader.until(lambda r: len(r.idle) == 1)
        bad.audio.put_pcm_blocking(np.full(2000, POISON, np.int16))
        deadline = time.monotonic() + 10
        while bad_id in sup.session_ids and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sup.session_ids == [good_id]
        pcm = speech(0.3, 4)
        good.audio.put_pcm_blocking(pcm)
        assert good.audio.end_segment()
        reader.until(lambda r: r.has_segment_end(0))
        _check_segment(reader.segment(0), pcm)
        assert sup.restarts == 0
