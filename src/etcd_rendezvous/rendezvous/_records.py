"""The rendezvous's records in etcd: key layout and the JSON codec (never pickle).

Every value is one JSON object with ``"format": 1`` and a ``"kind"``; decoding
checks both and every field's type, and raises :class:`RendezvousStateError`
naming the key for anything else (corrupt bytes, foreign JSON, a newer format).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from etcd_rendezvous.rendezvous._errors import RendezvousStateError

FORMAT = 1
"""The format version written in (and required of) every record."""

MAX_RECORD_BYTES = 4 * 1024 * 1024
"""A value larger than this is not a record (etcd refuses requests over 1.5 MiB by default)."""

DEFAULT_KEY_PREFIX = "/etcd-rendezvous/rdzv"

MAX_NESTING = 32
"""A record nests at most this deep; deeper JSON is junk, refused before it is parsed."""

_NODE_ID = re.compile(r"^[A-Za-z0-9._:@+=-]{1,200}$")
_JSON_TOKEN = re.compile(r'[\[\]{}]|"(?:[^"\\]|\\.)*"')


def _nesting(text: str) -> int:
    """How deep the arrays and objects of the JSON ``text`` nest (strings skipped).

    Counted before ``json.loads`` so that junk like ``[[[[...`` is refused without
    parsing: the parser recurses once per level, and near the interpreter's limit a
    garbage collection that runs finalizers fails them with ``RecursionError`` (seen
    on Python 3.10), far from the record that caused it.
    """
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return 0  # cannot nest deeper than it has brackets: the common case, no scan
    depth = deepest = 0
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_NESTING:
                    break
        elif token in "]}":
            depth -= 1
    return deepest


def check_node_id(node_id: str) -> str:
    """Return ``node_id`` if it can be used in a key, else raise ``ValueError``."""
    if not _NODE_ID.match(node_id):
        raise ValueError(
            f"invalid node id {node_id!r}: use 1-200 characters from A-Z a-z 0-9 . _ : @ + = -"
        )
    return node_id


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it can be used in a key, else raise ``ValueError``."""
    if not _NODE_ID.match(run_id):
        raise ValueError(
            f"invalid run id {run_id!r}: use 1-200 characters from A-Z a-z 0-9 . _ : @ + = -"
        )
    return run_id


@dataclass(frozen=True)
class Keys:
    """The keys of one run, all under ``<key_prefix>/<run_id>/``.

    * ``nodes/<node_id>``: one per node, attached to the node's lease.
    * ``ctl/leader``: the node that commits rounds (attached to its lease).
    * ``ctl/round``: the last committed round (written once per round, by a txn).
    * ``ctl/status``: the leader's summary of the current round (waiting, lost...).
    * ``ctl/closed``: present once the rendezvous is closed.
    * ``ctl/config``: the run's settings (min/max nodes, timeouts), written once by
      the first node and checked by every later one.
    """

    run_id: str
    key_prefix: str = DEFAULT_KEY_PREFIX

    @property
    def root(self) -> str:
        return f"{self.key_prefix.rstrip('/')}/{self.run_id}/"

    @property
    def nodes(self) -> str:
        return self.root + "nodes/"

    @property
    def ctl(self) -> str:
        return self.root + "ctl/"

    @property
    def leader(self) -> str:
        return self.ctl + "leader"

    @property
    def round(self) -> str:
        return self.ctl + "round"

    @property
    def status(self) -> str:
        return self.ctl + "status"

    @property
    def closed(self) -> str:
        return self.ctl + "closed"

    @property
    def config(self) -> str:
        return self.ctl + "config"

    def node(self, node_id: str) -> str:
        return self.nodes + node_id


@dataclass(frozen=True)
class NodeRecord:
    """A node's request to take part: ``seen`` is the last round it had seen committed."""

    node_id: str
    seen: int
    data: Mapping[str, str] = field(default_factory=dict)
    left: bool = False  # written just before a clean leave revokes the lease
    probe: str = ""  # token@host:port of the node's process (see _probe.py); "" if none


class Cause:
    """Why a round was formed (``RoundRecord.causes``; several may apply)."""

    FIRST_ROUND = "first_round"
    NODE_LOST = "node_lost"  # a member's lease expired (killed, paused past the TTL)
    NODE_LEFT = "node_left"  # a member left cleanly (leave(): its lease was revoked)
    NODE_JOINED = "node_joined"  # a node that was not a member joined (wait list)
    SPARE_PROMOTED = "spare_promoted"  # a hot spare took a lost member's place
    REJOINED = "rejoined"  # the same members asked for a new round (e.g. a worker restart)


class Completion:
    """What completed a round (``RoundRecord.completion``)."""

    MAX_NODES = "max_nodes"  # max_nodes were pending: at once
    FAST_QUORUM = "fast_quorum"  # every live member of the previous round rejoined
    LAST_CALL = "last_call"  # min_nodes were pending for last_call_timeout


@dataclass(frozen=True)
class RoundRecord:
    """A committed round: ``members`` in rank order (``members[r]`` has rank ``r``).

    ``causes`` (see :class:`Cause`) and ``completion`` (see :class:`Completion`) say
    why the round formed and what completed it; ``lost``/``left``/``joined`` name the
    nodes behind the causes; ``reason`` says it all in words.
    """

    round: int
    members: tuple[str, ...]
    reason: str = ""
    leader: str = ""
    time: str = ""
    data: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    causes: tuple[str, ...] = ()
    completion: str = ""
    lost: tuple[str, ...] = ()
    left: tuple[str, ...] = ()
    joined: tuple[str, ...] = ()


@dataclass(frozen=True)
class StatusRecord:
    """The leader's summary of round ``round`` (what ``num_nodes_waiting`` reports)."""

    round: int
    participants: int
    waiting: int
    spares: int
    lost: tuple[str, ...] = ()
    leader: str = ""
    left: tuple[str, ...] = ()  # the members of ``lost`` that left cleanly


@dataclass(frozen=True)
class ConfigRecord:
    """The run's settings, written once (by the first node) at ``ctl/config``."""

    min_nodes: int
    max_nodes: int
    last_call_timeout: float
    join_timeout: float
    close_timeout: float
    lease_ttl: int
    fast_quorum: bool
    by: str = ""
    time: str = ""


@dataclass(frozen=True)
class LeaderRecord:
    node_id: str
    probe: str = ""  # token@host:port of the leader's process (see _probe.py); "" if none


@dataclass(frozen=True)
class ClosedRecord:
    by: str
    time: str = ""


Record = NodeRecord | RoundRecord | StatusRecord | LeaderRecord | ClosedRecord | ConfigRecord


def _dump(kind: str, body: Mapping[str, Any]) -> bytes:
    return json.dumps(
        {"format": FORMAT, "kind": kind, **body}, sort_keys=True, separators=(",", ":")
    ).encode()


def encode(record: Record) -> bytes:
    """The JSON bytes stored for ``record``."""
    if isinstance(record, NodeRecord):
        body: dict[str, Any] = {"node": record.node_id, "seen": record.seen, "data": record.data}
        if record.left:
            body["left"] = True
        if record.probe:
            body["probe"] = record.probe
        return _dump("node", body)
    if isinstance(record, RoundRecord):
        return _dump(
            "round",
            {
                "round": record.round,
                "members": list(record.members),
                "reason": record.reason,
                "leader": record.leader,
                "time": record.time,
                "data": record.data,
                "causes": list(record.causes),
                "completion": record.completion,
                "lost": list(record.lost),
                "left": list(record.left),
                "joined": list(record.joined),
            },
        )
    if isinstance(record, StatusRecord):
        return _dump(
            "status",
            {
                "round": record.round,
                "participants": record.participants,
                "waiting": record.waiting,
                "spares": record.spares,
                "lost": list(record.lost),
                "left": list(record.left),
                "leader": record.leader,
            },
        )
    if isinstance(record, ConfigRecord):
        return _dump(
            "config",
            {
                "min_nodes": record.min_nodes,
                "max_nodes": record.max_nodes,
                "last_call_timeout": record.last_call_timeout,
                "join_timeout": record.join_timeout,
                "close_timeout": record.close_timeout,
                "lease_ttl": record.lease_ttl,
                "fast_quorum": record.fast_quorum,
                "by": record.by,
                "time": record.time,
            },
        )
    if isinstance(record, LeaderRecord):
        leader: dict[str, Any] = {"node": record.node_id}
        if record.probe:
            leader["probe"] = record.probe
        return _dump("leader", leader)
    return _dump("closed", {"by": record.by, "time": record.time})


_MAX_NUMBER = 2**53


def _short(value: Any) -> str:
    """``repr(value)``, cut to 80 characters (junk can be megabytes long)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


class _Fields:
    """Typed access to a decoded JSON object; every failure names the key."""

    def __init__(self, obj: Mapping[str, Any], key: str, run_id: str | None) -> None:
        self.obj = obj
        self.key = key
        self.run_id = run_id

    def error(self, what: str) -> RendezvousStateError:
        return RendezvousStateError(
            f"invalid rendezvous record at {self.key!r}: {what}; the value was not written by "
            f"etcd-rendezvous (format {FORMAT}) -- delete the run's keys or use another run id",
            run_id=self.run_id,
            key=self.key,
        )

    def integer(self, name: str) -> int:
        value = self.obj.get(name)
        if type(value) is not int or value < 0:
            raise self.error(f"field {name!r} must be a non-negative integer, got {_short(value)}")
        return value

    def string(self, name: str, default: str | None = None) -> str:
        value = self.obj.get(name, default)
        if not isinstance(value, str):
            raise self.error(f"field {name!r} must be a string, got {_short(value)}")
        return value

    def node_id(self, value: Any, what: str) -> str:
        if not isinstance(value, str) or not _NODE_ID.match(value):
            raise self.error(f"{what} must be a node id, got {_short(value)}")
        return value

    def number(self, name: str) -> float:
        value = self.obj.get(name)
        number = value if isinstance(value, float) else math.nan
        if type(value) is int and value <= _MAX_NUMBER:
            number = float(value)
        if not math.isfinite(number) or number < 0:
            raise self.error(f"field {name!r} must be a non-negative number, got {_short(value)}")
        return number

    def boolean(self, name: str, default: bool | None = None) -> bool:
        value = self.obj.get(name, default)
        if type(value) is not bool:
            raise self.error(f"field {name!r} must be true or false, got {_short(value)}")
        return value

    def words(self, name: str) -> tuple[str, ...]:
        value = self.obj.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(f"field {name!r} must be a list of strings, got {_short(value)}")
        return tuple(value)

    def str_list(self, name: str) -> tuple[str, ...]:
        value = self.obj.get(name, [])
        if not isinstance(value, list):
            raise self.error(f"field {name!r} must be a list, got {_short(value)}")
        return tuple(self.node_id(item, f"an item of {name!r}") for item in value)

    def str_map(self, value: Any, what: str) -> dict[str, str]:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise self.error(f"{what} must be an object of strings, got {_short(value)}")
        return dict(value)


def decode(value: bytes, *, key: str, run_id: str | None = None) -> Record:
    """Decode and validate the record stored at ``key``; raise RendezvousStateError."""
    fields = _Fields({}, key, run_id)
    if not isinstance(value, bytes | bytearray):
        raise fields.error(f"not bytes but a {type(value).__name__}")
    if len(value) > MAX_RECORD_BYTES:
        raise fields.error(f"{len(value)} bytes long (a record is at most {MAX_RECORD_BYTES})")
    try:
        text = value.decode("utf-8")
        if _nesting(text) > MAX_NESTING:
            raise fields.error(f"nested deeper than {MAX_NESTING} levels: {value[:80]!r}")
        obj = json.loads(text)
    except RendezvousStateError:
        raise
    except (UnicodeDecodeError, ValueError) as exc:
        raise fields.error(f"not JSON ({exc}): {value[:80]!r}") from exc
    except Exception as exc:  # RecursionError (deep nesting), MemoryError, ...: still junk
        raise fields.error(f"not JSON ({type(exc).__name__}: {exc}): {value[:80]!r}") from exc
    if not isinstance(obj, dict):
        raise fields.error(f"not a JSON object: {value[:80]!r}")
    fields.obj = obj
    try:
        return _record(fields, obj)
    except RendezvousStateError:
        raise
    except Exception as exc:  # a validator tripped over junk it did not expect: still junk
        raise fields.error(f"cannot be read ({type(exc).__name__}: {exc})") from exc


def _record(fields: _Fields, obj: dict[str, Any]) -> Record:
    if obj.get("format") != FORMAT:
        raise fields.error(f"format {_short(obj.get('format'))}, expected {FORMAT}")
    kind = obj.get("kind")
    if kind == "node":
        return NodeRecord(
            node_id=fields.node_id(obj.get("node"), "field 'node'"),
            seen=fields.integer("seen"),
            data=fields.str_map(obj.get("data", {}), "field 'data'"),
            left=fields.boolean("left", False),
            probe=fields.string("probe", ""),
        )
    if kind == "round":
        members = fields.str_list("members")
        if len(set(members)) != len(members):
            raise fields.error("field 'members' has duplicates")
        raw_data = obj.get("data", {})
        if not isinstance(raw_data, dict):
            raise fields.error(f"field 'data' must be an object, got {_short(raw_data)}")
        return RoundRecord(
            round=fields.integer("round"),
            members=members,
            reason=fields.string("reason", ""),
            leader=fields.string("leader", ""),
            time=fields.string("time", ""),
            data={
                fields.node_id(k, "a key of 'data'"): fields.str_map(v, f"data of {_short(k)}")
                for k, v in raw_data.items()
            },
            causes=fields.words("causes"),
            completion=fields.string("completion", ""),
            lost=fields.str_list("lost"),
            left=fields.str_list("left"),
            joined=fields.str_list("joined"),
        )
    if kind == "status":
        return StatusRecord(
            round=fields.integer("round"),
            participants=fields.integer("participants"),
            waiting=fields.integer("waiting"),
            spares=fields.integer("spares"),
            lost=fields.str_list("lost"),
            leader=fields.string("leader", ""),
            left=fields.str_list("left"),
        )
    if kind == "config":
        return ConfigRecord(
            min_nodes=fields.integer("min_nodes"),
            max_nodes=fields.integer("max_nodes"),
            last_call_timeout=fields.number("last_call_timeout"),
            join_timeout=fields.number("join_timeout"),
            close_timeout=fields.number("close_timeout"),
            lease_ttl=fields.integer("lease_ttl"),
            fast_quorum=fields.boolean("fast_quorum"),
            by=fields.string("by", ""),
            time=fields.string("time", ""),
        )
    if kind == "leader":
        return LeaderRecord(
            node_id=fields.node_id(obj.get("node"), "field 'node'"),
            probe=fields.string("probe", ""),
        )
    if kind == "closed":
        return ClosedRecord(by=fields.string("by", ""), time=fields.string("time", ""))
    raise fields.error(f"unknown kind {_short(kind)}")


R = TypeVar("R", NodeRecord, RoundRecord, StatusRecord, LeaderRecord, ClosedRecord, ConfigRecord)


def decode_as(cls: type[R], value: bytes, *, key: str, run_id: str | None = None) -> R:
    """Decode the record at ``key`` and check it is a ``cls``."""
    record = decode(value, key=key, run_id=run_id)
    if not isinstance(record, cls):
        raise RendezvousStateError(
            f"invalid rendezvous record at {key!r}: expected a {cls.__name__}, "
            f"got a {type(record).__name__}",
            run_id=run_id,
            key=key,
        )
    return record
