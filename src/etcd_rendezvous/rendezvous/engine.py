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
import functools
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, TypeVar

from etcd_rendezvous.client import (
    Compare,
    EtcdClient,
    Lease,
    Op,
    RangeResponse,
    Retry,
    TxnResponse,
    Watch,
)
from etcd_rendezvous.errors import (
    EtcdClientError,
    EtcdLeaseNotFoundError,
    EtcdTimeoutError,
    EtcdUnavailableError,
)
from etcd_rendezvous.rendezvous import _machine as m
from etcd_rendezvous.rendezvous import _probe
from etcd_rendezvous.rendezvous._errors import (
    RendezvousClosedError,
    RendezvousConfigError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousLeftError,
    RendezvousTimeoutError,
)
from etcd_rendezvous.rendezvous._hub import Batch, Hub, hub_for
from etcd_rendezvous.rendezvous._machine import Assignment, Change
from etcd_rendezvous.rendezvous._observe import key_event, snapshot
from etcd_rendezvous.rendezvous._records import (
    DEFAULT_KEY_PREFIX,
    ClosedRecord,
    ConfigRecord,
    Keys,
    LeaderRecord,
    NodeRecord,
    RoundRecord,
    StatusRecord,
    check_node_id,
    check_run_id,
    decode,
    decode_as,
    encode,
)
from etcd_rendezvous.rendezvous._threads import guarded

log = logging.getLogger(__name__)

_ids = itertools.count()

DEFAULT_LEASE_TTL = 3
"""Seconds a silent node keeps its place (see :class:`Rendezvous` for the choice)."""
_T = TypeVar("_T")


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
    m.Failure.ETCD: RendezvousError,
}


class _LeaderWatch:
    """The leader's private watch of the whole run prefix, opened by its decision loop.

    ``cancel()`` may come before the stream is up: :meth:`attach` then cancels it.
    """

    def __init__(self, prefix: str, start_revision: int) -> None:
        self.prefix = prefix
        self.start_revision = start_revision
        self._lock = threading.Lock()
        self._watch: Watch | None = None
        self._cancelled = False

    def attach(self, watch: Watch) -> bool:
        """Hold the opened ``watch``; False (and cancelled) if we were cancelled already."""
        with self._lock:
            if not self._cancelled:
                self._watch = watch
                return True
        watch.cancel()
        return False

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()


