"""Result types returned by :class:`~etcd_rendezvous.client.EtcdClient`.

All are immutable; keys and values are ``bytes`` with the client's namespace
already stripped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeAlias


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as etcd stores it (``mvccpb.KeyValue``)."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class RangeResponse:
    """The keys a range found.

    ``count`` is the number of keys in the range (even with ``limit`` or
    ``count_only``), ``more`` tells whether ``limit`` cut the result short.
    """

    kvs: list[KeyValue]
    count: int
    more: bool
    revision: int


@dataclass(frozen=True, slots=True)
class PutResponse:
    """The revision a put created and, if asked for, the previous key."""

    revision: int
    prev_kv: KeyValue | None = None


@dataclass(frozen=True, slots=True)
class DeleteResponse:
    """How many keys a delete removed and, if asked for, what they were."""

    deleted: int
    prev_kvs: list[KeyValue]
    revision: int


@dataclass(frozen=True, slots=True)
class TxnResponse:
    """Whether the compares held, and one response per executed operation."""

    succeeded: bool
    responses: list[OpResponse]
    revision: int


OpResponse: TypeAlias = "RangeResponse | PutResponse | DeleteResponse | TxnResponse"


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """A granted lease: its id and the TTL etcd chose (seconds)."""

    id: int
    ttl: int


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A lease's remaining ``ttl`` (-1 when it no longer exists) and its keys."""

    id: int
    ttl: int
    granted_ttl: int
    keys: list[bytes] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Status:
    """One member's status (``/v3/maintenance/status``)."""

    endpoint: str
    version: str
    db_size: int
    leader: int
    member_id: int
    raft_term: int
    raft_index: int


@dataclass(frozen=True, slots=True)
class Member:
    """One cluster member (``/v3/cluster/member/list``)."""

    id: int
    name: str
    peer_urls: list[str]
    client_urls: list[str]
    is_learner: bool = False

    @property
    def started(self) -> bool:
        """Whether the member has started (one added but not started yet has no name)."""
        return bool(self.name)


def serving_urls(members: Iterable[Member]) -> list[str]:
    """The client URLs requests can go to: those of the started voting members
    (learners serve no requests, unstarted members none yet)."""
    return [u for m in members if m.started and not m.is_learner for u in m.client_urls]


EventType: TypeAlias = Literal["PUT", "DELETE"]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change seen by a watch.

    For a ``DELETE`` event, ``kv`` carries the key and the deletion's
    ``mod_revision`` only; ``prev_kv`` is set when the watch asked for it.
    """

    type: EventType
    kv: KeyValue
    prev_kv: KeyValue | None = None

    @property
    def key(self) -> bytes:
        return self.kv.key

    @property
    def value(self) -> bytes:
        return self.kv.value

    @property
    def revision(self) -> int:
        return self.kv.mod_revision
