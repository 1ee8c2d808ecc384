"""Benchmark (issue 5): how long a torchrun job needs to run again after losing a node.

3 ``torchrun`` nodes on localhost (``--nnodes=2:3 --max-restarts=3 --nproc-per-node=1``),
each worker in a training-like loop of gloo all_reduces (``tests/e2e/native_worker.py``).
Once all three workers run, one whole node (agent and worker) is SIGKILLed; we measure
the time from the kill until both survivors' workers run again in a world of 2 (each
worker writes a marker file with its wall-clock start time once its process group is
up). Then the survivors are told to finish and must exit 0.

Backends, in the same run, interleaved run by run: ``etcd-v3`` (ours, the native
engine), torch's ``c10d``, ``etcd`` and
``etcd-v2`` (the last two through python-etcd, on the same etcd started by our
``EtcdServer`` with ``--enable-v2``). Every setting is the default (torch's, and our
engine's), except ``--monitor-interval`` left at torch's default too. Each run is
bounded (``--bound``, default 120 s); a run that does not recover within it counts as
not recovered. Prints a markdown table: median recovery over every run (one that did not
recover counts as longer than the bound), min-max of the recovered runs, runs recovered
and finished, and the ratio of our median to each baseline's.

    python benchmarks/recovery.py [--runs 5] [--bound 120] [--backends a,b,...] [--binary PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from etcd_rendezvous.server import EtcdServer

BACKENDS = ("etcd-v3", "c10d", "etcd", "etcd-v2")
ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "e2e" / "native_worker.py"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


@dataclass
class Run:
    backend: str
    recovery: float | None = None  # seconds from the kill to both survivors running at w2
    finished: bool = False  # both survivors then exited 0
    note: str = ""


@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    tag: str
    log: Path


@dataclass
class Job:
    workdir: Path
    nodes: list[Node] = field(default_factory=list)

    @property
    def markers(self) -> Path:
        return self.workdir / "markers"

    def start(self, backend: str, endpoint: str, run_id: str, finish: Path, bound: float) -> None:
        tag = uuid.uuid4().hex
        argv = [
            TORCHRUN,
            "--nnodes=2:3",
            "--nproc-per-node=1",
            "--max-restarts=3",
            f"--rdzv-backend={backend}",
            f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={run_id}",
            str(WORKER),
        ]
        env = {
            **os.environ,
            "E2E_TAG": tag,
            "E2E_MARKER_DIR": str(self.markers),
            "E2E_FINISH_FILE": str(finish),
            "E2E_EXPECT_WORLD": "2",
            "E2E_MAX_SECONDS": str(int(bound) + 30),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        log = self.workdir / f"node{len(self.nodes)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.nodes.append(Node(proc, tag, log))

    def started(self, world: int) -> list[float]:
        """Start times (wall clock) of the workers that ran in a world of ``world``."""
        times: list[float] = []
        for path in self.markers.glob(f"started-*-w{world}"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                times.append(float(path.read_text().split()[2]))
        return sorted(times)

    def kill(self, index: int) -> None:
        kill_tagged(self.nodes[index].tag)
        self.nodes[index].proc.wait(10)

    def cleanup(self) -> None:
        for node in self.nodes:
            kill_tagged(node.tag)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(10)


def tagged_pids(tag: str) -> list[int]:
    needle = f"E2E_TAG={tag}".encode()
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if needle in fh.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def kill_tagged(tag: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while pids := tagged_pids(tag):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes tagged {tag} survive SIGKILL: {pids}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(cond: Callable[[], bool], deadline: float, step: float = 0.05) -> bool:
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def one_run(backend: str, etcd_endpoint: str, bound: float) -> Run:
    run = Run(backend)
    endpoint = f"127.0.0.1:{free_port()}" if backend == "c10d" else etcd_endpoint
    run_id = f"recovery-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="recovery-") as tmp:
        job = Job(Path(tmp))
        job.markers.mkdir()
        finish = Path(tmp) / "finish"
        deadline = time.monotonic() + bound
        try:
            for _ in range(3):
                job.start(backend, endpoint, run_id, finish, bound)
            if not wait_for(lambda: len(job.started(3)) >= 3, deadline):
                run.note = "the 3 nodes never ran together"
                return run
            time.sleep(1.0)  # a little training
            killed = time.time()
            job.kill(2)
            if not wait_for(lambda: len(job.started(2)) >= 2, deadline):
                run.note = "survivors did not run again in time"
                return run
            run.recovery = job.started(2)[1] - killed
            finish.touch()
            end = time.monotonic() + 30
            codes: list[int | None] = []
            for node in job.nodes[:2]:
                try:
                    codes.append(node.proc.wait(max(0.1, end - time.monotonic())))
                except subprocess.TimeoutExpired:
                    codes.append(None)
            run.finished = codes == [0, 0]
            if not run.finished:
                run.note = f"survivors exited {codes}"
            return run
        finally:
            job.cleanup()
            leftovers = [p for n in job.nodes for p in tagged_pids(n.tag)]
            if leftovers:
                raise RuntimeError(f"processes outlived the run: {leftovers}")


def table(runs: list[Run], backends: list[str], bound: float) -> str:
    """Markdown: per backend the median over every run (a run that did not recover counts
    as longer than the bound), min-max of the recovered runs, and ours / theirs."""
    ours = BACKENDS[0]

    def median(backend: str) -> float:
        times = [
            r.recovery if r.recovery is not None else math.inf for r in runs if r.backend == backend
        ]
        return statistics.median(times) if times else math.nan

    mine = median(ours) if ours in backends else math.nan
    lines = [
        "| backend | median recovery (s) | min - max (s) | recovered | finished "
        f"| {ours} / backend |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for backend in backends:
        theirs = [r for r in runs if r.backend == backend]
        times = [r.recovery for r in theirs if r.recovery is not None]
        mid = median(backend)
        shown = f"{mid:.1f}" if math.isfinite(mid) else f"> {bound:.0f}"
        spread = f"{min(times):.1f} - {max(times):.1f}" if times else "-"
        finished = sum(r.finished for r in theirs)
        if backend == ours or math.isnan(mine) or math.isnan(mid):
            ratio = "-"
        elif math.isinf(mid):
            ratio = f"< {mine / bound:.3f}" if math.isfinite(mine) else "-"
        else:
            ratio = f"{mine / mid:.3f}" if math.isfinite(mine) else "> 1"
        lines.append(
            f"| {backend} | {shown} | {spread} | {len(times)}/{len(theirs)} | "
            f"{finished}/{len(theirs)} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--bound", type=float, default=120.0, help="seconds per run")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--binary", default=None, help="etcd binary (default: discovery)")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    runs: list[Run] = []
    with EtcdServer(binary=args.binary, extra_args=["--enable-v2"]) as server:
        print(f"etcd {server.version} at {server.endpoint} (--enable-v2)", flush=True)
        for i in range(args.runs):
            for backend in backends:
                began = time.monotonic()
                run = one_run(backend, server.endpoint, args.bound)
                runs.append(run)
                took = time.monotonic() - began
                shown = f"{run.recovery:.1f}s" if run.recovery is not None else "not recovered"
                print(
                    f"run {i + 1} {backend}: {shown}, finished={run.finished} "
                    f"({took:.0f}s) {run.note}",
                    flush=True,
                )
            if i + 1 < args.runs:  # partial results, in case the run is cut short
                print(f"\nafter {i + 1} run(s):\n{table(runs, backends, args.bound)}\n", flush=True)
    print()
    print(table(runs, backends, args.bound))


if __name__ == "__main__":
    main()
