"""EtcdServer on real etcd: context manager, data dirs, ports, restarts, threads."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _server_http import get, healthy, put

from etcd_rendezvous.errors import EtcdServerError, EtcdStartError
from etcd_rendezvous.server import EtcdServer, _ports, _tempdirs, find_free_port
from etcd_rendezvous.server import server as server_module


@pytest.fixture
def bound_port() -> Iterator[int]:
    """A port bound (not listening) by us: etcd cannot bind it, a connect is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def test_context_manager(etcd_binary: str) -> None:
    with EtcdServer(binary=etcd_binary) as server:
        assert healthy(server.url)
        pid = server.pid
        workdir_data = server.data_dir
        assert server.version[0] == "3"
        assert server.url == f"http://{server.endpoint}"
    assert pid is not None
    assert not server.is_running
    assert workdir_data is not None and not os.path.exists(workdir_data)


def test_data_dir_with_spaces_is_user_owned_and_survives_restart(
    etcd_binary: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "my etcd data" / "with spaces"
    with EtcdServer(data_dir, binary=etcd_binary) as server:
        assert server.data_dir == str(data_dir)
        put(server.url, b"survivor", b"still here")
    assert (data_dir / "member").is_dir(), "stop() must keep a data dir the user passed"
    with EtcdServer(str(data_dir), binary=etcd_binary) as server:
        assert get(server.url, b"survivor") == b"still here"
    assert data_dir.is_dir()


def test_restart_keeps_endpoint_and_data(etcd_binary: str) -> None:
    with EtcdServer(binary=etcd_binary) as server:
        put(server.url, b"k", b"v1")
        endpoint, pid = server.endpoint, server.pid
        server.restart()
        assert server.endpoint == endpoint
        assert server.pid != pid
        assert get(server.url, b"k") == b"v1"
        server.kill()
        assert not server.is_running
        server.restart()
        assert get(server.url, b"k") == b"v1"


def test_start_twice_is_an_error_and_stop_then_start_works(etcd_binary: str) -> None:
    server = EtcdServer(binary=etcd_binary)
    try:
        server.start()
        with pytest.raises(EtcdServerError, match="already running"):
            server.start()
        server.stop()
        server.stop()
        server.start()
        assert healthy(server.url)
    finally:
        server.stop()


def test_requested_port_already_listening(etcd_binary: str) -> None:
    sock = find_free_port()
    try:
        port = sock.getsockname()[1]
        server = EtcdServer(binary=etcd_binary, port=port)
        with pytest.raises(
            EtcdStartError,
            match=f"port {port}.*is already in use by a program that does not answer HTTP",
        ):
            server.start()
        assert server.data_dir is None, "the temporary dir is removed after a failed start"
    finally:
        sock.close()


def test_requested_port_taken_fails_with_etcd_log(etcd_binary: str, bound_port: int) -> None:
    server = EtcdServer(binary=etcd_binary, port=bound_port)
    with pytest.raises(EtcdStartError, match="already in use") as info:
        server.start(timeout=30)
    assert info.value.returncode not in (None, 0)
    assert "address already in use" in info.value.log_tail
    assert not server.is_running


def test_port_taken_after_choosing_it_is_retried(
    etcd_binary: str, bound_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """find_free_port() races with another process: etcd's bind fails, we retry."""
    real_free_ports = _ports.free_ports
    calls: list[int] = []

    def racy_free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
        calls.append(count)
        ports = real_free_ports(count, host)
        if len(calls) == 1:
            ports[0] = bound_port  # the client port got taken meanwhile
        return ports

    monkeypatch.setattr(server_module, "free_ports", racy_free_ports)
    with EtcdServer(binary=etcd_binary) as server:
        assert len(calls) == 2
        assert server.get_port() != bound_port
        assert healthy(server.url)


def test_torch_stderr_argument(etcd_binary: str, tmp_path: Path) -> None:
    server = EtcdServer(binary=etcd_binary)
    with open(tmp_path / "stderr.log", "wb") as stderr:
        server.start(stderr=stderr)
    try:
        assert healthy(server.url)
    finally:
        server.stop()
    assert (tmp_path / "stderr.log").stat().st_size > 0


def test_log_file_option(etcd_binary: str, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "etcd log.txt"
    log_file.parent.mkdir()
    with EtcdServer(binary=etcd_binary, log_file=log_file) as server:
        assert server.log_file == str(log_file)
    assert log_file.stat().st_size > 0, "a user log file is kept"


def test_server_started_in_a_short_lived_thread_survives_the_thread(etcd_binary: str) -> None:
    """PR_SET_PDEATHSIG fires when the forking *thread* exits: we fork on a long-lived one."""
    server = EtcdServer(binary=etcd_binary)
    thread = threading.Thread(target=server.start)
    thread.start()
    thread.join(60)
    try:
        assert server.is_running
        # Give a (wrongly) delivered parent-death signal time to act.
        assert server.process is not None
        with pytest.raises(subprocess.TimeoutExpired):
            server.process.popen.wait(timeout=0.3)
        assert healthy(server.url)
    finally:
        server.stop()


# --- temporary dirs left by dead owners -----------------------------------------------------


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def _dead_owner() -> _tempdirs.Owner:
    """The identity of a process that has exited (and was reaped)."""
    proc = subprocess.Popen(["sleep", "30"])
    start = _tempdirs.process_start_time(proc.pid)
    proc.kill()
    proc.wait()
    here = _tempdirs.current_owner()
    return _tempdirs.Owner(proc.pid, start, here.boot_id, here.pid_namespace, here.host)


def _fake_dir(root: Path, name: str, owner: _tempdirs.Owner | None) -> Path:
    path = root / name
    (path / "data" / "member" / "wal").mkdir(parents=True)
    (path / "data" / "member" / "wal" / "0.tmp").write_bytes(b"\0" * 1024)
    if owner is not None:
        _tempdirs.write_owner(str(path), owner)
    return path


def test_stale_dir_rules(temp_root: Path) -> None:
    here = _tempdirs.current_owner()
    dead = _dead_owner()
    assert _tempdirs.owner_is_dead(dead)
    assert not _tempdirs.owner_is_dead(here)
    stale = _fake_dir(temp_root, "etcd-rendezvous-dead0001", dead)
    stale_cluster = _fake_dir(temp_root, "etcd-rendezvous-cluster-dead0002", dead)
    pid_reused = _fake_dir(
        temp_root,
        "etcd-rendezvous-reused01",
        _tempdirs.Owner(
            here.pid, (here.start_time or 0) + 1, here.boot_id, here.pid_namespace, here.host
        ),
    )
    rebooted = _fake_dir(
        temp_root,
        "etcd-rendezvous-reboot01",
        _tempdirs.Owner(here.pid, here.start_time, "another-boot", None, here.host),
    )
    kept = {
        "alive": _fake_dir(temp_root, "etcd-rendezvous-alive001", here),
        "no marker": _fake_dir(temp_root, "etcd-rendezvous-nomarker", None),
        "other container": _fake_dir(
            temp_root,
            "etcd-rendezvous-otherns1",
            _tempdirs.Owner(dead.pid, dead.start_time, dead.boot_id, "pid:[1]", dead.host),
        ),
        "other host": _fake_dir(
            temp_root,
            "etcd-rendezvous-otherhst",
            _tempdirs.Owner(dead.pid, dead.start_time, dead.boot_id, dead.pid_namespace, "h2"),
        ),
        "not ours": _fake_dir(temp_root, "unrelated-dir", dead),
    }
    (temp_root / "etcd-rendezvous-corrupt1").mkdir()
    (temp_root / "etcd-rendezvous-corrupt1" / _tempdirs.OWNER_FILE).write_text("{nope")
    in_use = _fake_dir(temp_root, "etcd-rendezvous-inuse001", dead)
    script = "import time; time.sleep(30)"
    user = subprocess.Popen([sys.executable, "-c", script, "--data-dir", str(in_use / "data")])
    try:
        removed = _tempdirs.remove_stale_dirs(str(temp_root))
    finally:
        user.kill()
        user.wait()
    assert sorted(removed) == sorted(map(str, [stale, stale_cluster, pid_reused, rebooted]))
    for path in (stale, stale_cluster, pid_reused, rebooted):
        assert not path.exists()
    for why, path in kept.items():
        assert path.is_dir(), f"a dir with {why} must be kept"
    assert (temp_root / "etcd-rendezvous-corrupt1").is_dir()
    assert in_use.is_dir(), "a dir that a running process (an orphaned etcd) uses must be kept"
    assert _tempdirs.remove_stale_dirs(str(temp_root)) == [str(in_use)]


def test_user_data_dir_in_the_temp_root_is_never_removed(etcd_binary: str, temp_root: Path) -> None:
    user_dir = temp_root / "etcd-rendezvous-mine"
    with EtcdServer(user_dir, binary=etcd_binary) as server:
        put(server.url, b"k", b"v")
        assert not (user_dir / _tempdirs.OWNER_FILE).exists()
    with EtcdServer(binary=etcd_binary):
        pass
    assert _tempdirs.remove_stale_dirs(str(temp_root)) == []
    assert user_dir.is_dir() and any(user_dir.iterdir())


def test_a_removal_cut_short_is_finished_by_the_next_start(
    etcd_binary: str, temp_root: Path
) -> None:
    stale = _fake_dir(temp_root, "etcd-rendezvous-halfgone", _dead_owner())
    (stale / "data" / "member" / "wal" / "0.tmp").unlink()  # as if rmtree stopped halfway
    with EtcdServer(binary=etcd_binary):
        assert not stale.exists()
