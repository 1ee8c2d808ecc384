"""Liveness probes (``_probe.py``): real sockets and real processes, no etcd."""

from __future__ import annotations

import functools
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from proc_state import wait_state

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.rendezvous import Rendezvous, _probe
from etcd_rendezvous.rendezvous._probe import Listener, Prober, Verdict
from etcd_rendezvous.rendezvous._records import LeaderRecord, NodeRecord, decode, encode

HOLDER = """
import sys, time
from etcd_rendezvous.rendezvous import _probe
print(_probe.listener().address("127.0.0.1"), flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A process whose probe listener answers at the address it printed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc, proc.stdout.readline().strip()
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)
    assert proc.poll() is not None


def test_address_format_round_trips() -> None:
    assert _probe.parse_probe(_probe.format_probe("t0", "host.example", 80)) == (
        "t0",
        "host.example",
        80,
    )
    assert _probe.format_probe("t", "::1", 9) == "t@[::1]:9"
    assert _probe.parse_probe("t@[::1]:9") == ("t", "::1", 9)


@pytest.mark.parametrize("bad", ["", "host:1", "t@host", "t@host:x", "t@:1", "@h:1", "t@h:0"])
def test_a_malformed_address_is_refused_and_gives_no_verdict(bad: str) -> None:
    with pytest.raises(ValueError, match="malformed probe address"):
        _probe.parse_probe(bad)
    assert Prober(timeout=0.5).check(bad) is Verdict.UNKNOWN


def test_alive_then_gone_once_the_listener_is_closed() -> None:
    listener, prober = Listener(), Prober(timeout=1.0)
    probe = listener.address("127.0.0.1")
    assert prober.check(probe) is Verdict.ALIVE
    listener.close()
    assert prober.check(probe) is Verdict.GONE


def test_refused_at_an_address_never_verified_is_no_verdict() -> None:
    """A refusal proves nothing about an address that never answered us (a firewall, or
    a host name that means another machine here): the lease decides."""
    listener = Listener()
    probe = listener.address("127.0.0.1")
    listener.close()
    assert Prober(timeout=1.0).check(probe) is Verdict.UNKNOWN


def test_a_stranger_on_the_port_is_no_verdict() -> None:
    listener, prober = Listener(), Prober(timeout=1.0)
    forged = _probe.format_probe("someone-else", "127.0.0.1", listener.port)
    assert prober.check(forged) is Verdict.UNKNOWN
    listener.close()
    assert prober.check(forged) is Verdict.UNKNOWN  # never verified


def test_learn_verifies_in_the_background() -> None:
    listener, prober = Listener(), Prober(timeout=1.0)
    probe = listener.address("127.0.0.1")
    prober.learn(probe)
    deadline = time.monotonic() + 10.0
    while not prober.verified(probe):
        assert time.monotonic() < deadline, "never verified"
        time.sleep(0.01)
    listener.close()


def test_a_paused_process_is_not_gone_a_killed_one_is(
    holder: tuple[subprocess.Popen[str], str],
) -> None:
    proc, probe = holder
    prober = Prober(timeout=0.5)
    assert prober.check(probe) is Verdict.ALIVE
    proc.send_signal(signal.SIGSTOP)  # the kernel still accepts; nobody answers
    wait_state(proc.pid, "T")
    assert prober.check(probe) is Verdict.UNKNOWN
    proc.send_signal(signal.SIGCONT)
    assert prober.check(probe) is Verdict.ALIVE
    proc.kill()
    proc.wait(10)
    assert prober.check(probe) is Verdict.GONE


def test_submit_calls_back_with_the_verdict() -> None:
    listener, prober = Listener(), Prober(timeout=1.0)
    got: list[Verdict] = []
    prober.submit(listener.address("127.0.0.1"), got.append)
    deadline = time.monotonic() + 10.0
    while not got:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert got == [Verdict.ALIVE]
    listener.close()


def test_one_listener_per_process() -> None:
    assert _probe.listener() is _probe.listener()
    with socket.create_connection(("127.0.0.1", _probe.listener().port), timeout=5) as conn:
        conn.settimeout(5)
        assert conn.recv(64).decode() == _probe.listener().token


def test_records_carry_the_probe_address_and_older_records_have_none() -> None:
    node = NodeRecord("n1", seen=2, probe="t@h:1")
    assert decode(encode(node), key="k") == node
    leader = LeaderRecord("n1", probe="t@h:1")
    assert decode(encode(leader), key="k") == leader
    old = b'{"format":1,"kind":"node","node":"n1","seen":0,"data":{}}'
    assert decode(old, key="k") == NodeRecord("n1", seen=0)


def test_no_port_to_listen_on_means_no_probes_not_a_failure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, etcd_client: EtcdClient
) -> None:
    def refuse() -> socket.socket:
        raise PermissionError("listening is not allowed here")

    monkeypatch.setattr(_probe, "_listening_socket", refuse)
    monkeypatch.setattr(_probe, "_listener_of", functools.cache(_probe._listener_of.__wrapped__))
    rdzv = Rendezvous(etcd_client, "no-probe-port", 1, 1)
    assert rdzv.probe == "" and rdzv.config.probe == ""
    assert "no liveness probes (listening is not allowed here)" in caplog.text
