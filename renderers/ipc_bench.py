"""Measure the frame ring against ``multiprocessing.Queue`` between two real processes.

A producer process (the renderer's role) hands I420 frames, each with the 960
audio samples that play during it, to the consumer (this process, the
session's role) at a steady pace, first through a
:class:`~renderers.frame_ring.FrameRing`, then through a
``multiprocessing.Queue``.  Latency is from the moment the producer has a
frame ready until the consumer holds its own copy of it.  CPU is user + system
time of both processes (all threads, ``time.process_time``) over the whole
transfer, divided by the number of frames.

Run ``python -m renderers.ipc_bench [frames]`` for 512x512 and 1280x720.
"""

from __future__ import annotations

import multiprocessing
import sys
import time

import numpy as np

from .frame_ring import SPEECH, FrameRing
from .shm import PassFd

_FPS, _RATE = 25, 24_000
_AUDIO = np.arange(_RATE // _FPS, dtype=np.int16)  # the samples that play with a frame
_SLOTS = 8
_WARMUP = 2 * _SLOTS  # first touches of every slot page; not measured


def _test_frame(width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height * 3 // 2, width), dtype=np.uint8)


def _pace(t0: float, i: int, period: float) -> None:
    delay = t0 + i * period - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _ring_producer(fds, width, height, frames, period, results) -> None:
    ring = FrameRing.from_fds(*(fd.fd for fd in fds), keep_fd=False)
    frame = _test_frame(width, height)
    t0 = time.perf_counter()
    for i in range(_WARMUP + frames):
        if i == _WARMUP:
            cpu0 = time.process_time()
        _pace(t0, i, period)
        stamp = time.monotonic_ns()
        while (slot := ring.slot_for_write()) is None:
            ring.free_bell.wait(1.0)
        np.copyto(slot[0], frame)
        slot[1][: _AUDIO.size] = _AUDIO
        ring.publish(epoch=0, pts=stamp, flags=SPEECH, n_audio=_AUDIO.size)
    results.recv()  # the consumer has everything
    results.send(time.process_time() - cpu0)
    ring.close()


def _queue_producer(queue, width, height, frames, period, results) -> None:
    frame = _test_frame(width, height)
    t0 = time.perf_counter()
    for i in range(_WARMUP + frames):
        if i == _WARMUP:
            cpu0 = time.process_time()
        _pace(t0, i, period)
        queue.put((time.monotonic_ns(), frame, _AUDIO))
    results.recv()
    results.send(time.process_time() - cpu0)  # includes the queue's feeder thread


def _summary(transport, width, height, latencies_ns, cpu_s, frames) -> dict:
    lat = np.asarray(latencies_ns[_WARMUP:], dtype=np.float64) / 1e3
    return {
        "transport": transport,
        "resolution": f"{width}x{height}",
        "frames": frames,
        "p50_us": round(float(np.percentile(lat, 50)), 1),
        "p99_us": round(float(np.percentile(lat, 99)), 1),
        "cpu_us_per_frame": round(cpu_s / frames * 1e6, 1),
    }


def _run_ring(ctx, width, height, frames, period) -> dict:
    ring = FrameRing.create(width=width, height=height, fps=_FPS, sample_rate=_RATE, slots=_SLOTS)
    ours, theirs = ctx.Pipe()
    fds = tuple(PassFd(fd) for fd in ring.fds())
    proc = ctx.Process(target=_ring_producer, args=(fds, width, height, frames, period, theirs))
    proc.start()
    theirs.close()
    latencies = []
    try:
        for i in range(_WARMUP + frames):
            if i == _WARMUP:
                cpu0 = time.process_time()
            while (slot := ring.peek()) is None:
                if not ring.ready_bell.wait(10.0):
                    raise TimeoutError("the ring producer stopped sending frames")
            _kept = slot.video.copy(), slot.audio.copy()  # what a consumer keeps
            latencies.append(time.monotonic_ns() - slot.pts)
            del slot
            ring.release()
        cpu = time.process_time() - cpu0
        ours.send(True)
        cpu += ours.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        ours.close()
        ring.close()
    return _summary("ring", width, height, latencies, cpu, frames)


def _run_queue(ctx, width, height, frames, period) -> dict:
    queue = ctx.Queue(maxsize=_SLOTS)
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_queue_producer, args=(queue, width, height, frames, period, theirs))
    proc.start()
    theirs.close()
    latencies = []
    try:
        for i in range(_WARMUP + frames):
            if i == _WARMUP:
                cpu0 = time.process_time()
            stamp, *_kept = queue.get(timeout=10.0)
            latencies.append(time.monotonic_ns() - stamp)
        cpu = time.process_time() - cpu0
        ours.send(True)
        cpu += ours.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        ours.close()
        queue.close()
        queue.join_thread()
    return _summary("mp_queue", width, height, latencies, cpu, frames)


def measure_ipc(width: int, height: int, frames: int, *, period_s: float = 0.01) -> list[dict]:
    """Hand ``frames`` I420 frames of ``width`` x ``height`` over each transport.

    Returns one row per transport: ``transport`` ("ring" | "mp_queue"),
    ``resolution``, ``p50_us``, ``p99_us`` (handoff latency) and
    ``cpu_us_per_frame`` (both processes).  Frames are sent every
    ``period_s`` so latency is the handoff itself, not queueing behind a
    backlog; a few warm-up frames before them (first touches of the ring's
    pages, the queue's feeder thread starting) are not measured.
    """
    if frames < 10:
        raise ValueError("measure at least 10 frames")
    ctx = multiprocessing.get_context("spawn")
    return [
        _run_ring(ctx, width, height, frames, period_s),
        _run_queue(ctx, width, height, frames, period_s),
    ]


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    for w, h in ((512, 512), (1280, 720)):
        rows = measure_ipc(w, h, n)
        for row in rows:
            print(row)
        ratio = rows[1]["cpu_us_per_frame"] / rows[0]["cpu_us_per_frame"]
        print(f"{w}x{h}: the ring uses {ratio:.1f}x less CPU per frame than mp.Queue")
