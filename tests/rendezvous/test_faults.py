"""Fault tests: participants as real processes (rdzv_node.py) killed and paused, an etcd
member killed mid-rendezvous, a wedged leader. Every wait is bounded; every process
started here is killed and reaped at the end (checked)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from proc_state import wait_state

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.rendezvous import DEFAULT_LEASE_TTL, Assignment, Rendezvous
from etcd_rendezvous.rendezvous._records import Keys, LeaderRecord, decode
from etcd_rendezvous.server import EtcdCluster, EtcdServer

NODE_SCRIPT = str(Path(__file__).with_name("rdzv_node.py"))
TTL = DEFAULT_LEASE_TTL  # the participant processes run with the engine's defaults
Line = dict[str, Any]


class Node:
    """A participant process and the JSON lines it printed."""

    def __init__(
        self,
        endpoints: str,
        run_id: str,
        node_id: str,
        min_n: int,
        max_n: int,
        last_call: float = 30.0,
        lease_ttl: int = TTL,
    ) -> None:
        self.node_id = node_id
        self.proc = subprocess.Popen(
            [
                sys.executable,
                NODE_SCRIPT,
                endpoints,
                run_id,
                node_id,
                *map(str, (min_n, max_n, last_call, lease_ttl)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.SimpleQueue[Line] = queue.SimpleQueue()
        self.seen: list[Line] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(json.loads(raw))

    def expect(self, predicate: Callable[[Line], bool], timeout: float) -> Line:
        """The next line matching ``predicate`` (earlier ones are kept in ``seen``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.node_id}: no matching line in {timeout}s: {self.seen}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(line)
            if predicate(line):
                return line

    def assigned(self, timeout: float = 15.0, round_: int | None = None) -> Line:
        return self.expect(
            lambda x: x["event"] == "assigned" and (round_ is None or x["round"] == round_),
            timeout,
        )

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait_stopped(self, timeout: float = 10.0) -> None:
        """Wait until the process is really stopped (SIGSTOP lands asynchronously)."""
        wait_state(self.proc.pid, "T", timeout)

    def rejoin(self) -> None:
        """Ask for a new round now (as torch's agent does when a worker fails)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("rejoin\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)


@pytest.fixture
def spawn(etcd_server: EtcdServer) -> Iterator[Callable[..., Node]]:
    run_id = f"faults-{uuid.uuid4().hex[:8]}"
    started: list[Node] = []

    def start(
        node_id: str,
        min_n: int,
        max_n: int,
        endpoints: str | None = None,
        last_call: float = 30.0,
        lease_ttl: int = TTL,
    ) -> Node:
        node = Node(
            endpoints or etcd_server.endpoint, run_id, node_id, min_n, max_n, last_call, lease_ttl
        )
        started.append(node)
        return node

    start.run_id = run_id  # type: ignore[attr-defined]

    yield start
    for node in started:
        with_cont = node.proc.poll() is None
        if with_cont:
            node.signal(signal.SIGCONT)
        node.kill()
    assert all(node.proc.poll() is not None for node in started)
    with etcd_server.get_client() as client:
        client.delete(Keys(run_id).root, prefix=True)


def check_round(lines: list[Line]) -> None:
    """One round's assignments: same round and members, dense unique ranks, nobody twice."""
    assert len({(x["round"], tuple(x["members"])) for x in lines}) == 1, lines
    members = lines[0]["members"]
    assert len(set(members)) == len(members) == lines[0]["world_size"]
    assert sorted(x["rank"] for x in lines) == list(range(len(lines)))
    assert all(members[x["rank"]] == x["node"] for x in lines)


def test_sigkill_before_completion(spawn: Callable[..., Node]) -> None:
    victim = spawn("victim", 2, 2)
    victim.expect(lambda x: x["event"] == "started", 15.0)
    time.sleep(0.5)  # its key is written (joining, alone: no round yet)
    victim.signal(signal.SIGKILL)
    victim.kill()
    a, b = spawn("a", 2, 2), spawn("b", 2, 2)
    # the dead node's key expires within its TTL; then a and b form the round without it
    first = [a.assigned(TTL + 10.0), b.assigned(TTL + 10.0)]
    check_round(first)
    assert first[0]["world_size"] == 2 and "victim" not in first[0]["members"]


