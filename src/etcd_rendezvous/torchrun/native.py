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
its lease every ``lease_ttl / 6`` seconds on its own thread); ``ttl`` (how long the
torch-dynamic state outlives its last write) is ignored (node keys live on leases).

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
import logging
import socket
import threading
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
from etcd_rendezvous.errors import EtcdClientError
from etcd_rendezvous.rendezvous import Assignment, Change, ChangeKind, Rendezvous
from etcd_rendezvous.torchrun import _clients
from etcd_rendezvous.torchrun._options import (
    INT_RANGES,
    KNOWN_OPTIONS,
    EtcdV3Options,
    OptionError,
    bounded_int,
    parse_options,
)
from etcd_rendezvous.torchrun.plugin import connect
from etcd_rendezvous.torchrun.store import EtcdStore

log = logging.getLogger(__name__)
# Warnings about options must reach torchrun's console: torch configures handlers for its
# own logger tree only (ours has a NullHandler), as in ``_embedded``.
_agent_log = logging.getLogger("torch.distributed.elastic.rendezvous.etcd_v3")

#: Options of this handler on top of the torch-dynamic plugin's.
NATIVE_OPTIONS = frozenset({"lease_ttl", "fast_quorum", "probe"})
#: torch-dynamic options that mean nothing to the native engine (ignored with a warning).
_IGNORED = {
    "keep_alive_interval": "the engine refreshes its lease every lease_ttl/6 seconds",
    "keep_alive_max_attempt": "a node is dead when its lease expires (lease_ttl)",
    "ttl": "node keys live on leases, the run's records are small and kept",
}


def store_prefix(key_prefix: str, run_id: str) -> str:
    """Where the run's ``EtcdStore`` lives: beside the engine's keys, not under them.

    ``<key_prefix>-store/<run id>/``: outside ``<key_prefix>/`` so that store traffic
    never reaches the leader's watch of the run (nor ``rdzv list``).
    """
    return f"{key_prefix.rstrip('/')}-store/{run_id}/"


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
    ) -> None:
        self._rdzv = rdzv
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
                raise _torch_error(exc, run_id) from exc
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
        return RendezvousInfo(store, assignment.rank, assignment.world_size, bootstrap)

    def is_closed(self) -> bool:
        try:
            return self._rdzv.is_closed()
        except (engine.RendezvousError, EtcdClientError) as exc:
            raise _torch_error(exc, self._rdzv.run_id) from exc

    def set_closed(self) -> None:
        try:
            self._rdzv.close()
        except (engine.RendezvousError, EtcdClientError) as exc:
            raise _torch_error(exc, self._rdzv.run_id) from exc

    def num_nodes_waiting(self) -> int:
        """Nodes waiting for a round, plus members of the running round that are gone."""
        try:
            waiting = self._rdzv.num_nodes_waiting()
            if self._rdzv.is_closed():
                return waiting
        except (engine.RendezvousError, EtcdClientError) as exc:
            raise _torch_error(exc, self._rdzv.run_id) from exc
        with self._lock:
            current = self._assignment
            lost = len(self._lost.get(current.round, ())) if current is not None else 0
        return waiting + lost

    def get_run_id(self) -> str:
        return self._rdzv.run_id

    def shutdown(self) -> bool:
        """Close the rendezvous for everyone (as torch's handler does), leave, release."""
        with self._lock:
            if self._shut_down:
                return True
            self._shut_down = True
        atexit.unregister(self._atexit)
        ok = True
        try:
            self._rdzv.close()
            log.info("node %s closed rendezvous %s", self._rdzv.node_id, self._rdzv.run_id)
        except (engine.RendezvousError, EtcdClientError) as exc:
            log.warning(
                "node %s could not close rendezvous %s: %s",
                self._rdzv.node_id,
                self._rdzv.run_id,
                exc,
            )
            ok = False
        finally:
            try:
                self._rdzv.leave()
            finally:
                try:
                    self._store.close()
                finally:
                    if self._on_shutdown is not None:
                        self._on_shutdown()
        return ok

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

    client = _clients.acquire(opts, lambda: connect(opts, params))
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
    return NativeRendezvousHandler(
        rdzv,
        store,
        backend_name=params.backend,
        local_addr=addr,
        on_shutdown=lambda: _clients.release(client),
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
