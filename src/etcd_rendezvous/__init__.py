"""etcd-rendezvous: run etcd for your users and use it as an elastic rendezvous.

Importing this package has no side effects and never imports torch.
"""

from __future__ import annotations

import logging

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.errors import (
    EtcdAuthError,
    EtcdBinaryNotFoundError,
    EtcdClientError,
    EtcdCompactedError,
    EtcdLeaseLostError,
    EtcdLeaseNotFoundError,
    EtcdOutcomeUnknownError,
    EtcdRendezvousError,
    EtcdRequestError,
    EtcdServerError,
    EtcdStartError,
    EtcdTimeoutError,
    EtcdUnavailableError,
    EtcdWatchError,
)
from etcd_rendezvous.server import EtcdCluster, EtcdServer, find_free_port, stop_etcd

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "EtcdAuthError",
    "EtcdBinaryNotFoundError",
    "EtcdClient",
    "EtcdClientError",
    "EtcdCluster",
    "EtcdCompactedError",
    "EtcdLeaseLostError",
    "EtcdLeaseNotFoundError",
    "EtcdOutcomeUnknownError",
    "EtcdRendezvousError",
    "EtcdRequestError",
    "EtcdServer",
    "EtcdServerError",
    "EtcdStartError",
    "EtcdTimeoutError",
    "EtcdUnavailableError",
    "EtcdWatchError",
    "__version__",
    "find_free_port",
    "stop_etcd",
]
