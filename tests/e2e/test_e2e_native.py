"""End to end: real ``torchrun`` agents and gloo workers on the native engine.

``--rdzv-backend=etcd-v3`` (the handler of ``torchrun/native.py``; ``etcd-v3-native`` is
its alias, run once) with torch's default timeouts and the engine's defaults (3 s lease,
fast quorum), on localhost. Workers run a training-like loop of all_reduces
(``native_worker.py``) until the test creates the finish file, so each test decides when
the job may end. The faults of the recovery issue are here: a whole node killed (once,
then twice in a row), only its agent killed, a member replaced by a spare, a node
restarted, a node paused below and above its lease TTL, an etcd member killed. The
2-node run is repeated on every etcd binary; the others use one etcd (the default
binary) to keep the file short. Every wait is bounded; the ``torchrun`` fixture SIGKILLs
every tagged process and checks none is left.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")

from e2e.harness import Node, Torchrun, port_is_free, tagged_pids
from etcd_rendezvous.server import EtcdCluster, EtcdServer
from etcd_rendezvous.torchrun._options import embedded_port

pytestmark = [pytest.mark.torch, pytest.mark.slow]

BACKEND = "etcd-v3"
WORKER = str(Path(__file__).with_name("native_worker.py"))
# Bounds: starting a node (torch imports) takes a few seconds on 2 busy cores.
START = 90.0
FINISH = 90.0


@pytest.fixture(scope="module")
def one_etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture
def finish_file(tmp_path: Path) -> Path:
    return tmp_path / "finish"


def start(
    torchrun: Torchrun,
    endpoint: str | None,
    run_id: str,
    nnodes: str,
    finish: Path | None,
    *,
    expect: int | None = None,
    conf: str = "",
    max_restarts: int = 3,
    backend: str = BACKEND,
) -> Node:
    env = {"E2E_FINISH_FILE": str(finish)} if finish is not None else {}
    if expect is not None:
        env["E2E_EXPECT_WORLD"] = str(expect)
    return torchrun.start(
        endpoint=endpoint,
        run_id=run_id,
        nnodes=nnodes,
        conf=conf,
        env=env,
        backend=backend,
        max_restarts=max_restarts,
        script=WORKER,
    )


def results_of(torchrun: Torchrun, nodes: list[int], timeout: float = FINISH) -> list[str]:
    return torchrun.finished_results(nodes, timeout)


def assert_world(results: list[str], world: int) -> None:
    ranks = sorted(int(m.group(1)) for r in results if (m := re.search(r"rank=(\d+)", r)))
    assert ranks == list(range(world)), results
    assert all(f" world={world} " in r for r in results), results


def signal_node(node: Node, sig: signal.Signals) -> None:
    for pid in tagged_pids(node.tag):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def node_with_rank(torchrun: Torchrun, world: int, rank: int) -> int:
    """Index of the node whose live worker has ``rank`` in the latest round of ``world``."""
    latest: dict[int, tuple[float, int]] = {}  # rank -> (started at, pid)
    for name in torchrun.markers(world):
        worker_rank, _, started = (torchrun.marker_dir / name).read_text().split()
        pid = int(name.split("-")[1])
        if latest.get(int(worker_rank), (0.0, 0))[0] < float(started):
            latest[int(worker_rank)] = (float(started), pid)
    assert rank in latest, (rank, torchrun.markers())
    pid = latest[rank][1]
    owners = [i for i, node in enumerate(torchrun.nodes) if pid in tagged_pids(node.tag)]
    assert len(owners) == 1, f"worker {pid} (rank {rank} of {world}) belongs to {owners}"
    return owners[0]


@pytest.mark.parametrize("nnodes", [2])
def test_two_nodes_all_reduce_every_binary(
    torchrun: Torchrun, etcd_server: EtcdServer, run_id: str, nnodes: int
) -> None:
    for _ in range(nnodes):
        start(torchrun, etcd_server.endpoint, run_id, str(nnodes), None)
    assert_world(results_of(torchrun, list(range(nnodes))), nnodes)


def test_three_nodes_all_reduce(torchrun: Torchrun, one_etcd: EtcdServer, run_id: str) -> None:
    for _ in range(3):
        start(torchrun, one_etcd.endpoint, run_id, "3", None)
    assert_world(results_of(torchrun, [0, 1, 2]), 3)


def test_alias_etcd_v3_native(torchrun: Torchrun, one_etcd: EtcdServer, run_id: str) -> None:
    # etcd-v3-native: the name jobs used before the native engine became etcd-v3.
    for _ in range(2):
        start(torchrun, one_etcd.endpoint, run_id, "2", None, backend="etcd-v3-native")
    assert_world(results_of(torchrun, [0, 1]), 2)


def test_kill_whole_node_survivors_finish_with_defaults(
    torchrun: Torchrun, one_etcd: EtcdServer, run_id: str, finish_file: Path
) -> None:
    for _ in range(3):
        start(torchrun, one_etcd.endpoint, run_id, "2:3", finish_file, expect=2)
    torchrun.wait_markers(3, world=3, timeout=START)
    killed = time.monotonic()
    torchrun.nodes[2].kill()  # agent and workers: the machine is gone
    torchrun.wait_markers(2, world=2, timeout=60)
    recovery = time.monotonic() - killed
    finish_file.touch()
    assert_world(results_of(torchrun, [0, 1]), 2)
    # Lease TTL (3 s) + fast quorum + worker start: far below torch's 42-48 s.
    assert recovery < 30, f"survivors took {recovery:.1f}s to run again"


def test_kill_two_nodes_one_after_another(
    torchrun: Torchrun, one_etcd: EtcdServer, run_id: str, finish_file: Path
) -> None:
    # 1:3, torch's default timeouts, the engine's 3 s lease. Each time the node hosting
    # rank 0 (its worker hosts the round's bootstrap store) dies with its workers.
    for _ in range(3):
        start(torchrun, one_etcd.endpoint, run_id, "1:3", finish_file, expect=1)
    torchrun.wait_markers(3, world=3, timeout=START)
    first = node_with_rank(torchrun, world=3, rank=0)
    torchrun.nodes[first].kill()
    torchrun.wait_markers(2, world=2, timeout=60)
    second = node_with_rank(torchrun, world=2, rank=0)
    assert second != first
    torchrun.nodes[second].kill()
    torchrun.wait_markers(1, world=1, timeout=60)
    finish_file.touch()
    (last,) = {0, 1, 2} - {first, second}
    assert_world(results_of(torchrun, [last]), 1)


def test_kill_agent_only_survivors_reform(
    torchrun: Torchrun, one_etcd: EtcdServer, run_id: str, finish_file: Path
) -> None:
    for _ in range(3):
        start(torchrun, one_etcd.endpoint, run_id, "2:3", finish_file, expect=2)
    torchrun.wait_markers(3, world=3, timeout=START)
    # Its worker lives on (torch starts workers in their own session) and keeps the
    # collectives going: only the lost lease tells the survivors to re-form.
    os.kill(torchrun.nodes[2].proc.pid, signal.SIGKILL)
    torchrun.nodes[2].proc.wait(10)
    torchrun.wait_markers(2, world=2, timeout=60)
    finish_file.touch()
    assert_world(results_of(torchrun, [0, 1]), 2)


def test_late_node_joins_next_round(
    torchrun: Torchrun, one_etcd: EtcdServer, run_id: str, finish_file: Path
) -> None:
    # The first round of 2 of 2:3 waits out the last call for a third (torch's semantics):
    # keep it short. The late node's round needs no last call (max reached).
    conf = "last_call_timeout=2"
    for _ in range(2):
        start(torchrun, one_etcd.endpoint, run_id, "2:3", finish_file, expect=3, conf=conf)
    torchrun.wait_markers(2, world=2, timeout=START)
    start(torchrun, one_etcd.endpoint, run_id, "2:3", finish_file, expect=3, conf=conf)
    torchrun.wait_markers(3, world=3, timeout=START)
    finish_file.touch()
    assert_world(results_of(torchrun, [0, 1, 2]), 3)


def test_kill_member_while_spare_waits(
    torchrun: Torchrun, one_etcd: EtcdServer, run_id: str, finish_file: Path
) -> None:
    # max 2 nodes, 3 started: one is a hot spare; it takes the killed member's place.
    for _ in range(3):
        start(torchrun, one_etcd.endpoint, run_id, "2", finish_file)
    torchrun.wait_markers(2, world=2, timeout=START)
    time.sleep(1.0)  # let the third agent reach the rendezvous as a spare
    names = torchrun.markers(2)
    assert len(names) == 2, names
    pids = {int(n.split("-")[1]) for n in names}
    members = [i for i, n in enumerate(torchrun.nodes) if pids & set(tagged_pids(n.tag))]
    spare = next(i for i in range(3) if i not in members)
    torchrun.nodes[members[1]].kill()
    torchrun.wait_markers(4, world=2, timeout=60)
    finish_file.touch()
    results = results_of(torchrun, [members[0], spare])
    assert_world(results, 2)


def test_pause_below_ttl_costs_no_round(
    torchrun: Torchrun, one_etcd: EtcdServer, run_id: str, finish_file: Path
) -> None:
    for _ in range(3):
        start(torchrun, one_etcd.endpoint, run_id, "3", finish_file)
    torchrun.wait_markers(3, world=3, timeout=START)
    node = torchrun.nodes[1]
    signal_node(node, signal.SIGSTOP)  # GC pause, swap storm: 1.5 s < 3 s TTL - 0.5 s
    try:
        time.sleep(1.5)
    finally:
        signal_node(node, signal.SIGCONT)
    time.sleep(1.0)
    finish_file.touch()
    results = results_of(torchrun, [0, 1, 2])
    assert_world(results, 3)
    assert all(" restart=0 " in r for r in results), results
    assert len(torchrun.markers()) == 3, torchrun.markers()  # one round, never re-formed


def test_pause_above_ttl_node_rejoins_as_late_node(
    torchrun: Torchrun, one_etcd: EtcdServer, run_id: str, finish_file: Path
) -> None:
    # A node stopped past its lease TTL (3 s) is gone for the others: they re-form at 2
    # while it is stopped. Once resumed, its lease and its round are gone: its agent must
    # rendezvous again and join the next round as a late node (max 3 reached: no last
    # call), so the job runs at 3 again and finishes on every node.
    for _ in range(3):
        start(torchrun, one_etcd.endpoint, run_id, "2:3", finish_file, expect=3)
    torchrun.wait_markers(3, world=3, timeout=START)
    paused = node_with_rank(torchrun, world=3, rank=0)  # hosts the round's bootstrap store
    node = torchrun.nodes[paused]
    stopped = time.monotonic()
    signal_node(node, signal.SIGSTOP)
    try:
        torchrun.wait_markers(2, world=2, timeout=60)
        assert torchrun.nodes[paused].proc.poll() is None
        time.sleep(max(0.0, 6.0 - (time.monotonic() - stopped)))
    finally:
        signal_node(node, signal.SIGCONT)
    assert len(torchrun.markers(2)) == 2, torchrun.markers()  # one round of 2, not several
    torchrun.wait_markers(6, world=3, timeout=START)  # the first round of 3, and this one
    finish_file.touch()
    assert_world(results_of(torchrun, [0, 1, 2]), 3)


def test_restarted_node_rejoins(
    torchrun: Torchrun, one_etcd: EtcdServer, run_id: str, finish_file: Path
) -> None:
    for _ in range(3):
        start(torchrun, one_etcd.endpoint, run_id, "2:3", finish_file, expect=3)
    torchrun.wait_markers(3, world=3, timeout=START)
    torchrun.nodes[2].kill()
    torchrun.wait_markers(2, world=2, timeout=60)
    start(torchrun, one_etcd.endpoint, run_id, "2:3", finish_file, expect=3)  # the machine is back
    torchrun.wait_markers(6, world=3, timeout=START)
    finish_file.touch()
    assert_world(results_of(torchrun, [0, 1, 3]), 3)


def test_embedded_default_two_nodes_no_endpoint(torchrun: Torchrun, run_id: str) -> None:
    # No --rdzv-endpoint: the job's own etcd on the port derived from the run id.
    if not port_is_free(embedded_port(run_id)):
        pytest.skip("the run id's embedded port is in use on this machine")
    for _ in range(2):
        start(torchrun, None, run_id, "2", None)
    assert_world(results_of(torchrun, [0, 1]), 2)
    hosts = [n for n in torchrun.nodes if "hosts the job's etcd" in n.log()]
    assert len(hosts) == 1, "exactly one agent must host the embedded etcd"


def test_failover_member_killed_mid_job(torchrun: Torchrun, run_id: str, finish_file: Path) -> None:
    with EtcdCluster(3) as cluster:
        endpoints = ",".join(cluster.endpoints)
        for _ in range(2):
            start(torchrun, endpoints, run_id, "2", finish_file, max_restarts=0)
        torchrun.wait_markers(2, world=2, timeout=START)
        # Both agents talk to the first endpoint: kill that member while the workers run.
        cluster.members[0].kill()
        time.sleep(1.0)
        finish_file.touch()
        assert_world(results_of(torchrun, [0, 1]), 2)


def test_wrong_option_fails_fast(torchrun: Torchrun, run_id: str) -> None:
    began = time.monotonic()
    node = start(torchrun, "127.0.0.1:1", run_id, "2", None, conf="lease_ttl=0")
    assert node.wait(60) != 0
    assert time.monotonic() - began < 60
    assert "lease_ttl='0': must be at least 1" in node.log()


def test_unreachable_endpoint_fails_fast(torchrun: Torchrun, run_id: str) -> None:
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    endpoint = ",".join(f"127.0.0.1:{p}" for p in ports)
    node = start(torchrun, endpoint, run_id, "2", None)
    assert node.wait(60) != 0
    assert "no etcd answers at --rdzv-endpoint" in node.log()
    assert f"127.0.0.1:{ports[0]}" in node.log()
