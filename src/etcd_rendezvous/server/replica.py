"""One host's member of a replicated etcd that its hosts grow and heal themselves.

The replicated embedded etcd of a multi-host job has no administrator: each host that
takes part runs one :class:`EtcdReplica`, and the replicas, each deciding for its own
host only, keep the cluster at ``size`` voting members:

* the first host :meth:`~EtcdReplica.seed`\\ s a one-member etcd; every other host
  :meth:`~EtcdReplica.join`\\ s as a *candidate*;
* a candidate adds its host as a *learner* (etcd allows one at a time, so candidates
  take turns) while the cluster has fewer than ``size`` members, starts its etcd with
  the members it was told of, and asks for promotion once etcd says it is in sync;
* a learner is promoted only to an odd number of voters (an even one tolerates no more
  failures than one fewer, and needs one more for quorum), unless another candidate
  waits to follow it: a two-host job stays at one voter and one learner;
* a member no other member has reached for ``dead_after`` seconds is removed (by any
  replica that sees a quorum: etcd refuses the change otherwise), and a candidate
  takes its place; a removed member's etcd exits when it hears of it, and its replica
  wipes it and becomes a candidate again, with a new name;
* :meth:`~EtcdReplica.stop` removes the host's member (bounded), stops its etcd and
  deletes its data.

Every decision is taken on a view confirmed by a quorum (a linearizable read): a host
cut off from the others changes nothing. Candidates announce themselves with a leased
key under ``/etcd-rendezvous/replica/<cluster>/candidates/``.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from etcd_rendezvous.client import EtcdClient, parse_endpoints
from etcd_rendezvous.client._types import Member, serving_urls
from etcd_rendezvous.errors import (
    EtcdClientError,
    EtcdLeaseNotFoundError,
    EtcdOutcomeUnknownError,
    EtcdServerError,
)
from etcd_rendezvous.server._ports import find_free_port, http_url
from etcd_rendezvous.server.server import EtcdServer

log = logging.getLogger(__name__)

#: Seconds a member may be unreachable (by status request) before a replica removes it.
DEFAULT_DEAD_AFTER = 10.0
#: Seconds between two rounds of a replica's manager.
DEFAULT_INTERVAL = 0.5
#: Raft timing of replicated members (etcd's defaults: across hosts, not loopback).
HEARTBEAT_MS = 100
ELECTION_MS = 1000
#: TTL of a candidate's announcement key.
CANDIDATE_TTL = 5
#: Seconds an etcd member may take to start (a learner catches up on the data first).
START_TIMEOUT = 60.0

STATES = ("new", "candidate", "learner", "voter", "stopped", "failed")


def candidates_prefix(cluster: str) -> str:
    return f"/etcd-rendezvous/replica/{cluster}/candidates/"


@dataclass(frozen=True)
class ReplicaView:
    """What a replica last saw of the cluster (with a quorum's confirmation)."""

    members: tuple[Member, ...]
    candidates: tuple[str, ...]  # names of hosts waiting to join, this one included

    @property
    def voters(self) -> list[Member]:
        return [m for m in self.members if not m.is_learner]

    @property
    def learners(self) -> list[Member]:
        return [m for m in self.members if m.is_learner]

    @property
    def client_urls(self) -> list[str]:
        return serving_urls(self.members)


class EtcdReplica:
    """This host's member of the cluster named ``cluster`` (see the module doc).

    ``address`` is this host's address as the other hosts reach it; the member serves
    clients at ``address:port`` and peers at a free port of ``address``.
    """

    def __init__(
        self,
        *,
        cluster: str,
        address: str,
        port: int,
        size: int = 3,
        binary: str | None = None,
        dead_after: float = DEFAULT_DEAD_AFTER,
        interval: float = DEFAULT_INTERVAL,
        request_timeout: float = 2.0,
    ) -> None:
        if size not in (1, 3, 5, 7):
            raise ValueError(f"size must be 1, 3, 5 or 7 voting members, got {size}")
        if dead_after <= 0 or interval <= 0:
            raise ValueError("dead_after and interval must be positive")
        self.cluster = cluster
        self.address = address
        self.port = port
        self.size = size
        self.binary = binary
        self.dead_after = dead_after
        self.interval = interval
        self.request_timeout = request_timeout
        self.name = self._new_name()
        self._state = "new"
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._server: EtcdServer | None = None
        self._member_id: int | None = None
        self._pending_peer: str | None = None  # a learner add whose reply was lost
        self._client: EtcdClient | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._view: ReplicaView | None = None
        self._silent_since: dict[int, float] = {}
        self._candidate_lease: int | None = None
        self._lock = threading.Lock()  # the server's lifecycle (manager vs stop())

    # -- what callers see ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """This host's client URL (served once it is a member)."""
        return http_url(self.address, self.port)

    @property
    def state(self) -> str:
        """``new``, ``candidate``, ``learner``, ``voter``, ``stopped`` or ``failed``."""
        return self._state

    @property
    def error(self) -> BaseException | None:
        """Why the manager stopped (state ``failed``)."""
        return self._error

    @property
    def endpoints(self) -> list[str]:
        """The client URLs of the voting members, as last seen (empty before)."""
        view = self._view
        return view.client_urls if view is not None else []

    @property
    def view(self) -> ReplicaView | None:
        return self._view

    @property
    def server(self) -> EtcdServer | None:
        return self._server

    def __repr__(self) -> str:
        return f"<EtcdReplica {self.name} {self.state} at {self.url} (size {self.size})>"

    def wait_for(self, *states: str, timeout: float) -> str:
        """Wait until the replica is in one of ``states``; the state. Raises
        ``TimeoutError``, or the manager's error once it failed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._state not in states:
                if self._state == "failed":
                    raise EtcdServerError(f"{self!r}: its manager failed: {self._error}") from (
                        self._error
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self!r} not {'/'.join(states)} after {timeout:g}s")
                self._cond.wait(left)
            return self._state

    # -- start --------------------------------------------------------------------------

    def seed(self, timeout: float = START_TIMEOUT) -> None:
        """Start the cluster: a one-member etcd at :attr:`url`; then manage it."""
        self._expect_new()
        server = self._new_server([])
        server.start(timeout=timeout)
        with self._lock:
            self._server = server
        client = self._open_client([server.url])
        try:
            own = next(m for m in client.members() if m.name == self.name)
        except (EtcdClientError, StopIteration) as exc:
            server.stop()
            client.close()
            raise EtcdServerError(f"{self!r}: the new etcd does not list itself: {exc}") from exc
        self._member_id = own.id
        self._set_state("voter")
        log.info("%r: seeded the cluster %s", self, self.cluster)
        self._start_manager()

    def join(self, seed_urls: Sequence[str]) -> None:
        """Take part in the cluster that answers at ``seed_urls``: as a candidate, which
        becomes a member when the cluster needs one (in the background)."""
        self._expect_new()
        self._open_client(list(seed_urls))
        self._set_state("candidate")
        self._start_manager()

    def _expect_new(self) -> None:
        if self._state != "new":
            raise EtcdServerError(f"{self!r} was started already")

    def _open_client(self, urls: list[str]) -> EtcdClient:
        self._client = EtcdClient(
            urls, timeout=self.request_timeout, watch_idle_check=None, spread=False
        )
        return self._client

    def _start_manager(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"etcd-replica {self.name}", daemon=True
        )
        self._thread.start()

    # -- stop ---------------------------------------------------------------------------

    def stop(self, timeout: float = 2.0) -> None:
        """Leave the cluster (remove this host's member, bounded by ``timeout``), stop
        its etcd and delete its data; idempotent."""
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # A round is bounded by its requests; starting a member by START_TIMEOUT.
            thread.join(timeout + self.request_timeout * 2)
            if thread.is_alive():
                log.warning("%r: its manager did not stop in time", self)
        with self._lock:
            server, self._server = self._server, None
            member_id, self._member_id = self._member_id, None
        client = self._client
        if client is not None:
            if member_id is not None and server is not None and server.is_running:
                self._leave(client, member_id, timeout)
            self._withdraw(client)
            client.close()
        if server is not None:
            server.stop()
        if self._state != "failed":
            self._set_state("stopped")

    def _leave(self, client: EtcdClient, member_id: int, timeout: float) -> None:
        view = self._view
        others = [m for m in view.voters if m.id != member_id] if view is not None else []
        if not others:
            return  # the last voter: nothing to leave
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.member_remove(member_id)
                log.info("%r: left the cluster", self)
                return
            except EtcdClientError as exc:
                if "member not found" in str(exc):
                    return
                if time.monotonic() + 0.2 >= deadline:
                    log.info("%r: could not leave the cluster in %gs: %s", self, timeout, exc)
                    return
                time.sleep(0.2)

    def __enter__(self) -> EtcdReplica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the manager --------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        with self._cond:
            if self._state != state:
                log.info("%s: %s -> %s", self.name, self._state, state)
            self._state = state
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                started = time.monotonic()
                self._round()
                self._stopping.wait(max(0.0, self.interval - (time.monotonic() - started)))
        except Exception as exc:  # a bug: never die silently; wait_for() raises it
            log.exception("%r: the replica manager failed", self)
            self._error = exc
            self._set_state("failed")

    def _round(self) -> None:
        client = self._client
        assert client is not None
        self._check_own_process()
        view = self._look(client)
        if view is None or self._stopping.is_set():
            return  # no quorum in sight: decide nothing
        self._view = view
        if view.client_urls:
            client.set_endpoints(view.client_urls)
        if self._check_own_membership(view):
            return
        self._track_silence(client, view)
        self._remove_dead(client, view)
        state = self._state
        own = next((m for m in view.members if m.id == self._member_id), None)
        if state == "learner" and own is not None and not own.is_learner:
            self._set_state("voter")  # promoted, though the reply was lost
            return
        if state == "candidate":
            self._announce(client)
            self._maybe_add(client, view)
        elif state == "learner":
            self._maybe_promote(client, view)

    def _look(self, client: EtcdClient) -> ReplicaView | None:
        try:
            members = client.members(linearizable=True)
            # A plain range is linearizable (a quorum's read index), also on 3.4, where
            # the member list is the member's own view.
            names = [
                kv.key.decode(errors="replace").rsplit("/", 1)[-1]
                for kv in client.get_prefix(candidates_prefix(self.cluster))
            ]
        except EtcdClientError as exc:
            log.debug("%s: no view of the cluster: %s", self.name, exc)
            return None
        return ReplicaView(tuple(members), tuple(names))

    def _check_own_process(self) -> None:
        with self._lock:
            server = self._server
            if server is None or server.is_running or self._stopping.is_set():
                return
            proc = server.process
            code = proc.returncode if proc is not None else None
            log.warning(
                "%r: its etcd exited (code %s: removed from the cluster, or it failed); "
                "wiping it and joining again as a candidate",
                self,
                code,
            )
            member_id = self._member_id
            self._server, self._member_id = None, None
        server.stop()  # deletes its data
        if member_id is not None and self._client is not None:
            # Gone already, or the others remove it once it is silent.
            with contextlib.suppress(EtcdClientError):
                self._client.member_remove(member_id)
        self._rejoin()

    def _check_own_membership(self, view: ReplicaView) -> bool:
        """This host's member is gone from a quorum's view: stop it and start over."""
        member_id = self._member_id
        if member_id is None or any(m.id == member_id for m in view.members):
            return False
        log.warning("%r: removed from the cluster; joining again as a candidate", self)
        with self._lock:
            server, self._server, self._member_id = self._server, None, None
        if server is not None:
            server.stop()
        self._rejoin()
        return True

    def _rejoin(self) -> None:
        self.name = self._new_name()
        self._set_state("candidate")

    def _new_name(self) -> str:
        return f"{self.cluster}-{secrets.token_hex(3)}"

    def _track_silence(self, client: EtcdClient, view: ReplicaView) -> None:
        now = time.monotonic()
        known = {m.id for m in view.members}
        for member_id in list(self._silent_since):
            if member_id not in known:
                del self._silent_since[member_id]
        for member in view.members:
            if member.id == self._member_id:
                continue
            alive = False
            if member.started:
                for url in member.client_urls:
                    ep = parse_endpoints(url)[0]
                    if client._transport.probe(ep, timeout=min(1.0, self.dead_after / 4)) is None:
                        alive = True
                        break
            if alive:
                self._silent_since.pop(member.id, None)
            else:
                self._silent_since.setdefault(member.id, now)

    def _remove_dead(self, client: EtcdClient, view: ReplicaView) -> None:
        now = time.monotonic()
        for member in view.members:
            since = self._silent_since.get(member.id)
            # A learner that was added but never started gets time to catch up first.
            limit = self.dead_after if member.started else self.dead_after + START_TIMEOUT
            if since is None or now - since < limit:
                continue
            try:
                client.member_remove(member.id)
            except EtcdOutcomeUnknownError as exc:
                log.info("%s: removing member %x: outcome unknown (%s)", self.name, member.id, exc)
                continue
            except EtcdClientError as exc:
                if "member not found" in str(exc):  # another replica was first
                    self._silent_since.pop(member.id, None)
                    continue
                # "unhealthy cluster" (etcd's strict reconfiguration check) and the
                # like: next round.
                log.info("%s: cannot remove member %x yet: %s", self.name, member.id, exc)
                continue
            log.warning(
                "%s: removed member %s (%x) of %s, unreachable for %.0fs",
                self.name,
                member.name or "(never started)",
                member.id,
                self.cluster,
                now - since,
            )
            self._silent_since.pop(member.id, None)

    def _announce(self, client: EtcdClient) -> None:
        """Keep this host's candidate key alive (learners use it to decide)."""
        key = candidates_prefix(self.cluster) + self.name
        try:
            if self._candidate_lease is not None:
                try:
                    client.lease_keep_alive_once(self._candidate_lease)
                    return
                except EtcdLeaseNotFoundError:
                    self._candidate_lease = None
            lease = client.lease_grant(CANDIDATE_TTL)
            self._candidate_lease = lease.id
            client.put(key, self.address, lease=lease.id)
        except EtcdClientError as exc:
            log.debug("%s: cannot announce itself: %s", self.name, exc)

    def _withdraw(self, client: EtcdClient) -> None:
        lease, self._candidate_lease = self._candidate_lease, None
        if lease is not None:
            with contextlib.suppress(EtcdClientError):  # else it expires within its TTL
                client.lease_revoke(lease)

    def _maybe_add(self, client: EtcdClient, view: ReplicaView) -> None:
        if self._pending_peer is not None:
            # The reply of our add was lost: the member list says whether it was applied.
            mine = [m for m in view.members if self._pending_peer in m.peer_urls]
            peer, self._pending_peer = self._pending_peer, None
            if mine:
                self._start_member(client, mine[0], view, peer)
            return
        if view.learners or len(view.members) >= self.size:
            return  # one learner at a time; the cluster is full
        with find_free_port(self.address) as sock:
            peer_port = int(sock.getsockname()[1])
        peer = http_url(self.address, peer_port)
        try:
            added = client.member_add([peer], learner=True)
        except EtcdOutcomeUnknownError:
            self._pending_peer = peer
            return
        except EtcdClientError as exc:
            log.debug("%s: not added: %s", self.name, exc)  # another candidate was first
            return
        log.info("%r: added as a learner (%x)", self, added.id)
        self._start_member(client, added, view, peer)

    def _start_member(
        self, client: EtcdClient, added: Member, view: ReplicaView, peer: str
    ) -> None:
        others = [m for m in view.members if m.id != added.id]
        initial = [f"{m.name or f'm{m.id:x}'}={u}" for m in others for u in m.peer_urls]
        initial.append(f"{self.name}={peer}")
        server = self._new_server(
            [
                "--initial-cluster",
                ",".join(initial),
                "--initial-cluster-state",
                "existing",
            ],
            peer_port=int(peer.rsplit(":", 1)[1]),
        )
        with self._lock:
            if self._stopping.is_set():
                self._undo_add(client, added.id)
                return
            self._server, self._member_id = server, added.id
        self._withdraw(client)
        try:
            server.start(timeout=START_TIMEOUT)
        except EtcdServerError as exc:
            log.warning("%r: its etcd did not start as a member: %s", self, exc)
            with self._lock:
                self._server, self._member_id = None, None
            self._undo_add(client, added.id)
            self._rejoin()
            return
        self._set_state("learner")

    def _undo_add(self, client: EtcdClient, member_id: int) -> None:
        try:
            client.member_remove(member_id)
        except EtcdClientError as exc:
            log.info("%s: could not remove its unstarted member: %s", self.name, exc)

    def _maybe_promote(self, client: EtcdClient, view: ReplicaView) -> None:
        member_id = self._member_id
        if member_id is None:
            return
        voters = len(view.voters) + 1
        waiting = [n for n in view.candidates if n != self.name]
        if voters > self.size or (voters % 2 == 0 and not waiting):
            return  # stays a learner: an even number of voters is worse than one fewer
        try:
            client.member_promote(member_id)
        except EtcdOutcomeUnknownError:
            return  # the next view tells
        except EtcdClientError as exc:
            if "in sync" in str(exc) or "can only promote" not in str(exc):
                log.debug("%s: not promoted yet: %s", self.name, exc)
                return
            # "can only promote a learner member": promoted already (a lost reply)
        log.info("%r: promoted to a voting member (%d voters)", self, voters)
        self._set_state("voter")

    def _new_server(self, extra_args: list[str], *, peer_port: int = 0) -> EtcdServer:
        return EtcdServer(
            binary=self.binary,
            host=self.address,
            port=self.port,
            peer_port=peer_port,
            name=self.name,
            extra_args=["--initial-cluster-token", self.cluster, *extra_args],
            heartbeat_interval_ms=HEARTBEAT_MS,
            election_timeout_ms=ELECTION_MS,
        )


__all__ = ["EtcdReplica", "ReplicaView", "candidates_prefix"]
