"""Clicks in the audio, markers in the video: A/V sync measured at a WebRTC receiver.

The agent sends speech-like audio with a loud 5 ms click at the start of every
``CLICK_EVERY``-th video frame; the pattern renderer lights a marker in each
frame whose audio holds a click.  At the receiver, each marker onset is matched
with its click on the RTP media timeline (the timestamps a receiver lip-syncs
by): the difference is the A/V offset.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

SR = 24_000
FPS = 25
SPF = SR // FPS
CLICK_EVERY = 7  # frames
VIDEO_RATE, AUDIO_RATE = 90_000, 48_000  # RTP clock rates of the received frames


def click_frames(seconds: float) -> range:
    """The video frames of a ``seconds`` long segment whose audio starts with a click."""
    return range(5, int(seconds * FPS) - 5, CLICK_EVERY)


def clicked_speech(seconds: float, seed: int = 3) -> tuple[np.ndarray, int]:
    """Quiet speech-like int16 audio at ``SR`` with its clicks; and how many clicks."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    audio = 2500 * np.sin(2 * np.pi * 150 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    audio = (audio + 300 * rng.standard_normal(n)).astype(np.int16)
    frames = click_frames(seconds)
    for frame in frames:
        audio[frame * SPF : frame * SPF + SR // 200] = 30_000
    return audio, len(frames)


def click_onsets(audio: Iterable[tuple[float, int, np.ndarray]]) -> list[tuple[float, float]]:
    """(media time, arrival time) of each click in received ``(arrival, pts, pcm)`` frames."""
    out: list[tuple[float, float]] = []
    for arrival, pts, pcm in audio:
        loud = np.flatnonzero(np.abs(pcm) > 15_000)
        if loud.size:
            t = (pts + loud[0]) / AUDIO_RATE
            if not out or t - out[-1][0] > 0.2:
                out.append((t, arrival + loud[0] / AUDIO_RATE))
    return out


def marker_onsets(video: Iterable[tuple[float, int, float]]) -> list[tuple[float, float]]:
    """(media time, arrival time) of each marker onset in ``(arrival, pts, level)`` frames."""
    out, lit = [], False
    for arrival, pts, level in video:
        if level > 128 and not lit:
            out.append((pts / VIDEO_RATE, arrival))
        lit = level > 128
    return out


def marker_level(frame) -> float:
    """The pattern renderer's marker in a decoded video frame (0-255)."""
    return float(frame.to_ndarray(format="gray")[4:28, 4:28].mean())
