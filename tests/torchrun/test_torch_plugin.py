"""The etcd-v3 handler in-process: registration, rendezvous, fail-fast errors, embedded."""

from __future__ import annotations

import fcntl
import os
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
from etcd_rendezvous.pytest_plugin import TLSFiles
from etcd_rendezvous.server import EtcdServer, TLSConfig
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


# --- issue 13: one embedded etcd per job, explicit endpoints used as given, TLS -----------


def test_embedded_etcd_is_per_job() -> None:
    """Two run ids on the same address elect separate hosts: neither uses the other's etcd."""
    a, b = _run_id_with_free_embedded_port(), _run_id_with_free_embedded_port()
    port = dead_port()
    ep = Endpoint("http", "127.0.0.1", port)
    try:
        assert _embedded.ensure_local_etcd(ep, a, timeout=30) is True
        began = time.monotonic()
        # Job b on the same port: it neither connects to a's etcd nor can host its own.
        with pytest.raises(RendezvousConnectionError, match="an etcd this job did not start"):
            _embedded.ensure_local_etcd(ep, b, timeout=30)
        took = time.monotonic() - began
        assert _embedded.is_hosting(ep), f"a's etcd must survive b's attempt ({took:.1f}s)"
    finally:
        _embedded.stop_embedded()


def test_foreign_etcd_on_the_derived_port_is_not_used() -> None:
    """An etcd that another user (or job) serves on the job's port is refused, not used."""
    run_id = _run_id_with_free_embedded_port()
    port = embedded_port(run_id)
    with EtcdServer(port=port, name="someone-else"):
        began = time.monotonic()
        with pytest.raises(RendezvousConnectionError, match="did not start") as info:
            create_rdzv_handler(make_params("", run_id, 1))
        took = time.monotonic() - began
        assert "someone-else" in str(info.value), f"{info.value} ({took:.1f}s)"
        assert not _embedded.is_hosting(Endpoint("http", "127.0.0.1", port))


def test_waiting_agent_refuses_an_etcd_without_the_hosts_token(tmp_path: Any) -> None:
    """A non-host agent uses the etcd only if its member name carries the lock file's token."""
    run_id = _run_id_with_free_embedded_port()
    ep = Endpoint("http", "127.0.0.1", embedded_port(run_id))
    path = _embedded._lock_path(ep, run_id)
    fd = _embedded._try_lock(path)  # "another agent" holds the lock and wrote its token
    assert fd is not None
    try:
        os.pwrite(fd, b"f00d", 0)
        with (
            EtcdServer(port=ep.port, name="rdzv-beef"),
            pytest.raises(RendezvousConnectionError, match="is not the one"),
        ):
            _embedded.ensure_local_etcd(ep, run_id, timeout=1.0)
        with EtcdServer(port=ep.port, name="rdzv-f00d"):
            assert _embedded.ensure_local_etcd(ep, run_id, timeout=10) is False
    finally:
        _embedded._unlock(fd)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
    assert os.stat(os.path.dirname(path)).st_mode & 0o077 == 0


def test_explicit_local_endpoint_is_never_replaced() -> None:
    """A typo'd port on a local address fails clearly instead of embedding an etcd."""
    port = dead_port()
    began = time.monotonic()
    with pytest.raises(RendezvousConnectionError, match="never replaced") as info:
        create_rdzv_handler(make_params(f"127.0.0.1:{port}", "typo", 1))
    took = time.monotonic() - began
    assert f"127.0.0.1:{port}" in str(info.value), f"{info.value} ({took:.1f}s)"
    assert not _embedded.is_hosting(Endpoint("http", "127.0.0.1", port))
    assert port_is_free(port)


def test_embedded_true_hosts_at_an_explicit_local_endpoint() -> None:
    port = dead_port()
    run_id = f"asked-{uuid.uuid4().hex[:8]}"
    try:
        handler = create_rdzv_handler(make_params(f"127.0.0.1:{port}", run_id, 1, embedded="true"))
        assert _embedded.is_hosting(Endpoint("http", "127.0.0.1", port))
        handler.shutdown()
    finally:
        _embedded.stop_embedded()


