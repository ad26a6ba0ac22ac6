"""A Python 3.12 interpreter with videosdk-agents, for the tests that run the real agent.

videosdk-agents' avatar module imports only on Python 3.12.  The venv is
``$AVATAR_PY312_VENV`` or ``./.venv312`` (``scripts/setup.sh --test`` makes it);
when missing it is created with ``python3.12 -m venv`` (pyenv's ``PYENV_VERSION``
set to ``$PYENV_VERSION_312`` or 3.12.1 for that call) and ``pip install
videosdk-agents``.  Tests are skipped only when no Python 3.12 can be found.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AGENTS_PACKAGE = "videosdk-agents"


def _venv_dir() -> Path:
    return Path(os.environ.get("AVATAR_PY312_VENV", ROOT / ".venv312"))


def _python312_env() -> dict[str, str]:
    return os.environ | {"PYENV_VERSION": os.environ.get("PYENV_VERSION_312", "3.12.1")}


def _find_python312() -> str | None:
    exe = shutil.which("python3.12")
    if exe is None:
        return None
    probe = subprocess.run(
        [exe, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
        env=_python312_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return exe if probe.returncode == 0 and probe.stdout.strip() == "True" else None


def _imports_agents(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run(
        [python, "-c", "import videosdk.agents.avatar"], capture_output=True, timeout=120
    )
    return probe.returncode == 0


def python312() -> Path:
    """A Python 3.12 interpreter with videosdk-agents installed (created on first use)."""
    venv = _venv_dir()
    python = venv / "bin" / "python"
    if _imports_agents(python):
        return python
    # Test runs started side by side must not build the same venv at once.
    lock_name = f"avatar-py312-{hashlib.sha1(str(venv.resolve()).encode()).hexdigest()[:12]}.lock"
    with open(Path(tempfile.gettempdir()) / lock_name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _create_venv(venv, python)


def _create_venv(venv: Path, python: Path) -> Path:
    if _imports_agents(python):  # built by another run while we waited
        return python
    if not python.exists():
        base = _find_python312()
        if base is None:
            pytest.skip(
                "Python 3.12 not found (python3.12 on PATH, or pyenv version "
                f"{_python312_env()['PYENV_VERSION']}): videosdk-agents' avatar module needs it"
            )
        subprocess.run([base, "-m", "venv", str(venv)], env=_python312_env(), check=True)
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", AGENTS_PACKAGE],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if install.returncode != 0 or not _imports_agents(python):
        pytest.fail(
            f"could not install {AGENTS_PACKAGE} into {venv}:\n{install.stdout}\n{install.stderr}"
        )
    return python
