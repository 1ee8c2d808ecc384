"""The native-engine torch handler (``etcd-v3-native``) in-process, against real etcd.

N handlers in threads of one process (each with its own client, as N agents would
have): dense ranks, a working per-round store and bootstrap info, num_nodes_waiting,
closing, shutdown, fail-fast options. Runs on every installed etcd binary.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

pytest.importorskip("torch")

from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStateError,
    rendezvous_handler_registry,
)

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.rendezvous import Assignment, _probe
from etcd_rendezvous.server import EtcdServer
from etcd_rendezvous.torchrun import _clients
from etcd_rendezvous.torchrun.native import (
    NativeRendezvousHandler,
    bootstrap_info,
    create_native_handler,
)

pytestmark = pytest.mark.torch

BACKEND = "etcd-v3"


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def make_handler(
    etcd_server: EtcdServer, key_prefix: str
) -> Iterator[Callable[..., NativeRendezvousHandler]]:
    made: list[NativeRendezvousHandler] = []

    def make(
        run_id: str, min_nodes: int, max_nodes: int | None = None, **config: Any
    ) -> NativeRendezvousHandler:
        config.setdefault("last_call_timeout", "1")
        config.setdefault("join_timeout", "30")
        config.setdefault("key_prefix", key_prefix)
        params = RendezvousParameters(
            BACKEND,
            etcd_server.endpoint,
            run_id,
            min_nodes,
            max_nodes or min_nodes,
            local_addr="127.0.0.1",
            **config,
        )
        handler = create_native_handler(params)
        made.append(handler)
        return handler

    yield make
    for handler in made:
        handler.shutdown()


def run_id() -> str:
    return f"native-{uuid.uuid4().hex[:10]}"


def in_threads(
    fns: Sequence[Callable[[], RendezvousInfo]], timeout: float = 60
) -> list[RendezvousInfo]:
    results: dict[int, RendezvousInfo] = {}
    errors: list[BaseException] = []

    def run(i: int, fn: Callable[[], RendezvousInfo]) -> None:
        try:
            results[i] = fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, fn), daemon=True) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "next_rendezvous did not return in time"
    assert not errors, errors
    return [results[i] for i in range(len(fns))]


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_registered_under_torchrun_handlers() -> None:
    # torch's registry loaded our entry points: etcd-v3 and its alias etcd-v3-native.
    assert BACKEND in rendezvous_handler_registry._registry
    assert "etcd-v3-native" in rendezvous_handler_registry._registry


@pytest.mark.parametrize("nodes", [1, 4])
def test_dense_ranks_and_working_store(
    make_handler: Callable[..., NativeRendezvousHandler], nodes: int
) -> None:
    rid = run_id()
    handlers = [make_handler(rid, nodes) for _ in range(nodes)]
    infos = in_threads([h.next_rendezvous for h in handlers])
    assert sorted(i.rank for i in infos) == list(range(nodes))
    assert {i.world_size for i in infos} == {nodes}
    assert all(h.get_run_id() == rid and h.get_backend() == BACKEND for h in handlers)
    assert not any(h.use_agent_store for h in handlers)
    # Bootstrap info: node rank 0's address and port, the same for everyone.
    boots = [i.bootstrap_store_info for i in infos]
    boot = {(b.master_addr, b.master_port) for b in boots if b is not None}
    assert None not in boots
    assert len(boot) == 1 and next(iter(boot))[0] == "127.0.0.1"
    # The round's store is shared: what one node sets, every other gets.
    by_rank = sorted(infos, key=lambda i: i.rank)
    by_rank[0].store.set("hello", "world")
    assert all(i.store.get("hello") == b"world" for i in by_rank)
    assert by_rank[-1].store.add("counter", 2) == 2
    assert by_rank[0].store.add("counter", 3) == 5


def test_rounds_get_their_own_store_and_ranks_stay(
    make_handler: Callable[..., NativeRendezvousHandler],
) -> None:
    rid = run_id()
    handlers = [make_handler(rid, 2) for _ in range(2)]
    first = in_threads([h.next_rendezvous for h in handlers])
    first[0].store.set("k", "round1")
    second = in_threads([h.next_rendezvous for h in handlers])
    assert [i.rank for i in second] == [i.rank for i in first]  # stable across rounds
    assert second[0].store.check(["k"]) is False  # a fresh PrefixStore per round
    assert first[1].store.get("k") == b"round1"


def test_num_nodes_waiting_and_late_node(
    make_handler: Callable[..., NativeRendezvousHandler],
) -> None:
    rid = run_id()
    a, b = make_handler(rid, 2, 3), make_handler(rid, 2, 3)
    in_threads([a.next_rendezvous, b.next_rendezvous])
    assert a.num_nodes_waiting() == 0
    late = make_handler(rid, 2, 3)
    result: list[RendezvousInfo] = []
    thread = threading.Thread(target=lambda: result.append(late.next_rendezvous()), daemon=True)
    thread.start()
    wait_until(lambda: a.num_nodes_waiting() == 1, 15, "the late node to be waiting")
    # Eventual, as torch's: each node learns of the waiting node from its own watch.
    wait_until(lambda: b.num_nodes_waiting() == 1, 15, "the other member to see it")
    infos = in_threads([a.next_rendezvous, b.next_rendezvous])
    thread.join(30)
    assert result, "the late node did not get a place"
    assert sorted(i.rank for i in [*infos, result[0]]) == [0, 1, 2]
    assert {i.world_size for i in [*infos, result[0]]} == {3}
    assert a.num_nodes_waiting() == 0


def test_lost_member_counts_as_waiting(
    make_handler: Callable[..., NativeRendezvousHandler],
) -> None:
    # A member that leaves (or whose lease expires) makes the agents re-rendezvous.
    rid = run_id()
    handlers = [make_handler(rid, 2, 3) for _ in range(3)]
    in_threads([h.next_rendezvous for h in handlers])
    handlers[2].rendezvous.leave()  # as an agent killed by SIGTERM does at exit
    wait_until(lambda: handlers[0].num_nodes_waiting() >= 1, 15, "the loss to be seen")
    infos = in_threads([handlers[0].next_rendezvous, handlers[1].next_rendezvous])
    assert sorted(i.rank for i in infos) == [0, 1] and {i.world_size for i in infos} == {2}
    assert handlers[0].num_nodes_waiting() == 0


def test_set_closed_is_closed_and_next_rendezvous_fails(
    make_handler: Callable[..., NativeRendezvousHandler],
) -> None:
    rid = run_id()
    a, b = make_handler(rid, 2), make_handler(rid, 2)
    in_threads([a.next_rendezvous, b.next_rendezvous])
    assert not a.is_closed() and not b.is_closed()
    a.set_closed()
    assert a.is_closed()
    wait_until(b.is_closed, 10, "the close to reach the other node")
    with pytest.raises(RendezvousClosedError):
        b.next_rendezvous()
    # A node created after the close, while the closed run's nodes live, is refused
    # (after waiting lease_ttl + 2 s for them to go) with the command that fixes it.
    began = time.monotonic()
    with pytest.raises(RendezvousClosedError, match=f"rdzv delete {rid}") as info:
        make_handler(rid, 2, lease_ttl="1")
    took = time.monotonic() - began
    assert "nodes still hold leases" in str(info.value), f"{info.value} after {took:.1f}s"


def test_shutdown_closes_for_everyone_and_is_idempotent(
    make_handler: Callable[..., NativeRendezvousHandler],
) -> None:
    rid = run_id()
    a, b = make_handler(rid, 2), make_handler(rid, 2)
    in_threads([a.next_rendezvous, b.next_rendezvous])
    assert a.shutdown() is True
    assert a.shutdown() is True
    wait_until(b.is_closed, 10, "the shutdown to close the rendezvous")


def test_lease_ttl_and_heartbeat_mapping(
    make_handler: Callable[..., NativeRendezvousHandler], caplog: pytest.LogCaptureFixture
) -> None:
    assert make_handler(run_id(), 1, lease_ttl="7").rendezvous.lease_ttl == 7
    with caplog.at_level("WARNING"):
        h = make_handler(run_id(), 1, heartbeat="4", keep_alive_interval="1")
    assert h.rendezvous.lease_ttl == 4
    assert "used as lease_ttl=4" in caplog.text
    assert "keep_alive_interval=1 is ignored" in caplog.text


def test_probe_address_is_the_agents_and_probe_false_turns_it_off(
    make_handler: Callable[..., NativeRendezvousHandler],
) -> None:
    h = make_handler(run_id(), 1)
    token, host, port = _probe.parse_probe(h.rendezvous.probe)
    assert host == "127.0.0.1" and port == _probe.listener(host).port  # torch's local_addr
    assert token == _probe.listener(host).token
    off = make_handler(run_id(), 1, probe="false")
    assert off.rendezvous.probe == "" and off.rendezvous.config.probe == ""


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"last_call_timout": "1"}, "unknown option(s) last_call_timout"),
        ({"lease_ttl": "soon"}, "lease_ttl='soon'"),
        ({"lease_ttl": "0"}, "lease_ttl='0': must be at least 1"),
        ({"lease_ttl": str(10**18)}, "lease_ttl='1000000000000000000': must be from 1 to 3600"),
        ({"join_timeout": "999999999999999999"}, "join_timeout='999999999999999999': must be"),
        ({"fast_quorum": "maybe"}, "fast_quorum='maybe'"),
        ({"probe": "sometimes"}, "probe='sometimes'"),
        ({"join_timeout": "-3"}, "join_timeout='-3'"),
        ({"protocol": "gopher"}, "protocol='gopher'"),
    ],
)
def test_bad_options_fail_fast(config: dict[str, str], message: str) -> None:
    # Checked before any network access: the endpoint is dead and it must not matter.
    params = RendezvousParameters(BACKEND, f"127.0.0.1:{dead_port()}", run_id(), 1, 1, **config)
    start = time.monotonic()
    with pytest.raises(ValueError, match=None) as info:
        create_native_handler(params)
    assert message in str(info.value)
    assert time.monotonic() - start < 2


def test_bad_run_id_fails_fast() -> None:
    params = RendezvousParameters(BACKEND, f"127.0.0.1:{dead_port()}", "a/b", 1, 1)
    with pytest.raises(ValueError, match="--rdzv-id"):
        create_native_handler(params)


def test_unreachable_endpoint_fails_fast() -> None:
    endpoint = f"127.0.0.1:{dead_port()},127.0.0.1:{dead_port()}"
    params = RendezvousParameters(BACKEND, endpoint, run_id(), 1, 1, read_timeout="2")
    start = time.monotonic()
    with pytest.raises(RendezvousConnectionError, match="no etcd answers at --rdzv-endpoint"):
        create_native_handler(params)
    assert time.monotonic() - start < 15


def test_handlers_of_one_process_share_one_client(
    make_handler: Callable[..., NativeRendezvousHandler],
) -> None:
    before = _clients.open_clients()
    rid = run_id()
    a, b = make_handler(rid, 2), make_handler(rid, 2)
    assert a.store.client is b.store.client
    assert _clients.open_clients() == before + 1
    infos = in_threads([a.next_rendezvous, b.next_rendezvous])
    # Bootstrap info comes with the assignment: rank 0's address and its reserved port.
    stores = [i.bootstrap_store_info for i in infos]
    boot = {(b.master_addr, b.master_port) for b in stores if b is not None}
    assert len(boot) == 1 and next(iter(boot))[0] == "127.0.0.1"
    a.shutdown()
    assert b.store.client.status().version  # still open: b uses it
    b.shutdown()
    assert _clients.open_clients() == before


def test_rank0_without_bootstrap_port_is_a_clear_state_error() -> None:
    assignment = Assignment(
        round=3, rank=1, world_size=2, members=("n0", "n1"), data={"n0": {"addr": "h"}}
    )
    with pytest.raises(RendezvousStateError, match=r"'n0' \(rank 0 of round 3\).*port"):
        bootstrap_info(assignment, "run")


# --- issue 13 item 2: etcd gone -----------------------------------------------------------


def test_etcd_gone_is_said_on_the_console_and_shutdown_is_bounded(
    etcd_binary: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The watchdog warns within seconds; shutdown (close, leave) costs seconds, not 60."""
    server = EtcdServer(binary=etcd_binary)
    server.start()
    try:
        params = RendezvousParameters(
            BACKEND,
            server.endpoint,
            run_id(),
            1,
            1,
            local_addr="127.0.0.1",
            last_call_timeout="1",
            join_timeout="30",
        )
        handler = create_native_handler(params)
        in_threads([handler.next_rendezvous])
    finally:
        server.stop()
    caplog.set_level(logging.WARNING, logger="torch.distributed.elastic.rendezvous.etcd_v3")
    stopped = time.monotonic()
    wait_until(
        lambda: "does not answer" in caplog.text, 10, "the watchdog to say etcd does not answer"
    )
    said = time.monotonic() - stopped
    began = time.monotonic()
    assert handler.shutdown() is False
    took = time.monotonic() - began
    assert took < 15, f"shutdown took {took:.1f}s with etcd gone (said so after {said:.1f}s)"
    assert "closing rendezvous" in caplog.text, caplog.text


def test_closed_run_expires_after_ttl_and_reuse_starts_afresh(
    make_handler: Callable[..., NativeRendezvousHandler],
    etcd_server: EtcdServer,
    key_prefix: str,
) -> None:
    """issue 13 item 3: the closer puts the run on a lease of ``ttl``; the id works again."""
    rid = run_id()
    a = make_handler(rid, 1, ttl="60")
    in_threads([a.next_rendezvous])
    a.shutdown()
    with EtcdClient(etcd_server.endpoint) as client:
        config = client.get(f"{key_prefix.rstrip('/')}/{rid}/ctl/config")
        assert config is not None and config.lease, "the closed run's keys must be on a lease"
        ttl = client.lease_time_to_live(config.lease).ttl
    assert 0 < ttl <= 60, ttl
    began = time.monotonic()
    b = make_handler(rid, 1)  # same run id again: starts afresh
    info = in_threads([b.next_rendezvous])[0]
    assert info.world_size == 1, f"after {time.monotonic() - began:.1f}s"
