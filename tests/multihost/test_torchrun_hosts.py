"""torchrun across lab hosts on etcd-v3: kill a whole host, the survivors run again.

An etcd member on host ``etcd``; one agent on each of ``h0``, ``h1``, ``h2``
(``--nnodes=2:3``, gloo), each reaching etcd, and its peers, by host name. ``h0`` is
killed (every process on it: agent and worker; it held rank 0, so the workers' gloo
store and the probe of a late member both cross hosts): ``h1`` and ``h2`` run again in a
world of 2 and finish cleanly. (Timing: ``benchmarks/lab.py``, against ``c10d``.)
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest

from multihost.checker import check_rounds
from multihost.harness import TorchrunJob, start_etcd, wait_voters
from multihost.netlab import Host, Lab

pytest.importorskip("torch")

pytestmark = [pytest.mark.torch, pytest.mark.slow]
BOUND = 150.0  # four torch imports at once on a loaded 2-core machine take a while


def test_a_killed_host_costs_one_round_not_the_job(make_lab: Callable[[list[str]], Lab]) -> None:
    lab = make_lab(["etcd", "h0", "h1", "h2"])
    endpoint = start_etcd(lab, lab["etcd"])
    hosts = [lab["h0"], lab["h1"], lab["h2"]]
    job = TorchrunJob(lab, hosts, "etcd-v3", endpoint, finish_world=2, bound=BOUND)
    deadline = time.monotonic() + BOUND
    assert job.wait_running(3, deadline), f"the 3 agents never ran together:\n{job.logs()}"
    lab["h0"].kill()
    killed = time.time()
    times = job.wait_running(2, deadline)
    assert times, f"the survivors did not run again:\n{job.logs()}"
    codes = job.finish(dead=["h0"])
    assert codes == {"h1": 0, "h2": 0}, (
        f"recovered {times[-1] - killed:.1f} s after the kill, then {codes}:\n{job.logs()}"
    )


@pytest.mark.parametrize("backend", ["etcd-v3", "c10d"], ids=str)
def test_the_store_host_may_start_last(make_lab: Callable[[list[str]], Lab], backend: str) -> None:
    """``--rdzv-endpoint=h0:PORT`` and no etcd anywhere: h0's agent hosts the store
    (etcd-v3 with ``embedded=true``: the replicated embedded etcd; c10d: a TCPStore).
    The agents on h1 and h2 start first, as happens when machines boot in any order:
    they must wait for it, not fail."""
    lab = make_lab(["h0", "h1", "h2"])
    hosts = [lab["h0"], lab["h1"], lab["h2"]]
    job = TorchrunJob(
        lab, hosts, backend, "h0:29500", finish_world=3, bound=BOUND, min_nodes=3,
        defer=["h0"], rdzv_conf="embedded=true" if backend == "etcd-v3" else None,
    )  # fmt: skip
    time.sleep(3.0)  # h1 and h2 are importing torch, then look for the etcd
    job.start(lab["h0"])
    running = job.wait_running(3, time.monotonic() + BOUND)
    assert running, f"agents failed: {job.failed()}:\n{job.logs()}"
    assert job.finish() == {"h0": 0, "h1": 0, "h2": 0}


def test_an_etcd_behind_a_partition_fails_the_agent_clearly(
    make_lab: Callable[[list[str]], Lab],
) -> None:
    """The etcd's host is partitioned before the agent starts: nothing refuses the
    connections (they time out, or find no route to the host); the agent still fails
    within a bound, naming the endpoint."""
    lab = make_lab(["etcd", "h0"])
    endpoint = start_etcd(lab, lab["etcd"])
    lab["etcd"].partition()
    job = TorchrunJob(
        lab, [lab["h0"]], "etcd-v3", endpoint, finish_world=1, bound=BOUND, min_nodes=1
    )
    began = time.monotonic()
    try:
        code = job.agents["h0"].wait(BOUND)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the agent still waits after {BOUND} s:\n{job.logs()}") from None
    took = time.monotonic() - began
    log = job.log_path(lab["h0"]).read_text(errors="replace")
    assert code != 0, log[-3000:]
    assert f"no etcd answers at --rdzv-endpoint http://{endpoint}" in log, log[-3000:]
    # a timeout, or no route once the neighbour entry expired: never a refusal
    assert "timed out" in log or "No route to host" in log, f"after {took:.1f} s:\n{log[-3000:]}"


def embedded_job(
    lab: Lab, finish_world: int, record_rounds: bool = False
) -> tuple[TorchrunJob, list[Host], list[str]]:
    """An agent on each of h0..h3 (``--nnodes=2:4``) on the replicated embedded etcd
    (``h0:29500``, ``embedded=true``), once all 4 workers run and the etcd has its 3
    voting members: the job, the hosts, the members' client URLs."""
    hosts = [lab[name] for name in ("h0", "h1", "h2", "h3")]
    job = TorchrunJob(
        lab, hosts, "etcd-v3", "h0:29500", finish_world=finish_world, bound=BOUND,
        min_nodes=2, rdzv_conf="embedded=true", record_rounds=record_rounds,
    )  # fmt: skip
    deadline = time.monotonic() + BOUND
    assert job.wait_running(4, deadline), f"the 4 agents never ran together:\n{job.logs()}"
    voters = wait_voters(f"http://{lab['h0'].address}:29500", 3, deadline)
    assert voters is not None, f"the etcd never had 3 voting members:\n{job.logs()}"
    return job, hosts, voters


