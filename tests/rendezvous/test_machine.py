"""The pure state machine, without etcd: one case per row of the transition table."""

from __future__ import annotations

import dataclasses

import pytest

from etcd_rendezvous.rendezvous import _machine as m
from etcd_rendezvous.rendezvous._records import NodeRecord, RoundRecord, StatusRecord

CFG = m.Config("a", min_nodes=2, max_nodes=3, last_call_timeout=10.0, status_interval=0.05)
ROUND1 = RoundRecord(round=1, members=("a", "b"), leader="a")
ROUND1_FULL = RoundRecord(round=1, members=("b", "c", "d"), leader="b")


def entry(seen: int, order: int) -> m.NodeEntry:
    return m.NodeEntry(seen=seen, order=order)


def st(**kw: object) -> m.State:
    return dataclasses.replace(m.State(), **kw)  # type: ignore[arg-type]


LEADER_FORMING = st(
    phase=m.Phase.JOINING,
    leader="a",
    nodes={"a": entry(0, 2), "b": entry(0, 3)},
    join_deadline=100.0,
    status=StatusRecord(round=0, participants=0, waiting=0, spares=0, leader="a"),
)
FULL_STATUS = StatusRecord(round=1, participants=3, waiting=0, spares=1, leader="b")
ROUND1_ABC = RoundRecord(round=1, members=("a", "b", "c"), leader="a")
LEADER_REJOINED = st(  # leader a rejoined round 1's end; b and c (probe-able) still run it
    phase=m.Phase.JOINING,
    leader="a",
    round=ROUND1_ABC,
    round_revision=4,
    join_deadline=100.0,
    nodes={
        "a": m.NodeEntry(seen=1, order=2, probe="ta@ha:1"),
        "b": m.NodeEntry(seen=0, order=3, probe="tb@hb:2"),
        "c": m.NodeEntry(seen=0, order=4, probe="tc@hc:3"),
    },
)
REJOINED_STATUS = StatusRecord(round=1, participants=2, waiting=1, spares=0, leader="a")


@dataclasses.dataclass(frozen=True)
class Case:
    row: str
    state: m.State
    event: m.Event
    now: float = 0.0
    phase: m.Phase | None = None  # expected phase after (None: unchanged)
    actions: tuple[type, ...] = ()  # expected action types, in order
    config: m.Config = CFG


