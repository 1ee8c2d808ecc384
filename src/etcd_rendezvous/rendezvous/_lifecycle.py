"""A run's life after it closed: expiry, deletion, and starting afresh on its id.

A closed run's keys (``<key_prefix>/<run_id>/`` and the torchrun store beside it,
``<key_prefix>-store/<run_id>/``) are put on a lease of ``ttl`` seconds by the node
that closed it (:func:`expire_run`), so finished runs vanish on their own; until then
``etcd-rendezvous rdzv delete`` removes them (:func:`delete_run`). A new job on the id
of a closed run whose nodes are all gone starts fresh (:func:`reset_if_finished`); one
whose nodes still hold leases fails with the command that fixes it.

Every write here is a transaction guarded by what was read (the closed marker's
``mod_revision``, no live node key), so a resend after a lost reply, or two nodes doing
it at once, cannot delete a run that someone else started meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from etcd_rendezvous.client import Compare, DeleteOp, EtcdClient, KeyValue, Op
from etcd_rendezvous.rendezvous._errors import RendezvousClosedError, RendezvousError
from etcd_rendezvous.rendezvous._records import DEFAULT_KEY_PREFIX, ClosedRecord, Keys, decode

log = logging.getLogger(__name__)

#: Default seconds a closed run's keys outlive the close (torch's dynamic backend's ``ttl``).
DEFAULT_CLOSED_TTL = 7200
#: Keys moved per transaction (etcd's default limit is 128 operations per txn).
_BATCH = 50


def store_prefix(key_prefix: str, run_id: str) -> str:
    """Where a run's torchrun ``EtcdStore`` lives: ``<key_prefix>-store/<run_id>/``."""
    return f"{key_prefix.rstrip('/')}-store/{run_id}/"


class RunInUseError(RendezvousError):
    """The run still has nodes holding leases: it is not finished."""


@dataclass(frozen=True)
class RunKeys:
    """What a run holds in etcd, read at one revision."""

    closed: ClosedRecord | None
    closed_revision: int  # mod_revision of ctl/closed (0: not closed)
    live_nodes: list[str]
    count: int  # every key of the run, store included


def read_run(client: EtcdClient, run_id: str, key_prefix: str = DEFAULT_KEY_PREFIX) -> RunKeys:
    """The run's closed marker, live nodes and key count."""
    keys = Keys(run_id, key_prefix)
    response = client.txn(
        [],
        [
            Op.get(keys.root, prefix=True),
            Op.get(store_prefix(key_prefix, run_id), prefix=True, count_only=True),
        ],
    )
    engine_kvs: list[KeyValue] = list(getattr(response.responses[0], "kvs", []))
    stored = int(getattr(response.responses[1], "count", 0))
    closed: ClosedRecord | None = None
    closed_revision = 0
    live: list[str] = []
    for kv in engine_kvs:
        name = kv.key.decode("utf-8", "replace")
        if name == keys.closed:
            closed_revision = kv.mod_revision
            try:
                record = decode(kv.value, key=name, run_id=run_id)
            except RendezvousError:
                record = ClosedRecord("?")
            closed = record if isinstance(record, ClosedRecord) else ClosedRecord("?")
        elif name.startswith(keys.nodes):
            live.append(name[len(keys.nodes) :])
    return RunKeys(closed, closed_revision, sorted(live), len(engine_kvs) + stored)


def _delete_ops(run_id: str, key_prefix: str) -> list[DeleteOp]:
    return [
        Op.delete(Keys(run_id, key_prefix).root, prefix=True),
        Op.delete(store_prefix(key_prefix, run_id), prefix=True),
    ]


