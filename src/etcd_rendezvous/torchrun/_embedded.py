"""The embedded default: one agent on this machine hosts etcd for the job.

When ``--rdzv-endpoint`` is left out (and ``ETCD_ENDPOINTS`` is unset), is
``localhost:0`` (both mean: on the port derived from the run id), or
``--rdzv-conf=embedded=true`` is given, the agents of the job on this machine elect
one of them with an exclusive ``flock`` on a lock file named after the user, the run
id and the address (the kernel releases it when its holder dies, even by SIGKILL).
Each job gets its own sidecar: a job never uses, nor ends, another job's etcd.

The winner writes a random token into the lock file (0600, in a 0700 per-user
directory) and starts an :class:`~etcd_rendezvous.server.EtcdServer` named
``rdzv-<token>`` on that address; the others wait until an etcd with that name
answers, so an etcd that another user (or job) serves on the port is never used. The
sidecar lives as long as the winning agent's process (``EtcdServer`` stops it at exit
and etcd dies with its parent).

On one machine (a loopback endpoint), like torch's ``c10d`` backend, which hosts its
``TCPStore`` in one agent, this makes the hosting agent a single point of failure: if
it dies, the job's rendezvous state dies with it.

Across hosts (``--rdzv-endpoint=host0:PORT`` with ``embedded=true``, or ``host0:0``),
the embedded etcd is replicated (:func:`ensure_replicated`): the agent on ``host0``
starts a one-member etcd; the agents on other hosts wait for it (saying so), and one
agent per host joins it as a member (learner, then voter) until it has ``members``
voting members (1, 3 or 5); a dead member is removed and a host without one takes its
place (:class:`~etcd_rendezvous.server.EtcdReplica`). Every client learns the members'
endpoints as they change. When the agents exit, their members leave and their data is
removed.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

from etcd_rendezvous.client import Endpoint, EtcdClient
from etcd_rendezvous.errors import EtcdClientError, EtcdPortInUseError, EtcdServerError
from etcd_rendezvous.server import EtcdReplica, EtcdServer
from etcd_rendezvous.server._process import install_exit_handler

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


_hosted: dict[tuple[str, str, int], _Hosted] = {}  # (run id, host, port)
_hosted_lock = threading.Lock()
_replicas: dict[tuple[str, str, int], tuple[EtcdReplica, int]] = {}  # -> (replica, lock fd)


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


#: Directory of the election lock files (default: ``<temp dir>/etcd-rendezvous-locks-<uid>``,
#: created 0700). The files are left in place: unlinking a lock file others may be
#: opening would let two agents win.
LOCK_DIR_ENV = "ETCD_RENDEZVOUS_LOCK_DIR"

#: The member-name prefix of an embedded etcd; the rest is the hosting agent's token.
_NAME_PREFIX = "rdzv-"


def _private_dir() -> str:
    """The per-user directory of lock files: created 0700, refused if others can write it."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    directory = os.environ.get(LOCK_DIR_ENV) or os.path.join(
        tempfile.gettempdir(), f"etcd-rendezvous-locks-{uid}"
    )
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o022:
        raise RendezvousConnectionError(
            f"the embedded etcd's lock directory {directory} is not a directory of this "
            f"user (uid {uid}) that only it can write: remove it, or set {LOCK_DIR_ENV} to a "
            "private directory"
        )
    return directory


def _lock_path(endpoint: Endpoint, run_id: str) -> str:
    """One lock file per user, run id and address: each job elects its own host."""
    directory = _private_dir()
    _remove_stale_locks_once(directory)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", endpoint.host)
    run = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:40]
    digest = hashlib.sha256(run_id.encode("utf-8")).hexdigest()[:12]
    return os.path.join(directory, f"{run}-{digest}-{safe}-{endpoint.port}.lock")


