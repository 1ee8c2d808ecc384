"""torchrun on etcd v3: ``EtcdStore``, ``EtcdRendezvousBackend`` and the ``etcd-v3`` plugin.

This subpackage imports torch (``pip install etcd-rendezvous[torch]``); the
top-level ``etcd_rendezvous`` package never imports it.

Use it from the command line::

    torchrun --rdzv-backend=etcd-v3 --rdzv-endpoint=host1:2379,host2:2379 \\
        --rdzv-id=job42 --nnodes=2:4 --nproc-per-node=8 train.py

or from Python::

    from etcd_rendezvous.torchrun import EtcdStore, EtcdRendezvousBackend
"""

from __future__ import annotations

# Import torch's rendezvous package first: its __init__ loads the ``torchrun.handlers``
# entry points, i.e. our plugin module, which must not find this package half-imported.
import torch.distributed.elastic.rendezvous  # noqa: F401  (isort: skip)
from etcd_rendezvous.torchrun.backend import BACKEND_NAME, EtcdRendezvousBackend
from etcd_rendezvous.torchrun.errors import (
    EtcdStoreConnectionError,
    EtcdStoreError,
    EtcdStoreOutcomeUnknownError,
    EtcdStoreTimeoutError,
)
from etcd_rendezvous.torchrun.plugin import create_rdzv_handler, get_handler_creator
from etcd_rendezvous.torchrun.store import EtcdStore

__all__ = [
    "BACKEND_NAME",
    "EtcdRendezvousBackend",
    "EtcdStore",
    "EtcdStoreConnectionError",
    "EtcdStoreError",
    "EtcdStoreOutcomeUnknownError",
    "EtcdStoreTimeoutError",
    "create_rdzv_handler",
    "get_handler_creator",
]
