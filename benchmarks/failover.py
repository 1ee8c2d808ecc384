"""Benchmark (issue 10): what an etcd member fault costs a rendezvous, against etcd's own
election time measured on the same fault.

A 3-member ``EtcdCluster`` (default raft timers: 100 ms heartbeat, 1 s election) and 8
rendezvous nodes (``Rendezvous``, one ``EtcdClient`` each, all given the member list in
the same order, as torchrun agents are), in one round. Then, per run, one fault, and
at the same moment every node calls ``join()`` again (a re-rendezvous, as after a worker
failure); measured from the fault:

``leader-kill``: the etcd leader is SIGKILLed.
  * ``election``: until a surviving member reports a leader again (status polled every
    10 ms): the baseline, etcd's own recovery; the goal is ``round <= election + 0.5 s``.
  * ``round``: until all 8 nodes have the next round.
  * ``write``: until a put to a follower succeeds through our client (pinned to a
    follower, the same put resent after an "outcome unknown" error: it is idempotent).
  * ``etcd3gw``: the same put loop through etcd3gw (one endpoint, the same follower,
    timeout 5 s like ours), the best-maintained other v3 gateway client.

``member-pause``: the member listed first (a follower) is SIGSTOPped for 3 s.
  * ``round, no fault``: the baseline, a re-rendezvous just before the pause.
  * ``round``: until all 8 nodes have the next round; ``leases lost``: node keys deleted
    during the pause (each is a lost lease; there should be none).

Prints a markdown table: medians over ``--runs`` runs, min-max, and the ratio of each
to its baseline (the election time for the leader kill, the round without a fault for
the pause).

    python benchmarks/failover.py [--runs 5] [--binary PATH] [--nodes 8]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import urllib3

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.errors import EtcdClientError
from etcd_rendezvous.rendezvous import Rendezvous
from etcd_rendezvous.rendezvous._records import Keys
from etcd_rendezvous.server import EtcdCluster
from etcd_rendezvous.server.cluster import EtcdClusterMember

log = logging.getLogger("failover")

BOUND = 30.0  # no single measurement waits longer


@dataclass
class Sample:
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float | None) -> None:
        self.values.setdefault(name, []).append(BOUND if value is None else value)


def _leader_id(member: EtcdClusterMember) -> int:
    status = member.status(timeout=0.2)
    return int((status or {}).get("leader", 0) or 0)


def time_election(survivors: list[EtcdClusterMember], dead_id: int, start: float) -> float | None:
    """Seconds from ``start`` until a survivor reports a leader other than ``dead_id``."""
    while time.monotonic() - start < BOUND:
        for member in survivors:
            leader = _leader_id(member)
            if leader and leader != dead_id:
                return time.monotonic() - start
        time.sleep(0.01)
    return None


def time_put(put: Callable[[], object], start: float) -> float | None:
    """Seconds from ``start`` until ``put`` succeeds (resent after any error)."""
    while time.monotonic() - start < BOUND:
        try:
            put()
            return time.monotonic() - start
        except Exception:  # either client's error: resend (idempotent put)
            time.sleep(0.01)
    return None


def _member_id(member: EtcdClusterMember) -> int:
    status = member.status(timeout=1.0) or {}
    return int((status.get("header") or {}).get("member_id", 0) or 0)


class Job:
    """``n`` rendezvous nodes of one run, each on its own client."""

    def __init__(self, cluster: EtcdCluster, n: int, endpoints: list[str]) -> None:
        self.run = f"bench-{uuid.uuid4().hex[:8]}"
        self.prefix = "/bench-failover"
        self.clients = [EtcdClient(endpoints, spread=False) for _ in range(n)]
        self.nodes = [
            Rendezvous(
                c, self.run, n, n, node_id=f"n{i}", last_call_timeout=0.2, key_prefix=self.prefix
            )
            for i, c in enumerate(self.clients)
        ]
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=n)

    def rejoin(self) -> concurrent.futures.Future[list[Any]]:
        futures = [self.pool.submit(r.join, BOUND) for r in self.nodes]
        return self.pool.submit(lambda: [f.result() for f in futures])

    def close(self) -> None:
        for r in self.nodes:
            try:
                r.leave()
            except Exception as exc:  # a benchmark: report, go on
                log.warning("leave failed: %s", exc)
        for c in self.clients:
            c.close()
        self.pool.shutdown()


def _timed(future: concurrent.futures.Future[Any], start: float) -> float | None:
    try:
        future.result(timeout=BOUND)
    except Exception as exc:  # not recovered within BOUND
        log.warning("round failed: %r", exc)
        return None
    return time.monotonic() - start


def leader_kill(cluster: EtcdCluster, n: int, sample: Sample) -> None:
    import etcd3gw

    leader = cluster.leader()
    assert leader is not None
    followers = [m for m in cluster.members if m is not leader]
    follower = followers[0]
    endpoints = [m.endpoint for m in cluster.members]  # the same order for every node
    job = Job(cluster, n, endpoints)
    ours = EtcdClient(
        [follower.endpoint, *(m.endpoint for m in cluster.members if m is not follower)],
        spread=False,
    )
    theirs = etcd3gw.client(host=follower.host, port=follower.client_port, timeout=5)
    try:
        job.rejoin().result(timeout=BOUND)  # round 1
        ours.put("/bench-failover/w", "warm")
        theirs.put("/bench-failover/w3", "warm")
        dead = _member_id(leader)
        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
            leader.kill()
            start = time.monotonic()
            round_done = job.rejoin()
            election = pool.submit(time_election, followers, dead, start)
            write = pool.submit(time_put, lambda: ours.put("/bench-failover/w", "v"), start)
            write3 = pool.submit(time_put, lambda: theirs.put("/bench-failover/w3", "v"), start)
            elected = election.result()
            took = _timed(round_done, start)
            sample.add("leader-kill: election (baseline)", elected)
            sample.add("leader-kill: round, 8 nodes", took)
            if elected is not None and took is not None:
                sample.add("leader-kill: round - election, per run", took - elected)
            sample.add("leader-kill: write, ours", write.result())
            sample.add("leader-kill: write, etcd3gw", write3.result())
    finally:
        job.close()
        ours.close()
        leader.restart()
        cluster.wait_ready()


def member_pause(cluster: EtcdCluster, n: int, sample: Sample, seconds: float = 3.0) -> None:
    leader = cluster.leader()
    victim = next(m for m in cluster.members if m is not leader)
    endpoints = [victim.endpoint, *(m.endpoint for m in cluster.members if m is not victim)]
    job = Job(cluster, n, endpoints)
    observer = EtcdClient([m.endpoint for m in cluster.members if m is not victim])
    try:
        job.rejoin().result(timeout=BOUND)
        start = time.monotonic()
        sample.add("member-pause: round, no fault (baseline)", _timed(job.rejoin(), start))
        watch = observer.watch(Keys(job.run, job.prefix).nodes, prefix=True)
        victim.pause()
        start = time.monotonic()
        round_done = job.rejoin()
        resumer = threading.Timer(seconds, victim.resume)
        resumer.start()
        sample.add(f"member-pause {seconds:g}s: round, 8 nodes", _timed(round_done, start))
        resumer.join()
        time.sleep(0.5)
        lost = 0
        while (event := watch.next_event(timeout=0.2)) is not None:
            lost += event.type == "DELETE"
        sample.add(f"member-pause {seconds:g}s: leases lost (count)", lost)
        watch.cancel()
    finally:
        victim.resume()
        job.close()
        observer.close()
        cluster.wait_ready()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--binary", default=None)
    args = parser.parse_args()
    # The library's warnings (retries, failovers) are expected here; ours say what failed.
    logging.basicConfig(level=logging.ERROR, format="%(relativeCreated)d %(name)s %(message)s")
    log.setLevel(logging.WARNING)
    urllib3.disable_warnings()
    sample = Sample()
    with EtcdCluster(3, binary=args.binary) as cluster:
        for _ in range(args.runs):
            leader_kill(cluster, args.nodes, sample)
            member_pause(cluster, args.nodes, sample)
        version = cluster.version
    election = statistics.median(sample.values["leader-kill: election (baseline)"])
    calm = statistics.median(sample.values["member-pause: round, no fault (baseline)"])
    lines = [
        f"etcd {version}, 3 members, {args.nodes} nodes, {args.runs} runs "
        f"(median, min-max; not recovered = {BOUND:g} s)",
        "",
        "| measured from the fault | median | min-max | / baseline |",
        "|---|---|---|---|",
    ]
    for name, values in sorted(sample.values.items()):
        med = statistics.median(values)
        if "count" in name:
            lines.append(f"| {name} | {med:g} | {min(values):g}-{max(values):g} | |")
            continue
        base = election if name.startswith("leader-kill") else calm
        lines.append(
            f"| {name} | {med:.2f} s | {min(values):.2f}-{max(values):.2f} | {med / base:.2f} |"
        )
    rnd = statistics.median(sample.values["leader-kill: round, 8 nodes"])
    extra = statistics.median(sample.values.get("leader-kill: round - election, per run", [BOUND]))
    lines.append("")
    lines.append(
        f"goal: leader-kill round <= election + 0.5 s: medians {rnd:.2f} s vs "
        f"{election + 0.5:.2f} s, per run round - election {extra:.2f} s "
        f"({'met' if extra <= 0.5 else 'NOT met'})"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    try:
        main()
    except EtcdClientError as exc:
        raise SystemExit(f"benchmark failed: {exc}") from exc
