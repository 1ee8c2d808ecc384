"""TLS (CA, client certificate) and user/password authentication, on dedicated servers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.errors import EtcdAuthError, EtcdUnavailableError
from etcd_rendezvous.server import EtcdServer, find_free_port


def _free_port() -> int:
    sock = find_free_port()
    port = int(sock.getsockname()[1])
    sock.close()
    return port


@pytest.fixture
def tls_server(etcd_binary: str, tmp_path: Path) -> Iterator[tuple[EtcdServer, str, Path]]:
    """etcd serving plain HTTP on its usual port (readiness) and HTTPS with client certs."""
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("client@example.com")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    server_cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    client_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    client_cert.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    port, tls_port = _free_port(), _free_port()
    server = EtcdServer(
        binary=etcd_binary,
        port=port,
        extra_args=[
            "--listen-client-urls",
            f"http://127.0.0.1:{port},https://127.0.0.1:{tls_port}",
            "--cert-file",
            str(tmp_path / "server.pem"),
            "--key-file",
            str(tmp_path / "server.key"),
            "--client-cert-auth",
            "--trusted-ca-file",
            str(tmp_path / "ca.pem"),
        ],
    )
    with server:
        yield server, f"127.0.0.1:{tls_port}", tmp_path


def test_tls_with_client_certificate(tls_server: tuple[EtcdServer, str, Path]) -> None:
    _server, endpoint, certs = tls_server
    with EtcdClient(
        endpoint,
        ca_cert=str(certs / "ca.pem"),
        cert=str(certs / "client.pem"),
        key=str(certs / "client.key"),
    ) as client:
        assert client.endpoint == f"https://{endpoint}"
        with client.watch("k") as watch:
            client.put("k", "secret")
            event = watch.next_event(5)
            assert event is not None and event.value == b"secret"
        assert client.get("k").value == b"secret"  # type: ignore[union-attr]
    # Without a client certificate, or without trusting the CA: a clear connection error.
    anonymous = EtcdClient(endpoint, ca_cert=str(certs / "ca.pem"), timeout=2)
    with anonymous, pytest.raises(EtcdUnavailableError, match=endpoint.split(":")[1]):
        anonymous.get("k")
    other_ca = trustme.CA()
    other_ca.cert_pem.write_to_path(str(certs / "other.pem"))
    with (
        EtcdClient(
            endpoint,
            ca_cert=str(certs / "other.pem"),
            cert=str(certs / "client.pem"),
            key=str(certs / "client.key"),
            timeout=2,
        ) as untrusting,
        pytest.raises(EtcdUnavailableError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        untrusting.get("k")


@pytest.fixture
def auth_server(etcd_binary: str) -> Iterator[EtcdServer]:
    """A dedicated etcd with auth enabled (root/rootpw, alice/alicepw on /alice/), 1 s tokens."""
    with EtcdServer(binary=etcd_binary, extra_args=["--auth-token-ttl", "1"]) as server:
        with EtcdClient(server.endpoint) as admin:
            admin.user_add("root", "rootpw")
            admin.role_add("root")
            admin.user_grant_role("root", "root")
            admin.user_add("alice", "alicepw")
            admin.role_add("alice")
            admin.role_grant_permission("alice", "/alice/", prefix=True)
            admin.user_grant_role("alice", "alice")
            admin.auth_enable()
        yield server


def test_auth_token_and_refresh(auth_server: EtcdServer) -> None:
    with EtcdClient(
        auth_server.endpoint, username="alice", password="alicepw", namespace="/alice/"
    ) as alice:
        alice.put("k", "v")
        token = alice._transport._token
        assert token
        with alice.watch("k") as watch:
            time.sleep(2.1)  # the simple token expires 1-2 s after its last use
            alice.put("k", "v2")  # "invalid auth token": refreshed, then sent again
            event = watch.next_event(5)
            assert event is not None and event.value == b"v2"
        assert alice._transport._token not in (None, token)
        assert alice.get("k").value == b"v2"  # type: ignore[union-attr]
    outside = EtcdClient(auth_server.endpoint, username="alice", password="alicepw")
    with outside, pytest.raises(EtcdAuthError, match="permission denied"):
        outside.get("/elsewhere")
    bad = EtcdClient(auth_server.endpoint, username="alice", password="wrong")
    with bad, pytest.raises(EtcdAuthError, match="authentication failed"):
        bad.get("/alice/k")
    with EtcdClient(auth_server.endpoint) as anonymous, pytest.raises(EtcdAuthError):
        anonymous.get("/alice/k")
    with EtcdClient(auth_server.endpoint, username="root", password="rootpw") as root:
        assert root.get("/alice/k") is not None
        root.auth_disable()
