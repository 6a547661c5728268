"""Hand-over points between stage threads.

Two kinds, same interface (put / get / drain):

- `BoundedQueue`: blocking FIFO. Never loses a frame; a slow consumer slows the producer
  (headless runs, recorder input).
- `LatestSlot`: holds one item; a new item replaces an unconsumed one and counts it as
  dropped. Live sources use it so inference always sees the freshest frame and latency does not
  grow when the model is slower than the camera.

Control items (EndOfStream) are never dropped by a LatestSlot.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable

from .items import EndOfStream


class Closed(Exception):
    """The pipeline is shutting down; the stage holding this should return."""


class _Channel:
    """What both channels share: one condition variable and the close() that wakes every waiter."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._closed = False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class BoundedQueue(_Channel):
    def __init__(self, maxsize: int):
        super().__init__()
        self._items: collections.deque = collections.deque()
        self._maxsize = max(1, int(maxsize))

    def put(self, item: Any) -> None:
        with self._cond:
            while len(self._items) >= self._maxsize and not self._closed:
                self._cond.wait()
            if self._closed:
                raise Closed
            self._items.append(item)
            self._cond.notify_all()

    def offer(self, item: Any) -> bool:
        """Put without waiting; False if full or closed."""
        with self._cond:
            if self._closed or len(self._items) >= self._maxsize:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> Any:
        """The next item; None after `timeout` seconds without one. Raises Closed."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            if self._closed:
                raise Closed
            if not self._items:
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def drain(self) -> list:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items

    def __len__(self) -> int:
        return len(self._items)


class LatestSlot(_Channel):
    """Latest-frame-wins: put never blocks. `on_drop` is called (outside the lock) with each
    frame that was replaced before anyone took it."""

    def __init__(self, on_drop: Callable[[Any], None] | None = None):
        super().__init__()
        self._item: Any = None
        self._control: collections.deque = collections.deque()  # EndOfStream etc., never dropped
        self._on_drop = on_drop

    def put(self, item: Any) -> None:
        dropped = None
        with self._cond:
            if self._closed:
                raise Closed
            if isinstance(item, EndOfStream):
                self._control.append(item)
            else:
                dropped, self._item = self._item, item
            self._cond.notify_all()
        if dropped is not None and self._on_drop is not None:
            self._on_drop(dropped)

    def get(self, timeout: float | None = None) -> Any:
        with self._cond:
            if self._item is None and not self._control and not self._closed:
                self._cond.wait(timeout)
            if self._closed:
                raise Closed
            if self._item is not None:  # a frame goes before the EndOfStream that followed it
                item, self._item = self._item, None
                return item
            if self._control:
                return self._control.popleft()
            return None

    def drain(self) -> list:
        with self._cond:
            items = ([self._item] if self._item is not None else []) + list(self._control)
            self._item = None
            self._control.clear()
            return items

    def __len__(self) -> int:
        return int(self._item is not None) + len(self._control)
