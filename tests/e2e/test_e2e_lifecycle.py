"""End to end (issue 13): a job's life on one machine, with real ``torchrun`` agents.

Two jobs on the embedded default side by side, the agent hosting the embedded etcd
killed, a run id used again, a typo'd endpoint, and ``rdzv close`` of a running job.
Each test is as short as it can be (one or two nodes, a few steps); each puts the time
it measured in its assertion messages.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")

from e2e.harness import Node, Torchrun, port_is_free
from etcd_rendezvous.server import EtcdServer
from etcd_rendezvous.torchrun._options import embedded_port

pytestmark = [pytest.mark.torch, pytest.mark.slow]

WORKER = str(Path(__file__).with_name("native_worker.py"))
START = 90.0  # starting a node (torch imports) takes seconds on 2 busy cores
HOSTS = "hosts the job's etcd"


@pytest.fixture(scope="module")
def one_etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


def free_run_id(prefix: str) -> str:
    """A run id whose embedded port (derived from it) is free on this machine."""
    for _ in range(50):
        run_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
        if port_is_free(embedded_port(run_id)):
            return run_id
    raise AssertionError("no run id with a free embedded port")  # pragma: no cover


def start(
    torchrun: Torchrun,
    run_id: str,
    nnodes: str,
    *,
    endpoint: str | None = None,
    finish: Path | None = None,
    max_restarts: int = 0,
    conf: str = "",
    max_seconds: float = 120,
) -> Node:
    env = {"E2E_MAX_SECONDS": str(max_seconds)}
    if finish is not None:
        env["E2E_FINISH_FILE"] = str(finish)
    return torchrun.start(
        endpoint=endpoint,
        run_id=run_id,
        nnodes=nnodes,
        conf=conf,
        env=env,
        max_restarts=max_restarts,
        script=WORKER,
    )


def wait_markers(torchrun: Torchrun, count: int, world: int) -> None:
    torchrun.wait_markers(count, world=world, timeout=START)


def test_two_jobs_on_the_embedded_default_each_run_to_completion(
    torchrun: Torchrun, tmp_path: Path
) -> None:
    """Job B keeps running after job A (started first, on this machine too) ends."""
    a, b = free_run_id("job-a"), free_run_id("job-b")
    finish_a, finish_b = tmp_path / "finish-a", tmp_path / "finish-b"
    began = time.monotonic()
    for _ in range(2):
        start(torchrun, a, "2", finish=finish_a)
    for _ in range(2):
        start(torchrun, b, "2", finish=finish_b)
    wait_markers(torchrun, 4, world=2)
    finish_a.touch()
    results_a = torchrun.finished_results([0, 1], timeout=60)
    ended_a = time.monotonic()
    # Job A's agents (and whichever sidecar they hosted) are gone: B must not notice.
    time.sleep(4.0)  # > B's 3 s lease TTL: a B on A's etcd would have lost its leases
    assert all(n.proc.poll() is None for n in torchrun.nodes[2:]), (
        f"job B died {time.monotonic() - ended_a:.1f}s after job A ended:\n"
        + "\n".join(n.log()[-2000:] for n in torchrun.nodes[2:])
    )
    finish_b.touch()
    results_b = torchrun.finished_results([2, 3], timeout=60)
    took = time.monotonic() - began
    assert len(results_a) == 2 and len(results_b) == 2, (results_a, results_b, f"{took:.1f}s")
    hosts = [i for i, n in enumerate(torchrun.nodes) if HOSTS in n.log()]
    assert len(hosts) == 2 and hosts[0] in (0, 1) and hosts[1] in (2, 3), (
        f"each job hosts its own etcd; hosts: {hosts} ({took:.1f}s)"
    )


def test_hosting_agent_killed_the_survivor_says_so_and_exits(
    torchrun: Torchrun, tmp_path: Path
) -> None:
    """SIGKILL the agent hosting the embedded etcd (and its worker): no silent minutes."""
    run_id = free_run_id("host-killed")
    never = tmp_path / "never"
    for _ in range(2):
        start(torchrun, run_id, "1:2", max_restarts=3, conf="last_call_timeout=1", finish=never)
    wait_markers(torchrun, 2, world=2)
    host = next(i for i, n in enumerate(torchrun.nodes) if HOSTS in n.log())
    survivor = torchrun.nodes[1 - host]
    killed = time.monotonic()
    torchrun.nodes[host].kill()
    code = survivor.wait(60)
    took = time.monotonic() - killed
    log = survivor.log()
    assert code != 0, f"survivor exited {code} {took:.1f}s after the kill:\n{log[-3000:]}"
    assert "the job's embedded etcd" in log and "has not answered" in log, (
        f"the survivor must say its etcd is gone ({took:.1f}s after the kill):\n{log[-3000:]}"
    )


def test_only_the_hosting_agent_killed_the_job_finishes_and_exits_fast(
    torchrun: Torchrun, tmp_path: Path
) -> None:
    """SIGKILL only the hosting agent: the workers finish; the survivor exits 0 in seconds."""
    run_id = free_run_id("agent-killed")
    finish = tmp_path / "finish"
    for _ in range(2):
        start(torchrun, run_id, "1:2", max_restarts=3, finish=finish)
    wait_markers(torchrun, 2, world=2)
    host = next(i for i, n in enumerate(torchrun.nodes) if HOSTS in n.log())
    survivor = torchrun.nodes[1 - host]
    os.kill(torchrun.nodes[host].proc.pid, signal.SIGKILL)  # its worker keeps running
    torchrun.nodes[host].proc.wait(10)
    time.sleep(1.0)
    finish.touch()
    finished = time.monotonic()
    code = survivor.wait(60)
    took = time.monotonic() - finished
    log = survivor.log()
    assert code == 0 and survivor.results(), f"exit {code} {took:.1f}s after the finish:\n{log}"
    assert "embedded etcd" in log and "has not answered" in log, (
        f"{took:.1f}s after the finish:\n{log[-3000:]}"
    )
    assert took < 40, f"the survivor took {took:.1f}s to exit after its workers finished"


def test_run_id_used_again_starts_afresh(torchrun: Torchrun, one_etcd: EtcdServer) -> None:
    """The same command twice on one etcd (as on `etcd-rendezvous serve`): both succeed."""
    run_id = f"again-{uuid.uuid4().hex[:8]}"
    times = []
    for attempt in range(2):
        began = time.monotonic()
        node = start(torchrun, run_id, "1", endpoint=one_etcd.endpoint)
        code = node.wait(START)
        times.append(time.monotonic() - began)
        assert code == 0, f"run {attempt + 1} exited {code} after {times[-1]:.1f}s:\n{node.log()}"
        assert node.results(), node.log()


def test_typod_endpoint_fails_instead_of_embedding(
    torchrun: Torchrun, one_etcd: EtcdServer
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        typo = sock.getsockname()[1]
    began = time.monotonic()
    node = start(torchrun, f"typo-{uuid.uuid4().hex[:6]}", "1", endpoint=f"127.0.0.1:{typo}")
    code = node.wait(START)
    took = time.monotonic() - began
    log = node.log()
    assert code != 0, f"exited {code} after {took:.1f}s:\n{log[-3000:]}"
    assert f"127.0.0.1:{typo}" in log and "never replaced" in log, f"{took:.1f}s:\n{log[-3000:]}"
    assert HOSTS not in log and not node.results(), log[-3000:]


def test_rdzv_close_ends_a_running_job(
    torchrun: Torchrun, one_etcd: EtcdServer, tmp_path: Path
) -> None:
    run_id = f"close-{uuid.uuid4().hex[:8]}"
    never = tmp_path / "never"
    for _ in range(2):
        start(torchrun, run_id, "2", endpoint=one_etcd.endpoint, max_restarts=3, finish=never)
    wait_markers(torchrun, 2, world=2)
    argv = [sys.executable, "-m", "etcd_rendezvous", "rdzv", "close", run_id]
    cli = subprocess.run(
        [*argv, "--endpoints", one_etcd.endpoint],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    closed = time.monotonic()
    codes = [n.wait(60) for n in torchrun.nodes]
    took = time.monotonic() - closed
    for node, code in zip(torchrun.nodes, codes, strict=True):
        log = node.log()
        assert code != 0 and not node.results(), f"exit {code} {took:.1f}s after close:\n{log}"
        assert f"rendezvous {run_id} was closed" in log, f"{took:.1f}s:\n{log[-3000:]}"
