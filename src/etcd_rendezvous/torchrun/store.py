"""``EtcdStore``: a ``torch.distributed.Store`` on etcd's v3 API.

Every key of the store lives under one prefix (one per run id when the
rendezvous creates it), stored as-is: keys and values are arbitrary bytes, no
base64, no directory reads. Each operation is one or two etcd requests whatever
the number of keys in the store:

* ``get``/``wait``/``multi_get`` read the keys; for those still missing they
  open one watch starting at the revision of that read + 1 (so nothing written
  in between is missed) and return as soon as the last missing key is put. No
  polling.
* ``add``/``append``/``compare_set`` are compare-and-swap transactions on the
  key's ``mod_revision`` (or ``create_revision == 0`` for a new key): exact
  under contention.
* Timeouts raise :class:`~etcd_rendezvous.torchrun.errors.EtcdStoreTimeoutError`
  (a ``torch.distributed.DistStoreError``, as ``TCPStore`` raises), connection
  failures :class:`~etcd_rendezvous.torchrun.errors.EtcdStoreConnectionError`
  (a ``torch.distributed.DistNetworkError``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from torch._C._distributed_c10d import Store

from etcd_rendezvous.client import Compare, EtcdClient, KeyValue, Op, RangeResponse, Retry
from etcd_rendezvous.errors import (
    EtcdClientError,
    EtcdCompactedError,
    EtcdTimeoutError,
    EtcdUnavailableError,
    EtcdWatchError,
)
from etcd_rendezvous.torchrun.errors import (
    EtcdStoreConnectionError,
    EtcdStoreError,
    EtcdStoreTimeoutError,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: etcd's default ``--max-txn-ops``: reads/writes of many keys are chunked by it.
MAX_TXN_OPS = 128

#: How long an operation keeps retrying when no etcd member answers (a leader
#: election, a member being replaced) before raising a connection error.
DEFAULT_RETRY_DEADLINE = 15.0

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
        # Writing the same value twice is harmless: retry even an unknown outcome.
        self._retry("set", [key], lambda: self._client.put(k, v), safe=True)

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
        while True:
            resp = self._retry(
                "compare_set",
                [key],
                lambda: self._client.txn(
                    [Compare.value(k, "==", expected)], [Op.put(k, desired)], [Op.get(k)]
                ),
            )
            if resp.succeeded:
                return desired
            current = _first_kv(resp.responses)
            if current is not None:
                return current.value
            if expected:
                return expected
            # Missing key and empty expected value: create it, unless someone just did.
            resp = self._retry(
                "compare_set",
                [key],
                lambda: self._client.txn(
                    [Compare.create_revision(k, "==", 0)], [Op.put(k, desired)], [Op.get(k)]
                ),
            )
            if resp.succeeded:
                return desired
            current = _first_kv(resp.responses)
            if current is not None and current.value != expected:
                return current.value
            if time.monotonic() >= deadline:
                raise EtcdStoreError(f"EtcdStore.compare_set on key {key!r} kept conflicting")

    def delete_key(self, key: KeyLike) -> bool:
        """Delete ``key``; whether it existed."""
        k = self._key(key)
        resp = self._retry("delete_key", [key], lambda: self._client.delete(k))
        return resp.deleted > 0

    def num_keys(self) -> int:
        """The number of keys in this store (this prefix only)."""
        resp = self._retry(
            "num_keys",
            [],
            lambda: self._client.range(self._prefix, prefix=True, count_only=True),
            safe=True,
        )
        return resp.count

    def multi_set(self, keys: Sequence[KeyLike], values: Sequence[ValueLike]) -> None:
        """Set every ``keys[i]`` to ``values[i]`` (atomically per chunk of 128 keys)."""
        if len(keys) != len(values):
            raise ValueError(f"EtcdStore.multi_set: {len(keys)} keys but {len(values)} values")
        ops = [
            Op.put(self._key(k), _to_bytes(v, "value")) for k, v in zip(keys, values, strict=True)
        ]
        for start in range(0, len(ops), MAX_TXN_OPS):
            chunk = ops[start : start + MAX_TXN_OPS]
            self._retry(
                "multi_set", list(keys), functools.partial(self._client.txn, [], chunk), safe=True
            )

    def list_keys(self) -> list[str]:
        """Every key of this store (as ``str``; undecodable bytes escaped)."""
        resp = self._retry(
            "list_keys",
            [],
            lambda: self._client.range(self._prefix, prefix=True, keys_only=True),
            safe=True,
        )
        n = len(self._prefix)
        return [kv.key[n:].decode("utf-8", "surrogateescape") for kv in resp.kvs]

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Close the client when the store owns it; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._owns_client:
            self._client.close()

    def __repr__(self) -> str:
        return f"EtcdStore(prefix={self._prefix!r}, endpoints={self._client.endpoints})"

    # -- internals -------------------------------------------------------------

    @property
    def _timeout(self) -> timedelta:
        return self.timeout

    def _key(self, key: KeyLike) -> bytes:
        return self._prefix + _to_bytes(key, "key")

    def _retry(
        self,
        op: str,
        keys: Sequence[KeyLike],
        call: Callable[[], _T],
        *,
        safe: bool = False,
    ) -> _T:
        """Run ``call``, retrying while etcd is unavailable; translate errors once.

        ``EtcdUnavailableError`` (nothing was applied) is retried until
        ``retry_deadline``; so is ``EtcdTimeoutError`` when ``safe`` (a read, or a
        write that may be repeated). Any other write with an unknown outcome is
        not repeated: it raises.
        """
        retry = Retry(deadline=self._retry_deadline, delay=0.02, max_delay=0.5)
        while True:
            try:
                return call()
            except EtcdUnavailableError as exc:
                error: EtcdClientError = exc
            except EtcdTimeoutError as exc:
                if not safe:
                    raise self._connection_error(op, keys, exc) from exc
                error = exc
            except EtcdClientError as exc:
                raise self._connection_error(op, keys, exc) from exc
            log.debug("EtcdStore.%s: etcd unavailable (%s), retrying", op, error)
            if not retry.sleep():
                raise self._connection_error(op, keys, error) from error

    def _connection_error(
        self, op: str, keys: Sequence[KeyLike], exc: EtcdClientError
    ) -> EtcdStoreConnectionError:
        shown = ", ".join(repr(k) for k in list(keys)[:5]) + (", ..." if len(keys) > 5 else "")
        return EtcdStoreConnectionError(
            f"EtcdStore.{op}({shown}) failed on etcd {self._client.endpoints} "
            f"(prefix {self._prefix!r}): {exc}"
        )

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
                    op, user_keys, functools.partial(self._client.range, single), safe=True
                )
                revision = rng.revision
                kvs = rng.kvs
            else:
                txn = self._retry(
                    op,
                    user_keys,
                    functools.partial(self._client.txn, [], [Op.get(k) for k in chunk]),
                    safe=True,
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
        """Compare-and-swap ``k`` from its current value to ``update(current)``."""
        deadline = time.monotonic() + max(self._retry_deadline, _seconds(self._timeout))
        current = self._retry(op, [key], lambda: self._client.get(k), safe=True)
        while True:
            new = update(None if current is None else current.value)
            guard = (
                Compare.create_revision(k, "==", 0)
                if current is None
                else Compare.mod_revision(k, "==", current.mod_revision)
            )
            resp = self._retry(
                op,
                [key],
                functools.partial(self._client.txn, [guard], [Op.put(k, new)], [Op.get(k)]),
            )
            if resp.succeeded:
                return new
            current = _first_kv(resp.responses)
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
