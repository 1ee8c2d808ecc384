"""``EtcdStore``: a ``torch.distributed.Store`` on etcd's v3 API.

Every key of the store lives under one prefix (one per run id when the
rendezvous creates it), stored as-is: keys and values are arbitrary bytes, no
base64, no directory reads. Each operation is one or two etcd requests whatever
the number of keys in the store:

* ``get``/``wait``/``multi_get`` read the keys; for those still missing they
  open one watch starting at the revision of that read + 1 (so nothing written
  in between is missed) and return as soon as the last missing key is put. No
  polling.
* ``add``/``append``/``compare_set``/``delete_key`` are compare-and-swap
  transactions on the key's ``mod_revision`` (or ``create_revision == 0`` for a
  new key): exact under contention.
* Every write is applied exactly once, even when its reply is lost (a member
  killed, a connection cut after etcd received the request). Each write
  transaction also puts an *operation marker*, a key private to the calling
  thread's slot of this store, and is guarded on the marker's ``mod_revision``
  as the slot last saw it. Whichever copy of a resent transaction lands first
  moves the marker, so every other copy fails its guard; the failed copy's reply
  carries the marker, whose value names the attempt that was applied. A write
  whose reply was lost is therefore simply sent again, and the caller gets the
  right result, never a duplicate. Markers live at ``prefix + "\\x00etcd-store-ops/"``
  (not counted by ``num_keys``, not listed; a store's markers are deleted by
  :meth:`EtcdStore.close`; one per thread writing at the same time).
* Timeouts raise :class:`~etcd_rendezvous.torchrun.errors.EtcdStoreTimeoutError`
  (a ``torch.distributed.DistStoreError``, as ``TCPStore`` raises), connection
  failures :class:`~etcd_rendezvous.torchrun.errors.EtcdStoreConnectionError`
  (a ``torch.distributed.DistNetworkError``); a write that etcd stopped answering
  for the whole retry deadline after it may have been received raises its
  subclass :class:`~etcd_rendezvous.torchrun.errors.EtcdStoreOutcomeUnknownError`.

torch's C++ side (``PrefixStore``, ``ProcessGroupGloo``, ...) calls a Python store
through a pybind11 trampoline that looks methods up by their C++ names for
``getNumKeys``, ``deleteKey`` and ``clone``; both spellings are provided.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from torch._C._distributed_c10d import Store

from etcd_rendezvous.client import (
    Compare,
    EtcdClient,
    KeyValue,
    Op,
    RangeResponse,
    Retry,
    TxnResponse,
)
from etcd_rendezvous.client.txn import AnyOp
from etcd_rendezvous.errors import (
    EtcdClientError,
    EtcdCompactedError,
    EtcdOutcomeUnknownError,
    EtcdTimeoutError,
    EtcdUnavailableError,
    EtcdWatchError,
)
from etcd_rendezvous.torchrun.errors import (
    EtcdStoreConnectionError,
    EtcdStoreError,
    EtcdStoreOutcomeUnknownError,
    EtcdStoreQueueEmptyError,
    EtcdStoreTimeoutError,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: etcd's default ``--max-txn-ops``: reads/writes of many keys are chunked by it.
MAX_TXN_OPS = 128

#: How long an operation keeps retrying when no etcd member answers (a leader
#: election, a member being replaced) before raising a connection error.
DEFAULT_RETRY_DEADLINE = 15.0

#: Where, under the store's prefix, the operation markers live (see the module doc).
MARKER_DIR = b"\x00etcd-store-ops/"
#: Where, under the store's prefix, the items of ``queue_push`` live (one key each).
QUEUE_DIR = b"\x00etcd-store-queues/"
#: What ``num_keys``/``list_keys`` leave out and user keys may not start with.
_RESERVED = b"\x00etcd-store-"

KeyLike = str | bytes
ValueLike = str | bytes | bytearray | memoryview


def _to_bytes(data: KeyLike | ValueLike, what: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"a store {what} must be str or bytes, got {type(data).__name__}")


# ``Store.timeout`` is a C++ property (missing from torch's type stubs); C++ code,
# e.g. ``PrefixStore.set_timeout``, changes it on the C++ side.
_BASE_TIMEOUT: Any = Store.__dict__["timeout"]


def _seconds(timeout: timedelta) -> float:
    return max(timeout.total_seconds(), 0.0)


# Clones alive until closed (see EtcdStore.clone): C++ holders do not keep them alive.
_CLONES: set[EtcdStore] = set()
_CLONES_LOCK = threading.Lock()


@dataclass
class _Attempts:
    """The marker values (tags) of one write operation's attempts, in order."""

    seq: int
    tags: list[bytes] = field(default_factory=list)

    def next(self) -> bytes:
        tag = b"%d.%d" % (self.seq, len(self.tags))
        self.tags.append(tag)
        return tag


