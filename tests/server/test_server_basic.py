"""EtcdServer start/stop, context manager, accessors, and the pytest fixtures."""

from __future__ import annotations

import os
import urllib.request
from typing import Any

import pytest

from etcd_rendezvous.server import EtcdCluster, EtcdServer


def _health(url: str) -> bytes:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
        body: bytes = response.read()
    return body


def test_fixture_server_is_healthy(etcd_server: EtcdServer, etcd_binary: str) -> None:
    assert etcd_server.binary == etcd_binary
    assert etcd_server.is_running
    assert b'"health":"true"' in _health(etcd_server.url)
    assert etcd_server.get_endpoint() == f"127.0.0.1:{etcd_server.get_port()}"


def test_start_stop(etcd_binary: str) -> None:
    server = EtcdServer(binary=etcd_binary)
    server.start()
    try:
        pid = server.pid
        assert pid is not None
        assert b'"health":"true"' in _health(server.url)
        data_dir = server.data_dir
        assert data_dir is not None and os.path.isdir(data_dir)
    finally:
        server.stop()
    assert not server.is_running
    assert not os.path.exists(data_dir)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    server.stop()  # idempotent


def test_fixture_cluster_is_healthy(etcd_cluster: EtcdCluster) -> None:
    assert len(etcd_cluster.endpoints) == 3
    for url in etcd_cluster.urls:
        assert b'"health":"true"' in _health(url)
    assert etcd_cluster.leader() is not None


def test_fixture_client_is_namespaced_and_cleaned(
    etcd_server: EtcdServer, etcd_client: Any
) -> None:
    from _server_http import get

    etcd_client.put(b"k", b"v")
    kv = etcd_client.get(b"k")
    assert kv is not None and kv.key == b"k" and kv.value == b"v"
    assert get(etcd_server.url, b"k") is None, "keys live under the fixture's namespace"


def test_fixture_client_namespace_was_deleted(etcd_server: EtcdServer) -> None:
    """Runs after the test above on the same session server: its namespace is gone."""
    from etcd_rendezvous.client import EtcdClient

    with EtcdClient(etcd_server.endpoint) as client:
        assert client.range(b"/pytest-", prefix=True, count_only=True).count == 0


def test_get_client_on_server_and_cluster(
    etcd_server: EtcdServer, etcd_cluster: EtcdCluster
) -> None:
    with etcd_server.get_client() as client:
        assert client.version == etcd_server.version
    with etcd_cluster.get_client() as client:
        assert client.version == etcd_cluster.version
        assert len(client.members()) == 3
