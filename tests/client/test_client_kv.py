"""KV and transactions against real etcd (both binaries, via the etcd_client fixture)."""

from __future__ import annotations

import pytest

from etcd_rendezvous.client import (
    Compare,
    DeleteResponse,
    EtcdClient,
    Op,
    PutResponse,
    RangeResponse,
    TxnResponse,
)
from etcd_rendezvous.errors import EtcdCompactedError, EtcdRequestError
from etcd_rendezvous.server import EtcdServer


def test_put_get_and_metadata(etcd_client: EtcdClient) -> None:
    assert etcd_client.get("missing") is None
    first = etcd_client.put("k", "v1")
    kv = etcd_client.get(b"k")
    assert kv is not None
    assert (kv.key, kv.value, kv.version, kv.lease) == (b"k", b"v1", 1, 0)
    assert kv.create_revision == kv.mod_revision == first.revision
    second = etcd_client.put("k", b"v2", prev_kv=True)
    assert second.revision > first.revision
    assert second.prev_kv is not None and second.prev_kv.value == b"v1"
    assert etcd_client.put("new", "x", prev_kv=True).prev_kv is None
    kv2 = etcd_client.get("k")
    assert kv2 is not None and (kv2.value, kv2.version) == (b"v2", 2)
    old = etcd_client.get("k", revision=first.revision)
    assert old is not None and old.value == b"v1"


def test_binary_keys_and_values(etcd_client: EtcdClient) -> None:
    key = bytes(range(256))
    value = bytes(reversed(range(256))) * 4
    etcd_client.put(key, value)
    kv = etcd_client.get(key)
    assert kv is not None and (kv.key, kv.value) == (key, value)
    etcd_client.put("empty", b"")
    empty = etcd_client.get("empty")
    assert empty is not None and empty.value == b""
    etcd_client.put("ünï", "cödé")
    uni = etcd_client.get("ünï".encode())
    assert uni is not None and uni.value.decode() == "cödé"


def test_range_options(etcd_client: EtcdClient) -> None:
    for i in range(5):
        etcd_client.put(f"p/{i}", f"v{i}")
    etcd_client.put("p0", "outside")
    etcd_client.put("q", "outside")
    resp = etcd_client.range("p/", prefix=True)
    assert isinstance(resp, RangeResponse)
    assert [kv.key for kv in resp.kvs] == [f"p/{i}".encode() for i in range(5)]
    assert (resp.count, resp.more) == (5, False)
    limited = etcd_client.range("p/", prefix=True, limit=2)
    assert (len(limited.kvs), limited.count, limited.more) == (2, 5, True)
    keys_only = etcd_client.range("p/", prefix=True, keys_only=True)
    assert all(kv.value == b"" for kv in keys_only.kvs) and len(keys_only.kvs) == 5
    counted = etcd_client.range("p/", prefix=True, count_only=True)
    assert (counted.kvs, counted.count) == ([], 5)
    between = etcd_client.range("p/1", "p/3")
    assert [kv.key for kv in between.kvs] == [b"p/1", b"p/2"]
    everything = etcd_client.range("", b"\0")
    assert everything.count == 7
    desc = etcd_client.range("p/", prefix=True, sort_order="DESCEND", sort_target="KEY")
    assert next(kv.key for kv in desc.kvs) == b"p/4"
    at_rev = etcd_client.range("p/", prefix=True, revision=resp.kvs[1].mod_revision)
    assert at_rev.count == 2
    assert [kv.key for kv in etcd_client.get_prefix("p/")] == [kv.key for kv in resp.kvs]


def test_delete(etcd_client: EtcdClient) -> None:
    etcd_client.put("a", "1")
    for i in range(3):
        etcd_client.put(f"d/{i}", str(i))
    one = etcd_client.delete("a", prev_kv=True)
    assert isinstance(one, DeleteResponse)
    assert one.deleted == 1 and [kv.value for kv in one.prev_kvs] == [b"1"]
    assert etcd_client.delete("a").deleted == 0
    many = etcd_client.delete("d/", prefix=True)
    assert many.deleted == 3 and many.prev_kvs == []
    etcd_client.put("r/a", "")
    etcd_client.put("r/b", "")
    etcd_client.put("r/c", "")
    assert etcd_client.delete("r/a", range_end="r/c").deleted == 2
    assert etcd_client.range("", b"\0").count == 1


def test_namespace_isolation(etcd_server: EtcdServer, etcd_client: EtcdClient) -> None:
    ns = etcd_client.namespace
    etcd_client.put("shared", "mine")
    with EtcdClient(etcd_server.endpoint, namespace=ns + b"other/") as other:
        other.put("shared", "theirs")
        other.put("x", "1")
        assert other.get("shared").value == b"theirs"  # type: ignore[union-attr]
        assert other.range("", prefix=True).count == 2
        assert other.delete("", prefix=True).deleted == 2
    assert etcd_client.get("shared").value == b"mine"  # type: ignore[union-attr]
    with EtcdClient(etcd_server.endpoint) as raw:
        kv = raw.get(ns + b"shared")
        assert kv is not None and kv.key == ns + b"shared"
    view = etcd_client.with_namespace("sub/")
    view.put("k", "v")
    assert etcd_client.get("sub/k").value == b"v"  # type: ignore[union-attr]
    assert view.get_prefix("")[0].key == b"k"


