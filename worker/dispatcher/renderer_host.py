"""The renderer side as the dispatcher and a session process see it.

The dispatcher owns a :class:`RendererHost`: it starts the renderer with the
dispatcher (model and avatar loaded before the first join), says whether it
is up (``/readyz``), forwards weight swaps (``POST /weights``) and gives
each session process an *attach spec*: a small JSON-able dict that the
session turns into its :class:`~worker.types.AvatarRenderer` with
:func:`attach_renderer`.  The spec format is written once, here:

=============  ===========================================================
``mode``       meaning
=============  ===========================================================
``in_process``  ``{"factory": "pkg.mod:callable", "kwargs": {...}}``: the
               session builds the frame renderer itself
               (:class:`~worker.inprocess_renderer.InProcessRenderer`).
               For the pattern renderer and debugging.
``shm``        ``{"fds": [six descriptors], "idle_fd": descriptor}``: the
               session's ring pair (audio in, frames out), inherited at
               spawn and already attached to the shared renderer process
               (:class:`ShmHost`), and the renderer's shared idle loop
               segment (:mod:`renderers.idle_loop`), mapped read-only.
=============  ===========================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..renderer_factory import RendererSpec, load_factory
from ..types import AvatarRenderer, AvatarSettings


class WeightsError(Exception):
    """A weight swap that was refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class SessionResources:
    """What one session process gets from the renderer host when it is spawned.

    ``fds`` are inherited by the child (same numbers); ``attach(pid)`` runs
    once the child exists; ``release()`` closes the dispatcher's own copies.
    """

    spec: dict
    fds: list[int] = field(default_factory=list)
    attach: Callable[[int], Awaitable[None]] | None = None
    release: Callable[[], None] = lambda: None


