"""Frame timing: where video frames sit on the audio sample axis.

One rule, written once, for every process: frame ``i`` of a stream starts at
sample ``floor(i * sample_rate / fps)`` and plays the samples up to the start
of frame ``i + 1``; its RTP timestamp (90 kHz) is ``floor(i * 90000 / fps)``.
All arithmetic is on integers with ``fps`` as an exact fraction, so no sample
is lost or duplicated and nothing drifts, however long the stream runs.

``fps`` given as a float is read as the rate it names: the NTSC rates
(23.976, 29.97, 59.94, ...) are ``N * 1000 / 1001`` (29.97 is 30000/1001),
anything else is the nearest fraction with a denominator up to 1001
(12.5 is 25/2).  A :class:`~fractions.Fraction` is taken as it is.

This module imports nothing heavy: the session process and the renderer
process both use it (``worker.clock`` re-exports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

VIDEO_CLOCK_RATE = 90_000  # RTP clock of video, ticks per second

# Relative: 29.97 is 1e-6 from 30000/1001; an integer N is 1/1001 from N * 1000/1001.
_NTSC_TOLERANCE = 1e-4


def exact_fps(fps: float | Fraction | int) -> Fraction:
    """The exact frame rate ``fps`` names (29.97 -> 30000/1001, 25 -> 25)."""
    if isinstance(fps, Fraction):
        exact = fps
    else:
        value = float(fps)
        ntsc = Fraction(round(value * 1001 / 1000) * 1000, 1001)
        if ntsc.denominator == 1001 and abs(value - float(ntsc)) < _NTSC_TOLERANCE * value:
            exact = ntsc
        else:
            exact = Fraction(value).limit_denominator(1001)
    if exact <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return exact


@dataclass(frozen=True, slots=True)
class FrameTiming:
    """Video frames at ``fps`` on an audio stream of ``sample_rate`` Hz.

    ``FrameTiming(29.97, 24000).fps == Fraction(30000, 1001)``.
    """

    fps: Fraction
    sample_rate: int

    def __init__(self, fps: float | Fraction | int, sample_rate: int) -> None:
        if int(sample_rate) != sample_rate or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer, got {sample_rate}")
        object.__setattr__(self, "fps", exact_fps(fps))
        object.__setattr__(self, "sample_rate", int(sample_rate))

    @property
    def _num(self) -> int:  # samples per frame = _num / _den
        return self.sample_rate * self.fps.denominator

    @property
    def _den(self) -> int:
        return self.fps.numerator

    @property
    def samples_per_frame(self) -> Fraction:
        """Exact (fractional) number of samples per frame."""
        return Fraction(self._num, self._den)

    @property
    def max_samples(self) -> int:
        """The most samples any one frame plays."""
        return -(-self._num // self._den)

    @property
    def interval(self) -> float:
        """Seconds between frames."""
        return float(1 / self.fps)

    def position(self, index: int) -> Fraction:
        """Exact sample position of frame ``index``'s tick (not rounded)."""
        return Fraction(index * self._num, self._den)

    def start(self, index: int) -> int:
        """First sample of frame ``index``: ``floor(index * sample_rate / fps)``."""
        return index * self._num // self._den

    def end(self, index: int) -> int:
        """One past the last sample of frame ``index`` (the start of the next)."""
        return self.start(index + 1)

    def samples(self, index: int) -> int:
        """Number of samples frame ``index`` plays."""
        return self.start(index + 1) - self.start(index)

    def frame_at(self, position: int) -> int:
        """The frame whose samples include ``position`` (the last frame started by then)."""
        return ((position + 1) * self._den - 1) // self._num

    def frames_in(self, n_samples: int) -> int:
        """Frames needed to cover ``n_samples`` samples (the last may be short)."""
        return -(-n_samples * self._den // self._num)

    def pts(self, index: int, rate: int = VIDEO_CLOCK_RATE) -> int:
        """Timestamp of frame ``index`` in a ``rate`` Hz clock (RTP video: 90 kHz)."""
        return index * rate * self.fps.denominator // self.fps.numerator

    def frame_of_pts(self, pts: int, rate: int = VIDEO_CLOCK_RATE) -> int:
        """The frame index whose :meth:`pts` is ``pts`` (inverse, for ``rate >= fps``)."""
        return -(-pts * self.fps.numerator // (rate * self.fps.denominator))
