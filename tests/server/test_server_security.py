"""EtcdServer and EtcdCluster with TLS on the client URLs and etcd authentication."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import urllib3

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.errors import (
    EtcdAuthError,
    EtcdServerError,
    EtcdStartError,
    EtcdUnavailableError,
)
from etcd_rendezvous.pytest_plugin import TLSFiles
from etcd_rendezvous.server import EtcdCluster, EtcdServer, TLSConfig


def _plain_http_fails(endpoint: str) -> bool:
    try:
        response = urllib3.PoolManager(retries=False).request(
            "GET", f"http://{endpoint}/health", timeout=2
        )
    except urllib3.exceptions.HTTPError:
        return True
    return response.status != 200


def test_tls_server(etcd_binary: str, etcd_tls_files: TLSFiles) -> None:
    tls = TLSConfig(etcd_tls_files.server_cert, etcd_tls_files.server_key, etcd_tls_files.ca)
    with EtcdServer(binary=etcd_binary, tls=tls) as server:
        assert server.url == f"https://127.0.0.1:{server.port}"
        assert server.get_endpoint() == f"127.0.0.1:{server.port}"
        assert server.client_kwargs() == {"ca_cert": etcd_tls_files.ca}
        with server.get_client() as client:
            assert client.endpoint == server.url
            client.put("k", "v")
            assert client.get("k").value == b"v"  # type: ignore[union-attr]
        assert _plain_http_fails(server.endpoint)
        # The server is verified: a client that trusts another CA cannot talk to it.
        with (
            EtcdClient(server.url, ca_cert=etcd_tls_files.other_ca, timeout=2) as untrusting,
            pytest.raises(EtcdUnavailableError, match="CERTIFICATE_VERIFY_FAILED"),
        ):
            untrusting.get("k")


def test_client_cert_auth_and_root_password(
    etcd_binary: str, etcd_tls_files: TLSFiles, tmp_path: Path
) -> None:
    tls = TLSConfig(
        etcd_tls_files.server_cert,
        etcd_tls_files.server_key,
        etcd_tls_files.ca,
        client_cert_auth=True,
        client_cert_file=etcd_tls_files.client_cert,
        client_key_file=etcd_tls_files.client_key,
    )
    data_dir = str(tmp_path / "data")
    server = EtcdServer(data_dir, binary=etcd_binary, tls=tls, root_password="s3cret")
    with server:
        assert server.auth_enabled
        with server.get_client() as root:
            root.put("k", "v")
            assert root.get("k").value == b"v"  # type: ignore[union-attr]
        # No client certificate: the TLS handshake fails.
        with (
            EtcdClient(server.url, ca_cert=etcd_tls_files.ca, timeout=2) as no_cert,
            pytest.raises(EtcdUnavailableError),
        ):
            no_cert.get("k")
        # A certificate but no credentials: etcd refuses.
        with (
            server.get_client(username=None, password=None) as anonymous,
            pytest.raises(EtcdAuthError),
        ):
            anonymous.get("k")
        # A restart on the same data finds auth already on and checks the password.
        server.restart()
        with server.get_client() as root:
            assert root.get("k").value == b"v"  # type: ignore[union-attr]
    wrong = EtcdServer(data_dir, binary=etcd_binary, tls=tls, root_password="wrong")
    with pytest.raises(EtcdServerError, match="rejects the root_password") as info:
        wrong.start()
    assert not isinstance(info.value, EtcdStartError) or info.value.__cause__ is not None
    assert not wrong.is_running


def test_root_password_without_tls(etcd_binary: str) -> None:
    with EtcdServer(binary=etcd_binary, root_password="pw") as server:
        assert server.url.startswith("http://")
        assert server.client_kwargs() == {"username": "root", "password": "pw"}
        with server.get_client() as root:
            root.put("k", "v")
            root.user_add("bob", "bobpw")
        with EtcdClient(server.endpoint) as anonymous, pytest.raises(EtcdAuthError):
            anonymous.get("k")


def test_tls_config_validation(etcd_tls_files: TLSFiles, tmp_path: Path) -> None:
    with pytest.raises(EtcdServerError, match="no such file"):
        TLSConfig(str(tmp_path / "missing.pem"), etcd_tls_files.server_key)
    with pytest.raises(EtcdServerError, match="needs ca_file"):
        TLSConfig(etcd_tls_files.server_cert, etcd_tls_files.server_key, client_cert_auth=True)
    tls = TLSConfig(etcd_tls_files.server_cert, etcd_tls_files.server_key, etcd_tls_files.ca, True)
    # By default the server's own certificate (clientAuth usage) is the client's too.
    assert tls.client_kwargs() == {
        "ca_cert": etcd_tls_files.ca,
        "cert": etcd_tls_files.server_cert,
        "key": etcd_tls_files.server_key,
    }
    with pytest.raises(ValueError, match="empty"):
        EtcdServer(root_password="")


def test_cluster_with_tls_and_auth(etcd_binary: str, etcd_tls_files: TLSFiles) -> None:
    tls = TLSConfig(etcd_tls_files.server_cert, etcd_tls_files.server_key, etcd_tls_files.ca, True)
    with EtcdCluster(3, binary=etcd_binary, tls=tls, root_password="pw") as cluster:
        assert all(url.startswith("https://") for url in cluster.urls)
        assert cluster.leader() is not None  # member status over https
        with cluster.get_client() as root:
            root.put("k", "v")
            assert root.get("k").value == b"v"  # type: ignore[union-attr]
            assert all(root.status(m.endpoint).version for m in cluster.members)
        with (
            cluster.get_client(username=None, password=None) as anonymous,
            pytest.raises(EtcdAuthError),
        ):
            anonymous.get("k")


def test_tls_mismatch_fails_fast(etcd_binary: str, etcd_tls_files: TLSFiles) -> None:
    # The readiness check trusts another CA: a clear error at once, not the start timeout.
    tls = TLSConfig(etcd_tls_files.server_cert, etcd_tls_files.server_key, etcd_tls_files.other_ca)
    server = EtcdServer(binary=etcd_binary, tls=tls)
    started = time.monotonic()
    with pytest.raises(EtcdStartError, match="CERTIFICATE_VERIFY_FAILED") as info:
        server.start(timeout=30)
    assert time.monotonic() - started < 10
    assert "TLSConfig" in str(info.value) and info.value.__cause__ is not None
    assert not server.is_running


def test_tls_fixture_private_keys_are_owner_only(etcd_tls_files: TLSFiles) -> None:
    for key in (etcd_tls_files.server_key, etcd_tls_files.client_key):
        mode = os.stat(key).st_mode & 0o777
        assert mode == 0o600, f"{key} is {oct(mode)}: a private key must be 0600"
