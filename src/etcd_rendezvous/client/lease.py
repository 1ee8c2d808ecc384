"""Leases kept alive in the background, whose loss is always reported.

One :class:`KeepAlive` thread per client refreshes every lease kept alive on it
(``ttl / 3`` seconds apart unless told more often), and sends the leases that are
due together as one keep-alive request (up to :data:`KEEPALIVE_BATCH` of them):
the rendezvous engine's node leases use this same loop, there is no second one.

Every refresh is bounded by the time its leases have left, split between the
endpoints: the pinned member gets its share, then the next one, so a member that
hangs (SIGSTOP, a stalled network) costs a fraction of the TTL, not the lease. A
failed refresh is retried quickly; a lease is declared lost when etcd says it no
longer exists, or when no refresh succeeded for a whole TTL (up to two while every
member answers that it has no leader: during an election nothing expires, and the new
leader renews every lease to its full TTL). Loss is then visible
four ways: :attr:`Lease.is_lost`, :attr:`Lease.error`, :meth:`Lease.wait_lost` and
the ``on_lost(error)`` callback. It is never silent, not even when the keep-alive
thread itself dies (every lease it kept is then reported lost, with the cause).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

from etcd_rendezvous.client._transport import NoLeaderError
from etcd_rendezvous.errors import (
    EtcdClientError,
    EtcdLeaseLostError,
    EtcdLeaseNotFoundError,
)

if TYPE_CHECKING:
    from etcd_rendezvous.client.client import EtcdClient

log = logging.getLogger(__name__)

KEEPALIVE_BATCH = 500
"""Leases refreshed per keep-alive request (one POST to the gateway's keep-alive stream)."""

# A failed keep-alive is retried after at most this long (and at least _MIN_RETRY).
_MAX_RETRY = 0.5
_MIN_RETRY = 0.02
# A refresh must reach etcd this long before the lease expires by our estimate
# (at most a tenth of the TTL): the time of the last attempt's round trip.
_MARGIN = 0.25
# A refresh gets at least this long in all, even past our estimate of the expiry
# (etcd counts the TTL from when it got the last refresh, and extends every lease
# when it elects a new leader: the lease may well still be there).
_MIN_REQUEST = 0.5


class Lease:
    """A granted lease; create it with :meth:`EtcdClient.lease`.

    ``id`` is what to pass as ``lease=`` to puts; ``ttl`` is the TTL etcd
    granted. As a context manager it revokes the lease on exit (deleting its
    keys); :meth:`close` only stops the keep-alive (the lease then expires).
    ``interval``: seconds between refreshes (default, and at most, ``ttl / 3``).
    """

    def __init__(
        self,
        client: EtcdClient,
        lease_id: int,
        ttl: int,
        *,
        keep_alive: bool = True,
        on_lost: Callable[[EtcdClientError], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval: float | None = None,
    ) -> None:
        self.id = lease_id
        self.ttl = ttl
        self._client = client
        self._on_lost = on_lost
        self._clock = clock
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._error: EtcdClientError | None = None
        self._lock = threading.Lock()
        self._last_refresh = clock()
        self.interval = _interval(ttl, interval)
        self._due = self._last_refresh + self.interval  # next refresh (KeepAlive's)
        self._failures = 0
        self._leaderless = False  # a refresh failed for want of a leader since the last one
        if keep_alive:
            client._keeper.add(self)

    # -- state ---------------------------------------------------------------

    @property
    def is_lost(self) -> bool:
        """True once the lease expired or was revoked behind our back."""
        return self._lost.is_set()

    @property
    def error(self) -> EtcdClientError | None:
        """Why the lease was lost (EtcdLeaseNotFoundError or EtcdLeaseLostError)."""
        return self._error

    def wait_lost(self, timeout: float | None = None) -> bool:
        """Block until the lease is lost (True) or ``timeout`` passes (False)."""
        return self._lost.wait(timeout)

    @property
    def remaining(self) -> float:
        """Seconds until the lease expires unless refreshed (our estimate)."""
        return max(0.0, self._last_refresh + self.ttl - self._clock())

    def refresh_deadline(self) -> float:
        """When a refresh sent now must have reached etcd (a ``clock()`` value).

        The time left minus a margin for the round trip, but at least ``_MIN_REQUEST``
        from now (etcd may still have a lease that our estimate says has expired).
        """
        now = self._clock()
        margin = min(_MARGIN, self.ttl / 10.0)
        return now + max(_MIN_REQUEST, self._last_refresh + self.ttl - margin - now)

    def expired_error(self, last: EtcdClientError) -> EtcdLeaseLostError:
        """The loss to report when no refresh reached etcd for a whole TTL (``last``: why)."""
        lost = EtcdLeaseLostError(
            f"lease {self.id} ({self.id:x}) lost: no keep-alive reached etcd "
            f"for {self.ttl}s (last error: {last})",
            endpoint=last.endpoint,
        )
        lost.__cause__ = last
        return lost

    # -- actions -------------------------------------------------------------

    def keep_alive(
        self,
        *,
        on_lost: Callable[[EtcdClientError], None] | None = None,
        interval: float | None = None,
    ) -> None:
        """Have the client's keep-alive loop refresh this lease from now on.

        For a lease granted with ``keep_alive=False``; ``on_lost`` and ``interval``
        replace the ones given then (when given).
        """
        if on_lost is not None:
            self._on_lost = on_lost
        if interval is not None:
            self.interval = _interval(self.ttl, interval)
        self._stop.clear()
        self._client._keeper.add(self)

    def refresh(self, *, timeout: float | None = None) -> int:
        """Refresh now; return the new TTL. Raises (and reports loss) when it is gone.

        The refresh is bounded by the time the lease has left (see
        :meth:`refresh_deadline`), split between the endpoints; ``timeout`` bounds
        each endpoint's share further.
        """
        sent = self._clock()
        deadline = time.monotonic() + (self.refresh_deadline() - sent)
        try:
            ttl = self._client.lease_keep_alive_once(self.id, timeout=timeout, deadline=deadline)
        except EtcdLeaseNotFoundError as exc:
            self._set_lost(exc)
            raise
        self._last_refresh = sent
        return ttl

    def time_to_live(self) -> int:
        """The TTL left according to etcd (-1 when the lease no longer exists)."""
        return self._client.lease_time_to_live(self.id).ttl

    def revoke(self) -> None:
        """Stop the keep-alive and revoke the lease (its keys are deleted)."""
        self.close()
        try:
            self._client.lease_revoke(self.id)
        except EtcdLeaseNotFoundError:
            log.debug("lease %x was already gone when revoked", self.id)

    def close(self) -> None:
        """Stop keeping the lease alive, without revoking it; idempotent.

        A refresh already in flight may still complete; its outcome is not reported.
        """
        self._stop.set()
        self._client._keeper.remove(self)
        self._client._forget_lease(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.revoke()

    def __repr__(self) -> str:
        state = "lost" if self.is_lost else ("stopped" if self._stop.is_set() else "alive")
        return f"<Lease {self.id:x} ttl={self.ttl} {state}>"

    # -- loss ------------------------------------------------------------------

    def _set_lost(self, error: EtcdClientError) -> None:
        with self._lock:
            if self._lost.is_set():
                return
            self._error = error
            self._lost.set()
        log.warning("etcd lease %x lost: %s", self.id, error)
        if self._on_lost is not None:
            try:
                self._on_lost(error)
            except Exception:
                log.exception("on_lost callback of lease %x failed", self.id)


def _interval(ttl: int, interval: float | None) -> float:
    every = ttl / 3.0 if interval is None else min(interval, ttl / 3.0)
    if every <= 0:
        raise ValueError(f"a keep-alive interval must be positive, got {interval}")
    return max(every, 0.05)


class KeepAlive:
    """The one thread of a client that keeps its leases alive (see the module doc).

    Started with the first lease (and ended when none is left), it sleeps until one is
    due, then refreshes the due ones (most urgent first) :data:`KEEPALIVE_BATCH` per
    request, each request bounded by the least time one of its leases has left.
    """

    def __init__(self, client: EtcdClient, *, batch: int = KEEPALIVE_BATCH) -> None:
        self._client = client
        self._batch = batch
        self._leases: dict[int, Lease] = {}
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._crashed: BaseException | None = None
        self._thread: threading.Thread | None = None

    def add(self, lease: Lease) -> None:
        """Refresh ``lease`` every ``lease.interval`` seconds from now on."""
        with self._cond:
            if self._crashed is not None:
                raise EtcdLeaseLostError(
                    f"cannot keep lease {lease.id:x} alive: the keep-alive thread died "
                    f"({self._crashed!r})"
                ) from self._crashed
            if self._closed.is_set():
                raise EtcdClientError("the etcd client is closed")
            lease._due = min(lease._due, lease._clock() + lease.interval)
            self._leases[lease.id] = lease
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="etcd-keep-alive", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def remove(self, lease: Lease) -> None:
        """Stop refreshing ``lease`` (a refresh in flight still completes)."""
        with self._cond:
            if self._leases.get(lease.id) is lease:
                del self._leases[lease.id]

    def close(self) -> None:
        """Stop the thread (waiting at most the client's timeout for a request in flight)."""
        with self._cond:
            self._closed.set()
            self._leases.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self._client.timeout + 1.0)
            if thread.is_alive():
                log.warning("the etcd keep-alive thread did not stop in time")

    def __len__(self) -> int:
        return len(self._leases)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            # Never silent: every lease we kept is reported lost, and no new one is taken.
            log.exception("the etcd keep-alive thread crashed")
            with self._cond:
                self._crashed = exc
                leases = list(self._leases.values())
                self._leases.clear()
            for lease in leases:
                error = EtcdLeaseLostError(
                    f"lease {lease.id} ({lease.id:x}) lost: its keep-alive thread crashed: {exc!r}"
                )
                error.__cause__ = exc
                lease._set_lost(error)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed.is_set() or not self._leases:
                    self._thread = None  # idle: the next add() starts a new one
                    return
                # Each lease's own clock (the same monotonic one unless a test injects one).
                waits = [(lease._due - lease._clock(), lease) for lease in self._leases.values()]
                due = [lease for wait, lease in waits if wait <= 0]
                if due:
                    # Those due within a quarter of their interval go along: refreshed a
                    # little early, they join this request instead of each sending its own.
                    due += [lease for wait, lease in waits if 0 < wait <= lease.interval / 4]
                if not due:
                    self._cond.wait(min([1.0, *(wait for wait, _ in waits)]))
                    continue
            due.sort(key=lambda lease: lease.remaining)
            for start in range(0, len(due), self._batch):
                if self._closed.is_set():
                    return
                self._refresh(due[start : start + self._batch])

    def _refresh(self, batch: list[Lease]) -> None:
        """One keep-alive request for ``batch``; reschedule, or report the lost."""
        deadline = min(lease.refresh_deadline() for lease in batch)
        sent = {lease.id: lease._clock() for lease in batch}
        try:
            ttls = self._client.lease_keep_alive_many(
                [lease.id for lease in batch],
                deadline=time.monotonic() + (deadline - batch[0]._clock()),
            )
        except EtcdClientError as exc:
            most = 0.0
            electing = isinstance(exc, NoLeaderError) or "no leader" in str(exc)
            for lease in batch:
                if lease._stop.is_set():
                    continue
                # Sticky until the next success: a member still starting up (no reply)
                # does not disprove the election seen a moment ago.
                lease._leaderless = lease._leaderless or electing
                left = lease.remaining
                if left <= 0 and lease._leaderless:
                    # No member has a leader: nothing expires leases now, and the next
                    # leader renews every lease to its full TTL when elected. Keep
                    # trying, for one more TTL at most (a partition can look the same).
                    left = max(0.0, lease._last_refresh + 2 * lease.ttl - lease._clock())
                if left <= 0:
                    self.remove(lease)
                    lease._set_lost(lease.expired_error(exc))
                    continue
                lease._failures += 1
                lease._due = lease._clock() + min(
                    _MAX_RETRY, max(_MIN_RETRY, left / 4.0), _MIN_RETRY * 2**lease._failures
                )
                most = max(most, left)
            log.warning(
                "keep-alive of %d lease(s) failed (%s); retrying, %.1fs left", len(batch), exc, most
            )
            return
        for lease in batch:
            if ttls.get(lease.id, 0) > 0:
                lease._last_refresh = sent[lease.id]
                lease._due = sent[lease.id] + lease.interval
                lease._failures = 0
                lease._leaderless = False
                continue
            self.remove(lease)
            if not lease._stop.is_set():
                lease._set_lost(_not_found(lease, self._client.endpoint))


def _not_found(lease: Lease, endpoint: str) -> EtcdLeaseNotFoundError:
    return EtcdLeaseNotFoundError(
        f"lease {lease.id} ({lease.id:x}) not found on {endpoint}: it expired or was revoked",
        endpoint=endpoint,
    )


def refresh_many(
    leases: Sequence[Lease], *, timeout: float | None = None
) -> dict[int, EtcdLeaseNotFoundError]:
    """Refresh ``leases`` (all of one client) in one request; those etcd no longer knows.

    Each returned lease is also marked lost (as by :meth:`Lease.refresh`). A transport
    error raises for the whole batch and marks nothing. The request is bounded by the
    least time one of the leases has left (see :meth:`Lease.refresh_deadline`).
    """
    if not leases:
        return {}
    client = leases[0]._client
    now = min(lease._clock() for lease in leases)
    deadline = min(lease.refresh_deadline() for lease in leases)
    ttls = client.lease_keep_alive_many(
        [lease.id for lease in leases], timeout=timeout, deadline=time.monotonic() + deadline - now
    )
    gone: dict[int, EtcdLeaseNotFoundError] = {}
    for lease in leases:
        if ttls.get(lease.id, 0) > 0:
            lease._last_refresh = now
            continue
        error = _not_found(lease, client.endpoint)
        lease._set_lost(error)
        gone[lease.id] = error
    return gone
