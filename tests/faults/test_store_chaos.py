"""Store writes from 8 processes while members of a 3-member cluster are killed, restarted
and paused: every count exact, every call returned the right value or raised.

Each worker process does ``add``, ``append`` and a ``compare_set`` increment in turn,
for at least ``COUNT`` iterations and until the faults are done: at least ``MIN_FAULTS``
of them, one member at a time (the cluster keeps its quorum), all while the workers run.
The issue's size (8 processes x 2,000 of each) runs with ``ETCD_RDZV_CHAOS_FULL=1``
(``ETCD_RDZV_CHAOS_OPS=add`` for the ``add`` alone); the suite runs the same shape smaller.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.server import EtcdCluster
from etcd_rendezvous.server._binary import list_etcd_binaries

pytest.importorskip("torch")

WORKER_TIMEOUT_FULL = 3600.0
pytestmark = [
    pytest.mark.torch,
    pytest.mark.slow,
    pytest.mark.timeout(2 * WORKER_TIMEOUT_FULL if os.environ.get("ETCD_RDZV_CHAOS_FULL") else 900),
]

WORKER = Path(__file__).with_name("store_worker.py")
PROCESSES = 8
FULL = os.environ.get("ETCD_RDZV_CHAOS_FULL") == "1"
COUNT = 2000 if FULL else 10
OPS = os.environ.get("ETCD_RDZV_CHAOS_OPS", "add,append,compare_set").split(",")
MIN_FAULTS = 20
WORKER_TIMEOUT = WORKER_TIMEOUT_FULL if FULL else 600.0


def _newest_binary() -> str | None:
    def version(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split(".") if p.isdigit())

    found = list_etcd_binaries()
    return max(found, key=lambda b: version(b.version)).path if found else None


@pytest.fixture(scope="module")
def cluster(etcd_binary: str) -> Iterator[EtcdCluster]:
    # Minutes per binary: the newest etcd only, unless the full size was asked for.
    if not FULL and os.path.realpath(etcd_binary) != os.path.realpath(_newest_binary() or ""):
        pytest.skip("the member-fault run takes minutes: it runs on the newest etcd found only")
    # Its own cluster: the session's shared one must not see these faults.
    with EtcdCluster(3, binary=etcd_binary) as c:
        yield c


class _Chaos:
    """Faults one member at a time until stopped (and ``MIN_FAULTS`` at least), in a
    thread whose failure fails the test."""

    def __init__(self, cluster: EtcdCluster, seed: int) -> None:
        self.cluster = cluster
        self.rand = random.Random(seed)
        self.stop = threading.Event()
        self.enough = threading.Event()
        self.faults: list[str] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def _run(self) -> None:
        try:
            kinds = ["kill", "pause", "restart"]
            while not self.stop.is_set():
                member = self.rand.choice(self.cluster.members)
                kind = kinds[len(self.faults) % len(kinds)]
                hold = self.rand.uniform(0.2, 1.0)
                if kind == "kill":
                    member.kill()
                    time.sleep(hold)
                    member.start(timeout=60)
                elif kind == "pause":
                    member.pause()
                    time.sleep(hold)
                    member.resume()
                else:
                    member.restart(timeout=60)
                self.faults.append(f"{kind} {member.name} {hold:.1f}s")
                if len(self.faults) >= MIN_FAULTS:
                    self.enough.set()
                self.cluster.wait_ready(timeout=60)  # quorum back before the next fault
                self.stop.wait(self.rand.uniform(0.0, 0.3))
        except BaseException as exc:
            self.error = exc
            self.enough.set()
            for m in self.cluster.members:  # leave the cluster usable for the verdict
                with contextlib.suppress(Exception):
                    if m.is_running:
                        m.resume()
                    else:
                        m.start(timeout=60)

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(300)
        assert not self.thread.is_alive(), "the chaos thread did not stop within 300s"
        if self.error is not None:
            raise AssertionError(f"the chaos thread failed: {self.error!r}") from self.error


def _read_line(stream: IO[bytes], what: str) -> bytes:
    line = stream.readline()
    assert line, f"worker ended before {what}"
    return line


def _run_workers(
    cluster: EtcdCluster, prefix: str, tmp_path: Path
) -> tuple[list[dict[str, Any]], list[str], float]:
    endpoints = cluster.endpoints
    stop_file = tmp_path / "stop"
    procs: list[subprocess.Popen[bytes]] = []
    chaos = _Chaos(cluster, seed=random.randrange(1 << 16))
    try:
        for w in range(PROCESSES):
            order = endpoints[w % 3 :] + endpoints[: w % 3]  # spread over the members
            arg = {
                "endpoints": order,
                "prefix": prefix,
                "ops": OPS,
                "count": COUNT,
                "worker": w,
                "stop_file": str(stop_file),
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), json.dumps(arg)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                )
            )
        for p in procs:  # every worker connected (torch imported) before the faults start
            assert p.stdout is not None
            assert _read_line(p.stdout, "ready").strip() == b"ready"
        started = time.monotonic()
        chaos.start()
        chaos.enough.wait(WORKER_TIMEOUT)
        stop_file.touch()
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=WORKER_TIMEOUT)
            assert p.returncode == 0, f"a worker exited with {p.returncode}"
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
        seconds = time.monotonic() - started
    finally:
        stop_file.touch()
        chaos.finish()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    return results, chaos.faults, seconds


@pytest.fixture
def prefix(cluster: EtcdCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    p = f"/chaos/{request.node.name}/"
    with EtcdClient(cluster.endpoints) as client:
        client.put(p + "cs", b"0")
    yield p
    with EtcdClient(cluster.endpoints) as client:
        client.delete(p, prefix=True)


def test_store_writes_under_member_faults(
    cluster: EtcdCluster, prefix: str, tmp_path: Path
) -> None:
    results, faults, seconds = _run_workers(cluster, prefix, tmp_path)
    per_op = {op: [r["ops"][op] for r in results] for op in OPS}
    iterations = sum(r["iterations"] for r in results)
    info = (
        f"{PROCESSES} processes, {iterations} iterations of {OPS}, {len(faults)} faults in "
        f"{seconds:.1f}s; unknown outcomes: "
        f"{ {op: sum(len(o['unknown']) for o in outs) for op, outs in per_op.items()} }; "
        f"faults: {faults}"
    )
    print(info)  # the figures, with pytest -s or -rP
    errors = [e for outs in per_op.values() for o in outs for e in o["errors"]]
    assert not errors, f"{errors[:5]}; {info}"
    assert len(faults) >= MIN_FAULTS, info
    with EtcdClient(cluster.endpoints) as client:
        values = {kv.key[len(prefix) :].decode(): kv.value for kv in client.get_prefix(prefix)}

    for op, outs in per_op.items():
        returned = [v for o in outs for v in o["returned"]]
        unknown = sum(len(o["unknown"]) for o in outs)
        assert len(returned) + unknown == iterations, f"{op}: calls lost; {info}"
        if op in ("add", "compare_set"):
            final = int(values.get("counter" if op == "add" else "cs", b"0").split(b":")[0])
            # Each returned value is the counter right after that call: all distinct.
            assert len(set(returned)) == len(returned), f"{op}: a duplicate result; {info}"
            assert len(returned) <= final <= len(returned) + unknown, f"{op}: {final}; {info}"
            if unknown == 0:
                assert sorted(returned) == list(range(1, final + 1)), f"{op}; {info}"
        else:
            tokens = values.get("log", b"").decode().split(";")[:-1]
            assert len(set(tokens)) == len(tokens), f"append: a token twice; {info}"
            assert set(returned) <= set(tokens), f"append: a returned append is missing; {info}"
            assert len(tokens) <= len(returned) + unknown, f"append: extra tokens; {info}"
