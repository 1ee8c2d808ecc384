"""The etcd v3 client: the project's one boundary to etcd.

It speaks etcd's v3 API through the JSON gateway (``POST /v3/...``) that etcd
3.4, 3.5 and 3.6 all serve, over urllib3::

    from etcd_rendezvous.client import EtcdClient, Compare, Op

    with EtcdClient("127.0.0.1:2379", namespace="/job/42/") as client:
        client.put("config", b"{}")
        with client.lease(10) as lease:
            client.txn(
                [Compare.create_revision("leader", "==", 0)],
                success=[Op.put("leader", b"me", lease=lease.id)],
            )
        with client.watch("nodes/", prefix=True) as watch:
            event = watch.next_event(timeout=5.0)
"""

from __future__ import annotations

from etcd_rendezvous.client._endpoints import Endpoint, parse_endpoints
from etcd_rendezvous.client._retry import Retry
from etcd_rendezvous.client._types import (
    DeleteResponse,
    KeyValue,
    LeaseGrant,
    LeaseInfo,
    Member,
    PutResponse,
    RangeResponse,
    Status,
    TxnResponse,
    WatchEvent,
)
from etcd_rendezvous.client.client import EtcdClient
from etcd_rendezvous.client.lease import Lease
from etcd_rendezvous.client.txn import Compare, DeleteOp, Op, PutOp, RangeOp, TxnOp
from etcd_rendezvous.client.watch import Watch

__all__ = [
    "Compare",
    "DeleteOp",
    "DeleteResponse",
    "Endpoint",
    "EtcdClient",
    "KeyValue",
    "Lease",
    "LeaseGrant",
    "LeaseInfo",
    "Member",
    "Op",
    "PutOp",
    "PutResponse",
    "RangeOp",
    "RangeResponse",
    "Retry",
    "Status",
    "TxnOp",
    "TxnResponse",
    "Watch",
    "WatchEvent",
    "parse_endpoints",
]
