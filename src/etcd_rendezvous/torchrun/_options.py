"""Parse and check ``--rdzv-endpoint`` and ``--rdzv-conf`` for the ``etcd-v3`` backend.

Functions of torch's ``RendezvousParameters`` that talk to no one (they only
check that the TLS files exist), so every mistake is reported (naming the option
and the value) before any node waits.
"""

from __future__ import annotations

import ipaddress
import os
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from torch.distributed.elastic.rendezvous.api import RendezvousParameters

from etcd_rendezvous.client import Endpoint, parse_endpoints
from etcd_rendezvous.client._endpoints import EndpointError
from etcd_rendezvous.torchrun.backend import DEFAULT_KEY_PREFIX

DEFAULT_PORT = 2379
DEFAULT_READ_TIMEOUT = 60
#: Per-request timeout cap: a member that stops answering is left after this.
MAX_REQUEST_TIMEOUT = 10.0

#: "localhost:0" means "host an etcd for this run": the port is derived from the
#: run id (so every agent of the run on this machine agrees on it) in this range,
#: below Linux's default ephemeral range.
EMBEDDED_PORT_BASE = 20000
EMBEDDED_PORT_SPAN = 12000

_DAY = 86400

#: Voting etcd members a multi-host embedded job forms by default (survives one host).
DEFAULT_MEMBERS = 3

#: Every integer option and its range (inclusive). Durations in seconds: each
#: bound is far beyond any sensible value, and keeps a typo (or ``10**18``) from
#: overflowing a ``timedelta`` or being handed to etcd as a lease TTL.
INT_RANGES: dict[str, tuple[int, int]] = {
    "read_timeout": (1, _DAY),
    "join_timeout": (1, 7 * _DAY),
    "last_call_timeout": (1, _DAY),
    "close_timeout": (1, _DAY),
    "heartbeat": (1, 3600),
    "heartbeat_timeout": (1, 3600),
    "keep_alive_interval": (1, 3600),
    "keep_alive_max_attempt": (1, 1000),
    "timeout": (1, 365 * _DAY),
    "ttl": (1, 365 * _DAY),
    "members": (1, 5),
}
_INT_OPTIONS = tuple(INT_RANGES)
#: The TLS files: each must exist (even with a plain-http endpoint, where it would
#: otherwise be silently unused).
_FILE_OPTIONS = {
    "ca_cert": "the CA certificate that signs etcd's certificate",
    "ssl_cert": "the client certificate",
    "ssl_cert_key": "the client certificate's private key",
}
_STR_OPTIONS = (
    "protocol",
    "ssl_cert",
    "ssl_cert_key",
    "ca_cert",
    "username",
    "password",
    "key_prefix",
)
_BOOL_OPTIONS = ("embedded",)

#: Every option ``--rdzv-conf`` may carry for ``etcd-v3``. ``timeout`` is added by
#: torch's launcher itself (``--rdzv-timeout``, used by the legacy ``etcd``
#: backend only) and is accepted and ignored; ``heartbeat_timeout`` is the
#: name torch's ``create_handler`` actually reads for ``heartbeat``.
KNOWN_OPTIONS = frozenset(_INT_OPTIONS + _STR_OPTIONS + _BOOL_OPTIONS)


@dataclass(frozen=True)
class EtcdV3Options:
    """The checked configuration of one ``etcd-v3`` rendezvous handler."""

    endpoints: list[Endpoint]
    #: The endpoint was left out (and ``ETCD_ENDPOINTS`` is unset), was ``localhost:0``,
    #: or ``embedded=true`` was given: the agents on this machine host the job's etcd at
    #: ``endpoints[0]`` (see ``_embedded``). An explicit endpoint is used as given.
    may_embed: bool
    read_timeout: int
    protocol: str
    ssl_cert: str | None
    ssl_cert_key: str | None
    ca_cert: str | None
    username: str | None
    password: str | None
    key_prefix: str
    ttl: int | None
    join_timeout: timedelta | None
    last_call_timeout: timedelta | None
    close_timeout: timedelta | None
    heartbeat_timeout: timedelta | None
    keep_alive_interval: int
    keep_alive_max_attempt: int
    #: How many voting etcd members the agents of a multi-host embedded job form (1, 3
    #: or 5): see :attr:`replicated`.
    members: int = DEFAULT_MEMBERS

    @property
    def replicated(self) -> bool:
        """The embedded etcd spans hosts: the endpoint names a host other than loopback
        (``host0:PORT`` with ``embedded=true``, or ``host0:0``). The agent on ``host0``
        starts it; agents on other hosts wait for it, then join it as members until it
        has :attr:`members` (see ``_embedded.ensure_replicated``)."""
        if not self.may_embed:
            return False
        host = self.endpoints[0].host
        if host == "localhost":
            return False
        try:
            return not ipaddress.ip_address(host).is_loopback
        except ValueError:
            return True

    @property
    def sidecar(self) -> bool:
        """The embedded etcd is this machine's sidecar: an agent here hosts it at a
        loopback endpoint (``localhost:0``, none given, or ``embedded=true``)."""
        return self.may_embed and not self.replicated

    @property
    def request_timeout(self) -> float:
        """Timeout of one etcd request (``read_timeout``, at most 10 s)."""
        return float(min(self.read_timeout, MAX_REQUEST_TIMEOUT))

    def endpoint_list(self) -> str:
        return ",".join(ep.url for ep in self.endpoints)


