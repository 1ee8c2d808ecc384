"""EtcdReplica against real etcd: hosts (loopback addresses 127.0.0.x) grow a cluster to
its size, replace a killed or paused member, and leave nothing behind.

Each replica is one "host": its own address, the same client port (as on real hosts),
a member of the cluster once the cluster needs one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.errors import EtcdClientError, EtcdServerError
from etcd_rendezvous.server import EtcdReplica

DEAD_AFTER = 2.0


def _free_port(hosts: list[str]) -> int:
    """A port free on every one of ``hosts``."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind((hosts[0], 0))
            port = int(sock.getsockname()[1])
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every address")


def _until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> float:
    """Wait (bounded) until ``check()``; the seconds it took."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"not {what} after {timeout:g}s"
        time.sleep(0.1)
    return time.monotonic() - start


class Hosts:
    """``n`` replicas of one cluster, on 127.0.0.1..n; all stopped at the end, and
    checked to leave no process and no data behind."""

    def __init__(self, binary: str, n: int, size: int = 3) -> None:
        addresses = [f"127.0.0.{i + 1}" for i in range(n)]
        port = _free_port(addresses)
        self.replicas = [
            EtcdReplica(
                cluster=f"rdzv-test-{port}",
                address=address,
                port=port,
                size=size,
                binary=binary,
                dead_after=DEAD_AFTER,
                interval=0.2,
            )
            for address in addresses
        ]
        self.pids: set[int] = set()
        self.data_dirs: set[str] = set()

    def start(self) -> None:
        seed, *others = self.replicas
        seed.seed()
        for replica in others:
            replica.join([seed.url])

    def states(self) -> list[str]:
        self._note()
        return [r.state for r in self.replicas]

    def _note(self) -> None:
        for replica in self.replicas:
            server = replica.server
            if server is not None:
                if server.pid is not None:
                    self.pids.add(server.pid)
                if server.data_dir is not None:
                    self.data_dirs.add(server.data_dir)

    def voters(self, replicas: list[EtcdReplica] | None = None) -> list[EtcdReplica]:
        self._note()
        return [r for r in replicas or self.replicas if r.state == "voter"]

    def stop(self) -> None:
        self._note()
        for replica in self.replicas:
            replica.stop()
        assert {r.state for r in self.replicas} <= {"stopped", "new"}
        for pid in self.pids:
            assert not _alive(pid), f"etcd {pid} still runs after stop()"
        for path in self.data_dirs:
            assert not os.path.exists(path), f"{path} left behind"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def hosts(etcd_binary: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., Hosts]]:
    made: list[Hosts] = []

    def make(n: int, size: int = 3) -> Hosts:
        h = Hosts(etcd_binary, n, size)
        made.append(h)
        h.start()
        return h

    yield make
    for h in made:
        h.stop()


def _replaced(client: EtcdClient, old_id: int) -> Callable[[], bool]:
    """Whether the cluster has 3 started voters again, member ``old_id`` not among them
    (whoever took its place: the waiting host, or the old one under a new name)."""

    def check() -> bool:
        with contextlib.suppress(EtcdClientError):
            members = client.members(linearizable=True)
            voters = [m for m in members if m.started and not m.is_learner]
            return len(voters) == 3 and old_id not in {m.id for m in members}
        return False

    return check


def _voter_urls(client: EtcdClient) -> set[str]:
    with contextlib.suppress(EtcdClientError):
        members = client.members(linearizable=True)
        return {u for m in members if m.started and not m.is_learner for u in m.client_urls}
    return set()


def _own_id(replica: EtcdReplica) -> int:
    assert replica.view is not None
    return next(m.id for m in replica.view.members if m.name == replica.name)


def _member_ids(client: EtcdClient) -> set[int]:
    return {m.id for m in client.members(linearizable=True) if not m.is_learner}


def test_four_hosts_form_three_voters_and_replace_a_killed_one(hosts: Callable[..., Hosts]) -> None:
    h = hosts(4)
    seed = h.replicas[0]
    _until(
        "3 voters and a candidate, seen by the seed",
        lambda: (
            sorted(h.states()) == ["candidate", "voter", "voter", "voter"]
            and len(seed.endpoints) == 3
        ),
    )
    assert seed.url in seed.endpoints
    spare = next(r for r in h.replicas if r.state == "candidate")
    with EtcdClient(seed.url, autosync=0.2) as client:
        _until("the client learned the members", lambda: len(client.endpoints) == 3)
        assert set(client.endpoints) == set(seed.endpoints)
        client.put("/kept", "1")
        killed = h.voters()[0]
        assert killed.server is not None
        old_id = _own_id(killed)
        killed.server.kill()
        # The killed host's replica runs on (only its etcd died): it sees its etcd exit
        # and comes back as a candidate; the spare took its place meanwhile or does now.
        _until("the killed member replaced", _replaced(client, old_id))
        _until("the client follows", lambda: set(client.endpoints) == _voter_urls(client))
        assert len(_member_ids(client)) == 3
        assert client.get("/kept") is not None
        assert "voter" in (spare.state, killed.state)


def test_a_paused_member_is_removed_and_its_host_joins_again(
    hosts: Callable[..., Hosts],
) -> None:
    h = hosts(4)
    _until("3 voters", lambda: len(h.voters()) == 3)
    paused = next(r for r in h.voters() if r is not h.replicas[0])
    server = paused.server
    assert server is not None and server.process is not None
    old_id = _own_id(paused)
    old_name = paused.name
    server.process.pause()
    try:
        start = time.monotonic()
        with EtcdClient(h.replicas[0].url, timeout=2.0) as client:
            _until("the paused member removed and replaced", _replaced(client, old_id))
        assert time.monotonic() - start >= DEAD_AFTER  # not before it was silent that long
        # Its own replica sees it gone, stops it, and joins again under a new name.
        _until("the paused host back under a new name", lambda: paused.name != old_name)
    finally:
        if server.process is not None and server.is_running:
            server.process.resume()
    _until("the paused member's etcd stopped", lambda: not server.is_running)
    assert paused.state in ("candidate", "learner", "voter")


def test_two_hosts_stay_one_voter_and_one_learner(hosts: Callable[..., Hosts]) -> None:
    """Two voters tolerate no more failures than one, and need both for quorum."""
    h = hosts(2)
    _until("a learner", lambda: sorted(h.states()) == ["learner", "voter"])
    time.sleep(1.0)  # rounds go by: still no promotion
    assert sorted(h.states()) == ["learner", "voter"]
    members = h.replicas[0].view.members  # type: ignore[union-attr]
    assert sorted(m.is_learner for m in members) == [False, True]


def test_a_third_host_gets_the_learner_promoted(hosts: Callable[..., Hosts]) -> None:
    h = hosts(3)
    _until("3 voters", lambda: h.states().count("voter") == 3)


def test_size_one_keeps_the_others_waiting(hosts: Callable[..., Hosts]) -> None:
    h = hosts(3, size=1)
    _until("2 candidates", lambda: h.states().count("candidate") == 2)
    time.sleep(1.0)
    assert sorted(h.states()) == ["candidate", "candidate", "voter"]
    assert len(h.replicas[0].endpoints) == 1


def test_a_candidate_with_no_cluster_decides_nothing(etcd_binary: str) -> None:
    port = _free_port(["127.0.0.2"])
    replica = EtcdReplica(cluster="rdzv-nobody", address="127.0.0.2", port=port, binary=etcd_binary)
    replica.join([f"http://127.0.0.1:{_free_port(['127.0.0.1'])}"])
    try:
        time.sleep(1.0)
        assert replica.state == "candidate" and replica.server is None
        assert replica.endpoints == []
    finally:
        replica.stop()
    assert replica.state == "stopped"


def test_bad_arguments_and_double_start(etcd_binary: str) -> None:
    with pytest.raises(ValueError, match="1, 3, 5 or 7"):
        EtcdReplica(cluster="c", address="127.0.0.1", port=1, size=2)
    with pytest.raises(ValueError, match="positive"):
        EtcdReplica(cluster="c", address="127.0.0.1", port=1, dead_after=0)
    port = _free_port(["127.0.0.1"])
    with EtcdReplica(
        cluster="rdzv-once", address="127.0.0.1", port=port, binary=etcd_binary
    ) as replica:
        replica.seed()
        with pytest.raises(EtcdServerError, match="started already"):
            replica.seed()
        with pytest.raises(EtcdServerError, match="started already"):
            replica.join([replica.url])
        assert replica.wait_for("voter", timeout=1) == "voter"
        with pytest.raises(TimeoutError, match="not learner"):
            replica.wait_for("learner", timeout=0.2)
    assert replica.state == "stopped" and replica.server is None


def test_size_five_grows_to_five_voters(hosts: Callable[..., Hosts]) -> None:
    h = hosts(6, size=5)
    _until(
        "5 voters and a candidate",
        lambda: (
            sorted(h.states()) == ["candidate"] + ["voter"] * 5
            and len(h.replicas[0].endpoints) == 5
        ),
    )
