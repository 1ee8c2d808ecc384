"""EtcdStore writes through a real cutting proxy: exactly once, whatever happens to the reply.

Each test loses the reply of a write that etcd applied (``DROP_REPLY``), and most let
another client write in between (the proxy's ``then`` hook runs after etcd answered and
before the client sees its connection reset). A store that resends blindly applies the
write a second time over the other client's write; these tests fail on it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.errors import EtcdOutcomeUnknownError
from etcd_rendezvous.server import EtcdServer
from faults.proxy import Fault, FaultProxy

torch = pytest.importorskip("torch")

from etcd_rendezvous.torchrun import EtcdStore, EtcdStoreOutcomeUnknownError  # noqa: E402
from etcd_rendezvous.torchrun.backend import EtcdRendezvousBackend  # noqa: E402

pytestmark = pytest.mark.torch

TXN = b"/v3/kv/txn"


@pytest.fixture
def proxy(etcd_server: EtcdServer) -> Iterator[FaultProxy]:
    with FaultProxy(etcd_server.endpoint) as p:
        yield p


@pytest.fixture
def direct(etcd_server: EtcdServer) -> Iterator[EtcdClient]:
    with EtcdClient(etcd_server.endpoint) as client:
        yield client


@pytest.fixture
def prefix(direct: EtcdClient, request: pytest.FixtureRequest) -> Iterator[bytes]:
    p = f"/faults/{request.node.name}/".encode()
    direct.delete(p, prefix=True)
    yield p
    direct.delete(p, prefix=True)


@pytest.fixture
def store(proxy: FaultProxy, prefix: bytes) -> Iterator[EtcdStore]:
    client = EtcdClient(proxy.endpoint, timeout=2.0)
    s = EtcdStore(client, prefix, timeout=timedelta(seconds=5), owns_client=True)
    yield s
    s.close()


def _value(direct: EtcdClient, prefix: bytes, key: str) -> bytes | None:
    kv = direct.get(prefix + key.encode())
    return None if kv is None else kv.value


def test_the_proxy_really_drops_a_reply_and_the_client_says_outcome_unknown(
    proxy: FaultProxy, direct: EtcdClient, prefix: bytes
) -> None:
    """The premise of the suite: etcd applied the put, the client got no reply."""
    with EtcdClient(proxy.endpoint, timeout=2.0) as client:
        proxy.fault(Fault.DROP_REPLY, path=b"/v3/kv/put")
        with pytest.raises(EtcdOutcomeUnknownError, match="may or may not have been applied"):
            client.put(prefix + b"k", b"v")
    assert proxy.faults_applied == 1
    assert _value(direct, prefix, "k") == b"v"


def test_add_with_reply_cut_is_applied_once(
    store: EtcdStore, proxy: FaultProxy, direct: EtcdClient, prefix: bytes
) -> None:
    store.set("n", "0")
    proxy.fault(Fault.DROP_REPLY, path=TXN)
    assert store.add("n", 1) == 1
    assert proxy.faults_applied == 1
    assert _value(direct, prefix, "n") == b"1"
    for i in range(2, 12):  # every other add loses its reply
        if i % 2:
            proxy.fault(Fault.DROP_REPLY, path=TXN)
        assert store.add("n", 1) == i
    assert _value(direct, prefix, "n") == b"11"
    assert proxy.faults_applied == 6


def test_add_with_reply_cut_and_a_writer_in_between(
    store: EtcdStore, proxy: FaultProxy, direct: EtcdClient, prefix: bytes
) -> None:
    store.set("n", "0")
    k = prefix + b"n"
    proxy.fault(Fault.DROP_REPLY, path=TXN, then=lambda: direct.put(k, b"10"))
    assert store.add("n", 1) == 1  # the value right after our add
    assert _value(direct, prefix, "n") == b"10"


def test_append_with_reply_cut_is_applied_once(
    store: EtcdStore, proxy: FaultProxy, direct: EtcdClient, prefix: bytes
) -> None:
    store.set("s", "x")
    proxy.fault(Fault.DROP_REPLY, path=TXN)
    store.append("s", "Y")
    assert _value(direct, prefix, "s") == b"xY"
    proxy.fault(Fault.DROP_REPLY, path=TXN)
    store.append("new", "Z")  # creating the key
    assert _value(direct, prefix, "new") == b"Z"
    assert proxy.faults_applied == 2


def test_compare_set_with_reply_cut_and_the_old_value_written_back(
    store: EtcdStore, proxy: FaultProxy, direct: EtcdClient, prefix: bytes
) -> None:
    store.set("c", "a")
    k = prefix + b"c"
    proxy.fault(Fault.DROP_REPLY, path=TXN, then=lambda: direct.put(k, b"a"))
    assert store.compare_set("c", "a", "b") == b"b"
    # Our swap happened once, then the other client wrote "a" back: a resend would swap again.
    assert _value(direct, prefix, "c") == b"a"
    proxy.fault(Fault.DROP_REPLY, path=TXN)
    assert store.compare_set("fresh", "", "v") == b"v"
    assert _value(direct, prefix, "fresh") == b"v"


def test_set_with_reply_cut_does_not_overwrite_a_later_write(
    store: EtcdStore, proxy: FaultProxy, direct: EtcdClient, prefix: bytes
) -> None:
    k = prefix + b"k"
    proxy.fault(Fault.DROP_REPLY, path=TXN, then=lambda: direct.put(k, b"theirs"))
    store.set("k", "ours")
    assert _value(direct, prefix, "k") == b"theirs"


def test_multi_set_with_reply_cut_does_not_overwrite_a_later_write(
    store: EtcdStore, proxy: FaultProxy, direct: EtcdClient, prefix: bytes
) -> None:
    k = prefix + b"b"
    proxy.fault(Fault.DROP_REPLY, path=TXN, then=lambda: direct.put(k, b"theirs"))
    store.multi_set(["a", "b"], ["1", "2"])
    assert _value(direct, prefix, "a") == b"1"
    assert _value(direct, prefix, "b") == b"theirs"
    keys = [f"m{i}" for i in range(300)]  # three transactions, each reply lost
    proxy.fault(Fault.DROP_REPLY, path=TXN, count=3)
    store.multi_set(keys, keys)
    assert store.multi_get(keys) == [key.encode() for key in keys]
    assert proxy.faults_applied == 4


def test_delete_key_with_reply_cut_does_not_delete_a_recreated_key(
    store: EtcdStore, proxy: FaultProxy, direct: EtcdClient, prefix: bytes
) -> None:
    store.set("d", "old")
    k = prefix + b"d"
    proxy.fault(Fault.DROP_REPLY, path=TXN, then=lambda: direct.put(k, b"new"))
    assert store.delete_key("d") is True
    assert _value(direct, prefix, "d") == b"new"
    assert store.delete_key("missing") is False


def test_queue_push_and_pop_with_reply_cut_are_applied_once(
    store: EtcdStore, proxy: FaultProxy, direct: EtcdClient, prefix: bytes
) -> None:
    proxy.fault(Fault.DROP_REPLY, path=TXN)
    store.queue_push("q", "a")
    store.queue_push("q", "b")
    assert store.queue_len("q") == 2
    proxy.fault(Fault.DROP_REPLY, path=TXN)
    assert store.queue_pop("q") == b"a"  # popped once: "b" is still there
    assert store.queue_len("q") == 1
    assert store.queue_pop("q") == b"b"
    assert proxy.faults_applied == 2


def test_reset_before_etcd_sees_the_request_is_resent(
    store: EtcdStore, proxy: FaultProxy, direct: EtcdClient, prefix: bytes
) -> None:
    store.set("n", "5")
    proxy.fault(Fault.RESET, path=TXN, count=2)
    assert store.add("n", 1) == 6
    assert _value(direct, prefix, "n") == b"6"
    assert proxy.faults_applied == 2


def test_stalled_requests_that_arrive_late_are_not_applied_twice(
    proxy: FaultProxy, direct: EtcdClient, prefix: bytes
) -> None:
    """Client timeouts during a stall, then every held copy reaches etcd at once."""
    client = EtcdClient(proxy.endpoint, timeout=0.5)
    store = EtcdStore(client, prefix, retry_deadline=20, owns_client=True)
    try:
        store.set("n", "0")
        store.set("s", "")
        proxy.stall()
        results: dict[str, Any] = {}

        def work() -> None:
            try:
                results["add"] = store.add("n", 1)
                store.append("s", "Y")
            except BaseException as exc:
                results["error"] = exc

        worker = threading.Thread(target=work)
        worker.start()
        worker.join(2.0)  # a few timeouts and resends, all held by the stall
        proxy.resume()
        worker.join(30)
        assert not worker.is_alive()
        assert "error" not in results, results
        assert results["add"] == 1
        assert _value(direct, prefix, "n") == b"1"
        assert _value(direct, prefix, "s") == b"Y"
    finally:
        proxy.resume()
        store.close()


def test_a_write_whose_replies_are_all_lost_raises_outcome_unknown(
    proxy: FaultProxy, direct: EtcdClient, prefix: bytes
) -> None:
    client = EtcdClient(proxy.endpoint, timeout=1.0)
    store = EtcdStore(client, prefix, retry_deadline=1.0, owns_client=True)
    try:
        store.set("n", "0")
        proxy.fault(Fault.DROP_REPLY, path=TXN, count=10_000)
        with pytest.raises(EtcdStoreOutcomeUnknownError, match="outcome is unknown") as info:
            store.add("n", 1)
        assert "Read the key(s) back" in str(info.value)
        assert proxy.faults_applied > 1, "the store should have resent"
        proxy.clear()
        # Every copy reached etcd; exactly one applied. The next add builds on it.
        assert _value(direct, prefix, "n") == b"1"
        assert store.add("n", 1) == 2
        assert _value(direct, prefix, "n") == b"2"
    finally:
        store.close()


def test_markers_are_not_keys_of_the_store(
    store: EtcdStore, proxy: FaultProxy, direct: EtcdClient, prefix: bytes
) -> None:
    store.set("a", "1")
    store.add("b", 1)
    assert store.num_keys() == 2
    assert sorted(store.list_keys()) == ["a", "b"]
    with pytest.raises(ValueError, match="reserved for the store's operation markers"):
        store.set(b"\x00etcd-store-ops/x", "1")
    store.close()
    assert [kv.key for kv in direct.get_prefix(prefix)] == [prefix + b"a", prefix + b"b"]


def test_backend_set_state_with_reply_cut_reports_its_write(
    proxy: FaultProxy, direct: EtcdClient, prefix: bytes
) -> None:
    client = EtcdClient(proxy.endpoint, timeout=2.0)
    try:
        backend = EtcdRendezvousBackend(
            client, "run", key_prefix=prefix.decode(), check_states=False
        )
        proxy.fault(Fault.DROP_REPLY, path=TXN)
        result = backend.set_state(b"first")
        assert result is not None
        state, token, has_set = result
        assert (state, has_set) == (b"first", True)
        proxy.fault(Fault.DROP_REPLY, path=TXN)
        result = backend.set_state(b"second", token)
        assert result is not None and result[0] == b"second" and result[2] is True
        # A stale token after a lost reply: the write did not happen, and it says so.
        proxy.fault(Fault.DROP_REPLY, path=TXN)
        result = backend.set_state(b"third", token)
        assert result is not None and result[0] == b"second" and result[2] is False
        got = backend.get_state()
        assert got is not None and got[0] == b"second"
    finally:
        client.close()


def test_backend_set_state_lost_before_etcd_saw_it_is_sent_again(
    proxy: FaultProxy, direct: EtcdClient, prefix: bytes
) -> None:
    """The client cannot tell a reset before etcd from one after: the backend finds the
    guard still holds and sends the same guarded write again, so it can say True."""
    client = EtcdClient(proxy.endpoint, timeout=2.0)
    try:
        backend = EtcdRendezvousBackend(
            client, "run", key_prefix=prefix.decode(), check_states=False
        )
        proxy.fault(Fault.RESET, path=TXN)
        result = backend.set_state(b"first")
        assert result is not None and result[0] == b"first" and result[2] is True
        proxy.fault(Fault.RESET, path=TXN)
        result = backend.set_state(b"second", result[1])
        assert result is not None and result[0] == b"second" and result[2] is True
        assert proxy.faults_applied == 2
        got = backend.get_state()
        assert got is not None and got == (b"second", result[1])
    finally:
        client.close()
