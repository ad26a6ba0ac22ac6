"""The public API is importable as documented, and the network side never loads inference code."""

from __future__ import annotations

import subprocess
import sys

PUBLIC = (
    "AvatarAudioIn, AvatarAudioOut, AvatarServer, AvatarSynchronizer, AvatarRenderer, "
    "AvatarInput, AvatarSettings, AvatarJoinInfo, AvatarAuthCredentials, AudioSegmentEnd, "
    "AvatarVoiceTrack, AvatarVisualTrack, generate_avatar_credentials"
)

# What the session and dispatcher processes import.
NETWORK_SIDE = [
    "worker",
    "worker.session",
    "worker.shm_renderer",
    "worker.dispatcher.app",
    "worker.render_job",
    "worker.cli",
]


def test_public_names_import_from_worker() -> None:
    subprocess.run([sys.executable, "-c", f"from worker import {PUBLIC}"], check=True)


def test_network_side_never_imports_torch_or_onnxruntime() -> None:
    code = (
        "import sys, importlib\n"
        f"for name in {NETWORK_SIDE!r}: importlib.import_module(name)\n"
        "heavy = sorted(m for m in ('torch', 'onnxruntime', 'cv2') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == ""
