"""Checking an ONNX weights file against the model contract before anything runs it.

A user points the renderer at a file; everything that can be wrong with it is
reported here, in words, before a session is touched:

    missing / a directory / empty          -> say so
    not protobuf-shaped like an ONNX model -> "not an ONNX model file" (+ what it looks like)
    a valid prefix that stops mid-record   -> "truncated"
    inputs / shapes / output off-contract  -> expected vs found, side by side

The contract itself (names, shapes, how a file's tensors are matched to it) is
:mod:`models.contract`; this module only reads what the file declares.  The
batch axis is either symbolic (dynamic: the renderer batches) or a fixed number
(usually 1: the renderer loops).
"""

from __future__ import annotations

from pathlib import Path

from models import contract

# ModelProto's top-level fields and their protobuf wire types (0 varint, 2 length-delimited).
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_FLOAT_TYPES = {1: "float32", 10: "float16"}  # onnx.TensorProto.FLOAT, FLOAT16


class WeightsError(ValueError):
    """A weights file (or spec) that cannot be used, explained for the person who chose it."""


def read_binding(path: str | Path) -> contract.IOBinding:
    """Read a weights file and map its tensors onto the contract; :class:`WeightsError` if off."""
    path = Path(path)
    data = _read_bytes(path)
    model = _parse(path, data)
    return check_contract(path, model)


# ---------------------------------------------------------------- reading the file


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}")
    if path.is_dir():
        raise WeightsError(f"{path} is a directory; expected an ONNX weights file (.onnx)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc.strerror or exc}") from exc
    if not data:
        raise WeightsError(f"weights file {path} is empty (0 bytes)")
    return data


def _parse(path: Path, data: bytes):
    import onnx
    from google.protobuf.message import DecodeError

    shape = _wire_shape(data)
    if shape == "foreign":
        raise WeightsError(f"{path} is not an ONNX model file{_looks_like(data)}")
    if shape == "truncated":
        raise WeightsError(
            f"{path} is truncated: its {len(data):,} bytes stop in the middle of the model; "
            "copy or download the file again"
        )
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError as exc:
        raise WeightsError(f"{path} is a damaged ONNX file ({exc})") from exc
    if not model.HasField("graph") or not model.graph.node:
        raise WeightsError(f"{path} holds no model graph; it is not a usable ONNX model")
    return model


def _wire_shape(data: bytes) -> str:
    """Walk the top-level protobuf records: ``"ok"``, ``"truncated"`` or ``"foreign"``.

    An ONNX file is a ModelProto: a sequence of (tag, value) records whose field
    numbers and wire types are known.  A file whose records are all ModelProto
    records but whose last one runs past the end is a truncated ONNX file;
    anything else with a bad record is something other than ONNX.
    """
    pos, records, has_graph = 0, 0, False
    while pos < len(data):
        tag, pos = _varint(data, pos)
        if tag is None:
            return "truncated" if records else "foreign"
        field, wire = tag >> 3, tag & 7
        if _MODEL_FIELDS.get(field) != wire:
            return "truncated" if records and tag == 0 else "foreign"
        if wire == 0:
            value, pos = _varint(data, pos)
            if value is None:
                return "truncated"
        else:
            length, pos = _varint(data, pos)
            if length is None or pos + length > len(data):
                return "truncated"
            pos += length
        has_graph |= field == 7
        records += 1
    if not has_graph:
        return "truncated" if records and data[0] == 0x08 else "foreign"
    return "ok"


def _varint(data: bytes, pos: int) -> tuple[int | None, int]:
    value, shift = 0, 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None, pos


def _looks_like(data: bytes) -> str:
    if data.startswith(b"PK\x03\x04"):
        return (
            " (it is a zip archive, e.g. a PyTorch checkpoint: export the network to ONNX "
            "with the Wav2Lip contract first)"
        )
    if data[:1] == b"\x80":
        return " (it looks like a Python pickle, e.g. an old PyTorch checkpoint)"
    if data.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8")):
        return " (it is an image)"
    head = data[:256]
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return " (it is a text file)"
    return ""


# ---------------------------------------------------------------- the contract


def check_contract(path: Path, model) -> contract.IOBinding:
    """Match a parsed ModelProto's inputs and outputs to the contract (names, else shapes)."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [_describe(v) for v in model.graph.input if v.name not in initializers]
    outputs = [_describe(v) for v in model.graph.output]
    try:
        return contract.bind_io(inputs, outputs)
    except contract.ModelContractError as exc:
        raise WeightsError(f"{path}: {exc}") from None


def _describe(value) -> tuple[str, tuple[int | str | None, ...], str]:
    """``(name, shape, dtype)`` of a graph input or output, as the file declares it."""
    tensor = value.type.tensor_type
    dims: list[int | str | None] = []
    for d in tensor.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    dtype = _FLOAT_TYPES.get(tensor.elem_type)
    if dtype is None:
        import onnx

        dtype = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
    return value.name, tuple(dims), dtype
