"""The etcd-v3 handler in-process: registration, rendezvous, fail-fast errors, embedded."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

pytest.importorskip("torch")

from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    rendezvous_handler_registry,
)
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    DynamicRendezvousHandler,
)

from etcd_rendezvous.client import Endpoint, EtcdClient
from etcd_rendezvous.server import EtcdServer
from etcd_rendezvous.torchrun import _embedded, get_handler_creator
from etcd_rendezvous.torchrun._options import embedded_port
from etcd_rendezvous.torchrun.plugin import create_rdzv_handler

pytestmark = pytest.mark.torch


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # SO_REUSEADDR: TIME_WAIT connections do not count, only a listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def make_params(endpoint: str, run_id: str, nodes: int, **config: Any) -> RendezvousParameters:
    config.setdefault("last_call_timeout", "1")
    config.setdefault("join_timeout", "60")
    # The torch-dynamic handler's name since etcd-v3 moved to the native engine.
    return RendezvousParameters("etcd-v3-dynamic", endpoint, run_id, nodes, nodes, **config)


def rendezvous_in_threads(handlers: Sequence[RendezvousHandler]) -> list[RendezvousInfo]:
    results: dict[int, RendezvousInfo] = {}
    errors: list[BaseException] = []

    def run(i: int, h: RendezvousHandler) -> None:
        try:
            results[i] = h.next_rendezvous()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, h)) for i, h in enumerate(handlers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert len(results) == len(handlers)
    return [results[i] for i in range(len(handlers))]


def test_registered_through_the_entry_point() -> None:
    assert "etcd-v3" in rendezvous_handler_registry._registry
    assert "etcd-v3-dynamic" in rendezvous_handler_registry._registry
    assert get_handler_creator() is create_rdzv_handler


def test_import_etcd_rendezvous_does_not_import_torch() -> None:
    code = "import sys, etcd_rendezvous, etcd_rendezvous.client; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"


def test_three_handlers_rendezvous(etcd_server: EtcdServer, key_prefix: str) -> None:
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    handlers = [
        rendezvous_handler_registry.create_handler(
            make_params(etcd_server.endpoint, run_id, 3, key_prefix=key_prefix)
        )
        for _ in range(3)
    ]
    try:
        assert all(isinstance(h, DynamicRendezvousHandler) for h in handlers)
        # torch refuses a handler whose backend reports another name than the one asked for
        assert handlers[0].get_backend() == "etcd-v3-dynamic"
        infos = rendezvous_in_threads(handlers)
        assert sorted(info.rank for info in infos) == [0, 1, 2]
        assert {info.world_size for info in infos} == {3}
        # The store handed to the agent works across nodes.
        infos[0].store.set("hello", "from rank-holder 0")
        assert infos[2].store.get("hello") == b"from rank-holder 0"
        assert handlers[1].num_nodes_waiting() == 0
        handlers[0].set_closed()  # type: ignore[no-untyped-call]
        # is_closed() is eventually consistent: torch caches the state for 1 s.
        deadline = time.monotonic() + 5
        while not handlers[2].is_closed():
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        for h in handlers:
            h.shutdown()


def test_unknown_option_fails_before_touching_the_network() -> None:
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"unknown option.*bogus"):
        create_rdzv_handler(make_params(f"10.255.255.1:{dead_port()}", "r", 1, bogus="1"))
    with pytest.raises(ValueError, match="last_call_timeout='soon'"):
        create_rdzv_handler(make_params("127.0.0.1:1", "r", 1, last_call_timeout="soon"))
    assert time.monotonic() - start < 1.0


def test_unreachable_endpoints_fail_fast() -> None:
    endpoint = f"127.0.0.1:{dead_port()},127.0.0.1:{dead_port()}"
    start = time.monotonic()
    with pytest.raises(RendezvousConnectionError, match="no etcd answers") as info:
        create_rdzv_handler(make_params(endpoint, "r", 1))
    assert time.monotonic() - start < 10
    assert "127.0.0.1" in str(info.value)
    assert info.value.__cause__ is not None


def test_unreachable_local_endpoint_without_embedding_fails_fast() -> None:
    with pytest.raises(RendezvousConnectionError, match="no etcd answers"):
        create_rdzv_handler(make_params(f"127.0.0.1:{dead_port()}", "r", 1, embedded="false"))


@pytest.fixture(autouse=True)
def lock_dir(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Election lock files of the embedded etcd go to the test's tmp dir."""
    monkeypatch.setenv(_embedded.LOCK_DIR_ENV, str(tmp_path))


def _run_id_with_free_embedded_port() -> str:
    for _ in range(50):
        run_id = f"embedded-{uuid.uuid4().hex[:8]}"
        if port_is_free(embedded_port(run_id)):
            return run_id
    raise AssertionError("no free port")  # pragma: no cover


def test_embedded_default_one_host_others_connect() -> None:
    run_id = _run_id_with_free_embedded_port()
    endpoint = f"127.0.0.1:{embedded_port(run_id)}"
    try:
        handlers = [create_rdzv_handler(make_params("localhost:0", run_id, 2)) for _ in range(2)]
        assert _embedded.is_hosting(Endpoint("http", "localhost", embedded_port(run_id)))
        infos = rendezvous_in_threads(handlers)
        assert sorted(i.rank for i in infos) == [0, 1]
        with EtcdClient(endpoint) as client:
            assert client.health()
        for h in handlers:
            h.shutdown()
    finally:
        _embedded.stop_embedded()
    assert port_is_free(embedded_port(run_id))


def test_embedded_race_exactly_one_wins() -> None:
    """Threads race for the lock file; one hosts, the others see it answer."""
    run_id = _run_id_with_free_embedded_port()
    ep = Endpoint("http", "127.0.0.1", embedded_port(run_id))
    results: list[bool] = []
    barrier = threading.Barrier(4)

    def race() -> None:
        barrier.wait()
        results.append(_embedded.ensure_local_etcd(ep, run_id, timeout=30))

    try:
        threads = [threading.Thread(target=race) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        # In one process the host is shared: every caller sees "hosted here".
        assert results == [True] * 4
        assert len(_embedded._hosted) == 1
    finally:
        _embedded.stop_embedded()
