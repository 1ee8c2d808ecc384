"""Read-only views of rendezvous runs in etcd (public: what ``etcd-rendezvous rdzv`` uses).

:func:`load_snapshot` reads one run at one revision and classifies it with the engine's
own pure view (:func:`~etcd_rendezvous.rendezvous._machine.derive_view`) and the run's
stored settings (``ctl/config``: min/max nodes, so spares are told from the wait
list). Unlike the engine, which stops at the first invalid record, it is tolerant:
every record that cannot be decoded becomes a :class:`Problem` naming its key, and the
rest of the run is still shown. :func:`list_snapshots` reads every run under a prefix;
:func:`close_run` closes a run without joining it (the only write here).

:class:`EventTranslator` turns the watch events of one run into :class:`RunEvent`
lines (node joined/rejoined/left/lost, round committed with its cause, status, leader,
closed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from etcd_rendezvous.client import Compare, EtcdClient, KeyValue, Op, RangeResponse, WatchEvent
from etcd_rendezvous.errors import EtcdClientError
from etcd_rendezvous.rendezvous._errors import RendezvousError, RendezvousStateError
from etcd_rendezvous.rendezvous._machine import NodeEntry, derive_view
from etcd_rendezvous.rendezvous._records import (
    DEFAULT_KEY_PREFIX,
    ClosedRecord,
    ConfigRecord,
    Keys,
    LeaderRecord,
    NodeRecord,
    Record,
    RoundRecord,
    StatusRecord,
    decode,
    encode,
)

log = logging.getLogger(__name__)

# --- one run, read at one revision -------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """A key under the run that is not a valid rendezvous record."""

    key: str
    message: str


@dataclass(frozen=True)
class NodeInfo:
    """A live node key: what the node asked for, and where it stands.

    ``role`` is ``member`` (taking part in the running round), ``rejoined`` (a
    member of the last round asking for the next one), ``waiting`` (wait list),
    ``spare`` (redundancy list), ``pending`` (waiting for the next round to form) or
    ``leaving`` (leaving cleanly: its key goes with its lease).
    """

    node_id: str
    seen: int
    data: Mapping[str, str]
    lease: int
    create_revision: int
    mod_revision: int
    role: str = "pending"
    rank: int | None = None
    ttl: int | None = None  # seconds left on the node's lease (None: not asked / unknown)
    granted_ttl: int | None = None


@dataclass(frozen=True)
class Snapshot:
    """Everything under ``<key_prefix>/<run_id>/`` at one revision, classified.

    ``config`` holds the run's settings (None for a run started before they were
    stored); ``left`` names the lost members that left cleanly (from the leader's
    status), the rest of ``lost`` had their lease expire.
    """

    run_id: str
    key_prefix: str
    revision: int
    round: RoundRecord | None
    round_revision: int
    status: StatusRecord | None
    leader: str | None
    leader_lease: int
    closed: ClosedRecord | None
    nodes: Mapping[str, NodeInfo]
    lost: tuple[str, ...]
    problems: tuple[Problem, ...] = ()
    num_keys: int = 0
    config: ConfigRecord | None = None

    @property
    def left(self) -> tuple[str, ...]:
        status = self.status
        if status is None or status.round != self.round_number:
            return ()
        return tuple(n for n in self.lost if n in status.left)

    @property
    def round_number(self) -> int:
        return self.round.round if self.round is not None else 0

    @property
    def members(self) -> tuple[str, ...]:
        return self.round.members if self.round is not None else ()

    @property
    def participants(self) -> tuple[str, ...]:
        return tuple(n for n in self.members if self._role(n) == "member")

    def by_role(self, role: str) -> tuple[str, ...]:
        return tuple(n for n, info in self.nodes.items() if info.role == role)

    def _role(self, node_id: str) -> str | None:
        info = self.nodes.get(node_id)
        return info.role if info is not None else None

    @property
    def state(self) -> str:
        """``invalid``, ``closed``, ``running``, ``forming`` (round 1), ``reforming``, ``idle``.

        ``invalid``: a key holds something that is not a valid record; the engine's
        nodes fail on it (RendezvousStateError) until it is deleted.
        """
        if self.problems:
            return "invalid"
        if self.closed is not None:
            return "closed"
        if self.participants:
            return "running"
        if self.nodes:
            return "forming" if self.round is None else "reforming"
        return "idle"

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "key_prefix": self.key_prefix,
            "revision": self.revision,
            "state": self.state,
            "round": self.round_number,
            "committed": None
            if self.round is None
            else {
                "time": self.round.time or None,
                "reason": self.round.reason,
                "causes": list(self.round.causes),
                "completion": self.round.completion,
                "lost": list(self.round.lost),
                "left": list(self.round.left),
                "joined": list(self.round.joined),
                "leader": self.round.leader,
            },
            "config": None
            if self.config is None
            else {
                "min_nodes": self.config.min_nodes,
                "max_nodes": self.config.max_nodes,
                "last_call_timeout": self.config.last_call_timeout,
                "join_timeout": self.config.join_timeout,
                "close_timeout": self.config.close_timeout,
                "lease_ttl": self.config.lease_ttl,
                "fast_quorum": self.config.fast_quorum,
                "by": self.config.by,
            },
            "members": [
                {
                    "rank": rank,
                    "node": node,
                    "state": self._role(node) or "lost",
                    "data": dict(self.round.data.get(node, {})) if self.round else {},
                    "lease_ttl": _ttl_of(self.nodes.get(node)),
                }
                for rank, node in enumerate(self.members)
            ],
            "nodes": [
                {
                    "node": n.node_id,
                    "role": n.role,
                    "rank": n.rank,
                    "seen": n.seen,
                    "data": dict(n.data),
                    "lease": f"{n.lease:x}",
                    "lease_ttl": n.ttl,
                    "lease_granted_ttl": n.granted_ttl,
                }
                for n in self.nodes.values()
            ],
            "waiting": list(self.by_role("waiting")),
            "spares": list(self.by_role("spare")),
            "pending": list(self.by_role("pending")) + list(self.by_role("rejoined")),
            "lost": list(self.lost),
            "left": list(self.left),
            "leader": self.leader,
            "status": None
            if self.status is None
            else {
                "round": self.status.round,
                "participants": self.status.participants,
                "waiting": self.status.waiting,
                "spares": self.status.spares,
                "lost": list(self.status.lost),
                "left": list(self.status.left),
                "leader": self.status.leader,
            },
            "closed": None
            if self.closed is None
            else {"by": self.closed.by, "time": self.closed.time or None},
            "problems": [{"key": p.key, "error": p.message} for p in self.problems],
        }


def _ttl_of(info: NodeInfo | None) -> int | None:
    return info.ttl if info is not None else None


class UnknownRunError(RendezvousError):
    """No key exists under the run's prefix (:func:`load_snapshot` with ``must_exist``)."""


