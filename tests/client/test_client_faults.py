"""Fault tests: server restarts, killed and paused members, dead endpoints.

Tests that break a member of the shared ``etcd_cluster`` restart it before
returning; tests that stop a whole server use their own ``EtcdServer``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from etcd_rendezvous.client import EtcdClient, Retry, Watch, WatchEvent
from etcd_rendezvous.errors import (
    EtcdLeaseLostError,
    EtcdTimeoutError,
    EtcdUnavailableError,
    EtcdWatchError,
)
from etcd_rendezvous.server import EtcdCluster, EtcdServer, find_free_port


def _free_port() -> int:
    sock = find_free_port()
    port = int(sock.getsockname()[1])
    sock.close()
    return port


def _next(watch: Watch, timeout: float = 10.0) -> WatchEvent:
    event = watch.next_event(timeout)
    assert event is not None, f"no event within {timeout}s on {watch!r}"
    return event


@pytest.fixture
def own_server(etcd_binary: str, tmp_path: Path) -> Iterator[EtcdServer]:
    """A dedicated server on a user-owned data dir and a fixed port (stop/start keeps both)."""
    server = EtcdServer(str(tmp_path / "data dir"), binary=etcd_binary, port=_free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
        assert not server.is_running


@pytest.fixture
def healthy_cluster(etcd_cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The shared cluster, restored to all members running after the test."""
    yield etcd_cluster
    for member in etcd_cluster.members:
        if not member.is_running:
            member.restart()
    etcd_cluster.wait_ready()


def test_watch_resumes_across_server_restart(own_server: EtcdServer) -> None:
    with EtcdClient(own_server.endpoint, namespace="/w/") as client:
        watch = client.watch("k", prefix=True)
        client.put("k1", "before")
        assert _next(watch).value == b"before"
        own_server.stop()
        own_server.start()
        with EtcdClient(own_server.endpoint, namespace="/w/") as writer:
            writer.put("k2", "right after restart")
            writer.put("k3", "later")
        events = [_next(watch), _next(watch)]
        assert [e.value for e in events] == [b"right after restart", b"later"]
        assert watch.next_event(0.1) is None  # nothing repeated
        # The plain client fails over to the restarted server too.
        assert client.get("k1").value == b"before"  # type: ignore[union-attr]
        watch.cancel()


def test_watch_gives_up_loudly_and_lease_loss_is_reported(own_server: EtcdServer) -> None:
    with EtcdClient(
        own_server.endpoint, timeout=0.5, watch_retry=Retry(deadline=0.5, max_delay=0.1)
    ) as client:
        watch = client.watch("x")
        lease = client.lease(1)
        own_server.stop()
        with pytest.raises(EtcdWatchError, match="could not resume") as info:
            watch.next_event(10)
        assert isinstance(info.value.__cause__, Exception)
        assert lease.wait_lost(5)
        assert isinstance(lease.error, EtcdLeaseLostError)
        assert "no keep-alive reached etcd" in str(lease.error)
        watch.cancel()
        lease.close()


def test_wrong_endpoint_fails_fast_and_clearly() -> None:
    port = _free_port()
    with EtcdClient(f"127.0.0.1:{port}", timeout=2) as client:
        started = time.monotonic()
        with pytest.raises(EtcdUnavailableError) as info:
            client.get("k")
        assert time.monotonic() - started < 1.0
        assert f"127.0.0.1:{port}" in str(info.value) and "Is etcd running" in str(info.value)
        assert "b'k'" in str(info.value)
        assert info.value.__cause__ is not None
        with pytest.raises(EtcdUnavailableError):
            client.put("k", "v")
        with pytest.raises(EtcdUnavailableError, match="cannot watch"):
            client.watch("k")
        assert not client.health()


def test_dead_endpoint_is_skipped(etcd_server: EtcdServer) -> None:
    dead = f"127.0.0.1:{_free_port()}"
    with EtcdClient(f"{dead},{etcd_server.endpoint}", namespace="/skip/") as client:
        client.put("k", "v")  # never sent to the dead one: safe to fail over
        assert client.endpoint == etcd_server.url
        with client.watch("k") as watch:
            client.delete("k")
            assert _next(watch).type == "DELETE"


