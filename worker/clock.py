"""The media clock: one clock for audio and video.

The clock counts audio samples played out by the session.  It is anchored to
a monotonic instant ``t0`` when playout starts; the sample at position ``p``
is due at ``t0 + p / (sample_rate * speed)``.  The voice track sleeps until
the due time of each 20 ms frame (absolute deadlines, so scheduling delays
never accumulate), and the visual track shows, at its own absolute ticks, the
frame whose audio is being played at that position.  Audio and video read the
same counter, so they cannot drift apart whatever the inference jitter.

``speed`` > 1 runs the whole session faster than real time (offline renders
and tests); every deadline scales, nothing else changes.  An offline render
may also :meth:`pause` the clock while it waits for a slow renderer; both
tracks then wait, so they stay aligned.

Where video frames sit on that clock is :class:`FrameTiming` (from
:mod:`models.timing`, which the renderer process imports too): frame ``i``
starts at sample ``floor(i * sample_rate / fps)``, with ``fps`` exact
(29.97 is 30000/1001).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from fractions import Fraction

from models.timing import VIDEO_CLOCK_RATE, FrameTiming, exact_fps

__all__ = ["VIDEO_CLOCK_RATE", "FrameTiming", "MediaClock", "exact_fps"]


class MediaClock:
    def __init__(
        self,
        sample_rate: int,
        *,
        speed: float = 1.0,
        time_fn: Callable[[], float] = time.monotonic,
    ) -> None:
        if sample_rate <= 0 or speed <= 0:
            raise ValueError("sample_rate and speed must be positive")
        self.sample_rate = sample_rate
        self.speed = speed
        self._time = time_fn
        self.t0: float | None = None
        self._paused_at: float | None = None
        self._resumed = asyncio.Event()

    @property
    def started(self) -> bool:
        return self.t0 is not None

    def start(self) -> None:
        """Anchor position 0 to now (first call wins)."""
        if self.t0 is None:
            self.t0 = self._time()

    def time_of(self, position: int | Fraction) -> float:
        """Monotonic time at which sample ``position`` is due."""
        self.start()
        return self.t0 + float(position) / (self.sample_rate * self.speed)

    def position(self) -> int:
        """Samples due by now."""
        self.start()
        now = self._time() if self._paused_at is None else self._paused_at
        return int((now - self.t0) * self.sample_rate * self.speed)

    @property
    def paused(self) -> bool:
        return self._paused_at is not None

    def pause(self) -> None:
        """Stop the clock (offline renders waiting for a slow renderer)."""
        self.start()
        if self._paused_at is None:
            self._paused_at = self._time()
            self._resumed.clear()

    def resume(self) -> None:
        """Restart the clock; every position becomes due later by the pause."""
        if self._paused_at is not None:
            self.t0 += self._time() - self._paused_at
            self._paused_at = None
            self._resumed.set()

    async def sleep_until(self, position: int | Fraction) -> None:
        while True:
            if self._paused_at is not None:
                await self._resumed.wait()
            delay = self.time_of(position) - self._time()
            if delay <= 0:
                return
            await asyncio.sleep(delay)  # re-checked: the clock may pause meanwhile
