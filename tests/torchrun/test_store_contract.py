"""The generic ``torch.distributed.Store`` contract, on every store a user gets from us.

The operations of torch's ``StoreTestBase`` (test/distributed/test_store.py: set/get/check/
add/compare_set/delete_key/num_keys/wait/append/multi_get/multi_set/clone, threads waiting
on keys) run on a bare :class:`EtcdStore`, on ``PrefixStore(EtcdStore)`` and on the store
each torchrun handler returns (``etcd-v3``, the native engine, and ``etcd-v3-dynamic``,
torch's dynamic rendezvous; both are ``PrefixStore(EtcdStore)``). Through ``PrefixStore``
every call goes through torch's C++ trampoline (``PythonStore`` in
torch/csrc/distributed/c10d/init.cpp), which looks up ``getNumKeys``/``deleteKey``/
``clone`` by their C++ names; ``_test_python_store`` and a ``ProcessGroupGloo`` call the
store from C++ as well.

torch cannot forward ``list_keys`` and the queue methods from ``PrefixStore`` to any
Python store (the trampoline has no override for them; torch raises
``NotImplementedError``); they work on the bare store, with ``TCPStore``'s semantics.
"""

from __future__ import annotations

import gc
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as _dist  # noqa: E402
from torch._C import _distributed_c10d as _c10d  # noqa: E402
from torch.distributed.elastic.rendezvous import RendezvousParameters  # noqa: E402

from etcd_rendezvous.client import EtcdClient  # noqa: E402
from etcd_rendezvous.server import EtcdServer  # noqa: E402
from etcd_rendezvous.torchrun import EtcdStore  # noqa: E402
from etcd_rendezvous.torchrun import store as store_module  # noqa: E402
from etcd_rendezvous.torchrun.native import create_native_handler  # noqa: E402
from etcd_rendezvous.torchrun.plugin import create_rdzv_handler  # noqa: E402

dist: Any = _dist  # torch's stubs lack PrefixStore.multi_set/append, Store.timeout, ...

pytestmark = pytest.mark.torch

KINDS = ["EtcdStore", "PrefixStore(EtcdStore)", "etcd-v3 handler", "etcd-v3-dynamic handler"]


def _params(backend: str, endpoint: str, key_prefix: str) -> RendezvousParameters:
    return RendezvousParameters(
        backend,
        endpoint,
        f"contract-{uuid.uuid4().hex[:8]}",
        1,
        1,
        local_addr="127.0.0.1",
        key_prefix=key_prefix,
        last_call_timeout="1",
        join_timeout="30",
    )


@pytest.fixture(params=KINDS)
def store(
    request: pytest.FixtureRequest, etcd_server: EtcdServer, key_prefix: str
) -> Iterator[Any]:
    kind = request.param
    cleanup: list[Callable[[], object]] = []
    before = set(getattr(store_module, "_CLONES", ()))
    if kind in ("EtcdStore", "PrefixStore(EtcdStore)"):
        client = EtcdClient(etcd_server.endpoint)
        base = EtcdStore(client, key_prefix + "-store/", owns_client=True)
        cleanup.append(base.close)
        s: Any = base if kind == "EtcdStore" else dist.PrefixStore("contract", base)
    else:
        create = create_native_handler if kind == "etcd-v3 handler" else create_rdzv_handler
        backend = "etcd-v3" if kind == "etcd-v3 handler" else "etcd-v3-dynamic"
        handler = create(_params(backend, etcd_server.endpoint, key_prefix))
        cleanup.append(handler.shutdown)
        s = handler.next_rendezvous().store
        assert isinstance(s, dist.PrefixStore), type(s)
    s.set_timeout(timedelta(seconds=10))
    yield s
    for clone in set(getattr(store_module, "_CLONES", ())) - before:
        clone.close()
    for fn in reversed(cleanup):
        fn()


