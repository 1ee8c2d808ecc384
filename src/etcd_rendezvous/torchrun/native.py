"""torchrun on the native engine: a torch ``RendezvousHandler`` on :class:`Rendezvous`.

``torchrun --rdzv-backend=etcd-v3`` (alias ``etcd-v3-native``; see ``pyproject.toml``).
Same ``--rdzv-endpoint`` and embedded default as the torch-dynamic ``etcd-v3-dynamic`` plugin
(:mod:`etcd_rendezvous.torchrun.plugin`), same ``--rdzv-conf`` options, plus:

=========================  =====================================================
``lease_ttl``              seconds a silent node keeps its place (default
                           :data:`~etcd_rendezvous.rendezvous.DEFAULT_LEASE_TTL`);
                           a SIGKILLed node is gone this long after its death
``fast_quorum``            ``false`` to wait out the last call on every
                           re-rendezvous (default ``true``: a round completes as
                           soon as every live member of the previous one rejoined)
``probe``                  ``false`` to turn off liveness probes (default ``true``:
                           the agent listens on one TCP port; when members rejoin,
                           the leader probes the late ones and evicts a dead
                           process at once instead of a lease TTL later; see
                           :mod:`etcd_rendezvous.rendezvous._probe`)
=========================  =====================================================

Options of torch's dynamic rendezvous with no meaning here are mapped or ignored with
a warning: ``heartbeat`` (``heartbeat_timeout``) is the time after which a silent node
is dead, i.e. ``lease_ttl`` (used when ``lease_ttl`` is not given);
``keep_alive_interval`` and ``keep_alive_max_attempt`` are ignored (the engine refreshes
its lease every ``lease_ttl / 6`` seconds on its own thread); ``ttl`` is how long a
closed run's keys outlive the close (default 7200 s; the node that closes the run puts
them on a lease).

The run's life: a new job on the id of a closed run whose nodes are all gone starts
afresh (one still holding leases after ``lease_ttl + 2`` s is an error naming
``etcd-rendezvous rdzv delete``). A run closed by anyone else than this node
(``etcd-rendezvous rdzv close``, another agent ending the job) makes
:meth:`~NativeRendezvousHandler.num_nodes_waiting` positive: torch's agent stops its
workers, rejoins, gets the closed error and exits. A watchdog checks every second that
etcd answers and says so on the console while it does not; the job's embedded etcd
silent while its hosting agent's election lock is free (or for
:data:`EMBEDDED_LOST_AFTER` s) is gone with that agent: every etcd call
fails at once from then on (a rejoin: the agent exits; the exit barrier, close, leave:
skipped) instead of retrying for minutes, while running workers may still finish.
:meth:`~NativeRendezvousHandler.shutdown` bounds closing and leaving to a few seconds.

What the agent gets from :meth:`NativeRendezvousHandler.next_rendezvous`, as from torch's
``DynamicRendezvousHandler``: the node's dense rank and the world size of the committed
round, the run's :class:`~etcd_rendezvous.torchrun.store.EtcdStore` wrapped in a
``PrefixStore`` named ``torch.rendezvous.<run id>.<round>``, and bootstrap store info
for that round: every node joins with its address and a port it holds bound (torch's
``get_socket_with_port``) until the round is committed, and the round record carries
them, so the address and port of node rank 0 (whose rank-0 worker hosts the TCPStore)
reach every node with the assignment itself: no store round trip after the rendezvous,
unlike torch's ``RendezvousStoreInfo.build``. ``use_agent_store`` is False: every round
gets a fresh bootstrap address, so a change of node rank 0 between rounds cannot leave
workers of different nodes in different stores (the cached-bootstrap problem of torch
2.13's dynamic handler, which needs ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``).

Handlers of one process that reach the same etcd with the same credentials share one
client (see ``_clients.py``): one per process under torchrun, one for N simulated nodes.

``num_nodes_waiting()`` counts the nodes waiting for a round (torch's meaning) plus the
members of the running round whose lease expired or that left: the agent then restarts
its workers at once (a membership change, which costs no ``--max-restarts``), even when
no collective has failed yet (e.g. the workers of a node whose agent died still run).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import socket
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import closing
from datetime import timedelta
from typing import Any

from torch._C._distributed_c10d import PrefixStore, Store
from torch.distributed.elastic.rendezvous import api as torch_api
from torch.distributed.elastic.rendezvous.api import (
    RendezvousConnectionError,
    RendezvousHandler,
    RendezvousHandlerCreator,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
)
from torch.distributed.elastic.utils.distributed import get_socket_with_port

from etcd_rendezvous import rendezvous as engine
from etcd_rendezvous.client import Endpoint, EtcdClient
from etcd_rendezvous.errors import EtcdClientError
from etcd_rendezvous.rendezvous import Assignment, Change, ChangeKind, Rendezvous, _lifecycle
from etcd_rendezvous.torchrun import _clients, _embedded
from etcd_rendezvous.torchrun._options import (
    INT_RANGES,
    KNOWN_OPTIONS,
    EtcdV3Options,
    OptionError,
    bounded_int,
    parse_options,
)
from etcd_rendezvous.torchrun.plugin import connect, create_client
from etcd_rendezvous.torchrun.store import EtcdStore

log = logging.getLogger(__name__)
# Warnings about options must reach torchrun's console: torch configures handlers for its
# own logger tree only (ours has a NullHandler), as in ``_embedded``.
_agent_log = logging.getLogger("torch.distributed.elastic.rendezvous.etcd_v3")
#: Every assignment as one JSON object (node, round, rank, world_size, members), at
#: DEBUG: for tools that check the rounds a job went through (tests/multihost).
_rounds_log = logging.getLogger(__name__ + ".rounds")

#: Options of this handler on top of the torch-dynamic plugin's.
NATIVE_OPTIONS = frozenset({"lease_ttl", "fast_quorum", "probe"})
#: torch-dynamic options that mean nothing to the native engine (ignored with a warning).
_IGNORED = {
    "keep_alive_interval": "the engine refreshes its lease every lease_ttl/6 seconds",
    "keep_alive_max_attempt": "a node is dead when its lease expires (lease_ttl)",
}

#: Seconds ``shutdown`` gives closing, then leaving, when etcd is slow or gone.
SHUTDOWN_STEP_TIMEOUT = 3.0
#: Seconds between two checks that etcd answers (the handler's watchdog), and the
#: timeout of one check.
WATCHDOG_INTERVAL = 1.0
#: Seconds between two console warnings while etcd does not answer.
WATCHDOG_REPEAT = 5.0
#: Seconds without an answer after which the job's embedded etcd counts as gone (its
#: hosting agent died: nothing can bring its state back).
EMBEDDED_LOST_AFTER = 5.0


def store_prefix(key_prefix: str, run_id: str) -> str:
    """Where the run's ``EtcdStore`` lives: beside the engine's keys, not under them.

    ``<key_prefix>-store/<run id>/``: outside ``<key_prefix>/`` so that store traffic
    never reaches the leader's watch of the run (nor ``rdzv list``).
    """
    return _lifecycle.store_prefix(key_prefix, run_id)


#: Seconds during which a repeated warning (same logger and line) is not forwarded again.
CONSOLE_REPEAT = 5.0


class _ConsoleForwarder(logging.Handler):
    """Our WARNING and ERROR records, on torchrun's console (through torch's logger tree).

    A warning repeated from the same place (a retry loop against a dead etcd) reaches
    the console once per :data:`CONSOLE_REPEAT` seconds, with the count of the others.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._last: dict[tuple[str, int], tuple[float, int]] = {}  # -> (time, suppressed)

    def emit(self, record: logging.LogRecord) -> None:
        if not _agent_log.isEnabledFor(record.levelno):
            return
        where = (record.name, record.lineno)
        now = time.monotonic()
        with self.lock or contextlib.nullcontext():
            last, suppressed = self._last.get(where, (-CONSOLE_REPEAT, 0))
            if now - last < CONSOLE_REPEAT:
                self._last[where] = (last, suppressed + 1)
                return
            self._last[where] = (now, 0)
        if suppressed:
            record = logging.makeLogRecord(record.__dict__)  # others see the original
            record.msg = (
                f"{record.msg} ({suppressed} similar messages in the last "
                f"{now - last:.0f}s not shown)"
            )
        _agent_log.handle(record)


