"""Choosing and opening the renderer a session uses.

A :class:`RendererSpec` names a frame renderer by an importable factory and
its arguments, so the renderer process can build it after ``spawn`` (models
load once, in that process).  :func:`open_renderer` gives the session its
``AvatarRenderer``: the renderer process behind shared-memory rings by
default, or the same frame renderer in this process for debugging.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from renderers.factory import load_factory

from .types import AvatarRenderer, AvatarSettings

FACTORIES = {
    "lipsync": "renderers.lipsync:build",
    "pattern": "renderers.pattern:PatternRenderer",
}


@dataclass
class RendererSpec:
    kind: str = "lipsync"
    weights: str = "builtin"
    avatar: str | None = None
    backend: str = "auto"
    device: str = "auto"
    in_process: bool = False
    max_batch: int = 8
    settings: AvatarSettings = field(default_factory=AvatarSettings)

    @property
    def factory(self) -> str:
        try:
            return FACTORIES[self.kind]
        except KeyError:
            raise ValueError(
                f"unknown renderer {self.kind!r}; choose one of {sorted(FACTORIES)}"
            ) from None

    def kwargs(self) -> dict[str, Any]:
        s = self.settings
        common = {
            "width": s.video_width,
            "height": s.video_height,
            "fps": s.video_fps,
            "sample_rate": s.audio_sample_rate,
            "max_batch": self.max_batch,
        }
        if self.kind == "pattern":
            return common
        return {
            **common,
            "weights": self.weights,
            "avatar": self.avatar,
            "backend": self.backend,
            "device": self.device,
        }


@contextlib.asynccontextmanager
async def open_renderer(spec: RendererSpec) -> AsyncIterator[AvatarRenderer]:
    if spec.in_process:
        from .inprocess_renderer import InProcessRenderer

        frame_renderer = load_factory(spec.factory)(**spec.kwargs())
        try:
            yield InProcessRenderer(frame_renderer)
        finally:
            frame_renderer.close()
        return
    from .shm_renderer import ShmRenderer

    renderer = await ShmRenderer.open(spec.factory, spec.kwargs(), settings=spec.settings)
    try:
        yield renderer
    finally:
        await renderer.aclose()
