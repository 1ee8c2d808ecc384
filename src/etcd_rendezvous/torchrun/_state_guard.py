"""Check a rendezvous state blob before torch unpickles it.

torch's ``DynamicRendezvousHandler`` pickles its state and ``pickle.loads``
whatever the backend returns: anyone who can write the key could run code on
every node. We cannot change what torch does with the bytes, but we can refuse
to hand it bytes that are not a plain rendezvous state: the blob is loaded
first with an unpickler that only resolves the handful of classes a state is
made of (the state, node descriptors, ``datetime``), so a payload naming any
other callable is rejected before torch sees it, and truncated or garbled
bytes raise a clear error instead of whatever exception ``pickle`` happens to
raise.
"""

from __future__ import annotations

import datetime
import io
import pickle
from typing import Any

_DYNAMIC = "torch.distributed.elastic.rendezvous.dynamic_rendezvous"

#: (module, name) pairs a pickled ``_RendezvousState`` may refer to.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        (_DYNAMIC, "_RendezvousState"),
        (_DYNAMIC, "_NodeDesc"),
        ("datetime", "datetime"),
        ("datetime", "timezone"),
        ("datetime", "timedelta"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "tuple"),
        ("builtins", "object"),
        ("copyreg", "_reconstructor"),
    }
)

#: A state larger than this is certainly not one torch wrote.
MAX_STATE_BYTES = 64 * 1024 * 1024


class StateCheckError(ValueError):
    """The bytes are not a plain pickled rendezvous state."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise StateCheckError(
                f"it refers to {module}.{name}, which a rendezvous state never does"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise StateCheckError("it uses persistent ids, which a rendezvous state never does")


def check_state(data: bytes) -> None:
    """Raise :class:`StateCheckError` unless ``data`` is a plain pickled rendezvous state."""
    if not data:
        raise StateCheckError("it is empty")
    if len(data) > MAX_STATE_BYTES:
        raise StateCheckError(f"it is {len(data)} bytes long")
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except StateCheckError:
        raise
    except Exception as exc:
        # pickle raises many types on garbage (UnpicklingError, EOFError,
        # ValueError, KeyError, IndexError, ...): all mean "not a state".
        raise StateCheckError(f"it does not unpickle ({type(exc).__name__}: {exc})") from exc
    if type(obj).__name__ != "_RendezvousState" or type(obj).__module__ != _DYNAMIC:
        raise StateCheckError(f"it holds a {type(obj).__name__}, not a rendezvous state")
    try:
        _check_fields(obj)
    except StateCheckError:
        raise
    except Exception as exc:  # a check tripped over something stranger still
        raise StateCheckError(
            f"its fields cannot be checked ({type(exc).__name__}: {exc})"
        ) from exc


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _describe(value: Any) -> str:
    """What ``value`` is, for a message: its type, and its repr when that is a plain one."""
    if type(value) in (int, str, bool, float, type(None)):
        return f"{type(value).__name__} {_short(value)}"
    return f"a {type(value).__name__}"


def _check_fields(state: Any) -> None:
    """Every field of torch's ``_RendezvousState`` has the type torch relies on.

    torch trusts the unpickled state blindly: a participant with a string rank, a
    heartbeat that is not a datetime or a node that is not a ``_NodeDesc`` raise
    ``AttributeError``/``TypeError`` deep inside torch, or hang ``next_rendezvous()``.
    """
    fields = vars(state)
    for name in _STATE_FIELDS:
        if name not in fields:
            raise StateCheckError(f"its field {name!r} is missing")
    _integer(fields["round"], "its field 'round'")
    for name in ("complete", "closed"):
        if type(fields[name]) is not bool:
            raise StateCheckError(
                f"its field {name!r} must be a bool, got {_describe(fields[name])}"
            )
    if fields["deadline"] is not None:
        _datetime(fields["deadline"], "its field 'deadline'")
    participants = fields["participants"]
    if type(participants) is not dict:
        raise StateCheckError(
            f"its field 'participants' must be a dict, got {_describe(participants)}"
        )
    for node, rank in participants.items():
        _node(node, "a participant")
        _integer(rank, f"the rank of participant {_short(node)}")
    for name in ("wait_list", "redundancy_list"):
        nodes = fields[name]
        if type(nodes) is not set:
            raise StateCheckError(f"its field {name!r} must be a set, got {_describe(nodes)}")
        for node in nodes:
            _node(node, f"a node of {name!r}")
    heartbeats = fields["last_heartbeats"]
    if type(heartbeats) is not dict:
        raise StateCheckError(
            f"its field 'last_heartbeats' must be a dict, got {_describe(heartbeats)}"
        )
    for node, when in heartbeats.items():
        _node(node, "a node of 'last_heartbeats'")
        _datetime(when, f"the last heartbeat of {_short(node)}")


_STATE_FIELDS = (
    "round",
    "complete",
    "deadline",
    "closed",
    "participants",
    "wait_list",
    "redundancy_list",
    "last_heartbeats",
)


def _integer(value: Any, what: str) -> None:
    if type(value) is not int or value < 0:
        raise StateCheckError(f"{what} must be a non-negative int, got {_describe(value)}")


def _datetime(value: Any, what: str) -> None:
    if type(value) is not datetime.datetime:
        raise StateCheckError(f"{what} must be a datetime, got {_describe(value)}")
    if value.utcoffset() is None:  # torch compares it with datetime.now(timezone.utc)
        raise StateCheckError(f"{what} must be timezone-aware, got {value.isoformat()}")


def _node(value: Any, what: str) -> None:
    if type(value).__name__ != "_NodeDesc" or type(value).__module__ != _DYNAMIC:
        raise StateCheckError(f"{what} must be a node descriptor, got {_describe(value)}")
    fields = vars(value)
    if set(fields) != {"addr", "pid", "local_id"}:
        raise StateCheckError(f"{what} has the fields {sorted(fields)}, not addr, pid, local_id")
    if type(fields["addr"]) is not str:
        raise StateCheckError(f"{what} must have a string addr, got {_describe(fields['addr'])}")
    for name in ("pid", "local_id"):
        _integer(fields[name], f"the {name} of {what}")


__all__ = ["ALLOWED_GLOBALS", "StateCheckError", "check_state"]
