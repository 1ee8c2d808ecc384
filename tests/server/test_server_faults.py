"""Failure paths: missing and broken binaries, SIGTERM-deaf children, dead parents."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _server_http import pid_alive, wait_pid_gone, write_script

from etcd_rendezvous.errors import EtcdBinaryNotFoundError, EtcdStartError
from etcd_rendezvous.server import EtcdCluster, EtcdProcess, EtcdServer, stop_etcd
from etcd_rendezvous.server._tempdirs import remove_stale_dirs

DEAF_TO_SIGTERM = "trap '' TERM\nwhile :; do sleep 0.05; done"


def test_missing_explicit_binary(tmp_path: Path) -> None:
    with pytest.raises(EtcdBinaryNotFoundError, match="does not exist") as info:
        EtcdServer(binary=str(tmp_path / "no-such-etcd"))
    assert "pip install 'etcd-rendezvous[server]'" in str(info.value)


def test_binary_that_exits_at_once(tmp_path: Path) -> None:
    fake = write_script(
        tmp_path / "fake etcd", 'echo "starting up" >&2\necho "fatal: disk on fire" >&2\nexit 3'
    )
    server = EtcdServer(binary=fake)
    started = time.monotonic()
    with pytest.raises(EtcdStartError, match="exited with code 3") as info:
        server.start()
    assert time.monotonic() - started < 5, "a dead child is noticed at once, not at the timeout"
    assert info.value.returncode == 3
    assert "fatal: disk on fire" in info.value.log_tail
    assert "fatal: disk on fire" in str(info.value)
    assert not server.is_running


def test_binary_that_never_gets_ready_times_out_and_is_killed(tmp_path: Path) -> None:
    fake = write_script(tmp_path / "etcd", f"echo $$ > {tmp_path}/pid\n{DEAF_TO_SIGTERM}")
    server = EtcdServer(binary=fake, stop_timeout=0.2)
    with pytest.raises(EtcdStartError, match="not ready"):
        server.start(timeout=0.5)
    pid = int((tmp_path / "pid").read_text())
    assert wait_pid_gone(pid, timeout=5)


def test_stop_etcd_kills_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    fake = write_script(tmp_path / "deaf", DEAF_TO_SIGTERM)
    proc = EtcdProcess.spawn([fake], log_path=str(tmp_path / "log"))
    time.sleep(0.1)  # let the shell install its trap
    started = time.monotonic()
    stop_etcd(proc, timeout=0.3)
    elapsed = time.monotonic() - started
    assert proc.returncode == -signal.SIGKILL
    assert 0.25 < elapsed < 5
    stop_etcd(proc)  # idempotent


def test_stop_etcd_on_a_plain_popen_kills_its_group(tmp_path: Path) -> None:
    """torch's signature: stop_etcd(subprocess.Popen, data_dir); bounded, removes data_dir."""
    fake = write_script(
        tmp_path / "deaf", f"sleep 300 &\necho $! > {tmp_path}/child\n{DEAF_TO_SIGTERM}"
    )
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    popen = subprocess.Popen([fake], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while not (tmp_path / "child").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        grandchild = int((tmp_path / "child").read_text())
        stop_etcd(popen, str(data_dir), timeout=0.3)
        assert popen.returncode is not None
        assert wait_pid_gone(grandchild, timeout=5), "the whole process group is stopped"
        assert not data_dir.exists()
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()


_CHILD_SCRIPT = """
import sys, threading, time
from etcd_rendezvous.server import EtcdCluster, EtcdServer, _process
mode = sys.argv[2]
server = EtcdCluster(1, binary=sys.argv[1]) if mode == "cluster" else EtcdServer(binary=sys.argv[1])
if mode == "prctl":  # the fallback without util-linux setpriv: prctl in preexec_fn
    _process._setpriv_path = lambda: None
if mode == "thread":
    t = threading.Thread(target=server.start)
    t.start()
    t.join()
else:
    server.start()
if mode == "cluster":
    print(server.members[0].pid, server.data_dir, flush=True)
else:
    print(server.pid, server.data_dir, flush=True)
if mode == "exit":
    sys.exit(0)  # no stop(): the atexit backstop must do it
time.sleep(120)
"""


def _run_child(
    etcd_binary: str, mode: str, temp_root: Path | None = None
) -> tuple[subprocess.Popen[str], int, str]:
    env = None if temp_root is None else {**os.environ, "TMPDIR": str(temp_root)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_SCRIPT, etcd_binary, mode],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line, f"child failed: exit code {child.wait(10)}"
    pid, data_dir = line.split(maxsplit=1)
    return child, int(pid), data_dir.strip()


def _our_temp_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("etcd-rendezvous-"))


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private temp root for this test and its children (TMPDIR and tempfile.tempdir)."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    monkeypatch.setenv("TMPDIR", str(root))
    return root


