"""HTTP transport to etcd's v3 JSON gateway: endpoints, failover, TLS, auth, errors.

Everything that touches the network for unary requests goes through
:meth:`Transport.request`, and every gateway error is translated to our
exceptions by :func:`translate_error`, so the rules live in one place:

* a request that never left (connection refused, connect timeout, TLS
  handshake failure) moves on to the next endpoint;
* a request that may have reached etcd (read timeout, connection dropped
  while waiting for the reply) is retried elsewhere only when it is
  idempotent (reads, keep-alives, status); for a write it raises an error
  saying the outcome is unknown;
* ``etcdserver: no leader`` and friends (the request was not applied) move on
  to the next endpoint, even for writes;
* an invalid or expired auth token is refreshed once and the request sent
  again (etcd rejected it before doing anything).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from etcd_rendezvous.errors import (
    EtcdAuthError,
    EtcdClientError,
    EtcdCompactedError,
    EtcdLeaseNotFoundError,
    EtcdOutcomeUnknownError,
    EtcdRequestError,
    EtcdTimeoutError,
    EtcdUnavailableError,
)

log = logging.getLogger(__name__)

Json = dict[str, Any]

# gRPC status codes the gateway puts in its error bodies.
GRPC_CANCELLED = 1
GRPC_INVALID_ARGUMENT = 3
GRPC_DEADLINE_EXCEEDED = 4
GRPC_NOT_FOUND = 5
GRPC_PERMISSION_DENIED = 7
GRPC_FAILED_PRECONDITION = 9
GRPC_OUT_OF_RANGE = 11
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16

# Errors after which etcd certainly did not apply the request: safe to send a
# write to another member. Each is returned before the request reaches raft.
# NOT in the list: "etcdserver: server stopped" and "request timed out" (the
# proposal may have been committed), "leader changed", "transport is closing".
_NOT_APPLIED = frozenset(
    {"etcdserver: no leader", "etcdserver: not capable", "etcdserver: too many requests"}
)
# Errors that a fresh auth token fixes.
_TOKEN_ERRORS = ("invalid auth token", "revision of auth store is old", "user name is empty")

_JSON_HEADERS = {"Content-Type": "application/json"}
_dumps = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.loads


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


def parse_endpoints(
    endpoints: str | Sequence[str], *, default_scheme: str = "http", default_port: int = 2379
) -> list[Endpoint]:
    """Parse ``"host:port"``, ``"http(s)://host:port"``, ``"[::1]:2379"`` or a comma list.

    Duplicates are dropped, the order kept. Raises ``ValueError`` for an empty
    list, an unknown scheme or a bad port.
    """
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out: list[Endpoint] = []
    for raw in items:
        if not isinstance(raw, str):
            raise TypeError(f"an endpoint must be a str, got {type(raw).__name__}")
        text = raw.strip()
        if not text:
            continue
        has_scheme = "://" in text
        parts = urlsplit(text if has_scheme else f"{default_scheme}://{text}")
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"endpoint {raw!r}: scheme must be http or https, got {scheme!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"endpoint {raw!r}: expected host:port, got a path or query")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"endpoint {raw!r}: invalid port") from exc
        host = parts.hostname
        if not host:
            raise ValueError(f"endpoint {raw!r}: no host")
        ep = Endpoint(scheme, host, port if port is not None else default_port)
        if ep not in out:
            out.append(ep)
    if not out:
        raise ValueError(f"no etcd endpoint given (got {endpoints!r})")
    return out


def _describe_key(key: bytes | str | None) -> str:
    return "" if key is None else f" (key {key!r})"


def error_message(body: bytes | Json) -> str:
    """The ``message`` of a gateway error reply ('' when there is none)."""
    data: Any = body
    if isinstance(body, bytes | bytearray):
        try:
            data = _loads(body)
        except ValueError:
            return ""
    if not isinstance(data, dict):
        return ""
    return str(data.get("message") or data.get("error") or "")


def may_resend(error: EtcdClientError, message: str, *, idempotent: bool) -> bool:
    """Whether a request that got ``error`` (etcd's ``message``) may go to another endpoint.

    Reads may, on any "unavailable" error. Writes only when etcd certainly did not
    apply them (see ``_NOT_APPLIED``): never a blind retry of an unknown outcome.
    """
    if not isinstance(error, EtcdUnavailableError):
        return False
    return idempotent or message.strip() in _NOT_APPLIED


def outcome_unknown(error: EtcdClientError) -> EtcdClientError:
    """``error`` (not resent) as an :class:`EtcdOutcomeUnknownError` when a write may
    have been applied: etcd said "unavailable" for a reason other than ``_NOT_APPLIED``
    ("request timed out", "leader changed", "transport is closing", ...)."""
    if not isinstance(error, EtcdUnavailableError) or isinstance(error, EtcdOutcomeUnknownError):
        return error
    unknown = EtcdOutcomeUnknownError(
        f"{error}; the write may or may not have been applied (not retried)",
        endpoint=error.endpoint,
        key=error.key,
    )
    unknown.__cause__ = error
    return unknown


def translate_error(
    path: str,
    endpoint: str,
    status: int,
    body: bytes | Json,
    key: bytes | str | None = None,
) -> EtcdClientError:
    """Turn a gateway error reply ``{"error", "code", "message"}`` into our exception."""
    data: Any = body
    if isinstance(body, bytes | bytearray):
        try:
            data = _loads(body)
        except ValueError:
            data = None
    if not isinstance(data, dict):
        shown = bytes(body)[:200] if isinstance(body, bytes | bytearray) else body
        return EtcdRequestError(
            f"etcd {path} on {endpoint} failed with HTTP {status}{_describe_key(key)}: "
            f"{shown!r:.300}",
            endpoint=endpoint,
            key=key,
        )
    code = data.get("code")
    message = str(data.get("message") or data.get("error") or f"HTTP {status}")
    text = f"etcd {path} on {endpoint} failed{_describe_key(key)}: {message}"
    if code == GRPC_UNAVAILABLE or (code == GRPC_CANCELLED and "connection is closing" in message):
        # "grpc: the client connection is closing": the member is shutting down.
        return EtcdUnavailableError(text, endpoint=endpoint, key=key)
    if code == GRPC_DEADLINE_EXCEEDED:
        return EtcdTimeoutError(text, endpoint=endpoint, key=key)
    if code in (GRPC_UNAUTHENTICATED, GRPC_PERMISSION_DENIED) or (
        code in (GRPC_INVALID_ARGUMENT, GRPC_FAILED_PRECONDITION)
        and ("auth" in message or "user" in message or "permission" in message)
    ):
        return EtcdAuthError(text, endpoint=endpoint, key=key)
    if code == GRPC_NOT_FOUND and "lease" in message:
        return EtcdLeaseNotFoundError(text, endpoint=endpoint, key=key)
    if code == GRPC_OUT_OF_RANGE and "compacted" in message:
        return EtcdCompactedError(text, compact_revision=0, endpoint=endpoint, key=key)
    return EtcdRequestError(
        text, code=code if isinstance(code, int) else None, endpoint=endpoint, key=key
    )


class Transport:
    """Connection pools to every endpoint, the pinned endpoint, the auth token."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        timeout: float = 5.0,
        connect_timeout: float | None = None,
        ca_cert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        username: str | None = None,
        password: str | None = None,
        pool_maxsize: int = 16,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        if key is not None and cert is None:
            raise ValueError("a client key needs its certificate (cert=...)")
        secure = ca_cert is not None or cert is not None
        self.endpoints = parse_endpoints(endpoints, default_scheme="https" if secure else "http")
        self.timeout = timeout
        self.connect_timeout = min(timeout, connect_timeout or timeout)
        self._timeout = urllib3.Timeout(connect=self.connect_timeout, read=timeout)
        self._tls: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED"}
        if ca_cert is not None:
            self._tls["ca_certs"] = ca_cert
        if cert is not None:
            self._tls["cert_file"] = cert
        if key is not None:
            self._tls["key_file"] = key
        self._pool_maxsize = pool_maxsize
        self._pools = {ep: self._new_pool(ep, pool_maxsize) for ep in self.endpoints}
        self._stream_pools: dict[Endpoint, urllib3.HTTPConnectionPool] = {}
        self._pinned = 0
        self._lock = threading.Lock()
        self._username = username
        self._password = password
        self._token: str | None = None
        self._token_lock = threading.Lock()
        self._headers: dict[str, str] = dict(_JSON_HEADERS)
        self._closed = False

    def _new_pool(self, ep: Endpoint, maxsize: int) -> urllib3.HTTPConnectionPool:
        if ep.scheme == "https":
            return urllib3.HTTPSConnectionPool(
                ep.host, ep.port, maxsize=maxsize, block=False, retries=False, **self._tls
            )
        return urllib3.HTTPConnectionPool(
            ep.host, ep.port, maxsize=maxsize, block=False, retries=False
        )

    # -- endpoints -----------------------------------------------------------

    @property
    def pinned(self) -> Endpoint:
        """The endpoint requests go to first."""
        return self.endpoints[self._pinned]

    def rotation(self, start: Endpoint | None = None) -> list[Endpoint]:
        """Every endpoint, beginning with ``start`` (default: the pinned one)."""
        eps = self.endpoints
        i = eps.index(start) if start is not None else self._pinned
        return eps[i:] + eps[:i]

    def pin(self, ep: Endpoint) -> None:
        i = self.endpoints.index(ep)
        if i != self._pinned:
            log.info("etcd client now talks to %s", ep)
            self._pinned = i

    def endpoint(self, spec: str | Endpoint) -> Endpoint:
        """The known endpoint matching ``spec`` (``host:port`` or a URL)."""
        if isinstance(spec, Endpoint):
            return spec
        want = parse_endpoints(spec, default_scheme=self.endpoints[0].scheme)[0]
        for ep in self.endpoints:
            if (ep.host, ep.port) == (want.host, want.port):
                return ep
        # Not one of ours: use it anyway (status of an arbitrary member).
        with self._lock:
            if want not in self._pools:
                self._pools[want] = self._new_pool(want, 2)
        return want

    # -- auth ----------------------------------------------------------------

    @property
    def has_auth(self) -> bool:
        return self._username is not None

    def headers(self) -> dict[str, str]:
        """Headers for a request: JSON, plus the auth token when we have one."""
        if self._username is not None and self._token is None:
            self.authenticate()
        return self._headers

    def authenticate(self, stale: str | None = None) -> None:
        """Fetch a fresh token (unless another thread already replaced ``stale``)."""
        with self._token_lock:
            if self._token is not None and self._token != stale:
                return
            body = {"name": self._username, "password": self._password}
            reply = self._send(
                "/v3/auth/authenticate", body, headers=_JSON_HEADERS, idempotent=True
            )
            token = reply.get("token")
            if not token:
                raise EtcdAuthError(
                    f"etcd did not return an auth token for user {self._username!r}; "
                    "is authentication enabled?",
                    endpoint=str(self.pinned),
                )
            self._token = str(token)
            self._headers = {**_JSON_HEADERS, "Authorization": self._token}
            log.debug("authenticated to etcd as %r", self._username)

    # -- requests ------------------------------------------------------------

    def request(
        self,
        path: str,
        body: Json | list[Json],
        *,
        idempotent: bool,
        key: bytes | str | None = None,
        endpoint: Endpoint | None = None,
        timeout: float | None = None,
    ) -> Json:
        """POST ``body`` to ``path``; return the decoded reply (see the module doc).

        ``timeout`` (default: the client's) bounds the wait on each endpoint. A list
        ``body`` is sent as newline-delimited messages to a streaming endpoint (e.g. many
        lease keep-alives in one request); the reply is then ``{"lines": [message,
        ...]}``, one decoded message per reply line.
        """
        headers = self.headers()
        try:
            return self._send(
                path,
                body,
                headers=headers,
                idempotent=idempotent,
                key=key,
                endpoint=endpoint,
                timeout=timeout,
            )
        except EtcdAuthError as exc:
            if self._username is None or not any(t in str(exc) for t in _TOKEN_ERRORS):
                raise
            log.debug("etcd auth token rejected (%s); authenticating again", exc)
            self.authenticate(stale=headers.get("Authorization"))
            return self._send(
                path,
                body,
                headers=self._headers,
                idempotent=idempotent,
                key=key,
                endpoint=endpoint,
                timeout=timeout,
            )

    def _send(
        self,
        path: str,
        body: Json | list[Json],
        *,
        headers: dict[str, str],
        idempotent: bool,
        key: bytes | str | None = None,
        endpoint: Endpoint | None = None,
        timeout: float | None = None,
    ) -> Json:
        if self._closed:
            raise EtcdClientError("the etcd client is closed")
        limit = self.timeout if timeout is None else min(timeout, self.timeout)
        request_timeout = (
            self._timeout
            if timeout is None
            else urllib3.Timeout(connect=min(limit, self.connect_timeout), read=limit)
        )
        many = isinstance(body, list)
        if isinstance(body, list):
            data = b"".join(_dumps(message).encode() + b"\n" for message in body)
        else:
            data = _dumps(body).encode()
        order = [endpoint] if endpoint is not None else self.rotation()
        failures: list[str] = []
        last_exc: BaseException | None = None
        for ep in order:
            pool = self._pools[ep]
            try:
                resp = pool.urlopen(
                    "POST",
                    path,
                    body=data,
                    headers=headers,
                    retries=False,
                    redirect=False,
                    timeout=request_timeout,
                    assert_same_host=False,
                )
            except (ConnectTimeoutError, SSLError) as exc:
                # Never sent: the next endpoint is safe for any request.
                failures.append(f"{ep}: {_reason(exc)}")
                last_exc = exc
                continue
            except ReadTimeoutError as exc:
                if idempotent:
                    failures.append(f"{ep}: no reply within {limit:g}s")
                    last_exc = exc
                    continue
                raise EtcdTimeoutError(
                    f"etcd {path} on {ep}: no reply within {limit:g}s{_describe_key(key)}; "
                    "the write may or may not have been applied (not retried)",
                    endpoint=str(ep),
                    key=key,
                ) from exc
            except (ProtocolError, HTTPError, OSError) as exc:
                if idempotent:
                    failures.append(f"{ep}: {_reason(exc)}")
                    last_exc = exc
                    continue
                raise EtcdOutcomeUnknownError(
                    f"etcd {path} on {ep}: connection lost before the reply{_describe_key(key)} "
                    f"({_reason(exc)}); the write may or may not have been applied (not retried)",
                    endpoint=str(ep),
                    key=key,
                ) from exc
            status = resp.status
            payload = resp.data
            if status == 200:
                if endpoint is None and ep is not order[0]:
                    self.pin(ep)
                try:
                    reply: Json = (
                        {"lines": [_loads(line) for line in payload.splitlines() if line.strip()]}
                        if many
                        else _loads(payload)
                    )
                except ValueError as exc:
                    raise EtcdRequestError(
                        f"etcd {path} on {ep} sent invalid JSON: {payload[:200]!r}",
                        endpoint=str(ep),
                        key=key,
                    ) from exc
                return reply
            err = translate_error(path, str(ep), status, payload, key)
            if may_resend(err, error_message(payload), idempotent=idempotent):
                failures.append(f"{ep}: {err}")
                last_exc = err
                continue
            raise err if idempotent else outcome_unknown(err)
        names = ", ".join(str(ep) for ep in order)
        raise EtcdUnavailableError(
            f"no etcd endpoint reachable for {path}{_describe_key(key)} (tried {names}): "
            + "; ".join(failures)
            + ". Is etcd running there?",
            endpoint=str(order[-1]),
            key=key,
        ) from last_exc

    # -- streams -------------------------------------------------------------

    def open_stream(self, path: str, body: Json, endpoint: Endpoint) -> urllib3.BaseHTTPResponse:
        """Open a streaming POST (watch) on one endpoint; the caller owns the response.

        Raises our errors for connection failures and error replies.
        """
        if self._closed:
            raise EtcdClientError("the etcd client is closed")
        with self._lock:
            pool = self._stream_pools.get(endpoint)
            if pool is None:
                pool = self._stream_pools[endpoint] = self._new_pool(endpoint, 64)
        headers = dict(self.headers())
        if len(self.endpoints) > 1:
            # Let etcd end the stream when this member loses its leader.
            headers["Grpc-Metadata-hasleader"] = "true"
        try:
            resp = pool.urlopen(
                "POST",
                path,
                body=_dumps(body).encode(),
                headers=headers,
                retries=False,
                redirect=False,
                # Bounded until the reply starts; then the stream may be silent for
                # long (the watch's monitor notices a hung member instead).
                timeout=self._timeout,
                preload_content=False,
                release_conn=False,
                assert_same_host=False,
            )
        except (HTTPError, OSError) as exc:
            raise EtcdUnavailableError(
                f"cannot open etcd {path} stream on {endpoint}: {_reason(exc)}",
                endpoint=str(endpoint),
            ) from exc
        if resp.status != 200:
            try:
                payload = resp.read()
            except (HTTPError, OSError) as exc:
                release_stream(resp)
                raise EtcdUnavailableError(
                    f"etcd {path} stream on {endpoint} failed with HTTP {resp.status} and "
                    f"the connection broke: {_reason(exc)}",
                    endpoint=str(endpoint),
                ) from exc
            release_stream(resp)
            raise translate_error(path, str(endpoint), resp.status, payload)
        conn = resp.connection
        sock = getattr(conn, "sock", None) if conn is not None else None
        if sock is not None:
            sock.settimeout(None)
        return resp

    def probe(self, endpoint: Endpoint, timeout: float) -> str | None:
        """``None`` when ``endpoint`` answers a status request within ``timeout`` s.

        Any HTTP reply counts (even an error): the member is alive. Otherwise, why not.
        """
        if self._closed:
            return "the etcd client is closed"
        with self._lock:
            pool = self._pools.get(endpoint)
            if pool is None:
                pool = self._pools[endpoint] = self._new_pool(endpoint, 2)
        try:
            resp = pool.urlopen(
                "POST",
                "/v3/maintenance/status",
                body=b"{}",
                headers=_JSON_HEADERS,
                retries=False,
                redirect=False,
                timeout=urllib3.Timeout(connect=timeout, read=timeout),
                assert_same_host=False,
            )
        except (HTTPError, OSError) as exc:
            return f"no answer to a status request within {timeout:g}s ({_reason(exc)})"
        log.debug("etcd %s answered a probe with HTTP %d", endpoint, resp.status)
        return None

    def close(self) -> None:
        self._closed = True
        with self._lock:
            pools = [*self._pools.values(), *self._stream_pools.values()]
        for pool in pools:
            pool.close()


def close_stream(resp: urllib3.BaseHTTPResponse) -> None:
    """Close a streaming response from any thread, waking up a blocked reader."""
    conn = resp.connection
    sock = getattr(conn, "sock", None) if conn is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def release_stream(resp: urllib3.BaseHTTPResponse) -> None:
    """Drop a finished streaming response's connection (it cannot be reused)."""
    try:
        resp.close()
    except (HTTPError, OSError):
        log.debug("closing a watch stream failed", exc_info=True)
    conn = resp.connection
    if conn is not None:
        conn.close()
    resp.release_conn()


def _reason(exc: BaseException) -> str:
    """A short, readable reason for a urllib3/socket error."""
    reason = getattr(exc, "reason", None)
    if isinstance(exc, ProtocolError) and exc.args:
        inner = exc.args[-1]
        if isinstance(inner, BaseException):
            return f"{type(inner).__name__}: {inner}"
    if isinstance(reason, BaseException):
        return f"{type(reason).__name__}: {reason}"
    text = str(exc)
    # urllib3 prefixes the connection object's repr; keep the interesting part.
    if "): " in text:
        text = text.split("): ", 1)[1]
    return text or type(exc).__name__
