"""Gateway differences between etcd versions, on the real binaries.

Debian's etcd 3.5.30 is built with grpc-gateway v2 (etcd 3.6's gateway), so its error
replies are v2's (``{code, message}``; stream errors ``{"error": {code, message}}``)
while 3.4.23 and 3.5.1 send v1's: each test here runs on every binary and so covers
both formats. What no binary here can show is tested on recorded replies in
test_client_codec.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import urllib3

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.errors import EtcdAuthError
from etcd_rendezvous.server import EtcdServer


@pytest.fixture
def auth_server(etcd_binary: str) -> Iterator[EtcdServer]:
    """A dedicated etcd with auth enabled (root/rootpw) and 1 s tokens."""
    server = EtcdServer(
        binary=etcd_binary, root_password="rootpw", extra_args=["--auth-token-ttl", "1"]
    )
    with server:
        yield server


def test_keep_alive_after_the_token_expired(auth_server: EtcdServer) -> None:
    """3.5.30 answers the keep-alive stream with a v2 stream error `{"error": {"code": 16,
    ...}}` and HTTP 401: it must read as "invalid auth token", so the token is renewed."""
    with EtcdClient(auth_server.endpoint, username="root", password="rootpw") as client:
        grant = client.lease_grant(30)
        with EtcdClient(auth_server.endpoint) as anonymous:
            try:
                anonymous.lease_keep_alive_once(grant.id)
                checks_token = False  # 3.4.23, 3.5.1: keep-alives pass without a token
            except EtcdAuthError as exc:
                assert "user name is empty" in str(exc)  # 3.5.30: a v2 stream error
                checks_token = True
        token = client._transport._token
        time.sleep(2.1)  # the simple token expires 1-2 s after its last use
        assert client.lease_keep_alive_many([grant.id]) == {grant.id: pytest.approx(30, abs=2)}
        if checks_token:
            assert client._transport._token not in (None, token)
        time.sleep(2.1)
        assert client.lease_keep_alive_once(grant.id) > 0


def test_the_auth_header_is_the_plain_token(auth_server: EtcdServer) -> None:
    """etcd accepts `Authorization: Bearer <token>` only from 3.5.32, 3.6.13 and 3.7.0;
    the plain token works on every version, so that is what the client sends."""
    with EtcdClient(auth_server.endpoint, username="root", password="rootpw") as client:
        client.put("k", "v")
        header = client._transport.headers()["Authorization"]
        assert header == client._transport._token and not header.startswith("Bearer")
        http = urllib3.PoolManager(retries=False)
        body = json.dumps({"key": "aw=="}).encode()
        url = f"http://{auth_server.endpoint}/v3/kv/range"
        plain = http.request("POST", url, body=body, headers={"Authorization": header})
        assert plain.status == 200, plain.data
        bearer = http.request("POST", url, body=body, headers={"Authorization": f"Bearer {header}"})
        major, minor, patch = (int(p) for p in auth_server.version.split(".")[:3])
        if (major, minor, patch) < (3, 5, 32):
            assert bearer.status == 401, bearer.data  # "invalid auth token"
        else:  # pragma: no cover - no such binary on this machine yet
            assert bearer.status == 200, bearer.data
