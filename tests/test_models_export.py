"""Models, their ONNX export, the I/O contract and where weights come from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models import export, parametric, wav2lip
from models.audio_features import mel_windows
from models.contract import (
    FACE_SIZE,
    MASK_FROM_ROW,
    IOBinding,
    ModelContractError,
    bind_io,
    make_target,
    output_to_bgr,
)
from models.weights import (
    cache_dir,
    default_weights_path,
    reference_weights_path,
    resolve_weights,
)

MOUTH_ROWS = slice(62, 86)
MOUTH_COLS = slice(30, 66)


def face_crop() -> np.ndarray:
    """A plain synthetic face: skin, darker lips around row 71, some texture."""
    rng = np.random.default_rng(0)
    img = np.empty((FACE_SIZE, FACE_SIZE, 3), np.float32)
    img[:] = (150, 170, 210)
    img += rng.normal(0, 4, img.shape)
    img[64:71, 34:62] = (90, 90, 190)  # upper lip
    img[71:78, 35:61] = (95, 95, 200)  # lower lip
    img[30:36, 26:38] = img[30:36, 58:70] = (60, 40, 30)  # eyes
    return np.clip(img, 0, 255).astype(np.uint8)


def tone(seconds: float, level: float, sample_rate: int = 24000) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    x = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 15))
    return (level * x / np.abs(x).max()).astype(np.int16)


def run_onnx(path, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["output"], {"source": source, "target": target})[0]


@pytest.fixture(scope="session")
def reference_onnx(tmp_path_factory):
    """The reference network, built once per test session through the real cache path."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        path = reference_weights_path()  # exports and verifies on first use
    return cache, path


# ---------------------------------------------------------------- contract


def test_make_target_masks_the_lower_half():
    faces = np.stack([face_crop(), 255 - face_crop()])
    target = make_target(faces)
    assert target.shape == (2, 6, 96, 96) and target.dtype == np.float32
    assert np.all(target[:, :3, MASK_FROM_ROW:] == 0)
    np.testing.assert_allclose(target[:, :3, :MASK_FROM_ROW], target[:, 3:, :MASK_FROM_ROW])
    np.testing.assert_allclose(target[1, 3:].transpose(1, 2, 0) * 255, faces[1], atol=1e-3)
    assert make_target(faces[0]).shape == (1, 6, 96, 96)
    with pytest.raises(ValueError, match=r"\[B, 96, 96, 3\]"):
        make_target(np.zeros((96, 96)))


def test_output_to_bgr_round_trips():
    faces = np.stack([face_crop()] * 2)
    assert np.array_equal(output_to_bgr(make_target(faces)[:, 3:]), faces)


def test_bind_io_by_name_and_by_shape():
    standard = bind_io(
        [
            ("source", ["batch", 1, 80, 16], "tensor(float)"),
            ("target", [None, 6, 96, 96], "tensor(float)"),
        ],
        [("output", ["batch", 3, 96, 96], "tensor(float)")],
    )
    assert standard == IOBinding("source", "target", "output", None, "float32")
    renamed = bind_io(
        [("face", [1, 6, 96, 96], "tensor(float16)"), ("mel", [1, 1, 80, 16], "tensor(float16)")],
        [("pred", [1, 3, 96, 96], "tensor(float16)")],
    )
    assert renamed == IOBinding("mel", "face", "pred", 1, "float16")


@pytest.mark.parametrize(
    "inputs, outputs, words",
    [
        ([("source", [1, 1, 80, 16], "tensor(float)")], [], "has 1 inputs"),
        (
            [
                ("source", [1, 1, 80, 20], "tensor(float)"),
                ("target", [1, 6, 96, 96], "tensor(float)"),
            ],
            [("output", [1, 3, 96, 96], "tensor(float)")],
            "'source' has the wrong shape",
        ),
        (
            [("a", [1, 3, 256, 256], "tensor(float)"), ("b", [1, 6, 96, 96], "tensor(float)")],
            [("o", [1, 3, 96, 96], "tensor(float)")],
            "cannot tell which tensor is 'source'",
        ),
        (
            [
                ("source", [1, 1, 80, 16], "tensor(float)"),
                ("target", [1, 6, 96, 96], "tensor(float)"),
            ],
            [("output", [1, 3, 256, 256], "tensor(float)")],
            "no output",
        ),
        (
            [
                ("source", [1, 1, 80, 16], "tensor(int8)"),
                ("target", [1, 6, 96, 96], "tensor(int8)"),
            ],
            [("output", [1, 3, 96, 96], "tensor(int8)")],
            "float32",
        ),
    ],
)
def test_bind_io_explains_misfits(inputs, outputs, words):
    with pytest.raises(ModelContractError, match=words) as err:
        bind_io(inputs, outputs)
    assert "Expected inputs/output: source [batch, 1, 80, 16]" in str(err.value)
    assert "Found:" in str(err.value)


# ---------------------------------------------------------------- the built-in model


