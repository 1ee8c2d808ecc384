"""The executor: the one small loop that talks to etcd for the state machine.

:class:`Rendezvous` owns one lease (keep-alive is the heartbeat), one watch (``ctl/``,
or the whole run prefix while this node leads) and a loop thread that turns watch
events and deadlines into machine events, and performs the machine's actions. The
public methods feed commands (join, leave, close) into the same machine. See
``_machine.py`` for the design.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from types import TracebackType

from etcd_rendezvous.client import Compare, EtcdClient, Lease, Op, Watch
from etcd_rendezvous.errors import EtcdClientError, EtcdLeaseNotFoundError
from etcd_rendezvous.rendezvous import _machine as m
from etcd_rendezvous.rendezvous._errors import (
    RendezvousClosedError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousLeftError,
    RendezvousTimeoutError,
)
from etcd_rendezvous.rendezvous._machine import Assignment, Change
from etcd_rendezvous.rendezvous._observe import key_event, snapshot
from etcd_rendezvous.rendezvous._records import (
    DEFAULT_KEY_PREFIX,
    ClosedRecord,
    Keys,
    LeaderRecord,
    StatusRecord,
    check_node_id,
    check_run_id,
    decode_as,
    encode,
)

log = logging.getLogger(__name__)

_ids = itertools.count()


def default_node_id() -> str:
    """``<host>_<pid>_<n>``: unique per handler, like torch's node descriptors."""
    host = "".join(c if c.isalnum() or c in ".-" else "-" for c in socket.gethostname())
    return f"{host or 'host'}_{os.getpid()}_{next(_ids)}"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


_FAILURES: dict[m.Failure, type[RendezvousError]] = {
    m.Failure.TIMEOUT: RendezvousTimeoutError,
    m.Failure.CLOSED: RendezvousClosedError,
    m.Failure.GRACEFUL_EXIT: RendezvousGracefulExitError,
    m.Failure.LEFT: RendezvousLeftError,
    m.Failure.LEASE_LOST: RendezvousLeftError,
}