CASES = [
    Case("join-closed", st(phase=m.Phase.CLOSED), m.Join(5.0), actions=(m.Fail,)),
    Case("join-left", st(phase=m.Phase.LEFT), m.Join(5.0), actions=(m.Fail,)),
    Case("join-again", st(phase=m.Phase.JOINING, join_deadline=1.0), m.Join(9.0)),
    Case("join", st(), m.Join(5.0), phase=m.Phase.JOINING, actions=(m.PutNode,)),
    Case("leave-twice", st(phase=m.Phase.LEFT), m.Leave()),
    Case(
        "leave",
        st(phase=m.Phase.JOINING),
        m.Leave(),
        phase=m.Phase.LEFT,
        actions=(m.RevokeLease, m.Fail),
    ),
    Case("close-known", st(phase=m.Phase.MEMBER, closed=True), m.Close()),
    Case("close", st(phase=m.Phase.MEMBER), m.Close(), actions=(m.PutClosed,)),
    Case(
        "lease-lost",
        st(phase=m.Phase.JOINING, join_deadline=5.0),
        m.LeaseLost(),
        phase=m.Phase.IDLE,
        actions=(m.Fail, m.Notify),
    ),
    Case("lease-lost-done", st(phase=m.Phase.LEFT), m.LeaseLost()),
    Case(
        "join-timeout",
        st(phase=m.Phase.JOINING, join_deadline=5.0),
        m.Tick(),
        now=5.0,
        phase=m.Phase.IDLE,
        actions=(m.DeleteNode,),  # the deletion's outcome decides (timeout-* rows)
    ),
    # a hot spare is exempt from the join timeout (torch's redundancy list)
    Case(
        "tick",
        st(phase=m.Phase.JOINING, join_deadline=5.0, round=ROUND1_FULL, status=FULL_STATUS),
        m.Tick(),
        now=50.0,
    ),
    Case(
        "snapshot",
        st(),
        m.Snapshot(
            revision=3,
            round=None,
            round_revision=0,
            status=None,
            closed=False,
            leader="b",
            nodes=None,
        ),
    ),
    Case("node-put", st(), m.NodePut("b", entry(0, 3))),
    Case("node-deleted", st(), m.NodeDeleted("b")),
    Case(
        "round-mine",
        st(phase=m.Phase.JOINING, join_deadline=5.0),
        m.RoundCommitted(ROUND1, 7),
        phase=m.Phase.MEMBER,
        actions=(m.Deliver, m.Notify),
    ),
    Case(
        "round-other",
        st(phase=m.Phase.JOINING, join_deadline=5.0),
        m.RoundCommitted(ROUND1_FULL, 7),
        actions=(m.Notify,),
    ),
    Case(
        "closed-spare",
        st(phase=m.Phase.JOINING, round=ROUND1_FULL, round_revision=7, status=FULL_STATUS),
        m.ClosedSeen(),
        phase=m.Phase.CLOSED,
        actions=(m.Fail, m.Notify),
    ),
    Case(
        "closed-joining",
        st(phase=m.Phase.JOINING),
        m.ClosedSeen(),
        phase=m.Phase.CLOSED,
        actions=(m.Fail, m.Notify),
    ),
    Case(
        "closed",
        st(phase=m.Phase.MEMBER),
        m.ClosedSeen(),
        phase=m.Phase.CLOSED,
        actions=(m.Notify,),
    ),
    Case("closed-done", st(phase=m.Phase.LEFT), m.ClosedSeen()),
    Case(
        "status-notable",
        st(phase=m.Phase.MEMBER),
        m.StatusChanged(FULL_STATUS),
        actions=(m.Notify,),
    ),
    Case("status", st(phase=m.Phase.MEMBER, status=FULL_STATUS), m.StatusChanged(FULL_STATUS)),
    Case("leader-done", st(phase=m.Phase.CLOSED), m.LeaderChanged(None)),
    Case(
        "leader-vacant",
        st(phase=m.Phase.MEMBER),
        m.LeaderChanged(None),
        actions=(m.AcquireLeadership,),
    ),
    Case("leader-me", st(phase=m.Phase.MEMBER), m.LeaderChanged("a"), actions=(m.Resync,)),
    Case(
        "leader-deposed",
        st(phase=m.Phase.MEMBER, leader="a", nodes={}),
        m.LeaderChanged("b"),
        actions=(m.Resync,),
    ),
    Case("leader-other", st(phase=m.Phase.MEMBER), m.LeaderChanged("b")),
    # duties: two pending, min reached -> the last-call clock starts (no action) ...
    Case("last-call-clock", LEADER_FORMING, m.Tick(), now=1.0),
    # ... and once it ran out the leader commits
    Case(
        "commit",
        dataclasses.replace(LEADER_FORMING, min_reached_at=1.0),
        m.Tick(),
        now=11.0,
        actions=(m.CommitRound,),
    ),
    Case(
        "publish-status",
        st(phase=m.Phase.MEMBER, leader="a", nodes={"a": entry(0, 2)}, round=ROUND1),
        m.Tick(),
        actions=(m.PublishStatus,),
    ),
    Case("evaluate", st(phase=m.Phase.LEFT), m.Tick()),
    Case(
        "spare",
        st(phase=m.Phase.JOINING, round=ROUND1_FULL, round_revision=7, status=FULL_STATUS),
        m.Tick(),
    ),
    Case(
        "spare-promoted",
        st(phase=m.Phase.JOINING, join_timeout=5.0, spare=True, join_deadline=1.0),
        m.Tick(),
        now=0.5,
    ),
    # our join timed out, but its guarded key deletion found a round with us: take it
    Case(
        "round-after-timeout",
        st(phase=m.Phase.IDLE, timed_out=True),
        m.RoundCommitted(ROUND1, 9),
        phase=m.Phase.MEMBER,
        actions=(m.Deliver, m.Notify),
    ),
    # --- outcomes the executor reports ---
    # etcd refused our node key: the join fails now, not at its timeout
    Case(
        "put-failed",
        st(phase=m.Phase.JOINING, join_deadline=5.0),
        m.PutNodeFailed("permission denied"),
        phase=m.Phase.IDLE,
        actions=(m.Fail,),
    ),
    Case("put-failed-late", st(phase=m.Phase.LEFT), m.PutNodeFailed("connection lost", True)),
    # our previous incarnation (restarted under the same id) holds our key: revoke, put
    Case(
        "put-held",
        st(phase=m.Phase.JOINING, join_deadline=5.0),
        m.NodeKeyHeld(0x1234),
        actions=(m.RevokeStale, m.PutNode),
    ),
    # ... and once more after that: another process uses our node id
    Case(
        "put-held-again",
        st(phase=m.Phase.JOINING, join_deadline=5.0, stale_revoked=True),
        m.NodeKeyHeld(0x5678),
        phase=m.Phase.IDLE,
        actions=(m.Fail,),
    ),
    Case("put-held-late", st(phase=m.Phase.IDLE), m.NodeKeyHeld(0x1234)),
    Case(
        "timeout-deleted",
        st(phase=m.Phase.IDLE, timed_out=True, deleting=True),
        m.NodeKeyDeleted(),
        actions=(m.Fail,),
    ),
    Case("deleted", st(phase=m.Phase.IDLE), m.NodeKeyDeleted()),
    # the timed-out join's guarded deletion found a round with us: take it
    Case(
        "timeout-refused",
        st(phase=m.Phase.IDLE, timed_out=True, deleting=True, round_revision=4),
        m.DeleteRefused(ROUND1, 9),
        phase=m.Phase.MEMBER,
        actions=(m.Deliver, m.Notify),
    ),
    Case(
        "timeout-refused-other",
        st(phase=m.Phase.IDLE, timed_out=True, deleting=True, round_revision=4),
        m.DeleteRefused(ROUND1_FULL, 9),
        actions=(m.Fail,),
    ),
    Case("delete-refused", st(phase=m.Phase.MEMBER), m.DeleteRefused(ROUND1, 9)),
    Case(
        "timeout-delete-failed",
        st(phase=m.Phase.IDLE, timed_out=True, deleting=True),
        m.DeleteFailed("etcd unreachable"),
        actions=(m.Fail,),
    ),
    Case("delete-failed", st(phase=m.Phase.IDLE), m.DeleteFailed("etcd unreachable")),
    # our commit lost its guard: read again (a newer round, or another leader)
    Case(
        "commit-lost",
        dataclasses.replace(LEADER_FORMING, committing=1),
        m.CommitLost(),
        actions=(m.Resync,),
    ),
    Case("commit-lost-done", st(phase=m.Phase.LEFT), m.CommitLost()),
    # a full read found our node id leading under another lease: our previous incarnation
    Case(
        "leader-stale",
        dataclasses.replace(LEADER_FORMING, committing=1),
        m.LeaderKeyStale(0x1234),
        actions=(m.RevokeStale, m.Resync),
    ),
    Case("leader-stale-done", st(phase=m.Phase.LEFT), m.LeaderKeyStale(0x1234)),
    # a refresh found our leader lease expired: the leadership is gone with it
    Case(
        "leader-lease-lost",
        dataclasses.replace(LEADER_FORMING, committing=1),
        m.LeaderLeaseLost(),
        actions=(m.Resync,),
    ),
    Case("leader-lease-lost-done", st(phase=m.Phase.LEFT), m.LeaderLeaseLost()),
    # a member rejoined while others still run round 1: the leader probes the late ones
    Case(
        "probe-stragglers",
        dataclasses.replace(LEADER_REJOINED, status=REJOINED_STATUS),
        m.Tick(),
        actions=(m.ProbeNodes,),
    ),
    # ... and a rejoining member probes a leader that is not itself
    Case(
        "probe-leader",
        st(
            phase=m.Phase.JOINING,
            leader="b",
            leader_probe="tb@hb:2",
            round=ROUND1,
            round_revision=4,
            join_deadline=100.0,
        ),
        m.Tick(),
        actions=(m.ProbeNodes,),
    ),
]


