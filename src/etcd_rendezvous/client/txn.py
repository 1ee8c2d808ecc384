"""Building blocks of a transaction: :class:`Compare` and :class:`Op`.

They are plain data holding the keys as the caller sees them; the client adds
its namespace when it sends them::

    client.txn(
        [Compare.version("lock", "==", 0)],
        success=[Op.put("lock", b"me", lease=lease.id)],
        failure=[Op.get("lock")],
    )
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

CompareOp: TypeAlias = Literal["==", "!=", "<", ">"]
CompareTarget: TypeAlias = Literal["VALUE", "VERSION", "CREATE", "MOD", "LEASE"]
SortOrder: TypeAlias = Literal["NONE", "ASCEND", "DESCEND"]
SortTarget: TypeAlias = Literal["KEY", "VERSION", "CREATE", "MOD", "VALUE"]

_RESULTS: dict[str, str] = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}


def to_bytes(data: bytes | str) -> bytes:
    """Keys and values are bytes; ``str`` is encoded as UTF-8."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, bytearray | memoryview):  # type: ignore[unreachable]
        return bytes(data)
    raise TypeError(f"expected bytes or str, got {type(data).__name__}")


def _result(op: str) -> str:
    try:
        return _RESULTS[op]
    except KeyError:
        raise ValueError(
            f"compare operator must be one of {sorted(_RESULTS)}, got {op!r}"
        ) from None


@dataclass(frozen=True, slots=True)
class Compare:
    """One condition of a transaction, built with the class methods.

    ``result`` is etcd's name (``EQUAL``, ``NOT_EQUAL``, ``LESS``, ``GREATER``).
    ``range_end`` (or ``prefix=True`` in the builders) compares every key of a
    range (etcd >= 3.3).
    """

    key: bytes
    target: CompareTarget
    result: str
    operand: bytes | int
    range_end: bytes | None = None
    prefix: bool = False

    @classmethod
    def value(
        cls, key: bytes | str, op: CompareOp, value: bytes | str, *, prefix: bool = False
    ) -> Compare:
        return cls(to_bytes(key), "VALUE", _result(op), to_bytes(value), prefix=prefix)

    @classmethod
    def version(
        cls, key: bytes | str, op: CompareOp, version: int, *, prefix: bool = False
    ) -> Compare:
        return cls(to_bytes(key), "VERSION", _result(op), int(version), prefix=prefix)

    @classmethod
    def create_revision(
        cls, key: bytes | str, op: CompareOp, revision: int, *, prefix: bool = False
    ) -> Compare:
        return cls(to_bytes(key), "CREATE", _result(op), int(revision), prefix=prefix)

    @classmethod
    def mod_revision(
        cls, key: bytes | str, op: CompareOp, revision: int, *, prefix: bool = False
    ) -> Compare:
        return cls(to_bytes(key), "MOD", _result(op), int(revision), prefix=prefix)

    @classmethod
    def lease(
        cls, key: bytes | str, op: CompareOp, lease_id: int, *, prefix: bool = False
    ) -> Compare:
        return cls(to_bytes(key), "LEASE", _result(op), int(lease_id), prefix=prefix)


@dataclass(frozen=True, slots=True)
class RangeOp:
    """A read inside a transaction (see :meth:`Op.get`)."""

    key: bytes
    range_end: bytes | None = None
    prefix: bool = False
    revision: int | None = None
    limit: int = 0
    keys_only: bool = False
    count_only: bool = False
    sort_order: SortOrder | None = None
    sort_target: SortTarget | None = None


@dataclass(frozen=True, slots=True)
class PutOp:
    """A write inside a transaction (see :meth:`Op.put`)."""

    key: bytes
    value: bytes
    lease: int | None = None
    prev_kv: bool = False


@dataclass(frozen=True, slots=True)
class DeleteOp:
    """A delete inside a transaction (see :meth:`Op.delete`)."""

    key: bytes
    range_end: bytes | None = None
    prefix: bool = False
    prev_kv: bool = False


@dataclass(frozen=True, slots=True)
class TxnOp:
    """A nested transaction (see :meth:`Op.txn`)."""

    compare: tuple[Compare, ...]
    success: tuple[AnyOp, ...]
    failure: tuple[AnyOp, ...]


AnyOp: TypeAlias = "RangeOp | PutOp | DeleteOp | TxnOp"


class Op:
    """Factory of transaction operations."""

    __slots__ = ()

    @staticmethod
    def get(
        key: bytes | str,
        range_end: bytes | str | None = None,
        *,
        prefix: bool = False,
        revision: int | None = None,
        limit: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        sort_order: SortOrder | None = None,
        sort_target: SortTarget | None = None,
    ) -> RangeOp:
        return RangeOp(
            to_bytes(key),
            None if range_end is None else to_bytes(range_end),
            prefix,
            revision,
            limit,
            keys_only,
            count_only,
            sort_order,
            sort_target,
        )

    @staticmethod
    def put(
        key: bytes | str, value: bytes | str, *, lease: int | None = None, prev_kv: bool = False
    ) -> PutOp:
        return PutOp(to_bytes(key), to_bytes(value), lease, prev_kv)

    @staticmethod
    def delete(
        key: bytes | str,
        range_end: bytes | str | None = None,
        *,
        prefix: bool = False,
        prev_kv: bool = False,
    ) -> DeleteOp:
        return DeleteOp(
            to_bytes(key), None if range_end is None else to_bytes(range_end), prefix, prev_kv
        )

    @staticmethod
    def txn(
        compare: Sequence[Compare], success: Sequence[AnyOp] = (), failure: Sequence[AnyOp] = ()
    ) -> TxnOp:
        return TxnOp(tuple(compare), tuple(success), tuple(failure))
