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


__all__ = ["ALLOWED_GLOBALS", "StateCheckError", "check_state"]