def test_every_row_has_a_case() -> None:
    assert sorted(c.row for c in CASES) == sorted(r.name for r in m.TRANSITIONS)


@pytest.mark.parametrize("case", CASES, ids=[c.row for c in CASES])
def test_row(case: Case) -> None:
    machine = m.Machine(case.config)
    state, actions = machine.step(case.state, case.event, case.now)
    assert case.row in machine.fired
    assert state.phase is (case.phase or case.state.phase)
    assert tuple(type(a) for a in actions) == case.actions


# --- behaviour in more detail ----------------------------------------------------------


def test_a_leader_whose_timed_out_key_deletion_is_refused_reads_its_view_again() -> None:
    """It dropped itself from its view on timing out; the refusal keeps its key: with
    the stale view it would count itself lost and commit a round without itself."""
    machine = m.Machine(CFG)
    state = dataclasses.replace(LEADER_FORMING, join_deadline=5.0)
    state, actions = machine.step(state, m.Tick(), 6.0)
    assert actions == [m.DeleteNode(0)] and state.nodes is not None and "a" not in state.nodes
    state, actions = machine.step(state, m.DeleteRefused(ROUND1, 9), 6.0)
    assert state.phase is m.Phase.MEMBER and state.assignment is not None
    assert not any(isinstance(a, m.CommitRound) for a in actions), actions
    assert actions[-1] == m.Resync(m.Scope.ALL) and state.nodes is None


