"""Property tests: random arrivals, deaths, pauses, leaves and timeouts keep the invariants.

Invariants are checked by the model (``rdzv_sim.World``) as the machines act: one
committed outcome per round, consecutive round numbers, world size within
[min, max], members unique, ranks dense and matching the committed order, nobody
admitted twice to a round, no round committed while a member of the previous one
still runs it (no split brain), never waiting and spares at once; and here, after
everything settled: every live node got a round unless it is a hot spare.
"""

from __future__ import annotations

import rdzv_sim
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etcd_rendezvous.rendezvous import _machine as m

NODES = [f"n{i}" for i in range(7)]

op = st.one_of(
    st.tuples(st.just("start"), st.sampled_from(NODES)),
    st.tuples(st.just("deliver"), st.sampled_from(NODES)),
    st.tuples(st.just("deliver"), st.sampled_from(NODES)),
    st.tuples(st.just("advance"), st.sampled_from([0.01, 0.3, 2.0])),
    st.tuples(st.just("kill"), st.sampled_from(NODES)),
    st.tuples(st.just("expire"), st.sampled_from(NODES)),
    st.tuples(st.just("leave"), st.sampled_from(NODES)),
    st.tuples(st.just("rejoin"), st.sampled_from(NODES)),
)


@st.composite
def worlds(draw: st.DrawFn) -> tuple[rdzv_sim.World, list[tuple[str, object]]]:
    min_nodes = draw(st.integers(1, 4))
    max_nodes = draw(st.integers(min_nodes, 5))
    world = rdzv_sim.World(
        NODES,
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        last_call_timeout=draw(st.sampled_from([0.0, 0.5, 1.0])),
        fast_quorum=draw(st.booleans()),
        join_timeout=draw(st.sampled_from([3.0, 1000.0])),
    )
    ops = draw(st.lists(op, max_size=60))
    return world, ops


def run(world: rdzv_sim.World, ops: list[tuple[str, object]]) -> None:
    for name, arg in ops:
        if name == "start":
            world.start(str(arg))
        elif name == "deliver":
            world.deliver(str(arg))
        elif name == "advance":
            assert isinstance(arg, float)
            world.advance(arg)
        elif name == "kill":
            world.kill(str(arg))
        elif name == "expire":
            world.expire(str(arg))
        elif name == "leave":
            world.leave(str(arg))
        elif name == "rejoin":
            node = world.nodes[str(arg)]
            if node.started and node.state.phase in (m.Phase.MEMBER, m.Phase.IDLE):
                world.start(str(arg))
        world.check_lists()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_invariants_hold(case: tuple[rdzv_sim.World, list[tuple[str, object]]]) -> None:
    world, ops = case
    run(world, ops)
    world.settle()
    world.check_lists()
    latest = world.commits.get(max(world.commits, default=0))
    for node in world.live():
        if node.state.phase is not m.Phase.JOINING:
            continue
        # still joining after everything settled: only a hot spare may be
        assert latest is not None, f"{node.node_id} never got a round"
        assert len(latest.members) == world.max_nodes, (node.node_id, latest)


@settings(max_examples=100, deadline=None)
@given(
    order=st.permutations(NODES),
    min_nodes=st.integers(1, 7),
    fast=st.booleans(),
)
def test_everyone_gets_a_rank_in_any_arrival_order(
    order: list[str], min_nodes: int, fast: bool
) -> None:
    world = rdzv_sim.World(NODES, min_nodes=min_nodes, max_nodes=7, fast_quorum=fast)
    for i, node_id in enumerate(order):
        world.start(node_id)
        world.deliver(order[i // 2])
    world.settle()
    ranks = {n.node_id: n.assignments[-1].rank for n in world.nodes.values()}
    assert sorted(ranks.values()) == list(range(len(NODES)))
    # the first round's ranks are the sorted node ids, whatever the arrival order
    if len(world.commits) == 1:
        assert world.commits[1].members == tuple(sorted(NODES))


@settings(max_examples=100, deadline=None)
@given(victims=st.lists(st.sampled_from(NODES), min_size=1, max_size=3, unique=True))
def test_survivors_keep_their_ranks_and_spares_step_in(victims: list[str]) -> None:
    world = rdzv_sim.World(NODES, min_nodes=1, max_nodes=5, last_call_timeout=1.0)
    for node_id in NODES:
        world.start(node_id)
    world.settle()
    before = world.commits[max(world.commits)]
    for victim in victims:
        world.kill(victim)
    world.settle()
    after = world.commits[max(world.commits)]
    live = {n.node_id for n in world.live()}
    assert set(after.members) == set(sorted(live, key=NODES.index)[:5]) or len(after.members) == 5
    for rank, node_id in enumerate(before.members):
        if node_id in live and rank < len(after.members):
            assert after.members[rank] == node_id, (before, after)
