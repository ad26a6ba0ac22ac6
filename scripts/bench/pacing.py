"""Sections ``pacing`` and ``jitter_sweep``: one session with a jittery renderer.

``pacing`` runs the same speech through this design (renderer process +
media-clock synchronizer) and through the reference design (renderer inline +
relative sleeps, :mod:`.reference`), with the same seeded
:class:`~.jittery.JitteryRenderer`, and compares what a listener receives
(:mod:`.trace`).  The agent streams the speech ``tts_speed`` times faster
than real time (default 1: live TTS at real time, the hardest case, where
the jitter buffer is the only slack the renderer has).

``jitter_sweep`` repeats this design's run for several jitter buffer depths
(``AvatarServer(jitter_frames=N)``): deeper buffers absorb longer render
spikes and cost ``N`` frames of first-frame latency.
"""

from __future__ import annotations

from typing import Any

from .common import BenchConfig, Progress, run_async
from .harness import LocalAgent, ServerSession, avatar_settings, open_avatar_renderer, run_speech
from .jittery import JitteryRenderer
from .reference import ReferenceSession
from .trace import PacingMetrics, Trace, analyse, speech_signal

JITTERY_FACTORY = "scripts.bench.jittery:build"


def _renderer_kwargs(config: BenchConfig) -> dict[str, Any]:
    return {
        "width": config.width,
        "height": config.height,
        "fps": config.fps,
        "sample_rate": config.sample_rate,
        "seed": config.seed,
    }


def _latency_ms(first_send: float | None, first_frame: float | None) -> float | None:
    if first_send is None or first_frame is None:
        return None
    return round(1000.0 * (first_frame - first_send), 1)


def _entry(design: str, config: BenchConfig, m: PacingMetrics, first_ms: float | None) -> dict:
    return {
        "design": design,
        "target_fps": config.fps,
        "fps": round(m.fps, 2),
        "interval_p99_dev_ms": round(m.interval_p99_dev_ms, 2),
        "audio_gaps": m.audio_gaps,
        "stalls": m.stalls,
        "interval_max_dev_ms": round(m.interval_max_dev_ms, 2),
        "gap_ms": round(m.gap_ms, 1),
        "first_frame_ms": first_ms,
        "speech_s": round(m.speech_s, 2),
        "tts_speed": config.tts_speed,
    }


async def run_this(config: BenchConfig, jitter_frames: int) -> tuple[dict, Trace]:
    """This design once: renderer process, synchronizer with ``jitter_frames``."""
    settings = avatar_settings(config)
    pcm = speech_signal(config.duration, config.sample_rate, config.seed)
    kwargs = _renderer_kwargs(config)
    async with open_avatar_renderer(
        JITTERY_FACTORY, kwargs, settings, in_process=config.in_process
    ) as renderer:
        agent = LocalAgent(config.sample_rate)
        session = ServerSession(agent, renderer, settings, jitter_frames)
        try:
            trace = await run_speech(session, agent, pcm, fps=config.fps, speed=config.tts_speed)
        finally:
            await session.aclose()
            await agent.aclose()
    metrics = analyse(trace)
    entry = _entry(
        "this", config, metrics, _latency_ms(agent.first_send, session.first_frame_time(trace))
    )
    stats = session.stats
    entry.update(
        jitter_frames=jitter_frames,
        sync_stalls=stats.stalls,
        frames_held=stats.frames_held,
        frames_dropped=stats.frames_dropped,
    )
    return entry, trace


async def run_reference(config: BenchConfig) -> tuple[dict, Trace]:
    """The reference design once, with the same renderer and the same speech."""
    pcm = speech_signal(config.duration, config.sample_rate, config.seed)
    renderer = JitteryRenderer(**_renderer_kwargs(config))
    agent = LocalAgent(config.sample_rate)
    session = ReferenceSession(agent.audio_in, renderer, config.fps)
    try:
        trace = await run_speech(session, agent, pcm, fps=config.fps, speed=config.tts_speed)
    finally:
        await session.aclose()
        await agent.aclose()
        renderer.close()
    metrics = analyse(trace)
    first = _latency_ms(agent.first_send, session.first_frame_time(trace))
    return _entry("reference", config, metrics, first), trace


def run(config: BenchConfig, progress: Progress, artifacts: dict[str, Any]) -> list[dict]:
    """Both designs, one after the other, same renderer and seed."""
    progress("pacing", f"this design: {config.duration:g} s of speech, jittery renderer")
    this, this_trace = run_async(run_this(config, config.jitter_frames))
    progress("pacing", f"this design: {this['fps']} fps, p99 dev {this['interval_p99_dev_ms']} ms")
    progress("pacing", "reference design: same speech, same renderer")
    ref, ref_trace = run_async(run_reference(config))
    progress("pacing", f"reference: {ref['fps']} fps, p99 dev {ref['interval_p99_dev_ms']} ms")
    artifacts["pacing_traces"] = {"this": this_trace, "reference": ref_trace}
    return [this, ref]


def run_sweep(config: BenchConfig, progress: Progress, artifacts: dict[str, Any]) -> list[dict]:
    """This design for each jitter buffer depth in ``config.jitter_sweep``."""
    rows = []
    for depth in config.jitter_sweep:
        progress("sweep", f"jitter_frames={depth}")
        entry, _ = run_async(run_this(config, depth))
        rows.append(
            {
                "jitter_frames": depth,
                "stalls": entry["stalls"],
                "audio_gaps": entry["audio_gaps"],
                "first_frame_ms": entry["first_frame_ms"],
                "interval_p99_dev_ms": entry["interval_p99_dev_ms"],
                "fps": entry["fps"],
                "frames_held": entry["frames_held"],
            }
        )
    return rows