class Rendezvous:
    """An elastic rendezvous of ``min_nodes..max_nodes`` nodes on etcd (no torch needed).

    Each process (node) creates one, then calls :meth:`join` for every round it wants
    to take part in; it gets an :class:`Assignment` (round, rank, world size, members).
    :meth:`num_nodes_waiting` > 0 tells the members that nodes wait for a new round;
    listeners added with :meth:`add_listener` (or :meth:`wait_for_change`) hear of
    lost members, waiting nodes, new rounds and closing. :meth:`leave` withdraws this
    node; :meth:`close` ends the rendezvous for everyone.

    Timeouts are seconds. ``lease_ttl`` is how long a silent (dead or paused) node
    keeps its place. ``fast_quorum`` completes a re-rendezvous as soon as every live
    member of the previous round has rejoined, instead of waiting out the last call.
    """

    def __init__(
        self,
        client: EtcdClient,
        run_id: str,
        min_nodes: int,
        max_nodes: int,
        *,
        node_id: str | None = None,
        node_data: Mapping[str, str] | None = None,
        last_call_timeout: float = 30.0,
        join_timeout: float = 600.0,
        close_timeout: float = 30.0,
        lease_ttl: int = 10,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        fast_quorum: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if join_timeout <= 0 or close_timeout <= 0:
            raise ValueError("join_timeout and close_timeout must be positive")
        if lease_ttl < 1:
            raise ValueError(f"lease_ttl must be at least 1 second, got {lease_ttl}")
        self.run_id = check_run_id(run_id)
        self.node_id = check_node_id(node_id or default_node_id())
        self.config = m.Config(
            self.node_id,
            min_nodes,
            max_nodes,
            last_call_timeout=last_call_timeout,
            fast_quorum=fast_quorum,
        )
        self.keys = Keys(run_id, key_prefix)
        self.join_timeout = join_timeout
        self.close_timeout = close_timeout
        self.lease_ttl = lease_ttl
        self._client = client
        self._data = dict(node_data or {})
        self._clock = clock
        self._machine = m.Machine(self.config)
        self._state = m.State()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._lease: Lease | None = None
        self._watch: Watch | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._result: Assignment | RendezvousError | None = None
        self._error: RendezvousError | None = None  # fatal: raised by every later call
        self._changes: collections.deque[Change] = collections.deque(maxlen=1000)
        self._listeners: list[Callable[[Change], None]] = []
        self._outbox: list[Change] = []
        self._depth = 0

    # --- public API -----------------------------------------------------------------

    def join(self, timeout: float | None = None) -> Assignment:
        """Join the next round; return this node's assignment once it is committed.

        A member calling ``join`` again asks for a new round (re-rendezvous). Raises
        RendezvousTimeoutError after ``timeout`` (default ``join_timeout``) -- except
        for a hot spare, which waits like torch's redundancy list until a place frees
        up -- RendezvousClosedError once the rendezvous is closed.
        """
        timeout = self.join_timeout if timeout is None else timeout
        deadline = self._clock() + timeout
        with self._cond:
            self._start()
            self._result = None
            self._feed(m.Join(deadline, self._data, timeout))
            while True:
                self._raise_fatal()
                result = self._join_result()
                if isinstance(result, Assignment):
                    return result
                if isinstance(result, RendezvousError):
                    raise result
                current = self._state.join_deadline  # renewed when a spare is promoted
                wait = (current if current is not None else deadline) - self._clock()
                if wait <= 0:
                    self._feed(m.Tick())
                    wait = 1.0  # a hot spare past the deadline: keep waiting for a place
                self._cond.wait(min(wait, 1.0))
                self._dispatch()

    def _join_result(self) -> Assignment | RendezvousError | None:
        return self._result

    def num_nodes_waiting(self) -> int:
        """Nodes waiting for a new round while this one runs (torch's meaning)."""
        with self._lock:
            self._raise_fatal()
            if self._thread is not None:
                return m.num_nodes_waiting(self.config, self._state)
        status = self._read_status()
        return status.waiting if status is not None else 0

    def is_closed(self) -> bool:
        """True once any node closed the rendezvous."""
        with self._lock:
            self._raise_fatal()
            if self._thread is not None:
                return self._state.closed
        return self._client.get(self.keys.closed) is not None

    def close(self, timeout: float | None = None) -> None:
        """Close the rendezvous for everyone (the job is over); wait until it is seen."""
        deadline = self._clock() + (self.close_timeout if timeout is None else timeout)
        with self._cond:
            if self._thread is None:
                self._put_closed()
                return
            self._feed(m.Close())
            while not self._state.closed:
                self._raise_fatal()
                wait = deadline - self._clock()
                if wait <= 0:
                    raise RendezvousTimeoutError(
                        f"closing rendezvous {self.run_id!r} was not confirmed in time",
                        run_id=self.run_id,
                    )
                self._cond.wait(min(wait, 1.0))
        self._dispatch()

    def leave(self) -> None:
        """Withdraw this node (its key and any leadership go at once); idempotent."""
        with self._cond:
            if self._thread is not None and self._state.phase is not m.Phase.LEFT:
                try:
                    self._feed(m.Leave())
                except EtcdClientError as exc:
                    log.warning("node %s could not revoke its lease: %s", self.node_id, exc)
            self._stop()
        self._dispatch()

    @property
    def assignment(self) -> Assignment | None:
        """The last assignment this node received (None before the first round)."""
        with self._lock:
            return self._state.assignment

    @property
    def is_leader(self) -> bool:
        with self._lock:
            return m.is_leader(self.config, self._state)

    def add_listener(self, callback: Callable[[Change], None]) -> None:
        """Call ``callback(change)`` (from an internal thread) on every membership change."""
        with self._lock:
            self._listeners.append(callback)

    def wait_for_change(self, timeout: float) -> Change | None:
        """The oldest change not yet taken, waiting up to ``timeout`` seconds for one."""
        deadline = self._clock() + timeout
        with self._cond:
            while not self._changes:
                self._raise_fatal()
                wait = deadline - self._clock()
                if wait <= 0:
                    return None
                self._cond.wait(wait)
            return self._changes.popleft()

    def __enter__(self) -> Rendezvous:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.leave()

    def __repr__(self) -> str:
        return (
            f"<Rendezvous {self.run_id!r} node={self.node_id!r} "
            f"phase={self._state.phase.value} round={self._state.round_number}>"
        )

    # --- the loop ---------------------------------------------------------------------

    def _start(self) -> None:
        """Grant a lease and start watching (first join, or after the lease was lost)."""
        if self._state.phase is m.Phase.LEFT:
            raise RendezvousLeftError(
                f"node {self.node_id!r} left rendezvous {self.run_id!r}", run_id=self.run_id
            )
        if self._lease is None or self._lease.is_lost:
            self._lease = self._client.lease(self.lease_ttl, on_lost=self._on_lease_lost)
        if self._thread is None:
            self._stopping.clear()
            self._resync(m.scope(self.config, self._state))
            self._thread = threading.Thread(
                target=self._run, name=f"rendezvous {self.run_id} {self.node_id}", daemon=True
            )
            self._thread.start()

    def _stop(self) -> None:
        self._stopping.set()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._lease is not None:
            self._lease.close()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            self._cond.release()
            try:
                thread.join(timeout=self._client.timeout + 2.0)
            finally:
                self._cond.acquire()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                with self._lock:
                    watch = self._watch
                    deadline = m.next_deadline(self.config, self._state)
                if watch is None:
                    return
                timeout = 1.0 if deadline is None else max(0.0, deadline - self._clock())
                event = watch.next_event(timeout=min(timeout, 1.0))
                with self._cond:
                    if self._stopping.is_set():
                        return
                    if event is not None:
                        self._on_watch_event(event.type, event.kv)
                    elif deadline is not None and self._clock() >= deadline:
                        self._feed(m.Tick())
                    self._cond.notify_all()
                self._dispatch()
        except RendezvousError as exc:
            self._fatal(exc)
        except EtcdClientError as exc:
            self._fatal(
                RendezvousError(
                    f"rendezvous {self.run_id!r} lost its connection to etcd: {exc}",
                    run_id=self.run_id,
                )
            )
            self._fatal_cause(exc)

    def _fatal(self, exc: RendezvousError) -> None:
        log.error("rendezvous %s (node %s) stopped: %s", self.run_id, self.node_id, exc)
        with self._cond:
            self._error = exc
            self._cond.notify_all()

    def _fatal_cause(self, cause: BaseException) -> None:
        if self._error is not None:
            self._error.__cause__ = cause

    def _raise_fatal(self) -> None:
        if self._error is not None:
            raise self._error

    def _on_lease_lost(self, error: EtcdClientError) -> None:
        with self._cond:
            if self._thread is not None and not self._stopping.is_set():
                self._feed(m.LeaseLost())
                self._cond.notify_all()
        self._dispatch()

    def _on_watch_event(self, kind: str, kv: object) -> None:
        from etcd_rendezvous.client import KeyValue

        if not isinstance(kv, KeyValue):  # pragma: no cover - the client's contract
            raise TypeError(kv)
        key = kv.key.decode("utf-8", "replace")
        event = key_event(
            self.keys,
            key,
            kv.value if kind == "PUT" else None,
            create_revision=kv.create_revision,
            mod_revision=kv.mod_revision,
        )
        if event is not None:
            self._feed(event)

    # --- feeding the machine and doing what it says ------------------------------------

    def _feed(self, event: m.Event) -> None:
        """Step the machine and perform its actions (called with the lock held)."""
        self._state, actions = self._machine.step(self._state, event, self._clock())
        for action in actions:
            self._do(action)

    def _do(self, action: m.Action) -> None:
        client, keys = self._client, self.keys
        lease_id = self._lease.id if self._lease is not None else None
        if isinstance(action, m.PutNode):
            self._put_node(action)
        elif isinstance(action, m.DeleteNode):
            if lease_id is not None:
                client.txn(
                    [Compare.lease(keys.node(self.node_id), "==", lease_id)],
                    [Op.delete(keys.node(self.node_id))],
                )
        elif isinstance(action, m.RevokeLease):
            lease, self._lease = self._lease, None
            if lease is not None:
                lease.revoke()
        elif isinstance(action, m.AcquireLeadership):
            if lease_id is not None and not self._stopping.is_set():
                won = client.txn(
                    [Compare.create_revision(keys.leader, "==", 0)],
                    [Op.put(keys.leader, encode(LeaderRecord(self.node_id)), lease=lease_id)],
                ).succeeded
                if won:
                    log.info("node %s leads rendezvous %s", self.node_id, self.run_id)
        elif isinstance(action, m.Resync):
            self._resync(action.scope)
        elif isinstance(action, m.CommitRound):
            self._commit(action, lease_id)
        elif isinstance(action, m.PublishStatus):
            if lease_id is not None:
                client.txn(
                    [Compare.lease(keys.leader, "==", lease_id)],
                    [Op.put(keys.status, encode(action.record))],
                )
        elif isinstance(action, m.PutClosed):
            self._put_closed()
        elif isinstance(action, m.Deliver):
            self._result = action.assignment
            log.info(
                "node %s joined round %d of rendezvous %s as rank %d of %d",
                self.node_id,
                action.assignment.round,
                self.run_id,
                action.assignment.rank,
                action.assignment.world_size,
            )
        elif isinstance(action, m.Fail):
            error = _FAILURES[action.failure]
            self._result = error(
                f"rendezvous {self.run_id!r}, node {self.node_id!r}: {action.message}",
                run_id=self.run_id,
            )
        elif isinstance(action, m.Notify):
            self._changes.append(action.change)
            self._outbox.append(action.change)
        self._cond.notify_all()

    def _put_node(self, action: m.PutNode) -> None:
        if self._lease is None or self._lease.is_lost:
            self._lease = self._client.lease(self.lease_ttl, on_lost=self._on_lease_lost)
        key = self.keys.node(self.node_id)
        current = self._client.get(key)
        if current is not None and current.lease not in (0, self._lease.id):
            # The same node id under another lease: our previous incarnation (a restart).
            # Revoke it so that its key and any leadership vanish now, not at expiry.
            log.warning(
                "node %s restarted: revoking its previous lease %x", self.node_id, current.lease
            )
            with contextlib.suppress(EtcdLeaseNotFoundError):
                self._client.lease_revoke(current.lease)
        self._client.put(key, encode(action.record), lease=self._lease.id)

    def _commit(self, action: m.CommitRound, lease_id: int | None) -> None:
        keys = self.keys
        if lease_id is None:
            return
        record = dataclasses.replace(action.record, time=_utc_now())
        guard = (
            Compare.create_revision(keys.round, "==", 0)
            if action.prev_revision == 0
            else Compare.mod_revision(keys.round, "==", action.prev_revision)
        )
        response = self._client.txn(
            [guard, Compare.lease(keys.leader, "==", lease_id)],
            [Op.put(keys.round, encode(record))],
        )
        if response.succeeded:
            log.info(
                "node %s committed round %d of rendezvous %s: %d members (%s)",
                self.node_id,
                record.round,
                self.run_id,
                len(record.members),
                record.reason,
            )
        else:
            log.debug("commit of round %d lost a race; resyncing", record.round)
            self._resync(m.scope(self.config, self._state))

    def _put_closed(self) -> None:
        self._client.txn(
            [Compare.create_revision(self.keys.closed, "==", 0)],
            [Op.put(self.keys.closed, encode(ClosedRecord(self.node_id, _utc_now())))],
        )

    def _resync(self, scope: m.Scope) -> None:
        """Read everything in ``scope`` at one revision, then watch from the next one."""
        prefix = self.keys.root if scope is m.Scope.ALL else self.keys.ctl
        response = self._client.range(prefix, prefix=True)
        kvs = [
            (kv.key.decode("utf-8", "replace"), kv.value, kv.create_revision, kv.mod_revision)
            for kv in response.kvs
        ]
        snap = snapshot(self.keys, response.revision, kvs, with_nodes=scope is m.Scope.ALL)
        old, self._watch = self._watch, None
        if old is not None:
            old.cancel()
        if not self._stopping.is_set():
            self._watch = self._client.watch(
                prefix, prefix=True, start_revision=response.revision + 1
            )
        self._feed(snap)

    def _read_status(self) -> StatusRecord | None:
        kv = self._client.get(self.keys.status)
        if kv is None:
            return None
        return decode_as(StatusRecord, kv.value, key=self.keys.status, run_id=self.run_id)

    def _dispatch(self) -> None:
        """Call listeners outside the lock."""
        with self._lock:
            changes, self._outbox = self._outbox, []
            listeners = list(self._listeners)
        for change in changes:
            for callback in listeners:
                try:
                    callback(change)
                except Exception:
                    log.exception("rendezvous listener %r failed on %s", callback, change)


__all__ = ["Rendezvous", "default_node_id"]
