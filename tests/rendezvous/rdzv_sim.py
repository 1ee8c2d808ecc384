"""A deterministic in-memory model of etcd driving several rendezvous machines.

Only the pure state machine is under test here: this model implements the few etcd
semantics the executor relies on (revisions, leases deleting keys, guarded txns,
ordered watch streams per scope) so that hypothesis can explore interleavings. The
real executor is tested against real etcd in test_engine.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from etcd_rendezvous.rendezvous import _machine as m
from etcd_rendezvous.rendezvous._observe import key_event, snapshot
from etcd_rendezvous.rendezvous._records import (
    ClosedRecord,
    Keys,
    LeaderRecord,
    RoundRecord,
    StatusRecord,
    decode,
    encode,
)


class InvariantError(AssertionError):
    pass


@dataclasses.dataclass
class Stored:
    value: bytes
    create: int
    mod: int
    owner: int | None  # the lease the key is attached to (None: no lease)


@dataclasses.dataclass
class SimNode:
    node_id: str
    machine: m.Machine
    state: m.State = dataclasses.field(default_factory=m.State)
    cursor: int = 0
    scope: m.Scope = m.Scope.CONTROL
    lease: bool = False
    lease_id: int = 0  # its node lease (0: none yet); a restart gets a new one
    leader_lease_id: int = 0  # its leader lease, separate as in the engine (0: none)
    stale: list[int] = dataclasses.field(default_factory=list)  # a past incarnation's
    dead: bool = False
    started: bool = False
    paused: bool = False  # SIGSTOPped: sees nothing, does nothing
    lease_expired: bool = False  # its lease expired while paused (noticed after resuming)
    refuse: int = 0  # etcd refuses this many of its next node-key puts (e.g. permissions)
    lost_reply: int = 0  # this many of its next node-key puts apply, but the reply is lost
    assignments: list[m.Assignment] = dataclasses.field(default_factory=list)
    failures: list[m.Failure] = dataclasses.field(default_factory=list)
    changes: list[m.Change] = dataclasses.field(default_factory=list)


class World:
    def __init__(
        self,
        node_ids: list[str],
        *,
        min_nodes: int,
        max_nodes: int,
        last_call_timeout: float = 1.0,
        fast_quorum: bool = True,
        join_timeout: float = 1000.0,
    ) -> None:
        self.keys = Keys("run")
        self.min_nodes, self.max_nodes = min_nodes, max_nodes
        self.join_timeout = join_timeout
        self.nodes = {
            n: SimNode(
                n,
                m.Machine(
                    m.Config(
                        n,
                        min_nodes,
                        max_nodes,
                        last_call_timeout=last_call_timeout,
                        fast_quorum=fast_quorum,
                        probe=f"token-{n}@sim:1",
                    )
                ),
            )
            for n in node_ids
        }
        self.store: dict[str, Stored] = {}
        self.rev = 1
        self.log: list[tuple[int, str, Stored | None]] = []
        self.now = 0.0
        self.commits: dict[int, RoundRecord] = {}
        self.leases = 0  # the last lease id granted

    def _grant(self) -> int:
        self.leases += 1
        return self.leases

    def _node_lease(self, node: SimNode) -> int:
        """The node's lease, granted now if it has none (as the executor does)."""
        node.lease = True
        if not node.lease_id:
            node.lease_id = self._grant()
        return node.lease_id

    # --- the etcd model -------------------------------------------------------------

    def _put(self, key: str, value: bytes, owner: int | None) -> None:
        self.rev += 1
        old = self.store.get(key)
        kv = Stored(value, old.create if old else self.rev, self.rev, owner)
        self.store[key] = kv
        self.log.append((self.rev, key, kv))

    def _delete(self, key: str) -> None:
        if key in self.store:
            self.rev += 1
            del self.store[key]
            self.log.append((self.rev, key, None))

    def _revoke_lease(self, lease: int) -> None:
        for key in [k for k, v in self.store.items() if lease and v.owner == lease]:
            self._delete(key)

    def _revoke(self, node: SimNode) -> None:
        """The node's leases go (revoked, or expired): its node and leader keys vanish."""
        self._revoke_lease(node.lease_id)
        self._revoke_lease(node.leader_lease_id)
        node.lease = False
        node.lease_id = node.leader_lease_id = 0

    def _in_scope(self, node: SimNode, key: str) -> bool:
        return node.scope is m.Scope.ALL or key.startswith(self.keys.ctl)

    def _resync(self, node: SimNode, scope: m.Scope) -> None:
        node.scope = scope
        node.cursor = len(self.log)
        leader = self.store.get(self.keys.leader)
        if scope is m.Scope.ALL and leader is not None and leader.owner:
            holder = decode(leader.value, key="leader")
            if (
                isinstance(holder, LeaderRecord)
                and holder.node_id == node.node_id
                and leader.owner != node.leader_lease_id
            ):
                # our node id leads under a lease not ours: a previous incarnation
                self.feed(node, m.LeaderKeyStale(leader.owner))
                return
        kvs = [
            (k, v.value, v.create, v.mod)
            for k, v in sorted(self.store.items())
            if self._in_scope(node, k)
        ]
        self.feed(node, snapshot(self.keys, self.rev, kvs, with_nodes=scope is m.Scope.ALL))

    # --- executing a node's actions ----------------------------------------------------

    def feed(self, node: SimNode, event: m.Event) -> None:
        """Step ``node``'s machine, perform its actions, then report their outcomes (as
        the executor does)."""
        node.state, actions = node.machine.step(node.state, event, self.now)
        outcomes = [o for action in actions if (o := self._execute(node, action)) is not None]
        for outcome in outcomes:
            self.feed(node, outcome)

    def _execute(self, node: SimNode, action: m.Action) -> m.Event | None:
        keys = self.keys
        if isinstance(action, m.PutNode):
            if node.refuse:
                node.refuse -= 1
                return m.PutNodeFailed("permission denied")
            lease = self._node_lease(node)  # granted before the first put
            key = keys.node(node.node_id)
            held = self.store.get(key)
            if held is not None and held.owner != lease:
                # guarded as the executor's put: ours or absent, else who holds it
                if held.owner is None:
                    return m.PutNodeFailed(f"{key!r} exists without a lease")
                return m.NodeKeyHeld(held.owner)
            self._put(key, encode(action.record), lease)
            if node.lost_reply:
                node.lost_reply -= 1
                return m.PutNodeFailed("connection lost", maybe_applied=True)
        elif isinstance(action, m.DeleteNode):
            # guarded as the executor guards it: a newer round with us in it refuses it
            stored_round = self.store.get(keys.round)
            mod = stored_round.mod if stored_round else 0
            if action.if_round_revision is not None and mod != action.if_round_revision:
                assert stored_round is not None
                record = decode(stored_round.value, key="round")
                if isinstance(record, RoundRecord) and node.node_id in record.members:
                    return m.DeleteRefused(record, mod)
            stored = self.store.get(keys.node(node.node_id))
            if stored is not None and node.lease_id and stored.owner == node.lease_id:
                self._delete(keys.node(node.node_id))
            return m.NodeKeyDeleted()
        elif isinstance(action, m.RevokeStale):
            if action.lease in (node.lease_id, node.leader_lease_id):
                raise InvariantError(f"{node.node_id} revoked its own lease as stale")
            self._revoke_lease(action.lease)  # a previous incarnation's (see restart())
        elif isinstance(action, m.RevokeLease):
            key = keys.node(node.node_id)
            stored = self.store.get(key)
            if (
                action.farewell is not None
                and stored is not None
                and node.lease_id
                and stored.owner == node.lease_id
            ):
                self._put(key, encode(action.farewell), node.lease_id)
            self._revoke(node)
        elif isinstance(action, m.AcquireLeadership):
            if node.lease and keys.leader not in self.store:
                if not node.leader_lease_id:
                    node.leader_lease_id = self._grant()
                record = LeaderRecord(node.node_id, node.machine.config.probe)
                self._put(keys.leader, encode(record), node.leader_lease_id)
        elif isinstance(action, m.Resync):
            self._resync(node, action.scope)
        elif isinstance(action, m.CommitRound):
            return self._commit(node, action)
        elif isinstance(action, m.PublishStatus):
            leader = self.store.get(keys.leader)
            if leader is not None and node.leader_lease_id and leader.owner == node.leader_lease_id:
                self._check_status(action.record)
                self._put(keys.status, encode(action.record), None)
        elif isinstance(action, m.PutClosed):
            if keys.closed not in self.store:
                self._put(keys.closed, encode(ClosedRecord(node.node_id)), None)
        elif isinstance(action, m.ProbeNodes):
            # The prober's verdict: GONE only for a crashed process (refused connection);
            # a live or paused one answers or stays silent, and is left to its lease.
            for target_id, probe in action.targets:
                target = self.nodes.get(target_id)
                if target is None or probe != target.machine.config.probe:
                    raise InvariantError(f"probed {target_id} at a wrong address {probe!r}")
                if target_id == node.node_id:
                    raise InvariantError(f"{node.node_id} probed itself")
                if target.dead and target.lease:
                    self._revoke(target)
        elif isinstance(action, m.Deliver):
            self._check_assignment(node, action.assignment)
            node.assignments.append(action.assignment)
        elif isinstance(action, m.Fail):
            node.failures.append(action.failure)
        elif isinstance(action, m.Notify):
            node.changes.append(action.change)
        else:  # pragma: no cover
            raise AssertionError(action)
        return None

    def _commit(self, node: SimNode, action: m.CommitRound) -> m.Event | None:
        keys = self.keys
        current = self.store.get(keys.round)
        leader = self.store.get(keys.leader)
        ok = (
            (current.mod if current else 0) == action.prev_revision
            and leader is not None
            and bool(node.leader_lease_id)
            and leader.owner == node.leader_lease_id
        )
        if not ok:
            return m.CommitLost()
        self._check_commit(action.record)
        self.commits[action.record.round] = action.record
        self._put(keys.round, encode(action.record), None)
        return None

    # --- invariants -----------------------------------------------------------------

    def _check_commit(self, record: RoundRecord) -> None:
        number = record.round
        if number in self.commits:
            raise InvariantError(f"round {number} committed twice")
        if number != max(self.commits, default=0) + 1:
            raise InvariantError(f"round {number} after {max(self.commits, default=0)}")
        members = record.members
        if len(set(members)) != len(members):
            raise InvariantError(f"duplicate members in {members}")
        for member in members:
            # never a node that a restart replaced, or one paused past its TTL that the
            # leader already saw go (a key deleted since the leader's last read can be:
            # a join timeout or a leave racing the commit, and is then lost at once)
            node = self.nodes.get(member)
            if node is not None and node.lease_expired:
                raise InvariantError(f"round {number} admits {member}, paused and expired")
        if not self.min_nodes <= len(members) <= self.max_nodes:
            raise InvariantError(f"world size {len(members)} outside [min, max]")
        previous = self.commits.get(number - 1)
        if previous is not None:
            # no split brain: nobody still running the previous round is in the new one,
            # and no member of the previous round is still running it at all.
            for member in previous.members:
                stored = self.store.get(self.keys.node(member))
                if stored is not None:
                    seen = decode(stored.value, key="k").seen  # type: ignore[union-attr]
                    if seen < previous.round:
                        raise InvariantError(
                            f"round {number} committed while {member} still runs "
                            f"round {previous.round}"
                        )

    def _check_assignment(self, node: SimNode, assignment: m.Assignment) -> None:
        record = self.commits.get(assignment.round)
        if record is None or record.members != assignment.members:
            raise InvariantError(f"{node.node_id} got an uncommitted assignment")
        if record.members[assignment.rank] != node.node_id:
            raise InvariantError("rank does not match the committed order")
        if assignment.world_size != len(record.members):
            raise InvariantError("world size does not match")
        if any(a.round == assignment.round for a in node.assignments):
            raise InvariantError(f"{node.node_id} admitted twice to round {assignment.round}")

    def _check_status(self, status: StatusRecord) -> None:
        if status.waiting and status.spares:
            raise InvariantError(f"a node counted in two lists: {status}")
        if status.participants > self.max_nodes:
            raise InvariantError(f"more participants than max_nodes: {status}")

    def check_lists(self) -> None:
        """In the true store: participants and pending are disjoint and cover every node."""
        kvs = {
            k[len(self.keys.nodes) :]: v
            for k, v in self.store.items()
            if k.startswith(self.keys.nodes)
        }
        round_kv = self.store.get(self.keys.round)
        round_ = decode(round_kv.value, key="k") if round_kv else None
        assert round_ is None or isinstance(round_, RoundRecord)
        entries: Mapping[str, m.NodeEntry] = {
            n: m.NodeEntry(decode(v.value, key="k").seen, v.create)  # type: ignore[union-attr]
            for n, v in kvs.items()
        }
        view = m.derive_view(round_, entries)
        if set(view.participants) & set(view.pending):
            raise InvariantError("a node is both participant and pending")
        if set(view.participants) | set(view.pending) != set(entries):
            raise InvariantError("a node is in no list")
        if view.waiting(self.nodes_cfg()) and view.spares(self.nodes_cfg()):
            raise InvariantError("waiting and spares at once")

    def nodes_cfg(self) -> m.Config:
        return next(iter(self.nodes.values())).machine.config

    # --- driving --------------------------------------------------------------------

    def start(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.dead:
            return
        if not node.started:
            node.started = True
            self._node_lease(node)  # the executor grants the lease, then reads
            self._resync(node, m.Scope.CONTROL)
        self.feed(node, m.Join(self.now + self.join_timeout, {}, self.join_timeout))

    def deliver(self, node_id: str) -> bool:
        """Deliver the next watch event to ``node_id``; False when it has none."""
        node = self.nodes[node_id]
        if node.dead or not node.started or node.paused:
            return False
        while node.cursor < len(self.log):
            _rev, key, kv = self.log[node.cursor]
            node.cursor += 1
            if not self._in_scope(node, key):
                continue
            event = key_event(
                self.keys,
                key,
                kv.value if kv else None,
                create_revision=kv.create if kv else 0,
                mod_revision=kv.mod if kv else 0,
            )
            if event is not None:
                self.feed(node, event)
                return True
        return False

    def advance(self, dt: float) -> None:
        self.now += dt
        for node in self.nodes.values():
            if node.started and not node.dead and not node.paused:
                deadline = m.next_deadline(node.machine.config, node.state)
                if deadline is not None and deadline <= self.now:
                    self.feed(node, m.Tick())

    def refuse_put(self, node_id: str) -> None:
        """etcd refuses ``node_id``'s next node-key put (permissions, a full disk)."""
        self.nodes[node_id].refuse += 1

    def lose_put_reply(self, node_id: str) -> None:
        """``node_id``'s next node-key put is applied, but its reply is lost."""
        self.nodes[node_id].lost_reply += 1

    def kill(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if not node.dead:
            self._revoke(node)
            node.dead = True

    def crash(self, node_id: str) -> None:
        """SIGKILL, its lease still running: its keys stay until the lease expires
        (:meth:`expire_dead`) or a probe finds its process gone."""
        node = self.nodes[node_id]
        if node.started:
            node.dead = True

    def expire_dead(self, node_id: str) -> None:
        """A crashed node's lease runs out (and those of its past incarnations)."""
        node = self.nodes[node_id]
        for lease in node.stale:
            self._revoke_lease(lease)
        node.stale.clear()
        if node.dead and node.lease:
            self._revoke(node)

    def expire(self, node_id: str) -> None:
        """The node's lease expires while it is paused; then it resumes."""
        node = self.nodes[node_id]
        if node.dead or not node.started or not node.lease:
            return
        self._revoke(node)
        self.feed(node, m.LeaseLost())

    def expire_leader(self, node_id: str) -> None:
        """The node's leader lease runs out (its decision loop stalled past the TTL while
        its node lease was kept alive): the leader key vanishes, and the loop's next
        refresh finds the lease gone."""
        node = self.nodes[node_id]
        if node.dead or node.paused or not node.leader_lease_id:
            return
        self._revoke_lease(node.leader_lease_id)
        node.leader_lease_id = 0
        if node.state.leader == node_id:
            self.feed(node, m.LeaderLeaseLost())

    def pause(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.started and not node.dead:
            node.paused = True

    def expire_paused(self, node_id: str) -> None:
        """The paused node's lease runs out: its keys vanish; it does not know yet."""
        node = self.nodes[node_id]
        if node.paused and node.lease:
            self._revoke(node)
            node.lease_expired = True

    def resume(self, node_id: str) -> None:
        """SIGCONT: the node first acts on what its watch queued (stale, maybe), then its
        keep-alive finds the lease gone."""
        node = self.nodes[node_id]
        if not node.paused:
            return
        node.paused = False
        while self.deliver(node_id):
            pass
        if node.lease_expired:
            node.lease_expired = False
            self.feed(node, m.LeaseLost())

    def restart(self, node_id: str) -> None:
        """The process restarts under the same node id, before its old leases expire
        (a SIGKILL and a quick restart): the old incarnation's node key, and its leader
        key if it led, stay under the old leases; the new incarnation, with leases of
        its own, starts from nothing and joins. It finds its key held (row put-held) and
        perhaps its leadership (row leader-stale), and revokes the old leases itself."""
        node = self.nodes[node_id]
        if not node.started or node.dead:
            return
        node.stale += [lease for lease in (node.lease_id, node.leader_lease_id) if lease]
        node.lease = False
        node.lease_id = node.leader_lease_id = 0  # the old ones live on in the store
        node.state = m.State()
        node.paused = node.lease_expired = False
        node.started = False
        node.scope = m.Scope.CONTROL
        self.start(node_id)

    def leave(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.started and not node.dead:
            self.feed(node, m.Leave())

    def close(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.started and not node.dead:
            self.feed(node, m.Close())

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.started and not n.dead and not n.paused]

    def settle(self, *, agents: bool = True, max_steps: int = 20000) -> None:
        """Deliver everything and let time pass until nothing more happens.

        With ``agents``, members behave like torch's agent: a member that learns of
        waiting nodes or lost members of its round joins again.
        """
        for _ in range(max_steps):
            progressed = False
            for node in self.live():
                while self.deliver(node.node_id):
                    progressed = True
            if agents:
                for node in self.live():
                    if node.state.phase is m.Phase.MEMBER and self._should_rejoin(node):
                        self.feed(node, m.Join(self.now + self.join_timeout, {}, self.join_timeout))
                        progressed = True
            if progressed:
                continue
            deadlines = [
                d
                for n in self.live()
                if (d := m.next_deadline(n.machine.config, n.state)) is not None
            ]
            if not deadlines:
                return
            self.advance(max(0.0, min(deadlines) - self.now) + 1e-6)
        raise InvariantError("the world did not settle")

    def _should_rejoin(self, node: SimNode) -> bool:
        status = node.state.status
        assignment = node.state.assignment
        return (
            status is not None
            and assignment is not None
            and status.round == assignment.round
            and (status.waiting > 0 or bool(status.lost))
        )
