"""Memory of one session process attached to a renderer process (CPU only, ~15 s).

For each frame size, this starts a renderer process with the pattern renderer
(an idle loop of ``--idle-frames`` frames, like a prepared avatar's), then a
session process that imports the session side (``ShmRenderer``,
``AvatarServer``, tracks) and reports its memory twice:

* ``baseline``: after the imports, before it is attached to the renderer;
* ``attached``: after ``--seconds`` of playing the idle loop (both tracks pulled
  at real time), then the same again with ``--speech`` seconds of speech.

Figures come from ``/proc/PID/smaps_rollup``: RSS, PSS (shared pages divided
by the processes that map them) and USS (pages only this process maps:
``Private_Clean + Private_Dirty``).  The rings and the shared idle loop are
shared with the renderer, so they count in RSS, half in PSS, not in USS.

    .venv/bin/python scripts/bench_memory.py [--sizes 512x512,1280x720] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FPS = 25
SAMPLE_RATE = 24_000


def memory() -> dict[str, float]:
    """RSS, PSS and USS of this process in MiB."""
    fields: dict[str, int] = {}
    with open(f"/proc/{os.getpid()}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1])
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {
        "rss": fields.get("Rss", 0) / 1024,
        "pss": fields.get("Pss", 0) / 1024,
        "uss": uss / 1024,
    }


def session_main(rings, idle, width: int, height: int, seconds: float, speech: float, conn) -> None:
    """The session process: import, report the baseline, attach, play, report."""
    import gc

    import numpy as np

    from scripts.bench.common import run_async
    from scripts.bench.harness import LocalAgent, ServerSession
    from worker.shm_renderer import ShmRenderer
    from worker.types import AvatarSettings

    gc.collect()
    conn.send(("baseline", memory()))
    conn.recv()  # attached by the parent

    async def run() -> dict:
        settings = AvatarSettings(
            video_width=width, video_height=height, video_fps=FPS, audio_sample_rate=SAMPLE_RATE
        )
        if idle is None:  # before the shared idle loop (the "before" figures)
            renderer = ShmRenderer.from_rings(rings, settings=settings)
        else:
            renderer = ShmRenderer.from_rings(rings, settings=settings, idle=idle)
        await renderer.wait_ready(60)
        agent = LocalAgent(SAMPLE_RATE)
        session = ServerSession(agent, renderer, settings, jitter_frames=4)
        await session.start()

        async def pull(track) -> None:
            while True:
                await track.recv()

        pullers = [
            asyncio.create_task(pull(session.audio_track)),
            asyncio.create_task(pull(session.video_track)),
        ]
        await asyncio.sleep(seconds)
        gc.collect()
        idling = memory()
        t = np.arange(int(speech * SAMPLE_RATE)) / SAMPLE_RATE
        pcm = (8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)
        await agent.speak(pcm, speed=1.0)
        deadline = time.monotonic() + speech + 10
        while not session.played() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        gc.collect()
        spoke = memory()
        for task in pullers:
            task.cancel()
        await asyncio.gather(*pullers, return_exceptions=True)
        await session.aclose()
        await agent.aclose()
        await renderer.aclose()
        return {"idle": idling, "speech": spoke}

    conn.send(("attached", run_async(run())))


def measure(width: int, height: int, idle_frames: int, seconds: float, speech: float) -> dict:
    from renderers.control import SessionRings
    from renderers.supervisor import Supervisor

    kwargs = {
        "width": width,
        "height": height,
        "fps": FPS,
        "sample_rate": SAMPLE_RATE,
        "idle_length": idle_frames,
    }
    with Supervisor("renderers.pattern:PatternRenderer", kwargs) as supervisor:
        rings = SessionRings.create(width=width, height=height, fps=FPS, sample_rate=SAMPLE_RATE)
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        idle = None
        if hasattr(supervisor, "idle_loop_fd"):
            from renderers.idle_loop import IdleLoop

            idle = IdleLoop.from_fd(supervisor.idle_loop_fd(), keep_fd=True)
        args = (rings, idle, width, height, seconds, speech, child)
        proc = ctx.Process(target=session_main, args=args, name="avatar-session-memory")
        proc.start()
        child.close()
        try:
            kind, baseline = parent.recv()
            assert kind == "baseline"
            session_id = supervisor.attach(rings, owner_pid=proc.pid)
            rings.close()
            if idle is not None:
                idle.close()
            parent.send("go")
            kind, attached = parent.recv()
            assert kind == "attached"
            supervisor.detach(session_id)
        finally:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    return {"size": f"{width}x{height}", "baseline": baseline, **attached}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512x512,1280x720")
    parser.add_argument("--idle-frames", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=3.0, help="idle play before measuring")
    parser.add_argument("--speech", type=float, default=2.0, help="seconds of speech")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    results = []
    print(f"{'size':>9} {'state':>8} {'RSS':>8} {'PSS':>8} {'USS':>8}   (MiB; +x: beyond baseline)")
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.lower().split("x"))
        r = measure(width, height, args.idle_frames, args.seconds, args.speech)
        results.append(r)
        base = r["baseline"]
        for state in ("baseline", "idle", "speech"):
            m = r[state]
            cells = [
                f"{m[k]:8.1f}" if state == "baseline" else f"{m[k] - base[k]:+8.1f}"
                for k in ("rss", "pss", "uss")
            ]
            print(f"{r['size']:>9} {state:>8} {' '.join(cells)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
