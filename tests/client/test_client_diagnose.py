"""Client errors that say what is wrong, not "Is etcd running there?" for everything:
TLS needed, certificate untrusted or refused, no TLS there, a web server that is not
etcd (summarized, never its raw HTML). Real etcd servers, a real web server."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.client._diagnose import NOT_RUNNING, summarize_reply
from etcd_rendezvous.errors import EtcdRequestError, EtcdUnavailableError
from etcd_rendezvous.pytest_plugin import TLSFiles
from etcd_rendezvous.server import EtcdServer, TLSConfig, find_free_port

PAGE = b"<!DOCTYPE html><html><head><title>Welcome to nginx!</title></head>" + b"y" * 5000


def _failure(error_type: type[Exception], *args: Any, **kwargs: Any) -> Exception:
    """The error a client with these arguments gets for its first request."""
    with EtcdClient(*args, **kwargs) as client, pytest.raises(error_type) as info:
        client.get("k")
    return info.value


@pytest.fixture
def web_port() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(PAGE)))
            self.end_headers()
            self.wfile.write(PAGE)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def https_etcd(etcd_binary: str, etcd_tls_files: TLSFiles) -> Iterator[EtcdServer]:
    tls = TLSConfig(etcd_tls_files.server_cert, etcd_tls_files.server_key, etcd_tls_files.ca)
    with EtcdServer(binary=etcd_binary, tls=tls) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_etcd(etcd_binary: str, etcd_tls_files: TLSFiles) -> Iterator[EtcdServer]:
    tls = TLSConfig(
        etcd_tls_files.server_cert,
        etcd_tls_files.server_key,
        etcd_tls_files.ca,
        client_cert_auth=True,
        client_cert_file=etcd_tls_files.client_cert,
        client_key_file=etcd_tls_files.client_key,
    )
    with EtcdServer(binary=etcd_binary, tls=tls) as server:
        yield server


def test_a_web_server_is_summarized_not_dumped(web_port: int) -> None:
    error = _failure(EtcdRequestError, f"127.0.0.1:{web_port}", timeout=2)
    message = str(error)
    assert message == (
        f"etcd /v3/kv/range on http://127.0.0.1:{web_port}: the reply is an HTML page titled "
        f"'Welcome to nginx!' ({len(PAGE):,} bytes), not etcd's JSON; "
        f"is http://127.0.0.1:{web_port} an etcd client URL?"
    )
    assert "<html" not in message.lower()


def test_summarize_reply() -> None:
    assert summarize_reply(b"<html><body>hi</body></html>") == "an HTML page (28 bytes)"
    assert (
        summarize_reply(b"plain  text\nreply", "text/plain")
        == "text/plain 'plain text reply' (17 bytes)"
    )
    assert summarize_reply(b"z" * 100).endswith("'... (100 bytes)")


def test_https_only_etcd_reached_over_http_says_use_https(https_etcd: EtcdServer) -> None:
    netloc = f"127.0.0.1:{https_etcd.port}"
    error = _failure(EtcdUnavailableError, f"http://{netloc}", timeout=2)
    message = str(error)
    assert message.endswith(
        f". {netloc} speaks TLS only: use https://{netloc} with the CA certificate that "
        "signed etcd's (ca_cert; --ca-cert)."
    ), message
    assert "Is etcd running there?" not in message


def test_untrusted_server_certificate(https_etcd: EtcdServer, etcd_tls_files: TLSFiles) -> None:
    error = _failure(
        EtcdUnavailableError, https_etcd.url, ca_cert=etcd_tls_files.other_ca, timeout=2
    )
    assert str(error).endswith(
        ". etcd's TLS certificate is not trusted by this client: give the CA certificate "
        "that signed it (ca_cert; --ca-cert on the command line)."
    )


def test_missing_client_certificate_says_so(
    mtls_etcd: EtcdServer, etcd_tls_files: TLSFiles
) -> None:
    error = _failure(EtcdUnavailableError, mtls_etcd.url, ca_cert=etcd_tls_files.ca, timeout=2)
    message = str(error)
    assert message.endswith(
        ". etcd ended the TLS handshake: it requires a client certificate signed by its CA "
        "(cert and key; --cert/--key on the command line)."
    ), message


def test_refused_client_certificate_says_so(
    mtls_etcd: EtcdServer, etcd_tls_files: TLSFiles, tmp_path: Path
) -> None:
    trustme = pytest.importorskip("trustme")
    stranger = trustme.CA().issue_cert("client@elsewhere.example")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    stranger.cert_chain_pems[0].write_to_path(cert)
    stranger.private_key_pem.write_to_path(key)
    error = _failure(
        EtcdUnavailableError,
        mtls_etcd.url,
        ca_cert=etcd_tls_files.ca,
        cert=str(cert),
        key=str(key),
        timeout=2,
    )
    assert ". etcd refused this client's TLS certificate: it must be signed by a CA" in str(error)


def test_https_to_a_plain_http_etcd_says_use_http(etcd_server: EtcdServer) -> None:
    error = _failure(EtcdUnavailableError, f"https://{etcd_server.endpoint}", timeout=2)
    assert f". {etcd_server.endpoint} does not speak TLS: use http://{etcd_server.endpoint}" in (
        str(error)
    )


def test_nothing_listening_still_asks_whether_etcd_runs() -> None:
    sock = find_free_port()
    port = sock.getsockname()[1]
    sock.close()
    error = _failure(EtcdUnavailableError, f"127.0.0.1:{port}", timeout=1)
    assert str(error).endswith(NOT_RUNNING)
