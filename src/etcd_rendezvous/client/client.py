"""EtcdClient: the project's one boundary to etcd (v3 API over the JSON gateway)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Literal

from etcd_rendezvous.client._codec import Codec, header_revision, to_int, unb64
from etcd_rendezvous.client._endpoints import Endpoint
from etcd_rendezvous.client._retry import Retry
from etcd_rendezvous.client._transport import Transport
from etcd_rendezvous.client._types import (
    DeleteResponse,
    KeyValue,
    LeaseGrant,
    LeaseInfo,
    Member,
    PutResponse,
    RangeResponse,
    Status,
    TxnResponse,
    serving_urls,
)
from etcd_rendezvous.client.lease import KeepAlive, Lease
from etcd_rendezvous.client.txn import (
    AnyOp,
    Compare,
    RangeOp,
    SortOrder,
    SortTarget,
    TxnOp,
    to_bytes,
)
from etcd_rendezvous.client.watch import Watch, WatchMonitor
from etcd_rendezvous.errors import (
    EtcdClientError,
    EtcdLeaseNotFoundError,
    EtcdRequestError,
)

log = logging.getLogger(__name__)


class EtcdClient:
    """A client for etcd's v3 API, over the JSON gateway every etcd >= 3.4 serves.

    ``endpoints`` is ``"host:port"``, ``"http(s)://host:port"``, ``"[::1]:2379"``,
    a comma-separated string of those, or a sequence. Requests go to one
    endpoint and move to the next when it cannot be reached (see
    :mod:`etcd_rendezvous.client._transport` for the exact failover rules).

    ``namespace`` prefixes every key transparently (like etcd's
    ``clientv3/namespace``); results come back without it. Keys and values are
    ``bytes`` or ``str`` (encoded as UTF-8); results are ``bytes``.

    ``ca_cert``/``cert``/``key`` enable TLS (endpoints without a scheme then use
    https); ``username``/``password`` enable etcd authentication. ``timeout``
    bounds every request on one endpoint. ``watch_retry`` is how long (and how
    often) a watch tries to resume after losing its connection.

    ``watch_idle_check``: when a watch stream has been silent that many seconds, its
    endpoint gets a status request (``watch_probe_timeout``, default
    ``min(timeout, max(0.5, watch_idle_check / 2))``); a member that does not answer
    (paused, or a network stall that keeps the connection open) loses the stream and
    the watch resumes on another endpoint. ``None`` turns the check off.

    ``spread`` (default on): with several endpoints, start at a random one rather than
    the first, so that the many clients of a job (all given the same list) spread over
    the members, and a stall of one member does not hit them all. ``spread=False``
    always starts with the first endpoint.

    ``autosync`` (seconds, default off): follow the cluster's membership. Every that
    many seconds, and at once when a request finds a member dead or hung, the client
    asks for the member list and from then on talks to the client URLs of its started
    voting members (:meth:`sync_endpoints`), so members added later are used and
    removed ones dropped. For clusters whose members change while the client lives
    (the replicated embedded etcd of a multi-host torchrun job).

    Leases are kept alive by one thread per client (see
    :mod:`etcd_rendezvous.client.lease`), many leases per request.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] = "127.0.0.1:2379",
        *,
        timeout: float = 5.0,
        namespace: bytes | str = b"",
        ca_cert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        username: str | None = None,
        password: str | None = None,
        connect_timeout: float | None = None,
        watch_retry: Retry | None = None,
        watch_idle_check: float | None = 5.0,
        watch_probe_timeout: float | None = None,
        spread: bool = True,
        autosync: float | None = None,
    ) -> None:
        if autosync is not None and not autosync > 0:
            raise ValueError(f"autosync must be a positive number of seconds, got {autosync}")
        # What copy() needs to open a client like this one (its own connections).
        self._settings: dict[str, Any] = {
            "endpoints": endpoints,
            "timeout": timeout,
            "ca_cert": ca_cert,
            "cert": cert,
            "key": key,
            "username": username,
            "password": password,
            "connect_timeout": connect_timeout,
            "watch_retry": watch_retry,
            "watch_idle_check": watch_idle_check,
            "watch_probe_timeout": watch_probe_timeout,
            "autosync": autosync,
        }
        self._transport = Transport(
            endpoints,
            timeout=timeout,
            connect_timeout=connect_timeout,
            ca_cert=ca_cert,
            cert=cert,
            key=key,
            username=username,
            password=password,
            spread=spread,
        )
        self.namespace = to_bytes(namespace)
        self._codec = Codec(self.namespace)
        # Resumes at most 0.25 s apart: a watch whose member lost its leader is back
        # within that of the election (etcd elects in about a second).
        self.watch_retry = (
            watch_retry if watch_retry is not None else Retry(deadline=30.0, max_delay=0.25)
        )
        self._monitor = (
            WatchMonitor(self._transport, watch_idle_check, probe_timeout=watch_probe_timeout)
            if watch_idle_check
            else None
        )
        self._watches: set[Watch] = set()
        self._leases: set[Lease] = set()
        self._keeper = KeepAlive(self)
        self._closed = False
        self._transport.on_member_failed(self._move_watches)
        self._sync = _EndpointSync(self, autosync) if autosync is not None else None

    # -- properties ----------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        """The endpoint URLs, in failover order."""
        return [ep.url for ep in self._transport.endpoints]

    @property
    def endpoint(self) -> str:
        """The URL of the endpoint requests currently go to."""
        return self._transport.pinned.url

    @property
    def timeout(self) -> float:
        return self._transport.timeout

    @property
    def version(self) -> str:
        """The etcd server version, e.g. ``"3.5.1"``."""
        return self.status().version

    def copy(self) -> EtcdClient:
        """A new client with the same endpoints (those it knows now), settings and
        namespace, but its own connections, watches and leases (closing one does not
        close the other)."""
        return EtcdClient(
            **{**self._settings, "endpoints": self.endpoints}, namespace=self.namespace
        )

    def set_endpoints(self, endpoints: str | Sequence[str]) -> bool:
        """Talk to ``endpoints`` from now on; whether they differ from the current ones.

        The endpoint requests go to stays while it is listed. Requests, watches and
        keep-alives under way carry on; the next ones use the new list.
        """
        return self._transport.set_endpoints(endpoints)

    def sync_endpoints(self) -> list[str]:
        """Learn the endpoints from the cluster: the client URLs of its started voting
        members (learners serve no requests). The endpoints in use, afterwards.

        Raises what :meth:`members` raises when no member answers.
        """
        urls = serving_urls(self.members())
        if urls:
            self._transport.set_endpoints(urls)
        return self.endpoints

    def with_namespace(self, namespace: bytes | str) -> EtcdClient:
        """A view of this client with ``namespace`` appended to the current one.

        The view shares the connections, watches and leases: closing it closes them
        for both (every watch is cancelled and every keep-alive stopped).
        """
        view = object.__new__(EtcdClient)
        view._settings = self._settings
        view._transport = self._transport
        view.namespace = self.namespace + to_bytes(namespace)
        view._codec = Codec(view.namespace)
        view.watch_retry = self.watch_retry
        view._monitor = self._monitor
        # Shared: closing any view stops every watch and keep-alive on the connections.
        view._watches = self._watches
        view._leases = self._leases
        view._keeper = self._keeper
        view._sync = self._sync
        view._closed = False
        return view

    # -- KV ------------------------------------------------------------------

    def _call(
        self,
        path: str,
        body: dict[str, Any] | list[dict[str, Any]],
        *,
        idempotent: bool,
        key: bytes | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        return self._transport.request(
            path, body, idempotent=idempotent, key=key, timeout=timeout, deadline=deadline
        )

    def get(self, key: bytes | str, *, revision: int | None = None) -> KeyValue | None:
        """The key's current value (or at ``revision``), or ``None`` when it does not exist."""
        k = to_bytes(key)
        reply = self._call(
            "/v3/kv/range", self._codec.range_request(k, revision=revision), idempotent=True, key=k
        )
        kvs = reply.get("kvs")
        return self._codec.kv(kvs[0]) if kvs else None

    def range(
        self,
        key: bytes | str,
        range_end: bytes | str | None = None,
        *,
        prefix: bool = False,
        revision: int | None = None,
        limit: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        sort_order: SortOrder | None = None,
        sort_target: SortTarget | None = None,
    ) -> RangeResponse:
        """Keys in ``[key, range_end)``, or starting with ``key`` when ``prefix``.

        ``range_end=b"\\0"`` means every key from ``key`` on (within the namespace).
        """
        k = to_bytes(key)
        body = self._codec.range_request(
            k,
            None if range_end is None else to_bytes(range_end),
            prefix=prefix,
            revision=revision,
            limit=limit,
            keys_only=keys_only,
            count_only=count_only,
            sort_order=sort_order,
            sort_target=sort_target,
        )
        return self._codec.range_response(self._call("/v3/kv/range", body, idempotent=True, key=k))

    def get_prefix(self, prefix: bytes | str, **kwargs: Any) -> list[KeyValue]:
        """Shortcut: the key-values under ``prefix``, sorted by key."""
        return self.range(prefix, prefix=True, **kwargs).kvs

    def put(
        self,
        key: bytes | str,
        value: bytes | str,
        *,
        lease: int | None = None,
        prev_kv: bool = False,
    ) -> PutResponse:
        """Set ``key`` to ``value`` (attached to ``lease`` when given)."""
        k = to_bytes(key)
        body = self._codec.put_request(k, to_bytes(value), lease, prev_kv)
        return self._codec.put_response(self._call("/v3/kv/put", body, idempotent=False, key=k))

    def delete(
        self,
        key: bytes | str,
        *,
        prefix: bool = False,
        range_end: bytes | str | None = None,
        prev_kv: bool = False,
    ) -> DeleteResponse:
        """Delete ``key`` (or every key under it with ``prefix``, or up to ``range_end``)."""
        k = to_bytes(key)
        body = self._codec.delete_request(
            k, None if range_end is None else to_bytes(range_end), prefix=prefix, prev_kv=prev_kv
        )
        return self._codec.delete_response(
            self._call("/v3/kv/deleterange", body, idempotent=False, key=k)
        )

    def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[AnyOp] = (),
        failure: Sequence[AnyOp] = (),
    ) -> TxnResponse:
        """Run ``success`` if every compare holds, else ``failure``, atomically."""
        body = self._codec.txn_request(compare, success, failure)
        key = compare[0].key if compare else None
        readonly = not any(_writes(op) for op in (*success, *failure))
        return self._codec.txn_response(
            self._call("/v3/kv/txn", body, idempotent=readonly, key=key)
        )

    def compact(self, revision: int, *, physical: bool = True) -> None:
        """Drop history before ``revision`` (watches and reads before it then fail)."""
        body: dict[str, Any] = {"revision": str(revision)}
        if physical:
            body["physical"] = True
        self._call("/v3/kv/compaction", body, idempotent=True)

    # -- leases --------------------------------------------------------------

    def lease_grant(self, ttl: int, lease_id: int | None = None) -> LeaseGrant:
        """Grant a lease of ``ttl`` seconds; etcd picks the id unless ``lease_id`` is given."""
        body: dict[str, Any] = {"TTL": str(int(ttl))}
        if lease_id:
            body["ID"] = str(lease_id)
        reply = self._call("/v3/lease/grant", body, idempotent=bool(lease_id))
        if reply.get("error"):
            raise EtcdRequestError(
                f"etcd refused to grant a lease: {reply['error']}", endpoint=self.endpoint
            )
        return LeaseGrant(to_int(reply.get("ID")), to_int(reply.get("TTL")))

    def lease_revoke(self, lease_id: int) -> None:
        """Revoke a lease, deleting its keys. Raises EtcdLeaseNotFoundError when it is gone."""
        self._call("/v3/lease/revoke", {"ID": str(lease_id)}, idempotent=True)

    def lease_time_to_live(self, lease_id: int, *, keys: bool = False) -> LeaseInfo:
        """The lease's remaining TTL (-1 when it does not exist) and, optionally, its keys."""
        body: dict[str, Any] = {"ID": str(lease_id)}
        if keys:
            body["keys"] = True
        reply = self._call("/v3/lease/timetolive", body, idempotent=True)
        codec = self._codec
        return LeaseInfo(
            to_int(reply.get("ID")) or lease_id,
            to_int(reply.get("TTL")),
            to_int(reply.get("grantedTTL")),
            [codec.strip(unb64(k)) for k in reply.get("keys") or ()],
        )

    def lease_keep_alive_once(
        self, lease_id: int, *, timeout: float | None = None, deadline: float | None = None
    ) -> int:
        """Refresh a lease once; return its new TTL. EtcdLeaseNotFoundError when it is gone.

        ``timeout`` (at most the client's) bounds the wait on each endpoint, so a hung
        member costs that long before the next endpoint is tried; ``deadline`` (a
        ``time.monotonic()`` value) bounds the whole refresh, its time split between
        the endpoints (see :meth:`Transport.request`).
        """
        reply = self._call(
            "/v3/lease/keepalive",
            {"ID": str(lease_id)},
            idempotent=True,
            timeout=timeout,
            deadline=deadline,
        )
        result = reply.get("result")
        if result is None:
            err = reply.get("error")
            raise EtcdRequestError(
                f"unexpected keep-alive reply for lease {lease_id:x}: {err or reply!r:.200}",
                endpoint=self.endpoint,
            )
        ttl = to_int(result.get("TTL"))
        if ttl <= 0:
            raise EtcdLeaseNotFoundError(
                f"lease {lease_id} ({lease_id:x}) not found on {self.endpoint}: "
                "it expired or was revoked",
                endpoint=self.endpoint,
            )
        return ttl

    def lease_keep_alive_many(
        self,
        lease_ids: Sequence[int],
        *,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> dict[int, int]:
        """Refresh many leases in one request; return each one's new TTL (0: gone).

        The gateway's keep-alive endpoint is a stream: every id goes as one message of a
        single POST and etcd answers each in order, so refreshing N leases costs one
        round trip, not N. An id etcd does not know maps to 0 (never raises for it).
        """
        if not lease_ids:
            return {}
        reply = self._call(
            "/v3/lease/keepalive",
            [{"ID": str(lease_id)} for lease_id in lease_ids],
            idempotent=True,
            timeout=timeout,
            deadline=deadline,
        )
        ttls = dict.fromkeys(lease_ids, 0)
        for line in reply.get("lines") or ():
            result = line.get("result") if isinstance(line, dict) else None
            if result is None:
                err = line.get("error") if isinstance(line, dict) else line
                raise EtcdRequestError(
                    f"unexpected keep-alive reply: {err!r:.200}", endpoint=self.endpoint
                )
            ttls[to_int(result.get("ID"))] = max(0, to_int(result.get("TTL")))
        return ttls

    def lease_leases(self) -> list[int]:
        """Ids of every lease etcd knows."""
        reply = self._call("/v3/lease/leases", {}, idempotent=True)
        return [to_int(item.get("ID")) for item in reply.get("leases") or ()]

    def lease(
        self,
        ttl: int,
        *,
        keep_alive: bool = True,
        on_lost: Callable[[EtcdClientError], None] | None = None,
        lease_id: int | None = None,
        interval: float | None = None,
    ) -> Lease:
        """Grant a lease and keep it alive in the background (every ``interval`` s,
        default and at most ttl/3).

        Loss (expired, revoked, etcd unreachable past the TTL) is reported by
        :attr:`Lease.is_lost`, :attr:`Lease.error`, :meth:`Lease.wait_lost` and
        ``on_lost(error)``. Used as a context manager, the lease is revoked on exit.
        """
        grant = self.lease_grant(ttl, lease_id)
        lease = Lease(
            self, grant.id, grant.ttl, keep_alive=keep_alive, on_lost=on_lost, interval=interval
        )
        self._leases.add(lease)
        return lease

    def _forget_lease(self, lease: Lease) -> None:
        self._leases.discard(lease)

    # -- watches -------------------------------------------------------------

    def watch(
        self,
        key: bytes | str,
        *,
        prefix: bool = False,
        range_end: bytes | str | None = None,
        start_revision: int | None = None,
        prev_kv: bool = False,
        retry: Retry | None = None,
    ) -> Watch:
        """Watch a key (or prefix, or range) from now, or from ``start_revision``.

        Returns once etcd confirmed the watch, so no change made after this call
        is missed. See :class:`~etcd_rendezvous.client.watch.Watch`.
        """
        k = to_bytes(key)
        end = None if range_end is None else to_bytes(range_end)
        watch = Watch(
            self._transport,
            self._codec,
            k,
            self._codec.range_end(k, end, prefix),
            start_revision=start_revision,
            prev_kv=prev_kv,
            retry=(retry or self.watch_retry).copy(),
            on_close=self._watches.discard,
            monitor=self._monitor,
        )
        self._watches.add(watch)
        try:
            watch.start()
        except BaseException:
            self._watches.discard(watch)
            raise
        return watch

    def _move_watches(self, endpoint: Endpoint, reason: str, hung: bool) -> None:
        """A request found ``endpoint`` hung: its watch streams resume elsewhere now,
        not after ``watch_idle_check`` seconds of silence."""
        if not hung:
            return  # a member without a leader ends its streams itself (hasleader)
        for watch in list(self._watches):
            state = watch._stream_state()
            if state is not None and state[0] == endpoint:
                watch._abort_stream(state[1], f"{endpoint} hangs: {reason}")

    # -- cluster -------------------------------------------------------------

    def status(self, endpoint: str | None = None) -> Status:
        """One member's status (default: the current endpoint)."""
        ep = None if endpoint is None else self._transport.endpoint(endpoint)
        reply = self._transport.request("/v3/maintenance/status", {}, idempotent=True, endpoint=ep)
        return Status(
            endpoint=(ep or self._transport.pinned).netloc,
            version=str(reply.get("version", "")),
            db_size=to_int(reply.get("dbSize")),
            leader=to_int(reply.get("leader")),
            member_id=to_int((reply.get("header") or {}).get("member_id")),
            raft_term=to_int(reply.get("raftTerm")),
            raft_index=to_int(reply.get("raftIndex")),
        )

    def health(self, endpoint: str | None = None) -> bool:
        """True when the member answers and the cluster has a leader."""
        try:
            status = self.status(endpoint)
        except EtcdClientError as exc:
            log.debug("etcd health check failed: %s", exc)
            return False
        return status.leader != 0

    def members(self, *, linearizable: bool = False) -> list[Member]:
        """The cluster's members (learners included: see :attr:`Member.is_learner`).

        ``linearizable`` asks the leader (etcd 3.5+; ignored by 3.4), rather than the
        member's own view, which may lag behind a change just made elsewhere.
        """
        body: dict[str, Any] = {"linearizable": True} if linearizable else {}
        reply = self._call("/v3/cluster/member/list", body, idempotent=True)
        return [_member(m) for m in reply.get("members") or ()]

    def member_add(self, peer_urls: Sequence[str], *, learner: bool = False) -> Member:
        """Add a member that will listen for peers at ``peer_urls`` (not started yet).

        Not idempotent: if the reply is lost, :class:`EtcdOutcomeUnknownError` says the
        member may have been added; list :meth:`members` and look for ``peer_urls``
        (etcd refuses a second member with the same peer URLs, so a resend can never
        add it twice, but it reports "Peer URLs already exists").
        """
        body = {"peerURLs": list(peer_urls), "isLearner": learner}
        reply = self._call("/v3/cluster/member/add", body, idempotent=False)
        return _member(reply.get("member") or {})

    def member_remove(self, member_id: int) -> None:
        """Remove a member (etcd raises "member not found" if it is already gone)."""
        self._call("/v3/cluster/member/remove", {"ID": str(member_id)}, idempotent=False)

    def member_promote(self, member_id: int) -> None:
        """Make a learner a voting member (etcd refuses one not yet in sync with the leader)."""
        self._call("/v3/cluster/member/promote", {"ID": str(member_id)}, idempotent=False)

    def current_revision(self) -> int:
        """The store's current revision."""
        reply = self._call("/v3/kv/range", {"key": "AA==", "count_only": True}, idempotent=True)
        return header_revision(reply)

    # -- auth administration -------------------------------------------------

    def user_add(self, name: str, password: str) -> None:
        """Create an etcd user."""
        self._call("/v3/auth/user/add", {"name": name, "password": password}, idempotent=False)

    def role_add(self, name: str) -> None:
        """Create an etcd role."""
        self._call("/v3/auth/role/add", {"name": name}, idempotent=False)

    def user_grant_role(self, user: str, role: str) -> None:
        """Give ``role`` to ``user``."""
        self._call("/v3/auth/user/grant", {"user": user, "role": role}, idempotent=True)

    def role_grant_permission(
        self,
        role: str,
        key: bytes | str,
        *,
        prefix: bool = False,
        range_end: bytes | str | None = None,
        permission: Literal["READ", "WRITE", "READWRITE"] = "READWRITE",
    ) -> None:
        """Let ``role`` read and/or write ``key`` (or a prefix/range), in this namespace."""
        k = to_bytes(key)
        perm: dict[str, Any] = {"permType": permission, "key": self._codec.key(k)}
        end = self._codec.range_end(k, None if range_end is None else to_bytes(range_end), prefix)
        if end is not None:
            perm["range_end"] = end
        self._call("/v3/auth/role/grant", {"name": role, "perm": perm}, idempotent=True)

    def auth_enable(self) -> None:
        """Turn authentication on (needs a ``root`` user with the ``root`` role)."""
        self._call("/v3/auth/enable", {}, idempotent=True)

    def auth_disable(self) -> None:
        """Turn authentication off (as root)."""
        self._call("/v3/auth/disable", {}, idempotent=True)

    # -- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Cancel watches, stop keep-alives (without revoking) and close connections."""
        if self._closed:
            return
        self._closed = True
        if self._sync is not None:
            self._sync.close()
        for watch in list(self._watches):
            watch.cancel()
        for lease in list(self._leases):
            lease.close()
        self._keeper.close()
        if self._monitor is not None:
            self._monitor.close()
        self._transport.close()

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        ns = f", namespace={self.namespace!r}" if self.namespace else ""
        return f"EtcdClient({','.join(self.endpoints)!r}{ns})"


#: Seconds of failing member-list requests between two warnings of an autosync client.
_SYNC_WARN_AFTER = 30.0


class _EndpointSync:
    """The thread that keeps a client's endpoints at the cluster's members (autosync)."""

    def __init__(self, client: EtcdClient, interval: float) -> None:
        self.interval = interval
        # Only a weak hold would let a forgotten client be collected; the thread ends
        # with close(), which every owner calls (and it is a daemon).
        self._client = client
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._failing_since: float | None = None
        client._transport.on_member_failed(lambda *_: self._wake.set())
        self._thread = threading.Thread(target=self._run, name="etcd-endpoint-sync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.clear()
            self._sync_once()
            self._wake.wait(self.interval)

    def _sync_once(self) -> None:
        try:
            self._client.sync_endpoints()
        except EtcdClientError as exc:
            if self._closed.is_set():
                return
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = now
                log.debug(
                    "etcd member list unavailable (%s); keeping %s", exc, self._client.endpoints
                )
            elif now - self._failing_since > _SYNC_WARN_AFTER:
                self._failing_since = now
                log.warning(
                    "etcd member list unavailable for %.0fs (%s); still using %s",
                    _SYNC_WARN_AFTER,
                    exc,
                    ",".join(self._client.endpoints),
                )
        except Exception:  # a bug: say so, and keep following the members
            log.exception("syncing the etcd client's endpoints failed")
        else:
            self._failing_since = None

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            # Bounded: one member-list request (the client's timeout).
            self._thread.join(self._client.timeout + 1.0)


def _member(m: dict[str, Any]) -> Member:
    return Member(
        id=to_int(m.get("ID")),
        name=str(m.get("name", "")),
        peer_urls=list(m.get("peerURLs") or ()),
        client_urls=list(m.get("clientURLs") or ()),
        is_learner=bool(m.get("isLearner", False)),
    )


def _writes(op: AnyOp) -> bool:
    if isinstance(op, RangeOp):
        return False
    if isinstance(op, TxnOp):
        return any(_writes(o) for o in (*op.success, *op.failure))
    return True
