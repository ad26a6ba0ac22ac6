"""Section ``sessions``: how many sessions one renderer process keeps at the target fps.

A trial runs ``n`` sessions at once against one renderer process with the
chosen model, so inference is batched across sessions (earliest deadline
first).  As in a deployment, the sessions do not run in the renderer's
process: they are spread over a few *session host* processes (about one per
two CPUs), each running its share in its own event loop::

    this process: Supervisor ──▶ renderer process (model, batching)
        │ creates and attaches one ring pair per session
        ▼ (rings inherited at spawn)
    session host 1 .. W: ShmRenderer -> AvatarServer -> tracks -> listener

Every session's agent streams ``duration`` seconds of speech (``TTS_SPEED``
times real time), starting a fraction of a frame after the previous one.  A
trial holds when every listener saw the target fps with no stall and no
audio gap (:func:`~.trace.analyse`) and no synchronizer stall.

Search: 1, 2, 4, ... sessions until a trial fails (or the limit), then
bisection between the last count that held and the first that failed, down
to 1/8 of the count that held (each trial costs ``duration`` seconds and
more): ``max_sessions`` held, ``first_failed`` did not.  A trial that fails
by a single glitch (one stall or gap in all sessions) is run once more, so a
moment of unrelated load on the machine does not decide the figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .common import BenchConfig, Progress, Skip, resolve_device, run_async
from .env import usable_cpus
from .harness import LocalAgent, ServerSession, avatar_settings
from .latency import lipsync_spec
from .trace import Consumer, analyse, speech_signal

FPS_TOLERANCE = 0.98  # a listener must see at least this share of the target fps
# Agents stream TTS this much faster than real time here, as streaming TTS services do.  At
# exactly real time a segment's last frames wait for its end marker (see the pacing section),
# which no renderer capacity can help; capacity is what this section measures.
TTS_SPEED = 1.5
START_TIMEOUT_S = 60.0


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

    @property
    def marginal(self) -> bool:
        """Failed by a single glitch: possibly other work on the machine, worth a retry."""
        return self.stalls + self.audio_gaps + self.sync_stalls <= 1


# -- a session host process ------------------------------------------------------------------


def host_sessions(
    rings: list[Any], idle_loops: list[Any], offsets: list[float], config: BenchConfig, conn
) -> None:
    """Entry point of a session host: run one session per ring pair (and its mapping of the
    renderer's shared idle loop), report each one."""
    try:
        conn.send(("done", run_async(_host(rings, idle_loops, offsets, config, conn))))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


async def _host(
    rings: list[Any], idle_loops: list[Any], offsets: list[float], config: BenchConfig, conn
) -> list[dict]:
    from worker.shm_renderer import ShmRenderer

    settings = avatar_settings(config)
    pcm = speech_signal(config.duration, config.sample_rate, config.seed)
    async with contextlib.AsyncExitStack() as stack:
        sessions, consumers, agents = [], [], []
        for pair, idle in zip(rings, idle_loops, strict=True):
            renderer = ShmRenderer.from_rings(pair, settings=settings, idle=idle)
            stack.push_async_callback(renderer.aclose)
            await renderer.wait_ready(START_TIMEOUT_S)
            agent = LocalAgent(config.sample_rate)
            session = ServerSession(agent, renderer, settings, config.jitter_frames)
            consumer = Consumer(
                session.audio_track, session.video_track, config.fps, agent.sample_rate
            )
            stack.push_async_callback(agent.aclose)
            stack.push_async_callback(session.aclose)
            stack.push_async_callback(consumer.stop)
            await session.start()
            consumer.start()
            sessions.append(session)
            consumers.append(consumer)
            agents.append(agent)
        conn.send(("ready", None))
        go = await asyncio.to_thread(conn.recv)
        speaking = [
            asyncio.create_task(_speak_at(agent, pcm, go + offset))
            for agent, offset in zip(agents, offsets, strict=True)
        ]
        deadline = go + 20.0 + 3.0 * config.duration
        while not all(s.played() for s in sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.gather(*speaking)
        results = []
        for session, consumer in zip(sessions, consumers, strict=True):
            m = analyse(consumer.trace)
            results.append(
                {
                    "played": session.played(),
                    "fps": m.fps,
                    "stalls": m.stalls,
                    "audio_gaps": m.audio_gaps,
                    "frames_held": session.stats.frames_held,
                    "frames_dropped": session.stats.frames_dropped,
                    "sync_stalls": session.stats.stalls,
                }
            )
    return results


async def _speak_at(agent: LocalAgent, pcm: np.ndarray, when: float) -> None:
    await asyncio.sleep(max(0.0, when - time.monotonic()))
    await agent.speak(pcm, speed=TTS_SPEED)


# -- one trial, from the supervisor's side ------------------------------------------------------


def run_trial(config: BenchConfig, supervisor: Any, n: int) -> Trial:
    """``n`` sessions at once on ``supervisor``'s renderer process."""
    from renderers.control import SessionRings
    from renderers.idle_loop import IdleLoop

    info = supervisor.info
    workers = min(n, max(1, usable_cpus() // 2))
    stagger = 1.0 / config.fps / n
    ctx = multiprocessing.get_context("spawn")
    rings, idle_loops, ids, procs, conns = [], [], [], [], []
    try:
        for _ in range(n):
            rings.append(
                SessionRings.create(
                    width=info.width, height=info.height, fps=info.fps, sample_rate=info.sample_rate
                )
            )
            ids.append(supervisor.attach(rings[-1]))
            idle_loops.append(IdleLoop.from_fd(supervisor.idle_loop_fd(), keep_fd=True))
        for w in range(workers):
            mine = list(range(w, n, workers))
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=host_sessions,
                args=(
                    [rings[k] for k in mine],
                    [idle_loops[k] for k in mine],
                    [k * stagger for k in mine],
                    config,
                    child,
                ),
                name="bench-session-host",
                daemon=True,
            )
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
        for conn in conns:
            _expect(conn, "ready", START_TIMEOUT_S)
        go = time.monotonic() + 0.5
        for conn in conns:
            conn.send(go)
        per_session = []
        for conn in conns:
            per_session += _expect(conn, "done", 30.0 + 3.0 * config.duration)
    finally:
        for proc in procs:
            proc.join(10.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in conns:
            conn.close()
        for session_id in ids:
            supervisor.detach(session_id)
        for pair in rings:
            pair.close()
        for idle in idle_loops:
            idle.close()
    return _judge(config, n, per_session)


def _expect(conn, kind: str, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"a session host sent no {kind!r} within {timeout:.0f} s")
    got, payload = conn.recv()
    if got == "error":
        raise RuntimeError(f"a session host failed:\n{payload}")
    return payload


def _judge(config: BenchConfig, n: int, per_session: list[dict]) -> Trial:
    trial = Trial(
        sessions=n,
        ok=False,
        min_fps=round(min(s["fps"] for s in per_session), 2),
        **{
            key: sum(s[key] for s in per_session)
            for key in (
                "stalls",
                "audio_gaps",
                "frames_held",
                "frames_dropped",
                "sync_stalls",
            )
        },
    )
    trial.ok = (
        all(s["played"] for s in per_session)
        and trial.min_fps >= FPS_TOLERANCE * config.fps
        and trial.stalls == trial.audio_gaps == trial.sync_stalls == 0
    )
    return trial


# -- the search ---------------------------------------------------------------------------------


def search(limit: int, trial, progress: Progress) -> tuple[int, int | None, list[Trial]]:
    """(a count that held, the smallest that failed or None, every trial run), to 1/8."""
    trials: list[Trial] = []

    def attempt(n: int, retry: bool = True) -> bool:
        result = trial(n)
        trials.append(result)
        progress(
            "sessions",
            f"{n} session(s): {'held' if result.ok else 'failed'} "
            f"(min {result.min_fps} fps, {result.stalls} stalls, {result.audio_gaps} gaps)",
        )
        if not result.ok and retry and result.marginal:
            progress("sessions", f"{n} session(s): one glitch only, trying once more")
            return attempt(n, retry=False)
        return result.ok

    held, failed, n = 0, None, 1
    while n <= limit:
        if not attempt(n):
            failed = n
            break
        held = n
        n = limit if n < limit < 2 * n else 2 * n
    if failed is not None:
        while failed - held > max(1, held // 8):
            mid = (held + failed) // 2
            if attempt(mid):
                held = mid
            else:
                failed = mid
    return held, failed, sorted(trials, key=lambda t: t.sessions)


def run(config: BenchConfig, progress: Progress, artifacts: dict[str, Any]) -> dict[str, Any]:
    if config.in_process:
        raise Skip("it measures the renderer process, which --in-process leaves out")
    try:
        from renderers.supervisor import Supervisor
    except ImportError as exc:
        raise Skip(f"the renderer process is not available ({exc})") from exc
    limit = config.sessions or config.max_sessions
    progress("sessions", f"up to {limit} sessions, {config.duration:g} s of speech each")
    spec = lipsync_spec(config)
    with Supervisor(spec.factory, spec.kwargs()) as supervisor:
        best, failed, trials = search(limit, lambda n: run_trial(config, supervisor, n), progress)
    chosen = artifacts.get("backend")
    return {
        "target_fps": config.fps,
        "max_sessions": best,
        "first_failed": failed,
        "device": chosen["device"] if chosen else resolve_device(config.device),
        "weights": config.weights,
        "backend": chosen["name"] if chosen else config.backend,
        "search_limit": limit,
        "jitter_frames": config.jitter_frames,
        "duration_s": config.duration,
        "tts_speed": TTS_SPEED,
        "trials": [asdict(t) for t in trials],
    }
