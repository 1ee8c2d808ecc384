"""The leader's decision loop: its private watch of the whole run prefix, its deadlines,
and the refresh of the leader lease (only this loop refreshes it: a wedged loop loses the
leadership within the lease's TTL)."""

from __future__ import annotations

import functools

from etcd_rendezvous.client import (
    Watch,
)
from etcd_rendezvous.errors import (
    EtcdClientError,
    EtcdLeaseNotFoundError,
)
from etcd_rendezvous.rendezvous import _machine as m
from etcd_rendezvous.rendezvous._core import Core, _LeaderWatch, log
from etcd_rendezvous.rendezvous._errors import (
    RendezvousError,
)
from etcd_rendezvous.rendezvous._observe import key_event
from etcd_rendezvous.rendezvous._threads import guarded

# Seconds before a failed leader-lease refresh is tried again.
_REFRESH_RETRY = 0.1


class LeaderLoop(Core):
    """The decision loop a leading node runs on its own thread."""

    def _start_leading(self, prefix: str, start_revision: int) -> None:
        """Open the private watch from ``start_revision`` in a new decision loop thread
        (the previous loop, if any, ends by itself once its watch is cancelled)."""
        watch = _LeaderWatch(prefix, start_revision)
        old, self._watch = self._watch, watch
        if old is not None:
            old.cancel()
        self._thread = guarded(
            functools.partial(self._lead, watch),
            self._thread_died,
            name=f"rendezvous {self.run_id} {self.node_id}",
        )
        self._thread.start()

    def _lead(self, leading: _LeaderWatch) -> None:
        """The leader's decision loop, on its private watch of the whole run prefix."""
        try:
            opened = self._etcd(
                self._client.watch,
                leading.prefix,
                prefix=True,
                start_revision=leading.start_revision,
            )
            if not leading.attach(opened):
                return  # stepped down or stopped while the watch was being created
            watch = leading
            while not self._stopping.is_set():
                with self._lock:
                    if self._watch is not watch:
                        return  # stepped down, or a newer watch (and loop) took over
                    deadline = m.next_deadline(self.config, self._state)
                    lease = self._leader_lease
                now = self._clock()
                wake = now + 1.0
                if deadline is not None:
                    wake = min(wake, deadline)
                if lease is not None:
                    wake = min(wake, self._leader_refreshed + self.keepalive_interval)
                try:
                    events = self._read(opened, max(0.0, wake - now))
                    failure: EtcdClientError | None = None
                except EtcdClientError as exc:  # the watch gave up, or history was compacted
                    events, failure = [], exc
                with self._cond:
                    if self._stopping.is_set() or self._watch is not watch:
                        continue
                    if failure is not None:
                        log.warning(
                            "leader watch of %s failed (%s); resyncing", self.run_id, failure
                        )
                        self._resync(m.Scope.ALL)
                        continue
                    self._refresh_leadership()
                    if self._watch is not watch:
                        pass  # stepped down (leader lease lost): this watch is done
                    elif events:
                        self._feed_batch(events)
                    elif deadline is not None and self._clock() >= deadline:
                        self._feed(m.Tick())
                    if (
                        self._watch is watch
                        and m.scope(self.config, self._state) is m.Scope.CONTROL
                    ):
                        self._resync(m.Scope.CONTROL)
                    self._cond.notify_all()
                self._dispatch()
        except RendezvousError as exc:
            self._fatal(exc)
        except EtcdClientError as exc:
            self._fatal(self._connection_error(exc))

    def _read(self, watch: Watch, timeout: float) -> list[m.Event]:
        """Everything the private watch has ready, waiting up to ``timeout`` for the first."""
        event = watch.next_event(timeout=timeout)
        events: list[m.Event] = []
        while event is not None:
            kv = event.kv
            decoded = key_event(
                self.keys,
                kv.key.decode("utf-8", "replace"),
                kv.value if event.type == "PUT" else None,
                create_revision=kv.create_revision,
                mod_revision=kv.mod_revision,
            )
            self._rev = max(self._rev, kv.mod_revision)
            if decoded is not None:
                events.append(decoded)
            event = watch.next_event(timeout=0)
        return events

    def _refresh_leadership(self) -> None:
        """Keep the leader key alive; called from the decision loop only (see the module doc)."""
        lease = self._leader_lease
        if lease is None or self._state.leader != self.node_id:
            return
        now = self._clock()
        if now < self._leader_refreshed + self.keepalive_interval:
            return
        try:
            # No I/O slot: a keep-alive must not queue behind requests stuck on a hung
            # member. The refresh is bounded by the time the lease has left (split
            # between the endpoints), not by the client's full timeout.
            lease.refresh()
        except EtcdLeaseNotFoundError:
            log.warning(
                "node %s lost the leadership of rendezvous %s: its leader lease expired",
                self.node_id,
                self.run_id,
            )
            self._leader_lease = None  # the leader key went with it
            self._feed(m.LeaderLeaseLost())  # the machine decides (row leader-lease-lost)
        except EtcdClientError as exc:
            log.warning("node %s could not refresh its leader lease: %s", self.node_id, exc)
            # Try again shortly, not on every pass of the loop: a refusal comes back at
            # once, and an unreachable etcd must not turn this loop into a busy one.
            self._leader_refreshed = now - self.keepalive_interval + _REFRESH_RETRY
        else:
            self._leader_refreshed = now

    def _thread_died(self, error: BaseException) -> None:
        """The decision loop raised something it does not handle: fail every caller."""
        self._fatal(self._died_error("the leader's decision loop", error))


__all__ = ["LeaderLoop"]
