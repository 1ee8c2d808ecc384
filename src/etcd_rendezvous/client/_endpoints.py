"""Endpoint parsing: ``host:port``, ``http(s)://host:port``, ``[v6]:port``, comma lists.

Strict on purpose: a malformed endpoint fails here, at once, with a message that
names the endpoint and the bad part, never later as "no etcd answers" or as a
urllib3 error. It rejects at least everything torch's ``parse_rendezvous_endpoint``
rejects (``~``, ``host :1``, ``host:``, ``a b:1``, ports above 65535), and also:
an unknown scheme, a path/query, credentials (``user:pass@``: give them as separate
options), an IPv6 address without brackets, port 0 (unless the caller allows it),
and hosts with characters no host name has (spaces, NUL, ``~``, ...).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

#: What a host name may hold: ASCII letters, digits, '-', '_' (seen in container and
#: docker-compose names; torch accepts it too) and '.'.
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.-]+")
_PORT = re.compile(r"[0-9]{1,5}")

#: The default advice for ``user:pass@`` in an endpoint (the client's arguments).
CREDENTIALS_HINT = "pass username= and password= instead"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One etcd client URL."""

    scheme: str
    host: str
    port: int

    @property
    def netloc(self) -> str:
        """``host:port``, with IPv6 hosts in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    def __str__(self) -> str:
        return self.url


class EndpointError(ValueError):
    """A malformed endpoint. ``endpoint`` is the bad item, ``problem`` what is wrong."""

    def __init__(self, endpoint: str, problem: str) -> None:
        super().__init__(f"endpoint {endpoint!r}: {problem}")
        self.endpoint = endpoint
        self.problem = problem


def _check_host(host: str) -> str:
    """The problem with an unbracketed ``host`` ('' when it is fine)."""
    if not host:
        return "no host before the port"
    if not _NAME_CHARS.fullmatch(host):
        bad = next(c for c in host if not _NAME_CHARS.fullmatch(c))
        return (
            f"the host {host!r} contains {bad!r}; a host is a DNS name (letters, digits, "
            "'-', '_', '.'), an IPv4 address, or an IPv6 address in brackets"
        )
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"the host {host!r} is not a valid IPv4 address"
        return ""
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if any(not label for label in labels):
        return f"the host {host!r} has an empty label ('..' or a leading '.')"
    if any(label.startswith("-") or label.endswith("-") for label in labels):
        return f"the host {host!r} has a label that starts or ends with '-'"
    return ""


def _check_port(port: str, *, allow_port_zero: bool) -> tuple[int | None, str]:
    """(port, '') or (None, the problem)."""
    if not port:
        return None, "the port after ':' is empty (give a number from 1 to 65535, or leave out ':')"
    if not _PORT.fullmatch(port) or int(port) > 65535:
        return None, f"the port {port!r} is not a number from 1 to 65535"
    number = int(port)
    if number == 0 and not allow_port_zero:
        return None, "port 0 is not a port etcd can listen on; give its client port"
    return number, ""


def parse_endpoint(
    text: str,
    *,
    default_scheme: str = "http",
    default_port: int = 2379,
    allow_port_zero: bool = False,
    credentials_hint: str = CREDENTIALS_HINT,
) -> Endpoint:
    """Parse one endpoint; raise :class:`EndpointError` saying what is wrong with it."""
    raw = text
    text = text.strip()
    if not text:
        raise EndpointError(raw, "empty")
    scheme = default_scheme
    rest = text
    if "://" in text:
        scheme, rest = text.split("://", 1)
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise EndpointError(raw, f"the scheme must be http or https, got {scheme!r}")
    if rest.endswith("/"):
        rest = rest[:-1]
    if "@" in rest:
        raise EndpointError(
            raw, f"credentials in the endpoint ('...@') are not used; {credentials_hint}"
        )
    if any(c in rest for c in "/?#"):
        raise EndpointError(raw, "expected host:port, got a path, query or fragment")
    port_text: str | None
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise EndpointError(raw, "an IPv6 address opened with '[' has no closing ']'")
        host = rest[1:close]
        after = rest[close + 1 :]
        if after and not after.startswith(":"):
            raise EndpointError(raw, f"unexpected {after!r} after ']' (expected ':port')")
        port_text = after[1:] if after else None
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise EndpointError(raw, f"{host!r} in brackets is not an IPv6 address") from None
        if address.version != 6:
            raise EndpointError(raw, f"brackets are for IPv6 addresses; write {host} without them")
    else:
        if rest.count(":") > 1:
            raise EndpointError(
                raw,
                "more than one ':'; put an IPv6 address in brackets, e.g. [::1]:2379 "
                "or http://[fe80::1]:2379",
            )
        host, sep, port_part = rest.partition(":")
        port_text = port_part if sep else None
        problem = _check_host(host)
        if problem:
            raise EndpointError(raw, problem)
    port = default_port
    if port_text is not None:
        number, problem = _check_port(port_text, allow_port_zero=allow_port_zero)
        if number is None:
            raise EndpointError(raw, problem)
        port = number
    return Endpoint(scheme, host if ":" in host else host.lower(), port)


_TLS_FILES = {
    "ca_cert": "the CA certificate that signs etcd's certificate",
    "cert": "the client certificate",
    "key": "the client certificate's private key",
}


def check_tls_files(**paths: str | None) -> None:
    """Raise ``ValueError`` for a TLS file (``ca_cert=``, ``cert=``, ``key=``) that is not a file.

    Checked up front, whatever the scheme: with a plain-http endpoint a missing file
    would otherwise be silently unused, and with https fail only at the first request.
    """
    for name, path in paths.items():
        if path is None:
            continue
        what = _TLS_FILES.get(name, "a TLS file")
        if not os.path.exists(path):
            raise ValueError(f"{name}={path!r}: no such file ({what})")
        if not os.path.isfile(path):
            raise ValueError(f"{name}={path!r}: not a file ({what})")


def parse_endpoints(
    endpoints: str | Sequence[str],
    *,
    default_scheme: str = "http",
    default_port: int = 2379,
    allow_port_zero: bool = False,
    credentials_hint: str = CREDENTIALS_HINT,
) -> list[Endpoint]:
    """Parse ``"host:port"``, ``"http(s)://host:port"``, ``"[::1]:2379"`` or a comma list.

    Duplicates are dropped, the order kept. Raises :class:`EndpointError` (a
    ``ValueError``) for a malformed item, ``ValueError`` for an empty list.
    """
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out: list[Endpoint] = []
    for raw in items:
        if not isinstance(raw, str):
            raise TypeError(f"an endpoint must be a str, got {type(raw).__name__}")
        if not raw.strip():
            continue
        ep = parse_endpoint(
            raw,
            default_scheme=default_scheme,
            default_port=default_port,
            allow_port_zero=allow_port_zero,
            credentials_hint=credentials_hint,
        )
        if ep not in out:
            out.append(ep)
    if not out:
        raise ValueError(f"no etcd endpoint given (got {endpoints!r})")
    return out


__all__ = [
    "CREDENTIALS_HINT",
    "Endpoint",
    "EndpointError",
    "check_tls_files",
    "parse_endpoint",
    "parse_endpoints",
]