def _try_lock(path: str) -> int | None:
    """The locked file descriptor of ``path``, or None if another process holds it.

    A lock won on a file that was unlinked meanwhile (by :func:`_remove_stale_locks`)
    is no lock: the path names another file now, so it is tried again.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        _unlock(fd)


#: Lock files untouched for this long, and held by nobody, are removed (one per job
#: would otherwise pile up in the lock directory for ever).
STALE_LOCK_AGE = 24 * 3600.0


def _remove_stale_locks(directory: str, older_than: float = STALE_LOCK_AGE) -> list[str]:
    """Remove the lock files in ``directory`` older than ``older_than`` that nobody holds.

    Safe against a process opening one meanwhile: it is removed only while locked here,
    and :func:`_try_lock` retries a lock won on a removed file.
    """
    removed: list[str] = []
    now = time.time()
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.endswith(".lock"):
            continue
        path = os.path.join(directory, name)
        try:
            if now - os.stat(path, follow_symlinks=False).st_mtime < older_than:
                continue
            fd = _try_lock(path)
        except OSError:
            continue
        if fd is None:
            continue  # held: its job runs
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
        finally:
            _unlock(fd)
    if removed:
        log.debug("removed %d stale lock file(s) from %s", len(removed), directory)
    return removed


@functools.cache
def _remove_stale_locks_once(directory: str) -> None:
    _remove_stale_locks(directory)


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _read_token(path: str) -> str:
    """The token the agent holding ``path`` wrote (empty while none is written)."""
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _served_by(endpoint: Endpoint, timeout: float) -> str | None:
    """The member name of the etcd answering at ``endpoint`` (None: nothing answers)."""
    client = EtcdClient([endpoint.url], timeout=timeout, connect_timeout=timeout)
    try:
        members = client.members()
    except EtcdClientError:
        return None
    finally:
        client.close()
    return ",".join(sorted(member.name for member in members))


def is_hosting(endpoint: Endpoint) -> bool:
    """Whether this process hosts an embedded etcd at ``endpoint``."""
    with _hosted_lock:
        return any(key[1:] == (endpoint.host, endpoint.port) for key in _hosted)


def host_alive(endpoint: Endpoint, run_id: str) -> bool:
    """Whether a process (this one included) holds the job's election lock at ``endpoint``.

    The kernel releases the lock when its holder dies, even by SIGKILL: a free lock means
    the agent that hosted the job's etcd is gone, and its etcd with it.
    """
    with _hosted_lock:
        if (run_id, endpoint.host, endpoint.port) in _hosted:
            return True
        try:
            fd = _try_lock(_lock_path(endpoint, run_id))
        except (OSError, RendezvousConnectionError):
            return True  # no verdict
        if fd is None:
            return True
        _unlock(fd)
        return False


def ensure_local_etcd(endpoint: Endpoint, run_id: str, timeout: float) -> bool:
    """Make sure the job's own etcd answers at ``endpoint``; True if this process hosts it.

    One process per user, run id and address wins the lock file, writes a random
    token into it (the file is 0600 in a 0700 directory: only this user's agents can
    read it) and starts etcd with the member name ``rdzv-<token>``. The others wait (at
    most ``timeout`` seconds) until an etcd answers there *with that name*: an etcd of
    another job or another user on the same port is never used. If the host dies
    before its etcd answers, a waiting process takes over.
    """
    if endpoint.scheme != "http":
        raise RendezvousConnectionError(
            f"the embedded etcd only serves plain http, not {endpoint.url}: start etcd "
            "yourself for TLS and pass it with --rdzv-endpoint, or use protocol=http"
        )
    key = (run_id, endpoint.host, endpoint.port)
    deadline = time.monotonic() + timeout
    path = _lock_path(endpoint, run_id)
    foreign: str | None = None
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
        token = _read_token(path)
        served = _served_by(endpoint, timeout=0.5)
        if token and served == _NAME_PREFIX + token:
            return False
        foreign = served if served is not None and token else foreign
        if time.monotonic() >= deadline:
            if foreign is not None:
                raise RendezvousConnectionError(
                    f"run {run_id!r}: the etcd at {endpoint.url} (member {foreign!r}) is not "
                    "the one this job's hosting agent started (another job or user holds "
                    "the port): pass --rdzv-endpoint=localhost:0 with another --rdzv-id, "
                    "or a free port with --rdzv-conf=embedded=true"
                )
            raise RendezvousConnectionError(
                f"no etcd answers at {endpoint.url} after {timeout:.0f}s, and the agent on this "
                f"machine that holds {path} (hosting the embedded etcd) did not start one"
            )
        time.sleep(_POLL_INTERVAL)


#: How long a new host waits for an etcd still answering on its port to go away (the
#: sidecar of the previous holder of the lock, stopping).
_PREVIOUS_GONE_TIMEOUT = 5.0


def _host(endpoint: Endpoint, fd: int, run_id: str, deadline: float) -> bool:
    """Called with the lock held: write a fresh token and start the job's sidecar."""
    token = secrets.token_hex(16)
    os.ftruncate(fd, 0)
    os.pwrite(fd, token.encode("ascii"), 0)
    gone_by = time.monotonic() + _PREVIOUS_GONE_TIMEOUT
    while (served := _served_by(endpoint, timeout=0.5)) is not None:
        if time.monotonic() >= gone_by:
            raise RendezvousConnectionError(
                f"run {run_id!r}: cannot host the job's etcd at {endpoint.url}: an etcd this "
                f"job did not start answers there (member {served!r}). Pass "
                "--rdzv-endpoint=localhost:0 with another --rdzv-id, or a free port with "
                "--rdzv-conf=embedded=true"
            )
        time.sleep(_POLL_INTERVAL)
    server = EtcdServer(
        host=bind_address(endpoint.host),
        port=endpoint.port,
        name=_NAME_PREFIX + token,
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
            f"run {run_id!r}: no etcd answers at {endpoint.url} and hosting one there failed: {exc}"
        ) from exc
    _hosted[(run_id, endpoint.host, endpoint.port)] = _Hosted(server, fd)
    _agent_log.warning(
        "Run %r: this agent (pid %d) hosts the job's etcd at %s (etcd %s), for this run "
        "only. It is a single point of failure, as the c10d backend's TCPStore host: if "
        "this agent dies the rendezvous is lost. Pass --rdzv-endpoint of a real etcd "
        "cluster to remove it.",
        run_id,
        os.getpid(),
        endpoint.url,
        server.version,
    )
    return True


