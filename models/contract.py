"""The lip-sync model I/O contract: the one place it is written down (numpy only).

It is the Wav2Lip contract as the widely used ONNX exports have it:

======== ===================== ========= ==============================================
name     shape                 dtype     meaning
======== ===================== ========= ==============================================
source   [batch, 1, 80, 16]    float32   mel window (models.audio_features): 16 mel frames
                                         (200 ms) from the frame's start, values in [-4, 4]
target   [batch, 6, 96, 96]    float32   face crop, BGR, /255: channels 0-2 with rows
                                         48-95 zeroed, channels 3-5 the unmasked reference
output   [batch, 3, 96, 96]    float32   the new face crop, BGR, 0-1
======== ===================== ========= ==============================================

A file may name its inputs differently (some exports say ``mel``/``face``);
:func:`bind_io` then tells them apart by shape.  A fixed batch size of 1 is
accepted (the caller loops); float16 files are accepted (the caller casts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FACE_SIZE = 96
MASK_FROM_ROW = FACE_SIZE // 2  # rows from here down are zeroed in target channels 0-2
MEL_BANDS = 80
MEL_STEPS = 16
BATCH_AXIS = "batch"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    shape: tuple[str | int, ...]  # BATCH_AXIS marks the batch dimension
    dtype: str
    meaning: str

    def describe(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.name} [{dims}] {self.dtype} ({self.meaning})"


SOURCE = TensorSpec(
    "source",
    (BATCH_AXIS, 1, MEL_BANDS, MEL_STEPS),
    "float32",
    "mel window of 16 mel frames from the frame's start, in [-4, 4]",
)
TARGET = TensorSpec(
    "target",
    (BATCH_AXIS, 6, FACE_SIZE, FACE_SIZE),
    "float32",
    "BGR face crop /255, channels 0-2 lower half zeroed, channels 3-5 unmasked reference",
)
OUTPUT = TensorSpec(
    "output", (BATCH_AXIS, 3, FACE_SIZE, FACE_SIZE), "float32", "new BGR face crop in 0-1"
)
INPUTS = (SOURCE, TARGET)
OUTPUTS = (OUTPUT,)


# ---------------------------------------------------------------- building tensors


def make_target(faces_bgr: np.ndarray) -> np.ndarray:
    """The ``target`` tensor for a batch of BGR face crops.

    ``faces_bgr``: [96, 96, 3] or [B, 96, 96, 3], uint8 (0-255) or float (0-1).
    Returns [B, 6, 96, 96] float32: masked copy in channels 0-2, reference in 3-5.
    """
    faces = np.asarray(faces_bgr)
    if faces.ndim == 3:
        faces = faces[None]
    if faces.ndim != 4 or faces.shape[1:] != (FACE_SIZE, FACE_SIZE, 3):
        raise ValueError(
            f"face crops must be [B, {FACE_SIZE}, {FACE_SIZE}, 3] BGR, got shape {faces.shape}"
        )
    scale = 1.0 / 255.0 if faces.dtype == np.uint8 else 1.0
    reference = faces.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(scale)
    target = np.concatenate([reference, reference], axis=1)
    target[:, :3, MASK_FROM_ROW:] = 0.0
    return target


def output_to_bgr(output: np.ndarray) -> np.ndarray:
    """Model output [B, 3, 96, 96] in 0-1 -> uint8 BGR crops [B, 96, 96, 3]."""
    out = np.asarray(output, dtype=np.float32)
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


# ---------------------------------------------------------------- checking a model file


class ModelContractError(ValueError):
    """A model file's inputs or outputs do not fit the lip-sync contract."""


@dataclass(frozen=True, slots=True)
class IOBinding:
    """How a particular model file's tensors map onto the contract."""

    source: str  # the file's name for the mel input
    target: str  # the file's name for the face input
    output: str  # the file's name for the output
    batch: int | None  # fixed batch size, or None when the batch axis is dynamic
    dtype: str  # "float32" or "float16"


_DTYPES = {
    "tensor(float)": "float32",
    "float32": "float32",
    "float": "float32",
    "tensor(float16)": "float16",
    "float16": "float16",
}


def _describe(item: Any) -> tuple[str, tuple[Any, ...], str]:
    if isinstance(item, tuple):
        name, shape, dtype = item
    else:  # onnxruntime NodeArg or anything with the same attributes
        name, shape, dtype = item.name, item.shape, item.type
    return str(name), tuple(shape or ()), str(dtype)


def _fits(shape: tuple[Any, ...], spec: TensorSpec) -> bool:
    if len(shape) != len(spec.shape):
        return False
    return all(
        not isinstance(d, int) or d == s for d, s in zip(shape[1:], spec.shape[1:], strict=True)
    )


def _show(name: str, shape: tuple[Any, ...], dtype: str) -> str:
    dims = ", ".join("?" if d is None else str(d) for d in shape)
    return f"{name} [{dims}] {dtype}"


def bind_io(inputs: Sequence[Any], outputs: Sequence[Any]) -> IOBinding:
    """Match a model file's inputs/outputs to the contract, or explain why they do not fit.

    Items are ``(name, shape, dtype)`` tuples or onnxruntime ``NodeArg`` objects;
    a dimension may be an int, a name (dynamic) or None.
    """
    found_in = [_describe(i) for i in inputs]
    found_out = [_describe(o) for o in outputs]

    def fail(problem: str) -> ModelContractError:
        expected = "; ".join(s.describe() for s in (*INPUTS, *OUTPUTS))
        found = "; ".join(_show(*d) for d in (*found_in, *found_out)) or "nothing"
        return ModelContractError(
            f"this model file does not fit the Wav2Lip lip-sync contract: {problem}. "
            f"Expected inputs/output: {expected}. Found: {found}."
        )

    if len(found_in) != 2:
        raise fail(f"it has {len(found_in)} inputs, the contract has 2 (source and target)")

    def pick(spec: TensorSpec, pool: list[tuple[str, tuple[Any, ...], str]]) -> tuple:
        named = [d for d in pool if d[0] == spec.name]
        if named and not _fits(named[0][1], spec):
            raise fail(f"input '{spec.name}' has the wrong shape")
        candidates = named or [d for d in pool if _fits(d[1], spec)]
        if len(candidates) != 1:
            raise fail(f"cannot tell which tensor is '{spec.name}' ({spec.meaning})")
        return candidates[0]

    source = pick(SOURCE, found_in)
    target = pick(TARGET, [d for d in found_in if d is not source])
    outs = [d for d in found_out if _fits(d[1], OUTPUT)]
    if not outs:
        raise fail("no output has the shape [batch, 3, 96, 96]")
    output = next((d for d in outs if d[0] == OUTPUT.name), outs[0])

    batches = {d[1][0] for d in (source, target) if isinstance(d[1][0], int)}
    if len(batches) > 1:
        raise fail(f"source and target have different fixed batch sizes {sorted(batches)}")
    dtypes = {_DTYPES.get(d[2]) for d in (source, target, output)}
    if None in dtypes or len(dtypes) != 1:
        raise fail("tensors must all be float32 (or all float16)")
    return IOBinding(
        source[0], target[0], output[0], batches.pop() if batches else None, dtypes.pop()
    )