def test_a_stale_leader_key_is_revoked_and_ctl_read_again() -> None:
    machine = m.Machine(CFG)
    state, actions = machine.step(LEADER_FORMING, m.LeaderKeyStale(0x1234), 0.0)
    assert actions == [m.RevokeStale(0x1234), m.Resync(m.Scope.CONTROL)]
    assert state.nodes is None and state.committing == 0
    assert m.scope(CFG, state) is m.Scope.CONTROL  # the leader's view is dropped


def test_a_lost_leader_lease_drops_the_leadership() -> None:
    machine = m.Machine(CFG)
    forming = dataclasses.replace(LEADER_FORMING, committing=1)
    state, actions = machine.step(forming, m.LeaderLeaseLost(), 0.0)
    assert actions == [m.Resync(m.Scope.CONTROL)]
    assert state.leader is None and state.nodes is None and state.committing == 0
    assert not m.is_leader(CFG, state) and m.scope(CFG, state) is m.Scope.CONTROL
    assert m.next_deadline(CFG, state) == forming.join_deadline  # the join still waits
    # the re-read finds the key gone: the vacancy is filled as any other
    snap = m.Snapshot(1, None, 0, None, False, None, None)
    state, actions = machine.step(state, snap, 0.0)
    assert actions == [m.AcquireLeadership()]


def test_a_promoted_spare_gets_a_fresh_join_timeout() -> None:
    machine = m.Machine(CFG)
    state = st(phase=m.Phase.JOINING, round=ROUND1_FULL, round_revision=7, status=FULL_STATUS)
    state, _ = machine.step(state, m.Join(1.0, {}, 5.0), 0.0)
    assert state.spare
    assert m.next_deadline(CFG, state) is None
    state, _ = machine.step(state, m.Tick(), 50.0)
    assert state.phase is m.Phase.JOINING
    lost = dataclasses.replace(FULL_STATUS, participants=2, waiting=1, spares=0, lost=("d",))
    state, _ = machine.step(state, m.StatusChanged(lost), 60.0)
    assert not state.spare and state.join_deadline == 65.0


