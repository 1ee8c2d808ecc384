"""The engine against real etcd (both binaries, via the ``etcd_client`` fixture)."""

from __future__ import annotations

import concurrent.futures
import math
import threading
import time
from collections.abc import Iterator

import pytest

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.errors import EtcdRendezvousError
from etcd_rendezvous.rendezvous import (
    Assignment,
    ChangeKind,
    Rendezvous,
    RendezvousClosedError,
    RendezvousStateError,
    RendezvousTimeoutError,
)
from etcd_rendezvous.rendezvous import _machine as m
from etcd_rendezvous.rendezvous._records import Keys

WAIT = 20.0  # upper bound of any single wait in these tests


@pytest.fixture
def nodes(etcd_client: EtcdClient) -> Iterator[list[Rendezvous]]:
    """Collects the Rendezvous objects a test makes and makes them leave at the end."""
    made: list[Rendezvous] = []
    yield made
    for r in made:
        r.leave()
    threads = [t for t in threading.enumerate() if t.name.startswith("rendezvous ")]
    assert not threads, f"rendezvous threads still running: {threads}"


def make(
    nodes: list[Rendezvous], client: EtcdClient, n: int, *args: int, **kw: object
) -> list[Rendezvous]:
    kw.setdefault("lease_ttl", 5)
    kw.setdefault("last_call_timeout", 0.2)
    new = [
        Rendezvous(client, "job", *args, node_id=f"node{len(nodes) + i:03d}", **kw)  # type: ignore[arg-type]
        for i in range(n)
    ]
    nodes.extend(new)
    return new


def join_all(rdzvs: list[Rendezvous], timeout: float = WAIT) -> list[Assignment]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(rdzvs)) as pool:
        futures = [pool.submit(r.join, timeout) for r in rdzvs]
        return [f.result(timeout=timeout + 5) for f in futures]


def wait_for(predicate: object, timeout: float = WAIT) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def silence(r: Rendezvous) -> None:
    """Stop refreshing ``r``'s node lease, as if its process died (the key then expires)."""
    assert r._lease is not None and r._hub is not None
    r._hub.keeper.remove(r._lease)


@pytest.mark.parametrize("n", [2, 8, 32])
def test_n_nodes_get_dense_ranks(etcd_client: EtcdClient, nodes: list[Rendezvous], n: int) -> None:
    rdzvs = make(nodes, etcd_client, n, 1, n)
    assignments = join_all(rdzvs)
    assert sorted(a.rank for a in assignments) == list(range(n))
    assert {(a.round, a.world_size, a.members) for a in assignments} == {
        (1, n, tuple(sorted(r.node_id for r in rdzvs)))
    }
    assert sum(r.is_leader for r in rdzvs) == 1


def test_min_nodes_then_last_call(etcd_client: EtcdClient, nodes: list[Rendezvous]) -> None:
    rdzvs = make(nodes, etcd_client, 2, 2, 4, last_call_timeout=0.5)
    start = time.monotonic()
    assignments = join_all(rdzvs)
    assert time.monotonic() - start >= 0.45  # min reached, then the last call ran out
    assert [a.world_size for a in assignments] == [2, 2]


def test_join_timeout_removes_the_node(etcd_client: EtcdClient, nodes: list[Rendezvous]) -> None:
    (lonely,) = make(nodes, etcd_client, 1, 2, 2)
    with pytest.raises(RendezvousTimeoutError):
        lonely.join(timeout=0.3)
    assert etcd_client.get(Keys("job").node(lonely.node_id)) is None


def test_a_join_timing_out_as_its_round_commits_takes_the_round(
    etcd_client: EtcdClient, nodes: list[Rendezvous]
) -> None:
    """The race torch settles by syncing its state before giving up: b's deadline passes
    just as the leader commits a round with b. We hold b's lock so that its watch cannot
    tell it of the commit, move b's clock past its deadline and let it time out: its
    guarded key deletion finds the round, and b's join returns it instead of failing."""
    (a,) = make(nodes, etcd_client, 1, 2, 3, last_call_timeout=1.0)
    offset = [0.0]
    clock = lambda: time.monotonic() + offset[0]  # noqa: E731
    (b,) = make(nodes, etcd_client, 1, 2, 3, last_call_timeout=1.0, clock=clock)
    keys = Keys("job")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        a_join = pool.submit(a.join, WAIT)
        wait_for(lambda: a.is_leader)
        b_join = pool.submit(b.join, 10.0)
        wait_for(lambda: etcd_client.get(keys.node(b.node_id)) is not None)
        with b._cond:  # b's watch can no longer deliver anything to b
            wait_for(lambda: etcd_client.get(keys.round) is not None)  # a's last call ran out
            offset[0] = 60.0  # b's join deadline has passed
            b._feed(m.Tick())  # b times out, unaware of the round
        b._dispatch()
        got = b_join.result(WAIT)
        assert isinstance(got, Assignment) and got.round == 1 and got.world_size == 2
        assert a_join.result(WAIT).members == got.members
    assert etcd_client.get(keys.node(b.node_id)) is not None  # b is a member: its key stays