def test_txn_compares(etcd_client: EtcdClient) -> None:
    put = etcd_client.put("k", "v")
    lease = etcd_client.lease_grant(30)
    etcd_client.put("leased", "x", lease=lease.id)
    rev = put.revision
    cases: list[tuple[Compare, bool]] = [
        (Compare.value("k", "==", "v"), True),
        (Compare.value("k", "!=", b"v"), False),
        (Compare.value("k", ">", "u"), True),
        (Compare.version("k", "==", 1), True),
        (Compare.version("k", ">", 1), False),
        (Compare.version("absent", "==", 0), True),
        (Compare.create_revision("k", "==", rev), True),
        (Compare.create_revision("absent", "==", 0), True),
        (Compare.mod_revision("k", "<", rev + 1), True),
        (Compare.mod_revision("k", ">", rev), False),
        (Compare.lease("leased", "==", lease.id), True),
        (Compare.lease("k", "==", 0), True),
        (Compare.lease("leased", "==", 0), False),
    ]
    for cmp, expected in cases:
        assert etcd_client.txn([cmp]).succeeded is expected, cmp
    etcd_client.lease_revoke(lease.id)


def test_txn_operations_and_results(etcd_client: EtcdClient) -> None:
    etcd_client.put("n/1", "a")
    resp = etcd_client.txn(
        [Compare.version("lock", "==", 0)],
        success=[
            Op.put("lock", "me", prev_kv=True),
            Op.get("n/", prefix=True),
            Op.delete("n/1", prev_kv=True),
            # nested compares are evaluated before any operation of the outer txn runs
            Op.txn([Compare.value("n/1", "==", "a")], [Op.get("lock")], [Op.get("n/1")]),
        ],
        failure=[Op.get("lock")],
    )
    assert isinstance(resp, TxnResponse) and resp.succeeded
    put, rng, dele, nested = resp.responses
    assert isinstance(put, PutResponse) and put.prev_kv is None and put.revision == resp.revision
    assert isinstance(rng, RangeResponse) and [kv.key for kv in rng.kvs] == [b"n/1"]
    assert isinstance(dele, DeleteResponse) and dele.deleted == 1 and dele.prev_kvs[0].key == b"n/1"
    assert isinstance(nested, TxnResponse) and nested.succeeded
    nested_get = nested.responses[0]
    assert isinstance(nested_get, RangeResponse) and nested_get.kvs[0].value == b"me"
    again = etcd_client.txn(
        [Compare.version("lock", "==", 0)], [Op.put("lock", "other")], [Op.get("lock")]
    )
    assert not again.succeeded
    held = again.responses[0]
    assert isinstance(held, RangeResponse) and held.kvs[0].value == b"me"
    assert etcd_client.txn([]).succeeded  # no compares: success branch, no ops


def test_txn_with_duplicate_key_is_rejected(etcd_client: EtcdClient) -> None:
    with pytest.raises(EtcdRequestError, match="duplicate key") as info:
        etcd_client.txn([], [Op.put("k", "1"), Op.put("k", "2")])
    assert info.value.code == 3 and info.value.endpoint


def test_compaction(etcd_client: EtcdClient) -> None:
    first = etcd_client.put("c", "1")
    etcd_client.put("c", "2")
    last = etcd_client.put("c", "3")
    etcd_client.compact(last.revision)
    with pytest.raises(EtcdCompactedError, match="compacted"):
        etcd_client.get("c", revision=first.revision)
    assert etcd_client.get("c").value == b"3"  # type: ignore[union-attr]
    assert etcd_client.current_revision() >= last.revision


def test_status_members_health_version(etcd_server: EtcdServer, etcd_client: EtcdClient) -> None:
    status = etcd_client.status()
    assert status.version == etcd_client.version == etcd_server.version
    assert status.leader == status.member_id != 0
    assert status.db_size > 0 and status.raft_index > 0 and status.raft_term > 0
    assert status.endpoint == etcd_server.endpoint
    assert etcd_client.status(etcd_server.endpoint).member_id == status.member_id
    assert etcd_client.health() and etcd_client.health(etcd_server.endpoint)
    (member,) = etcd_client.members()
    assert member.id == status.member_id
    assert member.client_urls == [etcd_server.url]
    assert etcd_client.endpoints == [etcd_server.url] == [etcd_client.endpoint]
    assert "EtcdClient(" in repr(etcd_client)
