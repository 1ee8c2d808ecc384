"""The native rendezvous engine: per-node leased keys, watches, one txn per round.

Works without torch. See :mod:`etcd_rendezvous.rendezvous._machine` for the design.
"""

from __future__ import annotations

from etcd_rendezvous.rendezvous._errors import (
    RendezvousClosedError,
    RendezvousConfigError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousLeftError,
    RendezvousStateError,
    RendezvousTimeoutError,
)
from etcd_rendezvous.rendezvous._machine import Assignment, Change, ChangeKind
from etcd_rendezvous.rendezvous._records import (
    DEFAULT_KEY_PREFIX,
    Cause,
    Completion,
    ConfigRecord,
    RoundRecord,
    StatusRecord,
    check_run_id,
)
from etcd_rendezvous.rendezvous._snapshot import (
    Closed,
    EventTranslator,
    Listing,
    NodeInfo,
    Problem,
    RunEvent,
    Snapshot,
    UnknownRunError,
    close_run,
    list_snapshots,
    load_snapshot,
)
from etcd_rendezvous.rendezvous.engine import DEFAULT_LEASE_TTL, Rendezvous

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_LEASE_TTL",
    "Assignment",
    "Cause",
    "Change",
    "ChangeKind",
    "Closed",
    "Completion",
    "ConfigRecord",
    "EventTranslator",
    "Listing",
    "NodeInfo",
    "Problem",
    "Rendezvous",
    "RendezvousClosedError",
    "RendezvousConfigError",
    "RendezvousError",
    "RendezvousGracefulExitError",
    "RendezvousLeftError",
    "RendezvousStateError",
    "RendezvousTimeoutError",
    "RoundRecord",
    "RunEvent",
    "Snapshot",
    "StatusRecord",
    "UnknownRunError",
    "check_run_id",
    "close_run",
    "list_snapshots",
    "load_snapshot",
]