def _text(key: bytes) -> str:
    return key.decode("utf-8", "replace")


def build_snapshot(
    run_id: str,
    key_prefix: str,
    revision: int,
    kvs: Iterable[KeyValue],
    ttls: Mapping[int, tuple[int, int]] | None = None,
) -> Snapshot:
    """Classify the keys of one run (``kvs`` with full keys, no namespace).

    ``ttls`` maps a lease id to ``(ttl, granted_ttl)`` when lease TTLs were read.
    """
    keys = Keys(run_id, key_prefix)
    problems: list[Problem] = []
    round_: RoundRecord | None = None
    round_revision = 0
    status: StatusRecord | None = None
    leader: str | None = None
    leader_lease = 0
    closed: ClosedRecord | None = None
    config: ConfigRecord | None = None
    raw_nodes: dict[str, tuple[NodeRecord, KeyValue]] = {}
    count = 0
    for kv in kvs:
        count += 1
        key = _text(kv.key)
        try:
            record = decode(kv.value, key=key, run_id=run_id)
            if key.startswith(keys.nodes):
                node_id = key[len(keys.nodes) :]
                if not isinstance(record, NodeRecord) or record.node_id != node_id:
                    raise _mismatch(key, run_id, record, f"a node record for {node_id!r}")
                raw_nodes[node_id] = (record, kv)
            elif key == keys.round:
                if not isinstance(record, RoundRecord):
                    raise _mismatch(key, run_id, record, "a round record")
                round_, round_revision = record, kv.mod_revision
            elif key == keys.status:
                if not isinstance(record, StatusRecord):
                    raise _mismatch(key, run_id, record, "a status record")
                status = record
            elif key == keys.leader:
                if not isinstance(record, LeaderRecord):
                    raise _mismatch(key, run_id, record, "a leader record")
                leader, leader_lease = record.node_id, kv.lease
            elif key == keys.closed:
                closed = record if isinstance(record, ClosedRecord) else ClosedRecord(by="?")
            elif key == keys.config:
                if not isinstance(record, ConfigRecord):
                    raise _mismatch(key, run_id, record, "a config record")
                config = record
            else:
                problems.append(Problem(key, "unexpected key under the rendezvous prefix"))
        except RendezvousStateError as exc:
            problems.append(Problem(key, str(exc)))

    entries = {
        node_id: NodeEntry(
            record.seen, kv.create_revision, record.data, left=record.left, probe=record.probe
        )
        for node_id, (record, kv) in raw_nodes.items()
    }
    view = derive_view(round_, entries)
    members = round_.members if round_ is not None else ()
    rank_of = {node: rank for rank, node in enumerate(members)}
    participants = set(view.participants)
    pending_role = _pending_role(view.running, status, view.round, config, len(view.participants))
    nodes: dict[str, NodeInfo] = {}
    ordered = list(view.participants) + list(view.pending)
    leaving = [n for n, (record, _) in raw_nodes.items() if record.left]
    for node_id in ordered + leaving:
        record, kv = raw_nodes[node_id]
        if record.left:
            role = "leaving"
        elif node_id in participants:
            role = "member"
        elif node_id in rank_of:
            role = "rejoined"
        else:
            role = pending_role
        ttl, granted = (ttls or {}).get(kv.lease, (None, None))
        nodes[node_id] = NodeInfo(
            node_id=node_id,
            seen=record.seen,
            data=record.data,
            lease=kv.lease,
            create_revision=kv.create_revision,
            mod_revision=kv.mod_revision,
            role=role,
            rank=rank_of.get(node_id),
            ttl=ttl,
            granted_ttl=granted,
        )
    return Snapshot(
        run_id=run_id,
        key_prefix=key_prefix,
        revision=revision,
        round=round_,
        round_revision=round_revision,
        status=status,
        leader=leader,
        leader_lease=leader_lease,
        closed=closed,
        nodes=nodes,
        lost=view.lost,
        problems=tuple(problems),
        num_keys=count,
        config=config,
    )


