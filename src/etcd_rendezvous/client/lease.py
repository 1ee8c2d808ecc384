"""Leases kept alive in the background, whose loss is always reported.

A :class:`Lease` refreshes itself every ``ttl / 3`` seconds from a daemon
thread. A failed refresh is retried quickly (the client fails over to other
endpoints); the lease is declared lost when etcd says it no longer exists, or
when no refresh succeeded for a whole TTL. Loss is then visible four ways:
:attr:`Lease.is_lost`, :attr:`Lease.error`, :meth:`Lease.wait_lost` and the
``on_lost(error)`` callback. It is never silent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

from etcd_rendezvous.errors import (
    EtcdClientError,
    EtcdLeaseLostError,
    EtcdLeaseNotFoundError,
)

if TYPE_CHECKING:
    from etcd_rendezvous.client.client import EtcdClient

log = logging.getLogger(__name__)

# A failed keep-alive is retried after at most this long (and at least _MIN_RETRY).
_MAX_RETRY = 0.5
_MIN_RETRY = 0.02
# Each keep-alive request waits at least this long for one endpoint's reply.
_MIN_REQUEST_TIMEOUT = 0.5


class Lease:
    """A granted lease; create it with :meth:`EtcdClient.lease`.

    ``id`` is what to pass as ``lease=`` to puts; ``ttl`` is the TTL etcd
    granted. As a context manager it revokes the lease on exit (deleting its
    keys); :meth:`close` only stops the keep-alive (the lease then expires).
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
        self._thread: threading.Thread | None = None
        if keep_alive:
            self._thread = threading.Thread(
                target=self._keep_alive, name=f"etcd-lease {lease_id:x}", daemon=True
            )
            self._thread.start()

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

    def refresh(self) -> int:
        """Refresh now; return the new TTL. Raises (and reports loss) when it is gone."""
        sent = self._clock()
        try:
            ttl = self._client.lease_keep_alive_once(self.id)
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
        """Stop the keep-alive thread without revoking; idempotent."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # At worst one keep-alive in flight: each endpoint's timeout, then it stops.
            thread.join(timeout=self._client.timeout * len(self._client.endpoints) + 1.0)
            if thread.is_alive():
                log.warning("keep-alive thread of lease %x did not stop in time", self.id)
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

    # -- keep-alive thread ---------------------------------------------------

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

    def _keep_alive(self) -> None:
        interval = max(self.ttl / 3.0, 0.05)
        wait = interval
        failures = 0
        while not self._stop.wait(wait):
            sent = self._clock()
            try:
                # A hung member must not cost the lease: give each endpoint a share
                # of the time left, then the client tries the next one.
                per_endpoint = max(_MIN_REQUEST_TIMEOUT, self.remaining / 3.0)
                self._client.lease_keep_alive_once(self.id, timeout=per_endpoint)
            except EtcdLeaseNotFoundError as exc:
                if not self._stop.is_set():
                    self._set_lost(exc)
                return
            except EtcdClientError as exc:
                if self._stop.is_set():
                    return
                failures += 1
                left = self.remaining
                if left <= 0:
                    self._set_lost(self.expired_error(exc))
                    return
                wait = min(_MAX_RETRY, max(_MIN_RETRY, left / 4.0), _MIN_RETRY * 2**failures)
                log.warning(
                    "keep-alive of lease %x failed (%s); retrying, %.1fs left", self.id, exc, left
                )
                continue
            except Exception as exc:
                # A bug or an unexpected reply: report it rather than die silently.
                self._set_lost(
                    EtcdLeaseLostError(f"keep-alive of lease {self.id:x} crashed: {exc!r}")
                )
                raise
            self._last_refresh = sent
            failures = 0
            wait = interval


def refresh_many(
    leases: Sequence[Lease], *, timeout: float | None = None
) -> dict[int, EtcdLeaseNotFoundError]:
    """Refresh ``leases`` (all of one client) in one request; those etcd no longer knows.

    Each returned lease is also marked lost (as by :meth:`Lease.refresh`). A transport
    error raises for the whole batch and marks nothing.
    """
    if not leases:
        return {}
    client = leases[0]._client
    sent = min(lease._clock() for lease in leases)
    ttls = client.lease_keep_alive_many([lease.id for lease in leases], timeout=timeout)
    gone: dict[int, EtcdLeaseNotFoundError] = {}
    for lease in leases:
        if ttls.get(lease.id, 0) > 0:
            lease._last_refresh = sent
            continue
        error = EtcdLeaseNotFoundError(
            f"lease {lease.id} ({lease.id:x}) not found on {client.endpoint}: "
            "it expired or was revoked",
            endpoint=client.endpoint,
        )
        lease._set_lost(error)
        gone[lease.id] = error
    return gone
