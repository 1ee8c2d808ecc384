"""Background threads that cannot die silently.

Every thread of the engine (the hub's ``ctl/`` reader, the leader's decision loop) runs
its body through :func:`guarded`: an exception that escapes it -- a bug, a
``RecursionError`` on junk, a ``MemoryError`` -- is logged with its traceback and handed
to ``on_death``, which fails every caller waiting on that thread with the cause.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def guarded(
    body: Callable[[], None], on_death: Callable[[BaseException], None], *, name: str
) -> threading.Thread:
    """A daemon thread (not started) running ``body``; ``on_death(exc)`` if it raises."""

    def run() -> None:
        try:
            body()
        except BaseException as exc:  # handed on, never swallowed
            log.error("thread %r died: %r", name, exc, exc_info=exc)
            try:
                on_death(exc)
            except BaseException:  # nothing above would see it
                log.exception("thread %r: telling its waiters of its death failed", name)

    return threading.Thread(target=run, name=name, daemon=True)


__all__ = ["guarded"]
