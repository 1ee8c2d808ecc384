"""The multi-host test bed as a tool (issue 11): torchrun jobs across lab hosts, one killed.

Builds a lab (``tests/multihost/netlab.py``: one network namespace per host, each with
its own address and name on a bridge; run as root), and per run: an etcd member on host
``etcd`` (for the etcd backends), one ``torchrun`` agent on each of ``h0`` ...
``h<N-1>`` (``--nnodes=2:N --nproc-per-node=1 --max-restarts=3``, gloo workers in a
training-like loop, ``tests/e2e/native_worker.py``), every one reaching the rendezvous
by host name. Once all N workers run, the victim host is killed (every process on it:
agent and worker; ``--power-off`` also takes its link down, so connections to it time
out instead of being refused). Measured: the time from the kill until the N-1
survivors' workers run again in a world of N-1; then they are told to finish and must
exit 0.

Backends (``--backends``): torch's names, and ``etcd-v3-embedded``: ``etcd-v3`` with
``--rdzv-endpoint=h0:29500 --rdzv-conf=embedded=true`` and no etcd host, so the agents
form a replicated etcd themselves (h0's agent seeds it, three hosts' agents run its
members; the fault comes once it has its three members, "etcd of 3 formed").

Victims (``--victims``): ``endpoint`` is ``h0``, the host named in ``--rdzv-endpoint``
for ``c10d`` (its agent hosts the TCPStore: c10d is expected to die with it) and for
``etcd-v3-embedded`` (its agent seeded the etcd and runs a member of it); for the other
etcd backends ``h0`` is one agent like the others, etcd runs on a host of its own;
``agent`` is ``h<N-1>``, a host that holds no store (for ``etcd-v3-embedded``: no
member, it waits to replace one).

    python benchmarks/lab.py --scenario kill-host [--hosts 4] [--runs 1]
        [--backends etcd-v3-embedded,c10d,etcd-v3] [--victims endpoint,agent]
        [--bound 90] [--power-off] [--keep-logs DIR]
    python benchmarks/lab.py --scenario partition-host [--partition-seconds 10] ...

``partition-host``: the victim's link goes down instead (its processes live on, cut
off), for ``--partition-seconds``, then up again; measured as well: whether, and how
long after the heal, all N workers run together again (the job is then finished in a
world of N).

Prints a markdown table: per backend and victim, the median recovery (a run that did not
recover counts as longer than the bound), min-max of recovered runs, runs recovered,
runs whose survivors finished cleanly, and the median time from the agents' start to
all N workers up (how long torch needs to start workers on the machine right now: it
is part of every recovery). Each lab is removed after its run.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from multihost.harness import TorchrunJob, start_etcd, wait_voters  # noqa: E402
from multihost.netlab import Lab, unavailable  # noqa: E402

ETCD_BACKENDS = ("etcd-v3", "etcd-v3-dynamic")
#: etcd-v3 on the replicated embedded etcd: no etcd host, h0's agent seeds it.
EMBEDDED = "etcd-v3-embedded"
C10D_PORT = 29400
EMBEDDED_PORT = 29500


@dataclass
class Run:
    backend: str
    victim: str
    recovery: float | None = None  # seconds from the kill to the survivors running again
    finished: bool = False  # the survivors then exited 0
    start: float | None = None  # seconds from the agents' start to all N workers up
    rejoined: float | None = None  # partition-host: from the heal until all N run again
    formed: float | None = None  # etcd-v3-embedded: from the start to 3 voting members
    note: str = ""


def one_run(
    backend: str,
    victim: str,
    n: int,
    bound: float,
    power_off: bool,
    keep: Path | None = None,
    partition: float | None = None,
) -> Run:
    run = Run(backend, victim)
    names = ["etcd", *(f"h{i}" for i in range(n))] if backend in ETCD_BACKENDS else None
    # (c10d and etcd-v3-embedded: no store host of its own, h0's agent hosts it)
    with Lab(names or [f"h{i}" for i in range(n)]) as lab:
        try:
            return _run(lab, run, n, bound, power_off, partition)
        finally:
            if keep is not None:  # the agents' logs, before the lab is removed
                into = keep / f"{backend}-{victim}-{uuid.uuid4().hex[:6]}"
                into.mkdir(parents=True)
                for path in lab.workdir.glob("h*.log"):
                    shutil.copy(path, into / path.name)


def _run(lab: Lab, run: Run, n: int, bound: float, power_off: bool, partition: float | None) -> Run:
    """kill-host, or with ``partition`` (seconds) partition-host: the victim's link is
    down that long, then healed; it must come back (all N run again, then finish)."""
    backend, victim = run.backend, run.victim
    if backend in ETCD_BACKENDS:
        endpoint = start_etcd(lab, lab["etcd"])
    else:
        endpoint = f"h0:{EMBEDDED_PORT if backend == EMBEDDED else C10D_PORT}"
    began = time.monotonic()
    hosts = [lab[f"h{i}"] for i in range(n)]
    finish_world = n if partition is not None else n - 1
    job = TorchrunJob(
        lab, hosts, "etcd-v3" if backend == EMBEDDED else backend, endpoint,
        finish_world=finish_world, bound=bound,
        rdzv_conf="embedded=true" if backend == EMBEDDED else None,
    )  # fmt: skip
    deadline = time.monotonic() + bound
    if job.wait_running(n, deadline) is None:
        run.note = f"the {n} agents never ran together"
        logging.getLogger("lab").info("%s", job.logs())
        return run
    run.start = time.monotonic() - began
    if backend == EMBEDDED:
        # The first seconds of a job, its etcd grows from 1 to 3 members (through 2,
        # when losing either loses the quorum): the fault comes once it has 3.
        url = f"http://{lab['h0'].address}:{EMBEDDED_PORT}"
        if wait_voters(url, min(3, n), deadline) is None:
            run.note = "the embedded etcd never had 3 voting members"
            return run
        run.formed = time.monotonic() - began
    time.sleep(1.0)  # a little training
    dead = "h0" if victim == "endpoint" else f"h{n - 1}"
    killed = time.time()
    if partition is None:
        lab[dead].kill(power_off=power_off)
    else:
        lab[dead].partition()
    times = job.wait_running(n - 1, deadline)
    if times is None:
        if partition is not None:
            lab[dead].heal()
        run.note = "the survivors did not run again in time"
        return run
    run.recovery = times[-1] - killed
    if partition is not None:
        time.sleep(max(0.0, killed + partition - time.time()))
        lab[dead].heal()
        healed = time.time()
        back = job.wait_running(n, deadline, since=healed)
        if back is None:
            run.note = f"{dead} did not run again with the others after the heal"
            return run
        run.rejoined = back[-1] - healed
    codes = job.finish(dead=[dead] if partition is None else [])
    run.finished = all(code == 0 for code in codes.values())
    if not run.finished:
        run.note = f"survivors exited {codes}"
    return run


def table(
    runs: list[Run], backends: list[str], victims: list[str], bound: float, partition: bool
) -> str:
    extra = " | back after heal" if partition else ""
    rows = [
        f"| backend | victim | median recovery | min - max | recovered{extra} | finished "
        "| first start | etcd of 3 formed |",
        "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if partition else ""),
    ]
    for victim in victims:
        for backend in backends:
            mine = [r for r in runs if r.backend == backend and r.victim == victim]
            times = [r.recovery if r.recovery is not None else math.inf for r in mine]
            ok = [t for t in times if t != math.inf]
            median = statistics.median(times) if times else math.inf
            shown = f"{median:.1f} s" if median != math.inf else f"> {bound:.0f} s"
            spread = f"{min(ok):.1f} - {max(ok):.1f} s" if ok else "-"
            starts = [r.start for r in mine if r.start is not None]
            first = f"{statistics.median(starts):.1f} s" if starts else "-"
            formed = [r.formed for r in mine if r.formed is not None]
            grown = f"{statistics.median(formed):.1f} s" if formed else "-"
            back = [r.rejoined for r in mine if r.rejoined is not None]
            rejoin = (
                f" | {len(back)}/{len(mine)}"
                + (f", median {statistics.median(back):.1f} s" if back else "")
                if partition
                else ""
            )
            rows.append(
                f"| {backend} | {victim} | {shown} | {spread} | {len(ok)}/{len(mine)}{rejoin} "
                f"| {sum(r.finished for r in mine)}/{len(mine)} | {first} | {grown} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--scenario", choices=["kill-host", "partition-host"], default="kill-host")
    parser.add_argument(
        "--partition-seconds", type=float, default=10.0, help="partition-host: link down this long"
    )
    parser.add_argument("--hosts", type=int, default=4, help="agent hosts (>= 3)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--backends", default="etcd-v3-embedded,c10d,etcd-v3")
    parser.add_argument("--victims", default="endpoint,agent")
    parser.add_argument("--bound", type=float, default=90.0)
    parser.add_argument("--power-off", action="store_true", help="the victim's link too")
    parser.add_argument("--keep-logs", type=Path, help="copy each run's agent logs here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reason = unavailable()
    if reason:
        parser.exit(2, f"lab.py: {reason}\n")
    if args.hosts < 3:
        parser.error("--hosts must be at least 3 (2:N nodes, one killed)")
    backends, victims = args.backends.split(","), args.victims.split(",")
    if bad := [v for v in victims if v not in ("endpoint", "agent")]:
        parser.error(f"unknown victims {bad}: choose from endpoint, agent")
    runs: list[Run] = []
    for _ in range(args.runs):
        for victim in victims:
            for backend in backends:
                run = one_run(
                    backend,
                    victim,
                    args.hosts,
                    args.bound,
                    args.power_off,
                    args.keep_logs,
                    args.partition_seconds if args.scenario == "partition-host" else None,
                )
                logging.getLogger("lab").info("%s", run)
                runs.append(run)
    how = "processes killed and link down" if args.power_off else "every process killed"
    if args.scenario == "partition-host":
        how = f"link down {args.partition_seconds:.0f} s, then healed"
    print(
        f"{args.scenario}: {args.hosts} hosts x 1 agent (--nnodes=2:{args.hosts}), gloo; "
        f"victim host: {how}; {args.runs} run(s) per row\n"
    )
    print(table(runs, backends, victims, args.bound, args.scenario == "partition-host"))


if __name__ == "__main__":
    main()