def test_set_get_check_num_keys(store: Any) -> None:
    # torch's StoreTestBase._test_set_get_check, with num_keys relative to the start
    # (a handler's store may hold the rendezvous' own keys).
    base = store.num_keys()
    store.add("key", 1)
    store.add("key", 2)
    store.add("key", 3)
    store.set("key0", "value0")
    store.add("key3", 1)
    store.set("key1", "value1")
    store.add("key3", 2)
    store.set("key2", "value2")
    store.add("key3", 3)
    store.add("key3", 4)
    store.add("key3", 5)
    store.add("key3", 6)
    assert store.num_keys() == base + 5
    assert store.get("key") == b"6"
    assert store.get("key0") == b"value0"
    assert store.get("key1") == b"value1"
    assert store.get("key2") == b"value2"
    assert store.get("key3") == b"21"
    assert store.check(["key3"])
    assert not store.check(["Randomkey"])
    assert store.add("key3", -22) == -1


def test_compare_set(store: Any) -> None:
    # torch's StoreTestBase._test_compare_set, verbatim in substance.
    assert store.compare_set("cs_key0", "wrong_old_value", "new_value0") == b"wrong_old_value"
    store.set("cs_key0", "value0")
    assert store.get("cs_key0") == b"value0"
    assert store.compare_set("cs_key0", "wrong_old_value", "new_value0") == b"value0"
    assert store.get("cs_key0") == b"value0"
    assert store.compare_set("cs_key0", "value0", "new_value0") == b"new_value0"
    assert store.get("cs_key0") == b"new_value0"
    assert store.compare_set("cs_key1", "", "new_value1") == b"new_value1"
    assert store.get("cs_key1") == b"new_value1"


def test_num_keys_and_delete_key(store: Any) -> None:
    # torch's TCPStoreTest._test_numkeys_delkeys, relative to the start.
    base = store.num_keys()
    store.add("key", 1)
    store.add("key", 2)
    store.set("key0", "value0")
    store.add("key3", 1)
    store.set("key1", "value1")
    assert store.num_keys() == base + 4
    assert store.delete_key("key") is True
    assert store.num_keys() == base + 3
    assert store.delete_key("key") is False
    store.set_timeout(timedelta(milliseconds=300))
    with pytest.raises(RuntimeError, match=r"(?i)timeout"):
        store.get("key")
    store.delete_key("key0")
    store.delete_key("key3")
    assert store.num_keys() == base + 1
    store.set("key4", "value2")
    assert store.num_keys() == base + 2
    assert store.get("key1") == b"value1"
    assert store.get("key4") == b"value2"


def test_wait_with_and_without_timeout(store: Any) -> None:
    with pytest.raises(RuntimeError, match=r"(?i)timeout"):
        store.wait(["missing"], timedelta(milliseconds=200))
    store.set_timeout(timedelta(milliseconds=200))
    with pytest.raises(RuntimeError, match=r"(?i)timeout"):
        store.wait(["missing"])
    store.set_timeout(timedelta(seconds=10))
    store.set("present", "1")
    store.wait(["present"])
    store.wait(["present"], timedelta(seconds=1))
    threading.Timer(0.2, store.set, ("late", "2")).start()
    store.wait(["present", "late"])
    assert store.get("late") == b"2"


