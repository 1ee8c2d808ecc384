"""Contract tests for EtcdStore against real etcd (3.4 and 3.5 through the fixtures).

Where torch defines the behaviour, the same calls are made on torch's HashStore
and the results compared, so "torch semantics" is checked, not assumed.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as _dist  # noqa: E402
from torch.distributed.elastic.utils import store as store_util  # noqa: E402

# torch's type stubs lack HashStore.timeout, PrefixStore.multi_set/append, ...
dist: Any = _dist

from etcd_rendezvous.client import EtcdClient  # noqa: E402
from etcd_rendezvous.errors import EtcdRendezvousError  # noqa: E402
from etcd_rendezvous.torchrun import (  # noqa: E402
    EtcdStore,
    EtcdStoreConnectionError,
    EtcdStoreTimeoutError,
)

pytestmark = pytest.mark.torch


@pytest.fixture
def store(etcd_client: EtcdClient) -> Iterator[EtcdStore]:
    s = EtcdStore(etcd_client, "/store/", timeout=timedelta(seconds=5))
    yield s
    s.close()


def _later(delay: float, fn: object, *args: object) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        fn(*args)  # type: ignore[operator]

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# -- set / get ----------------------------------------------------------------


def test_set_get_str_and_bytes(store: EtcdStore) -> None:
    store.set("k", "v")
    store.set(b"kb", b"vb")
    assert store.get("k") == b"v"
    assert store.get("kb") == b"vb"
    assert store.get(b"k") == b"v"


def test_binary_keys_and_values(store: EtcdStore) -> None:
    key = bytes(range(256))
    value = bytes(reversed(range(256))) * 4 + b"\x00"
    store.set(key, value)
    assert store.get(key) == value
    assert store.check([key])
    store.set("", b"empty key")  # the prefix alone: still a distinct key
    assert store.get("") == b"empty key"
    store.set("zero", b"")
    assert store.get("zero") == b""


def test_set_overwrites(store: EtcdStore) -> None:
    store.set("k", "1")
    store.set("k", "2")
    assert store.get("k") == b"2"


def test_get_blocks_until_set_and_wakes_promptly(store: EtcdStore) -> None:
    setter = _later(0.3, store.set, "late", b"here")
    start = time.monotonic()
    assert store.get("late") == b"here"
    elapsed = time.monotonic() - start
    setter.join()
    assert 0.25 <= elapsed < 2.0


def test_get_times_out_like_torch(store: EtcdStore) -> None:
    store.set_timeout(timedelta(milliseconds=300))
    start = time.monotonic()
    with pytest.raises(EtcdStoreTimeoutError) as info:
        store.get("missing")
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 3.0
    err = info.value
    assert isinstance(err, dist.DistStoreError)
    assert isinstance(err, RuntimeError)
    assert isinstance(err, EtcdRendezvousError)
    assert str(err).startswith("wait timeout after 300ms, keys: missing")


def test_timeout_property_and_set_timeout(store: EtcdStore) -> None:
    assert store.timeout == timedelta(seconds=5)
    store.set_timeout(timedelta(seconds=7))
    assert store.timeout == timedelta(seconds=7)
    with store_util.store_timeout(store, 1):
        assert store.timeout == timedelta(seconds=1)
    assert store.timeout == timedelta(seconds=7)


def test_default_timeout_is_torchs(etcd_client: EtcdClient) -> None:
    assert EtcdStore(etcd_client, "/x/").timeout == dist.HashStore().timeout


# -- wait / check ---------------------------------------------------------------


def test_wait_several_keys_arriving_out_of_order(store: EtcdStore) -> None:
    store.set("a", "1")
    threads = [_later(0.2, store.set, "c", "3"), _later(0.1, store.set, "b", "2")]
    store.wait(["a", "b", "c"])
    for t in threads:
        t.join()
    assert store.check(["a", "b", "c"])


def test_wait_with_override_timeout(store: EtcdStore) -> None:
    store.set("present", "x")
    start = time.monotonic()
    with pytest.raises(dist.DistStoreError, match="wait timeout after 200ms, keys: absent"):
        store.wait(["present", "absent"], timedelta(milliseconds=200))
    assert time.monotonic() - start < 2.0
    # The override does not change the store's timeout.
    assert store.timeout == timedelta(seconds=5)


def test_wait_override_longer_than_store_timeout(store: EtcdStore) -> None:
    store.set_timeout(timedelta(milliseconds=100))
    setter = _later(0.4, store.set, "slow", "x")
    store.wait(["slow"], timedelta(seconds=5))
    setter.join()


def test_wait_on_nothing_returns(store: EtcdStore) -> None:
    store.wait([])
    assert store.multi_get([]) == []
    assert store.check([])


def test_wait_ignores_unrelated_keys_in_the_watched_range(store: EtcdStore) -> None:
    # "a" and "c" are watched through one range watch that also covers "b".
    threads = [_later(0.1, store.set, "b", "noise"), _later(0.3, store.set, "c", "x")]
    store.set("a0", "x")
    with pytest.raises(EtcdStoreTimeoutError):
        store.wait(["a", "c"], timedelta(milliseconds=500))
    for t in threads:
        t.join()
    store.set("a", "x")
    store.wait(["a", "c"], timedelta(seconds=1))


def test_check(store: EtcdStore) -> None:
    assert not store.check(["k"])
    store.set("k", "v")
    assert store.check(["k"])
    assert not store.check(["k", "other"])


def test_many_keys_wait_and_multi_get_chunked(store: EtcdStore) -> None:
    keys = [f"key/{i:04d}" for i in range(300)]  # > etcd's 128 operations per txn
    values = [f"value-{i}".encode() for i in range(300)]
    store.multi_set(keys[:150], values[:150])
    setter = _later(0.2, store.multi_set, keys[150:], values[150:])
    assert store.multi_get(keys) == values
    setter.join()
    assert store.num_keys() == 300


# -- add / append / compare_set -------------------------------------------------


def test_add(store: EtcdStore) -> None:
    assert store.add("n", 3) == 3
    assert store.add("n", -5) == -2
    assert store.add("n", 0) == -2
    assert store.get("n") == b"-2"
    store.set("m", "41")
    assert store.add("m", 1) == 42
    assert store.add("new", 0) == 0


def test_add_on_non_integer_raises_value_error(store: EtcdStore) -> None:
    store.set("text", "abc")
    with pytest.raises(ValueError, match="not a decimal integer"):
        store.add("text", 1)
    assert store.get("text") == b"abc"


def test_add_is_exact_under_contention(etcd_client: EtcdClient) -> None:
    stores = [EtcdStore(etcd_client, "/store/") for _ in range(8)]
    results: list[int] = []
    lock = threading.Lock()

    def hammer(s: EtcdStore) -> None:
        for _ in range(25):
            value = s.add("counter", 1)
            with lock:
                results.append(value)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert stores[0].get("counter") == b"200"
    # Every increment returned a distinct value: none lost, none applied twice.
    assert sorted(results) == list(range(1, 201))


def test_append(store: EtcdStore) -> None:
    store.append("log", b"a")
    store.append("log", "b")
    store.append("log", b"\x00")
    assert store.get("log") == b"ab\x00"


def test_append_is_exact_under_contention(etcd_client: EtcdClient) -> None:
    s = EtcdStore(etcd_client, "/store/")

    def hammer(tag: str) -> None:
        for _ in range(10):
            s.append("log", tag)

    threads = [threading.Thread(target=hammer, args=(str(i),)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    value = s.get("log").decode()
    assert sorted(value) == sorted("".join(str(i) * 10 for i in range(8)))


COMPARE_SET_SCRIPT = [
    ("compare_set", ("a", "", "v1")),  # missing key, empty expected: set
    ("compare_set", ("a", "", "v2")),  # exists: no
    ("compare_set", ("a", "v1", "v3")),  # matches: set
    ("compare_set", ("a", "v1", "v4")),  # stale: current value
    ("compare_set", ("b", "x", "v")),  # missing key, non-empty expected: expected back
    ("check", (["b"],)),  # ... and not created
    ("compare_set", ("c", "", "")),  # empty desired on a missing key
    ("check", (["c"],)),
    ("compare_set", ("c", "", "now")),  # existing empty value matches empty expected
    ("get", ("c",)),
    ("get", ("a",)),
]


def test_compare_set_matches_torch_hashstore(store: EtcdStore) -> None:
    reference = dist.HashStore()
    for name, args in COMPARE_SET_SCRIPT:
        expected = getattr(reference, name)(*args)
        got = getattr(store, name)(*args)
        assert got == expected, f"{name}{args}: HashStore {expected!r}, EtcdStore {got!r}"


def test_compare_set_binary(store: EtcdStore) -> None:
    assert store.compare_set(b"\xff", b"", b"\x00\x01") == b"\x00\x01"
    assert store.compare_set(b"\xff", b"\x00\x01", b"\x02") == b"\x02"


# -- delete / num_keys / multi / list --------------------------------------------


def test_delete_key_and_num_keys(store: EtcdStore) -> None:
    assert store.num_keys() == 0
    store.multi_set(["a", "b", "c"], ["1", "2", b"3"])
    assert store.num_keys() == 3
    assert store.delete_key("b") is True
    assert store.delete_key("b") is False
    assert store.num_keys() == 2
    assert sorted(store.list_keys()) == ["a", "c"]


def test_multi_get_set(store: EtcdStore) -> None:
    store.multi_set(["x", "y"], [b"1", "2"])
    assert store.multi_get(["y", "x", "y"]) == [b"2", b"1", b"2"]
    with pytest.raises(ValueError, match="2 keys but 1 values"):
        store.multi_set(["x", "y"], ["1"])


def test_multi_get_times_out(store: EtcdStore) -> None:
    store.set("x", "1")
    store.set_timeout(timedelta(milliseconds=200))
    with pytest.raises(EtcdStoreTimeoutError, match="keys: zz"):
        store.multi_get(["x", "zz"])


def test_prefixes_isolate_runs(etcd_client: EtcdClient) -> None:
    one = EtcdStore(etcd_client, "/run/one/")
    two = EtcdStore(etcd_client, "/run/one-two/")  # shares a string prefix with one
    one.set("k", "1")
    two.set("k", "2")
    assert one.get("k") == b"1"
    assert two.get("k") == b"2"
    assert one.num_keys() == 1
    assert two.num_keys() == 1


def test_empty_prefix_rejected(etcd_client: EtcdClient) -> None:
    with pytest.raises(ValueError, match="prefix"):
        EtcdStore(etcd_client, b"")


# -- through torch ----------------------------------------------------------------


def test_works_through_prefix_store(store: EtcdStore) -> None:
    prefixed = dist.PrefixStore("torch.rendezvous.run.0", store)
    prefixed.set("k", "v")
    assert prefixed.get("k") == b"v"
    assert prefixed.add("n", 2) == 2
    assert prefixed.compare_set("c", "", "x") == b"x"
    prefixed.multi_set(["m1", "m2"], ["1", "2"])
    assert prefixed.multi_get(["m1", "m2"]) == [b"1", b"2"]
    prefixed.append("ap", "z")
    assert prefixed.check(["k", "ap"])
    prefixed.wait(["k"], timedelta(seconds=1))
    with pytest.raises(dist.DistStoreError, match="wait timeout"):
        prefixed.wait(["nope"], timedelta(milliseconds=100))
    assert store.get("torch.rendezvous.run.0/k") == b"v"


def test_torch_barrier_and_synchronize(etcd_client: EtcdClient) -> None:
    world = 4
    out: dict[int, list[bytes]] = {}
    errors: list[BaseException] = []

    def agent(rank: int) -> None:
        s = EtcdStore(etcd_client, "/store/")
        try:
            out[rank] = store_util.synchronize(
                s, f"data{rank}".encode(), rank, world, "sync/", timeout=20
            )
            store_util.barrier(s, world, "barrier/", barrier_timeout=20)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert all(out[r] == [f"data{i}".encode() for i in range(world)] for r in range(world))


def test_barrier_timeout_raises_dist_store_error(store: EtcdStore) -> None:
    with pytest.raises(dist.DistStoreError):
        store_util.barrier(store, 2, "lonely/", barrier_timeout=0.3)


# -- failures ---------------------------------------------------------------------


def dead_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_etcd_raises_connection_error() -> None:
    port = dead_port()
    client = EtcdClient(f"127.0.0.1:{port}", timeout=1.0)
    s = EtcdStore(client, "/store/", retry_deadline=0.3, owns_client=True)
    start = time.monotonic()
    with pytest.raises(EtcdStoreConnectionError) as info:
        s.set("k", "v")
    assert time.monotonic() - start < 5
    assert isinstance(info.value, dist.DistNetworkError)
    assert isinstance(info.value, RuntimeError)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert info.value.__cause__ is not None
    with pytest.raises(EtcdStoreConnectionError):
        s.get("k")
    s.close()
    s.close()


def test_get_cost_does_not_grow_with_keys(store: EtcdStore) -> None:
    store.multi_set([f"bulk/{i}" for i in range(2000)], [b"x" * 16] * 2000)
    store.set("probe", "v")
    start = time.monotonic()
    for _ in range(50):
        store.get("probe")
    per_get = (time.monotonic() - start) / 50
    # One range request on one key; a directory read of 2,000 keys would be >10x slower.
    assert per_get < 0.05


def test_wait_ends_promptly_when_the_client_is_closed(etcd_server: Any) -> None:
    client = EtcdClient(etcd_server.endpoint, namespace="/closing/")
    s = EtcdStore(client, "/store/", timeout=timedelta(seconds=20), retry_deadline=0.5)
    closer = _later(0.3, client.close)
    start = time.monotonic()
    with pytest.raises((EtcdStoreConnectionError, EtcdStoreTimeoutError)):
        s.get("never")
    closer.join()
    assert time.monotonic() - start < 5