def test_join_writes_the_last_seen_round() -> None:
    machine = m.Machine(CFG)
    state = st(phase=m.Phase.MEMBER, round=ROUND1, round_revision=4)
    state, actions = machine.step(state, m.Join(5.0, {"addr": "h:1"}), 0.0)
    assert actions == [m.PutNode(NodeRecord("a", seen=1, data={"addr": "h:1"}))]


def test_max_nodes_commits_at_once_and_last_call_waits() -> None:
    machine = m.Machine(CFG)
    state = dataclasses.replace(LEADER_FORMING, nodes={"a": entry(0, 2)})
    state, actions = machine.step(state, m.NodePut("b", entry(0, 3)), 1.0)
    assert not any(isinstance(a, m.CommitRound) for a in actions)
    assert m.next_deadline(CFG, state) == pytest.approx(11.0)  # the last call
    state, actions = machine.step(state, m.NodePut("c", entry(0, 4)), 2.0)
    commits = [a for a in actions if isinstance(a, m.CommitRound)]
    assert len(commits) == 1
    assert commits[0].record.members == ("a", "b", "c")
    assert commits[0].record.reason == "first round; max_nodes reached"
    assert commits[0].record.causes == ("first_round",)
    assert commits[0].record.completion == "max_nodes"
    assert commits[0].prev_revision == 0


def test_last_call_clears_when_count_drops_below_min() -> None:
    machine = m.Machine(CFG)
    state, _ = machine.step(LEADER_FORMING, m.Tick(), 1.0)
    assert state.min_reached_at == 1.0
    state, _ = machine.step(state, m.NodeDeleted("b"), 2.0)
    assert state.min_reached_at is None


def test_fast_quorum_commits_when_every_live_member_rejoined() -> None:
    cfg = dataclasses.replace(CFG, fast_quorum=True)
    machine = m.Machine(cfg)
    round2 = RoundRecord(round=2, members=("a", "b", "c"), leader="a")
    # c died; a rejoined; b still runs round 2 -> nothing yet
    state = st(
        phase=m.Phase.JOINING,
        leader="a",
        round=round2,
        round_revision=9,
        nodes={"a": entry(2, 2), "b": entry(1, 3)},
    )
    state, actions = machine.step(state, m.Tick(), 1.0)
    assert not any(isinstance(a, m.CommitRound) for a in actions)
    state, actions = machine.step(state, m.NodePut("b", entry(2, 3)), 1.1)
    commits = [a for a in actions if isinstance(a, m.CommitRound)]
    assert [c.record.members for c in commits] == [("a", "b")]
    assert commits[0].prev_revision == 9
    assert "rejoined" in commits[0].record.reason
    assert commits[0].record.causes == ("node_lost",)
    assert commits[0].record.completion == "fast_quorum"
    assert commits[0].record.lost == ("c",)


def test_waiting_versus_spares() -> None:
    nodes = {"b": entry(0, 1), "c": entry(0, 2), "d": entry(0, 3), "e": entry(1, 9)}
    view = m.derive_view(ROUND1_FULL, nodes)
    assert view.participants == ("b", "c", "d") and view.pending == ("e",)
    assert (view.waiting(CFG), view.spares(CFG)) == (0, 1)  # full: a hot spare
    del nodes["d"]
    view = m.derive_view(ROUND1_FULL, nodes)
    assert view.lost == ("d",)
    assert (view.waiting(CFG), view.spares(CFG)) == (1, 0)  # room: on the wait list


def test_ranks_are_dense_and_stable() -> None:
    assert m.assign_ranks((), ("c", "a", "b")) == ("a", "b", "c")
    # b (rank 1) died: d (rank 3) moves into the hole; a and c keep theirs
    assert m.assign_ranks(("a", "b", "c", "d"), ("a", "c", "d")) == ("a", "d", "c")
    # a newcomer fills the hole left by a dead node
    assert m.assign_ranks(("a", "b", "c"), ("a", "c", "z")) == ("a", "z", "c")


