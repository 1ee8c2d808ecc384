"""EtcdServer on real etcd: context manager, data dirs, ports, restarts, threads."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _server_http import get, healthy, put

from etcd_rendezvous.errors import EtcdServerError, EtcdStartError
from etcd_rendezvous.server import EtcdServer, _ports, find_free_port
from etcd_rendezvous.server import server as server_module


@pytest.fixture
def bound_port() -> Iterator[int]:
    """A port bound (not listening) by us: etcd cannot bind it, a connect is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def test_context_manager(etcd_binary: str) -> None:
    with EtcdServer(binary=etcd_binary) as server:
        assert healthy(server.url)
        pid = server.pid
        workdir_data = server.data_dir
        assert server.version[0] == "3"
        assert server.url == f"http://{server.endpoint}"
    assert pid is not None
    assert not server.is_running
    assert workdir_data is not None and not os.path.exists(workdir_data)


def test_data_dir_with_spaces_is_user_owned_and_survives_restart(
    etcd_binary: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "my etcd data" / "with spaces"
    with EtcdServer(data_dir, binary=etcd_binary) as server:
        assert server.data_dir == str(data_dir)
        put(server.url, b"survivor", b"still here")
    assert (data_dir / "member").is_dir(), "stop() must keep a data dir the user passed"
    with EtcdServer(str(data_dir), binary=etcd_binary) as server:
        assert get(server.url, b"survivor") == b"still here"
    assert data_dir.is_dir()


def test_restart_keeps_endpoint_and_data(etcd_binary: str) -> None:
    with EtcdServer(binary=etcd_binary) as server:
        put(server.url, b"k", b"v1")
        endpoint, pid = server.endpoint, server.pid
        server.restart()
        assert server.endpoint == endpoint
        assert server.pid != pid
        assert get(server.url, b"k") == b"v1"
        server.kill()
        assert not server.is_running
        server.restart()
        assert get(server.url, b"k") == b"v1"


def test_start_twice_is_an_error_and_stop_then_start_works(etcd_binary: str) -> None:
    server = EtcdServer(binary=etcd_binary)
    try:
        server.start()
        with pytest.raises(EtcdServerError, match="already running"):
            server.start()
        server.stop()
        server.stop()
        server.start()
        assert healthy(server.url)
    finally:
        server.stop()


def test_requested_port_already_listening(etcd_binary: str) -> None:
    sock = find_free_port()
    try:
        port = sock.getsockname()[1]
        server = EtcdServer(binary=etcd_binary, port=port)
        with pytest.raises(
            EtcdStartError,
            match=f"port {port}.*is already in use by a program that does not answer HTTP",
        ):
            server.start()
        assert server.data_dir is None, "the temporary dir is removed after a failed start"
    finally:
        sock.close()


def test_requested_port_taken_fails_with_etcd_log(etcd_binary: str, bound_port: int) -> None:
    server = EtcdServer(binary=etcd_binary, port=bound_port)
    with pytest.raises(EtcdStartError, match="already in use") as info:
        server.start(timeout=30)
    assert info.value.returncode not in (None, 0)
    assert "address already in use" in info.value.log_tail
    assert not server.is_running


def test_port_taken_after_choosing_it_is_retried(
    etcd_binary: str, bound_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """find_free_port() races with another process: etcd's bind fails, we retry."""
    real_free_ports = _ports.free_ports
    calls: list[int] = []

    def racy_free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
        calls.append(count)
        ports = real_free_ports(count, host)
        if len(calls) == 1:
            ports[0] = bound_port  # the client port got taken meanwhile
        return ports

    monkeypatch.setattr(server_module, "free_ports", racy_free_ports)
    with EtcdServer(binary=etcd_binary) as server:
        assert len(calls) == 2
        assert server.get_port() != bound_port
        assert healthy(server.url)


def test_torch_stderr_argument(etcd_binary: str, tmp_path: Path) -> None:
    server = EtcdServer(binary=etcd_binary)
    with open(tmp_path / "stderr.log", "wb") as stderr:
        server.start(stderr=stderr)
    try:
        assert healthy(server.url)
    finally:
        server.stop()
    assert (tmp_path / "stderr.log").stat().st_size > 0


def test_log_file_option(etcd_binary: str, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "etcd log.txt"
    log_file.parent.mkdir()
    with EtcdServer(binary=etcd_binary, log_file=log_file) as server:
        assert server.log_file == str(log_file)
    assert log_file.stat().st_size > 0, "a user log file is kept"


def test_server_started_in_a_short_lived_thread_survives_the_thread(etcd_binary: str) -> None:
    """PR_SET_PDEATHSIG fires when the forking *thread* exits: we fork on a long-lived one."""
    server = EtcdServer(binary=etcd_binary)
    thread = threading.Thread(target=server.start)
    thread.start()
    thread.join(60)
    try:
        assert server.is_running
        # Give a (wrongly) delivered parent-death signal time to act.
        assert server.process is not None
        with pytest.raises(subprocess.TimeoutExpired):
            server.process.popen.wait(timeout=0.3)
        assert healthy(server.url)
    finally:
        server.stop()