def test_sigkill_after_completion(spawn: Callable[..., Node]) -> None:
    """Issue 5's sequence, with the defaults (last call 30 s): the lease expires, the
    survivors hear of the loss by watch, rejoin, and the fast quorum (not the last call)
    commits round 2, recorded with its cause. Timing: benchmarks/engine_recovery.py."""
    nodes = [spawn(f"n{i}", 2, 3) for i in range(3)]
    first = [n.assigned() for n in nodes]
    check_round(first)
    assert first[0]["causes"] == ["first_round"]
    victim, survivors = nodes[2], nodes[:2]
    victim.signal(signal.SIGKILL)
    killed = time.monotonic()
    for node in survivors:
        node.expect(lambda x: x["event"] == "change" and "n2" in x["lost"], TTL + 5.0)
    seen_after = time.monotonic() - killed
    assert seen_after < TTL + 1.0 + 1.0  # TTL + 1 s, plus slack for a loaded CI machine
    second = [n.assigned(round_=2, timeout=10.0) for n in survivors]
    check_round(second)
    assert second[0]["world_size"] == 2
    assert second[0]["causes"] == ["node_lost"]
    assert "n2 lost" in second[0]["reason"] and "fast quorum" in second[0]["reason"]
    for node in survivors:  # lost -> (no other round) -> round 2, in that order
        kinds = [(x["event"], x.get("round")) for x in node.seen if x["event"] == "assigned"]
        assert kinds == [("assigned", 1), ("assigned", 2)]


def test_clean_leave_is_told_apart_from_a_loss(spawn: Callable[..., Node]) -> None:
    nodes = [spawn(f"n{i}", 2, 3) for i in range(3)]
    check_round([n.assigned() for n in nodes])
    nodes[2].signal(signal.SIGTERM)  # leave(): the lease is revoked, no TTL to wait
    second = [n.assigned(round_=2, timeout=TTL) for n in nodes[:2]]
    check_round(second)
    assert second[0]["causes"] == ["node_left"]
    change = next(x for x in nodes[0].seen if x["event"] == "change" and x["lost"])
    assert change["lost"] == change["left"] == ["n2"]


def test_hot_spare_takes_a_dead_nodes_place(spawn: Callable[..., Node]) -> None:
    nodes = [spawn(f"n{i}", 2, 3) for i in range(3)]
    check_round([n.assigned() for n in nodes])
    spare = spawn("n3", 2, 3)
    spare.expect(lambda x: x["event"] == "started", 15.0)
    time.sleep(0.3)  # on the redundancy list (the round is full)
    nodes[0].signal(signal.SIGKILL)
    second = [n.assigned(round_=2, timeout=TTL + 6.0) for n in [*nodes[1:], spare]]
    check_round(second)
    assert second[0]["members"] == ["n3", "n1", "n2"]  # the spare takes rank 0's hole
    assert second[0]["causes"] == ["node_lost", "spare_promoted"]


def test_pause_past_the_ttl_evicts_then_rejoins(spawn: Callable[..., Node]) -> None:
    nodes = [spawn(f"n{i}", 2, 3) for i in range(3)]
    check_round([n.assigned() for n in nodes])
    paused, others = nodes[2], nodes[:2]
    paused.signal(signal.SIGSTOP)
    try:
        second = [n.assigned(round_=2, timeout=TTL + 8.0) for n in others]
    finally:
        paused.signal(signal.SIGCONT)
    check_round(second)
    assert "n2" not in second[0]["members"]
    # it comes back: lease lost, joins again, and the next round has all three, once each
    third = [n.assigned(round_=3, timeout=TTL + 10.0) for n in nodes]
    check_round(third)
    assert sorted(third[0]["members"]) == ["n0", "n1", "n2"]
    assert not any(x["event"] == "assigned" and x["round"] == 2 for x in paused.seen)


def test_short_pause_costs_no_round(spawn: Callable[..., Node]) -> None:
    nodes = [spawn(f"n{i}", 2, 3) for i in range(3)]
    check_round([n.assigned() for n in nodes])
    nodes[2].signal(signal.SIGSTOP)
    time.sleep(TTL - 1.0)  # below the TTL, less the keep-alive interval: no eviction
    nodes[2].signal(signal.SIGCONT)
    time.sleep(TTL + 0.5)
    for node in nodes:
        with pytest.raises(AssertionError):  # drains what it printed; nothing is costly
            node.expect(lambda x: x["event"] == "assigned" or bool(x.get("lost")), 0.2)
    costly = [x for n in nodes for x in n.seen if x.get("round", 0) > 1 or x.get("lost")]
    assert not costly


def test_etcd_member_killed_mid_rendezvous(etcd_cluster: EtcdCluster) -> None:
    run_id = f"member-{uuid.uuid4().hex[:8]}"
    client = EtcdClient(etcd_cluster.endpoints, timeout=2.0)
    nodes = [
        Rendezvous(client, run_id, 3, 3, node_id=f"m{i}", lease_ttl=5, last_call_timeout=0.2)
        for i in range(3)
    ]
    victim = etcd_cluster.members[0]  # the member the client talks to first
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
            first = [pool.submit(r.join, 30.0) for r in nodes[:2]]
            time.sleep(0.3)
            victim.kill()
            last = pool.submit(nodes[2].join, 30.0)
            results: list[Assignment] = [f.result(40.0) for f in [*first, last]]
        assert sorted(a.rank for a in results) == [0, 1, 2]
        assert {(a.round, a.world_size) for a in results} == {(1, 3)}
    finally:
        for r in nodes:
            r.leave()
        client.close()
        if not victim.is_running:
            victim.restart()
        with EtcdClient(etcd_cluster.endpoints) as cleaner:
            cleaner.delete(Keys(run_id).root, prefix=True)


