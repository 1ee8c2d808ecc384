"""An EtcdClient that follows its cluster's members: autosync, sync_endpoints,
set_endpoints, on a real 3-member cluster."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.server import EtcdCluster


def _until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not {what} after {timeout:g}s"
        time.sleep(0.05)


def test_autosync_learns_every_member_from_one_url(etcd_cluster: EtcdCluster) -> None:
    urls = set(etcd_cluster.urls)
    with EtcdClient(etcd_cluster.urls[0], autosync=0.2) as client:
        _until("all members known", lambda: set(client.endpoints) == urls)
        copy = client.copy()
        try:
            assert set(copy.endpoints) == urls
        finally:
            copy.close()


def test_sync_and_set_endpoints(etcd_cluster: EtcdCluster) -> None:
    first = etcd_cluster.urls[0]
    with EtcdClient(first) as client:
        assert set(client.endpoints) == {first}
        learned = client.sync_endpoints()
        assert set(learned) == set(etcd_cluster.urls)
        assert client.set_endpoints(etcd_cluster.urls) is False  # the same set
        assert client.set_endpoints([first]) is True
        assert list(client.endpoints) == [first]
        client.put("/still", "works")
        with pytest.raises(ValueError):
            client.set_endpoints([])
        with pytest.raises(ValueError):
            client.set_endpoints(["http://[::1"])
        assert list(client.endpoints) == [first]  # bad input changed nothing


@pytest.mark.parametrize("value", [0, -1.0])
def test_autosync_must_be_positive(value: float) -> None:
    with pytest.raises(ValueError, match="autosync must be a positive"):
        EtcdClient("http://127.0.0.1:2379", autosync=value)