def test_shipped_builtin_file_is_small_valid_and_current(tmp_path):
    path = default_weights_path()
    assert path.is_file() and path.stat().st_size < 200_000
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    binding = bind_io(session.get_inputs(), session.get_outputs())
    assert binding == IOBinding("source", "target", "output", None, "float32")
    # It is what the current code exports (regenerate with `python -m models.export builtin`).
    fresh, diff = export.export_kind("builtin", tmp_path / "fresh.onnx")
    assert diff < 1e-4
    source, target = export.example_inputs(3, seed=7)
    np.testing.assert_allclose(
        run_onnx(path, source.numpy(), target.numpy()),
        run_onnx(fresh, source.numpy(), target.numpy()),
        atol=1e-6,
    )


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_builtin_onnx_matches_torch_at_any_batch(batch):
    model = parametric.build()
    source, target = export.example_inputs(batch, seed=batch)
    got = run_onnx(default_weights_path(), source.numpy(), target.numpy())
    with torch.no_grad():
        expected = model(source, target).numpy()
    assert got.shape == (batch, 3, 96, 96)
    assert np.abs(got - expected).max() < 1e-4


def mouth_change(source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample mean |output - reference| over the mouth box, via the shipped ONNX file."""
    target = make_target(np.stack([face_crop()] * len(source)))
    out = run_onnx(default_weights_path(), source, target)
    diff = np.abs(out - target[:, 3:])
    return diff[:, :, MOUTH_ROWS, MOUTH_COLS].mean(axis=(1, 2, 3)), diff


def test_silence_keeps_the_mouth_closed():
    source = mel_windows(np.zeros(24000, np.int16), 24000, 25)
    _, diff = mouth_change(source)
    assert np.all(source == -4.0)
    assert diff.max() < 1e-4  # output is the reference, everywhere


def test_loud_audio_opens_the_mouth_and_louder_opens_wider():
    levels = [300, 1500, 6000, 20000]
    source = np.concatenate([mel_windows(tone(0.2, lvl), 24000, 25)[2:3] for lvl in levels])
    change, diff = mouth_change(source)
    assert change[-1] > 0.05
    assert np.all(np.diff(change) > 0)
    # The dark inner mouth appears between the lips; nothing above the nose moves.
    out = run_onnx(default_weights_path(), source, make_target(np.stack([face_crop()] * 4)))
    assert out[-1, :, 71:76, 44:52].mean() < 0.3 < out[0, :, 71:76, 44:52].mean()
    assert diff[:, :, :45].max() < 1e-5


def test_spectral_balance_shapes_the_mouth():
    model = parametric.build()
    low = torch.full((1, 1, 80, 16), -1.0)
    low[:, :, 40:] = -3.0
    high = torch.full((1, 1, 80, 16), -1.0)
    high[:, :, :40] = -3.0
    (_, spread_low), (_, spread_high) = model.mouth_shape(low), model.mouth_shape(high)
    assert spread_low.item() < 0 < spread_high.item()


def test_mouth_position_is_a_parameter():
    model = parametric.ParametricLipSync(mouth_center=(48.0, 40.0)).eval()
    target = torch.from_numpy(make_target(face_crop()))
    with torch.no_grad():
        out = model(torch.full((1, 1, 80, 16), -0.5), target)
    rows = (out - target[:, 3:]).abs().mean(dim=(0, 1, 3))
    assert 38 <= int(rows.argmax()) <= 50


# ---------------------------------------------------------------- the reference network


def test_reference_network_has_wav2lip_size():
    model = wav2lip.build()
    assert wav2lip.parameter_count(model) == 36_298_035
    with torch.no_grad():
        out = model(*export.example_inputs(2))
    assert out.shape == (2, 3, 96, 96) and out.min() >= 0 and out.max() <= 1
    reseeded = wav2lip.build(0)
    first = next(iter(reseeded.parameters()))
    assert torch.equal(first, next(iter(model.parameters())))


@pytest.mark.slow
def test_reference_onnx_matches_torch_with_dynamic_batch(reference_onnx):
    cache, path = reference_onnx
    assert path == cache / "avatar-server" / "wav2lip96_reference.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert bind_io(session.get_inputs(), session.get_outputs()).batch is None
    assert export.verify_onnx(path, wav2lip.build(), batch_sizes=(1, 3)) < 1e-4


@pytest.mark.slow
def test_reference_is_built_once(reference_onnx, monkeypatch):
    cache, path = reference_onnx
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    before = path.stat().st_mtime_ns
    assert resolve_weights("reference") == path
    assert path.stat().st_mtime_ns == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left


# ---------------------------------------------------------------- weights


def test_cache_dir_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "avatar-server"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_dir() == Path.home() / ".cache" / "avatar-server"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    missing = reference_weights_path(build=False)
    assert missing == tmp_path / "avatar-server" / "wav2lip96_reference.onnx"
    assert not missing.exists()


def test_resolve_weights(tmp_path):
    assert resolve_weights("builtin") == default_weights_path()
    mine = tmp_path / "mine.onnx"
    mine.write_bytes(b"x")
    assert resolve_weights(str(mine)) == mine
    with pytest.raises(FileNotFoundError, match="'builtin', 'reference' or the path"):
        resolve_weights(str(tmp_path / "nope.onnx"))


def test_export_cli_writes_a_checked_file(tmp_path, capsys):
    out = tmp_path / "sub" / "p.onnx"
    assert export.main(["builtin", "--out", str(out), "--opset", "17"]) == 0
    assert out.is_file()
    assert "onnxruntime vs torch" in capsys.readouterr().out
    assert onnx.load(str(out)).opset_import[0].version == 17
    with pytest.raises(ValueError, match="unknown model"):
        export.build_model("nope")
