"""The native rendezvous engine: per-node leased keys, watches, one txn per round.

Works without torch. See :mod:`etcd_rendezvous.rendezvous._machine` for the design.
"""

from __future__ import annotations

from etcd_rendezvous.rendezvous._errors import (
    RendezvousClosedError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousLeftError,
    RendezvousStateError,
    RendezvousTimeoutError,
)
from etcd_rendezvous.rendezvous._machine import Assignment, Change, ChangeKind
from etcd_rendezvous.rendezvous.engine import Rendezvous

__all__ = [
    "Assignment",
    "Change",
    "ChangeKind",
    "Rendezvous",
    "RendezvousClosedError",
    "RendezvousError",
    "RendezvousGracefulExitError",
    "RendezvousLeftError",
    "RendezvousStateError",
    "RendezvousTimeoutError",
]
