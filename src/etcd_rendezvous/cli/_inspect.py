"""Inspection helpers for ``etcd-rendezvous rdzv`` and ``demo``, on the engine's public API.

The reading itself (snapshots, listings, event translation, closing) lives in
:mod:`etcd_rendezvous.rendezvous` (``load_snapshot``, ``list_snapshots``,
``EventTranslator``, ``close_run``); this module only adapts it to the commands.
"""

from __future__ import annotations

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.rendezvous import (
    EventTranslator,
    Listing,
    NodeInfo,
    Problem,
    RunEvent,
    Snapshot,
    UnknownRunError,
    list_snapshots,
    load_snapshot,
)

RunSnapshot = Snapshot  # the name the commands grew up with


def load_run(
    client: EtcdClient, run_id: str, key_prefix: str, *, lease_ttls: bool = True
) -> Snapshot:
    """One run; :class:`UnknownRunError` when nothing exists under it."""
    return load_snapshot(
        client, run_id, key_prefix=key_prefix, lease_ttls=lease_ttls, must_exist=True
    )


def list_runs(client: EtcdClient, key_prefix: str) -> Listing:
    return list_snapshots(client, key_prefix=key_prefix)


def empty_snapshot(run_id: str, key_prefix: str, revision: int) -> Snapshot:
    """A run with no keys yet, as seen at ``revision`` (to watch it from there)."""
    return Snapshot(
        run_id=run_id,
        key_prefix=key_prefix,
        revision=revision,
        round=None,
        round_revision=0,
        status=None,
        leader=None,
        leader_lease=0,
        closed=None,
        nodes={},
        lost=(),
    )


__all__ = [
    "EventTranslator",
    "Listing",
    "NodeInfo",
    "Problem",
    "RunEvent",
    "RunSnapshot",
    "UnknownRunError",
    "empty_snapshot",
    "list_runs",
    "load_run",
]
