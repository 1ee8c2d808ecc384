"""Startup time of EtcdServer: construction to ready, against torch's and against the floor.

For every installed etcd binary, interleaved, ``--runs`` times each (after one warm-up):

* **ours**: ``EtcdServer(binary=...).start()`` from this package;
* **torch**: torch's ``etcd_server.EtcdServer().start()`` (binary through
  ``TORCHELASTIC_ETCD_BINARY_PATH``), when torch and python-etcd are installed;
* **floor**: the same binary with the same flags as ours, started by hand with
  ``subprocess.Popen`` (ports and a temporary data dir included) and ``GET /health``
  polled every 1 ms.

Prints a markdown table of medians with the ratios ours/floor and ours/torch.
Goal: ours <= 1.2x floor and <= 0.1x torch.

Usage: python benchmarks/startup.py [--runs 9]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import urllib3

from etcd_rendezvous.server import EtcdServer, list_etcd_binaries
from etcd_rendezvous.server._ports import free_ports
from etcd_rendezvous.server.server import etcd_argv

Measure = Callable[[str], float]


def measure_ours(binary: str) -> float:
    started = time.perf_counter()
    server = EtcdServer(binary=binary)
    server.start(timeout=30)
    elapsed = time.perf_counter() - started
    server.stop()
    return elapsed


def measure_floor(binary: str) -> float:
    """The same flags as ours, by hand: ports, a temp dir, Popen, /health every 1 ms."""
    started = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="etcd-startup-floor-")
    client_port, peer_port = free_ports(2)
    argv = etcd_argv(
        binary,
        name="default",
        data_dir=os.path.join(workdir, "data"),
        host="127.0.0.1",
        client_port=client_port,
        peer_port=peer_port,
        initial_cluster=f"default=http://127.0.0.1:{peer_port}",
        cluster_token=f"etcd-rendezvous-{client_port}",
        heartbeat_interval_ms=10,
        election_timeout_ms=50,
    )
    with open(os.path.join(workdir, "etcd.log"), "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=log_file, start_new_session=True)
    pool = urllib3.HTTPConnectionPool("127.0.0.1", client_port, maxsize=1, retries=False)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = pool.request("GET", "/health", retries=False, timeout=1.0)
                if response.status == 200 and b'"health":"true"' in response.data:
                    break
            except urllib3.exceptions.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"floor etcd did not start (exit code {proc.poll()})")
            time.sleep(0.001)
        return time.perf_counter() - started
    finally:
        pool.close()
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def torch_measure() -> tuple[Measure | None, str]:
    """torch's EtcdServer, or None and why not."""
    try:
        from torch.distributed.elastic.rendezvous import etcd_server as torch_etcd_server
    except ImportError as exc:
        return None, f"torch not installed ({exc})"
    try:
        import etcd  # noqa: F401  (python-etcd: torch's readiness check needs it)
    except ImportError:
        return None, "python-etcd not installed"
    torch_server_class: Any = torch_etcd_server.EtcdServer

    def measure_torch(binary: str) -> float:
        os.environ["TORCHELASTIC_ETCD_BINARY_PATH"] = binary
        started = time.perf_counter()
        server = torch_server_class()
        try:
            server.start(timeout=15, num_retries=1, stderr=subprocess.DEVNULL)
            return time.perf_counter() - started
        finally:
            server.stop()

    return measure_torch, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="measured runs per row (>= 7)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("torch").setLevel(logging.CRITICAL)

    binaries = list_etcd_binaries()
    if not binaries:
        raise SystemExit("no etcd binary installed")
    measure_torch, torch_missing = torch_measure()
    impls: dict[str, Measure | None] = {
        "ours": measure_ours,
        "floor": measure_floor,
        "torch": measure_torch,
    }
    results: dict[tuple[str, str], list[float]] = {}
    failures: dict[tuple[str, str], str] = {}
    names = [name for name, fn in impls.items() if fn is not None]
    for run in range(args.runs + 1):  # run 0 is a warm-up
        for binary in binaries:
            # Rotate the order so no implementation always goes first.
            order = names[run % len(names) :] + names[: run % len(names)]
            for name in order:
                key = (binary.path, name)
                fn = impls[name]
                if fn is None or key in failures:
                    continue
                try:
                    elapsed = fn(binary.path)
                except Exception as exc:
                    failures[key] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:120]
                    continue
                if run > 0:
                    results.setdefault(key, []).append(elapsed)

    def cell(binary: str, name: str) -> tuple[str, float | None]:
        if (binary, name) in failures:
            return f"failed: {failures[(binary, name)]}", None
        if name == "torch" and measure_torch is None:
            return torch_missing, None
        values = results.get((binary, name), [])
        median = statistics.median(values) * 1000
        return f"{median:.1f}", median

    print(f"Startup, construction to ready: median of {args.runs} interleaved runs (ms)\n")
    print("| etcd | ours | floor | torch | ours/floor | ours/torch |")
    print("|---|---:|---:|---:|---:|---:|")
    for binary in binaries:
        ours_text, ours = cell(binary.path, "ours")
        floor_text, floor = cell(binary.path, "floor")
        torch_text, torch_ms = cell(binary.path, "torch")
        vs_floor = f"{ours / floor:.2f}x" if ours and floor else "-"
        vs_torch = f"{ours / torch_ms:.3f}x" if ours and torch_ms else "-"
        print(
            f"| {binary.version} ({binary.source}) | {ours_text} | {floor_text} | {torch_text} "
            f"| {vs_floor} | {vs_torch} |"
        )


if __name__ == "__main__":
    main()
