"""Liveness probes: is the process behind a silent member still there? (issue 5)

A SIGKILLed node's lease keeps its key for up to ``lease_ttl`` seconds; until then the
others wait for it. But the kernel knows at once that the process is gone: the ports it
listened on refuse connections. So every process hosting nodes listens on one TCP port
(:func:`listener`) and answers each connection with a random token of its own; a node
publishes ``token@host:port`` in its key (``NodeRecord.probe``). When members of a round
rejoin and others have not yet, the leader probes the late ones (:class:`Prober`):

* a connection **refused** at an address where this prober earlier received the same
  token: the process is gone (its listener died with it). The leader revokes that
  node's lease, and the next round forms at once instead of a TTL later;
* anything else -- the token received (alive), a timeout (a host down or a partition),
  a refused connection at an address never verified (a firewall, a host name that
  means something else here, e.g. ``localhost`` on another machine), a stranger's
  token (the port was reused) -- is no verdict: the lease decides, as without probes.

A paused process (SIGSTOP, a GC pause) is never taken for dead: its kernel still
accepts connections on the listening socket; it sends no token, so the probe gives no
verdict. Only a process whose sockets are closed -- dead -- is evicted early.

torch's own collectives need every node to reach every other on arbitrary ports, so a
training cluster where these probes cannot connect is rare; then probes just never give
a verdict. ``probe=False`` on :class:`~etcd_rendezvous.rendezvous.Rendezvous` turns
them off.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import ipaddress
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 1.0
"""Seconds to wait for a probe's connection (and then for the token)."""

VERIFIED_MAX = 65536
"""Addresses a prober remembers as verified (oldest forgotten first)."""


class Verdict(enum.Enum):
    ALIVE = "alive"  # the right token came back
    GONE = "gone"  # refused at an address verified before: the process is dead
    UNKNOWN = "unknown"  # no verdict: let the lease decide


def format_probe(token: str, host: str, port: int) -> str:
    """``token@host:port``, with an IPv6 host in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{token}@{host}:{port}"


def parse_probe(probe: str) -> tuple[str, str, int]:
    """``(token, host, port)`` of ``token@host:port``; ValueError if malformed."""
    token, sep, address = probe.partition("@")
    host, colon, port = address.rpartition(":")
    if not (sep and colon and token and host and port.isdigit()):
        raise ValueError(f"malformed probe address {probe!r} (want token@host:port)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"malformed probe address {probe!r}: port out of range")
    return token, host, number


class Listener:
    """The process's probe port: accepts, sends the token, closes. One per process and
    bind address (see :func:`listener`).

    ``bind`` is the IP address to listen on; ``None`` listens on every interface.
    """

    def __init__(self, bind: str | None = None) -> None:
        self.token = secrets.token_hex(16)
        self._sock = _listening_socket() if bind is None else _bound_socket(bind)
        self.bind = bind
        self.port: int = self._sock.getsockname()[1]
        self._closed = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, name=f"rendezvous-probe :{self.port}", daemon=True
        )
        self._thread.start()

    def address(self, host: str) -> str:
        return format_probe(self.token, host, self.port)

    def close(self) -> None:
        """Stop answering (probes of this process are then refused)."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _serve(self) -> None:
        payload = self.token.encode("ascii")
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                continue
            with conn, contextlib.suppress(OSError):
                conn.settimeout(CONNECT_TIMEOUT)
                conn.sendall(payload)


