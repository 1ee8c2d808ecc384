"""EtcdCluster: members, fault injection, and leaving the shared cluster healthy."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from _server_http import get, healthy, pid_alive, put

from etcd_rendezvous.errors import EtcdServerError
from etcd_rendezvous.server import EtcdCluster


def _put_eventually(url: str, key: bytes, value: bytes, timeout: float = 30) -> None:
    """Put once the member sees a leader again (after a kill or pause)."""
    deadline = time.monotonic() + timeout
    while not healthy(url, timeout=0.5) and time.monotonic() < deadline:
        time.sleep(0.01)
    put(url, key, value)


def test_members_and_endpoints(etcd_cluster: EtcdCluster) -> None:
    members = etcd_cluster.members
    assert [m.endpoint for m in members] == etcd_cluster.endpoints
    assert len(set(etcd_cluster.endpoints)) == 3
    assert all(m.is_running and m.pid for m in members)
    assert len({m.name for m in members}) == 3
    put(members[0].url, b"cluster-key", b"replicated")
    for member in members:
        assert get(member.url, b"cluster-key") == b"replicated"


def test_kill_leader_and_restart(etcd_cluster: EtcdCluster) -> None:
    leader = etcd_cluster.leader()
    assert leader is not None
    pid = leader.pid
    assert pid is not None
    leader.kill()
    assert not leader.is_running and not pid_alive(pid)
    survivors = [m for m in etcd_cluster.members if m is not leader]
    try:
        _put_eventually(survivors[0].url, b"after-kill", b"quorum of two")
        assert get(survivors[1].url, b"after-kill") == b"quorum of two"
    finally:
        leader.start()
    etcd_cluster.wait_ready()
    assert leader.pid != pid
    assert get(leader.url, b"after-kill") == b"quorum of two"


def test_pause_and_resume_follower(etcd_cluster: EtcdCluster) -> None:
    leader = etcd_cluster.leader()
    follower = next(m for m in etcd_cluster.members if m is not leader)
    follower.pause()
    try:
        assert not healthy(follower.url, timeout=0.3)
        assert follower.is_running
        other = next(m for m in etcd_cluster.members if m is not follower)
        _put_eventually(other.url, b"while-paused", b"yes")
    finally:
        follower.resume()
    follower.wait_ready(30)
    deadline = time.monotonic() + 10
    while get(follower.url, b"while-paused") != b"yes" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert get(follower.url, b"while-paused") == b"yes"


def test_member_stop_and_restart(etcd_cluster: EtcdCluster) -> None:
    member = etcd_cluster.members[-1]
    member.stop()
    member.stop()  # idempotent
    assert not member.is_running
    with pytest.raises(EtcdServerError, match="not running"):
        member.pause()
    member.restart()
    etcd_cluster.wait_ready()
    assert healthy(member.url)


def test_own_cluster_with_user_data_dir(etcd_binary: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "cluster data"
    with EtcdCluster(3, binary=etcd_binary, data_dir=data_dir) as cluster:
        endpoints = cluster.endpoints
        put(cluster.urls[0], b"k", b"v")
    assert all(not m.is_running for m in cluster.members)
    assert sorted(p.name for p in data_dir.iterdir() if p.is_dir()) == [
        "member0",
        "member1",
        "member2",
    ]
    with EtcdCluster(3, binary=etcd_binary, data_dir=data_dir) as cluster:
        # etcd stored the members' peer URLs: a new cluster on the same data reuses the ports.
        assert cluster.endpoints == endpoints
        assert get(cluster.urls[2], b"k") == b"v"
    assert data_dir.is_dir()
