"""Performing the machine's actions against etcd, and reporting their outcomes.

Each action is carried out here; one whose outcome the machine must decide on returns
it as an event (``PutNodeFailed``, ``NodeKeyHeld``, ``NodeKeyDeleted``,
``DeleteRefused``, ``DeleteFailed``, ``CommitLost``, and from a full read
``LeaderKeyStale``), which :meth:`Core._perform` feeds back (the decision loop reports
``LeaderLeaseLost``). Every write is
guarded (a txn compare on a lease, a revision or an absent key) or writes the same value
again, so that a resend after a lost reply is harmless.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import TYPE_CHECKING, cast

from etcd_rendezvous.client import (
    Compare,
    Lease,
    Op,
    RangeResponse,
    Retry,
    TxnResponse,
)
from etcd_rendezvous.errors import (
    EtcdClientError,
    EtcdLeaseNotFoundError,
    EtcdTimeoutError,
    EtcdUnavailableError,
)
from etcd_rendezvous.rendezvous import _machine as m
from etcd_rendezvous.rendezvous import _probe
from etcd_rendezvous.rendezvous._core import Core, log
from etcd_rendezvous.rendezvous._core import utc_now as _utc_now
from etcd_rendezvous.rendezvous._errors import (
    RendezvousClosedError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousLeftError,
    RendezvousTimeoutError,
)
from etcd_rendezvous.rendezvous._observe import snapshot
from etcd_rendezvous.rendezvous._records import (
    ClosedRecord,
    LeaderRecord,
    NodeRecord,
    RoundRecord,
    StatusRecord,
    decode,
    decode_as,
    encode,
)

if TYPE_CHECKING:
    from etcd_rendezvous.rendezvous.engine import Rendezvous

_FAILURES: dict[m.Failure, type[RendezvousError]] = {
    m.Failure.TIMEOUT: RendezvousTimeoutError,
    m.Failure.CLOSED: RendezvousClosedError,
    m.Failure.GRACEFUL_EXIT: RendezvousGracefulExitError,
    m.Failure.LEFT: RendezvousLeftError,
    m.Failure.LEASE_LOST: RendezvousLeftError,
    m.Failure.ETCD: RendezvousError,
}


class Executor(Core):
    """Carries out the machine's actions (the only writer to etcd besides the keeper)."""

    def _do(self, action: m.Action) -> m.Event | None:
        """Perform one action; the event reporting its outcome, if the machine needs it."""
        client, keys = self._client, self.keys
        outcome: m.Event | None = None
        if isinstance(action, m.PutNode):
            outcome = self._put_node(action)
        elif isinstance(action, m.DeleteNode):
            outcome = self._delete_node(action)
        elif isinstance(action, m.RevokeLease):
            if action.farewell is not None and self._lease_ok() and self._lease is not None:
                self._farewell(action.farewell, self._lease.id)
            self._drop_leadership()
            lease, self._lease = self._lease, None
            if lease is not None:
                if self._hub is not None:
                    self._hub.keeper.remove(lease)
                # Retried for one TTL at most: by then etcd has dropped the lease anyway
                # (e.g. the agent hosting an embedded etcd stopped it before we left).
                with contextlib.suppress(EtcdLeaseNotFoundError):
                    self._etcd_with(
                        Retry(deadline=float(self.lease_ttl), max_delay=0.5), lease.revoke
                    )
        elif isinstance(action, m.RevokeStale):
            log.warning(
                "node %s restarted: revoking its previous lease %x", self.node_id, action.lease
            )
            try:
                with contextlib.suppress(EtcdLeaseNotFoundError):
                    self._etcd(self._client.lease_revoke, action.lease)
            except EtcdClientError as exc:  # the put that follows finds the key held still
                log.warning(
                    "node %s could not revoke lease %x: %s", self.node_id, action.lease, exc
                )
        elif isinstance(action, m.AcquireLeadership):
            self._acquire()
        elif isinstance(action, m.Resync):
            self._resync(action.scope)
        elif isinstance(action, m.CommitRound):
            outcome = self._commit(action)
        elif isinstance(action, m.PublishStatus):
            if self._leader_lease is not None:
                self._etcd(
                    client.txn,
                    [Compare.lease(keys.leader, "==", self._leader_lease.id)],
                    [Op.put(keys.status, encode(action.record))],
                )
        elif isinstance(action, m.PutClosed):
            self._put_closed()
        elif isinstance(action, m.ProbeNodes):
            prober = _probe.prober()
            for node_id, probe in action.targets:
                prober.submit(probe, functools.partial(self._probed, node_id, probe))
        elif isinstance(action, m.Deliver):
            self._result = action.assignment
            log.info(
                "node %s joined round %d of rendezvous %s as rank %d of %d (%s)",
                self.node_id,
                action.assignment.round,
                self.run_id,
                action.assignment.rank,
                action.assignment.world_size,
                action.assignment.reason or "no reason given",
            )
        elif isinstance(action, m.Fail):
            error = _FAILURES[action.failure]
            self._result = error(
                f"rendezvous {self.run_id!r}, node {self.node_id!r}: {action.message}",
                run_id=self.run_id,
            )
            self._result.__cause__, self._cause = self._cause, None
        elif isinstance(action, m.Notify):
            self._changes.append(action.change)
            self._outbox.append(action.change)
        self._cond.notify_all()
        return outcome

    def _probed(self, node_id: str, probe: str, verdict: _probe.Verdict) -> None:
        """A late member's (or the leader's) probe came back, on a prober thread: if its
        process is gone, revoke the leases of its node key and of any leadership it holds
        (each only if the key still carries that process's probe: not a new incarnation)."""
        if verdict is not _probe.Verdict.GONE or self._stopping.is_set():
            log.debug("node %s: probe of %s: %s", self.node_id, node_id, verdict.value)
            return
        try:
            leases: list[int] = []
            for key in (self.keys.node(node_id), self.keys.leader):
                with self._slots():
                    response = self._client.range(key)
                if not response.kvs or not response.kvs[0].lease:
                    continue
                kv = response.kvs[0]
                record = decode(kv.value, key=key, run_id=self.run_id)
                if (
                    isinstance(record, NodeRecord | LeaderRecord)
                    and record.node_id == node_id
                    and record.probe == probe
                ):
                    leases.append(kv.lease)
            if not leases:
                return
            log.info(
                "rendezvous %s: node %s is gone (its process no longer listens at %s); "
                "revoking its lease%s %s",
                self.run_id,
                node_id,
                probe.partition("@")[2],
                "s" if len(leases) > 1 else "",
                ", ".join(f"{lease:x}" for lease in leases),
            )
            for lease in leases:
                with self._slots(), contextlib.suppress(EtcdLeaseNotFoundError):
                    self._client.lease_revoke(lease)
        except (EtcdClientError, RendezvousError) as exc:
            log.warning("node %s: could not evict dead node %s: %s", self.node_id, node_id, exc)

    def _delete_node(self, action: m.DeleteNode) -> m.Event:
        """Delete our node key (a join gave up). With ``if_round_revision``: only while no
        newer round is committed; a newer one that includes us refuses the deletion (the
        key stays: we are a member), one without us does not stop it. Both txns are
        guarded, so a resend after a lost reply is harmless."""
        if self._lease is None:
            return m.NodeKeyDeleted()  # no lease, no key
        keys = self.keys
        key = keys.node(self.node_id)
        owned = Compare.lease(key, "==", self._lease.id)
        try:
            if action.if_round_revision is not None:
                response = self._etcd(
                    self._client.txn,
                    [owned, Compare.mod_revision(keys.round, "==", action.if_round_revision)],
                    [Op.delete(key)],
                    [Op.get(keys.round)],
                )
                if response.succeeded:
                    return m.NodeKeyDeleted()
                read = response.responses[0] if response.responses else None
                if isinstance(read, RangeResponse) and read.kvs:
                    kv = read.kvs[0]
                    if kv.mod_revision != action.if_round_revision:
                        record = decode_as(
                            RoundRecord, kv.value, key=keys.round, run_id=self.run_id
                        )
                        if self.node_id in record.members:
                            log.info(
                                "node %s: join timed out as round %d of rendezvous %s was "
                                "committed with it; taking that round",
                                self.node_id,
                                record.round,
                                self.run_id,
                            )
                            return m.DeleteRefused(record, kv.mod_revision)
            self._etcd(self._client.txn, [owned], [Op.delete(key)])
        except (EtcdClientError, RendezvousError) as exc:
            log.warning("node %s could not delete its node key: %s", self.node_id, exc)
            self._cause = exc
            return m.DeleteFailed(str(exc))
        return m.NodeKeyDeleted()

    def _farewell(self, record: NodeRecord, lease_id: int) -> None:
        """Mark our key as leaving (one guarded put), so that the leader tells a clean
        leave from a lost node; best effort: the revoke that follows removes it anyway."""
        key = self.keys.node(self.node_id)
        try:
            with self._slots():
                self._client.txn(
                    [Compare.lease(key, "==", lease_id)],
                    [Op.put(key, encode(record), lease=lease_id)],
                )
        except EtcdClientError as exc:
            log.debug("node %s could not mark its key as leaving: %s", self.node_id, exc)

    def _acquire(self) -> None:
        """Try to create the leader key, attached to a leader lease of its own.

        The create is guarded on the key's absence; a resend after a lost reply fails that
        guard on our own key, so the failure branch reads the key back: under our lease, it
        was applied. (The machine learns that we lead from the watch, as always.) A lease
        grant whose reply was lost and is resent may leave an unused lease in etcd: it
        holds no key and expires within its TTL."""
        if not self._lease_ok() or self._stopping.is_set():
            return
        hub = self._hub
        if hub is not None and hub.leader_known_after(self._rev):
            return  # another node of this process already filled the vacancy we saw
        lease = self._leader_lease
        if lease is None or lease.is_lost or lease.remaining < lease.ttl / 2.0:
            lease = self._etcd(self._client.lease, self.lease_ttl, keep_alive=False)
            lease.close()  # no keep-alive thread: the decision loop refreshes it
            self._leader_lease = lease
        self._leader_refreshed = self._clock()
        keys = self.keys
        put = Op.put(keys.leader, encode(LeaderRecord(self.node_id, self.probe)), lease=lease.id)
        try:
            response = self._etcd(
                self._client.txn,
                [Compare.create_revision(keys.leader, "==", 0)],
                [put],
                [Op.get(keys.leader)],
            )
        except EtcdLeaseNotFoundError:
            # Our leader lease was revoked or expired before its refresh noticed (e.g. a
            # peer's probe took us for gone): the vacancy we saw is that very key's; try
            # again with a new lease, once (the txn is guarded on the key's absence).
            log.info("node %s: leader lease %x is gone; taking a new one", self.node_id, lease.id)
            lease = self._leader_lease = self._etcd(
                self._client.lease, self.lease_ttl, keep_alive=False
            )
            lease.close()
            put = Op.put(
                keys.leader, encode(LeaderRecord(self.node_id, self.probe)), lease=lease.id
            )
            response = self._etcd(
                self._client.txn,
                [Compare.create_revision(keys.leader, "==", 0)],
                [put],
                [Op.get(keys.leader)],
            )
        revision = response.revision if response.succeeded else 0
        if not response.succeeded:
            # A resend after a lost reply fails its guard on our own key: read back who
            # holds it (the failure branch's get) and compare with our lease.
            read = response.responses[0] if response.responses else None
            if isinstance(read, RangeResponse) and read.kvs and read.kvs[0].lease == lease.id:
                revision = read.kvs[0].create_revision
                log.info(
                    "node %s: the reply to its leader-key create was lost; it was applied "
                    "(revision %d)",
                    self.node_id,
                    revision,
                )
        if revision:
            if hub is not None:
                hub.leader_created(revision)
            log.info("node %s leads rendezvous %s", self.node_id, self.run_id)

    def _put_node(self, action: m.PutNode) -> m.Event | None:
        """Write our node key; the failure, if any, as an event (nothing on success).

        Every write here is guarded (our lease, or an absent key) or revokes first, so a
        resend after a lost reply cannot put a stale record over a newer one."""
        try:
            outcome = self._put_node_once(action)
        except (EtcdClientError, RendezvousError) as exc:
            maybe = isinstance(exc, EtcdUnavailableError | EtcdTimeoutError)
            log.warning(
                "node %s could not write its node key%s: %s",
                self.node_id,
                " (it may have been written)" if maybe else "",
                exc,
            )
            self._cause = exc
            return m.PutNodeFailed(str(exc), maybe_applied=maybe)
        return outcome

    def _put_node_once(self, action: m.PutNode) -> m.Event | None:
        lease = self._lease if self._lease is not None and self._lease_ok() else self._new_lease()
        key = self.keys.node(self.node_id)
        try:
            response = self._put_node_txn(key, action.record, lease.id)
        except EtcdLeaseNotFoundError:
            # Expired before the keeper noticed (e.g. this process was paused past the
            # TTL): our key is gone with it; join with a new lease.
            log.warning("node %s: lease %x expired; joining with a new one", self.node_id, lease.id)
            if self._hub is not None:
                self._hub.keeper.remove(lease)
            lease.close()
            lease = self._new_lease()
            response = self._put_node_txn(key, action.record, lease.id)
        inner = response.responses[0] if response.responses else None
        if response.succeeded or (isinstance(inner, TxnResponse) and inner.succeeded):
            return None
        held = inner.responses[0] if isinstance(inner, TxnResponse) and inner.responses else None
        old = held.kvs[0].lease if isinstance(held, RangeResponse) and held.kvs else 0
        if old:
            # The same node id under another lease: our previous incarnation (a restart);
            # the machine decides (row put-held: revoke it, then put ours, guarded again).
            return m.NodeKeyHeld(old)
        return m.PutNodeFailed(
            f"{key!r} exists without a lease: it was not written by a node of this "
            "rendezvous; delete it or use another node id"
        )

    def _put_node_txn(self, key: str, record: NodeRecord, lease_id: int) -> TxnResponse:
        """Put our key if it is ours or absent (one request for a first join or a rejoin)."""
        put = Op.put(key, encode(record), lease=lease_id)
        return self._etcd(
            self._client.txn,
            [Compare.lease(key, "==", lease_id)],
            [put],
            [Op.txn([Compare.create_revision(key, "==", 0)], [put], [Op.get(key)])],
        )

    def _commit(self, action: m.CommitRound) -> m.Event | None:
        """Commit the round in one txn guarded on the previous round and on our leader
        lease. A resend after a lost reply fails its guard: its failure branch reads the
        round back, and finding our own record there means the first attempt was applied
        (a success: the watch delivers the round); anything else is ``CommitLost``."""
        keys = self.keys
        if self._leader_lease is None:
            return m.CommitLost()  # our leadership expired: the resync says who leads now
        record = dataclasses.replace(action.record, time=_utc_now())
        guard = (
            Compare.create_revision(keys.round, "==", 0)
            if action.prev_revision == 0
            else Compare.mod_revision(keys.round, "==", action.prev_revision)
        )
        value = encode(record)
        response = self._etcd(
            self._client.txn,
            [guard, Compare.lease(keys.leader, "==", self._leader_lease.id)],
            [Op.put(keys.round, value)],
            [Op.get(keys.round)],
        )
        applied = response.succeeded
        if not applied:
            # A resend after a lost reply fails its guard on our own commit: the failure
            # branch read the round back; our record (its time is ours) means applied.
            read = response.responses[0] if response.responses else None
            if isinstance(read, RangeResponse) and read.kvs and read.kvs[0].value == value:
                applied = True
                log.info(
                    "node %s: the reply to its commit of round %d was lost; it was applied "
                    "(revision %d)",
                    self.node_id,
                    record.round,
                    read.kvs[0].mod_revision,
                )
        if applied:
            log.info(
                "node %s committed round %d of rendezvous %s: %d members, causes %s, "
                "completed by %s (%s)",
                self.node_id,
                record.round,
                self.run_id,
                len(record.members),
                ",".join(record.causes),
                record.completion,
                record.reason,
            )
            return None
        log.debug("commit of round %d lost a race; resyncing", record.round)
        return m.CommitLost()

    def _put_closed(self) -> None:
        self._etcd(
            self._client.txn,
            [Compare.create_revision(self.keys.closed, "==", 0)],
            [Op.put(self.keys.closed, encode(ClosedRecord(self.node_id, _utc_now())))],
        )

    def _resync(self, scope: m.Scope) -> None:
        """Read everything in ``scope`` at one revision, then follow it from the next one.

        CONTROL: the hub's shared ``ctl/`` watch feeds us (events up to the read's revision
        are skipped). ALL (we lead): a private watch of the whole run prefix, read by our
        own decision loop.
        """
        hub = self._hub
        if scope is m.Scope.CONTROL:
            old, self._watch = self._watch, None
            if old is not None:
                old.cancel()  # its loop ends by itself
            if hub is not None:
                # before the read, so nothing after it is missed
                hub.attach(cast("Rendezvous", self))
            prefix = self.keys.ctl
        else:
            if hub is not None:
                hub.detach(cast("Rendezvous", self))
            prefix = self.keys.root
        response = self._etcd(self._client.range, prefix, prefix=True)
        kvs = [
            (kv.key.decode("utf-8", "replace"), kv.value, kv.create_revision, kv.mod_revision)
            for kv in response.kvs
        ]
        snap = snapshot(self.keys, response.revision, kvs, with_nodes=scope is m.Scope.ALL)
        prober = _probe.prober()  # verify probe addresses in the background, before need
        for probe in [e.probe for e in (snap.nodes or {}).values()] + [snap.leader_probe]:
            if probe and probe != self.probe:
                prober.learn(probe)
        self._floor = self._rev = response.revision
        if scope is m.Scope.ALL:
            stale = next(
                (kv.lease for kv in response.kvs if kv.key == self.keys.leader.encode()), 0
            )
            mine = self._leader_lease.id if self._leader_lease is not None else 0
            if snap.leader == self.node_id and stale not in (0, mine):
                # Our node id leads under a lease not ours: a previous incarnation (before
                # a restart). The machine decides (row leader-stale: revoke it, re-read).
                log.info(
                    "node %s: the leader key is held in its name under lease %x, not ours",
                    self.node_id,
                    stale,
                )
                self._feed(m.LeaderKeyStale(stale))
                return
            if not self._stopping.is_set():
                # The decision loop opens the watch (from the read's revision on: nothing
                # is missed) while we decide on the snapshot: a full round commits without
                # waiting for the watch stream to come up (~20 ms on the gateway).
                self._start_leading(prefix, response.revision + 1)
        self._feed(snap)

    def _drop_leadership(self) -> None:
        """Revoke the leader lease, so that the leader key (if ours) vanishes at once."""
        lease, self._leader_lease = self._leader_lease, None
        if lease is not None and self._state.leader == self.node_id:
            try:
                with self._slots():
                    lease.revoke()
            except EtcdClientError as exc:  # it expires by itself within its TTL
                log.warning("node %s could not revoke its leader lease: %s", self.node_id, exc)

    def _read_status(self) -> StatusRecord | None:
        kv = self._etcd(self._client.get, self.keys.status)
        if kv is None:
            return None
        return decode_as(StatusRecord, kv.value, key=self.keys.status, run_id=self.run_id)

    def _new_lease(self) -> Lease:
        lease = self._etcd(self._client.lease, self.lease_ttl, keep_alive=False)
        self._lease = lease
        if self._hub is not None:
            self._hub.keeper.add(
                lease,
                lambda error: self._on_lease_lost(lease, error),
                interval=self.keepalive_interval,
            )
        return lease


__all__ = ["Executor"]