class OptionError(ValueError):
    """A ``--rdzv-endpoint`` or ``--rdzv-conf`` value is wrong (the message names it)."""


def bounded_int(key: str, value: Any, minimum: int, maximum: int) -> int:
    """``value`` (a ``--rdzv-conf`` string or int) as an int in [minimum, maximum]."""
    unit = "attempts" if key.endswith("attempt") else "seconds"
    if isinstance(value, bool):
        raise OptionError(f"--rdzv-conf {key}={value!r}: expected an integer number of {unit}")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise OptionError(
            f"--rdzv-conf {key}={value!r}: expected an integer number of {unit}"
        ) from None
    if number < minimum:
        raise OptionError(f"--rdzv-conf {key}={value!r}: must be at least {minimum}")
    if number > maximum:
        raise OptionError(
            f"--rdzv-conf {key}={value!r}: must be from {minimum} to {maximum} {unit}"
        )
    return number


def _int(params: RendezvousParameters, key: str) -> int | None:
    value: Any = params.get(key)
    if value is None:
        return None
    minimum, maximum = INT_RANGES[key]
    return bounded_int(key, value, minimum, maximum)


def _check_file(key: str, path: str | None) -> None:
    if path is None:
        return
    if not os.path.exists(path):
        raise OptionError(f"--rdzv-conf {key}={path!r}: no such file ({_FILE_OPTIONS[key]})")
    if not os.path.isfile(path):
        raise OptionError(f"--rdzv-conf {key}={path!r}: not a file ({_FILE_OPTIONS[key]})")


def _str(params: RendezvousParameters, key: str) -> str | None:
    value: Any = params.get(key)
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        raise OptionError(f"--rdzv-conf {key}: the value is empty")
    return text


def _seconds(value: int | None) -> timedelta | None:
    return None if value is None else timedelta(seconds=value)


def embedded_port(run_id: str) -> int:
    """The port ``localhost:0`` stands for: derived from the run id, the same on every agent."""
    return EMBEDDED_PORT_BASE + zlib.crc32(run_id.encode("utf-8")) % EMBEDDED_PORT_SPAN


def parse_options(params: RendezvousParameters) -> EtcdV3Options:
    """Check every option of ``params``; raise :class:`OptionError` naming the first bad one."""
    unknown = sorted(k for k in params.config if k not in KNOWN_OPTIONS and k != "rank")
    if unknown:
        raise OptionError(
            f"--rdzv-conf: unknown option(s) {', '.join(unknown)} for --rdzv-backend=etcd-v3; "
            f"known options: {', '.join(sorted(KNOWN_OPTIONS - {'timeout'}))}"
        )
    ints = {key: _int(params, key) for key in _INT_OPTIONS}
    strs = {key: _str(params, key) for key in _STR_OPTIONS}
    embedded = params.get_as_bool("embedded") if "embedded" in params.config else None

    tls_files = [key for key in ("ca_cert", "ssl_cert") if strs[key]]
    # TLS files mean TLS: a bare host:port is then https (it used to be http, silently
    # leaving the files unused).
    protocol = (strs["protocol"] or ("https" if tls_files else "http")).lower()
    if protocol not in ("http", "https"):
        raise OptionError(f"--rdzv-conf protocol={strs['protocol']!r}: must be http or https")
    if strs["ssl_cert_key"] and not strs["ssl_cert"]:
        raise OptionError("--rdzv-conf ssl_cert_key is given without ssl_cert")
    for key in _FILE_OPTIONS:
        _check_file(key, strs[key])
    if (strs["username"] is None) != (strs["password"] is None):
        raise OptionError("--rdzv-conf username and password must be given together")
    key_prefix = strs["key_prefix"] or DEFAULT_KEY_PREFIX
    if not key_prefix.startswith("/"):
        raise OptionError(f"--rdzv-conf key_prefix={key_prefix!r}: must start with '/'")
    if ints["heartbeat"] is not None and ints["heartbeat_timeout"] is not None:
        raise OptionError("--rdzv-conf: give heartbeat or heartbeat_timeout, not both")

    endpoints, may_embed = _parse_endpoint(params.endpoint, params.run_id, protocol)
    plain = [ep.url for ep in endpoints if ep.scheme == "http"]
    if tls_files and plain:
        raise OptionError(
            f"--rdzv-conf {' and '.join(tls_files)} given, but etcd is reached over plain "
            f"http at {', '.join(plain)} (where they would go unused): give https:// "
            "endpoints (or bare host:port), or leave the TLS files out"
        )
    if embedded is not None:
        # An explicit endpoint is never replaced by an embedded etcd unless asked for.
        may_embed = embedded and len(endpoints) == 1

    return EtcdV3Options(
        endpoints=endpoints,
        may_embed=may_embed,
        read_timeout=ints["read_timeout"] or DEFAULT_READ_TIMEOUT,
        protocol=protocol,
        ssl_cert=strs["ssl_cert"],
        ssl_cert_key=strs["ssl_cert_key"],
        ca_cert=strs["ca_cert"],
        username=strs["username"],
        password=strs["password"],
        key_prefix=key_prefix,
        ttl=ints["ttl"],
        join_timeout=_seconds(ints["join_timeout"]),
        last_call_timeout=_seconds(ints["last_call_timeout"]),
        close_timeout=_seconds(ints["close_timeout"]),
        heartbeat_timeout=_seconds(ints["heartbeat"] or ints["heartbeat_timeout"]),
        keep_alive_interval=ints["keep_alive_interval"] or 5,
        keep_alive_max_attempt=ints["keep_alive_max_attempt"] or 3,
        members=_members(ints["members"]),
    )