def test_num_nodes_waiting_from_status() -> None:
    state = st(phase=m.Phase.MEMBER, round=ROUND1, round_revision=3)
    status = StatusRecord(round=1, participants=1, waiting=2, spares=0)
    state, actions = m.Machine(CFG).step(state, m.StatusChanged(status), 0.0)
    assert m.num_nodes_waiting(CFG, state) == 2
    assert actions == [m.Notify(m.Change(m.ChangeKind.MEMBERSHIP, 1, waiting=2))]


def test_snapshot_replays_what_it_shows() -> None:
    machine = m.Machine(CFG)
    state = st(phase=m.Phase.JOINING, join_deadline=5.0)
    snap = m.Snapshot(
        revision=9,
        round=ROUND1,
        round_revision=8,
        status=None,
        closed=False,
        leader="b",
        nodes=None,
    )
    state, actions = machine.step(state, snap, 0.0)
    assert state.phase is m.Phase.MEMBER
    assert state.assignment == m.Assignment(1, 0, 2, ("a", "b"), {})
    assert isinstance(actions[0], m.Deliver)


def test_stale_round_event_is_ignored() -> None:
    machine = m.Machine(CFG)
    state = st(phase=m.Phase.JOINING, round=ROUND1_FULL, round_revision=8)
    new, actions = machine.step(state, m.RoundCommitted(ROUND1, 8), 0.0)
    assert new == state and actions == []


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="min_nodes"):
        m.Config("a", min_nodes=3, max_nodes=2)


# --- liveness probes (issue 5) -----------------------------------------------------


def test_late_members_are_probed_once_per_round() -> None:
    machine = m.Machine(CFG)
    state = dataclasses.replace(LEADER_REJOINED, status=REJOINED_STATUS)
    state, actions = machine.step(state, m.Tick(), 0.0)
    probes = [a for a in actions if isinstance(a, m.ProbeNodes)]
    assert probes == [m.ProbeNodes((("b", "tb@hb:2"), ("c", "tc@hc:3")))]
    state, actions = machine.step(state, m.Tick(), 0.5)
    assert not any(isinstance(a, m.ProbeNodes) for a in actions)
    # b rejoins too: c is still late, but was probed already this round
    state, actions = machine.step(state, m.NodePut("b", m.NodeEntry(1, 3, probe="tb@hb:2")), 1.0)
    assert not any(isinstance(a, m.ProbeNodes) for a in actions)
    # the probe found c's process gone: its key vanishes, the fast quorum commits round 2
    state, actions = machine.step(state, m.NodeDeleted("c"), 1.1)
    commits = [a for a in actions if isinstance(a, m.CommitRound)]
    assert len(commits) == 1 and commits[0].record.members == ("a", "b")
    assert commits[0].record.lost == ("c",)
    state, _ = machine.step(state, m.RoundCommitted(commits[0].record, 9), 1.2)
    assert state.probed == frozenset()  # a new round: late members are probed again


def test_no_probe_before_anyone_rejoined_nor_of_nodes_without_an_address() -> None:
    machine = m.Machine(CFG)
    running = dataclasses.replace(
        LEADER_REJOINED,
        phase=m.Phase.MEMBER,
        nodes={**LEADER_REJOINED.nodes, "a": m.NodeEntry(seen=0, order=2, probe="ta@ha:1")},  # type: ignore[dict-item]
    )
    _, actions = machine.step(running, m.Tick(), 0.0)
    assert not any(isinstance(a, m.ProbeNodes) for a in actions)
    silent = dataclasses.replace(
        LEADER_REJOINED,
        status=REJOINED_STATUS,
        nodes={n: dataclasses.replace(e, probe="") for n, e in LEADER_REJOINED.nodes.items()},  # type: ignore[union-attr]
    )
    _, actions = machine.step(silent, m.Tick(), 0.0)
    assert not any(isinstance(a, m.ProbeNodes) for a in actions)


