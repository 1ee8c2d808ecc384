"""The embedded default: one agent on this machine hosts etcd for the job.

When ``--rdzv-endpoint`` is left out, is ``localhost:0``, or names this machine
and no etcd answers there, the agents on this machine elect one of them with an
exclusive ``flock`` on a lock file named after the address (the kernel releases
it when its holder dies, even by SIGKILL). The winner starts an
:class:`~etcd_rendezvous.server.EtcdServer` on that address; the others wait
until it answers and connect. The sidecar lives as long as the winning agent's
process (``EtcdServer`` stops it at exit and etcd dies with its parent).

Like torch's ``c10d`` backend, which hosts its ``TCPStore`` in one agent, this
makes the hosting agent a single point of failure: if it dies, the job's
rendezvous state dies with it. Run a real etcd (ideally a 3-member cluster)
and pass its endpoints to remove it.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import re
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

from etcd_rendezvous.client import Endpoint, EtcdClient
from etcd_rendezvous.errors import EtcdClientError, EtcdPortInUseError, EtcdServerError
from etcd_rendezvous.server import EtcdServer

log = logging.getLogger(__name__)
# The notice that an agent hosts the job's etcd must reach torchrun's console:
# torch configures handlers for its own logger tree only (ours has a NullHandler),
# so it goes through a logger in torch's elastic rendezvous namespace.
_agent_log = logging.getLogger("torch.distributed.elastic.rendezvous.etcd_v3")

#: How often a waiting agent checks whether the hosting agent's etcd answers.
_POLL_INTERVAL = 0.05


@dataclass
class _Hosted:
    server: EtcdServer
    lock_fd: int


_hosted: dict[tuple[str, int], _Hosted] = {}
_hosted_lock = threading.Lock()


def is_local_host(host: str) -> bool:
    """Whether ``host`` names this machine (loopback, its hostname or one of its addresses)."""
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return True
    try:
        from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname

        return bool(_matches_machine_hostname(host))
    except (ImportError, OSError):
        return False


def bind_address(host: str) -> str:
    """The IP etcd must listen on for ``host`` (etcd does not accept names in listen URLs)."""
    if host == "localhost":
        return "127.0.0.1"
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise RendezvousConnectionError(
            f"cannot host etcd on {host!r}: the name does not resolve ({exc})"
        ) from exc
    return str(infos[0][4][0])


def etcd_answers(endpoint: Endpoint, timeout: float, **client_kwargs: Any) -> bool:
    """Whether an etcd answers a status request at ``endpoint`` within ``timeout``."""
    client = EtcdClient([endpoint.url], timeout=timeout, connect_timeout=timeout, **client_kwargs)
    try:
        client.status()
        return True
    except EtcdClientError:
        return False
    finally:
        client.close()


#: Directory of the election lock files (default: the system temp dir). The files
#: are empty and left in place: unlinking a lock file others may be opening would let
#: two agents win.
LOCK_DIR_ENV = "ETCD_RENDEZVOUS_LOCK_DIR"


def _lock_path(endpoint: Endpoint) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", endpoint.host)
    uid = os.getuid() if hasattr(os, "getuid") else 0
    directory = os.environ.get(LOCK_DIR_ENV) or tempfile.gettempdir()
    return os.path.join(directory, f"etcd-rendezvous-{uid}-{safe}-{endpoint.port}.lock")


def _try_lock(path: str) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def is_hosting(endpoint: Endpoint) -> bool:
    """Whether this process hosts the embedded etcd at ``endpoint``."""
    with _hosted_lock:
        return (endpoint.host, endpoint.port) in _hosted


def ensure_local_etcd(endpoint: Endpoint, run_id: str, timeout: float) -> bool:
    """Make sure an etcd answers at ``endpoint`` on this machine; True if we host it.

    Exactly one process per address wins the lock file and starts etcd; the
    others wait (at most ``timeout`` seconds) until it answers. If the host
    dies before its etcd answers, a waiting process takes over.
    """
    if endpoint.scheme != "http":
        raise RendezvousConnectionError(
            f"no etcd answers at {endpoint.url} and the embedded etcd only serves plain "
            "http: start etcd yourself for TLS, or use protocol=http"
        )
    key = (endpoint.host, endpoint.port)
    deadline = time.monotonic() + timeout
    path = _lock_path(endpoint)
    while True:
        with _hosted_lock:
            if key in _hosted:
                return True
            fd = _try_lock(path)
            if fd is not None:
                try:
                    return _host(endpoint, fd, run_id, deadline)
                except BaseException:
                    _unlock(fd)
                    raise
        if etcd_answers(endpoint, timeout=0.5):
            return False
        if time.monotonic() >= deadline:
            raise RendezvousConnectionError(
                f"no etcd answers at {endpoint.url} after {timeout:.0f}s, and the agent on this "
                f"machine that holds {path} (hosting the embedded etcd) did not start one"
            )
        time.sleep(_POLL_INTERVAL)


def _host(endpoint: Endpoint, fd: int, run_id: str, deadline: float) -> bool:
    """Called with the lock held: start the sidecar (unless an etcd appeared meanwhile)."""
    if etcd_answers(endpoint, timeout=0.5):
        # An etcd not started through this lock (the user's, or one still shutting down).
        _unlock(fd)
        return False
    server = EtcdServer(
        host=bind_address(endpoint.host),
        port=endpoint.port,
        name=f"rdzv-{endpoint.port}",
    )
    try:
        server.start(timeout=max(deadline - time.monotonic(), 5.0), num_retries=1)
    except EtcdPortInUseError as exc:  # its advice is the library's (port=0)
        raise RendezvousConnectionError(
            f"no etcd answers at {endpoint.url} and hosting one there failed: {exc.problem}; "
            "point --rdzv-endpoint at your etcd, or at localhost:0 to host one on a port "
            "derived from the run id"
        ) from exc
    except EtcdServerError as exc:
        raise RendezvousConnectionError(
            f"no etcd answers at {endpoint.url} and hosting one there failed: {exc}"
        ) from exc
    _hosted[(endpoint.host, endpoint.port)] = _Hosted(server, fd)
    _agent_log.warning(
        "Run %r: this agent (pid %d) hosts the job's etcd at %s (etcd %s). It is a single "
        "point of failure, as the c10d backend's TCPStore host: if this agent dies the "
        "rendezvous is lost. Pass --rdzv-endpoint of a real etcd cluster to remove it.",
        run_id,
        os.getpid(),
        endpoint.url,
        server.version,
    )
    return True


def stop_embedded() -> None:
    """Stop every etcd this process hosts and release the locks (tests, embedding apps)."""
    with _hosted_lock:
        hosted = list(_hosted.values())
        _hosted.clear()
    for item in hosted:
        try:
            item.server.stop()
        finally:
            _unlock(item.lock_fd)


__all__ = [
    "bind_address",
    "ensure_local_etcd",
    "etcd_answers",
    "is_hosting",
    "is_local_host",
    "stop_embedded",
]