def test_etcd_endpoints_is_the_default_endpoint(
    etcd_server: EtcdServer, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ETCD_ENDPOINTS", etcd_server.endpoint)
    handler = create_rdzv_handler(make_params("", "from-env", 1, key_prefix=key_prefix))
    try:
        assert not _embedded._hosted, "ETCD_ENDPOINTS given: nothing may be embedded"
        assert rendezvous_in_threads([handler])[0].world_size == 1
    finally:
        handler.shutdown()


@pytest.mark.parametrize("backend", ["etcd-v3", "etcd-v3-dynamic"])
def test_tls_and_auth_etcd_on_a_local_address(
    etcd_binary: str, etcd_tls_files: TLSFiles, backend: str
) -> None:
    """issue 13 item 4: a TLS etcd with auth on 127.0.0.1 works without embedded=false."""
    tls = TLSConfig(etcd_tls_files.server_cert, etcd_tls_files.server_key, etcd_tls_files.ca)
    with EtcdServer(binary=etcd_binary, tls=tls, root_password="s3cret") as server:
        conf = {
            "ca_cert": etcd_tls_files.ca,
            "ssl_cert": etcd_tls_files.client_cert,
            "ssl_cert_key": etcd_tls_files.client_key,
            "username": "root",
            "password": "s3cret",
            "last_call_timeout": "1",
            "join_timeout": "30",
        }
        params = RendezvousParameters(
            backend, f"https://127.0.0.1:{server.port}", "tls", 1, 1, **conf
        )
        began = time.monotonic()
        handler = get_handler_creator()(params) if backend == "etcd-v3-dynamic" else None
        if handler is None:
            from etcd_rendezvous.torchrun.native import create_native_handler

            handler = create_native_handler(params)
        try:
            info = rendezvous_in_threads([handler])[0]
            assert info.world_size == 1, f"after {time.monotonic() - began:.1f}s"
        finally:
            handler.shutdown()
        assert not _embedded._hosted


def test_lock_directory_must_be_private(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv(_embedded.LOCK_DIR_ENV, str(shared))
    ep = Endpoint("http", "127.0.0.1", dead_port())
    with pytest.raises(RendezvousConnectionError, match="only it can write"):
        _embedded.ensure_local_etcd(ep, "r", timeout=1)
    fresh = tmp_path / "fresh"
    monkeypatch.setenv(_embedded.LOCK_DIR_ENV, str(fresh))
    path = _embedded._lock_path(ep, "r")
    assert os.path.dirname(path) == str(fresh) and fresh.stat().st_mode & 0o777 == 0o700


def test_stale_lock_files_are_removed_held_and_recent_ones_kept(tmp_path: Any) -> None:
    """One lock file per job would pile up for ever: old ones nobody holds go."""
    directory = tmp_path / "locks"
    directory.mkdir(mode=0o700)
    old, held, recent = (str(directory / f"{name}.lock") for name in ("old", "held", "recent"))
    for path in (old, held, recent):
        with open(path, "w") as fh:
            fh.write("token")
    day_ago = time.time() - 2 * _embedded.STALE_LOCK_AGE
    os.utime(old, (day_ago, day_ago))
    os.utime(held, (day_ago, day_ago))
    fd = _embedded._try_lock(held)  # another open file: flock conflicts, as another process's
    assert fd is not None
    try:
        assert _embedded._remove_stale_locks(str(directory)) == [old]
        assert sorted(os.listdir(directory)) == ["held.lock", "recent.lock"]
    finally:
        _embedded._unlock(fd)


def test_a_lock_won_on_a_removed_file_is_tried_again(tmp_path: Any) -> None:
    """Two agents must never both win: a lock on a file unlinked meanwhile is no lock."""
    path = str(tmp_path / "job.lock")
    first = _embedded._try_lock(path)
    assert first is not None
    waiting = os.open(path, os.O_RDWR)  # a second agent opened the file, not locked yet
    os.unlink(path)  # a cleanup removed it (under the lock)
    _embedded._unlock(first)
    second = _embedded._try_lock(path)  # a third agent: a new file, and wins it
    assert second is not None
    try:
        # the second agent now locks its (removed) file: that must not count as a win
        fcntl.flock(waiting, fcntl.LOCK_EX | fcntl.LOCK_NB)  # it gets the old inode's lock
        assert os.stat(path).st_ino != os.fstat(waiting).st_ino  # which _try_lock rejects
        assert _embedded._try_lock(path) is None  # and its retry finds the real one held
    finally:
        os.close(waiting)
        _embedded._unlock(second)