def test_late_joiner_waits_and_members_rejoin(
    etcd_client: EtcdClient, nodes: list[Rendezvous]
) -> None:
    first = make(nodes, etcd_client, 2, 2, 3)
    assert [a.round for a in join_all(first)] == [1, 1]
    (late,) = make(nodes, etcd_client, 1, 2, 3)
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        late_join = pool.submit(late.join, WAIT)
        wait_for(lambda: all(r.num_nodes_waiting() == 1 for r in first))
        change = first[1].wait_for_change(WAIT)
        while change is not None and not (change.kind is ChangeKind.MEMBERSHIP and change.waiting):
            change = first[1].wait_for_change(WAIT)
        assert change is not None and change.waiting == 1
        assert not late_join.done()
        # the agents re-rendezvous: the next round has all three
        rejoins = [pool.submit(r.join, WAIT) for r in first]
        results = [f.result(WAIT) for f in [*rejoins, late_join]]
    assert {a.round for a in results} == {2}
    assert sorted(a.rank for a in results) == [0, 1, 2]
    # ranks of the nodes that stayed are stable
    assert [a.rank for a in results[:2]] == [0, 1]


def test_spare_when_full_takes_a_lost_place(
    etcd_client: EtcdClient, nodes: list[Rendezvous]
) -> None:
    members = make(nodes, etcd_client, 2, 1, 2)
    join_all(members)
    (spare,) = make(nodes, etcd_client, 1, 1, 2)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        spare_join = pool.submit(spare.join, 0.5)  # a spare ignores the join timeout
        wait_for(
            lambda: members[0]._state.status is not None and members[0]._state.status.spares == 1
        )
        assert members[0].num_nodes_waiting() == 0
        time.sleep(0.7)
        assert not spare_join.done()
        members[1].leave()  # a place frees up: the spare is now waiting
        wait_for(lambda: members[0].num_nodes_waiting() == 1)
        again = members[0].join(WAIT)
        moved = spare_join.result(WAIT)
    assert (again.round, again.rank, moved.round, moved.rank) == (2, 0, 2, 1)


def test_close_ends_it_for_everyone(etcd_client: EtcdClient, nodes: list[Rendezvous]) -> None:
    a, b = make(nodes, etcd_client, 2, 3, 3)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(b.join, WAIT)
        wait_for(lambda: etcd_client.get(Keys("job").node(b.node_id)) is not None)
        a.close()
        with pytest.raises(RendezvousClosedError):
            pending.result(WAIT)
    assert a.is_closed() and b.is_closed()
    with pytest.raises(RendezvousClosedError):
        b.join(1.0)
    (newcomer,) = make(nodes, etcd_client, 1, 3, 3)
    assert newcomer.is_closed()
    with pytest.raises(RendezvousClosedError):
        newcomer.join(1.0)


def test_leave_is_seen_as_a_lost_member(etcd_client: EtcdClient, nodes: list[Rendezvous]) -> None:
    rdzvs = make(nodes, etcd_client, 3, 1, 3)
    join_all(rdzvs)
    leaver = next(r for r in rdzvs if not r.is_leader)
    leaver.leave()
    observer = next(r for r in rdzvs if r is not leaver)
    wait_for(lambda: observer._state.status is not None and observer._state.status.lost)
    assert observer._state.status is not None
    assert observer._state.status.lost == (leaver.node_id,)


def test_lease_expiry_removes_a_node(etcd_client: EtcdClient, nodes: list[Rendezvous]) -> None:
    rdzvs = make(nodes, etcd_client, 3, 1, 3, lease_ttl=1)
    join_all(rdzvs)
    victim = next(r for r in rdzvs if not r.is_leader)
    survivors = [r for r in rdzvs if r is not victim]
    lost: list[tuple[str, ...]] = []
    survivors[0].add_listener(lambda change: lost.append(change.lost) if change.lost else None)
    silence(victim)  # a paused/dead node: no more keep-alives
    start = time.monotonic()
    wait_for(lambda: bool(lost), timeout=6.0)
    assert lost[0] == (victim.node_id,)
    assert time.monotonic() - start < 1.0 + 2.0  # the TTL plus etcd's expiry granularity
    # the survivors re-rendezvous without it, ranks dense
    again = join_all(survivors)
    assert sorted(a.rank for a in again) == [0, 1] and {a.round for a in again} == {2}


def test_leader_death_hands_over(etcd_client: EtcdClient, nodes: list[Rendezvous]) -> None:
    rdzvs = make(nodes, etcd_client, 3, 1, 3, last_call_timeout=0.2, fast_quorum=True)
    join_all(rdzvs)
    leader = next(r for r in rdzvs if r.is_leader)
    leader.leave()
    rest = [r for r in rdzvs if r is not leader]
    wait_for(lambda: any(r.is_leader for r in rest))
    again = join_all(rest)
    assert {a.world_size for a in again} == {2}


