"""torch's etcd_server_test.py, ported with only the imports changed.

Source: pytorch test/distributed/elastic/rendezvous/etcd_server_test.py
(``test_etcd_server_start_stop``). On purpose we differ in one place: the host is
``127.0.0.1``, not ``localhost`` (which can resolve to ``::1`` first).
The v2 ``EtcdRendezvous`` test is not ported: we speak v3 only.
"""

from __future__ import annotations

import unittest

import pytest

from etcd_rendezvous.server import EtcdServer, find_free_port, stop_etcd


@pytest.fixture(autouse=True)
def _binary_from_env(etcd_binary: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's test calls EtcdServer() with no arguments: pick the binary the way torch
    # users do, through the environment, so the test runs on every installed etcd.
    monkeypatch.setenv("TORCHELASTIC_ETCD_BINARY_PATH", etcd_binary)
    monkeypatch.delenv("ETCD_BINARY", raising=False)


class EtcdServerTest(unittest.TestCase):
    def test_etcd_server_start_stop(self) -> None:
        server = EtcdServer()
        server.start()

        try:
            port = server.get_port()
            host = server.get_host()

            self.assertGreater(port, 0)
            self.assertEqual("127.0.0.1", host)  # torch: "localhost"
            self.assertEqual(f"{host}:{port}", server.get_endpoint())
            client = server.get_client()
            try:
                self.assertIsNotNone(client.version)
            finally:
                client.close()
        finally:
            server.stop()


def test_module_functions_keep_torch_names() -> None:
    sock = find_free_port()
    try:
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()
    stop_etcd(None)  # torch tolerates a missing process


def test_binary_from_torch_env_var(etcd_binary: str) -> None:
    server = EtcdServer()
    assert server.binary == etcd_binary


def test_torch_test_case_on_every_binary(etcd_binary: str) -> None:
    """unittest classes are not parametrized by pytest: run the port once per binary here."""
    result = unittest.TestResult()
    EtcdServerTest("test_etcd_server_start_stop").run(result)
    assert result.wasSuccessful(), result.errors + result.failures