def _pending_role(
    running: bool,
    status: StatusRecord | None,
    round_number: int,
    config: ConfigRecord | None,
    participants: int,
) -> str:
    """Wait list or redundancy list? From the stored max_nodes, else the leader's status."""
    if not running:
        return "pending"
    if config is not None:
        return "spare" if participants >= config.max_nodes else "waiting"
    if status is not None and status.round == round_number:
        if status.spares and not status.waiting:
            return "spare"
        return "waiting"
    return "waiting"


def _mismatch(key: str, run_id: str, record: Record, expected: str) -> RendezvousStateError:
    return RendezvousStateError(
        f"invalid rendezvous record at {key!r}: expected {expected}, got a {type(record).__name__}",
        run_id=run_id,
        key=key,
    )


def load_snapshot(
    client: EtcdClient,
    run_id: str,
    *,
    key_prefix: str = DEFAULT_KEY_PREFIX,
    lease_ttls: bool = True,
    must_exist: bool = False,
) -> Snapshot:
    """Read one run at one revision (and, if asked, each node lease's remaining TTL).

    Never raises for invalid records (they are in ``problems``). An unknown run is an
    empty snapshot (``num_keys == 0``, state ``idle``), or :class:`UnknownRunError`
    with ``must_exist``.
    """
    keys = Keys(run_id, key_prefix)
    response = client.range(keys.root, prefix=True)
    if not response.kvs and must_exist:
        raise UnknownRunError(
            f"no rendezvous {run_id!r} under {key_prefix!r}: nothing exists at "
            f"{keys.root!r} (see `etcd-rendezvous rdzv list`, or check --key-prefix)",
            run_id=run_id,
        )
    ttls: dict[int, tuple[int, int]] = {}
    if lease_ttls:
        for lease in sorted({kv.lease for kv in response.kvs if kv.lease}):
            try:
                info = client.lease_time_to_live(lease)
            except EtcdClientError as exc:
                log.debug("lease %x: %s", lease, exc)
                continue
            ttls[lease] = (info.ttl, info.granted_ttl)
    return build_snapshot(run_id, key_prefix, response.revision, response.kvs, ttls)


@dataclass(frozen=True)
class Listing:
    """Every run under a key prefix, plus keys that belong to no run."""

    revision: int
    runs: tuple[Snapshot, ...]
    stray_keys: tuple[str, ...] = ()


def list_snapshots(client: EtcdClient, *, key_prefix: str = DEFAULT_KEY_PREFIX) -> Listing:
    """Every run under ``key_prefix`` (one range read; no lease lookups)."""
    base = key_prefix.rstrip("/") + "/"
    response = client.range(base, prefix=True)
    grouped: dict[str, list[KeyValue]] = {}
    stray: list[str] = []
    for kv in response.kvs:
        rest = _text(kv.key)[len(base) :]
        run_id, sep, _ = rest.partition("/")
        if not sep or not run_id:
            stray.append(_text(kv.key))
            continue
        grouped.setdefault(run_id, []).append(kv)
    runs = tuple(
        build_snapshot(run_id, key_prefix, response.revision, kvs)
        for run_id, kvs in sorted(grouped.items())
    )
    return Listing(response.revision, runs, tuple(stray))


