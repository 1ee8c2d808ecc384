"""Errors of the torch integration: torch's exception types *and* ours.

Each class derives from the exception torch's own code catches (so the elastic
agent, ``torch.distributed`` and torch's rendezvous react exactly as they do to
a ``TCPStore`` failure) and from :class:`~etcd_rendezvous.errors.EtcdRendezvousError`
(so ``except EtcdRendezvousError`` catches everything this package raises).
"""

from __future__ import annotations

from torch.distributed import DistNetworkError, DistStoreError, QueueEmptyError

from etcd_rendezvous.errors import EtcdRendezvousError


class EtcdStoreError(DistStoreError, EtcdRendezvousError):
    """A store operation failed (``torch.distributed.DistStoreError``)."""


class EtcdStoreTimeoutError(EtcdStoreError):
    """A ``get``/``wait``/``multi_get`` did not see its keys in time.

    The message starts like ``TCPStore``'s (``wait timeout after 1000ms, keys:
    ...``) so code that matches on it keeps working.
    """


class EtcdStoreQueueEmptyError(QueueEmptyError, EtcdStoreError):
    """``queue_pop(key, block=False)`` on an empty queue (``torch.distributed.QueueEmptyError``)."""


class EtcdStoreConnectionError(DistNetworkError, EtcdRendezvousError):
    """etcd could not be reached, or a write's outcome is unknown.

    A ``torch.distributed.DistNetworkError`` (a ``RuntimeError``), like the one
    ``TCPStore`` raises when its server is gone. The cause is chained.
    """


class EtcdStoreOutcomeUnknownError(EtcdStoreConnectionError):
    """A store write may or may not have been applied: etcd stopped answering after
    the request may have reached it, and kept silent until the retry deadline.

    The store never applies a write twice (see :class:`~etcd_rendezvous.torchrun.EtcdStore`),
    so at most one application happened; read the key back to learn which.
    """


__all__ = [
    "EtcdStoreConnectionError",
    "EtcdStoreError",
    "EtcdStoreOutcomeUnknownError",
    "EtcdStoreQueueEmptyError",
    "EtcdStoreTimeoutError",
]
