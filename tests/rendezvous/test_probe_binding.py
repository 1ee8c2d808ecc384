"""Where the probe listener listens: the published address when it is this machine's
(a single-host job on 127.0.0.1 is not reachable from the network), every interface
only for a host name or an address this machine lacks. Real sockets, no etcd."""

from __future__ import annotations

import socket

import pytest

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.rendezvous import Rendezvous, _probe


def _sockname(listener: _probe.Listener) -> str:
    return str(listener._sock.getsockname()[0])


def _outbound_address() -> str | None:
    """A non-loopback IPv4 address of this machine, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # no packet is sent for UDP connect
        except OSError:
            return None
        address = str(sock.getsockname()[0])
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.mark.parametrize(
    ("host", "bind"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("localhost", "127.0.0.1"),
        ("[::1]", "::1"),
        ("10.1.2.3", "10.1.2.3"),
        ("node-7.example", None),
        (None, None),
        ("0.0.0.0", None),
    ],
)
def test_bind_address(host: str | None, bind: str | None) -> None:
    assert _probe.bind_address(host) == bind


def test_loopback_probe_host_listens_on_loopback_only() -> None:
    listener = _probe.listener("127.0.0.1")
    assert _sockname(listener) == "127.0.0.1"
    assert listener is _probe.listener("127.0.0.1"), "one listener per bind address"
    assert _probe.Prober(timeout=2).check(listener.address("127.0.0.1")) is _probe.Verdict.ALIVE
    outside = _outbound_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback address to probe from")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((outside, listener.port), timeout=2).close()


def test_a_host_name_listens_on_every_interface() -> None:
    assert _sockname(_probe.listener("node-7.example")) in ("::", "0.0.0.0")


def test_an_address_not_on_this_machine_falls_back_to_every_interface() -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface: e.g. an address published through NAT.
    assert _sockname(_probe.listener("192.0.2.1")) in ("::", "0.0.0.0")


def test_a_rendezvous_on_loopback_publishes_a_loopback_only_listener(
    etcd_client: EtcdClient,
) -> None:
    rdzv = Rendezvous(etcd_client, "probe-bind", 1, 1, probe_host="127.0.0.1")
    _, host, port = _probe.parse_probe(rdzv.probe)
    assert (host, port) == ("127.0.0.1", _probe.listener("127.0.0.1").port)
    assert _sockname(_probe.listener("127.0.0.1")) == "127.0.0.1"
