"""TLS (CA, client certificate) and user/password authentication, on dedicated servers."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.errors import EtcdAuthError, EtcdUnavailableError
from etcd_rendezvous.pytest_plugin import TLSFiles
from etcd_rendezvous.server import EtcdServer, TLSConfig


@pytest.fixture
def tls_server(etcd_binary: str, etcd_tls_files: TLSFiles) -> Iterator[EtcdServer]:
    """etcd serving HTTPS only, and requiring client certificates signed by the CA."""
    tls = TLSConfig(
        etcd_tls_files.server_cert,
        etcd_tls_files.server_key,
        etcd_tls_files.ca,
        client_cert_auth=True,
        client_cert_file=etcd_tls_files.client_cert,
        client_key_file=etcd_tls_files.client_key,
    )
    with EtcdServer(binary=etcd_binary, tls=tls) as server:
        yield server


def test_tls_with_client_certificate(tls_server: EtcdServer, etcd_tls_files: TLSFiles) -> None:
    endpoint = tls_server.endpoint
    with EtcdClient(
        endpoint,
        ca_cert=etcd_tls_files.ca,
        cert=etcd_tls_files.client_cert,
        key=etcd_tls_files.client_key,
    ) as client:
        assert client.endpoint == f"https://{endpoint}"
        with client.watch("k") as watch:
            client.put("k", "secret")
            event = watch.next_event(5)
            assert event is not None and event.value == b"secret"
        assert client.get("k").value == b"secret"  # type: ignore[union-attr]
    # Without a client certificate, or without trusting the CA: a clear connection error.
    anonymous = EtcdClient(endpoint, ca_cert=etcd_tls_files.ca, timeout=2)
    with anonymous, pytest.raises(EtcdUnavailableError, match=endpoint.split(":")[1]):
        anonymous.get("k")
    with (
        EtcdClient(
            endpoint,
            ca_cert=etcd_tls_files.other_ca,
            cert=etcd_tls_files.client_cert,
            key=etcd_tls_files.client_key,
            timeout=2,
        ) as untrusting,
        pytest.raises(EtcdUnavailableError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        untrusting.get("k")


@pytest.fixture
def auth_server(etcd_binary: str) -> Iterator[EtcdServer]:
    """A dedicated etcd with auth enabled (root/rootpw, alice/alicepw on /alice/), 1 s tokens."""
    server = EtcdServer(
        binary=etcd_binary, root_password="rootpw", extra_args=["--auth-token-ttl", "1"]
    )
    with server:
        with server.get_client() as admin:
            admin.user_add("alice", "alicepw")
            admin.role_add("alice")
            admin.role_grant_permission("alice", "/alice/", prefix=True)
            admin.user_grant_role("alice", "alice")
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
