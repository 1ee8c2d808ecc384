"""``EtcdRendezvousBackend``: torch's ``RendezvousBackend`` contract on etcd v3.

The state torch's ``DynamicRendezvousHandler`` hands us (its own pickle) is
stored as bytes (no base64) at one key per run id, behind an 11-byte header (a
magic string and a CRC-32 of the state), so a value torch did not write, or a
damaged one, is reported as a ``RendezvousStateError`` rather than handed to
``pickle.loads``. The fencing token is
the key's ``mod_revision``; ``set_state`` is one transaction comparing it (or
``create_revision == 0`` for the first write), which returns the current state
when the comparison fails, so a lost race costs a single request.

The key is attached to a lease: a run that nobody writes to for ``ttl``
seconds (two hours by default, as torch's ``etcd-v2`` backend) disappears on
its own.

Errors are translated once, here: anything etcd-related becomes torch's
``RendezvousConnectionError``, a state torch could not have written becomes
``RendezvousStateError``; the cause is always chained.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Sequence
from urllib.parse import quote

from torch.distributed.elastic.rendezvous.api import (
    RendezvousConnectionError,
    RendezvousStateError,
)
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousBackend, Token

from etcd_rendezvous.client import Compare, EtcdClient, KeyValue, Op, RangeResponse, Retry
from etcd_rendezvous.errors import (
    EtcdClientError,
    EtcdLeaseNotFoundError,
    EtcdTimeoutError,
    EtcdUnavailableError,
)
from etcd_rendezvous.torchrun._state_guard import StateCheckError, check_state

log = logging.getLogger(__name__)

#: The backend name torchrun knows us by (``--rdzv-backend=etcd-v3``).
BACKEND_NAME = "etcd-v3"

#: Where runs live unless ``key_prefix`` says otherwise.
DEFAULT_KEY_PREFIX = "/torch/elastic/rendezvous"

DEFAULT_TTL = 7200  # two hours, as torch's etcd-v2 backend

#: Header of a stored state: magic + format version, then a big-endian CRC-32.
STATE_MAGIC = b"\x00ERDZ1\n"
_HEADER_LEN = len(STATE_MAGIC) + 4


def encode_state(state: bytes) -> bytes:
    """The value stored in etcd for ``state``: header, CRC-32, the state itself."""
    return STATE_MAGIC + zlib.crc32(state).to_bytes(4, "big") + state


def decode_state(value: bytes) -> bytes:
    """The state inside a stored value; ``ValueError`` when it is not one of ours or damaged."""
    if len(value) < _HEADER_LEN or not value.startswith(STATE_MAGIC):
        raise ValueError("it lacks the etcd-rendezvous state header")
    state = value[_HEADER_LEN:]
    if zlib.crc32(state).to_bytes(4, "big") != value[len(STATE_MAGIC) : _HEADER_LEN]:
        raise ValueError("its checksum does not match (damaged or truncated)")
    return state


def run_key_prefix(key_prefix: str, run_id: str) -> str:
    """``<key_prefix>/<run id>/``, the run id escaped so it cannot contain ``/``."""
    return f"{key_prefix.rstrip('/')}/{quote(run_id, safe='')}/"


class EtcdRendezvousBackend(RendezvousBackend):
    """Holds the rendezvous state of one run in etcd (v3 API).

    Args:
        client: the :class:`~etcd_rendezvous.client.EtcdClient` to use.
        run_id: the run id of the rendezvous.
        key_prefix: where runs live; the state is at
            ``<key_prefix>/<run id>/state``.
        ttl: seconds after the last write at which etcd deletes the state
            (two hours when ``None`` or not positive).
        check_states: also refuse (with ``RendezvousStateError``) a state
            that is not a plain pickled ``_RendezvousState`` before torch
            unpickles it (see :mod:`etcd_rendezvous.torchrun._state_guard`).
            Turn it off only to store arbitrary bytes (torch's backend test
            suite does).
        name: what :attr:`name` reports: the ``--rdzv-backend`` name the handler was
            created under (torch's ``create_handler`` refuses a handler whose backend
            names another).
    """

    def __init__(
        self,
        client: EtcdClient,
        run_id: str,
        key_prefix: str | None = None,
        ttl: int | None = None,
        *,
        check_states: bool = True,
        name: str = BACKEND_NAME,
    ) -> None:
        if not run_id:
            raise ValueError("The run id must be a non-empty string.")
        self._client = client
        self._run_id = run_id
        self._key = (run_key_prefix(key_prefix or DEFAULT_KEY_PREFIX, run_id) + "state").encode()
        self._ttl = ttl if ttl and ttl > 0 else DEFAULT_TTL
        self._check_states = check_states
        self._name = name
        self._lock = threading.Lock()
        self._lease_id: int | None = None
        self._lease_granted_at = 0.0

    @property
    def name(self) -> str:
        """See base class: the ``--rdzv-backend`` name it was created for (torch checks it)."""
        return self._name

    @property
    def key(self) -> bytes:
        """The etcd key holding the state (within the client's namespace)."""
        return self._key

    @property
    def ttl(self) -> int:
        return self._ttl

    def get_state(self) -> tuple[bytes, Token] | None:
        """See base class."""
        try:
            kv = self._client.get(self._key)
        except EtcdClientError as exc:
            raise self._connection_error("read", exc) from exc
        if kv is None:
            return None
        return self._decode(kv)

    def set_state(
        self, state: bytes, token: Token | None = None
    ) -> tuple[bytes, Token, bool] | None:
        """See base class."""
        revision: int | None
        if token:
            try:
                revision = int(token)
            except (TypeError, ValueError):
                # Not one of our tokens: it cannot match, return the current state.
                current = self.get_state()
                return None if current is None else (*current, False)
            guard = Compare.mod_revision(self._key, "==", revision)
        else:
            revision = None
            guard = Compare.create_revision(self._key, "==", 0)

        for attempt in range(2):
            lease = self._lease()
            try:
                resp = self._client.txn(
                    [guard],
                    [Op.put(self._key, encode_state(state), lease=lease)],
                    [Op.get(self._key)],
                )
            except EtcdLeaseNotFoundError as exc:
                # Our lease expired or was revoked behind our back: take a new one.
                self._forget_lease(lease)
                if attempt == 0:
                    continue
                raise self._connection_error("write", exc) from exc
            except (EtcdTimeoutError, EtcdUnavailableError) as exc:
                # The write may or may not have happened: look.
                return self._resolve_unknown_outcome(state, guard, revision, lease, exc)
            except EtcdClientError as exc:
                raise self._connection_error("write", exc) from exc
            if resp.succeeded:
                return state, resp.revision, True
            found = _first_kv(resp.responses)
            if found is None:
                return None
            return (*self._decode(found), False)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- internals -------------------------------------------------------------

    def _resolve_unknown_outcome(
        self,
        state: bytes,
        guard: Compare,
        revision: int | None,
        lease: int,
        exc: EtcdClientError,
    ) -> tuple[bytes, Token, bool] | None:
        """The outcome of a state write whose reply was lost, for certain.

        Read the key: if the guard still holds, the write was not applied (yet), and
        sending the same guarded transaction again is safe (whichever copy lands first
        wins, every other one fails its guard), so it is sent again until one reply
        tells. Otherwise the state read back says whether it was ours.
        """
        log.info(
            "rendezvous %r: the outcome of a state write is unknown (%s); reading it back",
            self._run_id,
            exc,
        )
        retry = Retry(deadline=self._client.timeout * 3, delay=0.05, max_delay=0.5)
        last: EtcdClientError = exc
        while True:
            try:
                kv = self._client.get(self._key)
                if not _guard_holds(revision, kv):
                    break
                resp = self._client.txn(
                    [guard],
                    [Op.put(self._key, encode_state(state), lease=lease)],
                    [Op.get(self._key)],
                )
            except (EtcdTimeoutError, EtcdUnavailableError) as again:
                last = again
                if not retry.sleep():
                    raise self._connection_error("write", last) from exc
                continue
            except EtcdClientError as exc2:
                raise self._connection_error("write", exc2) from exc
            if resp.succeeded:
                return state, resp.revision, True
            kv = _first_kv(resp.responses)
            break
        if kv is None:
            return None
        value, token = self._decode(kv)
        # torch's states carry heartbeat timestamps: equal bytes mean our write.
        return value, token, value == state

    def _lease(self) -> int:
        """A lease with most of ``ttl`` left, reused across writes."""
        with self._lock:
            now = time.monotonic()
            if self._lease_id is not None and now - self._lease_granted_at < self._ttl / 10:
                return self._lease_id
            try:
                grant = self._client.lease_grant(self._ttl)
            except EtcdClientError as exc:
                raise self._connection_error("write", exc) from exc
            self._lease_id = grant.id
            self._lease_granted_at = now
            return grant.id

    def _forget_lease(self, lease: int) -> None:
        with self._lock:
            if self._lease_id == lease:
                self._lease_id = None

    def _decode(self, kv: KeyValue) -> tuple[bytes, Token]:
        try:
            state = decode_state(kv.value)
            if self._check_states:
                check_state(state)
        except (ValueError, StateCheckError) as exc:
            raise RendezvousStateError(
                f"The rendezvous state of run {self._run_id!r} at etcd key "
                f"{self._key.decode(errors='replace')!r} is corrupt or was not written by "
                f"this backend: {exc}. Delete the key to start the rendezvous over."
            ) from exc
        return state, kv.mod_revision

    def _connection_error(self, what: str, exc: EtcdClientError) -> RendezvousConnectionError:
        return RendezvousConnectionError(
            f"The connection to etcd ({', '.join(self._client.endpoints)}) failed while trying "
            f"to {what} the rendezvous state of run {self._run_id!r}: {exc}"
        )

    def __repr__(self) -> str:
        return f"EtcdRendezvousBackend(run_id={self._run_id!r}, key={self._key!r})"


def _guard_holds(revision: int | None, kv: KeyValue | None) -> bool:
    """Whether the write guard holds for ``kv``: ``mod_revision == revision``, or no key
    when ``revision`` is ``None`` (a first write)."""
    if revision is None:
        return kv is None
    return kv is not None and kv.mod_revision == revision


def _first_kv(responses: Sequence[object]) -> KeyValue | None:
    for resp in responses:
        if isinstance(resp, RangeResponse) and resp.kvs:
            return resp.kvs[0]
    return None


__all__ = [
    "BACKEND_NAME",
    "DEFAULT_KEY_PREFIX",
    "EtcdRendezvousBackend",
    "decode_state",
    "encode_state",
    "run_key_prefix",
]
