"""The rendezvous as a pure state machine: ``step(state, event, now) -> (state, actions)``.

Design
======

Keys (under ``<key_prefix>/<run_id>/``; values are JSON with ``"format": 1``, see
``_records.py``):

``nodes/<node_id>``  one per node, attached to the node's lease (keep-alive is the
                     heartbeat; a dead node's key vanishes when its lease expires).
                     ``{"seen": R, "data": {...}}``: "I want a round after R", R being
                     the last round the node saw committed. Written once per ``join``.
``ctl/leader``       the node that decides and commits rounds; created by a txn
                     (``create_revision == 0``) and attached to a *leader lease* of its
                     own, refreshed only by the leader's decision loop (not by the node's
                     keep-alive): a dead leader, or one whose loop is wedged, loses the key
                     within that TTL and is replaced by whoever wins the next create.
``ctl/round``        the last committed round: ``{"round": R, "members": [...]}`` with
                     ``members[r]`` holding rank ``r``. Written once per round by the
                     leader in a txn guarded on this key's ``mod_revision`` (the previous
                     round's) and on the leader key's lease: exactly one outcome per
                     round, and a deposed leader cannot commit.
``ctl/status``       the leader's summary of the running round (participants, waiting,
                     spares, lost members); what ``num_nodes_waiting()`` reads locally.
``ctl/closed``       present once the rendezvous is closed (created once, by a txn).
``ctl/config``       the run's settings (min/max nodes, timeouts, lease TTL), created
                     once by the first node's txn; a later node with other min/max
                     fails with ``RendezvousConfigError`` (checked by the executor).

Who is where, derived (nobody writes lists): for the last committed round ``R`` with
members ``M``, the *participants* are the members whose key still exists with
``seen < R`` (they have not asked for another round). Every other live node key is
*pending* for round ``R + 1``: rejoining members (``seen == R``), late nodes, spares.
While round ``R`` has participants, pending nodes are the *wait list* if the round has
room (``participants < max_nodes``; ``num_nodes_waiting()`` counts them, telling the
agents to re-rendezvous) or the *redundancy list* (hot spares) when it is full; spares
are exempt from the join timeout, as in torch. A node is never in two lists: its one
key is either a participant's or a pending one.

Rounds: once round ``R`` has no participants left (all rejoined, left or died), round
``R + 1`` forms from the pending nodes. The leader commits it at once when
``max_nodes`` are pending; with ``min_nodes`` pending it waits ``last_call_timeout``
(started when the count reached ``min_nodes``, cleared if it drops below) -- unless
the *fast quorum* applies (``fast_quorum``, on by default; issue 5): round ``R``
existed, every live member of it has rejoined (none is a participant any more), at
least one of them is pending, and every pending non-member was already known when
``R`` stopped running (on the wait list or the redundancy list). Then the membership
is certain and the round commits at once: a lost node costs the lease TTL plus a few
watch round trips, and a hot spare takes a dead member's place in the same step. The
last call remains for the first round and when new nodes arrive while the next round
forms (more may be coming), exactly as torch does. More than ``max_nodes`` pending:
previous members first, then by arrival (key ``create_revision``); the rest stay
pending for the next round (spares).

Causes: each committed round records why it formed (``causes``: first_round,
node_lost, node_left, node_joined, spare_promoted, rejoined) and what completed it
(``completion``: max_nodes, fast_quorum, last_call), with the nodes involved and a
``reason`` in words; see ``_records.Cause``/``Completion``. A clean ``leave()`` first
marks its key ``left`` (one guarded put), then revokes its lease: the leader counts it
as *left*, not *lost*, in ``ctl/status`` (``left``) and in the next round; a leaving
leader publishes that status itself, and later leaders carry ``left`` over from it.

Ranks are dense ``0..N-1`` and deterministic for a membership: members of the previous
round keep their rank when it is below ``N``; the holes go to the other staying
members (by old rank), then to new nodes sorted by node id (the first round is just
the node ids sorted).

Liveness and restarts: a node's lease expiring (SIGKILL, pause beyond the TTL)
deletes its key; the leader sees the watch event and publishes the member as lost in
``ctl/status``, which every node watches: that is the membership-change notification.
Probes (issue 5, ``_probe.py``) catch a dead process before its lease does: node and
leader keys carry ``probe`` (where the node's process answers), and once a member of
round ``R`` has rejoined, the leader probes the members still in ``R``
(``ProbeNodes``, row ``probe-stragglers``) and a rejoining member probes the leader
(``probe-leader``), once per round each; the executor revokes the lease of a process
found gone, which deletes its keys as an expiry would.
A ``leave()`` marks the key, then revokes the lease (same effect, at once). A
node that restarts under a new id is a new node (like torch: the old one simply
expires); restarted under the same ``node_id``, the engine revokes the stale lease
still holding its key (so the old incarnation, and its leadership, vanish at once)
and joins as a pending node.
A join that times out deletes its key only while ``ctl/round`` is still the round it
knew (``DeleteNode.if_round_revision``): if a round including it was committed
meanwhile, the node takes that round (row ``round-after-timeout``), as torch's join
finishes when its synced state shows the round complete, even past the deadline.
``close()`` creates ``ctl/closed``; every node sees it: joiners fail with
``RendezvousClosedError`` (``RendezvousGracefulExitError`` for spares).

Executor (``engine.py`` public API, ``_executor.py`` actions, ``_leader.py`` decision
loop, ``_hub.py`` shared reader): the nodes of one run on one client share one ``ctl/``
watch, one keep-alive thread and a bounded number of concurrent requests; the leader
alone watches the whole prefix, from its own decision loop, and feeds each watch read
to :meth:`Machine.step_batch` (one evaluation per batch). Transient etcd errors are
retried (``Retry``, cut short by a waiting join's deadline); only a retry that gives up
reaches the callers.

Outcomes: the machine decides, the executor carries out and reports. An action whose
result matters comes back as an event: ``PutNodeFailed`` (the join fails at once, and a
put whose reply was lost is undone by a guarded delete), ``NodeKeyDeleted`` /
``DeleteRefused`` / ``DeleteFailed`` (a timed-out join fails only once its guarded
deletion is done; refused because a round with us was committed, it takes that round),
``CommitLost`` (the leader reads again), ``LeaderKeyStale`` (a full read found our node
id leading under a lease not ours: a previous incarnation; row ``leader-stale`` revokes
it and reads ``ctl/`` again), ``LeaderLeaseLost`` (a refresh found the leader lease
expired: row ``leader-lease-lost`` drops the leadership, and everyone, us included, sees
the leader key vanish).

Costs: each node writes O(1) keys per round (its node key, perhaps one leader-create
txn); nobody rewrites anyone else's state. Only the leader watches ``nodes/``
(O(N) events per round); everyone else watches ``ctl/`` (O(1) events per round), so
fan-out stays O(N) for the cluster. Waits are watches; timers (join timeout, last
call, status debounce) are deadlines returned by :func:`next_deadline`.

This module does no I/O and reads no clock: ``now`` (monotonic seconds) comes with
every event. Transitions are the rows of :data:`TRANSITIONS`; the executor in
``_executor.py`` performs the returned actions and feeds back what etcd said.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from etcd_rendezvous.rendezvous._records import (
    Cause,
    Completion,
    NodeRecord,
    RoundRecord,
    StatusRecord,
)

# --- configuration, knowledge, results ---------------------------------------------


@dataclass(frozen=True)
class Config:
    """What one node knows of the rendezvous's settings."""

    node_id: str
    min_nodes: int
    max_nodes: int
    last_call_timeout: float = 30.0
    fast_quorum: bool = True
    status_interval: float = 0.05
    probe: str = ""  # where this node's process answers liveness probes ("": none)

    def __post_init__(self) -> None:
        if self.min_nodes < 1 or self.max_nodes < self.min_nodes:
            raise ValueError(
                f"need 1 <= min_nodes <= max_nodes, got min_nodes={self.min_nodes} "
                f"max_nodes={self.max_nodes}"
            )
        if self.last_call_timeout < 0 or self.status_interval < 0:
            raise ValueError("timeouts must not be negative")


