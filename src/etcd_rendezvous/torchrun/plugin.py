"""torch's dynamic rendezvous on etcd v3: ``torchrun --rdzv-backend=etcd-v3-dynamic``.

Registered through the ``torchrun.handlers`` entry-point group (see
``pyproject.toml``). torch loads :func:`get_handler_creator` and registers what
it returns, :func:`create_rdzv_handler`, under the name ``etcd-v3-dynamic``
(``etcd-v3`` itself is the native engine, :mod:`etcd_rendezvous.torchrun.native`,
which shares this module's :func:`connect` and options).

The handler is torch's own ``DynamicRendezvousHandler`` (same semantics as the
``c10d`` and ``etcd-v2`` backends: min/max nodes, last call, wait list,
heartbeats, close) on :class:`~etcd_rendezvous.torchrun.backend.EtcdRendezvousBackend`
and :class:`~etcd_rendezvous.torchrun.store.EtcdStore`, both on etcd's v3 API.

``--rdzv-endpoint``: ``host:port``, a comma-separated list of them (failover
between members), IPv6 in brackets (``[::1]:2379``), used as given (an etcd that
does not answer there is an error). Left out, it is ``$ETCD_ENDPOINTS`` if set; else,
and for ``localhost:0``, the embedded default: the job's own etcd, hosted by one of its
agents on this machine (see :mod:`etcd_rendezvous.torchrun._embedded`).

``--rdzv-conf`` (``key=value,...``):

=========================  =====================================================
``read_timeout``           seconds a store ``get``/``wait`` waits (default 60);
                           one etcd request times out after ``min(read_timeout, 10)``
``protocol``               ``http`` (default) or ``https``
``ssl_cert``               client certificate (PEM) for TLS
``ssl_cert_key``           its private key
``ca_cert``                CA bundle to verify etcd's certificate
``username``, ``password`` etcd authentication
``key_prefix``             where runs live (default ``/torch/elastic/rendezvous``)
``ttl``                    seconds after the last write at which etcd drops a
                           run's state (default 7200)
``join_timeout``           torch's dynamic rendezvous options (seconds), same
``last_call_timeout``      defaults as ``c10d``: 600, 30, 30, 5
``close_timeout``
``heartbeat``              (or ``heartbeat_timeout``, the name torch reads)
``keep_alive_interval``    seconds between heartbeats (default 5)
``keep_alive_max_attempt`` missed heartbeats before a node is dead (default 3)
``embedded``               ``true`` to host the job's etcd in the agents at the
                           endpoint given (on another host than loopback: a
                           replicated etcd the agents form, see ``members``);
                           ``false`` to never host one
``members``                voting etcd members of a multi-host embedded etcd:
                           1, 3 (default) or 5
=========================  =====================================================

Any other option, a bad value or a bad endpoint raises ``ValueError`` naming
it; an unreachable etcd raises ``RendezvousConnectionError``: both before the
node joins (so before any other node waits for it).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from torch.distributed.elastic.rendezvous.api import (
    RendezvousConnectionError,
    RendezvousHandlerCreator,
    RendezvousParameters,
)
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    DynamicRendezvousHandler,
    RendezvousTimeout,
)

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.errors import EtcdClientError
from etcd_rendezvous.torchrun import _embedded
from etcd_rendezvous.torchrun._options import EtcdV3Options, OptionError, parse_options
from etcd_rendezvous.torchrun.backend import BACKEND_NAME, EtcdRendezvousBackend, run_key_prefix
from etcd_rendezvous.torchrun.store import EtcdStore

log = logging.getLogger(__name__)

#: How long a node waits for the agent hosting the embedded etcd to start it.
EMBEDDED_START_TIMEOUT = 60.0


#: Seconds between two refreshes of a client's endpoints from the member list, on a
#: replicated embedded etcd (members join, die and are replaced while the job runs).
AUTOSYNC_INTERVAL = 1.0


def create_client(
    opts: EtcdV3Options, *, timeout: float | None = None, endpoints: list[str] | None = None
) -> EtcdClient:
    """An :class:`EtcdClient` for the options' endpoints (or ``endpoints``), TLS and
    credentials; on a replicated embedded etcd it follows the members as they change."""
    return EtcdClient(
        endpoints or [ep.url for ep in opts.endpoints],
        timeout=opts.request_timeout if timeout is None else timeout,
        ca_cert=opts.ca_cert,
        cert=opts.ssl_cert,
        key=opts.ssl_cert_key,
        username=opts.username,
        password=opts.password,
        autosync=AUTOSYNC_INTERVAL if opts.replicated else None,
    )


def connect(opts: EtcdV3Options, params: RendezvousParameters) -> EtcdClient:
    """Host the embedded etcd when needed, then a client that answers (or fail clearly)."""
    if opts.replicated:
        # Across hosts: host0's agent starts it, the others wait for it and join it.
        urls = _embedded.ensure_replicated(
            opts.endpoints[0], params.run_id, opts.members, EMBEDDED_START_TIMEOUT
        )
        return _checked(create_client(opts, endpoints=urls), opts, params)
    if opts.sidecar:
        # The job's own sidecar (hosted here, or by another agent of the job on this
        # machine and verified to be it): never an etcd that merely answers there.
        _embedded.ensure_local_etcd(opts.endpoints[0], params.run_id, EMBEDDED_START_TIMEOUT)
    return _checked(create_client(opts), opts, params)


def _checked(client: EtcdClient, opts: EtcdV3Options, params: RendezvousParameters) -> EtcdClient:
    """``client`` once etcd answers it (else closed, and a clear error)."""
    try:
        version = client.status().version
    except EtcdClientError as exc:
        client.close()
        hint = "Start etcd there or fix the endpoint" + (
            ""
            if opts.may_embed
            else " (an explicit endpoint is never replaced by an "
            "embedded etcd: leave it out, or pass localhost:0, to host one in an agent "
            "on this machine; for a job across hosts, add --rdzv-conf=embedded=true, or "
            "pass HOST:0, and the agents form a replicated etcd on HOST and beside it)"
        )
        raise RendezvousConnectionError(
            f"--rdzv-backend={params.backend}: no etcd answers at --rdzv-endpoint "
            f"{opts.endpoint_list()} ({exc}). {hint}."
        ) from exc
    log.info(
        "%s rendezvous %r on etcd %s at %s",
        params.backend,
        params.run_id,
        version,
        opts.endpoint_list(),
    )
    return client


def create_backend(
    params: RendezvousParameters,
) -> tuple[EtcdRendezvousBackend, EtcdStore, EtcdV3Options]:
    """Check ``params``, connect (hosting etcd if needed), build the backend and the store.

    Raises:
        ValueError: a bad option, value or endpoint (:class:`OptionError`).
        RendezvousConnectionError: no etcd answers (and none could be hosted).
    """
    try:
        opts = parse_options(params)
    except OptionError:
        raise
    except ValueError as exc:  # torch's own bool parsing
        raise OptionError(str(exc)) from exc
    if opts.keep_alive_max_attempt < 3:
        # torch writes a heartbeat only when the last one is older than the interval, and
        # its timer ticks once per interval: heartbeats can land 2 intervals apart.
        log.warning(
            "keep_alive_max_attempt=%d: torch's heartbeats can be 2 intervals apart, so "
            "live nodes may be declared dead; use 3 or more",
            opts.keep_alive_max_attempt,
        )
    # Build the timeouts now so a bad one fails before we touch the network.
    RendezvousTimeout(
        opts.join_timeout, opts.last_call_timeout, opts.close_timeout, opts.heartbeat_timeout
    )

    client = connect(opts, params)

    prefix = run_key_prefix(opts.key_prefix, params.run_id)
    backend = EtcdRendezvousBackend(
        client, params.run_id, opts.key_prefix, ttl=opts.ttl, name=params.backend
    )
    store = EtcdStore(
        client,
        prefix + "store/",
        timeout=timedelta(seconds=opts.read_timeout),
        owns_client=True,
    )
    return backend, store, opts


def create_rdzv_handler(params: RendezvousParameters) -> DynamicRendezvousHandler:
    """The ``etcd-v3`` handler creator torch's registry calls with ``RendezvousParameters``."""
    backend, store, opts = create_backend(params)
    try:
        handler: DynamicRendezvousHandler = DynamicRendezvousHandler.from_backend(
            run_id=params.run_id,
            store=store,
            backend=backend,
            min_nodes=params.min_nodes,
            max_nodes=params.max_nodes,
            local_addr=params.local_addr,
            timeout=RendezvousTimeout(
                opts.join_timeout,
                opts.last_call_timeout,
                opts.close_timeout,
                opts.heartbeat_timeout,
            ),
            keep_alive_interval=opts.keep_alive_interval,
            keep_alive_max_attempt=opts.keep_alive_max_attempt,
        )
    except BaseException:
        store.close()
        raise
    return handler


def get_handler_creator() -> RendezvousHandlerCreator:
    """Entry point of the ``torchrun.handlers`` group: returns the handler creator."""
    return create_rdzv_handler


__all__ = [
    "BACKEND_NAME",
    "create_backend",
    "create_client",
    "create_rdzv_handler",
    "get_handler_creator",
]
