"""Errors of the rendezvous engine (all derive from :class:`EtcdRendezvousError`)."""

from __future__ import annotations

from etcd_rendezvous.errors import EtcdRendezvousError


class RendezvousError(EtcdRendezvousError):
    """A rendezvous operation failed; ``run_id`` names the rendezvous."""

    def __init__(self, message: str, *, run_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


class RendezvousClosedError(RendezvousError):
    """The rendezvous is closed: the job is over and no round will start again."""


class RendezvousGracefulExitError(RendezvousClosedError):
    """The rendezvous closed while this node waited as a hot spare (like torch's)."""


class RendezvousTimeoutError(RendezvousError):
    """``join`` (or ``close``) did not complete within its timeout."""


class RendezvousLeftError(RendezvousError):
    """This node left the rendezvous (``leave()``) or lost its lease while joining."""


class RendezvousConfigError(RendezvousError):
    """This node's settings contradict the run's (``ctl/config``, written by its first node).

    Raised by ``join`` when e.g. ``min_nodes``/``max_nodes`` differ from the values the
    run was started with: use the same settings on every node, or another run id.
    """


class RendezvousStateError(RendezvousError):
    """A value under the run's prefix is not a valid rendezvous record.

    Raised for corrupt or foreign data (not JSON, wrong format version, missing
    fields); ``key`` is the offending key. Nothing under the prefix is ever
    unpickled or executed.
    """

    def __init__(self, message: str, *, run_id: str | None = None, key: str | None = None) -> None:
        super().__init__(message, run_id=run_id)
        self.key = key


__all__ = [
    "RendezvousClosedError",
    "RendezvousConfigError",
    "RendezvousError",
    "RendezvousGracefulExitError",
    "RendezvousLeftError",
    "RendezvousStateError",
    "RendezvousTimeoutError",
]
