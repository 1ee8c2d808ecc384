"""Failover under member faults: a paused pinned member costs no lease; a dead leader
costs an election, not a client timeout.

Each test uses the shared 3-member ``etcd_cluster``, pauses or kills one member, and
restores it before returning. Clients are pinned on purpose (``spread=False``, the
victim listed first): that is where every agent of a job used to be.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from etcd_rendezvous.client import EtcdClient, Watch
from etcd_rendezvous.errors import EtcdTimeoutError, EtcdUnavailableError
from etcd_rendezvous.rendezvous import Rendezvous
from etcd_rendezvous.rendezvous._records import Keys
from etcd_rendezvous.server import EtcdCluster
from etcd_rendezvous.server.cluster import EtcdClusterMember

pytestmark = pytest.mark.slow

WAIT = 30.0


@pytest.fixture
def cluster(etcd_cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The shared cluster, every member running (and answering) again afterwards."""
    yield etcd_cluster
    for member in etcd_cluster.members:
        if member.is_running:
            member.resume()
        else:
            member.restart()
    etcd_cluster.wait_ready()


def _follower(cluster: EtcdCluster) -> EtcdClusterMember:
    leader = cluster.leader()
    assert leader is not None, "the cluster has no leader"
    return next(m for m in cluster.members if m is not leader)


def _pinned_to(cluster: EtcdCluster, victim: EtcdClusterMember) -> list[str]:
    return [victim.endpoint] + [m.endpoint for m in cluster.members if m is not victim]


def _deletes(watch: Watch) -> list[bytes]:
    """Keys deleted so far (what a lost lease does to the keys attached to it)."""
    gone: list[bytes] = []
    while (event := watch.next_event(timeout=0.2)) is not None:
        if event.type == "DELETE":
            gone.append(event.kv.key)
    return gone


def _pause(member: EtcdClusterMember, seconds: float) -> None:
    member.pause()
    try:
        time.sleep(seconds)  # the fault itself: the member hangs this long
    finally:
        member.resume()


@pytest.mark.parametrize("pause", [3.0, 6.0])
def test_paused_pinned_member_costs_no_client_lease(cluster: EtcdCluster, pause: float) -> None:
    victim = _follower(cluster)
    ns = f"/failover-{uuid.uuid4().hex}/"
    others = [m.endpoint for m in cluster.members if m is not victim]
    with (
        EtcdClient(_pinned_to(cluster, victim), spread=False, namespace=ns) as client,
        EtcdClient(others, namespace=ns) as observer,
    ):
        assert client.endpoint == victim.url
        leases = [client.lease(3) for _ in range(5)]  # refreshed together, one request
        for i, lease in enumerate(leases):
            client.put(f"k{i}", "alive", lease=lease.id)
        watch = observer.watch("", prefix=True)
        _pause(victim, pause)
        lost = [lease for lease in leases if lease.is_lost]
        assert not lost, f"leases lost to a {pause}s pause: {[lease.error for lease in lost]}"
        assert not _deletes(watch)
        assert all(observer.lease_time_to_live(lease.id).ttl > 0 for lease in leases)
        assert client.endpoint != victim.url  # the keep-alives moved on
        watch.cancel()
        for lease in leases:
            lease.revoke()


