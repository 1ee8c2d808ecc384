"""Running etcd: binary discovery, one member (:class:`EtcdServer`), a local :class:`EtcdCluster`,
and :class:`EtcdReplica` (one host's member of a cluster that grows and heals itself).

``EtcdServer``, ``find_free_port`` and ``stop_etcd`` keep the names of torch's
``torch.distributed.elastic.rendezvous.etcd_server``: switch by changing the import.
"""

from __future__ import annotations

from etcd_rendezvous.server._binary import (
    EtcdBinary,
    etcd_version,
    find_etcd_binary,
    list_etcd_binaries,
)
from etcd_rendezvous.server._ports import find_free_port
from etcd_rendezvous.server._process import EtcdProcess
from etcd_rendezvous.server._security import TLSConfig
from etcd_rendezvous.server.cluster import EtcdCluster, EtcdClusterMember
from etcd_rendezvous.server.replica import EtcdReplica
from etcd_rendezvous.server.server import EtcdServer, stop_etcd

__all__ = [
    "EtcdBinary",
    "EtcdCluster",
    "EtcdClusterMember",
    "EtcdProcess",
    "EtcdReplica",
    "EtcdServer",
    "TLSConfig",
    "etcd_version",
    "find_etcd_binary",
    "find_free_port",
    "list_etcd_binaries",
    "stop_etcd",
]
