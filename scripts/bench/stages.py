"""Section ``stages``: where a speech frame's time goes in the renderer process.

Each stage is timed on its own over the same frames, per frame:

    features    audio framing + streaming mel window (models.audio_features.MelStream)
    inference   the model, at the largest batch asked for that the weights allow, / batch
    compose     the face crop resized and blended into the base frame
    colour      the blended region converted to I420 over the base frame's I420
    ring_copy   the finished frame and its audio copied into a frame ring slot

On CUDA, composition and colour conversion run on the GPU (as the renderer
does there) and each stage's timing ends with a device synchronisation.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from renderers.framing import AudioFramer

from .common import BenchConfig, Progress, median
from .model import example_batch, open_chosen_backend, seconds_per_call, synchronizer
from .trace import speech_signal

FRAMES = 50  # frames per timed pass of the per-frame stages
PASSES = 5  # median of this many passes


def _median_per_frame(step, frames: int, sync=lambda: None) -> float:
    """Median over passes of (time of ``step(i)`` for every frame i) / frames, in ms."""
    step(0)  # warm-up
    sync()
    passes = []
    for _ in range(PASSES):
        start = time.perf_counter()
        for i in range(frames):
            step(i)
        sync()
        passes.append((time.perf_counter() - start) / frames)
    return 1000.0 * median(passes)


def features_ms(config: BenchConfig) -> float:
    """Framing + mel windows for 40 ms chunks of speech, per video frame."""
    from models.audio_features import MelStream

    pcm = speech_signal(2.0, config.sample_rate, config.seed)
    chunk = config.sample_rate // 25
    passes = []
    for _ in range(PASSES):
        mel = MelStream(config.sample_rate)
        framer = AudioFramer(config.sample_rate, config.fps, lookahead=mel.lookahead)
        frames = 0
        start = time.perf_counter()
        for offset in range(0, len(pcm), chunk):
            part = pcm[offset : offset + chunk]
            mel.push(part)
            for span in framer.push(part):
                mel.window(span.pts)
                frames += 1
        passes.append((time.perf_counter() - start) / max(1, frames))
    return 1000.0 * median(passes)


def _composer(config: BenchConfig, device: str):
    from renderers.avatar import default_avatar

    avatar = default_avatar(config.width, config.height, config.fps)
    if device.startswith("cuda"):
        from renderers.compose import TorchFrameComposer

        return avatar, TorchFrameComposer(avatar, device)
    from renderers.compose import FrameComposer

    return avatar, FrameComposer(avatar)


def compose_stages(config: BenchConfig, device: str, faces: np.ndarray) -> dict[str, float]:
    """compose, colour and ring_copy per frame, on ``faces`` ([B, 3, 96, 96] in 0-1)."""
    from renderers.frame_ring import FrameRing

    avatar, composer = _composer(config, device)
    sync = synchronizer(device)
    if device.startswith("cuda"):
        import torch

        faces = torch.from_numpy(faces).to(device)
    bases = [avatar.base_index(i) for i in range(FRAMES)]
    faces_for = [faces[i % len(faces)] for i in range(FRAMES)]
    regions = [composer.paste(bases[i], faces_for[i]) for i in range(FRAMES)]
    compose = _median_per_frame(lambda i: composer.paste(bases[i], faces_for[i]), FRAMES, sync)
    colour = _median_per_frame(lambda i: composer.to_i420(bases[i], regions[i]), FRAMES, sync)
    frame = composer.to_i420(bases[0], regions[0])
    frame = frame.cpu().numpy() if hasattr(frame, "cpu") else frame
    audio = speech_signal(1 / config.fps, config.sample_rate)
    ring = FrameRing.create(
        width=config.width,
        height=config.height,
        fps=config.fps,
        sample_rate=config.sample_rate,
        slots=4,
    )
    try:

        def copy(i: int) -> None:
            ring.write(frame, audio, epoch=0, pts=i, flags=1)
            ring.release()

        ring_copy = _median_per_frame(copy, FRAMES)
    finally:
        ring.close()
    return {"compose": compose, "colour": colour, "ring_copy": ring_copy}


def run(config: BenchConfig, progress: Progress, artifacts: dict[str, Any]) -> dict[str, Any]:
    backend = open_chosen_backend(config)
    try:
        batch = max((b for b in config.batches if b <= backend.max_batch), default=1)
        device = str(backend.device)
        artifacts["backend"] = {"name": backend.name, "device": device}
        progress("stages", f"features, {backend.name} batch {batch}, compose, colour, ring copy")
        ms: dict[str, float] = {"features": features_ms(config)}
        ms["inference"] = 1000.0 * seconds_per_call(backend, batch) / batch
        faces = backend.run(*example_batch(batch))
    finally:
        backend.close()
    ms.update(compose_stages(config, device, faces))
    total = sum(ms.values())
    return {
        "backend": backend.name,
        "device": device,
        "batch": batch,
        "resolution": f"{config.width}x{config.height}",
        "ms_per_frame": {k: round(v, 3) for k, v in ms.items()},
        "total_ms": round(total, 3),
        "fps_bound": round(1000.0 / total, 1) if total else None,
    }
