"""A bounded retry policy: deadline, exponential backoff, jitter, max delay.

In the style of kazoo's ``KazooRetry``: a small object that says how long to
wait before the next attempt, and when to give up. The clock and the sleep are
injectable so tests and callers with their own event loop need no patching.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Retry:
    """How to retry: ``deadline`` seconds in total, delays from ``delay`` doubling
    (``backoff``) up to ``max_delay``, each randomized by +-``jitter`` (a fraction).

    ``max_tries`` (0 = unlimited) bounds the attempts as well. Copy it with
    :meth:`copy` before use: a copy keeps its own attempt count and start time.
    """

    deadline: float = 30.0
    delay: float = 0.02
    backoff: float = 2.0
    max_delay: float = 1.0
    jitter: float = 0.2
    max_tries: int = 0
    clock: Callable[[], float] = time.monotonic
    rand: Callable[[], float] = random.random
    attempts: int = field(default=0, init=False)
    _start: float | None = field(default=None, init=False, repr=False)

    def copy(self) -> Retry:
        return Retry(
            self.deadline,
            self.delay,
            self.backoff,
            self.max_delay,
            self.jitter,
            self.max_tries,
            self.clock,
            self.rand,
        )

    def reset(self) -> None:
        """Start over (after a success)."""
        self.attempts = 0
        self._start = None

    def remaining(self) -> float:
        """Seconds left before the deadline."""
        if self._start is None:
            return self.deadline
        return max(0.0, self._start + self.deadline - self.clock())

    def next_delay(self) -> float | None:
        """Record a failed attempt; return how long to wait, or ``None`` to give up."""
        now = self.clock()
        if self._start is None:
            self._start = now
        self.attempts += 1
        if self.max_tries and self.attempts >= self.max_tries:
            return None
        left = self._start + self.deadline - now
        if left <= 0:
            return None
        base = min(self.delay * self.backoff ** (self.attempts - 1), self.max_delay)
        wait = base * (1.0 + self.jitter * (2.0 * self.rand() - 1.0))
        return max(0.0, min(wait, left))

    def sleep(self, stop: threading.Event | None = None) -> bool:
        """Wait for the next attempt; False when it is time to give up (or ``stop`` is set)."""
        wait = self.next_delay()
        if wait is None:
            return False
        if stop is None:
            time.sleep(wait)
            return True
        return not stop.wait(wait)
