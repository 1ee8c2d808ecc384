"""``etcd-rendezvous demo``: an embedded etcd, N node processes, one SIGKILLed.

The demo starts etcd, spawns ``--nodes`` processes (``_demo_node.py``) that
rendezvous on it, SIGKILLs one member once round 1 is committed, and narrates
what happens as etcd reports it (through the same watch as ``rdzv watch``): the
dead node's lease expires, the leader reports it lost, the survivors rejoin and
round 2 commits. Then it closes the rendezvous, the nodes exit, etcd stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

import click

from etcd_rendezvous.cli._inspect import EventTranslator, RunEvent, empty_snapshot
from etcd_rendezvous.cli.rdzv import close_rendezvous
from etcd_rendezvous.client import EtcdClient, Watch
from etcd_rendezvous.errors import EtcdRendezvousError
from etcd_rendezvous.rendezvous import DEFAULT_KEY_PREFIX, DEFAULT_LEASE_TTL
from etcd_rendezvous.server import EtcdServer

_STOP_GRACE_S = 5.0
_NODE_MODULE = "etcd_rendezvous.cli._demo_node"


@dataclass
class _Node:
    node_id: str
    proc: subprocess.Popen[str]
    ready: bool = False
    assignments: dict[int, tuple[int, int]] = field(default_factory=dict)  # round -> rank, size
    closed: bool = False
    killed: bool = False
    exited: bool = False


class DemoError(EtcdRendezvousError):
    """The demo did not go as planned (a node failed, or a step took too long)."""


@dataclass
class _Timeline:
    start_signal: float | None = None
    round1: float | None = None
    kill: float | None = None
    expired: float | None = None
    noticed: float | None = None
    round2: float | None = None
    ranks: dict[int, tuple[str, ...]] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)


class Demo:
    """One run of the demo; :meth:`run` returns when everything has stopped."""

    def __init__(
        self,
        *,
        nodes: int,
        min_nodes: int,
        lease_ttl: int,
        last_call: float,
        kill: str,
        fast_quorum: bool,
        binary: str | None,
        timeout: float,
    ) -> None:
        self.n = nodes
        self.min_nodes = min_nodes
        self.lease_ttl = lease_ttl
        self.last_call = last_call
        self.kill_spec = kill
        self.fast_quorum = fast_quorum
        self.binary = binary
        self.timeout = timeout
        width = len(str(nodes - 1))
        self.node_ids = [f"node-{i:0{width}d}" for i in range(nodes)]
        self.run_id = f"demo-{os.getpid()}-{int(time.time() * 1000) % 100000}"
        self.key_prefix = DEFAULT_KEY_PREFIX
        self.t0 = time.monotonic()
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.nodes: dict[str, _Node] = {}
        self.timeline = _Timeline()
        self.victim: str | None = None
        self.leader: str | None = None
        self.stopping = threading.Event()

    # --- output ---------------------------------------------------------------------

    def say(self, message: str, at: float | None = None) -> None:
        elapsed = (time.monotonic() if at is None else at) - self.t0
        click.echo(f"[{elapsed:6.2f} s] {message}")

    def since_kill(self, at: float) -> str:
        kill = self.timeline.kill
        return "" if kill is None else f" ({at - kill:.2f} s after the kill)"

    # --- the run ------------------------------------------------------------------------

    def run(self) -> None:
        click.echo(
            f"etcd-rendezvous demo: {self.n} nodes (min {self.min_nodes}, max {self.n}), "
            f"lease TTL {self.lease_ttl} s, last call {self.last_call:g} s"
            + (", fast quorum" if self.fast_quorum else "")
        )
        started = time.monotonic()
        with EtcdServer(binary=self.binary) as server:
            self.say(
                f"etcd {server.version} ready on {server.endpoint} in "
                f"{time.monotonic() - started:.2f} s (pid {server.pid})"
            )
            self.say(
                f"watch it from another terminal: etcd-rendezvous rdzv watch {self.run_id} "
                f"--endpoints {server.endpoint}"
            )
            with EtcdClient(server.endpoint) as client:
                watch = self._watch(client)
                try:
                    self._spawn(server.endpoint)
                    self._scenario(client)
                finally:
                    self.stopping.set()
                    self._stop_nodes()
                    watch.cancel()
            stopping = time.monotonic()
        self.say(f"etcd stopped in {time.monotonic() - stopping:.2f} s")
        self._summary()

    def _watch(self, client: EtcdClient) -> Watch:
        root = f"{self.key_prefix.rstrip('/')}/{self.run_id}/"
        revision = client.range(root, prefix=True, count_only=True).revision
        translator = EventTranslator(empty_snapshot(self.run_id, self.key_prefix, revision))
        watch = client.watch(root, prefix=True, start_revision=revision + 1)

        def pump() -> None:
            try:
                while not self.stopping.is_set():
                    event = watch.next_event(timeout=0.5)
                    if event is not None:
                        translated = translator.translate(event)
                        if translated is not None:
                            self.events.put(("etcd", translated))
            except EtcdRendezvousError as exc:
                if not self.stopping.is_set():
                    self.events.put(("watch-error", exc))

        threading.Thread(target=pump, name="demo watch", daemon=True).start()
        return watch

    def _spawn(self, endpoint: str) -> None:
        common = [
            "--endpoint",
            endpoint,
            "--run-id",
            self.run_id,
            "--key-prefix",
            self.key_prefix,
            "--min-nodes",
            str(self.min_nodes),
            "--max-nodes",
            str(self.n),
            "--lease-ttl",
            str(self.lease_ttl),
            "--last-call",
            str(self.last_call),
            "--join-timeout",
            str(self.timeout),
        ]
        if self.fast_quorum:
            common.append("--fast-quorum")
        for node_id in self.node_ids:
            proc = subprocess.Popen(
                [sys.executable, "-m", _NODE_MODULE, "--node-id", node_id, *common],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,  # Ctrl-C goes to the demo, which stops the nodes
            )
            self.nodes[node_id] = _Node(node_id, proc)
            if proc.stdout is None:  # pragma: no cover - Popen(stdout=PIPE) sets it
                raise DemoError(f"demo: no output pipe for {node_id}")
            threading.Thread(
                target=self._read_node,
                args=(node_id, proc.stdout),
                name=f"demo {node_id} output",
                daemon=True,
            ).start()

    def _read_node(self, node_id: str, stream: IO[str]) -> None:
        for line in stream:
            try:
                message = json.loads(line)
            except ValueError:
                message = {"event": "output", "line": line.rstrip()}
            self.events.put((node_id, message))
        self.events.put((node_id, {"event": "exit"}))

    # --- the scenario -------------------------------------------------------------------

    def _wait(self, deadline: float, what: str, done: Any) -> None:
        """Handle events until ``done()`` holds; DemoError at the deadline."""
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise DemoError(f"demo: timed out waiting for {what}")
            try:
                source, payload = self.events.get(timeout=left)
            except queue.Empty:
                continue
            self._handle(source, payload, time.monotonic())

    def _scenario(self, client: EtcdClient) -> None:
        deadline = self.t0 + self.timeout
        n = self.n
        nodes = self.nodes.values()
        self._wait(deadline, "the nodes to start", lambda: all(x.ready for x in nodes))
        pids = ", ".join(f"{x.node_id} (pid {x.proc.pid})" for x in self.nodes.values())
        self.say(f"{n} node processes started: {pids}")
        self.say("all nodes call join()")
        self.timeline.start_signal = time.monotonic()
        for node in self.nodes.values():
            self._send(node, "go")
        self._wait(deadline, "round 1", lambda: self._assigned(1) == n)
        self.victim = self._choose_victim()
        victim = self.nodes[self.victim]
        self.timeline.kill = time.monotonic()
        victim.killed = True
        victim.proc.send_signal(signal.SIGKILL)
        self.say(
            f"killed {victim.node_id} (pid {victim.proc.pid}) with SIGKILL; etcd keeps its key "
            f"until its lease (TTL {self.lease_ttl} s) expires"
        )
        survivors = [x for x in self.nodes.values() if not x.killed]
        self._wait(
            deadline,
            "round 2",
            lambda: all(2 in x.assignments for x in survivors),
        )
        self.say("closing the rendezvous (as `etcd-rendezvous rdzv close` does)")
        close_rendezvous(client, self.run_id, self.key_prefix)
        self._wait(
            deadline,
            "the nodes to exit",
            lambda: all(x.exited for x in self.nodes.values()),
        )
        failed = [
            f"{x.node_id} (exit code {x.proc.returncode})"
            for x in survivors
            if x.proc.returncode != 0
        ]
        if failed:
            raise DemoError(f"demo: node(s) failed: {', '.join(failed)}")

    def _send(self, node: _Node, line: str) -> None:
        if node.proc.stdin is not None:
            node.proc.stdin.write(line + "\n")
            node.proc.stdin.flush()

    def _assigned(self, round_: int) -> int:
        return sum(1 for x in self.nodes.values() if round_ in x.assignments)

    def _choose_victim(self) -> str:
        members = self.timeline.ranks.get(1, tuple(self.node_ids))
        leader = self.leader
        if self.kill_spec == "leader" and leader is not None:
            return leader
        if self.kill_spec in self.nodes:
            return self.kill_spec
        candidates = [m for m in members if m != leader] or list(members)
        return candidates[len(candidates) // 2]

    def _handle(self, source: str, payload: Any, now: float) -> None:
        if source == "etcd":
            self._on_etcd(payload, now)
        elif source == "watch-error":
            raise DemoError(f"demo: the watch on etcd failed: {payload}") from payload
        else:
            self._on_node(self.nodes[source], payload, now)

    def _on_etcd(self, event: RunEvent, now: float) -> None:
        tl = self.timeline
        if event.kind in ("joined", "rejoined"):
            return  # the nodes' own lines say more
        if event.kind == "leader":
            self.leader = event.node
            self.say(f"etcd: {event.message}", now)
            return
        if event.kind == "round" and event.round is not None:
            tl.ranks[event.round] = tuple(event.details.get("members", ()))
            tl.reasons[event.round] = str(event.details.get("reason", ""))
            if event.round == 1:
                tl.round1 = now
            if event.round == 2:
                tl.round2 = now
            extra = self.since_kill(now) if event.round > 1 else ""
            self.say(f"etcd: {event.message}{extra}", now)
            return
        if event.kind in ("lost", "left") and event.node == self.victim and tl.kill:
            tl.expired = now
            self.say(
                f"etcd: {self.victim}'s lease expired after {now - tl.kill:.2f} s: its key is gone",
                now,
            )
            return
        if event.kind == "status" and tl.kill and tl.noticed is None and event.details.get("lost"):
            tl.noticed = now
            self.say(f"etcd: {event.message}{self.since_kill(now)}", now)
            return
        self.say(f"etcd: {event.message}", now)

    def _on_node(self, node: _Node, msg: dict[str, Any], now: float) -> None:
        kind = msg.get("event")
        if kind == "ready":
            node.ready = True
        elif kind == "assigned":
            round_, rank, size = int(msg["round"]), int(msg["rank"]), int(msg["world_size"])
            node.assignments[round_] = (rank, size)
            self.say(
                f"{node.node_id}: rank {rank} of {size} in round {round_} "
                f"(join() took {float(msg.get('waited', 0)):.2f} s)",
                now,
            )
        elif kind == "rejoin":
            self.say(
                f"{node.node_id}: membership changed ({msg.get('reason')}), joins again"
                + self.since_kill(now),
                now,
            )
        elif kind == "closed":
            node.closed = True
            self.say(f"{node.node_id}: rendezvous closed, exiting", now)
        elif kind == "error":
            self.say(f"{node.node_id}: error: {msg.get('error')}", now)
        elif kind == "output":
            self.say(f"{node.node_id}: {msg.get('line')}", now)
        elif kind == "exit":
            node.exited = True
            code = node.proc.wait(timeout=_STOP_GRACE_S)
            if node.killed:
                return
            if not node.closed or code != 0:
                raise DemoError(f"demo: {node.node_id} exited unexpectedly (exit code {code})")

    # --- stopping -------------------------------------------------------------------------

    def _stop_nodes(self) -> None:
        """Close stdin (the node leaves and exits), then SIGTERM, then SIGKILL; by pid."""
        for node in self.nodes.values():
            if node.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    node.proc.stdin.close()
        deadline = time.monotonic() + _STOP_GRACE_S
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            alive = [x for x in self.nodes.values() if x.proc.poll() is None]
            if not alive:
                return
            for node in alive:
                if sig is not None:
                    node.proc.send_signal(sig)
            for node in alive:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            deadline = time.monotonic() + _STOP_GRACE_S

    def _summary(self) -> None:
        tl = self.timeline
        click.echo("summary:")
        if tl.round1 is not None and tl.start_signal is not None:
            click.echo(
                f"  round 1: {len(tl.ranks.get(1, ()))} nodes, ranks "
                f"{_ranks(tl.ranks.get(1, ()))}; committed {tl.round1 - tl.start_signal:.2f} s "
                f"after join() was called ({tl.reasons.get(1, '')})"
            )
        if tl.kill is not None:
            expired = "not seen" if tl.expired is None else f"{tl.expired - tl.kill:.2f} s"
            click.echo(f"  killed {self.victim}; its lease expired after {expired}")
            if tl.noticed is not None:
                click.echo(f"  the leader reported it lost after {tl.noticed - tl.kill:.2f} s")
        if tl.round2 is not None and tl.kill is not None:
            click.echo(
                f"  round 2: {len(tl.ranks.get(2, ()))} nodes, ranks {_ranks(tl.ranks[2])}; "
                f"committed {tl.round2 - tl.kill:.2f} s after the kill ({tl.reasons.get(2, '')})"
            )
        click.echo(f"  total {time.monotonic() - self.t0:.2f} s; every process stopped")


def _ranks(members: tuple[str, ...]) -> str:
    return " ".join(f"{rank}={node}" for rank, node in enumerate(members)) or "-"


@click.command()
@click.option(
    "--nodes", type=click.IntRange(2, 64), default=4, show_default=True, help="Simulated nodes."
)
@click.option(
    "--min-nodes",
    type=click.IntRange(1, 64),
    default=None,
    help="min_nodes of the rendezvous (default: --nodes minus 1, so it survives the kill).",
)
@click.option(
    "--lease-ttl",
    type=click.IntRange(1, 60),
    default=DEFAULT_LEASE_TTL,
    show_default=True,
    help="Seconds a silent node keeps its place (the time to notice the kill).",
)
@click.option(
    "--last-call",
    type=click.FloatRange(0, 60),
    default=1.0,
    show_default=True,
    help="Seconds to wait for more nodes once min_nodes are there.",
)
@click.option(
    "--kill",
    "kill_spec",
    default="member",
    show_default=True,
    help="Whom to SIGKILL after round 1: 'member' (not the leader), 'leader', or a node id.",
)
@click.option(
    "--fast-quorum/--no-fast-quorum",
    default=True,
    show_default=True,
    help="Commit round 2 as soon as every survivor rejoined (the engine's default), "
    "or wait out the last call.",
)
@click.option(
    "--binary",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="The etcd binary to run (default: discovered, see `etcd-rendezvous doctor`).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(5, 600),
    default=60.0,
    show_default=True,
    help="Give up (and clean up) after this many seconds.",
)
def demo(
    nodes: int,
    min_nodes: int | None,
    lease_ttl: int,
    last_call: float,
    kill_spec: str,
    fast_quorum: bool,
    binary: str | None,
    timeout: float,
) -> None:
    """Watch an elastic rendezvous survive a SIGKILL, on an embedded etcd.

    Starts etcd and NODES processes that rendezvous, kills one, and shows the others
    notice (lease expiry) and re-rendezvous; then stops everything.
    """
    min_nodes = nodes - 1 if min_nodes is None else min_nodes
    if min_nodes > nodes - 1:
        raise click.BadParameter(
            f"must be at most --nodes - 1 ({nodes - 1}) for a round after the kill",
            param_hint="--min-nodes",
        )
    width = len(str(nodes - 1))
    valid = {"member", "leader"} | {f"node-{i:0{width}d}" for i in range(nodes)}
    if kill_spec not in valid:
        raise click.BadParameter(
            f"use 'member', 'leader' or a node id (node-{0:0{width}d}..node-{nodes - 1})",
            param_hint="--kill",
        )
    runner = Demo(
        nodes=nodes,
        min_nodes=min_nodes,
        lease_ttl=lease_ttl,
        last_call=last_call,
        kill=kill_spec,
        fast_quorum=fast_quorum,
        binary=binary,
        timeout=timeout,
    )
    try:
        runner.run()
    except EtcdRendezvousError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        click.echo("interrupted: the nodes and etcd are stopped", err=True)
        raise SystemExit(130) from None


__all__ = ["Demo", "DemoError", "demo"]
