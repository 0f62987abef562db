"""``FairLock``: the FIFO lock with a front lane that serving backends hold around forward passes."""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator


class FairLock:
    """A FIFO lock with a front lane.

    ``threading.Lock`` lets a busy thread take the lock again and again while others starve; under steady
    load that would hold back the warm-up of a new adapter (and so the swap) indefinitely. Here waiters
    are served in arrival order, the front lane first, and a waiter can give up once ``unless()`` holds
    (its work was done by the holder, see label batching).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._front: deque[object] = deque()
        self._back: deque[object] = deque()

    @contextlib.contextmanager
    def hold(self, front: bool = False, unless: Callable[[], bool] | None = None) -> Iterator[bool]:
        """Yield True holding the lock, or False (not holding it) if ``unless()`` became true first."""
        ticket, lane = object(), (self._front if front else self._back)
        with self._cond:
            lane.append(ticket)
            while True:
                if unless is not None and unless():
                    lane.remove(ticket)
                    self._cond.notify_all()
                    acquired = False
                    break
                head = self._front[0] if self._front else self._back[0]
                if not self._held and head is ticket:
                    lane.popleft()
                    self._held = acquired = True
                    break
                self._cond.wait()
        try:
            yield acquired
        finally:
            if acquired:
                with self._cond:
                    self._held = False
                    self._cond.notify_all()
