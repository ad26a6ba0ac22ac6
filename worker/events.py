"""A small synchronous event emitter with the same surface as videosdk-agents' ``EventEmitter``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

E = TypeVar("E")


class EventEmitter(Generic[E]):
    """``on`` / ``off`` / ``emit``; handlers run synchronously, errors are logged, not raised."""

    def __init__(self) -> None:
        self._handlers: dict[E, list[Callable[..., Any]]] = {}

    def on(self, event: E, callback: Callable[..., Any] | None = None) -> Callable[..., Any]:
        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            if asyncio.iscoroutinefunction(handler):
                raise ValueError("async handlers are not supported; wrap them in a sync function")
            handlers = self._handlers.setdefault(event, [])
            if handler not in handlers:
                handlers.append(handler)
            return handler

        return register if callback is None else register(callback)

    def off(self, event: E, callback: Callable[..., Any]) -> None:
        handlers = self._handlers.get(event, [])
        if callback in handlers:
            handlers.remove(callback)

    def emit(self, event: E, *args: Any) -> None:
        for handler in list(self._handlers.get(event, ())):
            try:
                handler(*args)
            except Exception:
                logger.exception("handler for %r failed", event)
