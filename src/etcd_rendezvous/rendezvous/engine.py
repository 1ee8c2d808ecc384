"""The rendezvous node: public API and waiting.

:class:`Rendezvous` owns one lease (keep-alive is the heartbeat), one watch (``ctl/``,
read by the hub's shared reader in ``_hub.py``, or the whole run prefix while this node
leads, read by its decision loop in ``_leader.py``); watch events and deadlines become
machine events, and ``_executor.py`` performs the machine's actions and reports their
outcomes back as events. The public methods here feed commands (join, leave, close) into
the same machine and wait for its results; client errors are translated into rendezvous
errors once, at this boundary. See ``_machine.py`` for the design, ``_core.py`` for what
the parts share.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType

from etcd_rendezvous.client import (
    Compare,
    EtcdClient,
    Lease,
    Op,
    RangeResponse,
    Retry,
)
from etcd_rendezvous.errors import (
    EtcdClientError,
)
from etcd_rendezvous.rendezvous import _machine as m
from etcd_rendezvous.rendezvous import _probe
from etcd_rendezvous.rendezvous._core import _LeaderWatch
from etcd_rendezvous.rendezvous._core import utc_now as _utc_now
from etcd_rendezvous.rendezvous._errors import (
    RendezvousConfigError,
    RendezvousError,
    RendezvousLeftError,
    RendezvousTimeoutError,
)
from etcd_rendezvous.rendezvous._executor import Executor
from etcd_rendezvous.rendezvous._hub import Batch, Hub, hub_for
from etcd_rendezvous.rendezvous._leader import LeaderLoop
from etcd_rendezvous.rendezvous._machine import Assignment, Change
from etcd_rendezvous.rendezvous._records import (
    DEFAULT_KEY_PREFIX,
    ConfigRecord,
    Keys,
    check_node_id,
    check_run_id,
    decode_as,
    encode,
)

log = logging.getLogger(__name__)

_ids = itertools.count()

DEFAULT_LEASE_TTL = 3
"""Seconds a silent node keeps its place (see :class:`Rendezvous` for the choice)."""


def default_node_id() -> str:
    """``<host>_<pid>_<n>``: unique per handler, like torch's node descriptors."""
    host = "".join(c if c.isalnum() or c in ".-" else "-" for c in socket.gethostname())
    return f"{host or 'host'}_{os.getpid()}_{next(_ids)}"


class Rendezvous(Executor, LeaderLoop):
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
                host = probe_host or socket.gethostname()
                self.probe = _probe.listener(host).address(host)
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

    def leave(self, timeout: float | None = None) -> None:
        """Withdraw this node (its key and any leadership go at once); idempotent.

        With ``timeout``, every retry of this node stops by then (as for :meth:`close`),
        so that leaving an unreachable etcd costs about ``timeout``, not the retry policy.
        """
        deadline = None if timeout is None else self._clock() + timeout
        with self._boundary(deadline), self._cond:
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


__all__ = ["Rendezvous", "default_node_id"]