def delete_run(
    client: EtcdClient, run_id: str, key_prefix: str = DEFAULT_KEY_PREFIX, *, force: bool = False
) -> int:
    """Delete every key of ``run_id``; how many. Refused while nodes hold leases.

    Raises:
        RunInUseError: nodes of the run are alive (not with ``force``).
    """
    keys = Keys(run_id, key_prefix)
    compares: list[Compare] = (
        [] if force else [Compare.create_revision(keys.nodes, "==", 0, prefix=True)]
    )
    response = client.txn(compares, _delete_ops(run_id, key_prefix))
    if not response.succeeded:
        live = read_run(client, run_id, key_prefix).live_nodes
        raise RunInUseError(
            f"rendezvous {run_id!r} still has live nodes ({', '.join(live) or '?'}): stop "
            "its job first, or delete with --force",
            run_id=run_id,
        )
    return sum(int(getattr(r, "deleted", 0)) for r in response.responses)


def expire_run(
    client: EtcdClient, run_id: str, ttl: int, key_prefix: str = DEFAULT_KEY_PREFIX
) -> int:
    """Put the run's keys that have no lease on a new lease of ``ttl`` s; how many.

    Each key is rewritten with its own value by a txn guarded by its ``mod_revision``,
    so a key changed meanwhile (a new job on the id) keeps its new value and no lease.
    """
    bare = [
        kv
        for prefix in (Keys(run_id, key_prefix).root, store_prefix(key_prefix, run_id))
        for kv in client.get_prefix(prefix)
        if not kv.lease  # node and leader keys go with their own leases
    ]
    if not bare:
        return 0
    lease = client.lease_grant(ttl).id
    moved = 0
    for start in range(0, len(bare), _BATCH):
        batch = bare[start : start + _BATCH]
        response = client.txn(
            [Compare.mod_revision(kv.key, "==", kv.mod_revision) for kv in batch],
            [Op.put(kv.key, kv.value, lease=lease) for kv in batch],
        )
        if response.succeeded:
            moved += len(batch)
            continue
        for kv in batch:  # some key changed meanwhile: one by one, the changed ones stay
            one = client.txn(
                [Compare.mod_revision(kv.key, "==", kv.mod_revision)],
                [Op.put(kv.key, kv.value, lease=lease)],
            )
            moved += int(one.succeeded)
    return moved


def reset_if_finished(
    client: EtcdClient,
    run_id: str,
    key_prefix: str = DEFAULT_KEY_PREFIX,
    *,
    wait: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ClosedRecord | None:
    """If ``run_id`` is closed and none of its nodes is alive, delete it (start fresh).

    Waits up to ``wait`` seconds for the leases of the closed run's last nodes to go
    (a job that just ended: its agents are leaving). Returns the closed record of the
    run deleted, None if it was not closed.

    Raises:
        RendezvousClosedError: the run is closed and nodes still hold leases after ``wait``.
    """
    deadline = clock() + wait
    keys = Keys(run_id, key_prefix)
    while True:
        state = read_run(client, run_id, key_prefix)
        if state.closed is None:
            return None
        response = client.txn(
            [
                Compare.mod_revision(keys.closed, "==", state.closed_revision),
                Compare.create_revision(keys.nodes, "==", 0, prefix=True),
            ],
            _delete_ops(run_id, key_prefix),
        )
        if response.succeeded:
            log.info(
                "rendezvous %s was closed by %s at %s and has no live node: starting afresh",
                run_id,
                state.closed.by,
                state.closed.time or "?",
            )
            return state.closed
        if clock() >= deadline:
            live = read_run(client, run_id, key_prefix).live_nodes
            raise RendezvousClosedError(
                f"rendezvous {run_id!r} was closed by {state.closed.by} at "
                f"{state.closed.time or '?'} and nodes still hold leases in it "
                f"({', '.join(live) or '?'}): its job is still ending, or still running. "
                "Use another run id, or once that job is gone run: etcd-rendezvous rdzv "
                f"delete {run_id} (with --endpoints and --key-prefix of this job)",
                run_id=run_id,
            )
        sleep(0.2)


__all__ = [
    "DEFAULT_CLOSED_TTL",
    "RunInUseError",
    "RunKeys",
    "delete_run",
    "expire_run",
    "read_run",
    "reset_if_finished",
    "store_prefix",
]