@dataclass(frozen=True)
class Closed:
    """What :func:`close_run` did: ``already`` is True if the run was closed before."""

    by: str
    time: str
    already: bool


def close_run(
    client: EtcdClient,
    run_id: str,
    *,
    key_prefix: str = DEFAULT_KEY_PREFIX,
    by: str = "close_run",
) -> Closed:
    """Close ``run_id`` for everyone without joining it: create ``ctl/closed`` once (a txn,
    exactly as :meth:`Rendezvous.close` does); every node's ``join`` then fails."""
    keys = Keys(run_id, key_prefix)
    now = utc_now().isoformat(timespec="milliseconds")
    response = client.txn(
        [Compare.create_revision(keys.closed, "==", 0)],
        [Op.put(keys.closed, encode(ClosedRecord(by, now)))],
        [Op.get(keys.closed)],
    )
    if response.succeeded:
        return Closed(by, now, already=False)
    got = response.responses[0] if response.responses else None
    if isinstance(got, RangeResponse) and got.kvs:
        try:
            record = decode(got.kvs[0].value, key=keys.closed, run_id=run_id)
        except RendezvousStateError:
            return Closed("?", "", already=True)
        if isinstance(record, ClosedRecord):
            return Closed(record.by, record.time, already=True)
    return Closed("?", "", already=True)


# --- live events -----------------------------------------------------------------------


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class RunEvent:
    """One thing that happened to a run (what ``rdzv watch`` prints)."""

    kind: str  # joined rejoined left lost round status leader closed problem
    message: str
    revision: int
    time: datetime = field(default_factory=utc_now)
    node: str | None = None
    round: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self, run_id: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "time": self.time.isoformat(timespec="milliseconds"),
            "run_id": run_id,
            "event": self.kind,
            "revision": self.revision,
        }
        if self.node is not None:
            body["node"] = self.node
        if self.round is not None:
            body["round"] = self.round
        body.update(self.details)
        body["message"] = self.message
        return body


def _ranks(members: Sequence[str]) -> str:
    return " ".join(f"{rank}={node}" for rank, node in enumerate(members))


