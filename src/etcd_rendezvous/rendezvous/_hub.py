"""What the nodes of one run in one process share: a ``ctl/`` watch, lease keep-alives, I/O slots.

N :class:`~etcd_rendezvous.rendezvous.engine.Rendezvous` objects of the same run on the
same :class:`EtcdClient` (N simulated nodes, or a process hosting several agents) would
otherwise hold N watch streams, N reader threads, N keep-alive threads and N loop
threads, and open far more concurrent requests than the client's connection pool keeps
(every extra one is a connection opened and thrown away). A :class:`Hub` has instead:

* one watch on the run's ``ctl/`` prefix and one thread that reads it in batches and
  hands every batch to each attached node (the leader is detached: it watches the whole
  run prefix itself, see ``_leader.py``);
* the node leases, all kept alive by the client's one keep-alive loop (:class:`LeaseKeeper`);
* a semaphore bounding concurrent etcd requests to the size of the connection pool;
* what it learned of the leader key, so that N nodes seeing a vacancy send one
  leader-create txn, not N.

Hubs are found by :func:`hub_for` and stop when their last node unregisters.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from etcd_rendezvous.client import EtcdClient, Lease, Retry, Watch
from etcd_rendezvous.errors import (
    EtcdClientError,
)
from etcd_rendezvous.rendezvous._errors import RendezvousError
from etcd_rendezvous.rendezvous._machine import Event, LeaderChanged
from etcd_rendezvous.rendezvous._observe import key_event
from etcd_rendezvous.rendezvous._records import ConfigRecord, Keys
from etcd_rendezvous.rendezvous._threads import guarded

if TYPE_CHECKING:
    from etcd_rendezvous.rendezvous.engine import Rendezvous

log = logging.getLogger(__name__)

IO_SLOTS = 16
"""Concurrent etcd requests per hub: the client's connection pool keeps 16 connections."""

Batch = list[tuple[int, Event | RendezvousError]]
"""(revision, machine event or the decoding error) in watch order."""