def test_wedged_leader_loses_leadership(etcd_server: EtcdServer) -> None:
    """A leader whose decision loop is stuck (its lock held) stops refreshing its leader
    lease: the leader key expires, another node leads and the round completes."""
    run_id = f"wedge-{uuid.uuid4().hex[:8]}"
    wedged_client, client = etcd_server.get_client(), etcd_server.get_client()
    leader = Rendezvous(wedged_client, run_id, 3, 3, node_id="a-leader", lease_ttl=2)
    others = [Rendezvous(client, run_id, 3, 3, node_id=f"b{i}", lease_ttl=2) for i in range(2)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        lead_join = pool.submit(leader.join, 30.0)
        deadline = time.monotonic() + 10.0
        while not leader.is_leader:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        leader._lock.acquire()  # wedge it (its keep-alive of the node lease goes on)
        try:
            start = time.monotonic()
            results = [f.result(20.0) for f in [pool.submit(r.join, 20.0) for r in others]]
            took = time.monotonic() - start
        finally:
            leader._lock.release()
        again = lead_join.result(20.0)
    try:
        assert took < 2 + 3.0  # the leader TTL, not the join timeout
        assert any(r.is_leader for r in others)
        check = [again, *results]
        assert sorted(a.rank for a in check) == [0, 1, 2]
        assert {a.round for a in check} == {1}
    finally:
        for r in [leader, *others]:
            r.leave()
        wedged_client.close()
        client.close()


# --- liveness probes (issue 5): a dead process is evicted before its lease expires -----

LONG_TTL = 60  # far longer than any wait below: only a probe can explain an early loss


def leader_of(etcd_server: EtcdServer, run_id: str) -> str:
    with etcd_server.get_client() as client:
        raw = client.get(Keys(run_id).leader)
    assert raw is not None
    record = decode(raw.value, key="leader")
    assert isinstance(record, LeaderRecord)
    return record.node_id


@pytest.mark.parametrize("victim_role", ["member", "leader"])
def test_probe_evicts_a_killed_node_long_before_its_lease_expires(
    spawn: Callable[..., Node], etcd_server: EtcdServer, victim_role: str
) -> None:
    """With a 60 s lease, the survivors rejoin (their workers saw the peer die) and the
    next round forms at once: the leader (or, when the leader died, its rejoining
    members) probed the dead process, found its port closed and revoked its lease."""
    nodes = [spawn(f"n{i}", 2, 3, lease_ttl=LONG_TTL) for i in range(3)]
    check_round([n.assigned() for n in nodes])
    leader = leader_of(etcd_server, spawn.run_id)  # type: ignore[attr-defined]
    victim = next(n for n in nodes if (n.node_id == leader) == (victim_role == "leader"))
    survivors = [n for n in nodes if n is not victim]
    victim.signal(signal.SIGKILL)
    victim.kill()
    for node in survivors:
        node.rejoin()
    second = [n.assigned(round_=2, timeout=20.0) for n in survivors]
    check_round(second)
    assert second[0]["world_size"] == 2
    assert second[0]["causes"] == ["node_lost"]
    assert f"{victim.node_id} lost" in second[0]["reason"]


def test_probe_leaves_a_paused_node_alone(
    spawn: Callable[..., Node], etcd_server: EtcdServer
) -> None:
    """A SIGSTOPped member's kernel still accepts the probe's connection: it is not
    evicted; once resumed it rejoins and the round forms with all three."""
    nodes = [spawn(f"n{i}", 2, 3, lease_ttl=LONG_TTL) for i in range(3)]
    check_round([n.assigned() for n in nodes])
    leader = leader_of(etcd_server, spawn.run_id)  # type: ignore[attr-defined]
    paused = next(n for n in nodes if n.node_id != leader)
    others = [n for n in nodes if n is not paused]
    paused.signal(signal.SIGSTOP)
    paused.wait_stopped()  # before the others rejoin: it must not see them do it
    for node in others:
        node.rejoin()
    time.sleep(3.0)  # probes run within milliseconds of the rejoin; give them time
    for node in others:
        with pytest.raises(AssertionError, match="no matching line"):
            node.assigned(round_=2, timeout=0.5)
    paused.signal(signal.SIGCONT)
    paused.rejoin()
    second = [n.assigned(round_=2, timeout=20.0) for n in nodes]
    check_round(second)
    assert second[0]["world_size"] == 3 and second[0]["causes"] == ["rejoined"]