@pytest.mark.parametrize("pause", [3.0, 6.0])
def test_paused_pinned_member_costs_no_rendezvous_lease(cluster: EtcdCluster, pause: float) -> None:
    victim = _follower(cluster)
    run = f"failover-{uuid.uuid4().hex[:8]}"
    prefix = "/pytest-failover"
    others = [m.endpoint for m in cluster.members if m is not victim]
    client = EtcdClient(_pinned_to(cluster, victim), spread=False)
    observer = EtcdClient(others)
    settings: dict[str, Any] = {"last_call_timeout": 0.2, "key_prefix": prefix}
    nodes = [
        Rendezvous(client, run, 3, 3, node_id=f"n{i}", lease_ttl=3, **settings) for i in range(3)
    ]
    try:
        results: list[object] = [None] * 3

        def join(i: int) -> None:
            results[i] = nodes[i].join(WAIT)

        threads = [threading.Thread(target=join, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT + 5)
        assert all(r is not None for r in results), results
        first_round = {r.assignment.round for r in nodes if r.assignment is not None}
        assert len(first_round) == 1
        keys = Keys(run, prefix)
        watch = observer.watch(keys.root, prefix=True)
        _pause(victim, pause)
        gone = _deletes(watch)
        # A lost node lease deletes nodes/<id>; a lost leader lease deletes ctl/leader.
        assert not gone, f"keys deleted by lost leases during a {pause}s pause: {gone}"
        node_keys = observer.get_prefix(keys.nodes)
        assert len(node_keys) == 3 and all(
            observer.lease_time_to_live(kv.lease).ttl > 0 for kv in node_keys
        )
        assert observer.get(keys.leader) is not None
        assert {r.assignment.round for r in nodes if r.assignment is not None} == first_round
        watch.cancel()
    finally:
        for r in nodes:
            r.leave()
        observer.delete(prefix + "/", prefix=True)
        observer.close()
        client.close()


def test_an_election_longer_than_the_ttl_costs_no_lease(cluster: EtcdCluster) -> None:
    # Two of three members killed: no leader until they are back, longer than the TTL.
    # Nothing expires a lease meanwhile, and the new leader renews them all: the client
    # must not declare them lost at its own estimate of the TTL.
    survivor = _follower(cluster)
    ns = f"/failover-{uuid.uuid4().hex}/"
    with EtcdClient(_pinned_to(cluster, survivor), spread=False, namespace=ns) as client:
        leases = [client.lease(5) for _ in range(3)]
        for i, lease in enumerate(leases):
            client.put(f"k{i}", "alive", lease=lease.id)
        victims = [m for m in cluster.members if m is not survivor]
        for member in victims:
            member.kill()
        time.sleep(5.5)  # the fault: no quorum, no leader, for longer than the TTL
        for member in victims:
            member.start(wait=False)
        for member in victims:
            member.wait_ready()
        cluster.wait_ready()
        lost = [lease.error for lease in leases if lease.is_lost]
        assert not lost, f"leases lost to an election: {lost}"
        assert all(client.lease_time_to_live(lease.id).ttl > 0 for lease in leases)
        assert len(client.get_prefix("k")) == 3
        for lease in leases:
            lease.revoke()


def test_write_right_after_a_leader_kill_is_given_up_not_timed_out(cluster: EtcdCluster) -> None:
    leader = cluster.leader()
    assert leader is not None
    follower = next(m for m in cluster.members if m is not leader)
    ns = f"/failover-{uuid.uuid4().hex}/"
    # The follower first: it keeps a write it forwarded to the dead leader, unanswered,
    # until etcd's own request timeout. The client's timeout is longer still.
    endpoints = [follower.endpoint] + [m.endpoint for m in cluster.members if m is not follower]
    with EtcdClient(endpoints, spread=False, namespace=ns, timeout=30.0) as client:
        client.put("warm", "up")
        leader.kill()
        started = time.monotonic()
        try:
            client.put("k", "v")
        except (EtcdUnavailableError, EtcdTimeoutError) as exc:
            took = time.monotonic() - started
            # Never resent blindly, and noticed (the leader changed), not timed out.
            assert "may or may not have been applied" in str(exc), exc
            assert "given up: " in str(exc), f"after {took:.2f}s: {exc}"
        assert client.get("warm") is not None  # reads go on
        client.put("after", "the election")  # and so do writes


def test_a_request_that_finds_its_member_hung_moves_the_watches(cluster: EtcdCluster) -> None:
    victim = _follower(cluster)
    ns = f"/failover-{uuid.uuid4().hex}/"
    others = [m.endpoint for m in cluster.members if m is not victim]
    # The idle check is off: only the stuck request can tell that the member hangs.
    with (
        EtcdClient(
            _pinned_to(cluster, victim), spread=False, namespace=ns, watch_idle_check=None
        ) as client,
        EtcdClient(others, namespace=ns) as writer,
    ):
        watch = client.watch("k", prefix=True)
        assert watch.endpoint == victim.url
        victim.pause()
        try:
            assert client.get("k0") is None  # stuck, given up, answered by another member
            writer.put("k1", "while paused")
            event = watch.next_event(timeout=WAIT)
            assert event is not None and event.value == b"while paused"
            assert victim.is_running and watch.endpoint != victim.url
        finally:
            victim.resume()
        watch.cancel()
