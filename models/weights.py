"""Where model files are: the shipped default, the locally built reference, or a user's file.

Nothing is ever downloaded.  The default weights ship inside the package; the
reference network (~145 MB) is exported on first use into the user's cache
(``$XDG_CACHE_HOME/avatar-server``, else ``~/.cache/avatar-server``).
"""

from __future__ import annotations

import os
from pathlib import Path

BUILTIN = "builtin"
REFERENCE = "reference"
REFERENCE_FILE = "wav2lip96_reference.onnx"


def default_weights_path() -> Path:
    """The shipped built-in model (``models/data/parametric.onnx``, a few KB)."""
    return Path(__file__).resolve().parent / "data" / "parametric.onnx"


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/avatar-server`` (when set to an absolute path), else ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "avatar-server"


def reference_weights_path(build: bool = True) -> Path:
    """The reference network's ONNX file, exported into the cache on first use.

    With ``build=False`` the path is returned whether or not the file exists.
    Building needs torch and takes several seconds; concurrent builders are
    safe (each writes a temporary file and renames it into place).
    """
    path = cache_dir() / REFERENCE_FILE
    if build and not path.exists():
        from .export import export_kind  # imports torch: only when a build is needed

        export_kind(REFERENCE, path)
    return path


def resolve_weights(spec: str | os.PathLike[str]) -> Path:
    """``'builtin'``, ``'reference'`` or the path of a Wav2Lip-compatible ONNX file."""
    text = os.fspath(spec)
    if text == BUILTIN:
        path = default_weights_path()
        if not path.exists():
            raise FileNotFoundError(
                f"the built-in weights are missing from the installation ({path}); "
                "recreate them with: python -m models.export builtin"
            )
        return path
    if text == REFERENCE:
        return reference_weights_path()
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"no model file at {path}: give 'builtin', 'reference' or the path of a "
            "Wav2Lip-compatible ONNX file (inputs source [B,1,80,16] and target [B,6,96,96])"
        )
    return path
