"""The CLI against real etcd: serve (one member and a cluster), doctor, status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from click.testing import CliRunner

from etcd_rendezvous.cli import main
from etcd_rendezvous.server import EtcdServer

CLI = [sys.executable, "-m", "etcd_rendezvous"]


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _pid_alive(p)]
        time.sleep(0.02)
    return alive


def _children_etcd_pids(parent: int) -> list[int]:
    """Pids of etcd processes whose parent is ``parent``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if name == "etcd" and ppid == parent:
            found.append(int(entry))
    return found


def _serve(*args: str, etcd_binary: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(
        [*CLI, "serve", "--json", "--binary", etcd_binary, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"serve printed nothing; stderr:\n{err}")
    return proc, json.loads(line)


@pytest.mark.parametrize("members", [1, 3])
def test_serve_prints_endpoints_and_cleans_up_on_sigterm(etcd_binary: str, members: int) -> None:
    proc, info = _serve("--members", str(members), etcd_binary=etcd_binary)
    try:
        assert len(info["endpoints"]) == members
        etcd_pids = _children_etcd_pids(proc.pid)
        assert len(etcd_pids) == members
        from etcd_rendezvous.client import EtcdClient

        with EtcdClient(info["endpoints"]) as client:
            client.put(b"k", b"v")
            kv = client.get(b"k")
            assert kv is not None and kv.value == b"v"
        data_dir = info["data_dir"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert _wait_gone(etcd_pids) == []
        assert not os.path.exists(data_dir), "a temporary data dir must be removed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_serve_keeps_user_data_dir(etcd_binary: str, tmp_path: Any) -> None:
    data_dir = tmp_path / "my data"
    proc, _ = _serve("--data-dir", str(data_dir), etcd_binary=etcd_binary)
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert data_dir.is_dir() and any(data_dir.iterdir())


def test_serve_human_output_has_export_line(etcd_binary: str) -> None:
    proc = subprocess.Popen(
        [*CLI, "serve", "--binary", etcd_binary],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        second = proc.stdout.readline()
        assert "is serving on 127.0.0.1:" in first
        assert second.startswith("export ETCD_ENDPOINTS=127.0.0.1:")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert "Starting etcd... done in" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_serve_rejects_port_with_members() -> None:
    result = CliRunner().invoke(main, ["serve", "--members", "3", "--port", "2379"])
    assert result.exit_code == 2
    assert "--port" in result.output


def test_serve_bad_binary_is_a_clear_error(tmp_path: Any) -> None:
    fake = tmp_path / "etcd"
    fake.write_text("#!/bin/sh\necho 'boom: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    result = CliRunner().invoke(main, ["serve", "--binary", str(fake)])
    assert result.exit_code == 1
    assert "Error:" in result.output


def test_doctor_lists_binaries(etcd_binary: str) -> None:
    result = CliRunner().invoke(main, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    paths = [b["path"] for b in report["etcd_binaries"]]
    assert os.path.realpath(etcd_binary) in [os.path.realpath(p) for p in paths]
    assert report["chosen_binary"] in paths
    assert report["urllib3"]


def test_doctor_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from etcd_rendezvous.cli import main\n"
        "r = CliRunner().invoke(main, ['doctor'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_status_of_a_live_member(etcd_server: EtcdServer) -> None:
    result = CliRunner().invoke(main, ["status", "--endpoints", etcd_server.endpoint, "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row["healthy"] is True
    assert row["version"] == etcd_server.version
    assert row["is_leader"] is True
    assert row["db_size"] > 0


def test_status_human_table(etcd_server: EtcdServer) -> None:
    result = CliRunner().invoke(main, ["status", "--endpoints", etcd_server.endpoint])
    assert result.exit_code == 0, result.output
    assert "ENDPOINT" in result.output and "healthy" in result.output


def test_status_of_a_dead_endpoint_names_it() -> None:
    from etcd_rendezvous.server import find_free_port

    sock = find_free_port()
    dead = f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    result = CliRunner().invoke(main, ["status", "--endpoints", dead, "--timeout", "0.5"])
    assert result.exit_code == 1
    assert dead in result.output and "DOWN" in result.output


def test_status_needs_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ETCD_ENDPOINTS", raising=False)
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code == 2
    assert "--endpoints" in result.output