def _bound_socket(bind: str) -> socket.socket:
    """A TCP socket listening on the IP address ``bind`` only."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((bind, 0))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _listening_socket() -> socket.socket:
    """A TCP socket listening on every address (IPv6 dual-stack when available)."""
    if socket.has_ipv6:
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind(("::", 0))
                sock.listen(128)
                return sock
            except OSError:
                sock.close()
        except OSError:
            pass
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("0.0.0.0", 0))
    sock.listen(128)
    return sock


def bind_address(host: str | None) -> str | None:
    """Where the listener for nodes published as ``host`` listens (``None``: everywhere).

    Others reach the process at ``host``, so an IP address of this machine is bound
    alone: a loopback one (a single-host job) is then unreachable from the network,
    which is the point. ``localhost`` means ``127.0.0.1``. A host name, or an address
    this machine does not have (behind NAT), needs every interface.
    """
    if host is None:
        return None
    name = host.strip("[]")
    if name.lower() == "localhost":
        return "127.0.0.1"
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return None  # a name: it may resolve to any of this machine's addresses
    if ip.is_unspecified or ip.is_multicast:
        return None
    return str(ip)


_lock = threading.Lock()


def listener(host: str | None = None) -> Listener:
    """This process's probe listener for nodes published as ``host`` (started on first
    use, again in a forked child).

    It listens where :func:`bind_address` says; when that address cannot be bound
    (not this machine's), on every interface.

    Raises OSError when no TCP port can be listened on.
    """
    bind = bind_address(host)
    with _lock:
        try:
            return _listener_of(os.getpid(), bind)
        except OSError:
            if bind is None:
                raise
            log.debug("cannot listen for probes on %s; listening on every interface", bind)
            return _listener_of(os.getpid(), None)


@functools.cache
def _listener_of(pid: int, bind: str | None) -> Listener:
    return Listener(bind)


class Prober:
    """Probes other processes' listeners; remembers the addresses that answered.

    :meth:`learn` verifies an address in the background (the leader calls it for every
    node it sees); :meth:`check` gives a :class:`Verdict` now; :meth:`submit` runs a
    check off the caller's thread. One per process (:func:`prober`).
    """

    def __init__(self, workers: int = 4, timeout: float = CONNECT_TIMEOUT) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._verified: dict[str, None] = {}  # probe strings that answered with their token
        self._learning: set[str] = set()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="rendezvous-probe")

    def verified(self, probe: str) -> bool:
        with self._lock:
            return probe in self._verified

    def learn(self, probe: str) -> None:
        """Verify ``probe`` in the background unless done or under way."""
        with self._lock:
            if probe in self._verified or probe in self._learning:
                return
            self._learning.add(probe)

        def run() -> None:
            try:
                self.check(probe)
            finally:
                with self._lock:
                    self._learning.discard(probe)

        self._pool.submit(run)

    def submit(self, probe: str, then: Callable[[Verdict], None]) -> None:
        """Check ``probe`` on a pool thread and call ``then(verdict)`` there."""

        def run() -> None:
            try:
                then(self.check(probe))
            except Exception:
                log.exception("probe of %s failed", probe)

        self._pool.submit(run)

    def check(self, probe: str) -> Verdict:
        try:
            token, host, port = parse_probe(probe)
        except ValueError:
            return Verdict.UNKNOWN
        try:
            conn = socket.create_connection((host, port), timeout=self.timeout)
        except ConnectionRefusedError:
            return Verdict.GONE if self.verified(probe) else Verdict.UNKNOWN
        except OSError:
            return Verdict.UNKNOWN  # timeout, unreachable, unknown host: no verdict
        with conn:
            got = b""
            want = len(token)
            try:
                while len(got) < want:
                    chunk = conn.recv(want - len(got))
                    if not chunk:
                        break
                    got += chunk
            except OSError:
                return Verdict.UNKNOWN  # accepted by the kernel, no answer: paused?
        if got.decode("ascii", "replace") != token:
            return Verdict.UNKNOWN  # someone else listens there now
        with self._lock:
            self._verified[probe] = None
            while len(self._verified) > VERIFIED_MAX:
                del self._verified[next(iter(self._verified))]
        return Verdict.ALIVE


def prober() -> Prober:
    """This process's prober, created on first use (again in a forked child)."""
    with _lock:
        return _prober_of(os.getpid())


@functools.cache
def _prober_of(pid: int) -> Prober:
    return Prober()
