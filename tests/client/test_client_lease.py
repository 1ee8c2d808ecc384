"""Leases: grant, revoke, time-to-live, keep-alive, expiry and loss reporting."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.client.lease import refresh_many
from etcd_rendezvous.errors import (
    EtcdClientError,
    EtcdLeaseLostError,
    EtcdLeaseNotFoundError,
)


def test_grant_ttl_revoke(etcd_client: EtcdClient) -> None:
    grant = etcd_client.lease_grant(30)
    assert grant.id > 0 and grant.ttl == 30
    etcd_client.put("a", "1", lease=grant.id)
    etcd_client.put("b", "2", lease=grant.id)
    info = etcd_client.lease_time_to_live(grant.id, keys=True)
    assert info.id == grant.id and info.granted_ttl == 30 and 0 < info.ttl <= 30
    assert sorted(info.keys) == [b"a", b"b"]
    assert etcd_client.lease_time_to_live(grant.id).keys == []
    assert grant.id in etcd_client.lease_leases()
    assert etcd_client.lease_keep_alive_once(grant.id) == 30
    etcd_client.lease_revoke(grant.id)
    assert etcd_client.range("", prefix=True).count == 0
    assert etcd_client.lease_time_to_live(grant.id).ttl == -1
    with pytest.raises(EtcdLeaseNotFoundError, match="not found"):
        etcd_client.lease_keep_alive_once(grant.id)
    with pytest.raises(EtcdLeaseNotFoundError):
        etcd_client.lease_revoke(grant.id)
    with pytest.raises(EtcdLeaseNotFoundError):
        etcd_client.put("c", "3", lease=grant.id)


def test_grant_with_chosen_id(etcd_client: EtcdClient) -> None:
    lease_id = 0x1234_5678_0000 + (time.monotonic_ns() & 0xFFFF)
    grant = etcd_client.lease_grant(10, lease_id)
    assert grant.id == lease_id
    etcd_client.lease_revoke(lease_id)


def test_keep_alive_versus_expiry(etcd_client: EtcdClient) -> None:
    kept = etcd_client.lease(1)
    expiring = etcd_client.lease(1, keep_alive=False)
    etcd_client.put("kept", "1", lease=kept.id)
    etcd_client.put("expiring", "1", lease=expiring.id)
    with etcd_client.watch("expiring") as watch:
        event = watch.next_event(timeout=5)
    assert event is not None and event.type == "DELETE"
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:  # well past the TTL: still there
        time.sleep(0.1)
    assert etcd_client.get("kept") is not None
    assert not kept.is_lost and kept.error is None and kept.remaining > 0
    assert kept.time_to_live() >= 0  # seconds, rounded down; -1 once gone
    assert kept.refresh() == 1
    kept.revoke()
    assert etcd_client.get("kept") is None
    assert not kept.is_lost  # revoked by us: not a loss
    expiring.close()


def test_loss_is_reported(etcd_client: EtcdClient) -> None:
    seen: list[EtcdClientError] = []
    called = threading.Event()

    def on_lost(err: EtcdClientError) -> None:
        seen.append(err)
        called.set()

    lease = etcd_client.lease(2, on_lost=on_lost)
    assert not lease.wait_lost(0)
    etcd_client.lease_revoke(lease.id)  # behind the Lease's back
    assert lease.wait_lost(3)
    assert called.wait(1)
    assert lease.is_lost and isinstance(lease.error, EtcdLeaseNotFoundError)
    assert seen == [lease.error]
    assert "lost" in repr(lease)
    with pytest.raises(EtcdLeaseNotFoundError):
        lease.refresh()
    lease.close()


def test_context_manager_revokes(etcd_client: EtcdClient) -> None:
    with etcd_client.lease(10) as lease:
        etcd_client.put("k", "v", lease=lease.id)
        assert etcd_client.get("k") is not None
    assert etcd_client.get("k") is None
    assert etcd_client.lease_time_to_live(lease.id).ttl == -1
    assert not any(t.name.startswith("etcd-lease") and t.is_alive() for t in threading.enumerate())


def test_keep_alive_many_refreshes_in_one_request_and_reports_the_gone(
    etcd_client: EtcdClient,
) -> None:
    ids = [etcd_client.lease_grant(30).id for _ in range(3)]
    etcd_client.lease_revoke(ids[1])
    assert etcd_client.lease_keep_alive_many(ids) == {ids[0]: 30, ids[1]: 0, ids[2]: 30}
    assert etcd_client.lease_keep_alive_many([]) == {}
    for lease_id in (ids[0], ids[2]):
        etcd_client.lease_revoke(lease_id)


def test_refresh_many_marks_only_the_gone_lease_lost(etcd_client: EtcdClient) -> None:
    leases = [etcd_client.lease(30, keep_alive=False) for _ in range(3)]
    etcd_client.lease_revoke(leases[0].id)
    gone = refresh_many(leases)
    assert list(gone) == [leases[0].id]
    assert isinstance(gone[leases[0].id], EtcdLeaseNotFoundError)
    assert leases[0].is_lost and leases[0].error is gone[leases[0].id]
    assert not leases[1].is_lost and not leases[2].is_lost
    assert leases[1].remaining > 29
    for lease in leases[1:]:
        lease.revoke()


def test_one_keep_alive_loop_refreshes_many_leases_per_request(
    etcd_client: EtcdClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    real = etcd_client.lease_keep_alive_many

    def counted(ids: Sequence[int], **kwargs: Any) -> dict[int, int]:
        batches.append(len(ids))
        assert kwargs.get("deadline") is not None  # bounded by the time the leases have left
        return real(ids, **kwargs)

    monkeypatch.setattr(etcd_client, "lease_keep_alive_many", counted)

    def keepers() -> int:
        return sum(t.name.startswith("etcd-keep-alive") for t in threading.enumerate())

    before = keepers()
    leases = [etcd_client.lease(3, interval=0.2) for _ in range(20)]
    deadline = time.monotonic() + 10
    while sum(batches) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(batches) >= 60, batches
    assert max(batches) > 1, f"one request per lease: {batches}"
    # One thread for all 20, not one each (a loop that just ended may still be exiting
    # while its successor starts, hence the slack of one).
    assert keepers() <= before + 2, f"{keepers() - before} keep-alive threads for 20 leases"
    for lease in leases:
        lease.revoke()


def test_a_crashed_keep_alive_thread_reports_every_lease_lost(
    etcd_client: EtcdClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(ids: Sequence[int], **kwargs: Any) -> dict[int, int]:
        raise RuntimeError("a bug in the keep-alive")

    leases = [etcd_client.lease(3, interval=0.1) for _ in range(2)]
    monkeypatch.setattr(etcd_client, "lease_keep_alive_many", broken)
    for lease in leases:
        assert lease.wait_lost(5), "a dead keep-alive thread went unreported"
        assert isinstance(lease.error, EtcdLeaseLostError)
        assert "crashed" in str(lease.error) and "a bug in the keep-alive" in str(lease.error)
        assert isinstance(lease.error.__cause__, RuntimeError)
    with pytest.raises(EtcdLeaseLostError, match="keep-alive thread died"):
        etcd_client.lease(3)
    for lease in leases:
        etcd_client.lease_revoke(lease.id)