def test_failover_when_member_killed(healthy_cluster: EtcdCluster) -> None:
    # Kill a follower: killing the leader makes writes wait for an election, and a
    # write that times out then has an unknown outcome (tested below with a pause).
    leader = healthy_cluster.leader()
    victim = next(m for m in healthy_cluster.members if m is not leader)
    endpoints = [victim.endpoint] + [m.endpoint for m in healthy_cluster.members if m is not victim]
    with EtcdClient(endpoints, spread=False, namespace="/failover/") as client:
        client.put("k", "1")
        assert client.endpoint == victim.url
        victim.kill()
        client.put("k", "2")  # connection refused: never sent, so safe to send elsewhere
        assert client.get("k").value == b"2"  # type: ignore[union-attr]
        assert client.endpoint != victim.url
        assert not client.health(victim.endpoint)
        client.delete("", prefix=True)


def test_watch_resumes_when_its_member_is_killed(healthy_cluster: EtcdCluster) -> None:
    leader = healthy_cluster.leader()
    first = next(m for m in healthy_cluster.members if m is not leader)  # see above
    endpoints = [first.endpoint] + [m.endpoint for m in healthy_cluster.members if m is not first]
    with EtcdClient(endpoints, spread=False, namespace="/wkill/") as client:
        watch = client.watch("k", prefix=True)
        client.put("k1", "1")
        assert _next(watch).value == b"1"
        victim = next(m for m in healthy_cluster.members if m.url == watch.endpoint)
        victim.kill()
        others = [m.endpoint for m in healthy_cluster.members if m is not victim]
        with EtcdClient(others, namespace="/wkill/") as writer:
            for i in range(2, 5):
                writer.put(f"k{i}", str(i))
        assert [_next(watch).value for _ in range(3)] == [b"2", b"3", b"4"]
        assert watch.endpoint != victim.url
        assert watch.next_event(0.1) is None
        watch.cancel()
        client.delete("", prefix=True)


def test_write_with_unknown_outcome_is_not_retried(healthy_cluster: EtcdCluster) -> None:
    leader = healthy_cluster.leader()
    paused = next(m for m in healthy_cluster.members if m is not leader)
    others = [m for m in healthy_cluster.members if m is not paused]
    endpoints = [paused.endpoint] + [m.endpoint for m in others]
    with EtcdClient(endpoints, timeout=0.3, spread=False, namespace="/paused/") as client:
        paused.pause()
        try:
            with pytest.raises(EtcdTimeoutError, match="may or may not have been applied"):
                client.put("k", "v")
            assert client.get("k") is None  # reads may go elsewhere
            assert client.endpoint != paused.url
        finally:
            paused.resume()


def test_watch_and_lease_leave_a_paused_member(healthy_cluster: EtcdCluster) -> None:
    # SIGSTOP keeps the TCP connection open: only the idle check notices the member hangs.
    leader = healthy_cluster.leader()
    paused = next(m for m in healthy_cluster.members if m is not leader)
    others = [m for m in healthy_cluster.members if m is not paused]
    endpoints = [paused.endpoint] + [m.endpoint for m in others]
    with EtcdClient(endpoints, spread=False, namespace="/hung/", watch_idle_check=0.5) as client:
        watch = client.watch("k", prefix=True)
        assert watch.endpoint == paused.url
        lease = client.lease(2)  # the client timeout (5 s) is longer than the TTL
        client.put("k1", "1")
        assert _next(watch).value == b"1"
        paused.pause()
        try:
            started = time.monotonic()
            with EtcdClient([m.endpoint for m in others], namespace="/hung/") as writer:
                writer.put("k2", "2")
                assert _next(watch, 15).value == b"2"
                elapsed = time.monotonic() - started
                assert watch.endpoint != paused.url
                # Still alive a whole TTL after the pause: keep-alives moved on in time.
                assert not lease.wait_lost(max(0.0, 2.5 - elapsed))
                assert writer.lease_time_to_live(lease.id).ttl > 0
            assert elapsed < 10, elapsed
            assert watch.next_event(0.1) is None
        finally:
            paused.resume()
        lease.revoke()
        watch.cancel()
        client.delete("", prefix=True)