class Rendezvous:
    """An elastic rendezvous of ``min_nodes..max_nodes`` nodes on etcd (no torch needed).

    Each process (node) creates one, then calls :meth:`join` for every round it wants
    to take part in; it gets an :class:`Assignment` (round, rank, world size, members).
    :meth:`num_nodes_waiting` > 0 tells the members that nodes wait for a new round;
    listeners added with :meth:`add_listener` (or :meth:`wait_for_change`) hear of
    lost members, waiting nodes, new rounds and closing. :meth:`leave` withdraws this
    node; :meth:`close` ends the rendezvous for everyone.

    Timeouts are seconds. ``lease_ttl`` is how long a silent (dead or paused) node
    keeps its place; its lease is refreshed every ``keepalive_interval`` seconds
    (default ``lease_ttl / 6``). ``fast_quorum`` (default on) completes a
    re-rendezvous as soon as every live member of the previous round has rejoined,
    instead of waiting out the last call (which still applies to the first round and
    when new nodes arrive meanwhile). ``probe`` (default on) makes this process answer
    liveness probes on one TCP port, published with the node as
    ``token@probe_host:port`` (``probe_host`` defaults to the host name): when members
    rejoin and others have not, the leader probes the late ones and revokes the lease of
    any whose process is gone, so a SIGKILLed node costs no lease TTL; a paused or
    unreachable one is left to its lease (see ``_probe.py``).

    Defaults, and why (issue 5): ``lease_ttl=3`` with a keep-alive every 0.5 s. A
    SIGKILLed node's key vanishes 3-3.5 s after its last keep-alive (the TTL, plus up
    to 0.5 s for etcd's expiry sweep); its leader publishes the loss at once, the
    survivors rejoin and the fast quorum commits the next round within tens of
    milliseconds: about 3.5 s from kill to new assignment (``benchmarks/
    engine_recovery.py``), against 42-48 s for torch's defaults. A node that stops for
    less than ``lease_ttl - keepalive_interval`` = 2.5 s (GC, swap, SIGSTOP, a
    saturated CPU) keeps its lease and costs no round; the keep-alive runs on its own
    thread, so a busy caller does not delay it. Lower TTLs evict paused nodes too
    eagerly (and etcd rounds a TTL up to its minimum, 1.5 x the election timeout:
    with etcd's default 1 s election timeout, 2 s); higher ones delay recovery by the
    same amount. One keep-alive per node every 0.5 s is 2 requests/s per node: 2,000/s
    for 1,000 nodes, well within one etcd's capacity.
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
        lease_ttl: int = DEFAULT_LEASE_TTL,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        fast_quorum: bool = True,
        clock: Callable[[], float] = time.monotonic,
        retry: Retry | None = None,
        keepalive_interval: float | None = None,
        probe: bool = True,
        probe_host: str | None = None,
    ) -> None:
        if join_timeout <= 0 or close_timeout <= 0:
            raise ValueError("join_timeout and close_timeout must be positive")
        if lease_ttl < 1:
            raise ValueError(f"lease_ttl must be at least 1 second, got {lease_ttl}")
        if keepalive_interval is None:
            keepalive_interval = lease_ttl / 6.0
        if not 0 < keepalive_interval < lease_ttl:
            raise ValueError(
                f"keepalive_interval must be in (0, lease_ttl={lease_ttl}), "
                f"got {keepalive_interval}"
            )
        self.run_id = check_run_id(run_id)
        self.node_id = check_node_id(node_id or default_node_id())
        self.probe = ""  # token@host:port where this process answers liveness probes
        if probe:
            try:
                self.probe = _probe.listener().address(probe_host or socket.gethostname())
            except OSError as exc:  # no port to listen on: the leases alone decide
                log.warning("rendezvous %s: no liveness probes (%s)", run_id, exc)
        self.config = m.Config(
            self.node_id,
            min_nodes,
            max_nodes,
            last_call_timeout=last_call_timeout,
            fast_quorum=fast_quorum,
            probe=self.probe,
        )
        self.keys = Keys(run_id, key_prefix)
        self.join_timeout = join_timeout
        self.close_timeout = close_timeout
        self.lease_ttl = lease_ttl
        self.keepalive_interval = keepalive_interval
        self._config_checked = False
        self._client = client
        self._data = dict(node_data or {})
        self._clock = clock
        self._machine = m.Machine(self.config)
        self._state = m.State()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._retry = retry if retry is not None else Retry(deadline=30.0, max_delay=1.0)
        self._hub: Hub | None = None
        self._active = False  # following etcd (between the first join and leave/stop)
        self._floor = 0  # revision of our last snapshot: hub events up to it are known
        self._rev = 0  # the newest revision fed to the machine
        self._lease: Lease | None = None  # the node lease (kept alive by the hub's keeper)
        self._leader_lease: Lease | None = None  # the leader key's (kept alive by _lead)
        self._leader_refreshed = 0.0
        self._watch: _LeaderWatch | None = None  # while leading: the whole run prefix
        self._thread: threading.Thread | None = None  # while leading: the decision loop
        self._stopping = threading.Event()
        self._result: Assignment | RendezvousError | None = None
        self._error: RendezvousError | None = None  # fatal: raised by every later call
        self._changes: collections.deque[Change] = collections.deque(maxlen=1000)
        self._listeners: list[Callable[[Change], None]] = []
        self._outbox: list[Change] = []
        self._depth = 0
        self._cause: BaseException | None = None  # why the last action failed (for Fail)
        self._io_deadline: float | None = None  # retries stop by then (a join is waiting)

    # --- public API -----------------------------------------------------------------

    def join(
        self, timeout: float | None = None, *, data: Mapping[str, str] | None = None
    ) -> Assignment:
        """Join the next round; return this node's assignment once it is committed.

        ``data`` is published with this join on top of the ``node_data`` given at
        construction (e.g. a port reserved for this round); every member finds it in
        :attr:`Assignment.data` under this node's id.

        A member calling ``join`` again asks for a new round (re-rendezvous). Raises
        RendezvousTimeoutError after ``timeout`` (default ``join_timeout``) -- except
        for a hot spare, which waits like torch's redundancy list until a place frees
        up -- RendezvousClosedError once the rendezvous is closed.
        """
        timeout = self.join_timeout if timeout is None else timeout
        deadline = self._clock() + timeout
        with self._boundary(deadline), self._cond:
            self._start()
            self._result = None
            self._feed(m.Join(deadline, {**self._data, **(data or {})}, timeout))
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
            if self._active:
                return m.num_nodes_waiting(self.config, self._state)
        with self._boundary():
            status = self._read_status()
        return status.waiting if status is not None else 0

    def is_closed(self) -> bool:
        """True once any node closed the rendezvous."""
        with self._lock:
            self._raise_fatal()
            if self._active:
                return self._state.closed
        with self._boundary():
            return self._etcd(self._client.get, self.keys.closed) is not None

    def close(self, timeout: float | None = None) -> None:
        """Close the rendezvous for everyone (the job is over); wait until it is seen."""
        deadline = self._clock() + (self.close_timeout if timeout is None else timeout)
        with self._boundary(deadline), self._cond:
            if not self._active:
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
            if self._active and self._state.phase is not m.Phase.LEFT:
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

    # --- starting and stopping ------------------------------------------------------------

    def _start(self) -> None:
        """Join the hub, grant a lease, read and follow the state (first join, or after a loss)."""
        if self._state.phase is m.Phase.LEFT:
            raise RendezvousLeftError(
                f"node {self.node_id!r} left rendezvous {self.run_id!r}", run_id=self.run_id
            )
        try:
            if self._hub is None:
                self._hub = hub_for(self._client, self.keys, self._retry, self)
            if not self._config_checked:
                self._check_config()
            if not self._lease_ok():
                self._new_lease()
            if not self._active:
                self._stopping.clear()
                self._active = True
                self._resync(m.scope(self.config, self._state))
        except BaseException:
            self._teardown()
            raise

    def _stop(self) -> None:
        self._stopping.set()
        self._teardown()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            self._cond.release()
            try:
                thread.join(timeout=self._client.timeout + 2.0)
            finally:
                self._cond.acquire()

    def _teardown(self) -> None:
        """Leave the hub, stop the private watch, stop keeping the leases alive (no revoke)."""
        self._active = False
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
        lease, self._lease = self._lease, None
        hub, self._hub = self._hub, None
        if lease is not None:
            if hub is not None:
                hub.keeper.remove(lease)
            lease.close()
        self._leader_lease = None
        if hub is not None:
            hub.unregister(self)

    def _check_config(self) -> None:
        """Write the run's settings if we are first, else check ours agree with them."""
        mine = ConfigRecord(
            min_nodes=self.config.min_nodes,
            max_nodes=self.config.max_nodes,
            last_call_timeout=self.config.last_call_timeout,
            join_timeout=self.join_timeout,
            close_timeout=self.close_timeout,
            lease_ttl=self.lease_ttl,
            fast_quorum=self.config.fast_quorum,
            by=self.node_id,
            time=_utc_now(),
        )
        hub = self._hub
        if hub is not None and hub.config is not None:
            self._compare_config(mine, hub.config)  # another node of this process read it
            return
        key = self.keys.config
        response = self._etcd(
            self._client.txn,
            [Compare.create_revision(key, "==", 0)],
            [Op.put(key, encode(mine))],
            [Op.get(key)],
        )
        if response.succeeded:
            run = mine
        else:
            got = response.responses[0] if response.responses else None
            if not isinstance(got, RangeResponse) or not got.kvs:  # pragma: no cover - deleted
                return
            run = decode_as(ConfigRecord, got.kvs[0].value, key=key, run_id=self.run_id)
        if hub is not None:
            hub.config = run
        self._compare_config(mine, run)

    def _compare_config(self, mine: ConfigRecord, run: ConfigRecord) -> None:
        if (run.min_nodes, run.max_nodes) != (mine.min_nodes, mine.max_nodes):
            self._config_checked = False
            raise RendezvousConfigError(
                f"node {self.node_id!r} joins rendezvous {self.run_id!r} with "
                f"min_nodes={mine.min_nodes} max_nodes={mine.max_nodes}, but the run was "
                f"started (by node {run.by!r}) with min_nodes={run.min_nodes} "
                f"max_nodes={run.max_nodes}: use the same settings on every node, or "
                "another run id",
                run_id=self.run_id,
            )
        self._config_checked = True
        differ = [
            f"{name}={getattr(mine, name)!r} (run: {getattr(run, name)!r})"
            for name in ("last_call_timeout", "lease_ttl", "fast_quorum")
            if getattr(mine, name) != getattr(run, name)
        ]
        if differ:
            log.warning(
                "node %s of rendezvous %s has other settings than the run: %s",
                self.node_id,
                self.run_id,
                ", ".join(differ),
            )

    # --- leases -------------------------------------------------------------------------

    def _lease_ok(self) -> bool:
        return self._lease is not None and not self._lease.is_lost

    def _new_lease(self) -> Lease:
        lease = self._etcd(self._client.lease, self.lease_ttl, keep_alive=False)
        self._lease = lease
        if self._hub is not None:
            self._hub.keeper.add(
                lease,
                lambda error: self._on_lease_lost(lease, error),
                interval=self.keepalive_interval,
            )
        return lease

    def _on_lease_lost(self, lease: Lease, error: EtcdClientError) -> None:
        """The keeper could not refresh our node lease: our key is gone (or going)."""
        with self._cond:
            if self._lease is not lease or not self._active or self._stopping.is_set():
                return
            log.warning(
                "node %s of rendezvous %s lost its lease: %s", self.node_id, self.run_id, error
            )
            self._lease = None
            lease.close()
            self._drop_leadership()
            self._feed(m.LeaseLost())
            self._cond.notify_all()
        self._dispatch()

    def _drop_leadership(self) -> None:
        """Revoke the leader lease, so that the leader key (if ours) vanishes at once."""
        lease, self._leader_lease = self._leader_lease, None
        if lease is not None and self._state.leader == self.node_id:
            try:
                with self._slots():
                    lease.revoke()
            except EtcdClientError as exc:  # it expires by itself within its TTL
                log.warning("node %s could not revoke its leader lease: %s", self.node_id, exc)

    def _refresh_leadership(self) -> None:
        """Keep the leader key alive; called from the decision loop only (see the module doc)."""
        lease = self._leader_lease
        if lease is None or self._state.leader != self.node_id:
            return
        now = self._clock()
        if now < self._leader_refreshed + self.keepalive_interval:
            return
        try:
            with self._slots():
                lease.refresh()
        except EtcdLeaseNotFoundError:
            log.warning(
                "node %s lost the leadership of rendezvous %s: its leader lease expired",
                self.node_id,
                self.run_id,
            )
            self._leader_lease = None  # the leader key is gone: the watch tells everyone
        except EtcdClientError as exc:
            log.warning("node %s could not refresh its leader lease: %s", self.node_id, exc)
        else:
            self._leader_refreshed = now

    # --- etcd calls ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _boundary(self, deadline: float | None = None) -> Iterator[None]:
        """The public methods' one translation of client errors into rendezvous errors.

        With ``deadline`` (a join's or close's), every retry of this node meanwhile stops
        by then, in the caller's thread and in the loops that hold the lock it waits for:
        the call returns or raises within its timeout plus one request's timeout."""
        if deadline is not None:
            self._io_deadline = deadline
        try:
            yield
        except EtcdClientError as exc:
            raise self._connection_error(exc) from exc
        finally:
            if deadline is not None:
                self._io_deadline = None

    def _slots(self) -> contextlib.AbstractContextManager[object]:
        return self._hub.io if self._hub is not None else contextlib.nullcontext()

    def _etcd(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Call the client, retrying transient errors (unreachable, timeout) with ``retry``.

        Every request the engine sends is safe to repeat: writes are guarded by a txn
        compare, or put the same value again. The error surfaces once the retry gives up.
        """
        return self._etcd_with(self._retry, fn, *args, **kwargs)

    def _etcd_with(self, policy: Retry, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """:meth:`_etcd` with its own retry policy (cut short by the caller's deadline)."""
        retry = policy.copy()
        bound = self._io_deadline
        while True:
            try:
                with self._slots():
                    return fn(*args, **kwargs)
            except (EtcdUnavailableError, EtcdTimeoutError) as exc:
                delay = retry.next_delay()
                if (
                    delay is None
                    or self._stopping.is_set()
                    or (bound is not None and self._clock() + delay > bound)
                ):
                    raise
                log.warning(
                    "rendezvous %s, node %s: %s; retrying in %.2fs",
                    self.run_id,
                    self.node_id,
                    exc,
                    delay,
                )
                self._stopping.wait(delay)

    # --- following etcd ----------------------------------------------------------------------

    def _take(self, batch: Batch) -> None:
        """A batch of ``ctl/`` events from the hub (called from the hub's thread)."""
        with self._cond:
            if not self._active or self._stopping.is_set() or self._watch is not None:
                return
            events: list[m.Event] = []
            newest = self._rev
            try:
                for revision, item in batch:
                    if revision <= self._floor:
                        continue  # already in our last snapshot
                    if isinstance(item, RendezvousError):
                        raise item
                    events.append(item)
                    newest = max(newest, revision)
                if events:
                    self._rev = newest
                    self._feed_batch(events)
            except RendezvousError as exc:
                self._fatal_locked(exc)
            except EtcdClientError as exc:
                self._fatal_locked(self._connection_error(exc))
            self._cond.notify_all()
        self._dispatch()

    def _hub_resync(self) -> None:
        """The hub's watch was recreated: read ``ctl/`` again."""
        with self._cond:
            if not self._active or self._stopping.is_set() or self._watch is not None:
                return
            try:
                self._resync(m.Scope.CONTROL)
            except RendezvousError as exc:
                self._fatal_locked(exc)
            except EtcdClientError as exc:
                self._fatal_locked(self._connection_error(exc))
            self._cond.notify_all()
        self._dispatch()

    def _hub_failed(self, error: BaseException) -> None:
        """The hub's watch gave up, or its thread died: no more ``ctl/`` events for us."""
        with self._cond:
            if isinstance(error, EtcdClientError):
                self._fatal_locked(self._connection_error(error))
            else:
                self._fatal_locked(self._died_error("the rendezvous-hub thread", error))

    def _thread_died(self, error: BaseException) -> None:
        """The decision loop raised something it does not handle: fail every caller."""
        self._fatal(self._died_error("the leader's decision loop", error))

    def _died_error(self, what: str, exc: BaseException) -> RendezvousError:
        if isinstance(exc, RendezvousError):
            return exc
        error = RendezvousError(
            f"rendezvous {self.run_id!r} (node {self.node_id!r}) stopped: {what} died of "
            f"{type(exc).__name__}: {exc} (a bug: please report it with the log)",
            run_id=self.run_id,
        )
        error.__cause__ = exc
        return error

    def _lead(self, leading: _LeaderWatch) -> None:
        """The leader's decision loop, on its private watch of the whole run prefix."""
        try:
            opened = self._etcd(
                self._client.watch,
                leading.prefix,
                prefix=True,
                start_revision=leading.start_revision,
            )
            if not leading.attach(opened):
                return  # stepped down or stopped while the watch was being created
            watch = leading
            while not self._stopping.is_set():
                with self._lock:
                    if self._watch is not watch:
                        return  # stepped down, or a newer watch (and loop) took over
                    deadline = m.next_deadline(self.config, self._state)
                    lease = self._leader_lease
                now = self._clock()
                wake = now + 1.0
                if deadline is not None:
                    wake = min(wake, deadline)
                if lease is not None:
                    wake = min(wake, self._leader_refreshed + self.keepalive_interval)
                try:
                    events = self._read(opened, max(0.0, wake - now))
                    failure: EtcdClientError | None = None
                except EtcdClientError as exc:  # the watch gave up, or history was compacted
                    events, failure = [], exc
                with self._cond:
                    if self._stopping.is_set() or self._watch is not watch:
                        continue
                    if failure is not None:
                        log.warning(
                            "leader watch of %s failed (%s); resyncing", self.run_id, failure
                        )
                        self._resync(m.Scope.ALL)
                        continue
                    self._refresh_leadership()
                    if events:
                        self._feed_batch(events)
                    elif deadline is not None and self._clock() >= deadline:
                        self._feed(m.Tick())
                    if (
                        self._watch is watch
                        and m.scope(self.config, self._state) is m.Scope.CONTROL
                    ):
                        self._resync(m.Scope.CONTROL)
                    self._cond.notify_all()
                self._dispatch()
        except RendezvousError as exc:
            self._fatal(exc)
        except EtcdClientError as exc:
            self._fatal(self._connection_error(exc))

    def _read(self, watch: Watch, timeout: float) -> list[m.Event]:
        """Everything the private watch has ready, waiting up to ``timeout`` for the first."""
        event = watch.next_event(timeout=timeout)
        events: list[m.Event] = []
        while event is not None:
            kv = event.kv
            decoded = key_event(
                self.keys,
                kv.key.decode("utf-8", "replace"),
                kv.value if event.type == "PUT" else None,
                create_revision=kv.create_revision,
                mod_revision=kv.mod_revision,
            )
            self._rev = max(self._rev, kv.mod_revision)
            if decoded is not None:
                events.append(decoded)
            event = watch.next_event(timeout=0)
        return events

    def _connection_error(self, exc: EtcdClientError) -> RendezvousError:
        what = (
            "lost its connection to etcd"
            if isinstance(exc, EtcdUnavailableError | EtcdTimeoutError)
            else "got an error from etcd"
        )
        error = RendezvousError(
            f"rendezvous {self.run_id!r} (node {self.node_id!r}) {what}: {exc}",
            run_id=self.run_id,
        )
        error.__cause__ = exc
        return error

    def _fatal(self, exc: RendezvousError) -> None:
        with self._cond:
            self._fatal_locked(exc)

    def _fatal_locked(self, exc: RendezvousError) -> None:
        log.error("rendezvous %s (node %s) stopped: %s", self.run_id, self.node_id, exc)
        self._error = exc
        self._cond.notify_all()

    def _raise_fatal(self) -> None:
        if self._error is not None:
            raise self._error

    # --- feeding the machine and doing what it says ------------------------------------

    def _feed(self, event: m.Event) -> None:
        """Step the machine and perform its actions (called with the lock held)."""
        self._state, actions = self._machine.step(self._state, event, self._clock())
        self._perform(actions)

    def _perform(self, actions: list[m.Action]) -> None:
        """Carry out ``actions`` in order, then report their outcomes to the machine."""
        outcomes = [outcome for action in actions if (outcome := self._do(action)) is not None]
        for outcome in outcomes:
            self._feed(outcome)

    def _feed_batch(self, events: list[m.Event]) -> None:
        prober = _probe.prober()
        for event in events:  # verify probe addresses in the background, before need
            if isinstance(event, m.NodePut) and event.entry.probe not in ("", self.probe):
                prober.learn(event.entry.probe)
            elif isinstance(event, m.LeaderChanged) and event.probe and event.probe != self.probe:
                prober.learn(event.probe)
        self._state, actions = self._machine.step_batch(self._state, events, self._clock())
        self._perform(actions)

    def _do(self, action: m.Action) -> m.Event | None:
        """Perform one action; the event reporting its outcome, if the machine needs it."""
        client, keys = self._client, self.keys
        outcome: m.Event | None = None
        if isinstance(action, m.PutNode):
            outcome = self._put_node(action)
        elif isinstance(action, m.DeleteNode):
            outcome = self._delete_node(action)
        elif isinstance(action, m.RevokeLease):
            if action.farewell is not None and self._lease_ok() and self._lease is not None:
                self._farewell(action.farewell, self._lease.id)
            self._drop_leadership()
            lease, self._lease = self._lease, None
            if lease is not None:
                if self._hub is not None:
                    self._hub.keeper.remove(lease)
                # Retried for one TTL at most: by then etcd has dropped the lease anyway
                # (e.g. the agent hosting an embedded etcd stopped it before we left).
                with contextlib.suppress(EtcdLeaseNotFoundError):
                    self._etcd_with(
                        Retry(deadline=float(self.lease_ttl), max_delay=0.5), lease.revoke
                    )
        elif isinstance(action, m.AcquireLeadership):
            self._acquire()
        elif isinstance(action, m.Resync):
            self._resync(action.scope)
        elif isinstance(action, m.CommitRound):
            outcome = self._commit(action)
        elif isinstance(action, m.PublishStatus):
            if self._leader_lease is not None:
                self._etcd(
                    client.txn,
                    [Compare.lease(keys.leader, "==", self._leader_lease.id)],
                    [Op.put(keys.status, encode(action.record))],
                )
        elif isinstance(action, m.PutClosed):
            self._put_closed()
        elif isinstance(action, m.ProbeNodes):
            prober = _probe.prober()
            for node_id, probe in action.targets:
                prober.submit(probe, functools.partial(self._probed, node_id, probe))
        elif isinstance(action, m.Deliver):
            self._result = action.assignment
            log.info(
                "node %s joined round %d of rendezvous %s as rank %d of %d (%s)",
                self.node_id,
                action.assignment.round,
                self.run_id,
                action.assignment.rank,
                action.assignment.world_size,
                action.assignment.reason or "no reason given",
            )
        elif isinstance(action, m.Fail):
            error = _FAILURES[action.failure]
            self._result = error(
                f"rendezvous {self.run_id!r}, node {self.node_id!r}: {action.message}",
                run_id=self.run_id,
            )
            self._result.__cause__, self._cause = self._cause, None
        elif isinstance(action, m.Notify):
            self._changes.append(action.change)
            self._outbox.append(action.change)
        self._cond.notify_all()
        return outcome

    def _probed(self, node_id: str, probe: str, verdict: _probe.Verdict) -> None:
        """A late member's (or the leader's) probe came back, on a prober thread: if its
        process is gone, revoke the leases of its node key and of any leadership it holds
        (each only if the key still carries that process's probe: not a new incarnation)."""
        if verdict is not _probe.Verdict.GONE or self._stopping.is_set():
            log.debug("node %s: probe of %s: %s", self.node_id, node_id, verdict.value)
            return
        try:
            leases: list[int] = []
            for key in (self.keys.node(node_id), self.keys.leader):
                with self._slots():
                    response = self._client.range(key)
                if not response.kvs or not response.kvs[0].lease:
                    continue
                kv = response.kvs[0]
                record = decode(kv.value, key=key, run_id=self.run_id)
                if (
                    isinstance(record, NodeRecord | LeaderRecord)
                    and record.node_id == node_id
                    and record.probe == probe
                ):
                    leases.append(kv.lease)
            if not leases:
                return
            log.info(
                "rendezvous %s: node %s is gone (its process no longer listens at %s); "
                "revoking its lease%s %s",
                self.run_id,
                node_id,
                probe.partition("@")[2],
                "s" if len(leases) > 1 else "",
                ", ".join(f"{lease:x}" for lease in leases),
            )
            for lease in leases:
                with self._slots(), contextlib.suppress(EtcdLeaseNotFoundError):
                    self._client.lease_revoke(lease)
        except (EtcdClientError, RendezvousError) as exc:
            log.warning("node %s: could not evict dead node %s: %s", self.node_id, node_id, exc)

    def _delete_node(self, action: m.DeleteNode) -> m.Event:
        """Delete our node key (a join gave up). With ``if_round_revision``: only while no
        newer round is committed; a newer one that includes us refuses the deletion (the
        key stays: we are a member), one without us does not stop it. Both txns are
        guarded, so a resend after a lost reply is harmless."""
        if self._lease is None:
            return m.NodeKeyDeleted()  # no lease, no key
        keys = self.keys
        key = keys.node(self.node_id)
        owned = Compare.lease(key, "==", self._lease.id)
        try:
            if action.if_round_revision is not None:
                response = self._etcd(
                    self._client.txn,
                    [owned, Compare.mod_revision(keys.round, "==", action.if_round_revision)],
                    [Op.delete(key)],
                    [Op.get(keys.round)],
                )
                if response.succeeded:
                    return m.NodeKeyDeleted()
                read = response.responses[0] if response.responses else None
                if isinstance(read, RangeResponse) and read.kvs:
                    kv = read.kvs[0]
                    if kv.mod_revision != action.if_round_revision:
                        record = decode_as(
                            RoundRecord, kv.value, key=keys.round, run_id=self.run_id
                        )
                        if self.node_id in record.members:
                            log.info(
                                "node %s: join timed out as round %d of rendezvous %s was "
                                "committed with it; taking that round",
                                self.node_id,
                                record.round,
                                self.run_id,
                            )
                            return m.DeleteRefused(record, kv.mod_revision)
            self._etcd(self._client.txn, [owned], [Op.delete(key)])
        except (EtcdClientError, RendezvousError) as exc:
            log.warning("node %s could not delete its node key: %s", self.node_id, exc)
            self._cause = exc
            return m.DeleteFailed(str(exc))
        return m.NodeKeyDeleted()

    def _farewell(self, record: NodeRecord, lease_id: int) -> None:
        """Mark our key as leaving (one guarded put), so that the leader tells a clean
        leave from a lost node; best effort: the revoke that follows removes it anyway."""
        key = self.keys.node(self.node_id)
        try:
            with self._slots():
                self._client.txn(
                    [Compare.lease(key, "==", lease_id)],
                    [Op.put(key, encode(record), lease=lease_id)],
                )
        except EtcdClientError as exc:
            log.debug("node %s could not mark its key as leaving: %s", self.node_id, exc)

    def _acquire(self) -> None:
        """Try to create the leader key, attached to a leader lease of its own."""
        if not self._lease_ok() or self._stopping.is_set():
            return
        hub = self._hub
        if hub is not None and hub.leader_known_after(self._rev):
            return  # another node of this process already filled the vacancy we saw
        lease = self._leader_lease
        if lease is None or lease.is_lost or lease.remaining < lease.ttl / 2.0:
            lease = self._etcd(self._client.lease, self.lease_ttl, keep_alive=False)
            lease.close()  # no keep-alive thread: the decision loop refreshes it
            self._leader_lease = lease
        self._leader_refreshed = self._clock()
        keys = self.keys
        response = self._etcd(
            self._client.txn,
            [Compare.create_revision(keys.leader, "==", 0)],
            [Op.put(keys.leader, encode(LeaderRecord(self.node_id, self.probe)), lease=lease.id)],
        )
        if response.succeeded:
            if hub is not None:
                hub.leader_created(response.revision)
            log.info("node %s leads rendezvous %s", self.node_id, self.run_id)

    def _put_node(self, action: m.PutNode) -> m.Event | None:
        """Write our node key; the failure, if any, as an event (nothing on success).

        Every write here is guarded (our lease, or an absent key) or revokes first, so a
        resend after a lost reply cannot put a stale record over a newer one."""
        try:
            self._put_node_once(action)
        except (EtcdClientError, RendezvousError) as exc:
            maybe = isinstance(exc, EtcdUnavailableError | EtcdTimeoutError)
            log.warning(
                "node %s could not write its node key%s: %s",
                self.node_id,
                " (it may have been written)" if maybe else "",
                exc,
            )
            self._cause = exc
            return m.PutNodeFailed(str(exc), maybe_applied=maybe)
        return None

    def _put_node_once(self, action: m.PutNode) -> None:
        lease = self._lease if self._lease is not None and self._lease_ok() else self._new_lease()
        key = self.keys.node(self.node_id)
        try:
            response = self._put_node_txn(key, action.record, lease.id)
        except EtcdLeaseNotFoundError:
            # Expired before the keeper noticed (e.g. this process was paused past the
            # TTL): our key is gone with it; join with a new lease.
            log.warning("node %s: lease %x expired; joining with a new one", self.node_id, lease.id)
            if self._hub is not None:
                self._hub.keeper.remove(lease)
            lease.close()
            lease = self._new_lease()
            response = self._put_node_txn(key, action.record, lease.id)
        lease_id = lease.id
        inner = response.responses[0] if response.responses else None
        if response.succeeded or (isinstance(inner, TxnResponse) and inner.succeeded):
            return
        held = inner.responses[0] if isinstance(inner, TxnResponse) and inner.responses else None
        old = held.kvs[0].lease if isinstance(held, RangeResponse) and held.kvs else 0
        if old:
            # The same node id under another lease: our previous incarnation (a restart).
            # Revoke it so that its key vanishes now, not at expiry.
            log.warning("node %s restarted: revoking its previous lease %x", self.node_id, old)
            with contextlib.suppress(EtcdLeaseNotFoundError):
                self._etcd(self._client.lease_revoke, old)
        # Guarded again (ours or absent), never a blind put: a resend after a lost reply,
        # or a third incarnation that got in first, cannot be overwritten.
        response = self._put_node_txn(key, action.record, lease_id)
        inner = response.responses[0] if response.responses else None
        if not (response.succeeded or (isinstance(inner, TxnResponse) and inner.succeeded)):
            raise RendezvousError(
                f"node id {self.node_id!r} of rendezvous {self.run_id!r} is in use by another "
                "process (its key came back under another lease): give each node its own id",
                run_id=self.run_id,
            )

    def _put_node_txn(self, key: str, record: NodeRecord, lease_id: int) -> TxnResponse:
        """Put our key if it is ours or absent (one request for a first join or a rejoin)."""
        put = Op.put(key, encode(record), lease=lease_id)
        return self._etcd(
            self._client.txn,
            [Compare.lease(key, "==", lease_id)],
            [put],
            [Op.txn([Compare.create_revision(key, "==", 0)], [put], [Op.get(key)])],
        )

    def _commit(self, action: m.CommitRound) -> m.Event | None:
        """Commit the round in one txn guarded on the previous round and on our leader
        lease: a resend after a lost reply fails its guard (reported as CommitLost) and the
        resync that follows reads whether the first attempt was applied."""
        keys = self.keys
        if self._leader_lease is None:
            return m.CommitLost()  # our leadership expired: the resync says who leads now
        record = dataclasses.replace(action.record, time=_utc_now())
        guard = (
            Compare.create_revision(keys.round, "==", 0)
            if action.prev_revision == 0
            else Compare.mod_revision(keys.round, "==", action.prev_revision)
        )
        response = self._etcd(
            self._client.txn,
            [guard, Compare.lease(keys.leader, "==", self._leader_lease.id)],
            [Op.put(keys.round, encode(record))],
        )
        if response.succeeded:
            log.info(
                "node %s committed round %d of rendezvous %s: %d members, causes %s, "
                "completed by %s (%s)",
                self.node_id,
                record.round,
                self.run_id,
                len(record.members),
                ",".join(record.causes),
                record.completion,
                record.reason,
            )
            return None
        log.debug("commit of round %d lost a race; resyncing", record.round)
        return m.CommitLost()

    def _put_closed(self) -> None:
        self._etcd(
            self._client.txn,
            [Compare.create_revision(self.keys.closed, "==", 0)],
            [Op.put(self.keys.closed, encode(ClosedRecord(self.node_id, _utc_now())))],
        )

    def _resync(self, scope: m.Scope) -> None:
        """Read everything in ``scope`` at one revision, then follow it from the next one.

        CONTROL: the hub's shared ``ctl/`` watch feeds us (events up to the read's revision
        are skipped). ALL (we lead): a private watch of the whole run prefix, read by our
        own decision loop.
        """
        hub = self._hub
        if scope is m.Scope.CONTROL:
            old, self._watch = self._watch, None
            if old is not None:
                old.cancel()  # its loop ends by itself
            if hub is not None:
                hub.attach(self)  # before the read, so nothing after it is missed
            prefix = self.keys.ctl
        else:
            if hub is not None:
                hub.detach(self)
            prefix = self.keys.root
        response = self._etcd(self._client.range, prefix, prefix=True)
        kvs = [
            (kv.key.decode("utf-8", "replace"), kv.value, kv.create_revision, kv.mod_revision)
            for kv in response.kvs
        ]
        snap = snapshot(self.keys, response.revision, kvs, with_nodes=scope is m.Scope.ALL)
        prober = _probe.prober()  # verify probe addresses in the background, before need
        for probe in [e.probe for e in (snap.nodes or {}).values()] + [snap.leader_probe]:
            if probe and probe != self.probe:
                prober.learn(probe)
        self._floor = self._rev = response.revision
        if scope is m.Scope.ALL:
            stale = next(
                (kv.lease for kv in response.kvs if kv.key == self.keys.leader.encode()), 0
            )
            mine = self._leader_lease.id if self._leader_lease is not None else 0
            if snap.leader == self.node_id and stale not in (0, mine):
                # Our previous incarnation (same node id, before a restart) still leads.
                log.warning(
                    "node %s restarted: revoking its previous leader lease %x", self.node_id, stale
                )
                with contextlib.suppress(EtcdLeaseNotFoundError):
                    self._etcd(self._client.lease_revoke, stale)
                self._resync(m.Scope.CONTROL)
                return
            if not self._stopping.is_set():
                # The decision loop opens the watch (from the read's revision on: nothing
                # is missed) while we decide on the snapshot: a full round commits without
                # waiting for the watch stream to come up (~20 ms on the gateway).
                watch = _LeaderWatch(prefix, response.revision + 1)
                old, self._watch = self._watch, watch
                if old is not None:
                    old.cancel()
                self._thread = guarded(
                    functools.partial(self._lead, watch),
                    self._thread_died,
                    name=f"rendezvous {self.run_id} {self.node_id}",
                )
                self._thread.start()
        self._feed(snap)

    def _read_status(self) -> StatusRecord | None:
        kv = self._etcd(self._client.get, self.keys.status)
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
