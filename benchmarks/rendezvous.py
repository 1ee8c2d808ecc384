"""Benchmark: N rendezvous handlers in threads of one process, min = max = N.

For each backend (our ``etcd-v3``, torch's ``c10d`` and ``etcd-v2``) and each N,
N handlers are created and call ``next_rendezvous()`` at the same time; we
measure the time until every call returned and count the failures (an
exception, or still waiting at the case's time bound). Everything runs on this
machine in the same run: one etcd (our ``EtcdServer`` with ``--enable-v2`` so
``etcd-v2`` works) serves both etcd backends; c10d hosts its TCPStore in the
first handler. torch's default timeouts, except ``join_timeout`` = the bound.

This is the baseline the native engine (next issue) must beat: all three use
torch's DynamicRendezvousHandler, so they share its 1 s state polling and its
single compare-and-swapped state blob.

    python benchmarks/rendezvous.py [--sizes 2,8,32,64,128] [--timeout 120] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field

from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousParameters,
    rendezvous_handler_registry,
)

from etcd_rendezvous.server import EtcdServer

BACKENDS = ("etcd-v3", "c10d", "etcd-v2")


@dataclass
class Case:
    backend: str
    n: int
    seconds: float | None = None  # None: not every handler finished in time
    failures: int = 0
    errors: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_case(backend: str, n: int, endpoint: str, bound: float) -> Case:
    case = Case(backend, n)
    run_id = f"bench-{backend}-{n}-{uuid.uuid4().hex[:6]}"
    if backend == "c10d":
        endpoint = f"127.0.0.1:{_free_port()}"
    conf = {"join_timeout": str(int(bound))}
    handlers: list[RendezvousHandler | None] = [None] * n
    done: list[float | None] = [None] * n
    lock = threading.Lock()
    start_gate = threading.Barrier(n + 1)

    def node(i: int) -> None:
        try:
            params = RendezvousParameters(backend, endpoint, run_id, n, n, **conf)
            handlers[i] = rendezvous_handler_registry.create_handler(params)
        except Exception as exc:
            with lock:
                case.errors.append(f"create: {type(exc).__name__}: {exc}")
            start_gate.wait()
            return
        start_gate.wait()
        handler = handlers[i]
        if handler is None:  # pragma: no cover - set above
            return
        try:
            handler.next_rendezvous()
            done[i] = time.monotonic()
        except Exception as exc:
            with lock:
                case.errors.append(f"{type(exc).__name__}: {exc}"[:200])

    threads = [threading.Thread(target=node, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    start_gate.wait()  # every handler created (as torchrun agents start before joining)
    start = time.monotonic()
    deadline = start + bound + 10
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    finished = [d for d in done if d is not None]
    case.failures = n - len(finished)
    if not case.failures:
        case.seconds = max(finished) - start
    # Stop the heartbeat threads so they do not load the next case (torch has no public
    # way to do it without closing the rendezvous, which costs N more CAS writes).
    for h in handlers:
        stop = getattr(h, "_stop_heartbeats", None)
        if stop is not None:
            stop()
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="2,8,32,64,128")
    parser.add_argument("--timeout", type=float, default=120.0, help="bound of each case (s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case with N <= 8")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--binary", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    sizes = [int(s) for s in args.sizes.split(",")]
    backends = [b.strip() for b in args.backends.split(",")]

    with EtcdServer(binary=args.binary, extra_args=["--enable-v2"]) as server:
        print(f"etcd {server.version} at {server.endpoint}; bound {args.timeout:.0f} s per case\n")
        results: dict[tuple[str, int], list[Case]] = {}
        for n in sizes:
            repeats = args.repeats if n <= 8 else 1
            for backend in backends:
                for _ in range(repeats):
                    case = run_case(backend, n, server.endpoint, args.timeout)
                    results.setdefault((backend, n), []).append(case)
                    shown = f"{case.seconds:.2f} s" if case.seconds is not None else "TIMEOUT"
                    print(
                        f"  {backend:8s} N={n:3d}: {shown}, {case.failures} failed"
                        + (f" ({case.errors[0]})" if case.errors else ""),
                        flush=True,
                    )

    def cell(backend: str, n: int) -> tuple[str, float | None]:
        cases = results.get((backend, n), [])
        times = [c.seconds for c in cases if c.seconds is not None]
        failed = sum(c.failures for c in cases)
        if not cases:
            return "-", None
        if len(times) < len(cases):
            return f"timeout ({failed} failed)", None
        med = statistics.median(times)
        return f"{med:.2f} s" + (f" (x{len(times)})" if len(times) > 1 else ""), med

    print()
    header = "| N | " + " | ".join(backends)
    others = [b for b in backends if b != "etcd-v3"]
    if "etcd-v3" in backends:
        header += " | " + " | ".join(f"{b} / etcd-v3" for b in others)
    print(header + " |")
    print("|" + "---|" * (1 + len(backends) + (len(others) if "etcd-v3" in backends else 0)))
    for n in sizes:
        cells = {b: cell(b, n) for b in backends}
        row = f"| {n} | " + " | ".join(cells[b][0] for b in backends)
        if "etcd-v3" in backends:
            ours = cells["etcd-v3"][1]
            ratios = []
            for b in others:
                theirs = cells[b][1]
                ratios.append(f"{theirs / ours:.2f}" if ours and theirs else "-")
            row += " | " + " | ".join(ratios)
        print(row + " |")
    print(
        "\n(median time until every next_rendezvous() returned; failures = handlers that "
        "raised or were still waiting at the bound)"
    )


if __name__ == "__main__":
    main()