def stop_embedded() -> None:
    """Stop every etcd this process hosts and release the locks (at exit; tests)."""
    with _hosted_lock:
        hosted = list(_hosted.values())
        _hosted.clear()
        replicas = list(_replicas.values())
        _replicas.clear()
    for replica, fd in replicas:
        try:
            replica.stop()
        except Exception:  # at exit: the next replica and the lock still matter
            log.exception("stopping the embedded etcd member %s failed", replica)
        finally:
            _unlock(fd)
    for item in hosted:
        try:
            item.server.stop()
        finally:
            _unlock(item.lock_fd)


# --- the replicated embedded etcd (across hosts) ----------------------------------------------

#: Seconds between two console lines of an agent waiting for host0's etcd.
_WAIT_REPORT_INTERVAL = 10.0


def cluster_name(run_id: str) -> str:
    """The name of a job's replicated etcd: its members are named ``<this>-<token>``."""
    return _NAME_PREFIX + hashlib.sha256(run_id.encode("utf-8")).hexdigest()[:12]


def _cluster_at(endpoint: Endpoint, timeout: float) -> list[str] | None:
    """The member names of the etcd answering at ``endpoint`` (None: nothing answers)."""
    client = EtcdClient([endpoint.url], timeout=timeout, connect_timeout=timeout)
    try:
        return [member.name for member in client.members()]
    except EtcdClientError:
        return None
    finally:
        client.close()


def _ours(names: list[str], cluster: str) -> bool:
    """Every started member is named after the job's cluster (unstarted ones have no name)."""
    return all(not name or name.startswith(cluster + "-") for name in names)


def source_address(endpoint: Endpoint) -> str:
    """The address of this host on the route to ``endpoint`` (what its peers reach it at)."""
    family = socket.AF_INET6 if ":" in bind_address(endpoint.host) else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:  # connect() sends nothing
        probe.connect((bind_address(endpoint.host), endpoint.port))
        return str(probe.getsockname()[0])


def _wait_for_seed(endpoint: Endpoint, run_id: str, cluster: str, deadline: float) -> None:
    """Wait until the job's etcd answers at ``endpoint`` (host0's agent starts it)."""
    began = time.monotonic()
    reported = began
    while True:
        names = _cluster_at(endpoint, timeout=1.0)
        if names is not None:
            if _ours(names, cluster):
                return
            raise RendezvousConnectionError(
                f"run {run_id!r}: the etcd at {endpoint.url} is not this job's (its members "
                f"{sorted(names)} are not named {cluster}-...: another job or user serves the "
                "port); pass another port in --rdzv-endpoint, or host0:0 for one derived "
                "from the run id"
            )
        now = time.monotonic()
        if now >= deadline:
            raise RendezvousConnectionError(
                f"run {run_id!r}: no etcd answers at {endpoint.url} after {now - began:.0f}s: "
                f"the agent on {endpoint.host} starts the job's embedded etcd there; start "
                "it (or check that this host reaches that address)"
            )
        if now - reported >= _WAIT_REPORT_INTERVAL:
            reported = now
            _agent_log.warning(
                "Run %r: waiting for the agent on %s to start the job's etcd at %s "
                "(%.0fs, giving up after %.0fs)",
                run_id,
                endpoint.host,
                endpoint.url,
                now - began,
                deadline - began,
            )
        time.sleep(0.2)


