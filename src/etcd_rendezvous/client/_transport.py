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
import functools
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from etcd_rendezvous.client._codec import (
    EMPTY_REPLY_WITH_TOKEN,
    decode_error,
    empty_reply_message,
)
from etcd_rendezvous.client._diagnose import summarize_reply, unreachable_advice
from etcd_rendezvous.client._endpoints import Endpoint, check_tls_files, parse_endpoints
from etcd_rendezvous.client._inflight import InFlight
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
# Replies after which a fresh token (and the request again) is the cure. etcd refuses such
# a request before applying it: "revision in header is old" comes when permissions changed
# since the token was issued (etcd's own client re-authenticates on it, ErrAuthOldRevision).
_TOKEN_ERRORS = (
    "invalid auth token",
    "revision of auth store is old",
    "revision in header is old",
    "user name is empty",
)

_JSON_HEADERS = {"Content-Type": "application/json"}
# Asks a member to fail a request at once when it has no leader (rather than keep it
# until etcd's own request timeout); sent with several endpoints, to KV and lease calls.
_LEADER_HEADER = {"Grpc-Metadata-hasleader": "true"}
_NEEDS_LEADER = ("/v3/kv/", "/v3/lease/")
# What a member answers during an election (the request was not served).
_ELECTING = frozenset({"etcdserver: no leader", "etcdserver: leader changed"})
# How often a request that found no leader anywhere is tried again (within its timeout).
_ELECTION_POLL = 0.05
_ELECTION_POLL_MAX = 0.25
# The least time one endpoint gets of a request's deadline (a round trip on a LAN).
_MIN_SHARE = 0.05
_dumps = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.loads


def _describe_key(key: bytes | str | None) -> str:
    return "" if key is None else f" (key {key!r})"


def error_message(body: bytes | Json) -> str:
    """The ``message`` of a gateway error reply ('' when there is none)."""
    error = decode_error(body)
    return error.message if error is not None else ""


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
    """Turn a gateway error reply (either format, see ``_codec``) into our exception."""
    error = decode_error(body)
    if error is None:
        raw = bytes(body) if isinstance(body, bytes | bytearray) else None
        if raw is not None and not raw.strip() and status == 401:
            return EtcdAuthError(
                f"etcd {path} on {endpoint} failed with HTTP 401 and an empty body"
                f"{_describe_key(key)}: {EMPTY_REPLY_WITH_TOKEN}",
                endpoint=endpoint,
                key=key,
            )
        shown = summarize_reply(raw) if raw is not None else repr(body)
        return EtcdRequestError(
            f"etcd {path} on {endpoint} failed with HTTP {status}{_describe_key(key)}: "
            f"{shown:.300}",
            endpoint=endpoint,
            key=key,
        )
    code, message = error.code, error.message
    text = f"etcd {path} on {endpoint} failed{_describe_key(key)}: {message}"
    if code == GRPC_UNAVAILABLE or (code == GRPC_CANCELLED and "connection is closing" in message):
        # "grpc: the client connection is closing": the member is shutting down.
        return EtcdUnavailableError(text, endpoint=endpoint, key=key)
    if code == GRPC_DEADLINE_EXCEEDED:
        return EtcdTimeoutError(text, endpoint=endpoint, key=key)
    if (
        code in (GRPC_UNAUTHENTICATED, GRPC_PERMISSION_DENIED)
        or (
            code in (GRPC_INVALID_ARGUMENT, GRPC_FAILED_PRECONDITION)
            and ("auth" in message or "user" in message or "permission" in message)
        )
        # The applier refused it (code 2, Unknown): permissions changed since the token.
        or "revision in header is old" in message
    ):
        return EtcdAuthError(text, endpoint=endpoint, key=key)
    if code == GRPC_NOT_FOUND and "lease" in message:
        return EtcdLeaseNotFoundError(text, endpoint=endpoint, key=key)
    if code == GRPC_OUT_OF_RANGE and "compacted" in message:
        return EtcdCompactedError(text, compact_revision=0, endpoint=endpoint, key=key)
    return EtcdRequestError(
        text, code=code if isinstance(code, int) else None, endpoint=endpoint, key=key
    )


class NoLeaderError(EtcdUnavailableError):
    """Every member answered that it has no leader: the request was served nowhere."""