_forwarder = _ConsoleForwarder()


def forward_warnings_to_console() -> None:
    """Make the package's warnings reach the agent's console (idempotent).

    The package logger has a ``NullHandler``; under torchrun nobody else configures it,
    so without this an agent retrying an unreachable etcd says nothing.
    """
    package = logging.getLogger("etcd_rendezvous")
    if _forwarder not in package.handlers:
        package.addHandler(_forwarder)


def _torch_error(exc: BaseException, run_id: str) -> Exception:
    """The torch rendezvous error an engine or client error stands for (cause kept)."""
    kind: type[Exception]
    if isinstance(exc, engine.RendezvousGracefulExitError):
        kind = torch_api.RendezvousGracefulExitError
    elif isinstance(exc, engine.RendezvousClosedError):
        kind = torch_api.RendezvousClosedError
    elif isinstance(exc, engine.RendezvousTimeoutError):
        kind = torch_api.RendezvousTimeoutError
    elif isinstance(exc, engine.RendezvousStateError | engine.RendezvousConfigError):
        kind = torch_api.RendezvousStateError
    else:
        kind = RendezvousConnectionError
    error = kind(f"etcd-v3 rendezvous {run_id!r}: {exc}")
    error.__cause__ = exc
    return error


class NativeRendezvousHandler(RendezvousHandler):
    """torch's ``RendezvousHandler`` contract on the native engine.

    Args:
        rdzv: the engine for this node (not joined yet).
        store: the run's store; closed by :meth:`shutdown` (with its client).
        backend_name: what :meth:`get_backend` reports (the ``--rdzv-backend`` name).
        local_addr: this node's address, published as ``MASTER_ADDR`` when it has rank 0.
        on_shutdown: called once by :meth:`shutdown` after the store is closed (e.g. to
            release a shared client).
    """

    def __init__(
        self,
        rdzv: Rendezvous,
        store: EtcdStore,
        *,
        backend_name: str = "etcd-v3",
        local_addr: str | None = None,
        on_shutdown: Callable[[], None] | None = None,
        closed_ttl: int = _lifecycle.DEFAULT_CLOSED_TTL,
        watchdog: EtcdClient | None = None,
        embedded: Endpoint | None = None,
    ) -> None:
        self._rdzv = rdzv
        self._closed_ttl = closed_ttl
        self._embedded = embedded
        self._closing = False  # this handler closes the rendezvous (the job ends here)
        self._outside_close_seen = False
        self._etcd_lost: Exception | None = None  # the job's embedded etcd is gone
        self._on_shutdown = on_shutdown
        self._store = store
        self._backend_name = backend_name
        self._addr = local_addr or socket.getfqdn()
        self._lock = threading.Lock()
        self._assignment: Assignment | None = None
        self._lost: dict[int, set[str]] = {}  # round -> members seen lost
        self._shut_down = False
        rdzv.add_listener(self._on_change)
        ref = weakref.ref(self)
        self._atexit = lambda: _leave_at_exit(ref)
        atexit.register(self._atexit)
        self._watchdog_stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        if watchdog is not None:
            self._watchdog = threading.Thread(
                target=_run_watchdog,
                args=(ref, watchdog, self._watchdog_stop),
                name=f"etcd-v3-watchdog-{rdzv.run_id}",
                daemon=True,
            )
            self._watchdog.start()

    # --- the contract ------------------------------------------------------------------

    def get_backend(self) -> str:
        return self._backend_name

    @property
    def use_agent_store(self) -> bool:
        """False: the bootstrap store is hosted by worker rank 0, per round (see module doc)."""
        return False

    @property
    def rendezvous(self) -> Rendezvous:
        """The engine under this handler."""
        return self._rdzv

    @property
    def store(self) -> EtcdStore:
        """The run's store (unprefixed)."""
        return self._store

    def next_rendezvous(self) -> RendezvousInfo:
        run_id = self._rdzv.run_id
        log.info("node %s joins the next round of rendezvous %s", self._rdzv.node_id, run_id)
        # The bootstrap port, should this node get rank 0: held bound until the round is
        # committed, so nothing else takes it meanwhile; published with the join.
        with closing(get_socket_with_port()) as reserved:
            data = {"addr": self._addr, "port": str(reserved.getsockname()[1])}
            try:
                try:
                    assignment = self._rdzv.join(data=data)
                except engine.RendezvousLeftError:
                    if self._shut_down:
                        raise
                    # Our lease expired while joining (e.g. this process was stopped past
                    # the TTL): join again with a new one, once.
                    log.warning(
                        "node %s lost its lease while joining; joining again",
                        self._rdzv.node_id,
                    )
                    assignment = self._rdzv.join(data=data)
            except (engine.RendezvousError, EtcdClientError) as exc:
                raise self._error_for(exc) from exc
        with self._lock:
            self._assignment = assignment
            self._lost = {r: s for r, s in self._lost.items() if r >= assignment.round}
        store: Store = PrefixStore(f"torch.rendezvous.{run_id}.{assignment.round}", self._store)
        bootstrap = bootstrap_info(assignment, run_id)
        log.info(
            "node %s: round %d of rendezvous %s, rank %d of %d, bootstrap %s:%d (%s)",
            self._rdzv.node_id,
            assignment.round,
            run_id,
            assignment.rank,
            assignment.world_size,
            bootstrap.master_addr,
            bootstrap.master_port,
            assignment.reason or "no reason given",
        )
        if _rounds_log.isEnabledFor(logging.DEBUG):  # the whole membership, for checkers
            _rounds_log.debug(
                "assigned %s",
                json.dumps(
                    {
                        "node": self._rdzv.node_id,
                        "round": assignment.round,
                        "rank": assignment.rank,
                        "world_size": assignment.world_size,
                        "members": list(assignment.members),
                    }
                ),
            )
        return RendezvousInfo(store, assignment.rank, assignment.world_size, bootstrap)

    def is_closed(self) -> bool:
        try:
            return self._rdzv.is_closed()
        except (engine.RendezvousError, EtcdClientError) as exc:
            raise _torch_error(exc, self._rdzv.run_id) from exc

    def set_closed(self) -> None:
        self._closing = True
        try:
            self._rdzv.close()
        except (engine.RendezvousError, EtcdClientError) as exc:
            raise _torch_error(exc, self._rdzv.run_id) from exc

    def num_nodes_waiting(self) -> int:
        """Nodes waiting for a round, plus members of the running round that are gone."""
        if self._etcd_lost is not None:
            # Nothing can be known any more; the workers may still finish their job (the
            # exit barrier and shutdown then fail fast). If they fail, the rejoin raises.
            return 0
        try:
            waiting = self._rdzv.num_nodes_waiting()
            if self._rdzv.is_closed():
                if self._closing:
                    return waiting
                # Closed from outside (`etcd-rendezvous rdzv close`, another agent ending
                # the job): the agent's monitor loop stops its workers on a waiting count
                # and rejoins, which fails with the closed error: the agent exits.
                self._note_outside_close()
                return max(waiting, 1)
        except (engine.RendezvousError, EtcdClientError) as exc:
            raise self._error_for(exc) from exc
        with self._lock:
            current = self._assignment
            lost = len(self._lost.get(current.round, ())) if current is not None else 0
        return waiting + lost

    def get_run_id(self) -> str:
        return self._rdzv.run_id

    def shutdown(self) -> bool:
        """Close the rendezvous for everyone (as torch's handler does), leave, release.

        Each step is bounded (:data:`SHUTDOWN_STEP_TIMEOUT`): with etcd slow or gone, the
        agent exits in seconds and says why; a node lease not revoked expires on its own.
        """
        with self._lock:
            if self._shut_down:
                return True
            self._shut_down = True
            self._closing = True
        atexit.unregister(self._atexit)
        self._watchdog_stop.set()
        run_id, node_id = self._rdzv.run_id, self._rdzv.node_id
        ok = self._etcd_lost is None
        try:
            if ok:
                ok = _bounded(self._close_and_expire, f"closing rendezvous {run_id}")
            if self._etcd_lost is None:
                _bounded(
                    functools.partial(self._rdzv.leave, timeout=SHUTDOWN_STEP_TIMEOUT),
                    f"leaving rendezvous {run_id}",
                )
            else:
                _agent_log.warning(
                    "rendezvous %s: etcd is gone, node %s neither closes nor leaves it",
                    run_id,
                    node_id,
                )
        finally:
            try:
                self._store.close()
            finally:
                if self._on_shutdown is not None:
                    self._on_shutdown()
        return ok

    def _close_and_expire(self) -> None:
        """Close the run, then put its keys on a lease of the closed TTL.

        Every node does it (the run may have been closed by ``rdzv close``, whose keys
        nobody else would expire); keys already on a lease are skipped, so the first
        node's lease is the one that counts.
        """
        self._rdzv.close(timeout=SHUTDOWN_STEP_TIMEOUT)
        log.info("node %s closed rendezvous %s", self._rdzv.node_id, self._rdzv.run_id)
        client = self._store.client
        state = _lifecycle.read_run(client, self._rdzv.run_id, self._rdzv.keys.key_prefix)
        if state.closed is not None:
            moved = _lifecycle.expire_run(
                client, self._rdzv.run_id, self._closed_ttl, self._rdzv.keys.key_prefix
            )
            log.info(
                "rendezvous %s: %d keys expire in %ds (ttl)",
                self._rdzv.run_id,
                moved,
                self._closed_ttl,
            )

    def _error_for(self, exc: BaseException) -> Exception:
        """The torch error for ``exc``: the etcd loss or the close explained when known."""
        if self._etcd_lost is not None:
            return self._etcd_lost
        error = _torch_error(exc, self._rdzv.run_id)
        if isinstance(exc, engine.RendezvousClosedError) and not isinstance(
            exc, engine.RendezvousGracefulExitError
        ):
            by = self._closed_by()
            error = torch_api.RendezvousClosedError(
                f"etcd-v3 rendezvous {self._rdzv.run_id!r} is closed{by}: the job is over, "
                "this agent stops. To run it again use the same command (a finished run "
                "starts afresh) or another --rdzv-id."
            )
            error.__cause__ = exc
        return error

    def _closed_by(self) -> str:
        try:
            state = _lifecycle.read_run(
                self._store.client, self._rdzv.run_id, self._rdzv.keys.key_prefix
            )
        except (engine.RendezvousError, EtcdClientError):
            return ""
        if state.closed is None:
            return ""
        return f" (closed by {state.closed.by} at {state.closed.time or '?'})"

    def _note_outside_close(self) -> None:
        if self._outside_close_seen:
            return
        self._outside_close_seen = True
        _agent_log.warning(
            "rendezvous %s was closed%s: node %s stops its workers and exits",
            self._rdzv.run_id,
            self._closed_by(),
            self._rdzv.node_id,
        )

    def _on_etcd_lost(self, error: Exception) -> None:
        """The watchdog's verdict: the job's embedded etcd is gone for good."""
        self._etcd_lost = error
        _agent_log.warning("%s", error)
        # Every waiting etcd call (a join, the store's exit barrier) fails now, not after
        # its retries: the state they wait for is gone.
        self._store.client.close()

    # --- internals ------------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        if change.kind is ChangeKind.MEMBERSHIP and change.lost:
            with self._lock:
                known = self._lost.setdefault(change.round, set())
                new = set(change.lost) - known
                known.update(change.lost)
            if new:
                log.info(
                    "rendezvous %s: round %d lost %s (left cleanly: %s)",
                    self._rdzv.run_id,
                    change.round,
                    ", ".join(sorted(new)),
                    ", ".join(change.left) or "none",
                )

    def _leave_quietly(self) -> None:
        """At interpreter exit without :meth:`shutdown` (e.g. SIGTERM): leave, don't close.

        torch does not close the rendezvous when its agent dies by a signal; leaving
        (revoking our lease) lets the others re-form at once instead of after the TTL.
        """
        if self._shut_down:
            return
        try:
            self._rdzv.leave()
        except Exception as exc:  # best effort at exit: never mask the exit status
            log.debug("leaving rendezvous %s at exit failed: %s", self._rdzv.run_id, exc)


