"""Rendezvous participants and an etcd member on the hosts of a :class:`~netlab.Lab`."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multihost.netlab import Host, Lab, LabError

HERE = Path(__file__).resolve().parent
NODE_SCRIPT = str(HERE / "lab_node.py")
ETCD_SCRIPT = str(HERE / "etcd_host.py")
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
