"""``etcd-rendezvous rdzv`` (list, show, watch, close) and ``demo``, against real etcd.

Engine nodes run in threads of this process; ``watch`` and ``demo`` run as
subprocesses (they stop on SIGINT / by themselves) and must leave nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import pytest
from click.testing import CliRunner, Result

from etcd_rendezvous.cli import main
from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.rendezvous import (
    ChangeKind,
    Rendezvous,
    RendezvousClosedError,
    RendezvousLeftError,
)
from etcd_rendezvous.server import EtcdServer

CLI = [sys.executable, "-m", "etcd_rendezvous"]
LINE_TIMEOUT = 15.0


@pytest.fixture
def prefix(key_prefix: str) -> str:
    """A fresh key prefix for this test's runs (the suite's ``key_prefix``, deleted after)."""
    return key_prefix


@pytest.fixture
def client(etcd_server: EtcdServer) -> Iterator[EtcdClient]:
    with EtcdClient(etcd_server.endpoint) as c:
        yield c


class Nodes:
    """Engine nodes in threads; every node leaves at the end of the test."""

    def __init__(self, client: EtcdClient, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.all: list[Rendezvous] = []

    def make(self, run_id: str, node_id: str, min_nodes: int, max_nodes: int) -> Rendezvous:
        node = Rendezvous(
            self.client,
            run_id,
            min_nodes,
            max_nodes,
            node_id=node_id,
            node_data={"addr": f"10.0.0.{len(self.all)}:29500"},
            last_call_timeout=0.2,
            lease_ttl=5,
            key_prefix=self.prefix,
        )
        self.all.append(node)
        return node

    def rendezvous(
        self,
        run_id: str,
        count: int,
        *,
        min_nodes: int | None = None,
        max_nodes: int | None = None,
    ) -> list[Rendezvous]:
        """``count`` nodes join round 1 together (min = max = count unless given)."""
        nodes = [
            self.make(run_id, f"node-{i}", min_nodes or count, max_nodes or count)
            for i in range(count)
        ]
        errors: list[BaseException] = []

        def join(node: Rendezvous) -> None:
            try:
                node.join(timeout=20)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=join, args=(n,)) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors
        return nodes

    def leave_all(self) -> None:
        for node in self.all:
            node.leave()


@pytest.fixture
def nodes(client: EtcdClient, prefix: str) -> Iterator[Nodes]:
    n = Nodes(client, prefix)
    yield n
    n.leave_all()


def rdzv(endpoint: str, prefix: str, *args: str) -> Result:
    return CliRunner().invoke(
        main, ["rdzv", *args, "--endpoints", endpoint, "--key-prefix", prefix]
    )


def wait_change(node: Rendezvous, kind: ChangeKind, **match: Any) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        change = node.wait_for_change(timeout=deadline - time.monotonic())
        if (
            change is not None
            and change.kind is kind
            and all(getattr(change, k) == v for k, v in match.items())
        ):
            return
    pytest.fail(f"no {kind} change matching {match}")


# --- list / show ---------------------------------------------------------------------


def test_list_and_show_after_a_real_rendezvous(
    etcd_server: EtcdServer, prefix: str, nodes: Nodes
) -> None:
    members = nodes.rendezvous("job-a", 3)
    # A fourth node while round 1 is full: a hot spare.
    spare = nodes.make("job-a", "late", 3, 3)
    threading.Thread(target=lambda: _join_quietly(spare), daemon=True).start()
    wait_change(members[0], ChangeKind.MEMBERSHIP, spares=1)
    nodes.rendezvous("job-b", 1)

    result = rdzv(etcd_server.endpoint, prefix, "list", "--json")
    assert result.exit_code == 0, result.output
    runs = {r["run_id"]: r for r in json.loads(result.stdout)}
    assert set(runs) == {"job-a", "job-b"}
    assert runs["job-a"]["round"] == 1
    assert runs["job-a"]["state"] == "running"
    assert runs["job-a"]["members"] == 3
    assert runs["job-a"]["spares"] == 1
    assert runs["job-b"]["members"] == 1

    text = rdzv(etcd_server.endpoint, prefix, "list")
    assert text.exit_code == 0, text.output
    assert re.search(r"job-a\s+1\s+running\s+3\s+4", text.stdout), text.stdout

    shown = rdzv(etcd_server.endpoint, prefix, "show", "job-a", "--json")
    assert shown.exit_code == 0, shown.output
    snap = json.loads(shown.stdout)
    assert snap["state"] == "running"
    assert snap["round"] == 1
    assert [m["rank"] for m in snap["members"]] == [0, 1, 2]
    assert [m["node"] for m in snap["members"]] == ["node-0", "node-1", "node-2"]
    assert all(m["data"]["addr"].endswith(":29500") for m in snap["members"])
    assert all(0 < m["lease_ttl"] <= 5 for m in snap["members"])
    assert snap["spares"] == ["late"]
    assert snap["waiting"] == []
    assert snap["committed"]["reason"] == "first round; max_nodes reached"
    assert snap["committed"]["causes"] == ["first_round"]
    assert snap["problems"] == []

    text = rdzv(etcd_server.endpoint, prefix, "show", "job-a")
    assert text.exit_code == 0, text.output
    for expected in ("state:     running", "RANK", "node-2", "addr=10.0.0.", "late (lease"):
        assert expected in text.stdout


def _join_quietly(node: Rendezvous) -> None:
    with contextlib.suppress(RendezvousClosedError, RendezvousLeftError):
        node.join(timeout=30)  # until closed by the test, or left at its end


def test_show_lists_lost_members_and_the_wait_list(
    etcd_server: EtcdServer, prefix: str, nodes: Nodes
) -> None:
    members = nodes.rendezvous("job", 3, max_nodes=4)
    late = nodes.make("job", "late", 3, 4)
    threading.Thread(target=lambda: _join_quietly(late), daemon=True).start()
    wait_change(members[0], ChangeKind.MEMBERSHIP, waiting=1)
    members[2].leave()
    wait_change(members[0], ChangeKind.MEMBERSHIP, lost=("node-2",))
    snap = json.loads(rdzv(etcd_server.endpoint, prefix, "show", "job", "--json").stdout)
    assert snap["lost"] == ["node-2"]
    assert snap["members"][2] == {
        "rank": 2,
        "node": "node-2",
        "state": "lost",
        "data": {"addr": "10.0.0.2:29500"},
        "lease_ttl": None,
    }
    assert snap["waiting"] == ["late"]


# --- close ----------------------------------------------------------------------------


def test_close_makes_joins_fail(
    etcd_server: EtcdServer, prefix: str, nodes: Nodes, client: EtcdClient
) -> None:
    members = nodes.rendezvous("job", 2)
    result = rdzv(etcd_server.endpoint, prefix, "close", "job")
    assert result.exit_code == 0, result.output
    assert "closed rendezvous job" in result.stdout
    for member in members:
        wait_change(member, ChangeKind.CLOSED)
        assert member.is_closed()
    newcomer = nodes.make("job", "newcomer", 2, 2)
    with pytest.raises(RendezvousClosedError):
        newcomer.join(timeout=10)
    with pytest.raises(RendezvousClosedError):
        members[0].join(timeout=10)

    again = rdzv(etcd_server.endpoint, prefix, "close", "job")
    assert again.exit_code == 0, again.output
    assert "already closed by cli@" in again.stdout
    shown = json.loads(rdzv(etcd_server.endpoint, prefix, "show", "job", "--json").stdout)
    assert shown["state"] == "closed"
    assert shown["closed"]["by"].startswith("cli@")


def test_close_of_an_unknown_run_needs_force(etcd_server: EtcdServer, prefix: str) -> None:
    result = rdzv(etcd_server.endpoint, prefix, "close", "later")
    assert result.exit_code == 1
    assert "no rendezvous 'later'" in result.stderr
    assert "To close it anyway (every later join of 'later' then fails), pass --force" in (
        result.stderr
    )
    forced = rdzv(etcd_server.endpoint, prefix, "close", "later", "--force")
    assert forced.exit_code == 0, forced.output
    with EtcdClient(etcd_server.endpoint) as c:
        node = Rendezvous(c, "later", 1, 1, key_prefix=prefix, lease_ttl=5)
        with pytest.raises(RendezvousClosedError):
            node.join(timeout=10)
        node.leave()


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["show", "watch", "close"])
def test_unknown_run_id(etcd_server: EtcdServer, prefix: str, command: str) -> None:
    result = rdzv(etcd_server.endpoint, prefix, command, "no-such-run")
    assert result.exit_code == 1
    assert "no rendezvous 'no-such-run'" in result.stderr
    assert "rdzv list" in result.stderr
    assert "Traceback" not in result.output


def test_list_of_an_empty_prefix(etcd_server: EtcdServer, prefix: str) -> None:
    result = rdzv(etcd_server.endpoint, prefix, "list")
    assert result.exit_code == 0, result.output
    assert "no rendezvous runs" in result.stdout


def test_corrupt_json_names_the_key(
    etcd_server: EtcdServer, prefix: str, nodes: Nodes, client: EtcdClient
) -> None:
    nodes.rendezvous("job", 1)
    bad_key = f"{prefix}/broken/ctl/round"
    client.put(bad_key, b"{not json")
    client.put(f"{prefix}/broken/nodes/x", json.dumps({"format": 99, "kind": "node"}))

    shown = rdzv(etcd_server.endpoint, prefix, "show", "broken")
    assert shown.exit_code == 1
    assert bad_key in shown.stderr
    assert "not JSON" in shown.stderr
    assert f"{prefix}/broken/nodes/x" in shown.stderr
    assert "format 99" in shown.stderr
    assert "state:     invalid" in shown.stdout
    assert "Traceback" not in shown.output

    listed = rdzv(etcd_server.endpoint, prefix, "list", "--json")
    assert listed.exit_code == 0, listed.output
    runs = {r["run_id"]: r for r in json.loads(listed.stdout)}
    assert runs["job"]["state"] == "running"  # the healthy run next to it is unaffected
    assert runs["broken"]["state"] == "invalid"
    assert bad_key in listed.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "args", [["list"], ["show", "job"], ["watch", "job"], ["close", "job", "--force"]]
)
def test_unreachable_endpoint(args: list[str]) -> None:
    endpoint = f"127.0.0.1:{_free_port()}"
    result = CliRunner().invoke(main, ["rdzv", *args, "--endpoints", endpoint])
    assert result.exit_code == 1
    assert "no etcd endpoint reachable" in result.stderr
    assert endpoint in result.stderr
    assert "Traceback" not in result.output


def test_bad_run_id_and_missing_endpoints() -> None:
    bad = CliRunner().invoke(main, ["rdzv", "show", "a/b", "--endpoints", "127.0.0.1:1"])
    assert bad.exit_code == 2
    assert "invalid run id" in bad.stderr
    missing = CliRunner(env={"ETCD_ENDPOINTS": None}).invoke(main, ["rdzv", "list"])
    assert missing.exit_code == 2
    assert "--endpoints" in missing.stderr


# --- watch ----------------------------------------------------------------------------


class Lines:
    """The lines of a subprocess's stream, read with a bounded wait."""

    def __init__(self, stream: IO[str]) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.queue.put(line)
        self.queue.put(None)

    def next(self, timeout: float = LINE_TIMEOUT) -> str:
        try:
            line = self.queue.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no line within {timeout} s")
        if line is None:
            pytest.fail("the stream ended")
        return line

    def until(self, predicate: Any, timeout: float = LINE_TIMEOUT) -> list[dict[str, Any]]:
        """JSON lines up to and including the first one matching ``predicate``."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            event = json.loads(self.next(max(0.01, deadline - time.monotonic())))
            seen.append(event)
            if predicate(event):
                return seen


def _watch(endpoint: str, prefix: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "rdzv", "watch", *args, "--endpoints", endpoint, "--key-prefix", prefix],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as at a terminal, even when this suite runs in the background with
        # SIGINT ignored (a background job of a non-interactive shell): the child
        # would inherit the ignore and never see the SIGINT this test sends.
        preexec_fn=_default_sigint,  # noqa: PLW1509 (one signal() call, no lock taken)
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("watch did not stop on SIGINT")
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return err


def test_watch_prints_events(
    etcd_server: EtcdServer, prefix: str, nodes: Nodes, client: EtcdClient
) -> None:
    proc = _watch(etcd_server.endpoint, prefix, "job", "--json", "--wait")
    try:
        assert proc.stdout is not None
        lines = Lines(proc.stdout)
        first = json.loads(lines.next())
        assert first["event"] == "snapshot"
        assert "not started yet" in first["message"]

        members = nodes.rendezvous("job", 3, min_nodes=2)
        seen = lines.until(lambda e: e["event"] == "round")
        joined = {e["node"] for e in seen if e["event"] == "joined"}
        assert joined == {"node-0", "node-1", "node-2"}
        assert any(e["event"] == "leader" for e in seen)
        round_event = seen[-1]
        assert round_event["round"] == 1
        assert round_event["members"] == ["node-0", "node-1", "node-2"]
        assert round_event["reason"] == "first round; max_nodes reached"
        assert round_event["causes"] == ["first_round"]
        assert "time" in round_event and "run_id" in round_event

        members[1].leave()
        seen = lines.until(lambda e: e["event"] == "status")
        status = seen[-1]
        assert status["lost"] == status["left"] == ["node-1"]  # a clean leave
        while [e["message"] for e in seen if e["event"] == "left"] != [
            "node node-1 leaves",
            "node node-1 left",
        ]:  # the mark, then the key's deletion (a leaving leader reports first)
            seen += lines.until(lambda e: e["event"] == "left")
        assert not any(e["event"] == "lost" for e in seen)

        # the survivors re-rendezvous: rejoined, then round 2 with its cause
        rejoins = [
            threading.Thread(target=lambda n=node: _join_quietly(n), daemon=True)
            for node in (members[0], members[2])
        ]
        for thread in rejoins:
            thread.start()
        seen = lines.until(lambda e: e["event"] == "round")
        assert {e["node"] for e in seen if e["event"] == "rejoined"} == {"node-0", "node-2"}
        assert seen[-1]["round"] == 2
        assert seen[-1]["causes"] == ["node_left"]
        assert seen[-1]["completion"] == "fast_quorum"
        for thread in rejoins:
            thread.join(timeout=10)

        # (the engine nodes stop on this foreign key; the watch reports it and goes on)

        client.put(f"{prefix}/job/ctl/whatever", b"\x80garbage")
        problem = lines.until(lambda e: e["event"] == "problem")[-1]
        assert problem["key"] == f"{prefix}/job/ctl/whatever"

        assert rdzv(etcd_server.endpoint, prefix, "close", "job").exit_code == 0
        closed = lines.until(lambda e: e["event"] == "closed")[-1]
        assert closed["by"].startswith("cli@")
    finally:
        if proc.poll() is None:
            _interrupt(proc)
    assert proc.returncode == 0


def test_watch_text_lines_have_timestamps(
    etcd_server: EtcdServer, prefix: str, nodes: Nodes
) -> None:
    members = nodes.rendezvous("job", 2)
    proc = _watch(etcd_server.endpoint, prefix, "job")
    try:
        assert proc.stdout is not None
        lines = Lines(proc.stdout)
        opening = lines.next()
        assert re.match(r"\d\d:\d\d:\d\d\.\d{3}  snapshot +watching 'job'", opening), opening
        assert "round 1" in opening and "0=node-0 1=node-1" in opening
        members[0].leave()
        # (leader and status lines can come first when node-0 led: a leaving leader
        # publishes its status before its own key goes)
        pattern = r"\d\d:\d\d:\d\d\.\d{3}  (\w+) +(.*)"
        while True:
            match = re.match(pattern, lines.next())
            assert match, match
            if match.group(1) not in ("leader", "status"):
                break
        assert match.group(1) == "left"  # leave() is told apart from a lost node
        assert match.group(2) == "node node-0 leaves"
    finally:
        err = _interrupt(proc)
    assert "stopped" in err


# --- demo -----------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    "extra", [["--no-fast-quorum"], ["--kill", "leader"]], ids=["member", "leader"]
)
def test_demo_runs_to_completion(etcd_binary: str, extra: list[str]) -> None:
    started = time.monotonic()
    demo = ["demo", "--nodes", "3", "--lease-ttl", "1", "--last-call", "0.5"]
    result = subprocess.run(
        [*CLI, *demo, "--binary", etcd_binary, *extra],
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert time.monotonic() - started < 30
    assert "round 1 committed: 3 nodes (first round; max_nodes reached)" in out
    killed = re.search(r"killed (node-\d) \(pid (\d+)\) with SIGKILL", out)
    assert killed, out
    victim = killed.group(1)
    assert f"{victim}'s lease expired after" in out
    assert f"lost {victim}" in out
    assert "round 2 committed: 2 nodes" in out
    if "--kill" in extra:  # the default: fast quorum
        assert "every live member of round 1 rejoined" in out
        assert f"etcd: leader {victim} gone" in out
    else:
        assert "lost; last call ended)" in out
    assert "summary:" in out
    # every process the demo started is gone
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", out)]
    assert len(pids) >= 4  # etcd and three nodes
    assert not [p for p in pids if _alive(p)]
