"""Harness for end-to-end tests that run real ``torchrun`` processes on etcd-v3.

Every process a test starts (agents and, through their environment, the
workers torch starts in their own sessions) carries ``E2E_TAG=<uuid>`` in its
environment; at teardown every live process with the tag is SIGKILLed, so
nothing outlives a test, even when an agent was killed and its workers were
orphaned.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SCRIPT = str(Path(__file__).with_name("allreduce_script.py"))


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` (TIME_WAIT connections do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def tagged_pids(tag: str) -> list[int]:
    """Pids of live processes whose environment holds ``E2E_TAG=<tag>``."""
    needle = f"E2E_TAG={tag}".encode()
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            pids.append(int(entry))
    return pids


def kill_tagged(tag: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        pids = tagged_pids(tag)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise AssertionError(f"processes tagged {tag} survive SIGKILL: {pids}")
        time.sleep(0.05)


@dataclass
class Node:
    """One torchrun agent (and, by its tag, its workers)."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    tag: str

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"torchrun node did not finish within {timeout:.0f}s; log:\n{self.log()[-4000:]}"
            ) from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def results(self) -> list[str]:
        return [line for line in self.log().splitlines() if line.startswith("RESULT ")]

    def kill(self) -> None:
        """SIGKILL the agent and its workers: the node dies as a machine would."""
        kill_tagged(self.tag)
        self.proc.wait(10)


@dataclass
class Torchrun:
    tmp_path: Path
    nodes: list[Node] = field(default_factory=list)
    marker_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.marker_dir = self.tmp_path / "markers"
        self.marker_dir.mkdir()

    def start(
        self,
        *,
        endpoint: str | None,
        run_id: str,
        nnodes: str,
        conf: str = "",
        env: dict[str, str] | None = None,
        backend: str = "etcd-v3",
        max_restarts: int = 3,
        script: str = SCRIPT,
    ) -> Node:
        tag = uuid.uuid4().hex
        argv = [
            TORCHRUN,
            f"--nnodes={nnodes}",
            "--nproc-per-node=1",
            f"--rdzv-backend={backend}",
            f"--rdzv-id={run_id}",
            f"--max-restarts={max_restarts}",
            "--monitor-interval=0.2",
        ]
        if endpoint is not None:
            argv.append(f"--rdzv-endpoint={endpoint}")
        if conf:
            argv.append(f"--rdzv-conf={conf}")
        argv.append(script)
        full_env = {
            **os.environ,
            "E2E_TAG": tag,
            "E2E_MARKER_DIR": str(self.marker_dir),
            # Election lock files of the embedded etcd stay in the test's tmp dir.
            "ETCD_RENDEZVOUS_LOCK_DIR": str(self.tmp_path),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        log_path = self.tmp_path / f"node{len(self.nodes)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
            )
        node = Node(proc, log_path, tag)
        self.nodes.append(node)
        return node

    def markers(self, world: int | None = None) -> list[str]:
        names = sorted(p.name for p in self.marker_dir.iterdir())
        if world is None:
            return names
        return [n for n in names if n.endswith(f"-w{world}")]

    def wait_markers(self, count: int, world: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.markers(world)) < count:
            # Every agent gone (e.g. torchrun refused its options): no worker can come.
            gone = all(n.proc.poll() is not None for n in self.nodes)
            if gone and len(self.markers(world)) >= count:
                return
            if gone or time.monotonic() > deadline:
                logs = "\n\n".join(n.log()[-3000:] for n in self.nodes)
                why = "every agent exited" if gone else f"not within {timeout:.0f}s"
                raise AssertionError(
                    f"{count} workers of world {world} did not start ({why}); "
                    f"markers {self.markers()}; logs:\n{logs}"
                )
            time.sleep(0.05)

    def finished_results(self, nodes: list[int], timeout: float) -> list[str]:
        """The RESULT lines of ``nodes`` once each exited 0 (else fail, with its log)."""
        results: list[str] = []
        for i in nodes:
            node = self.nodes[i]
            code = node.wait(timeout)
            assert code == 0, f"node {i} exited {code}; log:\n{node.log()[-4000:]}"
            results += node.results()
        return results

    def cleanup(self) -> None:
        for node in self.nodes:
            kill_tagged(node.tag)
            if node.proc.poll() is None:
                node.proc.kill()
            node.proc.wait(10)