def _members(value: int | None) -> int:
    if value is None:
        return DEFAULT_MEMBERS
    if value % 2 == 0:
        raise OptionError(
            f"--rdzv-conf members={value}: use 1, 3 or 5 (an even number of etcd members "
            "tolerates no more failures than one fewer, and costs a member more)"
        )
    return value


#: Where an omitted ``--rdzv-endpoint`` is taken from (as the CLI's ``--endpoints``).
ENDPOINTS_ENV = "ETCD_ENDPOINTS"


def _parse_endpoint(
    endpoint: str | None, run_id: str, protocol: str
) -> tuple[list[Endpoint], bool]:
    text = (endpoint or "").strip()
    if not text:
        from_env = os.environ.get(ENDPOINTS_ENV, "").strip()
        if from_env:
            try:
                endpoints = parse_endpoints(
                    from_env, default_scheme=protocol, default_port=DEFAULT_PORT
                )
            except (ValueError, TypeError) as exc:
                raise OptionError(f"${ENDPOINTS_ENV} {from_env!r}: {exc}") from exc
            return endpoints, False
        # The job's own embedded etcd, on the port its run id stands for.
        return [Endpoint(protocol, "127.0.0.1", embedded_port(run_id))], True
    for item in text.split(","):
        # The client accepts "http://host:2379/"; torch's parser (and so --rdzv-endpoint)
        # takes host:port only, with no path, not even a trailing slash.
        if "/" in item.strip().partition("://")[2 if "://" in item else 0]:
            raise OptionError(
                f"--rdzv-endpoint {text!r}: {item.strip()!r} has a path ('/'); "
                "give host:port (or scheme://host:port) only"
            )
    try:
        endpoints = parse_endpoints(
            text,
            default_scheme=protocol,
            default_port=DEFAULT_PORT,
            allow_port_zero=True,
            credentials_hint="give them as --rdzv-conf username=...,password=...",
        )
    except EndpointError as exc:
        where = "" if exc.endpoint.strip() == text else f" (in {exc.endpoint.strip()!r})"
        raise OptionError(f"--rdzv-endpoint {text!r}{where}: {exc.problem}") from exc
    except (ValueError, TypeError) as exc:
        raise OptionError(f"--rdzv-endpoint {text!r}: {exc}") from exc
    if len(endpoints) > 1:
        if any(ep.port == 0 for ep in endpoints):
            raise OptionError(
                f"--rdzv-endpoint {text!r}: port 0 (host an etcd for this run) only works "
                "with a single endpoint, e.g. localhost:0"
            )
        return endpoints, False
    ep = endpoints[0]
    if ep.port == 0:
        return [Endpoint(ep.scheme, ep.host, embedded_port(run_id))], True
    return [ep], False


__all__ = [
    "DEFAULT_PORT",
    "INT_RANGES",
    "KNOWN_OPTIONS",
    "EtcdV3Options",
    "OptionError",
    "bounded_int",
    "embedded_port",
    "parse_options",
]
