"""Section ``latency``: how soon the avatar starts speaking, and how soon it stops.

One session with the chosen model behind the renderer process.  Each round
the agent sends a segment as fast as the data channel takes it (streaming
TTS runs ahead of real time), then interrupts one second into playback:

    first_frame_ms  first audio byte sent -> first lip-synced picture out of
                    the visual track (features, model, composition, both
                    rings, the jitter buffer and the wait for the next tick)
    interrupt_ms    INTERRUPT sent -> the voice track plays silence

Figures are medians over ``ROUNDS`` rounds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from worker.renderer_factory import RendererSpec, open_renderer

from .common import BenchConfig, Progress, median, run_async
from .harness import LocalAgent, ServerSession, avatar_settings
from .trace import Consumer, speech_signal

ROUNDS = 5
SPEECH_S = 2.5
INTERRUPT_AFTER_S = 1.0
QUIET_S = 0.5  # > the receiver's interrupt_quiet: the next segment is not taken for stragglers


def lipsync_spec(config: BenchConfig) -> RendererSpec:
    return RendererSpec(
        kind="lipsync",
        weights=config.weights,
        backend=config.backend,
        device=config.device,
        in_process=config.in_process,
        max_batch=max(config.batches),
        settings=avatar_settings(config),
    )


async def _measure(config: BenchConfig, progress: Progress) -> dict[str, Any]:
    settings = avatar_settings(config)
    pcm = speech_signal(SPEECH_S, config.sample_rate, config.seed)
    first, stop = [], []
    async with open_renderer(lipsync_spec(config)) as renderer:
        agent = LocalAgent(config.sample_rate)
        session = ServerSession(agent, renderer, settings, config.jitter_frames)
        consumer = Consumer(
            session.audio_track, session.video_track, config.fps, config.sample_rate
        )
        await session.start()
        consumer.start()
        try:
            await asyncio.sleep(QUIET_S)
            for round_ in range(ROUNDS):
                sent = time.monotonic()
                await agent.speak(pcm, speed=0)
                shown = await _wait_for(session.first_frame_time, consumer.trace, sent)
                await asyncio.sleep(INTERRUPT_AFTER_S)
                interrupted = time.monotonic()
                await agent.interrupt()
                silent = await _wait_for(consumer.trace.silence_after, interrupted)
                first.append(1000.0 * (shown - sent))
                stop.append(1000.0 * (silent - interrupted))
                progress(
                    "latency",
                    f"round {round_ + 1}: first frame {first[-1]:.0f} ms, "
                    f"interrupt {stop[-1]:.0f} ms",
                )
                await asyncio.sleep(QUIET_S)
        finally:
            await consumer.stop()
            await session.aclose()
            await agent.aclose()
    return {
        "first_frame_ms": round(median(first), 1),
        "interrupt_ms": round(median(stop), 1),
        "rounds": ROUNDS,
        "jitter_frames": config.jitter_frames,
        "first_frame_ms_all": [round(x, 1) for x in first],
        "interrupt_ms_all": [round(x, 1) for x in stop],
    }


async def _wait_for(probe, *args: Any, timeout: float = 30.0) -> float:
    """Poll ``probe(*args)`` until it returns a value."""
    deadline = time.monotonic() + timeout
    while (value := probe(*args)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError("the session did not react within 30 s")
        await asyncio.sleep(0.01)
    return value


def run(config: BenchConfig, progress: Progress, artifacts: dict[str, Any]) -> dict[str, Any]:
    progress("latency", f"{ROUNDS} rounds: speak, interrupt after {INTERRUPT_AFTER_S:g} s")
    return run_async(_measure(config, progress))