@dataclass(frozen=True)
class NodeEntry:
    """A live node key as the leader sees it (``order`` is its create_revision)."""

    seen: int
    order: int
    data: Mapping[str, str] = field(default_factory=dict)
    left: bool = False  # the node is leaving cleanly (its key goes with the revoke)
    probe: str = ""  # where its process answers liveness probes (see _probe.py)


@dataclass(frozen=True)
class Assignment:
    """This node's place in a committed round."""

    round: int
    rank: int
    world_size: int
    members: tuple[str, ...]
    data: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    causes: tuple[str, ...] = ()  # why the round formed (see _records.Cause)
    reason: str = ""  # the round's causes and completion, in words


class ChangeKind(enum.Enum):
    ROUND_COMMITTED = "round_committed"
    MEMBERSHIP = "membership"  # lost members or waiting/spare counts changed
    CLOSED = "closed"
    LEASE_LOST = "lease_lost"


@dataclass(frozen=True)
class Change:
    """A membership change, as told to listeners."""

    kind: ChangeKind
    round: int
    lost: tuple[str, ...] = ()
    waiting: int = 0
    spares: int = 0
    left: tuple[str, ...] = ()  # the members of ``lost`` that left cleanly
    causes: tuple[str, ...] = ()  # ROUND_COMMITTED: why the round formed
    reason: str = ""  # ROUND_COMMITTED: the round's causes and completion, in words


class Phase(enum.Enum):
    IDLE = "idle"  # no join in progress and no assignment
    JOINING = "joining"  # our key asks for a round; waiting for one that includes us
    MEMBER = "member"  # we hold an assignment for a committed round
    CLOSED = "closed"  # the rendezvous is closed (terminal)
    LEFT = "left"  # we left (terminal)


class Scope(enum.Enum):
    CONTROL = "control"  # watch ctl/ only
    ALL = "all"  # watch the whole run prefix (the leader)


class Failure(enum.Enum):
    TIMEOUT = "timeout"
    CLOSED = "closed"
    GRACEFUL_EXIT = "graceful_exit"
    LEFT = "left"
    LEASE_LOST = "lease_lost"
    ETCD = "etcd"  # etcd refused or did not answer a write the join needs


# --- events ------------------------------------------------------------------------


@dataclass(frozen=True)
class Join:
    """Join the next round by ``deadline``; ``timeout`` renews it when a spare is promoted."""

    deadline: float
    data: Mapping[str, str] = field(default_factory=dict)
    timeout: float = math.inf


@dataclass(frozen=True)
class Leave:
    pass


@dataclass(frozen=True)
class Close:
    pass


@dataclass(frozen=True)
class LeaseLost:
    pass


@dataclass(frozen=True)
class Tick:
    pass


@dataclass(frozen=True)
class Snapshot:
    """Everything read at one revision; ``nodes`` is None for a ctl/-only read."""

    revision: int
    round: RoundRecord | None
    round_revision: int
    status: StatusRecord | None
    closed: bool
    leader: str | None
    nodes: Mapping[str, NodeEntry] | None
    leader_probe: str = ""


@dataclass(frozen=True)
class NodePut:
    node_id: str
    entry: NodeEntry


@dataclass(frozen=True)
class NodeDeleted:
    node_id: str


@dataclass(frozen=True)
class RoundCommitted:
    record: RoundRecord
    revision: int


@dataclass(frozen=True)
class StatusChanged:
    record: StatusRecord | None


@dataclass(frozen=True)
class ClosedSeen:
    pass


@dataclass(frozen=True)
class LeaderChanged:
    holder: str | None
    probe: str = ""  # where the holder's process answers liveness probes


@dataclass(frozen=True)
class Evaluate:
    """Internal: re-evaluate the leader's duties after every other event."""


# outcomes: what the executor reports back after performing an action


@dataclass(frozen=True)
class PutNodeFailed:
    """``PutNode`` failed: etcd refused it, or no reply came (``maybe_applied``)."""

    reason: str
    maybe_applied: bool = False


@dataclass(frozen=True)
class NodeKeyHeld:
    """``PutNode`` found our node id's key under another ``lease``: a previous incarnation
    of this node (restarted under the same id) still holds it."""

    lease: int


@dataclass(frozen=True)
class NodeKeyDeleted:
    """``DeleteNode`` done: our key is gone (or was not there)."""


@dataclass(frozen=True)
class DeleteRefused:
    """``DeleteNode`` found a newer round with us in it: the key stays, we are a member."""

    record: RoundRecord
    revision: int


@dataclass(frozen=True)
class DeleteFailed:
    """``DeleteNode`` failed (etcd unreachable): the key goes with our lease."""

    reason: str


@dataclass(frozen=True)
class CommitLost:
    """``CommitRound``'s txn failed its guard: another round was committed, or our
    leadership (the leader key's lease) is gone."""


@dataclass(frozen=True)
class LeaderKeyStale:
    """A full read (``Resync(ALL)``) found the leader key held in our node id's name under
    another ``lease``: a previous incarnation of this node (restarted under the same id)
    still leads."""

    lease: int


@dataclass(frozen=True)
class LeaderLeaseLost:
    """A refresh of our leader lease found it gone (expired, e.g. after a pause): the
    leader key went with it; we no longer lead."""


Event = (
    Join
    | Leave
    | Close
    | LeaseLost
    | Tick
    | Snapshot
    | NodePut
    | NodeDeleted
    | RoundCommitted
    | StatusChanged
    | ClosedSeen
    | LeaderChanged
    | Evaluate
    | PutNodeFailed
    | NodeKeyHeld
    | NodeKeyDeleted
    | DeleteRefused
    | DeleteFailed
    | CommitLost
    | LeaderKeyStale
    | LeaderLeaseLost
)

# --- actions -----------------------------------------------------------------------


@dataclass(frozen=True)
class PutNode:
    record: NodeRecord