def test_a_new_node_does_not_probe_the_leader_and_the_leader_not_itself() -> None:
    machine = m.Machine(CFG)
    newcomer = st(phase=m.Phase.IDLE, leader="b", leader_probe="tb@hb:2", round=ROUND1_FULL)
    _, actions = machine.step(newcomer, m.Join(5.0), 0.0)
    assert [type(a) for a in actions] == [m.PutNode]  # not a member of round 1: no probe
    leader = st(phase=m.Phase.MEMBER, leader="a", leader_probe="ta@ha:1", round=ROUND1)
    _, actions = machine.step(leader, m.Join(5.0), 0.0)
    assert not any(isinstance(a, m.ProbeNodes) for a in actions)


def test_the_join_and_the_leader_key_carry_the_probe_address() -> None:
    cfg = dataclasses.replace(CFG, probe="ta@ha:1")
    machine = m.Machine(cfg)
    _, actions = machine.step(st(), m.Join(5.0), 0.0)
    assert actions == [m.PutNode(NodeRecord("a", seen=0, probe="ta@ha:1"))]
    state = st(phase=m.Phase.JOINING, leader="b", leader_probe="tb@hb:2")
    state, _ = machine.step(state, m.LeaderChanged("c", "tc@hc:3"), 0.0)
    assert (state.leader, state.leader_probe) == ("c", "tc@hc:3")


# --- a join that times out as its round commits (torch finishes it) --------------------


def test_a_join_timeout_deletes_the_key_only_if_no_newer_round_exists() -> None:
    machine = m.Machine(CFG)
    state = st(phase=m.Phase.JOINING, join_deadline=5.0, round=ROUND1, round_revision=4)
    state, actions = machine.step(state, m.Tick(), 6.0)
    assert state.phase is m.Phase.IDLE and state.timed_out
    assert actions == [m.DeleteNode(if_round_revision=4)]
    state, actions = machine.step(state, m.NodeKeyDeleted(), 6.0)
    assert len(actions) == 1 and isinstance(actions[0], m.Fail)
    assert actions[0].failure is m.Failure.TIMEOUT
    # a later round without us changes nothing
    other = RoundRecord(round=2, members=("b", "c"), leader="b")
    state, actions = machine.step(state, m.RoundCommitted(other, 9), 6.1)
    assert state.phase is m.Phase.IDLE and not any(isinstance(a, m.Deliver) for a in actions)
    # a fresh join clears the mark
    state, _ = machine.step(state, m.Join(20.0), 7.0)
    assert not state.timed_out


# --- outcomes of actions (issue 10 item 5) ------------------------------------------------


def test_a_refused_node_key_put_leaves_no_join_behind() -> None:
    """The put failed: the node is idle again, so the next join writes its key (before,
    it stayed "joining" without a key and the next join only extended its deadline)."""
    machine = m.Machine(dataclasses.replace(CFG, min_nodes=1))
    state, actions = machine.step(st(), m.Join(5.0), 0.0)
    assert [type(a) for a in actions] == [m.PutNode]
    state, actions = machine.step(state, m.PutNodeFailed("permission denied"), 0.1)
    assert state.phase is m.Phase.IDLE and state.join_deadline is None
    assert len(actions) == 1 and isinstance(actions[0], m.Fail)
    assert actions[0].failure is m.Failure.ETCD and "permission denied" in actions[0].message
    state, actions = machine.step(state, m.Join(10.0), 1.0)
    assert state.phase is m.Phase.JOINING and [type(a) for a in actions] == [m.PutNode]


def test_a_put_whose_reply_was_lost_is_undone() -> None:
    machine = m.Machine(CFG)
    state, _ = machine.step(st(), m.Join(5.0), 0.0)
    state, actions = machine.step(state, m.PutNodeFailed("connection lost", True), 0.1)
    assert [type(a) for a in actions] == [m.DeleteNode, m.Fail]
    assert actions[0] == m.DeleteNode()  # guarded on our lease: harmless if not applied
