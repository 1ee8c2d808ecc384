"""End to end: real ``torchrun`` agents and gloo workers on ``--rdzv-backend=etcd-v3``.

Against etcd 3.4 and 3.5 started by our EtcdServer (no ``--enable-v2``), on
localhost. Each test bounds every wait and kills every process it started
(see conftest.py). Small ``last_call_timeout``/heartbeat settings keep the
elastic tests short; the basic 2-node run uses torch's defaults.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

pytest.importorskip("torch")

from e2e.harness import Torchrun
from etcd_rendezvous.server import EtcdCluster, EtcdServer

pytestmark = [pytest.mark.torch, pytest.mark.slow]

# Fast failure detection for the elastic tests: a node silent for 3 s is dead. (torch sends a
# heartbeat only when the last one is older than the interval, so one may come up to 2
# intervals apart: keep_alive_max_attempt must stay >= 3 or live nodes get expelled.)
FAST = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=60"

# When membership changes, torch 2.13's agent keeps the bootstrap TCPStore address of the
# previous round on nodes whose rank is not 0 (DynamicRendezvousHandler.next_rendezvous
# caches _bootstrap_store_info), so after a rank change workers of different nodes meet in
# different stores and never finish; this hits every backend built on the dynamic handler
# (c10d too). Per-round bootstrap through the rendezvous store avoids it: it is the setting
# we document for elastic jobs.
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def assert_ranks(results: list[str], world: int) -> None:
    ranks = sorted(int(m.group(1)) for r in results if (m := re.search(r"rank=(\d+)", r)))
    assert ranks == list(range(world)), results
    assert all(f"world={world} " in r for r in results), results


def finished_results(torchrun: Torchrun, nodes: list[int], timeout: float) -> list[str]:
    results: list[str] = []
    for i in nodes:
        node = torchrun.nodes[i]
        code = node.wait(timeout)
        assert code == 0, f"node {i} exited {code}; log:\n{node.log()[-4000:]}"
        results += node.results()
    return results


@pytest.mark.parametrize("nnodes", [2, 3])
def test_static_world(
    torchrun: Torchrun, etcd_server: EtcdServer, run_id: str, nnodes: int
) -> None:
    # torch's defaults for every timeout (min == max: no last call wait).
    conf = "" if nnodes == 2 else "last_call_timeout=1"
    for _ in range(nnodes):
        torchrun.start(endpoint=etcd_server.endpoint, run_id=run_id, nnodes=str(nnodes), conf=conf)
    results = finished_results(torchrun, list(range(nnodes)), timeout=120)
    assert_ranks(results, nnodes)


def test_elastic_down_survivors_finish(
    torchrun: Torchrun, etcd_server: EtcdServer, run_id: str
) -> None:
    env = {"E2E_SLEEP": "3", "E2E_EXPECT_WORLD": "2", **ELASTIC_ENV}
    for _ in range(3):
        torchrun.start(
            endpoint=etcd_server.endpoint, run_id=run_id, nnodes="2:3", conf=FAST, env=env
        )
    torchrun.wait_markers(3, world=3, timeout=90)
    torchrun.nodes[2].kill()
    results = finished_results(torchrun, [0, 1], timeout=120)
    assert_ranks(results, 2)  # the survivors restarted their workers in a world of 2


def test_elastic_up_late_node_joins(
    torchrun: Torchrun, etcd_server: EtcdServer, run_id: str
) -> None:
    env = {"E2E_SLEEP": "120", "E2E_EXPECT_WORLD": "3", **ELASTIC_ENV}
    for _ in range(2):
        torchrun.start(
            endpoint=etcd_server.endpoint, run_id=run_id, nnodes="2:3", conf=FAST, env=env
        )
    torchrun.wait_markers(2, world=2, timeout=90)
    torchrun.start(endpoint=etcd_server.endpoint, run_id=run_id, nnodes="2:3", conf=FAST, env=env)
    results = finished_results(torchrun, [0, 1, 2], timeout=120)
    assert_ranks(results, 3)


def test_embedded_default_two_nodes_no_endpoint(torchrun: Torchrun, run_id: str) -> None:
    # No --rdzv-endpoint: 127.0.0.1:2379. If an etcd already answers there (not ours)
    # the nodes use it under their run id, which is fine too; if something else holds
    # the port the test cannot run.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", 2379))
        except OSError:
            pytest.skip("port 2379 is in use on this machine")
    for _ in range(2):
        torchrun.start(endpoint=None, run_id=run_id, nnodes="2", conf="")
    results = finished_results(torchrun, [0, 1], timeout=120)
    assert_ranks(results, 2)
    hosts = [n for n in torchrun.nodes if "hosts the job's etcd" in n.log()]
    assert len(hosts) == 1, "exactly one agent must host the embedded etcd"
    assert "single point of failure" in hosts[0].log()


def test_failover_member_killed_mid_job(torchrun: Torchrun, etcd_binary: str, run_id: str) -> None:
    with EtcdCluster(3, binary=etcd_binary) as cluster:
        endpoints = ",".join(cluster.endpoints)
        env = {"E2E_SLEEP": "4"}
        for _ in range(2):
            torchrun.start(
                endpoint=endpoints, run_id=run_id, nnodes="2", conf=FAST, env=env, max_restarts=0
            )
        torchrun.wait_markers(2, world=2, timeout=90)
        # Both agents talk to the first endpoint: kill that member while the workers run.
        cluster.members[0].kill()
        results = finished_results(torchrun, [0, 1], timeout=120)
        assert_ranks(results, 2)


def test_wrong_option_fails_fast_with_clear_message(torchrun: Torchrun, run_id: str) -> None:
    # Options are checked before the endpoint is contacted: no etcd needed.
    start = time.monotonic()
    node = torchrun.start(
        endpoint="127.0.0.1:1", run_id=run_id, nnodes="2", conf="last_call_timout=1"
    )
    assert node.wait(60) != 0
    assert time.monotonic() - start < 60
    assert "unknown option(s) last_call_timout" in node.log()


def test_unreachable_endpoint_fails_fast_with_clear_message(
    torchrun: Torchrun, run_id: str
) -> None:
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    endpoint = ",".join(f"127.0.0.1:{p}" for p in ports)
    node = torchrun.start(endpoint=endpoint, run_id=run_id, nnodes="2", conf="")
    assert node.wait(60) != 0
    log = node.log()
    assert "no etcd answers at --rdzv-endpoint" in log
    assert f"127.0.0.1:{ports[0]}" in log
