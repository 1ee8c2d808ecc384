"""Rendezvous participants and an etcd member on the hosts of a :class:`~netlab.Lab`."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from multihost.netlab import Host, Lab, LabError

HERE = Path(__file__).resolve().parent
NODE_SCRIPT = str(HERE / "lab_node.py")
ETCD_SCRIPT = str(HERE / "etcd_host.py")
WORKER = str(HERE.parent / "e2e" / "native_worker.py")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TORCHRUN_RECORDING = str(HERE / "lab_torchrun.py")
Line = dict[str, Any]


def start_etcd(lab: Lab, host: Host, binary: str | None = None, timeout: float = 30.0) -> str:
    """Start an etcd member on ``host`` (listening on its address); its endpoint as
    ``name:port`` (the host's name, which every lab host resolves)."""
    argv = [sys.executable, ETCD_SCRIPT, host.address, str(lab.workdir / f"etcd-{host.name}")]
    proc = host.spawn([*argv, *([binary] if binary else [])], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, text=True)  # fmt: skip
    got: queue.SimpleQueue[str] = queue.SimpleQueue()
    assert proc.stdout is not None
    threading.Thread(target=lambda: got.put(proc.stdout.readline()), daemon=True).start()  # type: ignore[union-attr]
    try:
        line = got.get(timeout=timeout)
    except queue.Empty:
        raise LabError(f"etcd on {host.name} not ready in {timeout} s") from None
    if not line:
        raise LabError(f"etcd on {host.name} exited ({proc.wait(10)}) before it was ready")
    port = json.loads(line)["endpoint"].rpartition(":")[2]
    return f"{host.name}:{port}"


def wait_voters(url: str, count: int, deadline: float, without: str = "") -> list[str] | None:
    """Bounded wait until the etcd at ``url`` has ``count`` started voting members (none
    of them at the address ``without``); their client URLs (None: not by the deadline)."""
    from etcd_rendezvous.client import EtcdClient
    from etcd_rendezvous.errors import EtcdClientError

    with EtcdClient(url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(EtcdClientError):
                members = client.members(linearizable=True)
                urls = [u for m in members if m.started and not m.is_learner for u in m.client_urls]
                gone = not without or not any(f"//{without}:" in u for u in urls)
                if len(urls) == count and gone:
                    return urls
            time.sleep(0.2)
    return None


class LabNode:
    """A rendezvous participant (``lab_node.py``) on a lab host: its JSON lines and logs."""

    def __init__(
        self,
        host: Host,
        endpoints: str,
        run_id: str,
        min_n: int,
        max_n: int,
        last_call: float = 30.0,
        lease_ttl: int = 2,
    ) -> None:
        self.host = host
        self.node_id = host.name
        argv = [sys.executable, NODE_SCRIPT, endpoints, run_id, host.name,
                *map(str, (min_n, max_n, last_call, lease_ttl))]  # fmt: skip
        self.proc = host.spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.lines: queue.SimpleQueue[Line] = queue.SimpleQueue()
        self.seen: list[Line] = []
        self.log: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_log, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(json.loads(raw))

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.log.append(raw.rstrip("\n"))

    def expect(self, predicate: Callable[[Line], bool], timeout: float) -> Line:
        """The next line matching ``predicate`` (earlier ones are kept in ``seen``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{self.node_id}: no matching line in {timeout} s: {self.seen}\n"
                    + "\n".join(self.log[-30:])
                )
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(line)
            if predicate(line):
                return line

    def assigned(self, timeout: float = 20.0, round_: int | None = None) -> Line:
        return self.expect(
            lambda x: x["event"] == "assigned" and (round_ is None or x["round"] == round_),
            timeout,
        )

    def drain(self) -> list[Line]:
        """Everything printed so far, into ``seen``."""
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return self.seen

    def rejoin(self) -> None:
        """Ask for a new round now, as torch's agent does when its workers fail."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("rejoin\n")
        self.proc.stdin.flush()

    def logged(self, text: str) -> list[str]:
        return [line for line in self.log if text in line]


def wait_any_logged(nodes: list[LabNode], text: str, timeout: float) -> str:
    """The first line with ``text`` that any of ``nodes`` logged (bounded wait)."""
    deadline = time.monotonic() + timeout
    while not (found := [line for n in nodes for line in n.logged(text)]):
        if time.monotonic() > deadline:
            logs = "\n".join(line for n in nodes for line in n.log[-20:])
            raise AssertionError(f"none of {[n.node_id for n in nodes]} logged {text!r}:\n{logs}")
        time.sleep(0.05)
    return found[0]


def evictions_by_probe(nodes: list[LabNode], victim: str) -> list[str]:
    """The log lines where a node's probe found ``victim``'s process gone."""
    return [line for n in nodes for line in n.logged(f"node {victim} is gone")]


class TorchrunJob:
    """One ``torchrun`` agent per host (``--nproc-per-node=1 --max-restarts=3``), gloo
    workers in a training-like loop (``tests/e2e/native_worker.py``) that write a marker
    once their process group is up and stop, once told to, in a world of ``finish_world``.
    """

    def __init__(
        self,
        lab: Lab,
        hosts: list[Host],
        backend: str,
        endpoint: str,
        finish_world: int,
        bound: float,
        min_nodes: int = 2,
        defer: Collection[str] = (),
        rdzv_conf: str | None = None,
        record_rounds: bool = False,
    ) -> None:
        """Starts an agent on every host but those named in ``defer`` (see :meth:`start`).
        With ``record_rounds``, each agent records its assignments (:meth:`rounds`)."""
        self.lab = lab
        self.hosts = hosts
        self.markers = lab.workdir / "markers"
        self.finish_file = lab.workdir / "finish"
        self.markers.mkdir()
        self.env = {
            **os.environ,
            "E2E_MARKER_DIR": str(self.markers),
            "E2E_FINISH_FILE": str(self.finish_file),
            "E2E_EXPECT_WORLD": str(finish_world),
            "E2E_MAX_SECONDS": str(int(bound) + 30),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.rounds_dir = lab.workdir / "rounds"
        self.rounds_dir.mkdir()
        self.env["LAB_ROUNDS_DIR"] = str(self.rounds_dir)
        self.argv = [
            *([sys.executable, TORCHRUN_RECORDING] if record_rounds else [TORCHRUN]),
            f"--nnodes={min_nodes}:{len(hosts)}",
            "--nproc-per-node=1",
            "--max-restarts=3",
            f"--rdzv-backend={backend}",
            f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id=lab-{uuid.uuid4().hex[:8]}",
            *([f"--rdzv-conf={rdzv_conf}"] if rdzv_conf else []),
            str(WORKER),
        ]
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        for host in hosts:
            if host.name not in defer:
                self.start(host)

    def start(self, host: Host) -> None:
        """Start the agent of ``host``."""
        with open(self.log_path(host), "wb") as out:
            self.agents[host.name] = host.spawn(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def rounds(self) -> dict[str, list[Line]]:
        """Every agent's recorded assignments (``record_rounds``), by node id, in the order
        each recorded them, as the checker's ``assigned`` events."""
        histories: dict[str, list[Line]] = {}
        for path in sorted(self.rounds_dir.glob("*.jsonl")):
            for text in path.read_text().splitlines():
                if text.strip():
                    line = {"event": "assigned", **json.loads(text)}
                    histories.setdefault(line["node"], []).append(line)
        return histories

    def log_path(self, host: Host) -> Path:
        return self.lab.workdir / f"{host.name}.log"

    def logs(self, lines: int = 15) -> str:
        return "\n".join(
            f"--- {h.name}:\n"
            + "\n".join(self.log_path(h).read_text(errors="replace").splitlines()[-lines:])
            for h in self.hosts
            if h.name in self.agents
        )

    def started(self, world: int, since: float = 0.0) -> list[float]:
        """Start times (wall clock) of the workers whose process group of ``world`` came
        up (after the wall time ``since``)."""
        times: list[float] = []
        for path in self.markers.glob(f"started-*-w{world}"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                times.append(float(path.read_text().split()[2]))
        return sorted(t for t in times if t > since)

    def failed(self) -> dict[str, int]:
        """Agents that exited with an error (not the ones killed: those exit with -9)."""
        codes = {name: proc.poll() for name, proc in self.agents.items()}
        return {name: code for name, code in codes.items() if code is not None and code > 0}

    def wait_running(self, world: int, deadline: float, since: float = 0.0) -> list[float] | None:
        """Bounded wait until ``world`` workers run in a world of ``world`` (started
        after the wall time ``since``); None: not by the deadline, or an agent failed."""
        while len(times := self.started(world, since)) < world:
            if time.monotonic() > deadline or self.failed():
                return None
            time.sleep(0.05)
        return times

    def finish(self, dead: Collection[str] = (), timeout: float = 30.0) -> dict[str, int | None]:
        """Tell the workers to stop; the exit code of every agent not on a ``dead`` host
        (None: still running after ``timeout``)."""
        self.finish_file.touch()
        end = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for host in self.hosts:
            if host.name in dead:
                continue
            try:
                codes[host.name] = self.agents[host.name].wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[host.name] = None
        return codes