@dataclass(frozen=True)
class DeleteNode:
    """Delete our node key -- if given, only while ``ctl/round``'s mod_revision is still
    ``if_round_revision`` (0: absent): a join that times out as a round including it is
    committed takes that round instead, as torch's join finishes once its state shows the
    round complete."""

    if_round_revision: int | None = None


@dataclass(frozen=True)
class RevokeLease:
    """Revoke the node lease; first put ``farewell`` (our key, marked left) if given."""

    farewell: NodeRecord | None = None


@dataclass(frozen=True)
class RevokeStale:
    """Revoke a previous incarnation's ``lease``: its keys vanish now, not at expiry."""

    lease: int


@dataclass(frozen=True)
class AcquireLeadership:
    pass


@dataclass(frozen=True)
class Resync:
    scope: Scope


@dataclass(frozen=True)
class CommitRound:
    """Create/replace ``ctl/round`` iff its mod_revision is ``prev_revision`` (0: absent)."""

    record: RoundRecord
    prev_revision: int


@dataclass(frozen=True)
class PublishStatus:
    record: StatusRecord


@dataclass(frozen=True)
class PutClosed:
    pass


@dataclass(frozen=True)
class ProbeNodes:
    """Probe the processes of these late members (``(node_id, probe)``); evict the dead."""

    targets: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Deliver:
    assignment: Assignment


@dataclass(frozen=True)
class Fail:
    failure: Failure
    message: str


@dataclass(frozen=True)
class Notify:
    change: Change


Action = (
    PutNode
    | DeleteNode
    | RevokeLease
    | RevokeStale
    | AcquireLeadership
    | Resync
    | CommitRound
    | PublishStatus
    | PutClosed
    | ProbeNodes
    | Deliver
    | Fail
    | Notify
)

# --- state -------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """One node's state: its phase plus what it knows of etcd."""

    phase: Phase = Phase.IDLE
    join_deadline: float | None = None
    join_timeout: float = math.inf
    join_data: Mapping[str, str] = field(default_factory=dict)
    spare: bool = False  # on the redundancy list (exempt from the join timeout)
    assignment: Assignment | None = None
    # knowledge
    round: RoundRecord | None = None
    round_revision: int = 0
    status: StatusRecord | None = None
    closed: bool = False
    leader: str | None = None
    leader_probe: str = ""
    nodes: Mapping[str, NodeEntry] | None = None  # the full view (leader only)
    # leader bookkeeping
    min_reached_at: float | None = None
    committing: int = 0
    published: StatusRecord | None = None
    published_at: float = -math.inf
    departed: frozenset[str] = frozenset()  # nodes seen leaving cleanly (their key marked)
    collect_known: frozenset[str] | None = None  # pending when the last round stopped running
    probed: frozenset[str] = frozenset()  # late members of the last round already probed
    timed_out: bool = False  # our join just timed out (a round may have included us)
    deleting: bool = False  # that join's key deletion is under way: its outcome decides
    stale_revoked: bool = False  # this join revoked a previous incarnation's lease

    @property
    def round_number(self) -> int:
        return self.round.round if self.round is not None else 0


# --- the derived view (pure functions of round + nodes) ----------------------------


@dataclass(frozen=True)
class View:
    """Who is where, derived from the last round and the live node keys."""

    round: int
    participants: tuple[str, ...]  # live members of `round` that have not asked again
    pending: tuple[str, ...]  # every other live node, in selection order
    lost: tuple[str, ...]  # members of `round` whose key is gone

    @property
    def running(self) -> bool:
        return bool(self.participants)

    def waiting(self, cfg: Config) -> int:
        if self.running and len(self.participants) < cfg.max_nodes:
            return len(self.pending)
        return 0

    def spares(self, cfg: Config) -> int:
        if self.running:
            return len(self.pending) if len(self.participants) >= cfg.max_nodes else 0
        return max(0, len(self.pending) - cfg.max_nodes)


def derive_view(round_: RoundRecord | None, nodes: Mapping[str, NodeEntry]) -> View:
    """Classify the live nodes against the last committed round."""
    return _derive_view(round_, nodes)


def _derive_view(round_: RoundRecord | None, nodes: Mapping[str, NodeEntry]) -> View:
    number = round_.round if round_ is not None else 0
    members = round_.members if round_ is not None else ()
    prev_rank = {m: r for r, m in enumerate(members)}
    if any(entry.left for entry in nodes.values()):
        nodes = {n: e for n, e in nodes.items() if not e.left}  # leaving: as good as gone
    participants = tuple(m for m in members if m in nodes and nodes[m].seen < number)
    active = set(participants)

    def order(node_id: str) -> tuple[int, int, str]:
        if node_id in prev_rank:
            return (0, prev_rank[node_id], node_id)
        return (1, nodes[node_id].order, node_id)

    pending = tuple(sorted((n for n in nodes if n not in active), key=order))
    lost = tuple(m for m in members if m not in nodes)
    return View(round=number, participants=participants, pending=pending, lost=lost)


def assign_ranks(previous: tuple[str, ...], chosen: tuple[str, ...]) -> tuple[str, ...]:
    """Rank order for ``chosen``: dense, deterministic, stable for nodes that stay."""
    size = len(chosen)
    prev_rank = {m: r for r, m in enumerate(previous)}
    slots: list[str | None] = [None] * size
    movers: list[str] = []
    for node in sorted((n for n in chosen if n in prev_rank), key=prev_rank.__getitem__):
        if prev_rank[node] < size:
            slots[prev_rank[node]] = node
        else:
            movers.append(node)
    movers.extend(sorted(n for n in chosen if n not in prev_rank))
    fill = iter(movers)
    return tuple(slot if slot is not None else next(fill) for slot in slots)


# --- guards and effects --------------------------------------------------------------

Guard = Callable[[Config, State, Event, float], bool]
Effect = Callable[[Config, State, Event, float], tuple[State, list[Action]]]


def _always(cfg: Config, state: State, event: Event, now: float) -> bool:
    return True


def _is_leader(cfg: Config, state: State) -> bool:
    return state.leader == cfg.node_id and state.nodes is not None


_last_view: list[tuple[RoundRecord | None, Mapping[str, NodeEntry], View]] = []


def _view(cfg: Config, state: State) -> View | None:
    """The leader's view. O(N log N), and asked for several times per event: the last
    one is kept, keyed on the identity of its inputs (a state's table is never mutated:
    every change makes a new one)."""
    if not _is_leader(cfg, state) or state.nodes is None:
        return None
    cached = _last_view[0] if _last_view else None
    if cached is not None and cached[0] is state.round and cached[1] is state.nodes:
        return cached[2]
    view = derive_view(state.round, state.nodes)
    _last_view[:] = [(state.round, state.nodes, view)]
    return view


def _round_full(cfg: Config, state: State) -> bool:
    """Is the running round at max_nodes (so that pending nodes are hot spares)?"""
    view = _view(cfg, state)
    if view is not None:
        return view.running and len(view.participants) >= cfg.max_nodes
    status = state.status
    return (
        status is not None
        and status.round == state.round_number
        and status.participants >= cfg.max_nodes
    )