class EventTranslator:
    """Turns watch events of one run into :class:`RunEvent` (stateful: it knows the
    last round, each node's ``seen`` and the last status, to tell a join from a
    rejoin, a lost member from a node that left, and a notable status change).
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self.keys = Keys(snapshot.run_id, snapshot.key_prefix)
        self.leaving: set[str] = {n for n, info in snapshot.nodes.items() if info.role == "leaving"}
        self.round = snapshot.round
        self.status = snapshot.status
        self.leader = snapshot.leader
        self.closed = snapshot.closed is not None
        self.seen: dict[str, int] = {n: info.seen for n, info in snapshot.nodes.items()}

    def _participant(self, node_id: str) -> bool:
        return (
            self.round is not None
            and node_id in self.round.members
            and self.seen.get(node_id, self.round.round) < self.round.round
        )

    def translate(self, event: WatchEvent) -> RunEvent | None:
        """The event to report for one watch event (None: nothing worth a line)."""
        key = _text(event.kv.key)
        revision = event.kv.mod_revision
        keys = self.keys
        run_id = keys.run_id
        if event.type == "DELETE":
            return self._deleted(key, revision)
        try:
            record = decode(event.kv.value, key=key, run_id=run_id)
        except RendezvousStateError as exc:
            return RunEvent("problem", str(exc), revision, details={"key": key})
        if key.startswith(keys.nodes) and isinstance(record, NodeRecord):
            node_id = key[len(keys.nodes) :]
            if record.left:
                self.leaving.add(node_id)
                return RunEvent("left", f"node {node_id} leaves", revision, node=node_id)
            self.leaving.discard(node_id)
            previous = self.seen.get(node_id)
            was_participant = self._participant(node_id)
            self.seen[node_id] = record.seen
            details: dict[str, Any] = {"seen": record.seen}
            if record.data:
                details["data"] = dict(record.data)
            data = "".join(f" {k}={v}" for k, v in sorted(record.data.items()))
            if previous is None or event.kv.version == 1:
                what = f"node {node_id} joined (asks for a round after {record.seen}){data}"
                return RunEvent("joined", what, revision, node=node_id, details=details)
            if was_participant or previous != record.seen:
                what = f"node {node_id} rejoined (asks for a round after {record.seen})"
                return RunEvent("rejoined", what, revision, node=node_id, details=details)
            return None
        if key == keys.round and isinstance(record, RoundRecord):
            self.round = record
            size = len(record.members)
            what = (
                f"round {record.round} committed: {size} node{'s' if size != 1 else ''} "
                f"({record.reason or 'no reason given'}); ranks {_ranks(record.members)}"
            )
            return RunEvent(
                "round",
                what,
                revision,
                round=record.round,
                details={
                    "members": list(record.members),
                    "reason": record.reason,
                    "causes": list(record.causes),
                    "completion": record.completion,
                    "leader": record.leader,
                },
            )
        if key == keys.status and isinstance(record, StatusRecord):
            old, self.status = self.status, record
            if old is not None and (old.round, old.lost, old.waiting, old.spares) == (
                record.round,
                record.lost,
                record.waiting,
                record.spares,
            ):
                return None
            if not (record.lost or record.waiting or record.spares):
                return None  # the usual status of a fresh round: nothing to say
            parts = []
            lost = [n for n in record.lost if n not in record.left]
            if lost:
                parts.append(f"lost {', '.join(lost)}")
            if record.left:
                parts.append(f"left {', '.join(record.left)}")
            if record.waiting:
                parts.append(f"{record.waiting} waiting")
            if record.spares:
                parts.append(f"{record.spares} spare{'s' if record.spares != 1 else ''}")
            what = f"round {record.round}: {'; '.join(parts)} (reported by leader {record.leader})"
            return RunEvent(
                "status",
                what,
                revision,
                round=record.round,
                details={
                    "lost": list(record.lost),
                    "left": list(record.left),
                    "waiting": record.waiting,
                    "spares": record.spares,
                    "participants": record.participants,
                    "leader": record.leader,
                },
            )
        if key == keys.config and isinstance(record, ConfigRecord):
            what = (
                f"settings of the run (by {record.by or '?'}): min_nodes {record.min_nodes}, "
                f"max_nodes {record.max_nodes}, last call {record.last_call_timeout:g} s, "
                f"lease TTL {record.lease_ttl} s, fast quorum "
                f"{'on' if record.fast_quorum else 'off'}"
            )
            return RunEvent("config", what, revision, details={"by": record.by})
        if key == keys.leader and isinstance(record, LeaderRecord):
            self.leader = record.node_id
            return RunEvent("leader", f"node {record.node_id} leads", revision, node=record.node_id)
        if key == keys.closed:
            self.closed = True
            by = record.by if isinstance(record, ClosedRecord) else "?"
            return RunEvent("closed", f"rendezvous closed by {by}", revision, details={"by": by})
        return RunEvent(
            "problem",
            f"unexpected record at {key!r}: a {type(record).__name__}",
            revision,
            details={"key": key},
        )

    def _deleted(self, key: str, revision: int) -> RunEvent | None:
        keys = self.keys
        if key.startswith(keys.nodes):
            node_id = key[len(keys.nodes) :]
            was_participant = self._participant(node_id)
            self.seen.pop(node_id, None)
            if node_id in self.leaving:
                self.leaving.discard(node_id)
                return RunEvent("left", f"node {node_id} left", revision, node=node_id)
            if self.closed:
                what = f"node {node_id} left (the rendezvous is closed)"
                return RunEvent("left", what, revision, node=node_id)
            if was_participant and self.round is not None:
                what = (
                    f"node {node_id} lost: a member of round {self.round.round}, its key is "
                    "gone (lease expired or revoked)"
                )
                return RunEvent("lost", what, revision, node=node_id, round=self.round.round)
            return RunEvent("left", f"node {node_id} left", revision, node=node_id)
        if key == keys.leader:
            old, self.leader = self.leader, None
            then = "" if self.closed else "; the next node to act takes over"
            return RunEvent(
                "leader",
                f"leader {old or '?'} gone{then}",
                revision,
                node=None,
                details={"previous": old},
            )
        if key == keys.closed:
            self.closed = False
            return RunEvent("problem", "the closed marker was deleted", revision)
        if key in (keys.round, keys.status, keys.config):
            return RunEvent(
                "problem", f"{key!r} was deleted (by hand?)", revision, details={"key": key}
            )
        return None


__all__ = [
    "Closed",
    "EventTranslator",
    "Listing",
    "NodeInfo",
    "Problem",
    "RunEvent",
    "Snapshot",
    "UnknownRunError",
    "build_snapshot",
    "close_run",
    "list_snapshots",
    "load_snapshot",
]
