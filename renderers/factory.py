"""Naming a frame renderer by an importable path, so a spawned process can build it.

Standard library only: the session side imports this too.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def load_factory(path: str) -> Callable[..., Any]:
    """``"package.module:callable"`` -> the callable, with errors a user can act on."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"renderer factory {path!r} is not of the form 'package.module:callable'")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"renderer factory {path!r}: module {module!r} not found") from exc
    except AttributeError:
        raise ValueError(f"renderer factory {path!r}: {module} has no {name!r}") from None
