"""Start errors that point the right way: what holds a port, advice in each layer's
words (library ``port=0``, CLI ``--port 0``, torchrun ``--rdzv-endpoint``), no raw HTML,
no log path that no longer exists."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from _server_http import PlainHTTPServer
from click.testing import CliRunner

from etcd_rendezvous.cli import main
from etcd_rendezvous.errors import EtcdPortInUseError, EtcdStartError
from etcd_rendezvous.pytest_plugin import TLSFiles
from etcd_rendezvous.server import EtcdCluster, EtcdServer, TLSConfig, find_free_port
from etcd_rendezvous.server._process import HealthChecker


@pytest.fixture
def web() -> Iterator[PlainHTTPServer]:
    with PlainHTTPServer() as server:
        yield server


def test_port_held_by_a_web_server_is_named_not_another_etcd(
    etcd_binary: str, web: PlainHTTPServer
) -> None:
    server = EtcdServer(binary=etcd_binary, port=web.port)
    with pytest.raises(EtcdPortInUseError) as info:
        server.start()
    assert str(info.value) == (
        f"port {web.port} on 127.0.0.1 is already in use by an HTTP server that is not etcd "
        "(HTTP 200, text/html); pass port=0 to pick a free one"
    )
    assert "another etcd" not in str(info.value)
    assert info.value.problem.endswith("(HTTP 200, text/html)")
    assert (info.value.host, info.value.port) == ("127.0.0.1", web.port)


def test_port_held_by_etcd_names_its_version(etcd_binary: str, etcd_server: EtcdServer) -> None:
    with pytest.raises(EtcdPortInUseError, match=r"in use by an etcd \(3\.\d+\.\d+\); pass port=0"):
        EtcdServer(binary=etcd_binary, port=etcd_server.port).start()
    with pytest.raises(EtcdPortInUseError, match=r"in use by an etcd .*; pass peer_port=0"):
        EtcdServer(binary=etcd_binary, peer_port=etcd_server.port).start()


def test_port_held_by_an_https_etcd(etcd_binary: str, etcd_tls_files: TLSFiles) -> None:
    tls = TLSConfig(etcd_tls_files.server_cert, etcd_tls_files.server_key, etcd_tls_files.ca)
    with (
        EtcdServer(binary=etcd_binary, tls=tls) as https_etcd,
        pytest.raises(EtcdPortInUseError, match=r"in use by an etcd \(3\.[\d.]+\) on https;"),
    ):
        EtcdServer(binary=etcd_binary, port=https_etcd.port).start()


def test_port_held_by_a_silent_listener(etcd_binary: str) -> None:
    sock = find_free_port()  # listens, never answers
    try:
        port = sock.getsockname()[1]
        with pytest.raises(
            EtcdPortInUseError, match=f"port {port} .* by a program that does not answer HTTP"
        ):
            EtcdServer(binary=etcd_binary, port=port).start()
    finally:
        sock.close()


def test_cli_serve_says_dash_dash_port(web: PlainHTTPServer) -> None:
    result = CliRunner().invoke(main, ["serve", "--port", str(web.port)])
    assert result.exit_code == 1, result.output
    assert (
        f"port {web.port} on 127.0.0.1 is already in use by an HTTP server that is not etcd "
        "(HTTP 200, text/html); give another --port, or --port 0 to pick a free one"
    ) in result.output
    assert "port=0" not in result.output


def test_torchrun_embedded_says_fix_the_endpoint(web: PlainHTTPServer) -> None:
    pytest.importorskip("torch")
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

    from etcd_rendezvous.client import Endpoint
    from etcd_rendezvous.torchrun import _embedded

    endpoint = Endpoint("http", "127.0.0.1", web.port)
    with pytest.raises(RendezvousConnectionError) as info:
        _embedded.ensure_local_etcd(endpoint, "run-msg", timeout=10)
    message = str(info.value)
    assert "in use by an HTTP server that is not etcd" in message
    assert "point --rdzv-endpoint at your etcd, or at localhost:0" in message
    assert "port=0" not in message


def test_health_check_summarizes_a_web_page(web: PlainHTTPServer) -> None:
    check = HealthChecker("127.0.0.1", web.port)
    try:
        assert not check()
    finally:
        check.close()
    size = len(PlainHTTPServer.PAGE)
    assert check.last_error == f"HTTP 200, an HTML page titled 'Not etcd' ({size:,} bytes)"


def _paths_in(message: str) -> list[str]:
    return re.findall(r"\((/[^()\s]+)\)", message)


def test_start_error_with_data_dir_cites_no_deleted_log(etcd_binary: str, tmp_path: Path) -> None:
    server = EtcdServer(tmp_path / "data", binary=etcd_binary, extra_args=["--no-such-flag"])
    with pytest.raises(EtcdStartError) as info:
        server.start()
    message = str(info.value)
    assert "last lines of its log:\n" in message, "the log's last lines are quoted"
    for path in _paths_in(message):
        assert os.path.exists(path), f"the message cites {path}, which no longer exists"


def test_start_error_cites_a_log_file_the_user_keeps(etcd_binary: str, tmp_path: Path) -> None:
    log_file = tmp_path / "etcd.log"
    server = EtcdServer(binary=etcd_binary, log_file=log_file, extra_args=["--no-such-flag"])
    with pytest.raises(EtcdStartError, match=re.escape(f"last lines of its log ({log_file})")):
        server.start()
    assert log_file.exists()


@pytest.mark.parametrize("own_data_dir", [False, True])
def test_cluster_start_error_cites_only_logs_that_exist(
    etcd_binary: str, tmp_path: Path, own_data_dir: bool
) -> None:
    data_dir = tmp_path / "cluster" if own_data_dir else None
    cluster = EtcdCluster(3, data_dir=data_dir, binary=etcd_binary, extra_args=["--no-such-flag"])
    with pytest.raises(EtcdStartError) as info:
        cluster.start(timeout=30)
    message = str(info.value)
    assert "last lines of its log" in message
    cited = _paths_in(message)
    assert bool(cited) == own_data_dir, message
    for path in cited:
        assert os.path.exists(path), f"the message cites {path}, which no longer exists"
