"""Model backends: weights-file validation, batching, engine choice.

Small ONNX graphs are written with ``onnx.helper`` so every malformed case is
exact: the "toy" model outputs ``target[:, 3:6] * (0.5 + 0.1 * mean(source))``,
so each frame's output depends on its own inputs and can be checked by hand.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import weights
from models.contract import make_target
from renderers.backends import BackendUnavailable, check_inputs, select_backend, torch_cuda
from renderers.backends.onnx_backend import OnnxBackend
from renderers.validation import WeightsError, read_binding

B = "batch"


def toy_model(
    path,
    *,
    names=("source", "target", "output"),
    batch=B,
    source_shape=(1, 80, 16),
    target_shape=(6, 96, 96),
    output_shape=(3, 96, 96),
    dtype=TensorProto.FLOAT,
    reshape_batch_to: int | None = None,
    extra_input: bool = False,
):
    """Write the toy model with the given declared interface; returns ``path``."""
    src, tgt, out = names
    inputs = [
        helper.make_tensor_value_info(src, dtype, [batch, *source_shape]),
        helper.make_tensor_value_info(tgt, dtype, [batch, *target_shape]),
    ]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("extra", dtype, [batch, 1]))
    np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    init = [
        numpy_helper.from_array(np.array([3], np.int64), "starts"),
        numpy_helper.from_array(np.array([6], np.int64), "ends"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(np.array(0.1, np_dtype), "k"),
        numpy_helper.from_array(np.array(0.5, np_dtype), "c"),
    ]
    face = "face"
    nodes = []
    if reshape_batch_to is not None:  # internals that only work for one batch size
        init.append(
            numpy_helper.from_array(np.array([reshape_batch_to, 6, 96, 96], np.int64), "shp")
        )
        nodes.append(helper.make_node("Reshape", [tgt, "shp"], ["tgt_r"]))
        tgt = "tgt_r"
    nodes += [
        helper.make_node("Slice", [tgt, "starts", "ends", "axes"], [face]),
        helper.make_node("ReduceMean", [src], ["m"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Mul", ["m", "k"], ["mk"]),
        helper.make_node("Add", ["mk", "c"], ["gain"]),
        helper.make_node("Mul", [face, "gain"], [out]),
    ]
    outputs = [helper.make_tensor_value_info(out, dtype, [batch, *output_shape])]
    graph = helper.make_graph(nodes, "toy", inputs, outputs, init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def toy_expected(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    gain = 0.5 + 0.1 * source.mean(axis=(1, 2, 3), keepdims=True)
    return target[:, 3:6] * gain


def inputs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    source = rng.uniform(-4, 0, (n, 1, 80, 16)).astype(np.float32)
    target = make_target(rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8))
    return source, target


# ---------------------------------------------------------------- validation


def test_a_fitting_file_is_read(tmp_path):
    binding = read_binding(toy_model(tmp_path / "ok.onnx"))
    assert (binding.source, binding.target, binding.output) == ("source", "target", "output")
    assert binding.batch is None and binding.dtype == "float32"


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        read_binding(tmp_path / "nope.onnx")


def test_directory_and_empty_file(tmp_path):
    with pytest.raises(WeightsError, match="is a directory"):
        read_binding(tmp_path)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        read_binding(empty)


@pytest.mark.parametrize(
    ("content", "hint"),
    [
        (b"hello, this is not a model\n" * 10, "text file"),
        (b"\x89PNG\r\n\x1a\n" + bytes(200), "image"),
        (b"PK\x03\x04" + bytes(200), "PyTorch checkpoint"),
        (bytes(range(256)) * 4, ""),
    ],
)
def test_not_an_onnx_file(tmp_path, content, hint):
    path = tmp_path / "weights.onnx"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="not an ONNX model file") as info:
        read_binding(path)
    assert hint in str(info.value)


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.98])
def test_truncated_file(tmp_path, fraction):
    whole = weights.default_weights_path().read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(whole[: int(len(whole) * fraction)])
    with pytest.raises(WeightsError, match="truncated"):
        read_binding(path)
    with pytest.raises(WeightsError, match="truncated"):
        OnnxBackend(path)


def test_wrong_input_names_are_explained(tmp_path):
    # Names off-contract and shapes that cannot tell the inputs apart.
    path = toy_model(
        tmp_path / "names.onnx",
        names=("audio", "face", "output"),
        source_shape=("a", "b", "c"),
        target_shape=("a", "b", "c"),
    )
    with pytest.raises(WeightsError) as info:
        read_binding(path)
    message = str(info.value)
    assert "source [batch, 1, 80, 16]" in message  # expected
    assert "audio" in message and "face" in message  # found


def test_other_names_with_fitting_shapes_are_matched_by_shape(tmp_path):
    path = toy_model(tmp_path / "mel_face.onnx", names=("mel", "face_in", "pred"))
    binding = read_binding(path)
    assert (binding.source, binding.target, binding.output) == ("mel", "face_in", "pred")
    source, target = inputs(2)
    np.testing.assert_allclose(
        OnnxBackend(path).run(source, target), toy_expected(source, target), atol=1e-6
    )


def test_wrong_input_shape(tmp_path):
    path = toy_model(tmp_path / "shape.onnx", source_shape=(1, 80, 20))
    with pytest.raises(WeightsError, match="wrong shape") as info:
        read_binding(path)
    assert "source [batch, 1, 80, 20]" in str(info.value)


def test_wrong_output(tmp_path):
    path = toy_model(tmp_path / "out.onnx", output_shape=(3, 48, 48))
    with pytest.raises(WeightsError, match=r"no output has the shape \[batch, 3, 96, 96\]"):
        read_binding(path)


def test_three_inputs(tmp_path):
    with pytest.raises(WeightsError, match="3 inputs"):
        read_binding(toy_model(tmp_path / "three.onnx", extra_input=True))


def test_a_file_that_declares_the_contract_but_cannot_run_is_refused(tmp_path):
    path = toy_model(tmp_path / "broken.onnx", reshape_batch_to=3)  # fails at batch 1
    with pytest.raises(WeightsError, match="fails when run"):
        OnnxBackend(path)


def test_a_dynamic_file_that_only_runs_batch_1_is_used_one_frame_at_a_time(tmp_path):
    path = toy_model(tmp_path / "fake_dynamic.onnx", reshape_batch_to=1)
    backend = OnnxBackend(path, max_batch=8)
    assert backend.max_batch == 1
    source, target = inputs(3)
    np.testing.assert_allclose(backend.run(source, target), toy_expected(source, target), atol=1e-6)


# ---------------------------------------------------------------- batching


def test_fixed_batch_1_runs_any_number_of_frames_in_a_loop(tmp_path):
    backend = OnnxBackend(toy_model(tmp_path / "b1.onnx", batch=1), max_batch=8)
    assert backend.fixed_batch == 1 and backend.max_batch == 1
    source, target = inputs(3)
    out = backend.run(source, target)
    np.testing.assert_allclose(out, toy_expected(source, target), atol=1e-6)


def test_fixed_batch_2_pads_a_partial_batch(tmp_path):
    backend = OnnxBackend(toy_model(tmp_path / "b2.onnx", batch=2))
    assert backend.max_batch == 2
    source, target = inputs(3)
    np.testing.assert_allclose(backend.run(source, target), toy_expected(source, target), atol=1e-6)


def test_dynamic_batch_splits_at_max_batch(tmp_path):
    backend = OnnxBackend(toy_model(tmp_path / "dyn.onnx"), max_batch=2)
    source, target = inputs(5)
    np.testing.assert_allclose(backend.run(source, target), toy_expected(source, target), atol=1e-6)
    assert backend.run(source[:0], target[:0]).shape == (0, 3, 96, 96)


def test_float16_file_gets_cast_inputs(tmp_path):
    backend = OnnxBackend(toy_model(tmp_path / "half.onnx", dtype=TensorProto.FLOAT16))
    source, target = inputs(2)
    out = backend.run(source, target)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, toy_expected(source, target), atol=2e-3)


def test_inputs_of_the_wrong_shape_are_refused():
    source, target = inputs(2)
    with pytest.raises(ValueError, match="source"):
        check_inputs(source[:, :, :40], target)
    with pytest.raises(ValueError, match="frames"):
        check_inputs(source, target[:1])


# ---------------------------------------------------------------- engines and choice


def test_builtin_runs_the_same_on_both_engines():
    onnx_backend = select_backend("builtin", "onnx", "cpu")
    torch_backend = select_backend("builtin", "torch", "cpu")
    assert onnx_backend.name == "onnxruntime-cpu" and torch_backend.name == "torch-cpu"
    source, target = inputs(3)
    np.testing.assert_allclose(
        onnx_backend.run(source, target), torch_backend.run(source, target), atol=1e-4
    )
    tensor = torch_backend.run_tensor(source, target)
    np.testing.assert_allclose(tensor.numpy(), torch_backend.run(source, target), atol=1e-6)


def test_auto_on_cpu_picks_onnxruntime_and_says_why():
    backend = select_backend("builtin", device="cpu")
    assert backend.name == "onnxruntime-cpu" and backend.device == "cpu"
    assert "cpu" in backend.reason


def test_the_torch_backend_does_not_run_onnx_files(tmp_path):
    path = toy_model(tmp_path / "user.onnx")
    with pytest.raises(WeightsError, match="only the built-in networks"):
        select_backend(path, "torch")
    assert select_backend(path, "auto").name.startswith("onnxruntime")


def test_engine_options_go_to_the_engine_that_runs():
    backend = select_backend("builtin", "auto", "cpu", fp16=True, threads=1)  # onnx: no fp16
    assert backend.name == "onnxruntime-cpu"
    assert select_backend("builtin", "torch", "cpu", fp16=True).name == "torch-cpu"  # CUDA only
    with pytest.raises(TypeError, match="precision"):
        select_backend("builtin", precision="int8")


def test_unknown_spec_or_options_are_explained(tmp_path):
    with pytest.raises(WeightsError, match="no model file"):
        select_backend(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="backend must be"):
        select_backend("builtin", "tensorrt")
    with pytest.raises(ValueError, match="device must be"):
        select_backend("builtin", device="tpu")


@pytest.mark.skipif(torch_cuda(), reason="this machine has a CUDA GPU")
def test_asking_for_cuda_without_a_gpu_is_explained():
    with pytest.raises(BackendUnavailable, match="cuda"):
        select_backend("builtin", "torch", "cuda")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        select_backend("builtin", "onnx", "cuda")
