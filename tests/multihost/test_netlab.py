"""The test bed itself: addresses, names, real faults, and nothing left behind."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from multihost import netlab
from multihost.checker import Violation, check_rounds
from multihost.netlab import Lab, LabError, clean_stale, leftovers

LISTEN = """
import socket, sys
s = socket.create_server(("0.0.0.0", 0))
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"hello")
    c.close()
"""


def connect(address: str, port: int, timeout: float = 1.0) -> bytes | str:
    try:
        with socket.create_connection((address, port), timeout=timeout) as conn:
            return conn.recv(5)
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"


def test_hosts_have_their_addresses_names_and_real_faults(
    make_lab: Callable[[list[str]], Lab],
) -> None:
    lab = make_lab(["alpha", "beta"])
    alpha, beta = lab["alpha"], lab["beta"]
    assert alpha.address != beta.address
    assert beta.run(["hostname"]).strip() == "beta"
    assert beta.run(["getent", "hosts", "alpha"]).split()[0] == alpha.address
    server = alpha.spawn([sys.executable, "-c", LISTEN], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    port = int(server.stdout.readline())
    # from the other host, by name, and from the test's own namespace
    dial = f"import socket; print(socket.create_connection(('alpha', {port}), 2).recv(5))"
    got = beta.run([sys.executable, "-c", dial])
    assert got.strip() == "b'hello'"
    assert connect(alpha.address, port) == b"hello"
    alpha.partition()
    assert connect(alpha.address, port) == "timeout"  # dropped, not refused
    alpha.heal()
    assert connect(alpha.address, port, timeout=5.0) == b"hello"
    shell = "setsid sleep 300 & echo forked; exec sleep 300"  # one in another session
    grandchild = alpha.spawn(["sh", "-c", shell], stdout=subprocess.PIPE, text=True)
    assert grandchild.stdout is not None and grandchild.stdout.readline() == "forked\n"
    assert len(alpha.pids()) >= 3
    alpha.kill()  # every process in the namespace, other sessions included
    assert alpha.pids() == [] and server.poll() == -signal.SIGKILL and grandchild.poll() is not None
    assert connect(alpha.address, port) == "refused"  # the kernel is still there
    assert beta.pids() == []
    alpha.resolve("beta", "127.0.1.1")
    assert alpha.run(["getent", "hosts", "beta"]).split()[0] == "127.0.1.1"


def test_a_dead_owners_lab_is_cleaned_up(netns_available: None) -> None:
    """A lab whose process was SIGKILLed (no finalizer ran) is removed by the next one."""
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1])\n"
        "from multihost.netlab import Lab\n"
        "lab = Lab(['x', 'y']); lab.open()\n"
        "lab['x'].spawn(['sleep', '300'])\n"
        "print(lab.prefix, flush=True); time.sleep(300)\n"
    )
    tests_dir = str(Path(__file__).resolve().parent.parent)
    owner = subprocess.Popen(
        [sys.executable, "-c", code, tests_dir], stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None
    prefix = owner.stdout.readline().strip()
    assert prefix and leftovers(prefix)
    owner.kill()
    owner.wait(10)
    assert leftovers(prefix), "nothing ran at the owner's death"
    removed = clean_stale()
    assert leftovers(prefix) == [], removed


def test_a_lab_needs_distinct_names() -> None:
    with pytest.raises(LabError, match="distinct host names"):
        Lab(["a", "a"])


def line(node: str, round_: int, members: list[str]) -> dict[str, object]:
    rank = members.index(node) if node in members else 0
    return {"event": "assigned", "node": node, "round": round_, "rank": rank,
            "world_size": len(members), "members": members}  # fmt: skip


def test_the_checker_accepts_a_good_history() -> None:
    rounds = check_rounds({
        "b": [line("b", 1, ["b", "c", "d"]), line("b", 2, ["b", "c"]),
              line("b", 3, ["b", "c", "d"])],
        "c": [line("c", 1, ["b", "c", "d"]), line("c", 3, ["b", "c", "d"])],
        "d": [line("d", 1, ["b", "c", "d"]), line("d", 3, ["b", "c", "d"])],
    })  # fmt: skip
    assert rounds == {1: ("b", "c", "d"), 2: ("b", "c"), 3: ("b", "c", "d")}


@pytest.mark.parametrize(
    ("history", "what"),
    [
        ({"b": [line("b", 1, ["b", "c"])], "c": [line("c", 1, ["c", "b"])]}, "saw members"),
        ({"b": [line("b", 2, ["b"]), line("b", 1, ["b"])]}, "after round 2"),
        ({"b": [line("b", 1, ["b", "b"])]}, "a member twice"),
        ({"b": [{**line("b", 1, ["b", "c"]), "rank": 1}]}, "not its place"),
        ({"b": [line("c", 1, ["b", "c"])]}, "another node's"),
    ],
    ids=["two-outcomes", "overlap", "rank-twice", "wrong-rank", "foreign-line"],
)
def test_the_checker_catches(history: dict[str, list[dict[str, object]]], what: str) -> None:
    with pytest.raises(Violation, match=what):
        check_rounds(history)


def test_why_a_lab_cannot_be_built_is_said(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reason the fixtures skip with (not root; no iproute2)."""
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert "needs root" in (netlab.unavailable() or "")
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "apt-get install -y iproute2" in (netlab.unavailable() or "")