def _is_spare(cfg: Config, state: State, event: Event, now: float) -> bool:
    return _round_full(cfg, state)


def _join_expired(cfg: Config, state: State, event: Event, now: float) -> bool:
    return (
        state.join_deadline is not None
        and now >= state.join_deadline
        and not _round_full(cfg, state)
    )


def _in_round(cfg: Config, state: State, event: Event, now: float) -> bool:
    return isinstance(event, RoundCommitted) and cfg.node_id in event.record.members


def _in_round_after_timeout(cfg: Config, state: State, event: Event, now: float) -> bool:
    """Our join timed out, but its key deletion found this round committed with us."""
    return state.timed_out and _in_round(cfg, state, event, now)


def _closed_known(cfg: Config, state: State, event: Event, now: float) -> bool:
    return state.closed


def _holder_none(cfg: Config, state: State, event: Event, now: float) -> bool:
    return isinstance(event, LeaderChanged) and event.holder is None


def _holder_me(cfg: Config, state: State, event: Event, now: float) -> bool:
    return isinstance(event, LeaderChanged) and event.holder == cfg.node_id


def _deposed(cfg: Config, state: State, event: Event, now: float) -> bool:
    return state.nodes is not None  # we held the leader's view, someone else leads now


def _status_notable(cfg: Config, state: State, event: Event, now: float) -> bool:
    if not isinstance(event, StatusChanged) or event.record is None:
        return False
    old, new = state.status, event.record
    return old is None or (old.round, old.lost, old.waiting, old.spares) != (
        new.round,
        new.lost,
        new.waiting,
        new.spares,
    )


def _commit_due(cfg: Config, state: State, event: Event, now: float) -> bool:
    return _completion(cfg, state, now) is not None


def _status_due(cfg: Config, state: State, event: Event, now: float) -> bool:
    status = _leader_status(cfg, state)
    return (
        status is not None
        and status not in (state.status, state.published)
        and now >= state.published_at + cfg.status_interval
    )


def _completion(cfg: Config, state: State, now: float) -> str | None:
    """What completes the next round now (a :class:`Completion`), or None: not yet."""
    view = _view(cfg, state)
    if view is None or view.running or state.committing > state.round_number:
        return None
    count = len(view.pending)
    if count >= cfg.max_nodes:
        return Completion.MAX_NODES
    if count < cfg.min_nodes:
        return None
    if _fast_quorum(cfg, state, view):
        return Completion.FAST_QUORUM
    if state.min_reached_at is not None and now >= state.min_reached_at + cfg.last_call_timeout:
        return Completion.LAST_CALL
    return None


def _fast_quorum(cfg: Config, state: State, view: View) -> bool:
    """Is the next round's membership certain, so that no last call is needed?

    Yes when a previous round exists, every live member of it has rejoined (the caller
    checked: no participants), at least one of them is pending, and no other node
    arrived since the round stopped running (nodes that were on the wait list or the
    redundancy list by then are known; one arriving later hints at more to come, so
    the last call applies, as on the first round).
    """
    if not cfg.fast_quorum or state.round is None:
        return False
    members = set(state.round.members)
    if not any(n in members for n in view.pending):
        return False
    known = state.collect_known
    return known is None or all(n in members or n in known for n in view.pending)


def _leader_status(cfg: Config, state: State) -> StatusRecord | None:
    view = _view(cfg, state)
    if view is None:
        return None
    return StatusRecord(
        round=view.round,
        participants=len(view.participants),
        waiting=view.waiting(cfg),
        spares=view.spares(cfg),
        lost=view.lost,
        leader=cfg.node_id,
        left=tuple(n for n in view.lost if n in _departed(state)),
    )


def _departed(state: State) -> frozenset[str]:
    """Nodes known to have left cleanly: seen by this leader, or told by the status of the
    running round (a previous leader saw them, or a leader said so as it left)."""
    status = state.status
    if status is not None and status.left and status.round == state.round_number:
        return state.departed | frozenset(status.left)
    return state.departed


