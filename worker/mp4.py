"""Writing what the avatar's tracks publish to an MP4 file (H.264 + AAC).

Video pts are on the audio sample clock (``time_base = 1/sample_rate``), so
the file keeps exactly the A/V alignment the room would receive.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .clock import exact_fps


class Mp4Writer:
    def __init__(
        self,
        path: str | Path,
        *,
        width: int,
        height: int,
        fps: float,
        sample_rate: int,
        channels: int = 1,
        crf: int = 23,
        preset: str = "veryfast",
    ) -> None:
        self.path = Path(path)
        self.sample_rate = sample_rate
        self._layout = "mono" if channels == 1 else "stereo"
        self._container = av.open(str(self.path), mode="w")
        self._video = self._container.add_stream("libx264", rate=exact_fps(fps))
        self._video.width, self._video.height = width, height
        self._video.pix_fmt = "yuv420p"
        self._video.time_base = Fraction(1, sample_rate)
        self._video.codec_context.time_base = Fraction(1, sample_rate)
        self._video.options = {"crf": str(crf), "preset": preset}
        self._audio = self._container.add_stream("aac", rate=sample_rate, layout=self._layout)
        self._last_video_pts = -1
        self.video_frames = 0
        self.audio_samples = 0

    def write_video(self, frame: av.VideoFrame, pts: int) -> None:
        """``pts`` in audio samples from the start of the file; must increase."""
        if pts <= self._last_video_pts:
            return
        out = av.VideoFrame.from_ndarray(frame.to_ndarray(format="yuv420p"), format="yuv420p")
        out.pts = pts
        out.time_base = Fraction(1, self.sample_rate)
        self._last_video_pts = pts
        self._container.mux(self._video.encode(out))
        self.video_frames += 1

    def write_audio(self, pcm: np.ndarray) -> None:
        """Append int16 samples (interleaved when stereo)."""
        if not pcm.size:
            return
        frame = av.AudioFrame.from_ndarray(
            pcm.reshape(1, -1).astype(np.int16, copy=False), format="s16", layout=self._layout
        )
        frame.sample_rate = self.sample_rate
        frame.pts = self.audio_samples
        frame.time_base = Fraction(1, self.sample_rate)
        self.audio_samples += frame.samples
        self._container.mux(self._audio.encode(frame))

    def close(self) -> None:
        self._container.mux(self._video.encode(None))
        self._container.mux(self._audio.encode(None))
        self._container.close()