@dataclass
class _Slot:
    """One writer's operation marker: its key and its ``mod_revision`` as last seen."""

    key: bytes
    revision: int = 0  # 0: never written (etcd compares a missing key's as 0)


class EtcdStore(Store):
    """A c10d ``Store`` backed by etcd v3, under ``prefix``.

    Args:
        client: the :class:`~etcd_rendezvous.client.EtcdClient` to use (not
            closed by the store unless ``owns_client``).
        prefix: every key of the store is ``prefix + key``; give each run its
            own prefix (``"/torch/elastic/store/<run id>/"``).
        timeout: how long ``get``/``wait``/``multi_get`` wait for missing keys
            (torch's default, 5 minutes, when ``None``); change it later with
            ``set_timeout``.
        retry_deadline: how long an operation keeps retrying while no etcd
            member answers before it raises ``EtcdStoreConnectionError``.
        owns_client: close ``client`` in :meth:`close`.
    """

    def __init__(
        self,
        client: EtcdClient,
        prefix: KeyLike = b"/torch/elastic/store/",
        timeout: timedelta | None = None,
        *,
        retry_deadline: float = DEFAULT_RETRY_DEADLINE,
        owns_client: bool = False,
    ) -> None:
        super().__init__()  # required by the pybind11 trampoline
        raw_prefix = _to_bytes(prefix, "prefix")
        if not raw_prefix:
            raise ValueError("the store prefix must not be empty")
        self._client = client
        self._prefix = raw_prefix
        self._retry_deadline = retry_deadline
        self._owns_client = owns_client
        self._closed = False
        self._lock = threading.Lock()
        # Operation markers (see the module doc): one slot per concurrent writer.
        self._markers = raw_prefix + MARKER_DIR + uuid.uuid4().hex.encode() + b"/"
        self._free_slots: list[_Slot] = []
        self._slot_count = 0
        self._op_seq = itertools.count(1)
        if timeout is not None:
            self.set_timeout(timeout)

    # -- properties ------------------------------------------------------------

    @property
    def client(self) -> EtcdClient:
        """The etcd client the store talks through."""
        return self._client

    @property
    def timeout(self) -> timedelta:
        """How long ``get``/``wait``/``multi_get`` wait by default (see ``set_timeout``)."""
        value: timedelta = _BASE_TIMEOUT.__get__(self, type(self))
        return value

    @property
    def prefix(self) -> bytes:
        """The etcd key prefix of every key of this store."""
        return self._prefix

    # -- torch Store API -------------------------------------------------------

    def set(self, key: KeyLike, value: ValueLike) -> None:
        """Write ``value`` at ``key`` (overwriting it)."""
        k = self._key(key)
        v = _to_bytes(value, "value")
        with self._slot() as slot:
            self._commit("set", [key], slot, self._attempts(), [], [Op.put(k, v)], [])

    def get(self, key: KeyLike) -> bytes:
        """The value at ``key``, waiting up to ``timeout`` for it to be set."""
        return self._wait_values([key], self._timeout, "get")[0]

    def multi_get(self, keys: Sequence[KeyLike]) -> list[bytes]:
        """The values of ``keys`` (in order), waiting up to ``timeout`` for all of them."""
        return self._wait_values(list(keys), self._timeout, "multi_get")

    def wait(self, keys: Sequence[KeyLike], timeout: timedelta | None = None) -> None:
        """Wait until every key in ``keys`` is set, up to ``timeout`` (default: the store's)."""
        self._wait_values(list(keys), self._timeout if timeout is None else timeout, "wait")

    def check(self, keys: Sequence[KeyLike]) -> bool:
        """Whether every key in ``keys`` is set right now (no waiting)."""
        if not keys:
            return True
        found, _ = self._read([self._key(k) for k in keys], "check", list(keys))
        return len(found) == len(set(self._key(k) for k in keys))

    def add(self, key: KeyLike, amount: int) -> int:
        """Atomically add ``amount`` to the decimal integer at ``key`` (0 when unset).

        Returns the new value. Exact under contention: a compare-and-swap on the
        key's ``mod_revision``, retried on conflict.
        """
        k = self._key(key)
        delta = int(amount)

        def update(current: bytes | None) -> bytes:
            if current is None:
                return str(delta).encode()
            try:
                number = int(current)
            except ValueError:
                raise ValueError(
                    f"EtcdStore.add: the value at key {key!r} is not a decimal integer "
                    f"({current[:40]!r})"
                ) from None
            return str(number + delta).encode()

        return int(self._update(k, key, update, "add"))

    def append(self, key: KeyLike, value: ValueLike) -> None:
        """Atomically append ``value`` to the value at ``key`` (set it when unset)."""
        k = self._key(key)
        suffix = _to_bytes(value, "value")
        self._update(k, key, lambda cur: suffix if cur is None else cur + suffix, "append")

    def compare_set(
        self, key: KeyLike, expected_value: ValueLike, desired_value: ValueLike
    ) -> bytes:
        """Set ``key`` to ``desired_value`` if its value is ``expected_value``.

        torch's semantics (``TCPStore``/``HashStore``): a missing key matches an
        empty ``expected_value``. Returns the value now stored: ``desired_value``
        on success, the current value otherwise, and ``expected_value`` when the
        key does not exist and ``expected_value`` is not empty.
        """
        k = self._key(key)
        expected = _to_bytes(expected_value, "value")
        desired = _to_bytes(desired_value, "value")
        deadline = time.monotonic() + max(self._retry_deadline, _seconds(self._timeout))
        with self._slot() as slot:
            attempts = self._attempts()
            while True:
                resp = self._commit(
                    "compare_set",
                    [key],
                    slot,
                    attempts,
                    [Compare.value(k, "==", expected)],
                    [Op.put(k, desired)],
                    [Op.get(k)],
                )
                if isinstance(resp, bytes):
                    return desired
                current = _first_kv(resp.responses[1:])
                if current is not None:
                    return current.value
                if expected:
                    return expected
                # Missing key and empty expected value: create it, unless someone just did.
                resp = self._commit(
                    "compare_set",
                    [key],
                    slot,
                    attempts,
                    [Compare.create_revision(k, "==", 0)],
                    [Op.put(k, desired)],
                    [Op.get(k)],
                )
                if isinstance(resp, bytes):
                    return desired
                current = _first_kv(resp.responses[1:])
                if current is not None and current.value != expected:
                    return current.value
                if time.monotonic() >= deadline:
                    raise EtcdStoreError(f"EtcdStore.compare_set on key {key!r} kept conflicting")

    def delete_key(self, key: KeyLike) -> bool:
        """Delete ``key``; whether it existed."""
        k = self._key(key)
        deadline = time.monotonic() + max(self._retry_deadline, _seconds(self._timeout))
        with self._slot() as slot:
            attempts = self._attempts()
            while True:
                current = self._retry("delete_key", [key], lambda: self._client.get(k))
                if current is None:
                    return False
                # Guarded on the revision read: applied means it existed until then.
                guard = Compare.mod_revision(k, "==", current.mod_revision)
                done = self._commit(
                    "delete_key", [key], slot, attempts, [guard], [Op.delete(k)], []
                )
                if isinstance(done, bytes):
                    return True
                if time.monotonic() >= deadline:
                    raise EtcdStoreError(f"EtcdStore.delete_key on key {key!r} kept conflicting")

    def num_keys(self) -> int:
        """The number of keys in this store (this prefix only; markers and queues excluded)."""
        resp = self._retry(
            "num_keys",
            [],
            lambda: self._client.txn(
                [],
                [
                    Op.get(self._prefix, prefix=True, count_only=True),
                    Op.get(self._prefix + _RESERVED, prefix=True, count_only=True),
                ],
            ),
        )
        counts = [r.count for r in resp.responses if isinstance(r, RangeResponse)]
        return counts[0] - counts[1]

    def multi_set(self, keys: Sequence[KeyLike], values: Sequence[ValueLike]) -> None:
        """Set every ``keys[i]`` to ``values[i]`` (atomically per chunk of 127 keys)."""
        if len(keys) != len(values):
            raise ValueError(f"EtcdStore.multi_set: {len(keys)} keys but {len(values)} values")
        ops: list[AnyOp] = [
            Op.put(self._key(k), _to_bytes(v, "value")) for k, v in zip(keys, values, strict=True)
        ]
        per_txn = MAX_TXN_OPS - 1  # one more op: the marker
        with self._slot() as slot:
            for start in range(0, len(ops), per_txn):
                chunk = ops[start : start + per_txn]
                self._commit("multi_set", list(keys), slot, self._attempts(), [], chunk, [])

    def list_keys(self) -> list[str]:
        """Every key of this store (as ``str``; undecodable bytes escaped)."""
        resp = self._retry(
            "list_keys",
            [],
            lambda: self._client.range(self._prefix, prefix=True, keys_only=True),
        )
        n = len(self._prefix)
        reserved = self._prefix + _RESERVED
        return [
            kv.key[n:].decode("utf-8", "surrogateescape")
            for kv in resp.kvs
            if not kv.key.startswith(reserved)
        ]

    def queue_push(self, key: KeyLike, value: ValueLike) -> None:
        """Append ``value`` to the queue ``key`` (``TCPStore``'s queues; exactly once)."""
        item = self._queue(key) + uuid.uuid4().hex.encode()
        v = _to_bytes(value, "value")
        with self._slot() as slot:
            self._commit("queue_push", [key], slot, self._attempts(), [], [Op.put(item, v)], [])

    def queue_pop(self, key: KeyLike, block: bool = True) -> bytes:
        """Remove and return the oldest value of the queue ``key``.

        When the queue is empty: wait up to ``timeout`` for a push (``block``), else
        raise ``torch.distributed.QueueEmptyError``, as ``TCPStore`` does.
        """
        queue = self._queue(key)
        seconds = _seconds(self._timeout)
        deadline = time.monotonic() + seconds
        with self._slot() as slot:
            attempts = self._attempts()
            while True:
                resp = self._retry(
                    "queue_pop",
                    [key],
                    lambda: self._client.range(
                        queue, prefix=True, limit=1, sort_order="ASCEND", sort_target="CREATE"
                    ),
                )
                if resp.kvs:
                    head = resp.kvs[0]
                    guard = Compare.mod_revision(head.key, "==", head.mod_revision)
                    done = self._commit(
                        "queue_pop", [key], slot, attempts, [guard], [Op.delete(head.key)], []
                    )
                    if isinstance(done, bytes):
                        return head.value
                    continue  # another consumer took it: the next one
                if not block:
                    raise EtcdStoreQueueEmptyError(f"queue {_show(key)!r} is empty")
                if not self._wait_push(queue, resp.revision, deadline):
                    raise EtcdStoreTimeoutError(
                        f"wait timeout after {round(seconds * 1000)}ms, keys: {_show(key)} "
                        f"(EtcdStore queue, prefix {self._prefix!r})"
                    )

    def queue_len(self, key: KeyLike) -> int:
        """How many values the queue ``key`` holds."""
        queue = self._queue(key)
        resp = self._retry(
            "queue_len", [key], lambda: self._client.range(queue, prefix=True, count_only=True)
        )
        return resp.count

    def has_extended_api(self) -> bool:
        """``append``, ``multi_get`` and ``multi_set`` are implemented (torch asks)."""
        return True

    def clone(self) -> EtcdStore:
        """A store on the same etcd and prefix, with its own client (closed with it).

        torch's ``shrink_group`` and the C++ side clone a group's store to use it
        from another thread; the clone shares no connection with this store.

        The clone stays alive until its :meth:`close`: C++ code holding only the C++
        half of a Python store (``PrefixStore.clone()``, ``_test_python_store``) would
        otherwise see the Python half garbage-collected under it, and its next call fail
        with "Not implemented" (torch's trampoline does not keep the Python object alive).
        """
        clone = EtcdStore(
            self._client.copy(),
            self._prefix,
            timeout=self.timeout,
            retry_deadline=self._retry_deadline,
            owns_client=True,
        )
        with _CLONES_LOCK:
            _CLONES.add(clone)
        return clone

    # The names torch's C++ trampoline (PythonStore in torch/csrc/distributed/c10d/init.cpp)
    # looks up when C++ code, e.g. PrefixStore or ProcessGroupGloo, calls these methods.

    def getNumKeys(self) -> int:
        """``num_keys``, under the name C++ callers use."""
        return self.num_keys()

    def deleteKey(self, key: KeyLike) -> bool:
        """``delete_key``, under the name C++ callers use."""
        return self.delete_key(key)

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Delete this store's operation markers; close the client when the store owns it.

        Idempotent. The store must not be used afterwards.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            wrote = self._slot_count > 0
        with _CLONES_LOCK:
            _CLONES.discard(self)
        if wrote:
            try:
                self._client.delete(self._markers, prefix=True)
            except EtcdClientError as exc:
                log.debug("EtcdStore.close: could not delete the operation markers: %s", exc)
        if self._owns_client:
            self._client.close()

    def __repr__(self) -> str:
        return f"EtcdStore(prefix={self._prefix!r}, endpoints={self._client.endpoints})"

    # -- internals -------------------------------------------------------------

    @property
    def _timeout(self) -> timedelta:
        return self.timeout

    def _key(self, key: KeyLike) -> bytes:
        raw = _to_bytes(key, "key")
        if raw.startswith(_RESERVED):
            raise ValueError(
                f"EtcdStore: key {key!r} starts with {_RESERVED!r}, reserved for the store's "
                "operation markers and queues; use another key"
            )
        return self._prefix + raw

    def _queue(self, key: KeyLike) -> bytes:
        return self._prefix + QUEUE_DIR + _to_bytes(key, "key") + b"/"

    def _wait_push(self, queue: bytes, revision: int, deadline: float) -> bool:
        """Whether a value is pushed to ``queue`` after ``revision`` before ``deadline``."""
        try:
            with self._client.watch(queue, prefix=True, start_revision=revision + 1) as watch:
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    event = watch.next_event(timeout=remaining)
                    if event is not None and event.type == "PUT":
                        return True
                    if event is None and watch.cancelled:
                        raise EtcdWatchError(f"the watch on {queue!r} ended", key=queue)
        except EtcdCompactedError:
            return True  # read the queue again
        except EtcdClientError as exc:
            raise self._connection_error("queue_pop", [queue], exc) from exc

    @contextmanager
    def _slot(self) -> Iterator[_Slot]:
        """A marker slot for one write operation (only one thread uses a slot at a time)."""
        with self._lock:
            if self._free_slots:
                slot = self._free_slots.pop()
            else:
                slot = _Slot(self._markers + str(self._slot_count).encode())
                self._slot_count += 1
        try:
            yield slot
        finally:
            with self._lock:
                self._free_slots.append(slot)

    def _attempts(self) -> _Attempts:
        """The marker values of a new write operation's attempts."""
        return _Attempts(next(self._op_seq))

    def _commit(
        self,
        op: str,
        keys: Sequence[KeyLike],
        slot: _Slot,
        attempts: _Attempts,
        compare: Sequence[Compare],
        success: Sequence[AnyOp],
        failure: Sequence[AnyOp],
    ) -> bytes | TxnResponse:
        """Apply one more attempt of a write operation, exactly once.

        Returns the tag of the attempt that was applied (this one, or an earlier one
        of the same operation whose reply was lost), or the reply whose ``compare``
        failed (``responses[0]`` is the marker, then the ``failure`` reads).

        A reply lost in any way (connection cut, timeout, member gone) is resent
        until ``retry_deadline``: the marker guard lets at most one copy apply, and
        the reply of a copy that lost names the attempt that won.
        """
        tag = attempts.next()
        marker = slot.key
        retry = Retry(deadline=self._retry_deadline, delay=0.02, max_delay=0.5)
        unknown: EtcdClientError | None = None
        while True:
            try:
                resp = self._client.txn(
                    [Compare.mod_revision(marker, "==", slot.revision), *compare],
                    [*success, Op.put(marker, tag)],
                    [Op.get(marker), *failure],
                )
            except (EtcdUnavailableError, EtcdTimeoutError) as exc:
                if isinstance(exc, EtcdOutcomeUnknownError | EtcdTimeoutError):
                    unknown = exc
                log.debug("EtcdStore.%s: no reply from etcd (%s); sending it again", op, exc)
                if not retry.sleep():
                    raise self._connection_error(op, keys, exc, unknown=unknown) from exc
                continue
            except EtcdClientError as exc:
                raise self._connection_error(op, keys, exc, unknown=unknown) from exc
            if resp.succeeded:
                slot.revision = resp.revision
                return tag
            found = _first_kv(resp.responses[:1])
            revision = 0 if found is None else found.mod_revision
            if revision == slot.revision:
                return resp  # the marker held: the operation's own compare failed
            slot.revision = revision
            if found is not None and found.value in attempts.tags:
                log.debug("EtcdStore.%s: a write whose reply was lost had been applied", op)
                return found.value
            # A previous operation of this slot, whose outcome was reported unknown,
            # was applied since: try again against the marker's new revision.

    def _retry(self, op: str, keys: Sequence[KeyLike], call: Callable[[], _T]) -> _T:
        """Run the read ``call``, retrying while etcd does not answer; translate errors once.

        Only reads go through here (writes go through :meth:`_commit`): a read may be
        repeated whatever happened to the previous attempt.
        """
        retry = Retry(deadline=self._retry_deadline, delay=0.02, max_delay=0.5)
        while True:
            try:
                return call()
            except (EtcdUnavailableError, EtcdTimeoutError) as exc:
                error: EtcdClientError = exc
            except EtcdClientError as exc:
                raise self._connection_error(op, keys, exc) from exc
            log.debug("EtcdStore.%s: etcd unavailable (%s), retrying", op, error)
            if not retry.sleep():
                raise self._connection_error(op, keys, error) from error

    def _connection_error(
        self,
        op: str,
        keys: Sequence[KeyLike],
        exc: EtcdClientError,
        *,
        unknown: EtcdClientError | None = None,
    ) -> EtcdStoreConnectionError:
        shown = ", ".join(repr(k) for k in list(keys)[:5]) + (", ..." if len(keys) > 5 else "")
        where = (
            f"EtcdStore.{op}({shown}) failed on etcd {self._client.endpoints} "
            f"(prefix {self._prefix!r})"
        )
        if unknown is not None:
            return EtcdStoreOutcomeUnknownError(
                f"{where}: its outcome is unknown: etcd may have applied it (once at most) "
                f"before the reply was lost ({unknown}), and gave no answer to the resends "
                f"for {self._retry_deadline:g}s (last: {exc}). Read the key(s) back to see "
                "whether it was applied."
            )
        return EtcdStoreConnectionError(f"{where}: {exc}")

    def _read(
        self, keys: Sequence[bytes], op: str, user_keys: Sequence[KeyLike]
    ) -> tuple[dict[bytes, KeyValue], dict[bytes, int]]:
        """Read ``keys``; the ones found, and the revision each missing one was read at."""
        found: dict[bytes, KeyValue] = {}
        read_rev: dict[bytes, int] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), MAX_TXN_OPS):
            chunk = unique[start : start + MAX_TXN_OPS]
            if len(chunk) == 1:
                single = chunk[0]
                rng: RangeResponse = self._retry(
                    op, user_keys, functools.partial(self._client.range, single)
                )
                revision = rng.revision
                kvs = rng.kvs
            else:
                txn = self._retry(
                    op,
                    user_keys,
                    functools.partial(self._client.txn, [], [Op.get(k) for k in chunk]),
                )
                revision = txn.revision
                kvs = [kv for r in txn.responses if isinstance(r, RangeResponse) for kv in r.kvs]
            for kv in kvs:
                found[kv.key] = kv
            for k in chunk:
                if k not in found:
                    read_rev[k] = revision
        return found, read_rev

    def _wait_values(self, keys: list[KeyLike], timeout: timedelta, op: str) -> list[bytes]:
        """Wait until every key exists (watching, not polling); their values, in order."""
        if not keys:
            return []
        raw = [self._key(k) for k in keys]
        seconds = _seconds(timeout)
        deadline = time.monotonic() + seconds
        values: dict[bytes, bytes] = {}
        while True:
            found, read_rev = self._read(raw, op, keys)
            values.update((k, kv.value) for k, kv in found.items())
            if not read_rev:
                return [values[k] for k in raw]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout_error(seconds, keys, raw, read_rev)
            try:
                if self._watch_missing(read_rev, values, deadline):
                    return [values[k] for k in raw]
                raise self._timeout_error(seconds, keys, raw, read_rev)
            except EtcdCompactedError:
                # The revision we read at was compacted away: read again.
                log.debug("EtcdStore.%s: watch revision compacted, reading again", op)
                continue
            except EtcdClientError as exc:
                raise self._connection_error(op, keys, exc) from exc

    def _watch_missing(
        self, read_rev: dict[bytes, int], values: dict[bytes, bytes], deadline: float
    ) -> bool:
        """Watch the missing keys until all are put (True) or ``deadline`` (False).

        One watch covers the range from the smallest to the largest missing key
        and starts right after the earliest read, so a put between the read and
        the watch is seen; each key only accepts events newer than its own read.
        """
        missing = dict(read_rev)
        low = min(missing)
        high = max(missing) + b"\x00"
        start = min(missing.values()) + 1
        with self._client.watch(low, range_end=high, start_revision=start) as watch:
            while missing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    read_rev.clear()
                    read_rev.update(missing)
                    return False
                event = watch.next_event(timeout=remaining)
                if event is None:
                    if watch.cancelled:  # closed under us (client closed): do not spin
                        raise EtcdWatchError(f"the watch on {low!r} ended", key=low)
                    continue
                key = event.key
                rev = missing.get(key)
                if event.type == "PUT" and rev is not None and event.revision > rev:
                    values[key] = event.value
                    del missing[key]
        return True

    def _update(
        self, k: bytes, key: KeyLike, update: Callable[[bytes | None], bytes], op: str
    ) -> bytes:
        """Compare-and-swap ``k`` from its current value to ``update(current)``, exactly once."""
        deadline = time.monotonic() + max(self._retry_deadline, _seconds(self._timeout))
        current = self._retry(op, [key], lambda: self._client.get(k))
        with self._slot() as slot:
            attempts = self._attempts()
            written: dict[bytes, bytes] = {}
            while True:
                new = update(None if current is None else current.value)
                guard = (
                    Compare.create_revision(k, "==", 0)
                    if current is None
                    else Compare.mod_revision(k, "==", current.mod_revision)
                )
                resp = self._commit(
                    op, [key], slot, attempts, [guard], [Op.put(k, new)], [Op.get(k)]
                )
                written[attempts.tags[-1]] = new
                if isinstance(resp, bytes):
                    # This attempt, or an earlier one whose reply was lost, was applied.
                    return written[resp]
                current = _first_kv(resp.responses[1:])
                if time.monotonic() >= deadline:
                    raise EtcdStoreError(
                        f"EtcdStore.{op} on key {key!r} kept conflicting for "
                        f"{max(self._retry_deadline, _seconds(self._timeout)):.0f}s"
                    )

    def _timeout_error(
        self,
        seconds: float,
        keys: Sequence[KeyLike],
        raw: Sequence[bytes],
        read_rev: dict[bytes, int],
    ) -> EtcdStoreTimeoutError:
        missing = [k for k, r in zip(keys, raw, strict=True) if r in read_rev]
        shown = ", ".join(_show(k) for k in missing[:10]) + (", ..." if len(missing) > 10 else "")
        return EtcdStoreTimeoutError(
            f"wait timeout after {round(seconds * 1000)}ms, keys: {shown} "
            f"(EtcdStore prefix {self._prefix!r} on {', '.join(self._client.endpoints)})"
        )


def _show(key: KeyLike) -> str:
    if isinstance(key, str):
        return key
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return repr(key)


def _first_kv(responses: Iterable[object]) -> KeyValue | None:
    for resp in responses:
        if isinstance(resp, RangeResponse) and resp.kvs:
            return resp.kvs[0]
    return None


__all__ = ["MAX_TXN_OPS", "EtcdStore"]