def test_corrupt_json_is_a_clear_error(etcd_client: EtcdClient, nodes: list[Rendezvous]) -> None:
    keys = Keys("job")
    etcd_client.put(keys.round, b"\x80not json")
    (r,) = make(nodes, etcd_client, 1, 1, 1)
    with pytest.raises(RendezvousStateError) as info:
        r.join(5.0)
    assert isinstance(info.value, EtcdRendezvousError)
    assert info.value.key == keys.round and "not JSON" in str(info.value)


def test_foreign_json_while_running_is_a_clear_error(
    etcd_client: EtcdClient, nodes: list[Rendezvous]
) -> None:
    keys = Keys("job")
    a, _ = make(nodes, etcd_client, 2, 3, 3)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(a.join, WAIT)
        wait_for(lambda: a.is_leader)
        etcd_client.put(keys.node("intruder"), b'{"format": 99, "kind": "node"}')
        with pytest.raises(RendezvousStateError, match="format 99"):
            pending.result(WAIT)
    with pytest.raises(RendezvousStateError):
        a.num_nodes_waiting()


def test_restart_with_the_same_node_id(etcd_client: EtcdClient, nodes: list[Rendezvous]) -> None:
    first = make(nodes, etcd_client, 2, 1, 2, lease_ttl=30)
    join_all(first)
    # node000 "crashes" (its lease stays alive, as after a SIGKILL) and comes back
    crashed = first[0]
    crashed._stopping.set()
    silence(crashed)
    reborn = Rendezvous(etcd_client, "job", 1, 2, node_id=crashed.node_id, last_call_timeout=0.2)
    nodes.append(reborn)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(reborn.join, WAIT)
        wait_for(lambda: first[1].num_nodes_waiting() == 1)
        first[1].join(WAIT)
        assignment = pending.result(WAIT)
    assert assignment.round == 2 and assignment.world_size == 2


def test_a_restarted_leader_revokes_its_previous_leadership(
    etcd_client: EtcdClient, nodes: list[Rendezvous]
) -> None:
    (old,) = make(nodes, etcd_client, 1, 1, 2, lease_ttl=30)
    old.join(WAIT)
    assert old.is_leader and old._leader_lease is not None
    stale = old._leader_lease.id
    # it "crashes" with its leader lease alive (as after a SIGKILL) and comes back
    old._stopping.set()
    silence(old)
    reborn = Rendezvous(
        etcd_client, "job", 1, 2, node_id=old.node_id, lease_ttl=30, last_call_timeout=0.2
    )
    nodes.append(reborn)
    assignment = reborn.join(WAIT)
    assert assignment.round == 2 and assignment.members == (old.node_id,)
    fired = reborn._machine.fired
    assert {"put-held", "leader-stale"} <= fired, fired  # the machine decided both revokes
    assert reborn.is_leader and reborn._leader_lease is not None
    assert reborn._leader_lease.id != stale
    kv = etcd_client.get(Keys("job").leader)
    assert kv is not None and kv.lease == reborn._leader_lease.id


def test_a_lost_leader_lease_drops_the_leadership_then_it_is_taken_again(
    etcd_client: EtcdClient, nodes: list[Rendezvous]
) -> None:
    (a,) = make(nodes, etcd_client, 1, 1, 2)
    a.join(WAIT)
    assert a.is_leader and a._leader_lease is not None
    lost = a._leader_lease.id
    with a._lock:  # the decision loop's next pass refreshes before it reads the watch
        etcd_client.lease_revoke(lost)
        a._leader_refreshed = -math.inf
    wait_for(lambda: "leader-lease-lost" in a._machine.fired)
    wait_for(lambda: a.is_leader and a._leader_lease is not None and a._leader_lease.id != lost)
    assert a.num_nodes_waiting() == 0  # still working


def test_a_leader_lease_revoked_behind_its_back_is_replaced_when_it_reacquires(
    etcd_client: EtcdClient, nodes: list[Rendezvous]
) -> None:
    """The watch shows the vacancy before a refresh notices the lease is gone (e.g. a
    peer's probe took the leader for dead): the create must not die on the dead lease."""
    (a,) = make(nodes, etcd_client, 1, 1, 2)
    a.join(WAIT)
    assert a.is_leader and a._leader_lease is not None
    lost = a._leader_lease.id
    with a._lock:  # no refresh due before the loop reads the deletion from its watch
        etcd_client.lease_revoke(lost)
        a._leader_refreshed = a._clock() + 60.0
    wait_for(lambda: a.is_leader and a._leader_lease is not None and a._leader_lease.id != lost)
    assert a._error is None
    assert a.num_nodes_waiting() == 0