class LeaseKeeper:
    """The node leases of one hub, kept alive by their client's keep-alive loop.

    There is one keep-alive loop per client (:class:`~etcd_rendezvous.client.lease.
    KeepAlive`): it refreshes many leases per request, bounds each refresh by the time
    its leases have left, and never waits for one of the hub's I/O slots (a keep-alive
    must not queue behind requests stuck on a hung member). This only remembers which
    leases the hub's nodes handed over, so that :meth:`stop` lets go of them all.

    A lease that etcd no longer knows, or that no refresh reached for a whole TTL, is
    reported once through its ``on_lost`` callback and dropped.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._leases: dict[int, Lease] = {}
        self._lock = threading.Lock()
        self._stopped = False

    def add(
        self,
        lease: Lease,
        on_lost: Callable[[EtcdClientError], None],
        *,
        interval: float | None = None,
    ) -> None:
        with self._lock:
            if self._stopped:
                raise EtcdClientError(f"the keep-alive of rendezvous {self._name} was stopped")
            self._leases[lease.id] = lease
        lease.keep_alive(on_lost=on_lost, interval=interval)

    def remove(self, lease: Lease) -> None:
        """Stop refreshing ``lease`` (not revoked: it expires unless revoked)."""
        with self._lock:
            self._leases.pop(lease.id, None)
        lease.close()

    def stop(self) -> None:
        """Stop refreshing every lease still here."""
        with self._lock:
            self._stopped = True
            leases, self._leases = list(self._leases.values()), {}
        for lease in leases:
            lease.close()


class Hub:
    """The shared watch, keep-alive and I/O slots of one run on one client (see module doc)."""

    def __init__(self, client: EtcdClient, keys: Keys, retry: Retry) -> None:
        self.client = client
        self.keys = keys
        self.io = threading.BoundedSemaphore(IO_SLOTS)
        self.keeper = LeaseKeeper(keys.run_id)
        self._retry = retry
        self._lock = threading.Lock()
        self._registered: set[Rendezvous] = set()
        self._attached: list[Rendezvous] = []
        self._leader_put = 0  # revision of the newest leader-key PUT this process knows of
        self.config: ConfigRecord | None = None  # the run's settings, once a node read them
        self._stopping = threading.Event()
        self._watch: Watch | None = None
        self._thread: threading.Thread | None = None

    # --- membership ------------------------------------------------------------------

    def _register(self, node: Rendezvous) -> None:
        """Count ``node`` in (under ``_hubs_lock``); the first one starts the watch."""
        with self._lock:
            if self._thread is None:
                self._watch = self._open_watch()  # before any node reads: nothing is missed
                self._thread = guarded(
                    self._run, self._died, name=f"rendezvous-hub {self.keys.run_id}"
                )
                self._thread.start()
            self._registered.add(node)

    def unregister(self, node: Rendezvous) -> None:
        """Count ``node`` out; the last one stops the hub."""
        with _hubs_lock, self._lock:
            self._registered.discard(node)
            if node in self._attached:
                self._attached.remove(node)
            if self._registered or self._stopping.is_set():
                return
            self._stopping.set()
            watch, self._watch = self._watch, None
            self._thread = None
            if _hubs.get(_hub_key(self.client, self.keys)) is self:
                del _hubs[_hub_key(self.client, self.keys)]
        # Not joined: the caller may hold a node's lock that these threads are waiting
        # for. Both end promptly on their own (the watch's queue ends, the keeper wakes).
        if watch is not None:
            watch.cancel()
        self.keeper.stop()

    def attach(self, node: Rendezvous) -> None:
        """Deliver ``ctl/`` batches to ``node`` from now on (it filters by its own floor)."""
        with self._lock:
            if node not in self._attached:
                self._attached.append(node)

    def detach(self, node: Rendezvous) -> None:
        with self._lock:
            if node in self._attached:
                self._attached.remove(node)

    # --- the leader key ----------------------------------------------------------------

    def leader_known_after(self, revision: int) -> bool:
        """Has a leader been created after ``revision`` (so a vacancy seen then is over)?"""
        return self._leader_put > revision

    def leader_created(self, revision: int) -> None:
        self._leader_put = max(self._leader_put, revision)

    # --- the watch thread ----------------------------------------------------------------

    def _open_watch(self, start_revision: int | None = None) -> Watch:
        return self.client.watch(self.keys.ctl, prefix=True, start_revision=start_revision)

    def _run(self) -> None:
        while not self._stopping.is_set():
            watch = self._watch
            if watch is None:
                return
            try:
                batch = self._read(watch)
            except EtcdClientError as exc:
                if self._stopping.is_set():
                    return
                self._recover(exc)
                continue
            if not batch:
                continue
            with self._lock:
                nodes = list(self._attached)
            for node in nodes:
                node._take(batch)

    def _died(self, exc: BaseException) -> None:
        """The reader thread raised: fail every node of the hub with the cause, and stop."""
        with self._lock:
            nodes = list(self._registered)
            self._stopping.set()
            watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
        for node in nodes:
            node._hub_failed(exc)

    def _read(self, watch: Watch) -> Batch:
        """Everything the watch has ready (waiting up to 1 s for the first event)."""
        event = watch.next_event(timeout=1.0)
        batch: Batch = []
        while event is not None:
            kv = event.kv
            key = kv.key.decode("utf-8", "replace")
            value = kv.value if event.type == "PUT" else None
            try:
                decoded = key_event(
                    self.keys,
                    key,
                    value,
                    create_revision=kv.create_revision,
                    mod_revision=kv.mod_revision,
                )
            except RendezvousError as exc:
                batch.append((kv.mod_revision, exc))
            else:
                if decoded is not None:
                    if isinstance(decoded, LeaderChanged) and decoded.holder is not None:
                        self.leader_created(kv.mod_revision)
                    batch.append((kv.mod_revision, decoded))
            event = watch.next_event(timeout=0)
        return batch

    def _recover(self, error: EtcdClientError) -> None:
        """The watch gave up (or history was compacted): watch again, every node resyncs."""
        log.warning("rendezvous %s: watch on ctl/ failed (%s); resyncing", self.keys.run_id, error)
        retry = self._retry.copy()
        while not self._stopping.is_set():
            try:
                watch = self._open_watch()
            except EtcdClientError as exc:
                if not retry.sleep(self._stopping):
                    with self._lock:
                        nodes = list(self._registered)
                    for node in nodes:
                        node._hub_failed(exc)
                    self._stopping.set()
                    return
                continue
            with self._lock:
                old, self._watch = self._watch, watch
                nodes = list(self._attached)
            if old is not None:
                old.cancel()
            for node in nodes:
                node._hub_resync()
            return


_hubs: dict[tuple[int, str], Hub] = {}
_hubs_lock = threading.Lock()


def _hub_key(client: EtcdClient, keys: Keys) -> tuple[int, str]:
    return (id(client), client.namespace.decode("utf-8", "replace") + keys.root)


def hub_for(client: EtcdClient, keys: Keys, retry: Retry, node: Rendezvous) -> Hub:
    """The hub of ``keys``'s run on ``client`` (created on first use), ``node`` counted in."""
    with _hubs_lock:
        hub = _hubs.get(_hub_key(client, keys))
        if hub is None or hub._stopping.is_set():
            hub = Hub(client, keys, retry)
        try:
            hub._register(node)
        except BaseException:
            if not hub._registered:
                hub.keeper.stop()
            raise
        _hubs[_hub_key(client, keys)] = hub
        return hub


__all__ = ["IO_SLOTS", "Batch", "Hub", "LeaseKeeper", "hub_for"]
