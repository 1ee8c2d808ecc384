"""The cluster membership API against real etcd: a learner added, started, promoted, removed."""

from __future__ import annotations

import socket
import time

import pytest

from etcd_rendezvous.errors import EtcdClientError
from etcd_rendezvous.server import EtcdServer


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def test_a_learner_joins_is_promoted_and_removed(etcd_binary: str) -> None:
    """127.0.0.2 is a second loopback address: a second "host" for the new member."""
    with EtcdServer(
        binary=etcd_binary, name="a", heartbeat_interval_ms=100, election_timeout_ms=1000
    ) as seed:
        client = seed.get_client()
        peer = f"http://127.0.0.2:{_free_port('127.0.0.2')}"
        learner = client.member_add([peer], learner=True)
        assert learner.is_learner and not learner.started and learner.peer_urls == [peer]
        with pytest.raises(EtcdClientError, match="too many learner members"):
            client.member_add([f"http://127.0.0.3:{_free_port('127.0.0.3')}"], learner=True)
        with pytest.raises(EtcdClientError, match="member ID already exist"):
            client.member_add([peer], learner=True)  # a resend never adds it twice
        with pytest.raises(EtcdClientError, match="in sync with leader"):
            client.member_promote(learner.id)  # not started yet
        second = EtcdServer(
            binary=etcd_binary,
            name="b",
            host="127.0.0.2",
            peer_port=int(peer.rsplit(":", 1)[1]),
            extra_args=[
                "--initial-cluster", f"a={seed.peer_url},b={peer}",
                "--initial-cluster-state", "existing",
            ],
            heartbeat_interval_ms=100, election_timeout_ms=1000,
        )  # fmt: skip
        with second:
            deadline = time.monotonic() + 30
            while True:
                try:
                    client.member_promote(learner.id)
                    break
                except EtcdClientError:
                    assert time.monotonic() < deadline, "the learner never got in sync"
                    time.sleep(0.1)
            members = {m.name: m for m in client.members(linearizable=True)}
            assert set(members) == {"a", "b"}
            assert not members["b"].is_learner and members["b"].started
            assert members["b"].client_urls == [second.url]
            deadline = time.monotonic() + 30
            while True:  # etcd refuses a removal right after a promotion (strict reconfig)
                try:
                    client.member_remove(learner.id)
                    break
                except EtcdClientError:
                    assert time.monotonic() < deadline, "the member was never removed"
                    time.sleep(0.2)
            assert [m.name for m in client.members(linearizable=True)] == ["a"]
            with pytest.raises(EtcdClientError, match="member not found"):
                client.member_remove(learner.id)
        client.close()
