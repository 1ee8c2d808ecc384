"""The fault proxy itself: it passes traffic, its faults happen, its failures are not silent."""

from __future__ import annotations

import pytest

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.errors import EtcdOutcomeUnknownError, EtcdUnavailableError
from etcd_rendezvous.server import EtcdServer
from faults.proxy import Fault, FaultProxy, ProxyError


def test_pass_reset_and_counts(etcd_server: EtcdServer) -> None:
    with FaultProxy(etcd_server.endpoint) as proxy, EtcdClient(proxy.endpoint) as client:
        client.put("/proxy-test/k", "v")
        kv = client.get("/proxy-test/k")
        assert kv is not None and kv.value == b"v"
        proxy.fault(Fault.RESET, path=b"/v3/kv/put")
        # Reset before etcd saw it, but the client cannot know: outcome unknown.
        with pytest.raises(EtcdOutcomeUnknownError):
            client.put("/proxy-test/k", "w")
        kv = client.get("/proxy-test/k")
        assert kv is not None and kv.value == b"v"  # never reached etcd
        assert proxy.faults_applied == 1
        assert proxy.requests_seen >= 4
        client.delete("/proxy-test/", prefix=True)


def test_a_dead_proxy_thread_fails_close(etcd_server: EtcdServer) -> None:
    def boom() -> None:
        raise RuntimeError("hook failed")

    proxy = FaultProxy(etcd_server.endpoint).start()
    with EtcdClient(proxy.endpoint, timeout=2.0) as client:
        proxy.fault(Fault.DROP_REPLY, path=b"/v3/kv/range", then=boom)
        with pytest.raises(EtcdUnavailableError):
            client.get("/proxy-test/x")
    with pytest.raises(ProxyError, match="hook failed"):
        proxy.close()


def test_wait_faults_is_bounded(etcd_server: EtcdServer) -> None:
    with (
        FaultProxy(etcd_server.endpoint) as proxy,
        pytest.raises(ProxyError, match="only 0 of 1 faults"),
    ):
        proxy.wait_faults(1, timeout=0.2)
