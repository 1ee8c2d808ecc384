"""Failed actions are reported back to the machine (issue 10 item 5), on a real etcd.

The failure is real: an etcd with authentication whose user may read its node key but
not write it (the root user grants the write later), so the node-key put is refused by
etcd itself. The engine's errors are rendezvous errors, with the client's as the cause.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.errors import EtcdAuthError
from etcd_rendezvous.rendezvous import Rendezvous, RendezvousError
from etcd_rendezvous.rendezvous._records import Keys
from etcd_rendezvous.server import EtcdServer

WAIT = 10.0


@pytest.fixture(scope="module")
def auth_server(etcd_binary: str) -> Iterator[EtcdServer]:
    """A dedicated etcd with authentication on (root/rootpw), shared by this module."""
    with EtcdServer(binary=etcd_binary, root_password="rootpw") as server:
        yield server


def _prefix_end(key: str) -> str:
    return key[:-1] + chr(ord(key[-1]) + 1)


@pytest.fixture
def bob(auth_server: EtcdServer) -> Iterator[tuple[EtcdClient, EtcdClient, Keys]]:
    """(bob's client, root's client, a fresh run's keys): bob may read and write the
    whole run except its node key ``nodes/a``, which it may only read."""
    keys = Keys(f"run-{uuid.uuid4().hex[:8]}")
    user = f"bob-{keys.run_id}"
    node_key = keys.node("a")
    with auth_server.get_client() as root:
        root.user_add(user, "bobpw")
        root.role_add(user)
        root.role_grant_permission(user, keys.root, range_end=node_key)
        root.role_grant_permission(user, node_key, permission="READ")
        root.role_grant_permission(user, node_key + "\0", range_end=_prefix_end(keys.root))
        root.user_grant_role(user, user)
        with EtcdClient(auth_server.endpoint, username=user, password="bobpw") as client:
            yield client, root, keys
        root.delete(keys.root, prefix=True)


def test_a_refused_node_key_put_fails_the_join_and_the_next_join_writes_it(
    bob: tuple[EtcdClient, EtcdClient, Keys],
) -> None:
    client, root, keys = bob
    node = Rendezvous(
        client, keys.run_id, 1, 1, node_id="a", lease_ttl=5, last_call_timeout=0.1, probe=False
    )
    try:
        with pytest.raises(RendezvousError) as info:
            node.join(WAIT)
        # a rendezvous error at once (not the raw client error, not a timeout), with the cause
        assert "could not write its node key" in str(info.value), info.value
        assert isinstance(info.value.__cause__, EtcdAuthError), repr(info.value.__cause__)
        assert root.get(keys.node("a")) is None

        root.role_grant_permission(f"bob-{keys.run_id}", keys.node("a"))  # now it may
        assignment = node.join(WAIT)  # min_nodes=1: this node alone completes round 1
        assert (assignment.round, assignment.rank, assignment.world_size) == (1, 0, 1)
        assert root.get(keys.node("a")) is not None
    finally:
        node.leave()


def test_client_errors_leave_the_engine_as_rendezvous_errors(
    bob: tuple[EtcdClient, EtcdClient, Keys], auth_server: EtcdServer
) -> None:
    """A user with no permission at all: join, num_nodes_waiting and is_closed raise
    rendezvous errors whose cause is the client's error."""
    _, _, keys = bob
    with auth_server.get_client() as root:
        root.user_add(f"eve-{keys.run_id}", "evepw")
    with EtcdClient(
        auth_server.endpoint, username=f"eve-{keys.run_id}", password="evepw"
    ) as client:
        node = Rendezvous(client, keys.run_id, 1, 1, node_id="a", lease_ttl=5, probe=False)
        try:
            for call in (node.join, node.num_nodes_waiting, node.is_closed):
                with pytest.raises(RendezvousError) as info:
                    call()
                assert isinstance(info.value.__cause__, EtcdAuthError), (call, info.value)
                assert keys.run_id in str(info.value)
        finally:
            node.leave()


def test_a_join_against_a_stopped_etcd_fails_within_its_timeout(etcd_binary: str) -> None:
    """Retries stop at the join's deadline (they went on for the client's 30 s retry)."""
    server = EtcdServer(binary=etcd_binary)
    with server:
        client = server.get_client(timeout=1.0)
        node = Rendezvous(
            client, "job", 1, 1, node_id="a", lease_ttl=5, last_call_timeout=0.1, probe=False
        )
        try:
            assert node.join(WAIT).round == 1
            server.stop()
            start = time.monotonic()
            with pytest.raises(RendezvousError) as info:
                node.join(2.0)
            took = time.monotonic() - start
            assert took < 2.0 + 3.0, f"join(timeout=2) took {took:.1f}s"
            assert "etcd" in str(info.value)
        finally:
            node.leave()
            client.close()
