"""The graph caches' one way to drop a graph whose weights or biases were freed (mxfp4.experts.graphs for the SM90
layer, mxfp4.experts.portable_graphs for the portable one).

A graph reads its weights in place, so it must go when one of them is freed. The weakref finalizer that says so can
run at any moment, also inside the cache's own critical section on the same thread (the garbage collector
interrupts it): so it queues the key and drops it at once only if it can take the cache's lock without waiting;
otherwise the lock's holder drops it the next time it looks (:meth:`DeferredDrops.drop`).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Hashable, MutableMapping


class DeferredDrops:
    """Keys whose graphs must go, dropped from ``graphs`` (closing each with ``close``) under ``lock``."""

    def __init__(self, lock: threading.Lock, graphs: MutableMapping[Hashable, Any], close: Callable[[Any], None]):
        self._lock, self._graphs, self._close = lock, graphs, close
        self._dead: list[Hashable] = []

    def __bool__(self) -> bool:
        return bool(self._dead)

    def forget(self, key: Hashable) -> None:
        """A weakref finalizer's callback: the graph of ``key`` reads a tensor that was freed."""
        self._dead.append(key)
        if self._lock.acquire(blocking=False):
            try:
                self.drop()
            finally:
                self._lock.release()

    def drop(self) -> None:
        """Drop the queued keys' graphs (the caller holds the lock)."""
        while self._dead:
            entry = self._graphs.pop(self._dead.pop(), None)
            if entry is not None:
                self._close(entry)