def test_the_embedded_etcd_survives_the_host_that_started_it(
    make_lab: Callable[[list[str]], Lab],
) -> None:
    """Issue 11's promise: no etcd set up by hand, and no single point of failure. Four
    hosts, one agent each (``--nnodes=2:4``), ``--rdzv-endpoint=h0:PORT`` with
    ``embedded=true``: h0's agent seeds the etcd, h1..h3 join it (three voters, one host
    waiting). h0 is killed (agent, worker and etcd member): the survivors run again in a
    world of 3, and finish cleanly."""
    lab = make_lab(["h0", "h1", "h2", "h3"])
    job, hosts, voters = embedded_job(lab, finish_world=3)
    assert {urlsplit(u).hostname for u in voters} < {h.address for h in hosts}
    lab["h0"].kill()
    killed = time.time()
    times = job.wait_running(3, time.monotonic() + BOUND, since=killed)
    assert times, f"the survivors did not run again:\n{job.logs()}"
    codes = job.finish(dead=["h0"])
    assert codes == {"h1": 0, "h2": 0, "h3": 0}, (
        f"recovered {times[-1] - killed:.1f} s after the kill, then {codes}:\n{job.logs()}"
    )
    # The job is over: its members stopped with their agents, and took their data along.
    for host in hosts[1:]:
        left = [p for p in host.pids() if _command(p).startswith("etcd")]
        assert not left, f"{host.name}: etcd outlived its agent: {left}"
        data = [str(p) for p in host.tmpdir.glob("etcd-rendezvous-*") if p.is_dir()]
        data = [d for d in data if "locks" not in d]  # the election's lock files stay
        assert not data, f"{host.name}: etcd data left behind: {data}"


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_the_embedded_etcd_survives_two_member_hosts_killed_in_turn(
    make_lab: Callable[[list[str]], Lab],
) -> None:
    """Four hosts, three etcd members: h0 (the seed) is killed, the host that waited
    takes its member's place; then another member host is killed too. Two hosts are
    left, with two of the three members: the job runs again in a world of 2 and
    finishes."""
    lab = make_lab(["h0", "h1", "h2", "h3"])
    job, hosts, first = embedded_job(lab, finish_world=2)
    by_address = {h.address: h for h in hosts}
    spare = next(h for h in hosts if not any(f"//{h.address}:" in u for u in first))
    member = next(u for u in first if f"//{lab['h0'].address}:" not in u)
    lab["h0"].kill()
    killed = time.time()
    assert job.wait_running(3, time.monotonic() + BOUND, since=killed), job.logs()
    # The replacement: h0's member removed (silent for 10 s), the spare added, promoted.
    voters = wait_voters(member, 3, time.monotonic() + BOUND, without=lab["h0"].address)
    assert voters is not None, f"h0's member was not replaced:\n{job.logs()}"
    assert any(f"//{spare.address}:" in url for url in voters), (spare, voters)
    victim = by_address[str(urlsplit(voters[0]).hostname)]
    victim.kill()
    killed = time.time()
    times = job.wait_running(2, time.monotonic() + BOUND, since=killed)
    assert times, f"the survivors did not run again after {victim.name} died:\n{job.logs()}"
    codes = job.finish(dead=["h0", victim.name])
    assert codes == {h.name: 0 for h in hosts if h.name not in ("h0", victim.name)}, (
        f"{codes}:\n{job.logs()}"
    )


def test_a_member_host_partitioned_past_its_lease_rejoins_without_overlap(
    make_lab: Callable[[list[str]], Lab],
) -> None:
    """Four hosts on the replicated embedded etcd; a member host other than h0 loses its
    link for 15 s: longer than its node's lease (3 s) and than a member may stay silent
    (10 s), so the survivors run on in a world of 3 and the waiting host replaces its
    member. Healed, its etcd finds itself removed and its host waits as a candidate; its
    agent joins again and all 4 run together. Every agent's recorded rounds go through
    the checker: one membership per round, dense unique ranks, no round twice on a node.
    """
    lab = make_lab(["h0", "h1", "h2", "h3"])
    job, hosts, voters = embedded_job(lab, finish_world=4, record_rounds=True)
    victim = next(
        h for h in hosts[1:] if any(f"//{h.address}:" in u for u in voters)
    )  # a member, not the seed
    victim.partition()
    cut = time.time()
    try:
        assert job.wait_running(3, time.monotonic() + BOUND, since=cut), job.logs()
        replaced = wait_voters(
            f"http://{lab['h0'].address}:29500", 3, time.monotonic() + BOUND,
            without=victim.address,
        )  # fmt: skip
        assert replaced is not None, f"{victim.name}'s member was not replaced:\n{job.logs()}"
        time.sleep(max(0.0, cut + 15.0 - time.time()))
    finally:
        victim.heal()
    healed = time.time()
    assert job.wait_running(4, time.monotonic() + BOUND, since=healed), (
        f"{victim.name} did not run with the others again:\n{job.logs()}"
    )
    assert job.finish() == {h.name: 0 for h in hosts}, job.logs()
    histories = job.rounds()
    rounds = check_rounds(histories)
    back = [r for r, members in rounds.items() if len(members) == 4]
    assert len(back) >= 2, rounds  # all four before the partition, and again after it
    during = [r for r, members in rounds.items() if len(members) == 3]
    assert during and min(during) < max(back), rounds
    assert all(any(m.startswith(victim.name + "_") for m in rounds[r]) for r in back), rounds
