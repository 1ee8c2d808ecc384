"""What the parts of a :class:`~etcd_rendezvous.rendezvous.engine.Rendezvous` share: its
state (declared here, set in ``engine.py``), etcd calls with retries, fatal errors, and
feeding the machine (its actions are performed by ``_executor.py``, whose outcomes go
back to the machine as events).

The engine is split along its seams, one mixin per job, all on this base:
``engine.py`` (public API and waiting), ``_executor.py`` (performing actions),
``_leader.py`` (the leader's decision loop); ``_hub.py`` reads the shared ``ctl/`` watch.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

from etcd_rendezvous.client import (
    EtcdClient,
    Lease,
    Retry,
    Watch,
)
from etcd_rendezvous.errors import (
    EtcdClientError,
    EtcdTimeoutError,
    EtcdUnavailableError,
)
from etcd_rendezvous.rendezvous import _machine as m
from etcd_rendezvous.rendezvous import _probe
from etcd_rendezvous.rendezvous._errors import (
    RendezvousError,
)
from etcd_rendezvous.rendezvous._hub import Hub
from etcd_rendezvous.rendezvous._machine import Assignment, Change
from etcd_rendezvous.rendezvous._records import (
    Keys,
)

log = logging.getLogger("etcd_rendezvous.rendezvous.engine")

_T = TypeVar("_T")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class _LeaderWatch:
    """The leader's private watch of the whole run prefix, opened by its decision loop.

    ``cancel()`` may come before the stream is up: :meth:`attach` then cancels it.
    """

    def __init__(self, prefix: str, start_revision: int) -> None:
        self.prefix = prefix
        self.start_revision = start_revision
        self._lock = threading.Lock()
        self._watch: Watch | None = None
        self._cancelled = False

    def attach(self, watch: Watch) -> bool:
        """Hold the opened ``watch``; False (and cancelled) if we were cancelled already."""
        with self._lock:
            if not self._cancelled:
                self._watch = watch
                return True
        watch.cancel()
        return False

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()


class Core:
    """The shared state and helpers of a rendezvous node (see the module doc)."""

    run_id: str
    node_id: str
    probe: str
    config: m.Config
    keys: Keys
    join_timeout: float
    close_timeout: float
    lease_ttl: int
    keepalive_interval: float
    _config_checked: bool
    _client: EtcdClient
    _data: dict[str, str]
    _clock: Callable[[], float]
    _machine: m.Machine
    _state: m.State
    _lock: threading.RLock
    _cond: threading.Condition
    _retry: Retry
    _hub: Hub | None
    _active: bool  # following etcd (between the first join and leave/stop)
    _floor: int  # revision of our last snapshot: hub events up to it are known
    _rev: int  # the newest revision fed to the machine
    _lease: Lease | None  # the node lease (kept alive by the hub's keeper)
    _leader_lease: Lease | None  # the leader key's (kept alive by the decision loop)
    _leader_refreshed: float
    _watch: _LeaderWatch | None  # while leading: the whole run prefix
    _thread: threading.Thread | None  # while leading: the decision loop
    _stopping: threading.Event
    _result: Assignment | RendezvousError | None
    _error: RendezvousError | None  # fatal: raised by every later call
    _changes: collections.deque[Change]
    _listeners: list[Callable[[Change], None]]
    _outbox: list[Change]
    _cause: BaseException | None  # why the last action failed (for Fail)
    _io_deadline: float | None  # retries stop by then (a join is waiting)

    # --- provided by the other parts ------------------------------------------------

    def _do(self, action: m.Action) -> m.Event | None:
        """Perform one action (``_executor.py``)."""
        raise NotImplementedError

    def _resync(self, scope: m.Scope) -> None:
        """Read and follow ``scope`` (``_executor.py``)."""
        raise NotImplementedError

    def _start_leading(self, prefix: str, start_revision: int) -> None:
        """Start the decision loop on a private watch (``_leader.py``)."""
        raise NotImplementedError

    def _on_lease_lost(self, lease: Lease, error: EtcdClientError) -> None:
        """The keeper lost our node lease (``engine.py``)."""
        raise NotImplementedError

    # --- shared helpers ---------------------------------------------------------------

    def _slots(self) -> contextlib.AbstractContextManager[object]:
        return self._hub.io if self._hub is not None else contextlib.nullcontext()

    def _etcd(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Call the client, retrying transient errors (unreachable, timeout) with ``retry``.

        Every request the engine sends is safe to repeat: writes are guarded by a txn
        compare, or put the same value again. The error surfaces once the retry gives up.
        """
        return self._etcd_with(self._retry, fn, *args, **kwargs)

    def _etcd_with(self, policy: Retry, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """:meth:`_etcd` with its own retry policy (cut short by the caller's deadline)."""
        retry = policy.copy()
        while True:
            try:
                with self._slots():
                    return fn(*args, **kwargs)
            except (EtcdUnavailableError, EtcdTimeoutError) as exc:
                delay = retry.next_delay()
                # Read at each failure: a join, close or leave that starts waiting while
                # this loop retries (holding the lock it waits for) cuts the retry short.
                bound = self._io_deadline
                if (
                    delay is None
                    or self._stopping.is_set()
                    or (bound is not None and self._clock() + delay > bound)
                ):
                    raise
                log.warning(
                    "rendezvous %s, node %s: %s; retrying in %.2fs",
                    self.run_id,
                    self.node_id,
                    exc,
                    delay,
                )
                self._stopping.wait(delay)

    def _connection_error(self, exc: EtcdClientError) -> RendezvousError:
        what = (
            "lost its connection to etcd"
            if isinstance(exc, EtcdUnavailableError | EtcdTimeoutError)
            else "got an error from etcd"
        )
        error = RendezvousError(
            f"rendezvous {self.run_id!r} (node {self.node_id!r}) {what}: {exc}",
            run_id=self.run_id,
        )
        error.__cause__ = exc
        return error

    def _died_error(self, what: str, exc: BaseException) -> RendezvousError:
        if isinstance(exc, RendezvousError):
            return exc
        error = RendezvousError(
            f"rendezvous {self.run_id!r} (node {self.node_id!r}) stopped: {what} died of "
            f"{type(exc).__name__}: {exc} (a bug: please report it with the log)",
            run_id=self.run_id,
        )
        error.__cause__ = exc
        return error

    def _fatal(self, exc: RendezvousError) -> None:
        with self._cond:
            self._fatal_locked(exc)

    def _fatal_locked(self, exc: RendezvousError) -> None:
        log.error("rendezvous %s (node %s) stopped: %s", self.run_id, self.node_id, exc)
        self._error = exc
        self._cond.notify_all()

    def _raise_fatal(self) -> None:
        if self._error is not None:
            raise self._error

    def _lease_ok(self) -> bool:
        return self._lease is not None and not self._lease.is_lost

    def _feed(self, event: m.Event) -> None:
        """Step the machine and perform its actions (called with the lock held)."""
        self._state, actions = self._machine.step(self._state, event, self._clock())
        self._perform(actions)

    def _perform(self, actions: list[m.Action]) -> None:
        """Carry out ``actions`` in order, then report their outcomes to the machine."""
        outcomes = [outcome for action in actions if (outcome := self._do(action)) is not None]
        for outcome in outcomes:
            self._feed(outcome)

    def _feed_batch(self, events: list[m.Event]) -> None:
        prober = _probe.prober()
        for event in events:  # verify probe addresses in the background, before need
            if isinstance(event, m.NodePut) and event.entry.probe not in ("", self.probe):
                prober.learn(event.entry.probe)
            elif isinstance(event, m.LeaderChanged) and event.probe and event.probe != self.probe:
                prober.learn(event.probe)
        self._state, actions = self._machine.step_batch(self._state, events, self._clock())
        self._perform(actions)

    def _dispatch(self) -> None:
        """Call listeners outside the lock."""
        with self._lock:
            changes, self._outbox = self._outbox, []
            listeners = list(self._listeners)
        for change in changes:
            for callback in listeners:
                try:
                    callback(change)
                except Exception:
                    log.exception("rendezvous listener %r failed on %s", callback, change)


__all__ = ["Core", "utc_now"]
