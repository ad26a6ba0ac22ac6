"""Section ``sessions``: how many sessions one renderer process keeps at the target fps.

A trial runs ``n`` sessions at once against one renderer process with the
chosen model (so inference is batched across sessions, earliest deadline
first).  Every session streams ``duration`` seconds of speech in real time,
starting a fraction of a frame after the previous one, and a listener pulls
its tracks.  A trial holds when every session's listener saw the target fps
with no stall and no audio gap (:func:`~.trace.analyse`) and no synchronizer
stall.

Search: 1, 2, 4, ... sessions until a trial fails (or the limit), then
bisection between the last count that held and the first that failed.  The
sessions share this process's event loop, as several rooms would share a
session host; on a many-core machine with a fast GPU the network side of the
benchmark itself may become the limit before the renderer does (the figure
is then a lower bound; ``trials`` shows where it failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from typing import Any

from worker.types import AvatarRenderer

from .common import BenchConfig, Progress, resolve_device, run_async
from .harness import LocalAgent, ServerSession
from .latency import lipsync_spec
from .pacing import _settings
from .trace import Consumer, analyse, speech_signal

FPS_TOLERANCE = 0.98  # a listener must see at least this share of the target fps
LEAD_IN_S = 0.5

OpenRenderer = Callable[[], AbstractAsyncContextManager[AvatarRenderer]]


@dataclass
class Trial:
    sessions: int
    ok: bool
    min_fps: float
    stalls: int  # pictures held too long, all sessions
    audio_gaps: int
    frames_held: int  # synchronizer counters, all sessions
    frames_dropped: int
    sync_stalls: int


async def _run_trial(config: BenchConfig, n: int, open_one: OpenRenderer) -> Trial:
    settings = _settings(config)
    pcm = speech_signal(config.duration, config.sample_rate, config.seed)
    async with contextlib.AsyncExitStack() as stack:
        sessions, consumers, agents = [], [], []
        for _ in range(n):
            renderer = await stack.enter_async_context(open_one())
            agent = LocalAgent(config.sample_rate)
            session = ServerSession(agent, renderer, settings, config.jitter_frames)
            stack.push_async_callback(agent.aclose)
            stack.push_async_callback(session.aclose)
            consumer = Consumer(
                session.audio_track, session.video_track, config.fps, agent.sample_rate
            )
            stack.push_async_callback(consumer.stop)
            sessions.append(session)
            consumers.append(consumer)
            agents.append(agent)
        for session, consumer in zip(sessions, consumers, strict=True):
            await session.start()
            consumer.start()
        await asyncio.sleep(LEAD_IN_S)
        stagger = 1.0 / config.fps / n
        speaking = [
            asyncio.create_task(_speak_later(agent, pcm, i * stagger))
            for i, agent in enumerate(agents)
        ]
        deadline = time.monotonic() + 20.0 + 3.0 * config.duration
        while not all(s.played() for s in sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.gather(*speaking)
        metrics = [analyse(c.trace) for c in consumers]
    played = all(s.played() for s in sessions)
    trial = Trial(
        sessions=n,
        ok=False,
        min_fps=round(min(m.fps for m in metrics), 2),
        stalls=sum(m.stalls for m in metrics),
        audio_gaps=sum(m.audio_gaps for m in metrics),
        frames_held=sum(s.stats.frames_held for s in sessions),
        frames_dropped=sum(s.stats.frames_dropped for s in sessions),
        sync_stalls=sum(s.stats.stalls for s in sessions),
    )
    trial.ok = (
        played
        and trial.min_fps >= FPS_TOLERANCE * config.fps
        and trial.stalls == trial.audio_gaps == trial.sync_stalls == 0
    )
    return trial


async def _speak_later(agent: LocalAgent, pcm, delay: float) -> None:
    await asyncio.sleep(delay)
    await agent.speak(pcm, realtime=True)


async def search(
    limit: int, trial: Callable[[int], Any], progress: Progress
) -> tuple[int, list[Trial]]:
    """The largest count in 1..limit for which ``await trial(n)`` holds."""
    trials: list[Trial] = []

    async def attempt(n: int) -> bool:
        result = await trial(n)
        trials.append(result)
        progress(
            "sessions",
            f"{n} session(s): {'held' if result.ok else 'failed'} "
            f"(min {result.min_fps} fps, {result.stalls} stalls, {result.audio_gaps} gaps)",
        )
        return result.ok

    held, failed, n = 0, None, 1
    while n <= limit:
        if not await attempt(n):
            failed = n
            break
        held = n
        n = limit if n < limit < 2 * n else 2 * n
    if failed is not None:
        while failed - held > 1:
            mid = (held + failed) // 2
            if await attempt(mid):
                held = mid
            else:
                failed = mid
    return held, sorted(trials, key=lambda t: t.sessions)


@contextlib.asynccontextmanager
async def shared_renderer(config: BenchConfig) -> AsyncIterator[OpenRenderer]:
    """One frame renderer for every session of a trial; yields ``open_one()``."""
    spec = lipsync_spec(config)
    if config.in_process:
        from worker.inprocess_renderer import InProcessRenderer
        from worker.renderer_factory import load_factory

        frame_renderer = load_factory(spec.factory)(**spec.kwargs())

        @contextlib.asynccontextmanager
        async def open_in_process() -> AsyncIterator[AvatarRenderer]:
            renderer = InProcessRenderer(frame_renderer)
            try:
                yield renderer
            finally:
                await renderer.aclose()

        try:
            yield open_in_process
        finally:
            frame_renderer.close()
        return
    from .harness import shared_renderer_process

    async with shared_renderer_process(spec.factory, spec.kwargs(), spec.settings) as open_one:
        yield open_one


def run(config: BenchConfig, progress: Progress, artifacts: dict[str, Any]) -> dict[str, Any]:
    limit = config.sessions or config.max_sessions
    progress("sessions", f"up to {limit} sessions, {config.duration:g} s of speech each")

    async def measure() -> tuple[int, list[Trial]]:
        async with shared_renderer(config) as open_one:
            return await search(limit, lambda n: _run_trial(config, n, open_one), progress)

    best, trials = run_async(measure())
    chosen = artifacts.get("backend")
    return {
        "target_fps": config.fps,
        "max_sessions": best,
        "device": chosen["device"] if chosen else resolve_device(config.device),
        "weights": config.weights,
        "backend": chosen["name"] if chosen else config.backend,
        "jitter_frames": config.jitter_frames,
        "duration_s": config.duration,
        "trials": [asdict(t) for t in trials],
    }
