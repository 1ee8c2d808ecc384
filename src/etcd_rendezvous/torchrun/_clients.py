"""One :class:`EtcdClient` per process and etcd, shared by the handlers that use it.

torchrun creates one handler per agent process, so this changes nothing for a job; it
matters where one process holds several handlers (tests, simulations, the benchmark's
N nodes in threads). There, handlers to the same etcd with the same credentials share
one client, hence one connection pool, one watch on the run's ``ctl/`` prefix and one
lease keep-alive thread (the engine's per-client hub, see ``rendezvous/_hub.py``)
instead of N of each; and the connection check runs once, not per handler.

The client is closed when its last handler releases it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.torchrun._options import EtcdV3Options

log = logging.getLogger(__name__)

_Key = tuple[object, ...]


@dataclass
class _Entry:
    client: EtcdClient
    refs: int


_lock = threading.Lock()
_shared: dict[_Key, _Entry] = {}


def _key(opts: EtcdV3Options) -> _Key:
    """What makes two handlers' clients interchangeable."""
    return (
        tuple(ep.url for ep in opts.endpoints),
        opts.request_timeout,
        opts.ca_cert,
        opts.ssl_cert,
        opts.ssl_cert_key,
        opts.username,
        opts.password,
    )


def acquire(opts: EtcdV3Options, connect: Callable[[], EtcdClient]) -> EtcdClient:
    """The shared client for ``opts``, made by ``connect`` if none is open.

    ``connect`` runs under the lock: the handlers created at once in one process wait
    for the first one's connection check instead of each making their own.
    """
    key = _key(opts)
    with _lock:
        entry = _shared.get(key)
        if entry is None:
            entry = _shared[key] = _Entry(connect(), 0)
        else:
            log.debug("sharing the etcd client of %s", opts.endpoint_list())
        entry.refs += 1
        return entry.client


def release(client: EtcdClient) -> None:
    """Give ``client`` back; the last holder closes it. Releasing twice is a bug."""
    with _lock:
        for key, entry in _shared.items():
            if entry.client is client:
                entry.refs -= 1
                if entry.refs > 0:
                    return
                del _shared[key]
                break
        else:
            raise ValueError("release() of a client that acquire() did not hand out")
    client.close()


def open_clients() -> int:
    """How many shared clients are open (for tests)."""
    with _lock:
        return len(_shared)