def test_threads_waiting_on_keys(store: Any) -> None:
    n = 6
    got: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def waiter(i: int) -> None:
        try:
            store.wait([f"t{i}"])
            got[i] = store.get(f"t{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=waiter, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for i in range(n):
        store.set(f"t{i}", f"v{i}")
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a waiter did not wake up"
    assert not errors, errors
    assert got == {i: f"v{i}".encode() for i in range(n)}


def test_append_multi_get_multi_set(store: Any) -> None:
    store.set("foo", "po")
    store.append("foo", "tato")
    store.append("foo", "se")
    assert store.get("foo") == b"potatose"
    store.append("new", "x")
    assert store.get("new") == b"x"
    store.multi_set(["m1", "m2", "m3"], ["a", "b", "c"])
    assert store.multi_get(["m1", "m2", "m3"]) == [b"a", b"b", b"c"]
    assert store.multi_get(["foo", "m2"]) == [b"potatose", b"b"]
    assert store.has_extended_api() is True


def test_clone(store: Any) -> None:
    store.set("foo", "bar")
    clone = store.clone()
    gc.collect()  # the clone's Python half must survive: C++ may be its only holder
    assert clone.get("foo") == b"bar"
    clone.set("from_clone", "1")
    assert store.get("from_clone") == b"1"
    assert clone.add("n", 2) == 2
    assert store.add("n", 1) == 3
    assert clone.num_keys() == store.num_keys()
    assert clone.delete_key("n") is True


def test_bare_clone_has_its_own_connection(etcd_server: EtcdServer, key_prefix: str) -> None:
    with EtcdClient(etcd_server.endpoint) as client:
        store = EtcdStore(client, key_prefix + "-store/", timeout=timedelta(seconds=7))
        clone = store.clone()
        try:
            assert clone.client is not store.client
            assert clone.prefix == store.prefix
            assert clone.timeout == timedelta(seconds=7)
            clone.set("k", "v")
            clone.close()
            assert store.get("k") == b"v"  # closing the clone left ours open
        finally:
            clone.close()
            store.close()


def test_barrier(store: Any) -> None:
    store.barrier("contract-barrier", 1, timedelta(seconds=10))


def test_called_from_cpp(store: Any) -> None:
    """torch's own trampoline test: every call goes C++ -> Python."""
    _c10d._test_python_store(store)


def test_process_group_gloo_on_the_store(store: Any) -> None:
    """World size 2 in two threads: rank 1 on a clone (its own connection)."""
    tag = f"gloo-{uuid.uuid4().hex[:6]}"
    stores = [dist.PrefixStore(tag, store), dist.PrefixStore(tag, store.clone())]
    results: dict[int, float] = {}
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            pg = dist.ProcessGroupGloo(stores[rank], rank, 2, timedelta(seconds=30))
            tensor = torch.tensor([rank + 1.0])
            pg.allreduce(tensor).wait()
            results[rank] = float(tensor.item())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "gloo did not finish in 60 s"
    assert not errors, errors
    assert results == {0: 3.0, 1: 3.0}


def test_list_keys_and_queues_on_the_bare_store(etcd_server: EtcdServer, key_prefix: str) -> None:
    with EtcdClient(etcd_server.endpoint) as client:
        store = EtcdStore(client, key_prefix + "-store/", timeout=timedelta(milliseconds=300))
        try:
            store.set("a", "1")
            store.add("b", 1)
            assert sorted(store.list_keys()) == ["a", "b"]
            # TCPStore's queue semantics, checked on TCPStore itself in the next test.
            store.queue_push("q", "x")
            store.queue_push("q", b"y")
            assert store.queue_len("q") == 2
            assert store.queue_pop("q") == b"x"
            assert store.queue_pop("q", False) == b"y"
            assert store.queue_len("q") == 0
            with pytest.raises(dist.QueueEmptyError, match="empty"):
                store.queue_pop("q", False)
            with pytest.raises(dist.DistStoreError, match="timeout"):
                store.queue_pop("q")
            threading.Timer(0.1, store.queue_push, ("q", "late")).start()
            store.set_timeout(timedelta(seconds=10))
            assert store.queue_pop("q") == b"late"
            assert store.num_keys() == 2  # queues are not keys
            assert sorted(store.list_keys()) == ["a", "b"]
        finally:
            store.close()


def test_tcpstore_queue_semantics_we_follow() -> None:
    tcp = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(milliseconds=300))
    tcp.queue_push("q", "x")
    tcp.queue_push("q", b"y")
    assert tcp.queue_len("q") == 2
    assert tcp.queue_pop("q") == b"x"
    assert tcp.queue_pop("q", False) == b"y"
    with pytest.raises(dist.QueueEmptyError, match="empty"):
        tcp.queue_pop("q", False)


def test_what_prefix_store_cannot_forward_to_a_python_store(
    etcd_server: EtcdServer, key_prefix: str
) -> None:
    """torch's trampoline has no list_keys or queue methods: PrefixStore over any Python
    store raises NotImplementedError for them. If a torch release adds them, this fails
    and the README's note can go."""
    with EtcdClient(etcd_server.endpoint) as client:
        base = EtcdStore(client, key_prefix + "-store/")
        try:
            store = dist.PrefixStore("p", base)
            with pytest.raises(NotImplementedError):
                store.list_keys()
            with pytest.raises(NotImplementedError):
                store.queue_push("q", "x")
        finally:
            base.close()
