"""Translate what etcd says (a key's value and revisions) into machine events."""

from __future__ import annotations

from etcd_rendezvous.rendezvous._errors import RendezvousStateError
from etcd_rendezvous.rendezvous._machine import (
    ClosedSeen,
    Event,
    LeaderChanged,
    NodeDeleted,
    NodeEntry,
    NodePut,
    RoundCommitted,
    Snapshot,
    StatusChanged,
)
from etcd_rendezvous.rendezvous._records import (
    ConfigRecord,
    Keys,
    LeaderRecord,
    NodeRecord,
    RoundRecord,
    StatusRecord,
    decode,
    decode_as,
)


def key_event(
    keys: Keys,
    key: str,
    value: bytes | None,
    *,
    create_revision: int = 0,
    mod_revision: int = 0,
) -> Event | None:
    """The event for a PUT (``value`` given) or DELETE (``value`` None) of ``key``.

    Returns None for keys the machine does not care about (e.g. a deleted status).
    Raises :class:`RendezvousStateError` for a value that is not a valid record.
    """
    run_id = keys.run_id
    if key.startswith(keys.nodes):
        node_id = key[len(keys.nodes) :]
        if value is None:
            return NodeDeleted(node_id)
        record = decode_as(NodeRecord, value, key=key, run_id=run_id)
        if record.node_id != node_id:
            raise RendezvousStateError(
                f"invalid rendezvous record at {key!r}: it names node {record.node_id!r}",
                run_id=run_id,
                key=key,
            )
        return NodePut(
            node_id,
            NodeEntry(
                record.seen, create_revision, record.data, left=record.left, probe=record.probe
            ),
        )
    if key == keys.round:
        if value is None:
            return None
        return RoundCommitted(decode_as(RoundRecord, value, key=key, run_id=run_id), mod_revision)
    if key == keys.status:
        if value is None:
            return StatusChanged(None)
        return StatusChanged(decode_as(StatusRecord, value, key=key, run_id=run_id))
    if key == keys.closed:
        if value is None:
            return None
        decode(value, key=key, run_id=run_id)  # validate, whatever it says
        return ClosedSeen()
    if key == keys.config:
        if value is not None:
            decode_as(ConfigRecord, value, key=key, run_id=run_id)  # validate
        return None  # checked once, when a node starts (engine.py)
    if key == keys.leader:
        if value is None:
            return LeaderChanged(None)
        leader = decode_as(LeaderRecord, value, key=key, run_id=run_id)
        return LeaderChanged(leader.node_id, leader.probe)
    raise RendezvousStateError(
        f"unexpected key {key!r} under the rendezvous prefix {keys.root!r}",
        run_id=run_id,
        key=key,
    )


def snapshot(
    keys: Keys,
    revision: int,
    kvs: list[tuple[str, bytes, int, int]],
    *,
    with_nodes: bool,
) -> Snapshot:
    """A :class:`Snapshot` from ``(key, value, create_revision, mod_revision)`` tuples."""
    round_: RoundRecord | None = None
    round_revision = 0
    status: StatusRecord | None = None
    closed = False
    leader: str | None = None
    leader_probe = ""
    nodes: dict[str, NodeEntry] | None = {} if with_nodes else None
    for key, value, create_revision, mod_revision in kvs:
        event = key_event(
            keys, key, value, create_revision=create_revision, mod_revision=mod_revision
        )
        if isinstance(event, NodePut):
            if nodes is not None:
                nodes[event.node_id] = event.entry
        elif isinstance(event, RoundCommitted):
            round_, round_revision = event.record, event.revision
        elif isinstance(event, StatusChanged):
            status = event.record
        elif isinstance(event, ClosedSeen):
            closed = True
        elif isinstance(event, LeaderChanged):
            leader, leader_probe = event.holder, event.probe
    return Snapshot(
        revision=revision,
        round=round_,
        round_revision=round_revision,
        status=status,
        closed=closed,
        leader=leader,
        nodes=nodes,
        leader_probe=leader_probe,
    )
