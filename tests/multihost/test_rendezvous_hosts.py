"""The native rendezvous across hosts with distinct addresses (issue 11, item 3).

Host ``a`` runs an etcd member (each installed etcd binary in turn); ``b``, ``c``, ``d``
run one participant each (``lab_node.py``), reaching etcd by host name. Faults are
real: a killed host's processes are gone (its kernel refuses connections), a
partitioned host's link is down (connections time out), a host name can resolve to the
wrong address. After a fault, ``b`` and ``c`` ask for a new round, as torch's agents do
when their workers fail on a dead peer: that is what makes the leader probe the late
member. Every node's recorded rounds go through the checker (one outcome per round,
dense unique ranks, no overlap).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from multihost.checker import check_rounds
from multihost.harness import LabNode, evictions_by_probe, start_etcd, wait_any_logged
from multihost.netlab import Lab

pytestmark = pytest.mark.slow
TTL = 2  # the nodes' lease TTL (s): short, so each test takes seconds
ROUND = 20.0  # bound on the wait for a round (s); generous for a loaded 2-core machine


def start(lab: Lab, etcd_binary: str) -> dict[str, LabNode]:
    endpoint = start_etcd(lab, lab["a"], etcd_binary)
    run_id = f"multihost-{uuid.uuid4().hex[:8]}"
    nodes = {h: LabNode(lab[h], endpoint, run_id, 2, 3, lease_ttl=TTL) for h in "bcd"}
    first = [n.assigned(ROUND, round_=1) for n in nodes.values()]
    assert sorted(first[0]["members"]) == ["b", "c", "d"], first
    return nodes


def rejoin(*nodes: LabNode) -> None:
    for node in nodes:
        node.rejoin()


def histories(nodes: dict[str, LabNode]) -> dict[str, list[dict[str, object]]]:
    return {name: n.drain() for name, n in nodes.items()}


@pytest.mark.parametrize("power_off", [False, True], ids=["processes-killed", "powered-off"])
def test_a_killed_host_is_evicted(
    make_lab: Callable[[list[str]], Lab], etcd_binary: str, power_off: bool
) -> None:
    """Processes killed: the kernel refuses the probe at an address that answered before,
    so the probe evicts at once. Powered off (link down too): no verdict, the lease does."""
    lab = make_lab(["a", "b", "c", "d"])
    nodes = start(lab, etcd_binary)
    b, c = nodes["b"], nodes["c"]
    lab["d"].kill(power_off=power_off)
    assert lab["d"].pids() == []
    rejoin(b, c)
    second = [b.assigned(ROUND, round_=2), c.assigned(ROUND, round_=2)]
    assert sorted(second[0]["members"]) == ["b", "c"], second
    assert second[0]["causes"] == ["node_lost"], second
    by_probe = evictions_by_probe([b, c], "d")
    if power_off:
        assert not by_probe, "a powered-off host's probe times out: no verdict"
        wait_any_logged([b, c], "probe of d: unknown", ROUND)
    else:
        assert by_probe, "the leader (or a rejoining member) probes d, refused: gone"
    check_rounds(histories(nodes))


def test_a_partitioned_host_gives_no_verdict_then_rejoins(
    make_lab: Callable[[list[str]], Lab], etcd_binary: str
) -> None:
    lab = make_lab(["a", "b", "c", "d"])
    nodes = start(lab, etcd_binary)
    b, c, d = nodes["b"], nodes["c"], nodes["d"]
    lab["d"].partition()
    try:
        rejoin(b, c)
        second = [b.assigned(ROUND, round_=2), c.assigned(ROUND, round_=2)]
        assert sorted(second[0]["members"]) == ["b", "c"], second
        assert second[0]["causes"] == ["node_lost"], second
        # the probe of d ran and timed out: no verdict; d's lease expired instead
        wait_any_logged([b, c], "probe of d: unknown", ROUND)
        assert not evictions_by_probe([b, c], "d")
    finally:
        lab["d"].heal()
    # healed: d's keep-alive hears its lease is gone, it joins again, everyone rejoins
    third = [n.assigned(ROUND, round_=3) for n in nodes.values()]
    assert sorted(third[0]["members"]) == ["b", "c", "d"], third
    assert not any(x["event"] == "assigned" and x["round"] == 2 for x in d.seen)
    rounds = check_rounds(histories(nodes))
    assert sorted(rounds) == [1, 2, 3], rounds


@pytest.mark.parametrize("wrong", ["127.0.1.1", "c"], ids=["loopback", "another-host"])
def test_a_name_resolving_to_the_wrong_address_only_costs_speed(
    make_lab: Callable[[list[str]], Lab], etcd_binary: str, wrong: str
) -> None:
    """On b and c, d's name means the wrong address (a Debian-style ``127.0.1.1 d``
    line, or another host's address): its probes are refused where d never answered,
    which proves nothing. No false eviction while d lives; once it dies, its lease
    evicts it (a TTL later than a probe would have)."""
    lab = make_lab(["a", "b", "c", "d"])
    for name in "bc":
        lab[name].resolve("d", lab[wrong].address if wrong in lab.hosts else wrong)
    nodes = start(lab, etcd_binary)
    b, c = nodes["b"], nodes["c"]
    rejoin(b, c)  # probes of d (refused at a wrong address): no verdict
    second = [n.assigned(ROUND, round_=2) for n in nodes.values()]
    assert sorted(second[0]["members"]) == ["b", "c", "d"], second
    lab["d"].kill()
    rejoin(b, c)
    third = [b.assigned(ROUND, round_=3), c.assigned(ROUND, round_=3)]
    assert sorted(third[0]["members"]) == ["b", "c"], third
    assert not evictions_by_probe([b, c], "d"), "refused where d never answered: no verdict"
    wait_any_logged([b, c], "probe of d: unknown", ROUND)
    check_rounds(histories(nodes))