def bootstrap_info(assignment: Assignment, run_id: str) -> RendezvousStoreInfo:
    """Where the round's TCPStore will be: the address and port node rank 0 joined with.

    Raises:
        torch's RendezvousStateError: rank 0's record has no usable address or port
            (a node of another program or version under the run's keys).
    """
    head = assignment.members[0]
    data = assignment.data.get(head, {})
    addr, port = data.get("addr", ""), data.get("port", "")
    if addr and port.isdigit() and 0 < int(port) < 65536:
        return RendezvousStoreInfo(master_addr=addr, master_port=int(port))
    raise torch_api.RendezvousStateError(
        f"etcd-v3 rendezvous {run_id!r}: node {head!r} (rank 0 of round {assignment.round}) "
        f"joined without a bootstrap address and port (data {dict(data)!r}); is it running "
        "another version of etcd-rendezvous?"
    )


def _leave_at_exit(ref: weakref.ref[NativeRendezvousHandler]) -> None:
    handler = ref()
    if handler is not None:
        handler._leave_quietly()


def _bounded(step: Callable[[], None], what: str, timeout: float = SHUTDOWN_STEP_TIMEOUT) -> bool:
    """Run ``step`` for at most about ``timeout`` seconds; False (with a warning) if not done.

    The step runs in a daemon thread; one still running at the deadline is left to end
    on its own (its outcome is logged), so a shutdown never waits on a dead etcd.
    """
    failure: list[BaseException] = []

    def run() -> None:
        try:
            step()
        except BaseException as exc:  # reported below, or logged if nobody waits any more
            failure.append(exc)
            log.debug("%s failed: %s", what, exc)

    thread = threading.Thread(target=run, name=what, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if thread.is_alive():
        _agent_log.warning("%s: no answer from etcd within %.0fs, giving up", what, timeout)
        return False
    if failure:
        _agent_log.warning("%s failed: %s", what, failure[0])
        return False
    return True


def _run_watchdog(
    ref: weakref.ref[NativeRendezvousHandler], client: EtcdClient, stop: threading.Event
) -> None:
    """Check every second that etcd answers; say so on the console while it does not.

    For the job's embedded etcd, silence while its election lock is free (the hosting
    agent's process is gone: the kernel released its ``flock``), or for
    :data:`EMBEDDED_LOST_AFTER` seconds, means the state is gone: every etcd call of the
    handler fails at once from then on (a rejoin raises: the agent exits) instead of
    retrying for minutes. Any other etcd may come back: the agent keeps waiting and keeps
    saying so.
    """
    down_since: float | None = None
    warned = 0.0
    try:
        while not stop.wait(WATCHDOG_INTERVAL):
            handler = ref()
            if handler is None:
                return
            try:
                client.status()
            except EtcdClientError as exc:
                now = time.monotonic()
                down_since = now if down_since is None else down_since
                silent = now - down_since
                run_id, endpoints = handler._rdzv.run_id, ",".join(client.endpoints)
                embedded = handler._embedded
                if embedded is not None and (
                    silent >= EMBEDDED_LOST_AFTER or not _embedded.host_alive(embedded, run_id)
                ):
                    handler._on_etcd_lost(
                        RendezvousConnectionError(
                            f"etcd-v3 rendezvous {run_id!r}: the job's embedded etcd at "
                            f"{endpoints} has not answered for {silent:.0f}s ({exc}): its "
                            "hosting agent (or that etcd) is gone, and the rendezvous "
                            "state with it. This agent lets its workers finish but cannot "
                            "rejoin: if they fail it exits. Run the job again (on a real "
                            "etcd cluster, --rdzv-endpoint, to survive a node's death)."
                        )
                    )
                    return
                if now - warned >= WATCHDOG_REPEAT:
                    warned = now
                    _agent_log.warning(
                        "etcd-v3 rendezvous %r: etcd at %s does not answer (for %.0fs: %s); %s",
                        run_id,
                        endpoints,
                        silent,
                        exc,
                        f"the embedded etcd counts as gone after {EMBEDDED_LOST_AFTER:.0f}s"
                        if handler._embedded
                        else "waiting for it (a join fails after its join_timeout)",
                    )
            else:
                if down_since is not None:
                    _agent_log.warning(
                        "etcd-v3 rendezvous %r: etcd answers again after %.0fs",
                        handler._rdzv.run_id,
                        time.monotonic() - down_since,
                    )
                down_since = None
            del handler
    except Exception as exc:  # never silently: the agent hears why its watchdog stopped
        _agent_log.warning("the etcd-v3 watchdog stopped: %r", exc)
    finally:
        client.close()


# --- options and construction ---------------------------------------------------------------


def _native_options(params: RendezvousParameters) -> tuple[RendezvousParameters, dict[str, Any]]:
    """Check option names; split ours from the ones ``parse_options`` knows."""
    known = KNOWN_OPTIONS | NATIVE_OPTIONS
    unknown = sorted(k for k in params.config if k not in known and k != "rank")
    if unknown:
        raise OptionError(
            f"--rdzv-conf: unknown option(s) {', '.join(unknown)} for "
            f"--rdzv-backend={params.backend}; known options: "
            f"{', '.join(sorted(known - {'timeout'}))}"
        )
    config = {k: v for k, v in params.config.items() if k not in NATIVE_OPTIONS}
    ours = {k: v for k, v in params.config.items() if k in NATIVE_OPTIONS}
    stripped = RendezvousParameters(
        params.backend,
        params.endpoint,
        params.run_id,
        params.min_nodes,
        params.max_nodes,
        params.local_addr,
        **config,
    )
    return stripped, ours


def _lease_ttl(params: RendezvousParameters, ours: dict[str, Any], opts: EtcdV3Options) -> int:
    raw = ours.get("lease_ttl")
    if raw is not None:
        ttl = bounded_int("lease_ttl", raw, *INT_RANGES["heartbeat"])
        if opts.heartbeat_timeout is not None:
            _agent_log.warning(
                "--rdzv-conf: heartbeat is ignored, lease_ttl=%d decides when a silent node "
                "is dead",
                ttl,
            )
        return ttl
    if opts.heartbeat_timeout is not None:
        ttl = max(1, int(opts.heartbeat_timeout.total_seconds()))
        _agent_log.warning(
            "--rdzv-conf heartbeat=%d: used as lease_ttl=%d (a node silent that long is dead)",
            ttl,
            ttl,
        )
        return ttl
    return engine.DEFAULT_LEASE_TTL


def _switch(params: RendezvousParameters, ours: dict[str, Any], name: str) -> bool:
    """A true/false native option (default true)."""
    if name not in ours:
        return True
    try:
        value = params.get_as_bool(name)
    except ValueError:
        raise OptionError(f"--rdzv-conf {name}={ours[name]!r}: expected true or false") from None
    return True if value is None else value


def _seconds(value: timedelta | None, default: float) -> float:
    return default if value is None else value.total_seconds()


def create_native_handler(params: RendezvousParameters) -> NativeRendezvousHandler:
    """The handler creator torch's registry calls with ``RendezvousParameters``.

    Raises:
        ValueError: a bad option, value, run id or endpoint (:class:`OptionError`),
            before any network access.
        RendezvousConnectionError: no etcd answers (and none could be hosted).
    """
    stripped, ours = _native_options(params)
    try:
        opts = parse_options(stripped)
    except OptionError:
        raise
    except ValueError as exc:  # torch's own bool parsing
        raise OptionError(str(exc)) from exc
    try:
        engine.check_run_id(params.run_id)
    except ValueError as exc:
        raise OptionError(f"--rdzv-id {params.run_id!r}: {exc}") from exc
    lease_ttl = _lease_ttl(params, ours, opts)
    fast_quorum = _switch(params, ours, "fast_quorum")
    probe = _switch(params, ours, "probe")
    for key, why in _IGNORED.items():
        if key in params.config:
            _agent_log.warning(
                "--rdzv-conf %s=%s is ignored by --rdzv-backend=%s: %s",
                key,
                params.config[key],
                params.backend,
                why,
            )
    key_prefix = str(params.config.get("key_prefix") or engine.DEFAULT_KEY_PREFIX)
    forward_warnings_to_console()

    client = _clients.acquire(opts, lambda: connect(opts, params))
    try:
        # A run id used again: a closed run whose nodes are all gone starts afresh.
        _lifecycle.reset_if_finished(client, params.run_id, key_prefix, wait=lease_ttl + 2.0)
    except (engine.RendezvousError, EtcdClientError) as exc:
        _clients.release(client)
        raise _torch_error(exc, params.run_id) from exc
    # The single-machine embedded etcd dies with its host agent (the watchdog then
    # fails the handler fast); a replicated one outlives any one host.
    embedded = opts.endpoints[0] if opts.sidecar else None
    store = EtcdStore(
        client,
        store_prefix(key_prefix, params.run_id),
        timeout=timedelta(seconds=opts.read_timeout),
    )
    addr = params.local_addr or socket.getfqdn()
    try:
        rdzv = Rendezvous(
            client,
            params.run_id,
            params.min_nodes,
            params.max_nodes,
            node_data={"addr": addr},
            last_call_timeout=_seconds(opts.last_call_timeout, 30.0),
            join_timeout=_seconds(opts.join_timeout, 600.0),
            close_timeout=_seconds(opts.close_timeout, 30.0),
            lease_ttl=lease_ttl,
            key_prefix=key_prefix,
            fast_quorum=fast_quorum,
            probe=probe,
            probe_host=addr,
        )
    except BaseException:
        store.close()
        _clients.release(client)
        raise
    log.info(
        "rendezvous %s: node %s, lease_ttl=%ds, fast_quorum=%s, probe=%s",
        params.run_id,
        rdzv.node_id,
        lease_ttl,
        fast_quorum,
        rdzv.probe.partition("@")[2] or "off",
    )
    # On a replicated embedded etcd, the members the shared client knows by now (host0,
    # the seed, may be gone later): the watchdog's own client follows them from there.
    watchdog = create_client(
        opts, timeout=WATCHDOG_INTERVAL, endpoints=client.endpoints if opts.replicated else None
    )
    return NativeRendezvousHandler(
        rdzv,
        store,
        backend_name=params.backend,
        local_addr=addr,
        on_shutdown=lambda: _clients.release(client),
        closed_ttl=opts.ttl or _lifecycle.DEFAULT_CLOSED_TTL,
        watchdog=watchdog,
        embedded=embedded,
    )


def get_handler_creator() -> RendezvousHandlerCreator:
    """Entry point of the ``torchrun.handlers`` group: returns the handler creator."""
    return create_native_handler


__all__ = [
    "NATIVE_OPTIONS",
    "NativeRendezvousHandler",
    "bootstrap_info",
    "create_native_handler",
    "get_handler_creator",
    "store_prefix",
]
