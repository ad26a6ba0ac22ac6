"""``LipSyncRenderer``: lip sync from audio, composition, batching, weight swaps."""

from __future__ import annotations

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from models import weights
from models.audio_features import MelStream
from renderers.avatar import default_avatar
from renderers.base import RenderJob
from renderers.compose import FrameComposer, TorchFrameComposer, bgr_to_i420, i420_planes
from renderers.framing import FrameSpan
from renderers.lipsync import LipSyncRenderer, build
from renderers.validation import WeightsError

SR = 24_000
FPS = 25
DARK = 40  # luma below this inside the mouth box is the open mouth's cavity


@pytest.fixture(scope="module")
def renderer():
    r = LipSyncRenderer("builtin", None, backend="onnx", device="cpu", fps=FPS, sample_rate=SR)
    yield r
    r.close()


def scaled_face_model(path, gain: float, batch: int | str = "batch"):
    """An ONNX file whose output is the reference face times ``gain``."""
    inputs = [
        helper.make_tensor_value_info("source", TensorProto.FLOAT, [batch, 1, 80, 16]),
        helper.make_tensor_value_info("target", TensorProto.FLOAT, [batch, 6, 96, 96]),
    ]
    init = [
        numpy_helper.from_array(np.array([3], np.int64), "starts"),
        numpy_helper.from_array(np.array([6], np.int64), "ends"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(np.array(gain, np.float32), "gain"),
    ]
    nodes = [
        helper.make_node("Slice", ["target", "starts", "ends", "axes"], ["face"]),
        helper.make_node("Mul", ["face", "gain"], ["output"]),
    ]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 3, 96, 96])]
    model = helper.make_model(
        helper.make_graph(nodes, "scaled", inputs, outputs, init),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def speech_like(seed: int = 0) -> np.ndarray:
    """Syllables (harmonic tone bursts under a raised-cosine envelope) in groups, with silences."""
    rng = np.random.default_rng(seed)
    parts = [np.zeros(SR // 2)]
    for _group in range(3):
        for _syllable in range(int(rng.integers(4, 7))):
            duration = rng.uniform(0.12, 0.3)
            t = np.arange(int(duration * SR)) / SR
            f0 = rng.uniform(110, 170)
            tone = sum(
                np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6))
                * np.exp(-(((k * f0 - 700) / 600) ** 2))
                for k in range(1, 25)
            )
            envelope = np.sin(np.pi * t / duration) ** 2
            parts.append(envelope * tone / np.abs(tone).max() * rng.uniform(0.6, 1.0))
            parts.append(np.zeros(int(rng.uniform(0.04, 0.15) * SR)))
        parts.append(np.zeros(int(0.6 * SR)))
    return (np.concatenate(parts) * 10_000).astype(np.int16)


def render_all(renderer: LipSyncRenderer, pcm: np.ndarray, batch: int = 8):
    stream = renderer.open_stream()
    jobs = stream.push(pcm) + stream.end_segment()
    frames: list[np.ndarray] = []
    for i in range(0, len(jobs), batch):
        frames += renderer.render(jobs[i : i + batch])
    return jobs, frames


def mouth_luma(renderer: LipSyncRenderer, frame: np.ndarray, frame_index: int) -> np.ndarray:
    """The Y plane inside the mouth box (crop rows 60-88, columns 28-68) of the base frame."""
    x0, y0, x1, _ = renderer.avatar.boxes[renderer.avatar.base_index(frame_index)]
    scale = (x1 - x0) / 96
    luma = frame[: renderer.height]
    return luma[
        int(y0 + 60 * scale) : int(y0 + 88 * scale), int(x0 + 28 * scale) : int(x0 + 68 * scale)
    ]


def job(index: int, features=None) -> RenderJob:
    return RenderJob(FrameSpan(index, index * 960, np.zeros(960, np.int16), False), features)


# ---------------------------------------------------------------- lip sync


def test_the_mouth_follows_the_audio_and_closes_in_silence(renderer):
    pcm = speech_like()
    jobs, frames = render_all(renderer, pcm)
    assert len(frames) == len(jobs) == -(-len(pcm) // (SR // FPS))
    envelope = np.array([np.sqrt(np.mean(j.span.audio.astype(float) ** 2)) for j in jobs])
    opening = np.array(
        [
            (mouth_luma(renderer, f, j.span.index) < DARK).sum()
            for f, j in zip(frames, jobs, strict=True)
        ],
        dtype=float,
    )
    assert opening.max() > 100  # the mouth does open

    def r_at(lag: int) -> float:
        a = envelope[max(0, -lag) : len(envelope) - max(0, lag)]
        b = opening[max(0, lag) : len(opening) - max(0, -lag)]
        return float(np.corrcoef(a, b)[0, 1])

    correlations = {lag: r_at(lag) for lag in range(-3, 4)}
    best = max(correlations, key=correlations.get)
    assert correlations[best] >= 0.6, correlations
    assert abs(best) <= 1, correlations

    # Closed in silence: frames with no audio from 50 ms before to 250 ms after their start.
    quiet = [
        i
        for i, j in enumerate(jobs)
        if not np.any(pcm[max(0, j.span.pts - SR // 20) : j.span.pts + SR // 4])
    ]
    assert len(quiet) > 20
    assert opening[quiet].max() == 0


def test_speech_frames_keep_the_base_frame_outside_the_box(renderer):
    jobs, frames = render_all(renderer, speech_like(seed=1)[: SR * 2])
    k = renderer.avatar.base_index(jobs[20].span.index)
    x0, y0, x1, y1 = renderer.avatar.boxes[k]
    for plane, base_plane, step in zip(
        i420_planes(frames[20]), i420_planes(renderer.avatar.i420[k]), (1, 2, 2), strict=True
    ):
        outside = np.ones(plane.shape, bool)
        outside[y0 // step : y1 // step, x0 // step : x1 // step] = False
        assert np.array_equal(plane[outside], base_plane[outside])
    assert not np.array_equal(frames[20], renderer.avatar.i420[k])


def test_stream_lookahead_and_features(renderer):
    stream = renderer.open_stream()
    assert stream.lookahead == MelStream(SR).lookahead == stream.framer.lookahead
    jobs = stream.push(speech_like()[:SR])
    assert jobs and all(j.features.shape == (1, 80, 16) for j in jobs)
    # a frame waits for ~200 ms of audio past its start
    assert len(jobs) == len([i for i in range(FPS) if i * (SR // FPS) + stream.lookahead < SR])


def test_idle_frames_cost_no_inference(renderer, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("idle frames must not run the model")

    monkeypatch.setattr(renderer.backend, "run", forbidden)
    idle = renderer.idle_frames()
    assert len(idle) == len(renderer.avatar.loop)
    assert all(f.shape == (768, 512) and f.dtype == np.uint8 for f in idle)


def test_jobs_without_features_are_refused(renderer):
    with pytest.raises(ValueError, match="open_stream"):
        renderer.render([job(0)])
    assert renderer.render([]) == []


def test_factory_takes_the_renderer_spec_arguments():
    from worker.renderer_factory import RendererSpec

    spec = RendererSpec(device="cpu")
    r = build(**(spec.kwargs() | {"width": 320, "height": 240}))
    try:
        assert (r.width, r.height, r.fps, r.sample_rate) == (320, 240, 25.0, SR)
        assert r.idle_frames()[0].shape == (360, 320)
    finally:
        r.close()


# ---------------------------------------------------------------- batching


def test_a_fixed_batch_1_file_renders_a_batch_of_3(tmp_path):
    path = scaled_face_model(tmp_path / "b1.onnx", 0.5, batch=1)
    r = LipSyncRenderer(path, backend="onnx", device="cpu", max_batch=4)
    try:
        assert r.backend.max_batch == 1 and r.max_batch == 4
        stream = r.open_stream()
        jobs = stream.push(speech_like()[:SR])[:3]
        together = r.render(jobs)
        one_by_one = [r.render([j])[0] for j in jobs]
        assert len(together) == 3
        for a, b in zip(together, one_by_one, strict=True):
            assert np.array_equal(a, b)
    finally:
        r.close()


# ---------------------------------------------------------------- hot swap


def test_swap_weights_takes_effect_on_the_next_frame(tmp_path):
    r = LipSyncRenderer("builtin", backend="onnx", device="cpu")
    try:
        jobs = r.open_stream().push(speech_like()[:SR])[:2]
        before = r.render(jobs)
        r.swap_weights(scaled_face_model(tmp_path / "dark.onnx", 0.3))
        after = r.render(jobs)
        for a, b, j in zip(before, after, jobs, strict=True):
            assert (
                mouth_luma(r, b, j.span.index).mean() < mouth_luma(r, a, j.span.index).mean() - 20
            )
        r.swap_weights("builtin")
        assert all(np.array_equal(a, b) for a, b in zip(before, r.render(jobs), strict=True))
    finally:
        r.close()


@pytest.mark.parametrize("bad", ["truncated", "text", "missing", "wrong_shape"])
def test_a_bad_file_keeps_the_old_weights(tmp_path, bad):
    path = tmp_path / "bad.onnx"
    if bad == "truncated":
        path.write_bytes(weights.default_weights_path().read_bytes()[:5000])
    elif bad == "text":
        path.write_text("not weights\n")
    elif bad == "wrong_shape":
        scaled_face_model(path, 0.5)
        model = onnx.load(str(path))
        model.graph.input[1].type.tensor_type.shape.dim[2].dim_value = 128
        onnx.save(model, str(path))
    r = LipSyncRenderer("builtin", backend="onnx", device="cpu")
    try:
        jobs = r.open_stream().push(speech_like()[:SR])[:2]
        before, backend = r.render(jobs), r.backend
        with pytest.raises(WeightsError):
            r.swap_weights(path)
        assert r.backend is backend
        assert all(np.array_equal(a, b) for a, b in zip(before, r.render(jobs), strict=True))
    finally:
        r.close()


# ---------------------------------------------------------------- composition


def test_compose_numpy_and_torch_agree():
    avatar = default_avatar()
    rng = np.random.default_rng(3)
    faces = rng.uniform(0, 1, (3, 3, 96, 96)).astype(np.float32)
    bases = [0, 24, 61]
    numpy_composer, torch_composer = FrameComposer(avatar), TorchFrameComposer(avatar, "cpu")
    for base, face in zip(bases, faces, strict=True):
        a = numpy_composer.paste(base, face)
        b = torch_composer.paste(base, torch.from_numpy(face)).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(a, b, atol=0.02)
    a = np.stack(numpy_composer.compose(bases, faces))
    b = np.stack(torch_composer.compose(bases, torch.from_numpy(faces)))
    difference = np.abs(a.astype(int) - b.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    assert not np.array_equal(a[0], avatar.i420[0])  # the face was pasted


def test_i420_conversion_matches_opencv_luma_and_flat_chroma():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    ours, opencv = bgr_to_i420(image), cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420)
    luma_difference = np.abs(ours[:64].astype(int) - opencv[:64])
    assert luma_difference.max() <= 1 and (luma_difference > 0).mean() < 0.05  # rounding only
    flat = np.empty((16, 16, 3), np.uint8)
    flat[:] = (30, 160, 220)
    assert (
        np.abs(bgr_to_i420(flat).astype(int) - cv2.cvtColor(flat, cv2.COLOR_BGR2YUV_I420)).max()
        <= 1
    )
    with pytest.raises(ValueError, match="even"):
        bgr_to_i420(image[:63])


def test_the_tensor_composition_path_renders_the_same_frames(renderer):
    """The path a GPU backend takes (model output as a tensor, torch compose), run on the CPU."""
    tensor_renderer = LipSyncRenderer("builtin", backend="onnx", device="cpu", composer="torch")
    try:
        pcm = speech_like(seed=2)[:SR]
        _, expected = render_all(renderer, pcm, batch=4)
        _, frames = render_all(tensor_renderer, pcm, batch=4)
        difference = np.abs(np.stack(frames).astype(int) - np.stack(expected))
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    finally:
        tensor_renderer.close()


def test_importing_the_renderer_side_loads_no_engine():
    """torch and onnxruntime load only when a backend is built (never for ``prepare``)."""
    import subprocess
    import sys

    code = (
        "import sys, renderers.lipsync, renderers.prepare, renderers.backends;"
        "print(sorted({'torch', 'onnxruntime'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
