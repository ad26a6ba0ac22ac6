"""The media clock: one clock for audio and video.

The clock counts audio samples played out by the session.  It is anchored to
a monotonic instant ``t0`` when playout starts; the sample at position ``p``
is due at ``t0 + p / (sample_rate * speed)``.  The voice track sleeps until
the due time of each 20 ms frame (absolute deadlines, so scheduling delays
never accumulate), and the visual track shows, at its own absolute ticks, the
frame whose audio is being played at that position.  Audio and video read the
same counter, so they cannot drift apart whatever the inference jitter.

``speed`` > 1 runs the whole session faster than real time (offline renders
and tests); every deadline scales, nothing else changes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from fractions import Fraction


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
        return int((self._time() - self.t0) * self.sample_rate * self.speed)

    async def sleep_until(self, position: int | Fraction) -> None:
        delay = self.time_of(position) - self._time()
        if delay > 0:
            await asyncio.sleep(delay)
