"""A renderer whose per-frame time jitters like a GPU shared with other work.

:class:`JitteryRenderer` draws the :class:`~renderers.pattern.PatternRenderer`
picture and then waits, so that each frame takes a time drawn from a seeded
distribution::

    P = 1 - spike_rate : uniform(low_ms, high_ms)     (default 10-30 ms)
    P = spike_rate     : spike_ms                     (default 120 ms)

The default mean, 0.95 * 20 + 0.05 * 120 = 25 ms, is under the 40 ms budget of
25 fps, so a design that absorbs spikes keeps up, and one that does not
falls behind at every spike.  The time is per frame (a batch takes the sum),
so batching gains nothing and only delays a batch's first frame: it renders
one frame per call by default (``max_batch=1``), as the reference design
does.  The same seed gives the same frame times, so two designs compared in
one run face the same spikes.  Built by name
(``scripts.bench.jittery:build``) in the renderer process.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import numpy as np

from renderers.base import RenderJob
from renderers.pattern import PatternRenderer


class JitteryRenderer(PatternRenderer):
    def __init__(
        self,
        width: int = 512,
        height: int = 512,
        fps: float = 25.0,
        sample_rate: int = 24_000,
        *,
        max_batch: int = 1,
        seed: int = 0,
        low_ms: float = 10.0,
        high_ms: float = 30.0,
        spike_ms: float = 120.0,
        spike_rate: float = 0.05,
    ) -> None:
        super().__init__(width, height, fps, sample_rate, max_batch=max_batch)
        if not 0 <= low_ms <= high_ms or spike_ms < 0 or not 0 <= spike_rate <= 1:
            raise ValueError("need 0 <= low_ms <= high_ms, spike_ms >= 0, 0 <= spike_rate <= 1")
        self._rng = random.Random(seed)
        self.low_ms, self.high_ms = low_ms, high_ms
        self.spike_ms, self.spike_rate = spike_ms, spike_rate

    @property
    def mean_ms(self) -> float:
        """Expected time per frame."""
        spread = (self.low_ms + self.high_ms) / 2
        return (1 - self.spike_rate) * spread + self.spike_rate * self.spike_ms

    def draw_ms(self) -> float:
        """The next frame's time, in milliseconds."""
        if self._rng.random() < self.spike_rate:
            return self.spike_ms
        return self._rng.uniform(self.low_ms, self.high_ms)

    def render(self, jobs: Sequence[RenderJob]) -> list[np.ndarray]:
        start = time.perf_counter()
        budget = sum(self.draw_ms() for _ in jobs) / 1000.0
        frames = super().render(jobs)
        remaining = budget - (time.perf_counter() - start)
        if remaining > 0:
            time.sleep(remaining)
        return frames


def build(**kwargs) -> JitteryRenderer:
    """The factory the renderer process calls."""
    return JitteryRenderer(**kwargs)
