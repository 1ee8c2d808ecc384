"""What etcd's user/password auth covers, and what it does not (README: "What etcd's auth
does not cover"). The requests are sent with no credentials to an auth-enabled etcd.

Every version refuses an anonymous client the keys: no read, no write, no revoking a
lease that holds keys. Before etcd 3.5.30 (3.4.23 and 3.5.1 here), the lease API, the
cluster and maintenance calls answer anyone: lease IDs can be listed, a node's lease kept
alive by a stranger, the names of its keys read. 3.5.30 asks for a login there too.
/metrics and /health answer anyone on every version.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3

from etcd_rendezvous import EtcdServer

# The versions this file has seen answer lease and cluster calls without a login.
OPEN_LEASE_API = {"3.4.23", "3.5.1"}


@pytest.fixture(scope="module")
def auth_server(etcd_binary: str) -> Iterator[EtcdServer]:
    with EtcdServer(binary=etcd_binary, root_password="s3cret") as server:
        yield server


def _anonymous(server: EtcdServer, path: str, body: dict[str, Any]) -> int:
    url = server.endpoint if "://" in server.endpoint else f"http://{server.endpoint}"
    reply = urllib3.request(
        "POST",
        url + path,
        body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        timeout=5.0,
        retries=False,
    )
    return reply.status


def test_keys_are_covered_on_every_version(auth_server: EtcdServer) -> None:
    client = auth_server.get_client()
    with client.lease(30) as lease:
        client.put("covered", b"v", lease=lease.id)
        assert _anonymous(auth_server, "/v3/kv/range", {"key": "Y292ZXJlZA=="}) != 200
        assert _anonymous(auth_server, "/v3/kv/put", {"key": "eA==", "value": "eA=="}) != 200
        assert _anonymous(auth_server, "/v3/lease/revoke", {"ID": str(lease.id)}) != 200
        kv = client.get("covered")
        assert kv is not None and kv.value == b"v", "an anonymous revoke deleted a key"


def test_what_the_lease_and_cluster_api_give_anyone(auth_server: EtcdServer) -> None:
    client = auth_server.get_client()
    with client.lease(30) as lease:
        client.put("leased", b"v", lease=lease.id)
        answered = {
            "keep-alive": _anonymous(auth_server, "/v3/lease/keepalive", {"ID": str(lease.id)}),
            "leases": _anonymous(auth_server, "/v3/lease/leases", {}),
            "time-to-live with keys": _anonymous(
                auth_server, "/v3/lease/timetolive", {"ID": str(lease.id), "keys": True}
            ),
            "member list": _anonymous(auth_server, "/v3/cluster/member/list", {}),
            "status": _anonymous(auth_server, "/v3/maintenance/status", {}),
        }
    open_calls = sorted(name for name, status in answered.items() if status == 200)
    if auth_server.version in OPEN_LEASE_API:
        assert open_calls == sorted(answered), f"etcd {auth_server.version}: {answered}"
    elif tuple(int(part) for part in auth_server.version.split(".")[:3]) >= (3, 5, 30):
        assert open_calls == [], f"etcd {auth_server.version}: {answered}"
    url = (
        auth_server.endpoint if "://" in auth_server.endpoint else f"http://{auth_server.endpoint}"
    )
    for path in ("/metrics", "/health"):
        status = urllib3.request("GET", url + path, timeout=5.0, retries=False).status
        assert status == 200, f"{path} on etcd {auth_server.version}: HTTP {status}"
