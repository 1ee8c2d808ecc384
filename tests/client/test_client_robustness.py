"""No blind write retries, no unbounded waits, no leaked threads, no false alarms."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.client._transport import error_message, may_resend, translate_error
from etcd_rendezvous.errors import (
    EtcdClientError,
    EtcdTimeoutError,
    EtcdUnavailableError,
)
from etcd_rendezvous.server import EtcdServer

_THREAD_PREFIXES = ("etcd-watch", "etcd-lease", "etcd-keep-alive", "etcd-request-monitor")


def _client_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(_THREAD_PREFIXES)}


def _wait_gone(threads: set[threading.Thread], timeout: float = 5.0) -> set[threading.Thread]:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return {t for t in threads if t.is_alive()}


@pytest.mark.parametrize(
    ("message", "write_resent"),
    [
        ("etcdserver: no leader", True),  # refused before raft: certainly not applied
        ("etcdserver: too many requests", True),
        ("etcdserver: server stopped", False),  # may stop after the proposal committed
        ("etcdserver: request timed out", False),
        ("etcdserver: request timed out, possibly due to previous leader failure", False),
        ("etcdserver: leader changed", False),
    ],
)
def test_only_writes_certainly_not_applied_are_resent(message: str, write_resent: bool) -> None:
    body = f'{{"code": 14, "message": "{message}"}}'.encode()
    err = translate_error("/v3/kv/put", "http://e:1", 503, body, b"no leader here")
    assert isinstance(err, EtcdUnavailableError)
    assert "http://e:1" in str(err) and "no leader here" in str(err)
    assert may_resend(err, error_message(body), idempotent=False) is write_resent
    assert may_resend(err, error_message(body), idempotent=True)  # reads: always


def test_a_member_shutting_down_is_unavailable() -> None:
    # What a stopping etcd's gateway answers; a watch must resume, not die.
    body = b'{"code": 1, "message": "grpc: the client connection is closing"}'
    err = translate_error("/v3/watch", "http://e:1", 408, body)
    assert isinstance(err, EtcdUnavailableError)
    assert not may_resend(err, error_message(body), idempotent=False)


def test_close_stops_every_background_thread(etcd_server: EtcdServer) -> None:
    before = _client_threads()
    client = etcd_server.get_client(namespace="/threads/", watch_idle_check=0.2)
    view = client.with_namespace("sub/")
    watches = [client.watch("a"), view.watch("b", prefix=True)]
    lease = view.lease(5)
    started = _client_threads() - before
    assert len(started) >= 4  # two readers, the monitor, the keep-alive
    client.close()  # the parent: the view's watch and lease stop too
    assert not _wait_gone(started)
    assert all(w.cancelled for w in watches) and lease._stop.is_set()
    with etcd_server.get_client() as cleaner:
        cleaner.lease_revoke(lease.id)


def test_monitor_thread_ends_with_the_last_watch(etcd_client: EtcdClient) -> None:
    client = EtcdClient(etcd_client.endpoints, namespace=etcd_client.namespace, timeout=2)
    with client:
        monitor = client._monitor
        assert monitor is not None

        def running() -> bool:
            return monitor.running

        assert not running()
        watch = client.watch("k")
        assert running()
        watch.cancel()
        deadline = time.monotonic() + monitor.idle_check + 2
        while running() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running()
        with client.watch("k") as again:  # and starts again with the next one
            assert running()
            client.put("k", "v")
            assert again.next_event(5) is not None


def test_idle_check_does_not_disturb_a_quiet_healthy_stream(
    etcd_client: EtcdClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="etcd_rendezvous.client")
    client = EtcdClient(
        etcd_client.endpoints, namespace=etcd_client.namespace, watch_idle_check=0.1
    )
    with client, client.watch("k") as watch:
        time.sleep(0.6)  # several idle checks, each answered
        etcd_client.put("k", "v")
        event = watch.next_event(5)
        assert event is not None and event.value == b"v"
    assert not [r for r in caplog.records if "hangs" in r.getMessage() or "lost" in r.getMessage()]


def test_watch_on_a_hung_server_fails_in_bounded_time(etcd_binary: str) -> None:
    with EtcdServer(binary=etcd_binary) as server:
        before = _client_threads()
        client = server.get_client(timeout=0.5, watch_idle_check=0.2)
        server.process.pause()  # type: ignore[union-attr]
        try:
            started = time.monotonic()
            with pytest.raises((EtcdTimeoutError, EtcdUnavailableError)) as info:
                client.watch("k")
            assert time.monotonic() - started < 5
            assert server.endpoint in str(info.value)
            with pytest.raises(EtcdClientError, match="may or may not have been applied"):
                client.put("k", "v")
            client.close()
            assert not _wait_gone(_client_threads() - before)
        finally:
            server.process.resume()  # type: ignore[union-attr]


def test_clients_spread_over_the_endpoints_unless_told_not_to() -> None:
    endpoints = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    # No request is sent: the first endpoint is chosen when the client is made.
    starts = set()
    for _ in range(30):
        with EtcdClient(endpoints) as client:
            starts.add(client.endpoint)
    assert len(starts) > 1, f"30 clients all started at {starts}"
    with EtcdClient(endpoints, spread=False) as client:
        assert client.endpoint == "http://127.0.0.1:1"
        assert client.endpoints == [f"http://{e}" for e in endpoints]  # the failover order


def test_a_stream_error_reply_is_translated_like_a_unary_one() -> None:
    # Recorded from etcd 3.4's keep-alive stream while the cluster had no leader: the
    # error is nested, and must still read as "unavailable, not applied" (try the next).
    body = (
        b'{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader",'
        b'"http_status":"Service Unavailable"}}'
    )
    err = translate_error("/v3/lease/keepalive", "http://e:1", 503, body)
    assert isinstance(err, EtcdUnavailableError)
    assert str(err) == "etcd /v3/lease/keepalive on http://e:1 failed: etcdserver: no leader"
    assert error_message(body) == "etcdserver: no leader"
    assert may_resend(err, error_message(body), idempotent=False)
