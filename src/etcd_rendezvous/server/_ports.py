"""Free ports and URL formatting for loopback etcd members."""

from __future__ import annotations

import contextlib
import json
import socket
import warnings

import urllib3

from etcd_rendezvous.errors import EtcdServerError

BIND_ERROR_MARKERS = ("address already in use", "bind: ")


class NoFreePortError(EtcdServerError, RuntimeError):
    """No address of the host could be bound (torch's ``find_free_port`` raises RuntimeError)."""


def find_free_port(host: str = "127.0.0.1") -> socket.socket:
    """Return a listening socket bound to a free port on ``host`` (torch's signature).

    The port is "reserved" while the socket is open; close it just before handing
    the port to the program that binds it. Another process may still take the port
    in between: :class:`EtcdServer` notices that and retries with fresh ports.

    As torch's, every address ``host`` resolves to is tried in turn: one whose socket
    cannot be created (an address family the kernel lacks) or bound is skipped.

    Raises:
        NoFreePortError: no address could be bound (a ``RuntimeError``, as torch's).

    Usage::

        sock = find_free_port()
        port = sock.getsockname()[1]
        sock.close()
    """
    try:
        infos = socket.getaddrinfo(host.strip("[]"), 0, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise NoFreePortError(f"could not bind a free port on {host!r}: {exc}") from exc
    failures: list[str] = []
    last_error: OSError | None = None
    for family, type_, proto, _, sockaddr in infos:
        try:
            sock = socket.socket(family, type_, proto)
        except OSError as exc:
            failures.append(f"{sockaddr[0]}: socket(): {exc}")
            last_error = exc
            continue
        try:
            sock.bind(sockaddr)
            sock.listen(0)
        except OSError as exc:
            sock.close()
            failures.append(f"{sockaddr[0]}: {exc}")
            last_error = exc
            continue
        return sock
    raise NoFreePortError(
        f"could not bind a free port on {host!r}: " + ("; ".join(failures) or "no address")
    ) from last_error


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports on ``host`` (all reserved at once, then released)."""
    socks = [find_free_port(host) for _ in range(count)]
    try:
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """True if something accepts TCP connections on host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host.strip("[]"), port), timeout):
        return True
    return False


def describe_listener(host: str, port: int, timeout: float = 1.0) -> str:
    """What listens on host:port, for "port in use" errors: "an etcd (3.5.1)", "an HTTP
    server that is not etcd (HTTP 404, text/html)", "a TLS server (an etcd on https?)"...

    Asks ``GET /version`` over http, then over https without verifying the certificate
    (only to name it). Never raises; every wait is bounded by ``timeout``.
    """
    name = host.strip("[]")
    for scheme in ("http", "https"):
        pool: urllib3.HTTPConnectionPool
        if scheme == "http":
            pool = urllib3.HTTPConnectionPool(name, port, maxsize=1, retries=False)
        else:
            pool = urllib3.HTTPSConnectionPool(
                name, port, maxsize=1, retries=False, cert_reqs="CERT_NONE", assert_hostname=False
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                response = pool.request(
                    "GET", "/version", timeout=urllib3.Timeout(connect=timeout, read=timeout)
                )
        except urllib3.exceptions.HTTPError:
            continue
        finally:
            pool.close()
        try:
            version = json.loads(response.data).get("etcdserver")
        except (ValueError, AttributeError):
            version = None
        over = "" if scheme == "http" else " on https"
        if version:
            return f"an etcd ({version}){over}"
        kind = response.headers.get("Content-Type", "").split(";")[0].strip()
        detail = f"HTTP {response.status}" + (f", {kind}" if kind else "")
        return f"an HTTP server that is not etcd{over} ({detail})"
    return "a program that does not answer HTTP or HTTPS"


def format_host(host: str) -> str:
    """``::1`` -> ``[::1]``; names and IPv4 addresses unchanged."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def http_url(host: str, port: int, scheme: str = "http") -> str:
    """``http://host:port`` (or ``scheme://``), IPv6 hosts in brackets."""
    return f"{scheme}://{format_host(host)}:{port}"


def looks_like_bind_error(log_tail: str) -> bool:
    text = log_tail.lower()
    return all(marker in text for marker in BIND_ERROR_MARKERS)
