"""The public read side (load_snapshot, close_run), the stored settings and leave vs loss,
against real etcd (both binaries, via the ``etcd_client`` fixture)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator

import pytest

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.rendezvous import (
    Rendezvous,
    RendezvousClosedError,
    RendezvousConfigError,
    close_run,
    load_snapshot,
)


@pytest.fixture
def made(etcd_client: EtcdClient) -> Iterator[list[Rendezvous]]:
    nodes: list[Rendezvous] = []
    yield nodes
    for node in nodes:
        node.leave()


def make(client: EtcdClient, made: list[Rendezvous], node_id: str, lo: int, hi: int) -> Rendezvous:
    node = Rendezvous(client, "snap", lo, hi, node_id=node_id, last_call_timeout=0.2)
    made.append(node)
    return node


def test_settings_are_stored_and_checked(etcd_client: EtcdClient, made: list[Rendezvous]) -> None:
    first = make(etcd_client, made, "a", 1, 2)
    assert first.join(10.0).round == 1
    snap = load_snapshot(etcd_client, "snap")
    assert snap.config is not None
    assert (snap.config.min_nodes, snap.config.max_nodes, snap.config.by) == (1, 2, "a")
    other = make(etcd_client, made, "b", 2, 4)
    with pytest.raises(RendezvousConfigError, match=r"min_nodes=2 max_nodes=4.*min_nodes=1"):
        other.join(5.0)


def test_snapshot_collects_every_invalid_record(
    etcd_client: EtcdClient, made: list[Rendezvous]
) -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        joins = [pool.submit(make(etcd_client, made, n, 2, 2).join, 10.0) for n in "ab"]
        assert sorted(f.result(15.0).rank for f in joins) == [0, 1]
    root = "/etcd-rendezvous/rdzv/snap/"
    etcd_client.put(root + "nodes/zz", b"\x80 not json")
    etcd_client.put(root + "junk", b'{"format": 1, "kind": "node"}')
    snap = load_snapshot(etcd_client, "snap")
    assert sorted(p.key for p in snap.problems) == [root + "junk", root + "nodes/zz"]
    assert snap.state == "invalid" and snap.members == ("a", "b")  # the rest is still read
    assert load_snapshot(etcd_client, "nothing-here").num_keys == 0


def test_leave_is_recorded_apart_from_a_loss(
    etcd_client: EtcdClient, made: list[Rendezvous]
) -> None:
    nodes = [make(etcd_client, made, n, 2, 3) for n in "abc"]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        assert {f.result(15.0).round for f in [pool.submit(r.join, 10.0) for r in nodes]} == {1}
    leaver = next(r for r in nodes if not r.is_leader)
    leaver.leave()
    stay = [r for r in nodes if r is not leaver]
    change = stay[0].wait_for_change(5.0)
    while change is not None and not change.lost:
        change = stay[0].wait_for_change(5.0)
    assert change is not None and change.left == change.lost == (leaver.node_id,)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        second = [f.result(15.0) for f in [pool.submit(r.join, 10.0) for r in stay]]
    assert {a.round for a in second} == {2}
    assert second[0].causes == ("node_left",)
    snap = load_snapshot(etcd_client, "snap")
    assert snap.round is not None and snap.round.left == (leaver.node_id,)


def test_close_run_without_joining(etcd_client: EtcdClient, made: list[Rendezvous]) -> None:
    first = close_run(etcd_client, "snap", by="tester")
    assert not first.already and first.by == "tester"
    again = close_run(etcd_client, "snap", by="someone else")
    assert again.already and again.by == "tester"
    with pytest.raises(RendezvousClosedError):
        make(etcd_client, made, "a", 1, 1).join(5.0)
