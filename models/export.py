"""Export the project's models to ONNX and check the files.

    python -m models.export builtin                      # -> models/data/parametric.onnx
    python -m models.export reference --out r.onnx       # the Wav2Lip-96-size network
    python -m models.export builtin --bench              # + onnxruntime CPU ms/frame

Files follow :mod:`models.contract`: inputs ``source`` and ``target``, output
``output``, dynamic batch axis ``batch``, opset 17 by default.  Export uses
torch's TorchScript-based exporter (``dynamo=False``): it still works in torch
2.13 and needs nothing more, whereas the torch.export-based one needs the extra
``onnxscript`` package.  Each file is checked with ``onnx.checker`` and run in
onnxruntime against torch at batch sizes 1 and 3 before it is put in place.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from . import parametric, wav2lip
from .contract import BATCH_AXIS, FACE_SIZE, MEL_BANDS, MEL_STEPS, OUTPUT, SOURCE, TARGET
from .contract import make_target as _make_target
from .weights import BUILTIN, REFERENCE, default_weights_path, reference_weights_path

DEFAULT_OPSET = 17

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    BUILTIN: parametric.build,
    REFERENCE: wav2lip.build,
}
DESCRIPTIONS = {
    BUILTIN: "Parametric lip-sync model for demos and tests (hand-set, not a trained network).",
    REFERENCE: "Network with the Wav2Lip-96 generator's layer sizes and random weights, "
    "for benchmarks; its output is not a face.",
}
# onnxruntime vs torch, on the 0-1 output scale
TOLERANCE = {BUILTIN: 1e-4, REFERENCE: 1e-4}


class ExportCheckError(RuntimeError):
    """An exported file did not reproduce the torch model."""


def build_model(kind: str) -> nn.Module:
    """A fresh torch model of ``kind`` ('builtin' or 'reference'), in eval mode."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown model {kind!r}; choose one of {', '.join(BUILDERS)}")
    return BUILDERS[kind]()


def example_inputs(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in the contract's value ranges: mel in [-4, 0] (silence to loud), faces in 0-1."""
    rng = np.random.default_rng(seed)
    source = rng.uniform(-4.0, 0.0, (batch, 1, MEL_BANDS, MEL_STEPS)).astype(np.float32)
    faces = rng.integers(0, 256, (batch, FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)
    return torch.from_numpy(source), torch.from_numpy(_make_target(faces))


def export_onnx(
    model: nn.Module, path: str | Path, opset: int = DEFAULT_OPSET, doc: str = ""
) -> Path:
    """Write ``model`` as ONNX with the contract's names and a dynamic batch axis."""
    path = Path(path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        torch.onnx.export(
            model.eval(),
            example_inputs(2),
            str(path),
            input_names=[SOURCE.name, TARGET.name],
            output_names=[OUTPUT.name],
            dynamic_axes={t.name: {0: BATCH_AXIS} for t in (SOURCE, TARGET, OUTPUT)},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    if doc:
        proto = onnx.load(str(path))
        proto.doc_string = doc
        proto.producer_name = "avatar-server"
        onnx.save(proto, str(path))
    return path


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_onnx(
    path: str | Path, model: nn.Module, batch_sizes: Sequence[int] = (1, 3), atol: float = 1e-4
) -> float:
    """Check the file's structure and that onnxruntime matches torch; returns the max difference."""
    onnx.checker.check_model(str(path))
    session = _session(Path(path))
    worst = 0.0
    for batch in batch_sizes:
        source, target = example_inputs(batch, seed=batch)
        with torch.no_grad():
            expected = model.eval()(source, target).numpy()
        (got,) = session.run(
            [OUTPUT.name], {SOURCE.name: source.numpy(), TARGET.name: target.numpy()}
        )
        if got.shape != expected.shape:
            raise ExportCheckError(
                f"batch {batch}: onnxruntime gave {got.shape}, torch {expected.shape}"
            )
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > atol:
        raise ExportCheckError(f"onnxruntime differs from torch by {worst:.3g} (allowed {atol:g})")
    return worst


def export_kind(kind: str, path: str | Path, opset: int = DEFAULT_OPSET) -> tuple[Path, float]:
    """Build, export, verify and put in place one of the project's models.

    Returns the path and onnxruntime's largest difference from torch.
    """
    model = build_model(kind)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the destination and renamed into place once verified, so a
    # reader (or a concurrent builder) never sees half a file.
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        export_onnx(model, tmp, opset, DESCRIPTIONS[kind])
        diff = verify_onnx(tmp, model, atol=TOLERANCE[kind])
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path, diff


def benchmark(path: str | Path, batch_sizes: Sequence[int] = (1, 8), seconds: float = 2.0):
    """onnxruntime CPU milliseconds per frame (median over repeats) for each batch size."""
    session = _session(Path(path))
    result = {}
    for batch in batch_sizes:
        source, target = example_inputs(batch)
        feed = {SOURCE.name: source.numpy(), TARGET.name: target.numpy()}
        for _ in range(3):
            session.run(None, feed)
        times = []
        deadline = time.perf_counter() + seconds
        while len(times) < 5 or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - t0)
        result[batch] = 1000.0 * statistics.median(times) / batch
    return result


def default_path(kind: str) -> Path:
    """Where the server looks for ``kind``: the package data or the user's cache."""
    return default_weights_path() if kind == BUILTIN else reference_weights_path(build=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("kind", choices=sorted(BUILDERS), help="which model to export")
    parser.add_argument("--out", type=Path, help="output file (default: where the server looks)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--bench", action="store_true", help="also time it in onnxruntime (CPU)")
    args = parser.parse_args(argv)

    out = args.out or default_path(args.kind)
    t0 = time.perf_counter()
    path, diff = export_kind(args.kind, out, args.opset)
    params = sum(p.numel() for p in build_model(args.kind).parameters())
    learned = f"{params:,} parameters" if params else "no learned parameters"
    print(
        f"{args.kind}: wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {learned}) "
        f"in {time.perf_counter() - t0:.1f} s; onnxruntime vs torch max |diff| {diff:.2e}"
    )
    if args.bench:
        for batch, ms in benchmark(path).items():
            print(f"  onnxruntime CPU ({os.cpu_count()} cores), batch {batch}: {ms:.3f} ms/frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