class _Watched:
    """Registers a connection's waits for a reply with an :class:`InFlight` (a mixin of
    urllib3's connection classes, plain and TLS)."""

    sock: Any

    def __init__(self, *args: Any, inflight: InFlight, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._inflight = inflight

    def getresponse(self) -> Any:
        token = self._inflight.waiting(self.sock)
        try:
            return super().getresponse()  # type: ignore[misc]
        finally:
            self._inflight.done(token)


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    """An HTTP connection whose waits for a reply the monitor sees."""


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    """:class:`_WatchedHTTPConnection` over TLS."""


class _WatchedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


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
        spread: bool = True,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        if key is not None and cert is None:
            raise ValueError("a client key needs its certificate (cert=...)")
        check_tls_files(ca_cert=ca_cert, cert=cert, key=key)
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
        self._failure_listeners: list[Callable[[Endpoint, str, bool], None]] = []
        # With somewhere to fail over to, requests stuck on a hung or leaderless member
        # are noticed and given up on (see _inflight.py).
        self._inflight = (
            InFlight(self._status, self._member_failed, probe_timeout=min(1.0, timeout / 2))
            if len(self.endpoints) > 1
            else None
        )
        self._pools = {ep: self._new_pool(ep, pool_maxsize, watched=True) for ep in self.endpoints}
        # Endpoints whose pool is a member's (not a two-connection pool for a status
        # request to an arbitrary address), and pools replaced by set_endpoints (still
        # open: a request may be using them; closed with the transport).
        self._member_pools: set[Endpoint] = set(self.endpoints)
        self._retired: list[urllib3.HTTPConnectionPool] = []
        self._stream_pools: dict[Endpoint, urllib3.HTTPConnectionPool] = {}
        # Many clients listing the same endpoints (every agent of a job) must not all
        # talk to the first one: a stall of that member would then hit all of them.
        self._pinned = random.randrange(len(self.endpoints)) if spread else 0
        self._lock = threading.RLock()  # pinned is read under it too
        self._username = username
        self._password = password
        self._token: str | None = None
        self._token_lock = threading.Lock()
        self._headers: dict[str, str] = dict(_JSON_HEADERS)
        self._closed = False

    def _new_pool(
        self, ep: Endpoint, maxsize: int, *, watched: bool = False
    ) -> urllib3.HTTPConnectionPool:
        inflight = self._inflight if watched else None
        if ep.scheme == "https":
            if inflight is not None:
                return _WatchedHTTPSPool(
                    ep.host,
                    ep.port,
                    maxsize=maxsize,
                    block=False,
                    retries=False,
                    inflight=inflight,
                    **self._tls,
                )
            return urllib3.HTTPSConnectionPool(
                ep.host, ep.port, maxsize=maxsize, block=False, retries=False, **self._tls
            )
        if inflight is not None:
            return _WatchedHTTPPool(
                ep.host, ep.port, maxsize=maxsize, block=False, retries=False, inflight=inflight
            )
        return urllib3.HTTPConnectionPool(
            ep.host, ep.port, maxsize=maxsize, block=False, retries=False
        )

    # -- endpoints -----------------------------------------------------------

    @property
    def pinned(self) -> Endpoint:
        """The endpoint requests go to first."""
        with self._lock:
            return self.endpoints[self._pinned]

    def rotation(self, start: Endpoint | None = None) -> list[Endpoint]:
        """Every endpoint, beginning with ``start`` (default, or when ``start`` is no
        longer listed: the pinned one)."""
        with self._lock:
            eps = self.endpoints
            i = eps.index(start) if start is not None and start in eps else self._pinned
        return eps[i:] + eps[:i]

    def set_endpoints(self, endpoints: str | Sequence[str]) -> bool:
        """Send requests to ``endpoints`` from now on (the cluster's members, as they
        change); whether the list changed. The pinned endpoint stays pinned while it is
        listed (else a random one is: the clients of a job spread over the members).
        Requests under way finish on the connections they have."""
        new = parse_endpoints(endpoints, default_scheme=self.endpoints[0].scheme)
        with self._lock:
            if self._closed or set(new) == set(self.endpoints):
                return False
            if self._inflight is None and len(new) > 1:
                # From one endpoint to several: requests stuck on a hung member are now
                # worth giving up on (there is somewhere to fail over to).
                self._inflight = InFlight(
                    self._status, self._member_failed, probe_timeout=min(1.0, self.timeout / 2)
                )
                self._member_pools.clear()
            for ep in new:
                if ep not in self._member_pools:
                    old = self._pools.get(ep)
                    if old is not None:
                        self._retired.append(old)
                    self._pools[ep] = self._new_pool(ep, self._pool_maxsize, watched=True)
                    self._member_pools.add(ep)
            pinned = self.endpoints[self._pinned]
            before = self.endpoints
            self.endpoints = new
            self._pinned = new.index(pinned) if pinned in new else random.randrange(len(new))
        log.info(
            "etcd client endpoints: %s (were %s)",
            ",".join(ep.url for ep in new),
            ",".join(ep.url for ep in before),
        )
        return True

    def _member_failed(self, ep: Endpoint, reason: str, hung: bool) -> None:
        """``ep`` hangs, is dead (``hung``) or has no leader: the next one goes first."""
        with self._lock:
            if ep in self.endpoints and self.pinned == ep:
                self._pinned = (self._pinned + 1) % len(self.endpoints)
                log.info("etcd client moves from %s to %s (%s)", ep, self.pinned, reason)
            listeners = list(self._failure_listeners)
        for listener in listeners:
            try:
                listener(ep, reason, hung)
            except Exception:
                log.exception("a listener of etcd member failures failed")

    def on_member_failed(self, listener: Callable[[Endpoint, str, bool], None]) -> None:
        """Call ``listener(endpoint, reason, hung)`` when a request found its member hung,
        dead (``hung`` true) or without a leader (see ``_inflight.py``)."""
        with self._lock:
            self._failure_listeners.append(listener)

    def pin(self, ep: Endpoint) -> None:
        with self._lock:
            if ep not in self.endpoints:
                return  # dropped by set_endpoints meanwhile
            i = self.endpoints.index(ep)
            if i == self._pinned:
                return
            self._pinned = i
        log.info("etcd client now talks to %s", ep)

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
        deadline: float | None = None,
    ) -> Json:
        """POST ``body`` to ``path``; return the decoded reply (see the module doc).

        ``timeout`` (default: the client's) bounds the wait on each endpoint.
        ``deadline`` (a ``time.monotonic()`` value) bounds the whole request: the time
        left is split between the endpoints not tried yet (the pinned one gets its
        share, then the next), so a hung member cannot use it all up. A list
        ``body`` is sent as newline-delimited messages to a streaming endpoint (e.g. many
        lease keep-alives in one request); the reply is then ``{"lines": [message,
        ...]}``, one decoded message per reply line.
        """
        send = functools.partial(
            self._send,
            path,
            body,
            idempotent=idempotent,
            key=key,
            endpoint=endpoint,
            timeout=timeout,
            deadline=deadline,
        )
        headers = self.headers()
        try:
            return send(headers=headers)
        except EtcdAuthError as exc:
            if self._username is None or not any(t in str(exc) for t in _TOKEN_ERRORS):
                raise
            log.debug("etcd auth token rejected (%s); authenticating again", exc)
            self.authenticate(stale=headers.get("Authorization"))
        except EtcdUnavailableError as exc:
            # An empty reply to a request with a token may mean "invalid auth token".
            stale = headers.get("Authorization")
            if stale is None or empty_reply_message(exc) is None:
                raise
            log.info("%s; authenticating again", EMPTY_REPLY_WITH_TOKEN)
            self.authenticate(stale=stale)
            if not idempotent:
                raise  # the outcome is unknown: the caller decides, never a blind resend
        return send(headers=self._headers)

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
        deadline: float | None = None,
    ) -> Json:
        """:meth:`_send_once`, again while an election is under way (bounded by the timeout).

        When every member answered that it has no leader (the request was applied
        nowhere), the cluster is electing one: try again shortly, rather than fail a
        request a second later would have served.
        """
        end = time.monotonic() + (self.timeout if timeout is None else min(timeout, self.timeout))
        if deadline is not None:
            end = min(end, deadline)
        delay = _ELECTION_POLL
        while True:
            try:
                return self._send_once(
                    path,
                    body,
                    headers=headers,
                    idempotent=idempotent,
                    key=key,
                    endpoint=endpoint,
                    timeout=timeout,
                    deadline=deadline,
                )
            except NoLeaderError:
                if time.monotonic() + delay >= end:
                    raise
                log.debug("etcd has no leader for %s; trying again in %.2fs", path, delay)
                time.sleep(delay)
                delay = min(delay * 2, _ELECTION_POLL_MAX)

    def _send_once(
        self,
        path: str,
        body: Json | list[Json],
        *,
        headers: dict[str, str],
        idempotent: bool,
        key: bytes | str | None = None,
        endpoint: Endpoint | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> Json:
        if self._closed:
            raise EtcdClientError("the etcd client is closed")
        limit = base = self.timeout if timeout is None else min(timeout, self.timeout)
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
        inflight = self._inflight
        if inflight is not None and path.startswith(_NEEDS_LEADER):
            headers = {**headers, **_LEADER_HEADER}
        order = [endpoint] if endpoint is not None else self.rotation()
        failures: list[str] = []
        last_exc: BaseException | None = None
        leaderless = 0  # members that answered "no leader" ("leader changed")
        unsent = 0  # members that never got the request (refused, connect timeout)
        for i, ep in enumerate(order):
            pool = self._pools[ep]
            if deadline is not None:
                # This endpoint's share of the time left (the rest is for the others).
                share = (deadline - time.monotonic()) / (len(order) - i)
                if share <= 0:
                    failures.append(f"{ep}: not tried, no time left")
                    continue
                limit = max(min(base, share), _MIN_SHARE)
                request_timeout = urllib3.Timeout(
                    connect=min(limit, self.connect_timeout), read=limit
                )
            try:
                with inflight.sending(ep) if inflight is not None else contextlib.nullcontext():
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
                unsent += 1
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
                cut = inflight.cut_reason() if inflight is not None else None
                why = f"given up: {cut}" if cut is not None else _reason(exc)
                if idempotent:
                    failures.append(f"{ep}: {why}")
                    last_exc = exc
                    if cut is not None and "has no leader" in cut:
                        leaderless += 1  # the monitor asked it: it is electing too
                    continue
                if cut is not None:
                    # We stopped waiting for a reply that was not coming: a timeout.
                    raise EtcdTimeoutError(
                        f"etcd {path} on {ep}: no reply{_describe_key(key)} ({why}); "
                        "the write may or may not have been applied (not retried)",
                        endpoint=str(ep),
                        key=key,
                    ) from exc
                raise EtcdOutcomeUnknownError(
                    f"etcd {path} on {ep}: connection lost before the reply{_describe_key(key)} "
                    f"({why}); the write may or may not have been applied (not retried)",
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
                        f"etcd {path} on {ep}: the reply is "
                        f"{summarize_reply(payload, resp.headers.get('Content-Type', ''))}, "
                        f"not etcd's JSON; is {ep} an etcd client URL?",
                        endpoint=str(ep),
                        key=key,
                    ) from exc
                if inflight is not None:
                    inflight.saw_term(ep, _raft_term(reply))
                return reply
            err = translate_error(path, str(ep), status, payload, key)
            message = error_message(payload)
            if may_resend(err, message, idempotent=idempotent):
                failures.append(f"{ep}: {err}")
                last_exc = err
                if message.strip() in _ELECTING:
                    leaderless += 1
                continue
            raise err if idempotent else outcome_unknown(err)
        names = ", ".join(str(ep) for ep in order)
        if leaderless and leaderless + unsent == len(order):
            raise NoLeaderError(
                f"etcd has no leader for {path}{_describe_key(key)} (tried {names}): "
                + "; ".join(failures)
                + ". The cluster is electing one, or lost its quorum.",
                endpoint=str(order[-1]),
                key=key,
            ) from last_exc
        raise EtcdUnavailableError(
            f"no etcd endpoint reachable for {path}{_describe_key(key)} (tried {names}): "
            + "; ".join(failures)
            + unreachable_advice(last_exc, order[-1], client_cert="cert_file" in self._tls),
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

    def _status(self, endpoint: Endpoint, timeout: float) -> Json | str | None:
        """``endpoint``'s status reply within ``timeout`` s, why there is none (a str), or
        ``None`` when it answered with something else (alive, state unknown)."""
        if self._closed:
            return "the etcd client is closed"
        try:
            resp = self._pools[endpoint].urlopen(
                "POST",
                "/v3/maintenance/status",
                body=b"{}",
                headers=self._headers,
                retries=False,
                redirect=False,
                timeout=urllib3.Timeout(connect=timeout, read=timeout),
                assert_same_host=False,
            )
        except (HTTPError, OSError) as exc:
            return f"no answer within {timeout:g}s ({_reason(exc)})"
        try:
            reply = _loads(resp.data)
        except ValueError:
            reply = None
        if resp.status != 200 or not isinstance(reply, dict):
            # It answers (an auth error, say): alive, and nothing more is known.
            log.debug("etcd %s answered a status request with HTTP %d", endpoint, resp.status)
            return None
        return reply

    def close(self) -> None:
        self._closed = True
        if self._inflight is not None:
            self._inflight.close()
        with self._lock:
            pools = [*self._pools.values(), *self._stream_pools.values(), *self._retired]
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


def _raft_term(reply: Json) -> int:
    """The raft term in a reply's header (0 when it has none)."""
    lines = reply.get("lines")
    first = lines[0] if isinstance(lines, list) and lines else reply
    header = first.get("header") if isinstance(first, dict) else None
    if isinstance(first, dict) and header is None:
        inner = first.get("result")
        header = inner.get("header") if isinstance(inner, dict) else None
    term = header.get("raft_term") if isinstance(header, dict) else None
    try:
        return int(str(term or 0))
    except ValueError:
        return 0


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