class RendererHost(ABC):
    """The dispatcher's handle on the renderer."""

    async def start(self) -> None:
        """Start the renderer and load the model and avatar (before the first join)."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """True while sessions can be served."""

    @abstractmethod
    def session_resources(self) -> SessionResources:
        """The attach spec (and descriptors) for one new session process."""

    async def swap_weights(self, path: str) -> str:
        """Load new weights for every session; raises :class:`WeightsError`."""
        raise WeightsError("this renderer does not load weights", status=400)

    def status(self) -> dict[str, Any]:
        return {"ready": self.ready}

    async def stop(self) -> None:
        """Stop the renderer and free its shared memory."""


class InProcessHost(RendererHost):
    """Each session process builds its own frame renderer (pattern renderer, debugging)."""

    def __init__(self, spec: RendererSpec) -> None:
        self.spec = spec
        self._started = False

    async def start(self) -> None:
        load_factory(self.spec.factory)  # fail at startup, not at the first join
        self._started = True

    @property
    def ready(self) -> bool:
        return self._started

    def session_resources(self) -> SessionResources:
        spec = {"mode": "in_process", "factory": self.spec.factory, "kwargs": self.spec.kwargs()}
        return SessionResources(spec)

    async def swap_weights(self, path: str) -> str:
        raise WeightsError(
            "weights cannot be swapped while each session renders in its own process "
            "(--in-process); run without it to use the shared renderer process",
            status=409,
        )

    def status(self) -> dict[str, Any]:
        return {"ready": self.ready, "mode": "in_process", "renderer": self.spec.kind}


class ShmHost(RendererHost):
    """One renderer process for all sessions, kept alive by a :class:`Supervisor`.

    Each session process inherits a ring pair (memfd segments and eventfds)
    created here; the supervisor attaches it to the renderer with the session
    process as owner, so the renderer lets go of the rings when that process
    exits, however it exits.  The dispatcher closes its own copies at once.
    """

    def __init__(self, spec: RendererSpec, *, heartbeat_timeout: float = 10.0) -> None:
        from renderers.supervisor import Supervisor

        self.spec = spec
        self.supervisor = Supervisor(
            spec.factory, spec.kwargs(), heartbeat_timeout=heartbeat_timeout
        )
        self._started = False
        # Not ready once the heartbeat is half-way to the supervisor's hang limit: a slow
        # batch (a large model on a CPU, a cold CUDA start) is not yet a reason to refuse joins.
        self._stale_after = self.supervisor.heartbeat_timeout / 2

    async def start(self) -> None:
        await asyncio.to_thread(self.supervisor.start)
        self._started = True

    @property
    def ready(self) -> bool:
        sup = self.supervisor
        return (
            self._started
            and not sup.failed
            and sup.pid is not None
            and sup.heartbeat_age() < self._stale_after
        )

    def session_resources(self) -> SessionResources:
        from renderers.control import SessionRings

        s = self.spec.settings
        rings = SessionRings.create(
            width=s.video_width,
            height=s.video_height,
            fps=s.video_fps,
            sample_rate=s.audio_sample_rate,
        )
        try:
            idle_fd = self.supervisor.idle_loop_fd()
        except BaseException:
            rings.close()
            raise
        fds = rings.fds()

        async def attach(pid: int) -> None:
            await asyncio.to_thread(self.supervisor.attach, rings, owner_pid=pid)

        def release() -> None:
            rings.close()
            os.close(idle_fd)

        spec = {"mode": "shm", "fds": fds, "idle_fd": idle_fd}
        return SessionResources(spec, [*fds, idle_fd], attach, release)

    async def swap_weights(self, path: str) -> str:
        from renderers.supervisor import RendererUnavailable, SwapWeightsError

        if not os.path.isfile(path):
            raise WeightsError(f"no weights file at {path!r} on the renderer host", status=400)
        try:
            future = self.supervisor.request_swap(path)
            await asyncio.wait_for(asyncio.wrap_future(future), 300)
        except SwapWeightsError as exc:
            raise WeightsError(str(exc), status=422) from exc
        except (RendererUnavailable, RuntimeError, TimeoutError) as exc:
            raise WeightsError(f"the renderer could not take the request: {exc}", 503) from exc
        return f"weights loaded from {path}"

    def status(self) -> dict[str, Any]:
        sup = self.supervisor
        return {
            "ready": self.ready,
            "mode": "shm",
            "renderer": self.spec.kind,
            "pid": sup.pid,
            "restarts": sup.restarts,
            "failed": sup.failed,
        }

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await asyncio.to_thread(self.supervisor.close)


def make_host(spec: RendererSpec) -> RendererHost:
    """The in-process host for ``in_process`` specs, else the shared renderer process."""
    return InProcessHost(spec) if spec.in_process else ShmHost(spec)


# -- session side ------------------------------------------------------------------------


class TimedFrameRenderer:
    """Wraps a frame renderer and records milliseconds of render time per frame."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.render_ms: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def render(self, jobs: Sequence[Any]) -> list[np.ndarray]:
        start = time.perf_counter()
        frames = self._inner.render(jobs)
        if jobs:
            per_frame = (time.perf_counter() - start) * 1000 / len(jobs)
            self.render_ms.extend([per_frame] * len(jobs))
        return frames

    def take_render_ms(self) -> list[float]:
        samples, self.render_ms = self.render_ms, []
        return samples


@dataclass
class AttachedRenderer:
    """A session's renderer plus what it can tell about itself for metrics."""

    renderer: AvatarRenderer
    take_render_ms: Callable[[], list[float]] = list
    ring_depths: Callable[[], dict[str, int]] = dict


@contextlib.asynccontextmanager
async def attach_renderer(spec: dict, settings: AvatarSettings) -> AsyncIterator[AttachedRenderer]:
    """The session's renderer for an attach spec made by a :class:`RendererHost`."""
    mode = spec.get("mode")
    if mode == "in_process":
        from ..inprocess_renderer import InProcessRenderer

        frame_renderer = TimedFrameRenderer(load_factory(spec["factory"])(**spec["kwargs"]))
        renderer = InProcessRenderer(frame_renderer)
        try:
            yield AttachedRenderer(renderer, take_render_ms=frame_renderer.take_render_ms)
        finally:
            await renderer.aclose()
            frame_renderer.close()
        return
    if mode == "shm":
        from renderers.control import SessionRings
        from renderers.idle_loop import IdleLoop

        from ..shm_renderer import ShmRenderer

        idle_fd = spec.get("idle_fd")
        idle = None if idle_fd is None else IdleLoop.from_fd(idle_fd)
        rings = SessionRings.from_fds(list(spec["fds"]))
        renderer = ShmRenderer.from_rings(rings, settings=settings, idle=idle)
        try:
            await renderer.wait_ready(spec.get("ready_timeout", 60.0))
            yield AttachedRenderer(renderer, ring_depths=renderer.ring_depths)
        finally:
            await renderer.aclose()
        return
    raise ValueError(f"unknown renderer attach mode {mode!r}")
