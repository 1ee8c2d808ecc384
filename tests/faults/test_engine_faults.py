"""The engine's writes through a real cutting proxy: a lost reply is read back, not guessed.

The proxy drops the reply of one chosen txn after etcd applied it (the client raises
"outcome unknown" and the engine resends it, guarded): the resend fails its guard on
our own write, and the engine must learn from the read-back that the first attempt was
applied instead of taking it for a lost race. The txn to cut is chosen by wrapping the
client's ``txn`` (it arms the proxy for the next txn when that one writes ``key``);
etcd itself is real.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator, Sequence

import pytest

from etcd_rendezvous.client import Compare, EtcdClient, PutOp, Retry, TxnResponse
from etcd_rendezvous.client.txn import AnyOp
from etcd_rendezvous.rendezvous import Rendezvous
from etcd_rendezvous.rendezvous._records import Keys
from etcd_rendezvous.server import EtcdServer
from faults.proxy import Fault, FaultProxy

TXN = b"/v3/kv/txn"
WAIT = 20.0


@pytest.fixture
def proxy(etcd_server: EtcdServer) -> Iterator[FaultProxy]:
    with FaultProxy(etcd_server.endpoint) as p:
        yield p


@pytest.fixture
def direct(etcd_server: EtcdServer) -> Iterator[EtcdClient]:
    with EtcdClient(etcd_server.endpoint) as client:
        yield client


@pytest.fixture
def keys(direct: EtcdClient) -> Iterator[Keys]:
    k = Keys(f"cut-{uuid.uuid4().hex[:8]}")
    yield k
    direct.delete(k.root, prefix=True)


@pytest.fixture
def cut_client(proxy: FaultProxy) -> Iterator[EtcdClient]:
    with EtcdClient(proxy.endpoint, timeout=2.0) as client:
        yield client


def cut_reply_of_txn_writing(client: EtcdClient, proxy: FaultProxy, key: str) -> threading.Event:
    """Drop the reply of the first txn through ``client`` whose success branch puts ``key``."""
    real = client.txn
    armed = threading.Event()
    target = key.encode()

    def txn(
        compare: Sequence[Compare], success: Sequence[AnyOp] = (), failure: Sequence[AnyOp] = ()
    ) -> TxnResponse:
        puts = [op for op in success if isinstance(op, PutOp)]
        if not armed.is_set() and any(op.key == target for op in puts):
            armed.set()
            proxy.fault(Fault.DROP_REPLY, path=TXN)
        return real(compare, success, failure)

    client.txn = txn  # type: ignore[method-assign]
    return armed


def node(client: EtcdClient, keys: Keys) -> Rendezvous:
    return Rendezvous(
        client,
        keys.run_id,
        1,
        2,
        node_id="a",
        lease_ttl=5,
        last_call_timeout=0.1,
        probe=False,
        retry=Retry(deadline=WAIT, max_delay=0.2),
    )


def test_a_commit_whose_reply_was_lost_is_known_applied(
    cut_client: EtcdClient,
    proxy: FaultProxy,
    direct: EtcdClient,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    armed = cut_reply_of_txn_writing(cut_client, proxy, keys.round)
    rdzv = node(cut_client, keys)
    try:
        with caplog.at_level(logging.DEBUG, logger="etcd_rendezvous"):
            assignment = rdzv.join(WAIT)
        assert armed.is_set() and proxy.faults_applied == 1, "the commit's reply was not cut"
        assert assignment.round == 1 and assignment.members == ("a",)
        fired = rdzv._machine.fired
        assert "commit-lost" not in fired, f"an applied commit taken for a lost race: {fired}"
        assert "reply to its commit of round 1 was lost; it was applied" in caplog.text
        assert "lost a race" not in caplog.text
        kv = direct.get(keys.round)
        assert kv is not None and kv.version == 1  # written once
    finally:
        rdzv.leave()


def test_a_leader_create_whose_reply_was_lost_is_known_applied(
    cut_client: EtcdClient,
    proxy: FaultProxy,
    direct: EtcdClient,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    armed = cut_reply_of_txn_writing(cut_client, proxy, keys.leader)
    rdzv = node(cut_client, keys)
    try:
        with caplog.at_level(logging.INFO, logger="etcd_rendezvous"):
            assignment = rdzv.join(WAIT)
        assert armed.is_set() and proxy.faults_applied == 1, "the create's reply was not cut"
        assert assignment.round == 1 and rdzv.is_leader
        assert "reply to its leader-key create was lost; it was applied" in caplog.text
        assert "node a leads rendezvous" in caplog.text
        assert rdzv._hub is not None and rdzv._hub.leader_known_after(0)
        kv = direct.get(keys.leader)
        assert kv is not None and kv.version == 1 and rdzv._leader_lease is not None
        assert kv.lease == rdzv._leader_lease.id
    finally:
        rdzv.leave()