@pytest.mark.parametrize("mode", ["main", "thread", "prctl", "cluster"])
def test_parent_sigkill_leaves_no_etcd_and_the_next_start_removes_its_data(
    etcd_binary: str, mode: str, temp_root: Path
) -> None:
    child, etcd_pid, data_dir = _run_child(etcd_binary, mode, temp_root)
    try:
        assert pid_alive(etcd_pid)
        (stale,) = _our_temp_dirs(temp_root)
        assert data_dir.startswith(str(temp_root / stale))
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert wait_pid_gone(etcd_pid, timeout=10), f"etcd pid {etcd_pid} outlived its parent"
        assert _our_temp_dirs(temp_root) == [stale], "nothing could remove it yet"
        with EtcdServer(binary=etcd_binary) as server:
            assert server.data_dir is not None
            mine = os.path.relpath(server.data_dir, temp_root).split(os.sep)[0]
            left = _our_temp_dirs(temp_root)
            assert left == [mine], f"the dir of the SIGKILLed pid {child.pid} must be removed"
        assert _our_temp_dirs(temp_root) == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if pid_alive(etcd_pid):
            os.kill(etcd_pid, signal.SIGKILL)


def test_a_live_owners_temp_dir_is_kept(etcd_binary: str, temp_root: Path) -> None:
    child, etcd_pid, data_dir = _run_child(etcd_binary, "main", temp_root)
    try:
        (theirs,) = _our_temp_dirs(temp_root)
        with EtcdCluster(1, binary=etcd_binary) as cluster:
            assert cluster.data_dir is not None
            assert theirs in _our_temp_dirs(temp_root)
            assert os.path.isdir(data_dir) and pid_alive(etcd_pid)
        assert _our_temp_dirs(temp_root) == [theirs]
    finally:
        child.kill()
        child.wait()
        if pid_alive(etcd_pid):
            os.kill(etcd_pid, signal.SIGKILL)
    # A process still exiting still uses the dir (its command line names it): wait.
    assert wait_pid_gone(etcd_pid), f"etcd {etcd_pid} still runs after SIGKILL"
    assert remove_stale_dirs(str(temp_root)) == [str(temp_root / theirs)]
    assert _our_temp_dirs(temp_root) == []


def test_atexit_backstop_stops_etcd_and_removes_temp_dir(etcd_binary: str) -> None:
    child, etcd_pid, data_dir = _run_child(etcd_binary, "exit")
    try:
        assert child.wait(30) == 0
        assert not pid_alive(etcd_pid), "the exit handler stops etcd before the interpreter exits"
        assert not os.path.exists(data_dir)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if pid_alive(etcd_pid):
            os.kill(etcd_pid, signal.SIGKILL)


def _not_local_address() -> str:
    address = "192.0.2.1"  # TEST-NET-1: documentation only
    with socket.socket() as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return address
    pytest.skip(f"{address} is an address of this machine")


@pytest.mark.parametrize("kind", ["server", "cluster"])
@pytest.mark.parametrize("host", ["not-local", "nosuchhost.invalid"])
def test_a_host_etcd_cannot_listen_on_is_a_start_error(
    etcd_binary: str, kind: str, host: str
) -> None:
    if host == "not-local":
        host = _not_local_address()
    etcd = (
        EtcdServer(binary=etcd_binary, host=host)
        if kind == "server"
        else EtcdCluster(3, binary=etcd_binary, host=host)
    )
    with pytest.raises(EtcdStartError, match=f"cannot listen on host '{host}'.*127.0.0.1"):
        etcd.start()
    etcd.stop()
    assert etcd.data_dir is None or not os.path.exists(etcd.data_dir)
