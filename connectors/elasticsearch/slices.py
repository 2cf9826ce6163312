"""Concurrent slice readers: one thread per slice of a point in time, pages handed over through
a bounded queue."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


class Pit:
    """The point in time's id, shared by the slice threads (the latest id Elasticsearch gave)."""

    def __init__(self, pit_id: Any) -> None:
        self.id = str(pit_id)

    def update(self, pit_id: Any) -> None:
        if pit_id:
            self.id = str(pit_id)  # one attribute store: atomic under the GIL


_DONE = object()
"""What a slice thread puts on the queue when its slice is read to the end."""

_POLL_SECONDS = 0.1
"""How often a blocked thread (queue full) or the caller (queue empty) looks up: a thread sees
the stop event within this, and the caller notices a thread that died without a word."""


Page = list[dict[str, Any]]
"""One page of a slice: its hits as the SDK decoded them."""


class SliceReaders:
    """Daemon threads, one per slice, each running a page iterator into one bounded queue.

    `pages()` yields pages as they arrive until every thread is done, raising the first error
    any thread met; `stop()` (always called) makes every thread stop between pages and
    waits briefly for them (a thread in the middle of a request is not waited for: it is a
    daemon, and it puts nothing more once it sees the stop event).
    """

    def __init__(self, slices: int) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=slices + 1)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, read: Callable[[], Iterator[Page]]) -> None:
        thread = threading.Thread(
            target=self._run, args=(read,), name=f"windowpipe-slice-{len(self._threads)}"
        )
        thread.daemon = True
        self._threads.append(thread)
        thread.start()

    def _run(self, read: Callable[[], Iterator[Page]]) -> None:
        try:
            for page in read():
                if not self._put(page):
                    return
        except BaseException as error:
            self._put(error)
            return
        self._put(_DONE)

    def _put(self, item: Any) -> bool:
        """Hand `item` to the caller, waiting while the queue is full; False once stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def pages(self) -> Iterator[Page]:
        running = len(self._threads)
        while running:
            try:
                item = self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if not any(thread.is_alive() for thread in self._threads) and self._queue.empty():
                    raise RuntimeError("a slice reader stopped without finishing") from None
                continue
            if item is _DONE:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item

    def stop(self, wait: float = 1.0) -> None:
        self._stop.set()
        # Free any thread blocked on a full queue at once (it re-checks the event anyway).
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        deadline = time.monotonic() + wait
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
