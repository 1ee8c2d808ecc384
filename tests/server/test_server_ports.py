"""find_free_port: torch's contract (try every address, RuntimeError when none binds)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from etcd_rendezvous.errors import EtcdServerError
from etcd_rendezvous.server import find_free_port
from etcd_rendezvous.server._ports import NoFreePortError

# An address family no kernel has: socket() fails with EAFNOSUPPORT.
_NO_SUCH_FAMILY = 4000

_real_getaddrinfo = socket.getaddrinfo


def _unusable_first(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
    real = _real_getaddrinfo(host, port, *args, **kwargs)
    return [(_NO_SUCH_FAMILY, socket.SOCK_STREAM, 0, "", ("bogus", 0)), *real]


def _only_unusable(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
    return [(_NO_SUCH_FAMILY, socket.SOCK_STREAM, 0, "", ("bogus", 0))]


def test_unusable_address_family_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _unusable_first)
    sock = find_free_port()
    try:
        assert sock.family == socket.AF_INET
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


def test_nothing_binds_raises_runtime_error_like_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _only_unusable)
    with pytest.raises(RuntimeError, match=r"could not bind a free port on '127\.0\.0\.1'.*socket"):
        find_free_port()


def test_address_not_on_this_machine_raises_runtime_error() -> None:
    # 192.0.2.1 (TEST-NET-1) is on no local interface: bind() fails.
    with pytest.raises(NoFreePortError, match=r"192\.0\.2\.1.*assign") as info:
        find_free_port("192.0.2.1")
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value, EtcdServerError), "still under the package's root error"


def test_unresolvable_host_raises_runtime_error() -> None:
    with pytest.raises(NoFreePortError, match=r"nosuchhost\.invalid"):
        find_free_port("nosuchhost.invalid")