def ensure_replicated(endpoint: Endpoint, run_id: str, members: int, timeout: float) -> list[str]:
    """Make sure the job's replicated etcd runs; the client URLs of its members.

    On ``endpoint``'s host, the agent that wins the per-host lock starts a one-member
    etcd at ``endpoint``. Everywhere else the agents wait (at most ``timeout`` seconds,
    saying so every few seconds) until that etcd answers with members named after the
    job (never another job's etcd on the port); then the agent that wins its host's
    lock runs an :class:`EtcdReplica` that adds this host as a member while the cluster
    has fewer than ``members``, and replaces dead members. The replica leaves (its
    member removed, its data deleted) when this process exits.
    """
    if endpoint.scheme != "http":
        raise RendezvousConnectionError(
            f"the embedded etcd only serves plain http, not {endpoint.url}: start etcd "
            "yourself for TLS and pass it with --rdzv-endpoint, or use protocol=http"
        )
    cluster = cluster_name(run_id)
    key = (run_id, endpoint.host, endpoint.port)
    deadline = time.monotonic() + timeout
    seed_host = is_local_host(endpoint.host)
    with _hosted_lock:
        held = _replicas.get(key)
        if held is not None:
            return held[0].endpoints or [endpoint.url]
        fd = _try_lock(_lock_path(endpoint, run_id + ".replica"))
        if fd is not None and seed_host:
            try:
                names = _cluster_at(endpoint, timeout=0.5)
                if names is not None and not _ours(names, cluster):
                    raise RendezvousConnectionError(
                        f"run {run_id!r}: cannot host the job's etcd at {endpoint.url}: an "
                        f"etcd this job did not start answers there (members {sorted(names)}). "
                        "Pass another port in --rdzv-endpoint, or host0:0 for one derived "
                        "from the run id"
                    )
                replica = _replica(cluster, bind_address(endpoint.host), endpoint, members)
                if names is None:
                    replica.seed(timeout=max(deadline - time.monotonic(), 5.0))
                    _announce(run_id, endpoint, members, replica, seeded=True)
                else:  # our cluster already runs here (this host's member is back)
                    replica.join([endpoint.url])
                _register(key, replica, fd)
                return replica.endpoints or [endpoint.url]
            except EtcdServerError as exc:
                _unlock(fd)
                raise RendezvousConnectionError(
                    f"run {run_id!r}: no etcd answers at {endpoint.url} and hosting one "
                    f"there failed: {exc}"
                ) from exc
            except BaseException:
                _unlock(fd)
                raise
    try:
        _wait_for_seed(endpoint, run_id, cluster, deadline)
        if fd is not None:
            replica = _replica(cluster, source_address(endpoint), endpoint, members)
            replica.join([endpoint.url])
            with _hosted_lock:
                _register(key, replica, fd)
            _announce(run_id, endpoint, members, replica, seeded=False)
    except BaseException:
        if fd is not None:
            _unlock(fd)
        raise
    with EtcdClient([endpoint.url], timeout=2.0) as client:
        with contextlib.suppress(EtcdClientError):  # the clients' autosync learns them
            client.sync_endpoints()
        return list(client.endpoints)


def _replica(cluster: str, address: str, endpoint: Endpoint, members: int) -> EtcdReplica:
    return EtcdReplica(cluster=cluster, address=address, port=endpoint.port, size=members)


@functools.cache
def _stop_replicas_at_exit() -> None:
    # After the servers' own exit backstop, so this runs first (atexit is LIFO): the
    # members leave, then stop, never stopped under a manager that would take their
    # exit for a failure.
    install_exit_handler()
    atexit.register(stop_embedded)


def _register(key: tuple[str, str, int], replica: EtcdReplica, fd: int) -> None:
    """Called with ``_hosted_lock`` held."""
    _stop_replicas_at_exit()
    _replicas[key] = (replica, fd)


def _announce(
    run_id: str, endpoint: Endpoint, members: int, replica: EtcdReplica, *, seeded: bool
) -> None:
    if seeded:
        _agent_log.warning(
            "Run %r: this agent (pid %d) started the job's etcd at %s; agents on other "
            "hosts join it until it has %d member%s (--rdzv-conf members=%d)%s",
            run_id,
            os.getpid(),
            endpoint.url,
            members,
            "" if members == 1 else "s",
            members,
            ": a single point of failure, as c10d's store host" if members == 1 else "",
        )
    else:
        log.info(
            "run %r: this agent (pid %d) manages this host's member of the job's etcd (%s)",
            run_id,
            os.getpid(),
            replica,
        )


__all__ = [
    "bind_address",
    "cluster_name",
    "ensure_local_etcd",
    "ensure_replicated",
    "etcd_answers",
    "host_alive",
    "is_hosting",
    "is_local_host",
    "stop_embedded",
]
