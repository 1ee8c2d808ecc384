"""Watches on a key, a prefix, from a revision; cancellation and compaction."""

from __future__ import annotations

import threading
import time

import pytest

from etcd_rendezvous.client import EtcdClient, WatchEvent
from etcd_rendezvous.errors import EtcdCompactedError


def _events(watch_iter: object, n: int, timeout: float = 5.0) -> list[WatchEvent]:
    from etcd_rendezvous.client import Watch

    assert isinstance(watch_iter, Watch)
    out: list[WatchEvent] = []
    for _ in range(n):
        event = watch_iter.next_event(timeout)
        assert event is not None, f"only {len(out)} of {n} events within {timeout}s"
        out.append(event)
    return out


def test_watch_key(etcd_client: EtcdClient) -> None:
    with etcd_client.watch("k") as watch:
        assert watch.revision > 0 and watch.endpoint == etcd_client.endpoint
        etcd_client.put("k", "1")  # right after watch(): must not be missed
        etcd_client.put("other", "x")
        etcd_client.put("k", "2")
        etcd_client.delete("k")
        put1, put2, dele = _events(watch, 3)
        assert (put1.type, put1.key, put1.value, put1.kv.version) == ("PUT", b"k", b"1", 1)
        assert (put2.value, put2.prev_kv) == (b"2", None)
        assert (dele.type, dele.key, dele.value) == ("DELETE", b"k", b"")
        assert watch.revision == dele.revision
        assert watch.next_event(0.05) is None


def test_watch_prefix_with_prev_kv(etcd_client: EtcdClient) -> None:
    etcd_client.put("p/a", "old")
    with etcd_client.watch("p/", prefix=True, prev_kv=True) as watch:
        etcd_client.put("p/a", "new")
        etcd_client.put("pa", "not under p/")
        etcd_client.put("p/b", "b")
        etcd_client.delete("p/", prefix=True)
        events = _events(watch, 4)
        assert [(e.type, e.key) for e in events] == [
            ("PUT", b"p/a"),
            ("PUT", b"p/b"),
            ("DELETE", b"p/a"),
            ("DELETE", b"p/b"),
        ]
        assert events[0].prev_kv is not None and events[0].prev_kv.value == b"old"
        assert events[1].prev_kv is None
        assert events[2].prev_kv is not None and events[2].prev_kv.value == b"new"
        assert events[2].revision == events[3].revision


def test_watch_range_end(etcd_client: EtcdClient) -> None:
    with etcd_client.watch("b", range_end="d") as watch:
        for key in ("a", "b", "c", "d"):
            etcd_client.put(key, key)
        assert [e.key for e in _events(watch, 2)] == [b"b", b"c"]
        assert watch.next_event(0.05) is None


def test_watch_from_start_revision_replays_history(etcd_client: EtcdClient) -> None:
    first = etcd_client.put("h", "1")
    etcd_client.put("h", "2")
    etcd_client.put("h", "3")
    with etcd_client.watch("h", start_revision=first.revision) as watch:
        assert [e.value for e in _events(watch, 3)] == [b"1", b"2", b"3"]
        etcd_client.put("h", "4")
        assert _events(watch, 1)[0].value == b"4"


def test_watch_namespace_isolation(etcd_client: EtcdClient) -> None:
    other = etcd_client.with_namespace("sub/")
    with etcd_client.watch("", prefix=True) as outer, other.watch("", prefix=True) as inner:
        other.put("x", "1")
        etcd_client.put("y", "2")
        assert [e.key for e in _events(outer, 2)] == [b"sub/x", b"y"]
        assert [e.key for e in _events(inner, 1)] == [b"x"]
        assert inner.next_event(0.05) is None


def test_iteration_and_prompt_cancel(etcd_client: EtcdClient) -> None:
    watch = etcd_client.watch("it")
    got: list[bytes] = []

    def consume() -> None:
        for event in watch:
            got.append(event.value)

    consumer = threading.Thread(target=consume)
    consumer.start()
    etcd_client.put("it", "1")
    etcd_client.put("it", "2")
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    watch.cancel()
    consumer.join(2)
    assert not consumer.is_alive()
    # Prompt: cancel closes the stream instead of waiting out a request timeout.
    assert time.monotonic() - started < etcd_client.timeout
    assert got == [b"1", b"2"]
    assert watch.cancelled and watch.next_event(0) is None and "cancelled" in repr(watch)
    watch.cancel()  # idempotent
    assert not watch._thread.is_alive()  # the reader is gone when cancel returns
    # The client's idle monitor notices it has nothing to watch on its next round.
    monitor = etcd_client._monitor
    assert monitor is not None
    deadline = time.monotonic() + monitor.idle_check + monitor.probe_timeout + 2.0
    while monitor.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not monitor.running


def test_watch_compacted_revision_raises(etcd_client: EtcdClient) -> None:
    first = etcd_client.put("c", "1")
    etcd_client.put("c", "2")
    last = etcd_client.put("c", "3")
    etcd_client.compact(last.revision)
    with etcd_client.watch("c", start_revision=first.revision) as watch:
        with pytest.raises(EtcdCompactedError) as info:
            watch.next_event(5)
        assert info.value.compact_revision == last.revision
        assert info.value.key == b"c" and info.value.endpoint
        with pytest.raises(EtcdCompactedError):  # never silent: again on the next call
            watch.next_event(0)
        assert watch.error is info.value
        with pytest.raises(EtcdCompactedError):
            list(watch)


def test_client_close_cancels_watches(etcd_client: EtcdClient) -> None:
    other = etcd_client.with_namespace("")
    watch = other.watch("x")
    other.close()
    assert watch.cancelled