def _nothing(cfg: Config, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    return state, []


def _start_join(cfg: Config, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    if not isinstance(event, Join):
        raise TypeError(event)
    record = NodeRecord(
        node_id=cfg.node_id, seen=state.round_number, data=event.data, probe=cfg.probe
    )
    state = replace(
        state,
        join_deadline=event.deadline,
        join_timeout=event.timeout,
        join_data=event.data,
        assignment=None,
        spare=False,
        timed_out=False,
        deleting=False,
        stale_revoked=False,
    )
    return state, [PutNode(record)]


def _extend_join(cfg: Config, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    if not isinstance(event, Join):
        raise TypeError(event)
    return replace(state, join_deadline=event.deadline, join_timeout=event.timeout), []


def _became_spare(cfg: Config, state: State, event: Event, now: float) -> bool:
    return not state.spare and _round_full(cfg, state)


def _spare_promoted(cfg: Config, state: State, event: Event, now: float) -> bool:
    return state.spare and not _round_full(cfg, state)


def _mark_spare(cfg: Config, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    return replace(state, spare=True), []


def _promote_spare(
    cfg: Config, state: State, event: Event, now: float
) -> tuple[State, list[Action]]:
    """Off the redundancy list: the join timeout starts again (as torch does)."""
    return replace(state, spare=False, join_deadline=now + state.join_timeout), []


def _fail(failure: Failure, message: str) -> Effect:
    def effect(cfg: Config, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
        return replace(state, join_deadline=None), [Fail(failure, message)]

    effect.__name__ = f"fail_{failure.value}"
    return effect


def _without_me(cfg: Config, state: State) -> Mapping[str, NodeEntry] | None:
    """The leader's node table without us: a leader never admits itself after giving up."""
    nodes = state.nodes
    if nodes is not None and cfg.node_id in nodes:
        return {n: e for n, e in nodes.items() if n != cfg.node_id}
    return nodes


def _join_timeout(
    cfg: Config, state: State, event: Event, now: float
) -> tuple[State, list[Action]]:
    """Delete our key while no newer round exists; the deletion's outcome decides (rows
    ``timeout-deleted``, ``timeout-refused``, ``timeout-delete-failed``)."""
    state = replace(
        state, join_deadline=None, nodes=_without_me(cfg, state), timed_out=True, deleting=True
    )
    return state, [DeleteNode(state.round_revision)]


def _deleting(cfg: Config, state: State, event: Event, now: float) -> bool:
    return state.deleting


def _timeout_deleted(
    cfg: Config, state: State, event: Event, now: float
) -> tuple[State, list[Action]]:
    return replace(state, deleting=False), [Fail(Failure.TIMEOUT, "join timed out")]


def _timeout_delete_failed(
    cfg: Config, state: State, event: Event, now: float
) -> tuple[State, list[Action]]:
    if not isinstance(event, DeleteFailed):
        raise TypeError(event)
    message = f"join timed out (its node key could not be deleted: {event.reason})"
    return replace(state, deleting=False), [Fail(Failure.TIMEOUT, message)]


def _refused_with_me(cfg: Config, state: State, event: Event, now: float) -> bool:
    return (
        state.deleting and isinstance(event, DeleteRefused) and cfg.node_id in event.record.members
    )


def _timeout_refused(
    cfg: Config, state: State, event: Event, now: float
) -> tuple[State, list[Action]]:
    """The join timed out as a round with us was committed: take it (as torch does).

    A leader dropped itself from its view when it timed out (it must not admit itself
    meanwhile); its key stays, so that view is wrong now: it reads the truth again
    rather than count itself lost."""
    if not isinstance(event, DeleteRefused):
        raise TypeError(event)
    state = replace(state, deleting=False)
    state, actions = _deliver(cfg, state, RoundCommitted(event.record, event.revision), now)
    if state.nodes is not None:
        state = replace(state, nodes=None)
        actions.append(Resync(Scope.ALL))
    return state, actions


def _put_failed(cfg: Config, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    """Our node key was not written: the join fails now (not at its timeout); a write that
    may have been applied is undone (a guarded delete), so that no round counts us."""
    if not isinstance(event, PutNodeFailed):
        raise TypeError(event)
    actions: list[Action] = [DeleteNode()] if event.maybe_applied else []
    actions.append(Fail(Failure.ETCD, f"could not write its node key: {event.reason}"))
    return replace(state, join_deadline=None, nodes=_without_me(cfg, state)), actions


def _not_stale_revoked(cfg: Config, state: State, event: Event, now: float) -> bool:
    return not state.stale_revoked


def _put_held(cfg: Config, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    """A previous incarnation of this node (restarted under the same id) holds our key:
    revoke its lease, so that it and any leadership it holds vanish now, then put ours."""
    if not isinstance(event, NodeKeyHeld):
        raise TypeError(event)
    record = NodeRecord(
        node_id=cfg.node_id, seen=state.round_number, data=state.join_data, probe=cfg.probe
    )
    return replace(state, stale_revoked=True), [RevokeStale(event.lease), PutNode(record)]


def _put_held_again(
    cfg: Config, state: State, event: Event, now: float
) -> tuple[State, list[Action]]:
    message = (
        "its node id is in use by another process (the key came back under another lease "
        "after the previous one was revoked): give each node its own id"
    )
    return replace(state, join_deadline=None), [Fail(Failure.ETCD, message)]


def _commit_lost(cfg: Config, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    """Our commit lost its guard: read again what is (a newer round, or another leader)."""
    return replace(state, committing=0), [Resync(scope(cfg, state))]


def _leader_stale(
    cfg: Config, state: State, event: Event, now: float
) -> tuple[State, list[Action]]:
    """Our previous incarnation still leads: revoke its lease (the leader key vanishes at
    once), and follow ``ctl/`` again: the vacancy that follows is filled as any other."""
    if not isinstance(event, LeaderKeyStale):
        raise TypeError(event)
    state = replace(state, leader=None, nodes=None, min_reached_at=None, committing=0)
    return state, [RevokeStale(event.lease), Resync(Scope.CONTROL)]


def _leader_lease_lost(
    cfg: Config, state: State, event: Event, now: float
) -> tuple[State, list[Action]]:
    """Our leader lease expired: we no longer lead (the leader key is gone with it, and
    the others see it vanish); drop the leader's view and follow ``ctl/`` again."""
    state = replace(state, leader=None, nodes=None, min_reached_at=None, committing=0)
    return state, [Resync(Scope.CONTROL)]


def _leave(cfg: Config, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    farewell = None
    actions: list[Action] = []
    if state.phase in (Phase.JOINING, Phase.MEMBER):  # we have a key: say we leave
        seen = state.round_number
        farewell = NodeRecord(
            node_id=cfg.node_id, seen=seen, data=state.join_data, left=True, probe=cfg.probe
        )
        if _is_leader(cfg, state) and state.nodes is not None and cfg.node_id in state.nodes:
            # the next leader cannot see our mark (our key goes with us): say it in the status
            gone = replace(
                state,
                nodes={n: e for n, e in state.nodes.items() if n != cfg.node_id},
                departed=state.departed | {cfg.node_id},
            )
            status = _leader_status(cfg, gone)
            if status is not None:
                actions.append(PublishStatus(status))
    actions.append(RevokeLease(farewell))
    if state.phase is Phase.JOINING:
        actions.append(Fail(Failure.LEFT, "the node left the rendezvous while joining"))
    return replace(state, join_deadline=None, nodes=None), actions


def _put_closed(cfg: Config, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    return state, [PutClosed()]


def _lease_lost(cfg: Config, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    actions: list[Action] = []
    if state.phase is Phase.JOINING:
        actions.append(Fail(Failure.LEASE_LOST, "the node's lease expired while joining"))
    actions.append(Notify(Change(ChangeKind.LEASE_LOST, state.round_number)))
    return replace(state, join_deadline=None, assignment=None, nodes=None), actions


def _deliver(cfg: Config, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    if not isinstance(event, RoundCommitted):
        raise TypeError(event)
    record = event.record
    assignment = Assignment(
        round=record.round,
        rank=record.members.index(cfg.node_id),
        world_size=len(record.members),
        members=record.members,
        data=record.data,
        causes=record.causes,
        reason=record.reason,
    )
    change = Change(
        ChangeKind.ROUND_COMMITTED, record.round, causes=record.causes, reason=record.reason
    )
    return replace(state, assignment=assignment, join_deadline=None, timed_out=False), [
        Deliver(assignment),
        Notify(change),
    ]


def _notify_round(
    cfg: Config, state: State, event: Event, now: float
) -> tuple[State, list[Action]]:
    record = state.round
    causes, reason = (record.causes, record.reason) if record is not None else ((), "")
    change = Change(ChangeKind.ROUND_COMMITTED, state.round_number, causes=causes, reason=reason)
    return state, [Notify(change)]


def _closed(failure: Failure | None) -> Effect:
    def effect(cfg: Config, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
        actions: list[Action] = []
        if failure is not None:
            actions.append(Fail(failure, "the rendezvous is closed"))
        actions.append(Notify(Change(ChangeKind.CLOSED, state.round_number)))
        return replace(state, join_deadline=None, nodes=None), actions

    effect.__name__ = f"closed_{failure.value if failure else 'notify'}"
    return effect


def _acquire(cfg: Config, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    return replace(state, nodes=None), [AcquireLeadership()]


def _become_leader(
    cfg: Config, state: State, event: Event, now: float
) -> tuple[State, list[Action]]:
    return replace(state, nodes=None, min_reached_at=None), [Resync(Scope.ALL)]


def _step_down(cfg: Config, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    return replace(state, nodes=None, min_reached_at=None), [Resync(Scope.CONTROL)]


def _notify_status(
    cfg: Config, state: State, event: Event, now: float
) -> tuple[State, list[Action]]:
    status = state.status
    if status is None:  # pragma: no cover - guarded by _status_notable
        return state, []
    change = Change(
        ChangeKind.MEMBERSHIP,
        status.round,
        lost=status.lost,
        waiting=status.waiting,
        spares=status.spares,
        left=status.left,
    )
    return state, [Notify(change)]


def _commit(cfg: Config, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    view = _view(cfg, state)
    completion = _completion(cfg, state, now)
    if view is None or completion is None or state.nodes is None:  # pragma: no cover - guarded
        return state, []
    chosen = view.pending[: cfg.max_nodes]
    previous = state.round.members if state.round is not None else ()
    members = assign_ranks(previous, chosen)
    causes, lost, left, joined = round_causes(cfg, state.round, view.lost, _departed(state), chosen)
    record = RoundRecord(
        round=view.round + 1,
        members=members,
        reason=describe(view.round, causes, completion, lost, left, joined),
        leader=cfg.node_id,
        data={m: state.nodes[m].data for m in members if state.nodes[m].data},
        causes=causes,
        completion=completion,
        lost=lost,
        left=left,
        joined=joined,
    )
    state = replace(state, committing=record.round, min_reached_at=None)
    return state, [CommitRound(record, state.round_revision)]


def round_causes(
    cfg: Config,
    previous: RoundRecord | None,
    gone: Sequence[str],
    departed: frozenset[str],
    chosen: Sequence[str],
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(causes, lost, left, joined) of the round formed from ``chosen`` after ``previous``."""
    if previous is None:
        return (Cause.FIRST_ROUND,), (), (), tuple(sorted(chosen))
    left = tuple(n for n in gone if n in departed)
    lost = tuple(n for n in gone if n not in departed)
    joined = tuple(sorted(n for n in chosen if n not in previous.members))
    causes: list[str] = []
    if lost:
        causes.append(Cause.NODE_LOST)
    if left:
        causes.append(Cause.NODE_LEFT)
    if joined:
        full = len(previous.members) >= cfg.max_nodes
        causes.append(Cause.SPARE_PROMOTED if full and (lost or left) else Cause.NODE_JOINED)
    if not causes:
        causes.append(Cause.REJOINED)
    return tuple(causes), lost, left, joined


_COMPLETIONS = {
    Completion.MAX_NODES: "max_nodes reached",
    Completion.FAST_QUORUM: "fast quorum: every live member of round {round} rejoined",
    Completion.LAST_CALL: "last call ended",
}


def describe(
    round_: int,
    causes: Sequence[str],
    completion: str,
    lost: Sequence[str],
    left: Sequence[str],
    joined: Sequence[str],
) -> str:
    """The ``reason`` of a round in words, e.g. "node n2 lost; fast quorum: ..."."""
    parts: list[str] = []
    for cause in causes:
        if cause == Cause.FIRST_ROUND:
            parts.append("first round")
        elif cause == Cause.NODE_LOST:
            parts.append(f"node{'s' if len(lost) > 1 else ''} {', '.join(lost)} lost")
        elif cause == Cause.NODE_LEFT:
            parts.append(f"node{'s' if len(left) > 1 else ''} {', '.join(left)} left")
        elif cause == Cause.SPARE_PROMOTED:
            parts.append(f"spare {', '.join(joined)} promoted")
        elif cause == Cause.NODE_JOINED:
            parts.append(f"node{'s' if len(joined) > 1 else ''} {', '.join(joined)} joined")
        elif cause == Cause.REJOINED:
            parts.append(f"the members of round {round_} asked for a new round")
    parts.append(_COMPLETIONS.get(completion, completion).format(round=round_))
    return "; ".join(parts)


def _publish(cfg: Config, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    status = _leader_status(cfg, state)
    if status is None:  # pragma: no cover - guarded by _status_due
        return state, []
    return replace(state, published=status, published_at=now), [PublishStatus(status)]


def _track_last_call(
    cfg: Config, state: State, event: Event, now: float
) -> tuple[State, list[Action]]:
    """No duty due: keep the last-call clock (started when min_nodes was reached) and
    the nodes known when the last round stopped running (for the fast quorum)."""
    view = _view(cfg, state)
    if view is None:  # pragma: no cover - guarded by _bookkeeping_due
        return state, []
    enough = not view.running and len(view.pending) >= cfg.min_nodes
    reached = state.min_reached_at
    if enough and reached is None:
        reached = now
    elif not enough:
        reached = None
    known = state.collect_known
    if view.running:
        known = None
    elif known is None:
        known = frozenset(view.pending)
    return replace(state, min_reached_at=reached, collect_known=known), []


def _bookkeeping_due(cfg: Config, state: State, event: Event, now: float) -> bool:
    view = _view(cfg, state)
    if view is None:
        return False
    enough = not view.running and len(view.pending) >= cfg.min_nodes
    reached_ok = (state.min_reached_at is not None) == enough
    known_ok = (state.collect_known is None) == view.running
    return not (reached_ok and known_ok)


def _stragglers(cfg: Config, state: State) -> tuple[tuple[str, str], ...]:
    """Members of the running round still in it while another member has rejoined,
    with a probe address and not probed yet: ``(node_id, probe)`` (leader only)."""
    view = _view(cfg, state)
    if view is None or not view.running or state.round is None or state.nodes is None:
        return ()
    members = state.round.members
    if not any(n in members for n in view.pending):
        return ()  # nobody asked for a new round yet: nothing waits on the late ones
    nodes = state.nodes
    return tuple(
        (n, nodes[n].probe)
        for n in view.participants
        if n != cfg.node_id and nodes[n].probe and n not in state.probed
    )


def _leader_late(cfg: Config, state: State, event: Event, now: float) -> bool:
    """We rejoined (a member of the last round, asking for the next) and another node
    leads: probe it once per round, as the leader probes late members -- a dead leader
    would otherwise hold the round until its leader lease expires."""
    leader = state.leader
    return (
        leader is not None
        and leader != cfg.node_id
        and bool(state.leader_probe)
        and leader not in state.probed
        and state.round is not None
        and cfg.node_id in state.round.members
    )


def _probe_leader(
    cfg: Config, state: State, event: Event, now: float
) -> tuple[State, list[Action]]:
    leader = state.leader or ""
    return replace(state, probed=state.probed | {leader}), [
        ProbeNodes(((leader, state.leader_probe),))
    ]


def _probe_due(cfg: Config, state: State, event: Event, now: float) -> bool:
    return bool(_stragglers(cfg, state))


def _probe(cfg: Config, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
    """Probe the late members once per round: a dead process is evicted (its lease
    revoked) at once instead of a TTL later; a live or paused one is left alone."""
    targets = _stragglers(cfg, state)
    probed = state.probed | {node_id for node_id, _ in targets}
    return replace(state, probed=probed), [ProbeNodes(targets)]


# --- the table ------------------------------------------------------------------------

ANY = frozenset(Phase)
ACTIVE = frozenset({Phase.IDLE, Phase.JOINING, Phase.MEMBER})
DONE = frozenset({Phase.CLOSED, Phase.LEFT})


def _p(*phases: Phase) -> frozenset[Phase]:
    return frozenset(phases)


@dataclass(frozen=True)
class Row:
    """One transition: in ``phases``, on ``event``, if ``guard``: go to ``to``, do ``effect``.

    ``to`` None keeps the phase. Rows are tried in table order; the first match wins.
    """

    name: str
    phases: frozenset[Phase]
    event: type[object]
    guard: Guard
    to: Phase | None
    effect: Effect


IDLE, JOINING, MEMBER, CLOSED, LEFT = (
    Phase.IDLE,
    Phase.JOINING,
    Phase.MEMBER,
    Phase.CLOSED,
    Phase.LEFT,
)

_join_closed = _fail(Failure.CLOSED, "the rendezvous is closed")
_join_left = _fail(Failure.LEFT, "the node left the rendezvous")
_closed_spare = _closed(Failure.GRACEFUL_EXIT)
_closed_joining = _closed(Failure.CLOSED)
_closed_notify = _closed(None)

TRANSITIONS: tuple[Row, ...] = (
    # Row(name, in phases, on event, if guard, then phase (None: stay), effect)
    # the caller's commands
    Row("join-closed", _p(CLOSED), Join, _always, None, _join_closed),
    Row("join-left", _p(LEFT), Join, _always, None, _join_left),
    Row("join-again", _p(JOINING), Join, _always, None, _extend_join),
    Row("join", _p(IDLE, MEMBER), Join, _always, JOINING, _start_join),
    Row("leave-twice", _p(LEFT), Leave, _always, None, _nothing),
    Row("leave", _p(IDLE, JOINING, MEMBER, CLOSED), Leave, _always, LEFT, _leave),
    Row("close-known", ANY, Close, _closed_known, None, _nothing),
    Row("close", ANY, Close, _always, None, _put_closed),
    Row("lease-lost", ACTIVE, LeaseLost, _always, IDLE, _lease_lost),
    Row("lease-lost-done", DONE, LeaseLost, _always, None, _nothing),
    # time
    Row("join-timeout", _p(JOINING), Tick, _join_expired, IDLE, _join_timeout),
    Row("tick", ANY, Tick, _always, None, _nothing),
    # what etcd tells us
    Row("snapshot", ANY, Snapshot, _always, None, _nothing),
    Row("node-put", ANY, NodePut, _always, None, _nothing),
    Row("node-deleted", ANY, NodeDeleted, _always, None, _nothing),
    Row("round-mine", _p(JOINING), RoundCommitted, _in_round, MEMBER, _deliver),
    Row("round-after-timeout", _p(IDLE), RoundCommitted, _in_round_after_timeout, MEMBER, _deliver),
    # what the executor reports of the actions it performed
    Row("put-failed", _p(JOINING), PutNodeFailed, _always, IDLE, _put_failed),
    Row("put-failed-late", ANY, PutNodeFailed, _always, None, _nothing),
    Row("put-held", _p(JOINING), NodeKeyHeld, _not_stale_revoked, None, _put_held),
    Row("put-held-again", _p(JOINING), NodeKeyHeld, _always, IDLE, _put_held_again),
    Row("put-held-late", ANY, NodeKeyHeld, _always, None, _nothing),
    Row("timeout-deleted", _p(IDLE), NodeKeyDeleted, _deleting, None, _timeout_deleted),
    Row("deleted", ANY, NodeKeyDeleted, _always, None, _nothing),
    Row("timeout-refused", _p(IDLE), DeleteRefused, _refused_with_me, MEMBER, _timeout_refused),
    Row("timeout-refused-other", _p(IDLE), DeleteRefused, _deleting, None, _timeout_deleted),
    Row("delete-refused", ANY, DeleteRefused, _always, None, _nothing),
    Row("timeout-delete-failed", _p(IDLE), DeleteFailed, _deleting, None, _timeout_delete_failed),
    Row("delete-failed", ANY, DeleteFailed, _always, None, _nothing),
    Row("commit-lost", ACTIVE, CommitLost, _always, None, _commit_lost),
    Row("commit-lost-done", DONE, CommitLost, _always, None, _nothing),
    Row("leader-stale", ACTIVE, LeaderKeyStale, _always, None, _leader_stale),
    Row("leader-stale-done", DONE, LeaderKeyStale, _always, None, _nothing),
    Row("leader-lease-lost", ACTIVE, LeaderLeaseLost, _always, None, _leader_lease_lost),
    Row("leader-lease-lost-done", DONE, LeaderLeaseLost, _always, None, _nothing),
    Row("round-other", ANY, RoundCommitted, _always, None, _notify_round),
    Row("closed-spare", _p(JOINING), ClosedSeen, _is_spare, CLOSED, _closed_spare),
    Row("closed-joining", _p(JOINING), ClosedSeen, _always, CLOSED, _closed_joining),
    Row("closed", _p(IDLE, MEMBER), ClosedSeen, _always, CLOSED, _closed_notify),
    Row("closed-done", DONE, ClosedSeen, _always, None, _nothing),
    Row("status-notable", ACTIVE, StatusChanged, _status_notable, None, _notify_status),
    Row("status", ANY, StatusChanged, _always, None, _nothing),
    Row("leader-done", DONE, LeaderChanged, _always, None, _nothing),
    Row("leader-vacant", ACTIVE, LeaderChanged, _holder_none, None, _acquire),
    Row("leader-me", ACTIVE, LeaderChanged, _holder_me, None, _become_leader),
    Row("leader-deposed", ACTIVE, LeaderChanged, _deposed, None, _step_down),
    Row("leader-other", ACTIVE, LeaderChanged, _always, None, _nothing),
    # re-evaluated after every event: hot spare bookkeeping, then the leader's duties
    Row("spare", _p(JOINING), Evaluate, _became_spare, None, _mark_spare),
    Row("spare-promoted", _p(JOINING), Evaluate, _spare_promoted, None, _promote_spare),
    Row("commit", ACTIVE, Evaluate, _commit_due, None, _commit),
    Row("probe-stragglers", ACTIVE, Evaluate, _probe_due, None, _probe),
    Row("probe-leader", _p(JOINING), Evaluate, _leader_late, None, _probe_leader),
    Row("publish-status", ACTIVE, Evaluate, _status_due, None, _publish),
    Row("last-call-clock", ACTIVE, Evaluate, _bookkeeping_due, None, _track_last_call),
    Row("evaluate", ANY, Evaluate, _always, None, _nothing),
)
"""Every transition of the machine; tests drive each row (see ``Machine.fired``)."""


# --- observing: update knowledge before the table decides ----------------------------


def _observe(state: State, event: Event) -> State:
    if isinstance(event, NodePut) and state.nodes is not None:
        departed = state.departed
        if event.entry.left or event.node_id in departed:
            departed = (
                departed | {event.node_id} if event.entry.left else departed - {event.node_id}
            )
        return replace(state, nodes={**state.nodes, event.node_id: event.entry}, departed=departed)
    if isinstance(event, NodeDeleted) and state.nodes is not None:
        nodes = dict(state.nodes)
        nodes.pop(event.node_id, None)
        return replace(state, nodes=nodes)
    if isinstance(event, DeleteRefused) and event.revision > state.round_revision:
        event = RoundCommitted(event.record, event.revision)
    if isinstance(event, RoundCommitted):
        return replace(
            state,
            round=event.record,
            round_revision=event.revision,
            departed=frozenset(n for n in state.departed if n in event.record.members),
            collect_known=None,
            probed=frozenset(),
        )
    if isinstance(event, StatusChanged):
        return replace(state, status=event.record)
    if isinstance(event, ClosedSeen):
        return replace(state, closed=True)
    if isinstance(event, LeaderChanged):
        return replace(state, leader=event.holder, leader_probe=event.probe)
    return state


class Machine:
    """Runs the table. Pure apart from ``fired`` (the rows that ran, for tests)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.fired: set[str] = set()

    def step(self, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
        """Apply ``event`` at monotonic time ``now``; return the new state and actions."""
        actions: list[Action] = []
        if isinstance(event, Snapshot):
            state, actions = self._snapshot(state, event, now)
        else:
            state, actions = self._apply(state, event, now)
        for _ in range(8):  # spare, commit, publish, clock: a few duties per event at most
            before = state
            state, duties = self._apply(state, Evaluate(), now)
            actions.extend(duties)
            if not duties and state == before:
                break
        return state, actions

    def step_batch(
        self, state: State, events: Sequence[Event], now: float
    ) -> tuple[State, list[Action]]:
        """Apply several events (what one watch read delivered), evaluating once at the end.

        Equivalent to :meth:`step` per event except that the leader's duties are decided
        on the final knowledge only, and a run of node events costs one copy of the node
        table instead of one per event: the leader's work per batch is O(N), not O(N^2).
        """
        if len(events) == 1:
            return self.step(state, events[0], now)
        actions: list[Action] = []
        puts: dict[str, NodeEntry | None] = {}
        for event in events:
            if isinstance(event, NodePut | NodeDeleted) and state.nodes is not None:
                row = self._row(state, event, now)  # node rows never look at the table
                self.fired.add(row.name)
                state, more = row.effect(self.config, state, event, now)
                actions.extend(more)
                if isinstance(event, NodePut):
                    puts[event.node_id] = event.entry
                else:
                    entry = puts.get(event.node_id)
                    if entry is not None and entry.left:
                        state = self._merge(state, puts)  # record the departure first
                    puts[event.node_id] = None
                continue
            state = self._merge(state, puts)
            if isinstance(event, Snapshot):
                state, more = self._snapshot(state, event, now)
            else:
                state, more = self._apply(state, event, now)
            actions.extend(more)
        state = self._merge(state, puts)
        state, more = self.step(state, Evaluate(), now)
        actions.extend(more)
        return state, actions

    @staticmethod
    def _merge(state: State, puts: dict[str, NodeEntry | None]) -> State:
        """Apply the node events collected in ``puts`` (and empty it)."""
        if not puts or state.nodes is None:
            puts.clear()
            return state
        nodes = dict(state.nodes)
        departed = set(state.departed)
        for node_id, entry in puts.items():
            if entry is None:
                nodes.pop(node_id, None)
            else:
                nodes[node_id] = entry
                if entry.left:
                    departed.add(node_id)
                else:
                    departed.discard(node_id)
        puts.clear()
        return replace(state, nodes=nodes, departed=frozenset(departed))

    def _apply(self, state: State, event: Event, now: float) -> tuple[State, list[Action]]:
        if isinstance(event, RoundCommitted) and event.revision <= state.round_revision:
            return state, []  # already known (a snapshot and the watch both told us)
        before = state
        if isinstance(event, StatusChanged):
            # `_status_notable` compares with the status we knew.
            row = self._row(before, event, now)
            state = _observe(state, event)
        else:
            state = _observe(state, event)
            row = self._row(state, event, now)
        self.fired.add(row.name)
        state, actions = row.effect(self.config, state, event, now)
        if row.to is not None:
            state = replace(state, phase=row.to)
        return state, actions

    def _row(self, state: State, event: Event, now: float) -> Row:
        for row in TRANSITIONS:
            if (
                state.phase in row.phases
                and isinstance(event, row.event)
                and row.guard(self.config, state, event, now)
            ):
                return row
        raise LookupError(f"no transition for {type(event).__name__} in {state.phase}")

    def _snapshot(self, state: State, event: Snapshot, now: float) -> tuple[State, list[Action]]:
        state = replace(
            state,
            nodes=event.nodes if event.nodes is not None else None,
            committing=0,
        )
        state, actions = self._apply(state, event, now)
        derived: list[Event] = []
        if event.round is not None and event.round_revision != state.round_revision:
            derived.append(RoundCommitted(event.round, event.round_revision))
        if event.status != state.status:
            derived.append(StatusChanged(event.status))
        if event.closed and not state.closed:
            derived.append(ClosedSeen())
        if event.leader != state.leader or event.leader is None:
            derived.append(LeaderChanged(event.leader, event.leader_probe))
        for sub in derived:
            if (
                isinstance(sub, LeaderChanged)
                and event.nodes is not None
                and sub.holder == self.config.node_id
                and state.phase in ACTIVE
            ):
                # a full read while we lead: this is the view we need, no resync
                state = replace(state, leader=sub.holder, leader_probe=sub.probe)
                continue
            state, more = self._apply(state, sub, now)
            actions.extend(more)
        return state, actions


# --- queries (no transition) ----------------------------------------------------------


def next_deadline(config: Config, state: State) -> float | None:
    """When the executor must feed a :class:`Tick` at the latest (None: no timer)."""
    deadlines: list[float] = []
    if (
        state.phase is Phase.JOINING
        and state.join_deadline is not None
        and not _round_full(config, state)  # hot spares wait without a deadline
    ):
        deadlines.append(state.join_deadline)
    if _is_leader(config, state) and state.phase in ACTIVE:
        if state.min_reached_at is not None:
            deadlines.append(state.min_reached_at + config.last_call_timeout)
        status = _leader_status(config, state)
        if status is not None and status not in (state.status, state.published):
            deadlines.append(state.published_at + config.status_interval)
    return min(deadlines) if deadlines else None


def num_nodes_waiting(config: Config, state: State) -> int:
    """torch's ``num_nodes_waiting``: nodes on the wait list of the running round."""
    view = _view(config, state)
    if view is not None:
        return view.waiting(config)
    if state.status is not None and state.status.round == state.round_number:
        return state.status.waiting
    return 0


def is_leader(config: Config, state: State) -> bool:
    """Does this node currently hold the leader's role and view?"""
    return _is_leader(config, state)


def scope(config: Config, state: State) -> Scope:
    """What the executor should watch."""
    return Scope.ALL if state.leader == config.node_id and state.phase in ACTIVE else Scope.CONTROL


__all__ = [
    "TRANSITIONS",
    "Action",
    "Assignment",
    "Change",
    "ChangeKind",
    "Config",
    "Event",
    "Machine",
    "NodeEntry",
    "Phase",
    "Row",
    "Scope",
    "State",
    "View",
    "assign_ranks",
    "derive_view",
    "is_leader",
    "next_deadline",
    "num_nodes_waiting",
    "scope",
]
