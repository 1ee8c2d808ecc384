"""Benchmark: our EtcdStore (etcd v3) vs torch's v2 EtcdStore vs TCPStore, in one run.

Measures ops/s of ``set``, ``get`` (with 1 and with 5,000 keys in the store),
``add``, and the wake-up latency of ``wait()`` (time from ``set`` of the awaited
key in one thread to ``wait`` returning in another). One etcd (our
``EtcdServer``, started with ``--enable-v2`` so torch's python-etcd based store
can run too) serves both etcd stores; TCPStore runs in-process.

Goals (issue 3): get >= 10x torch v2 at 5,000 keys; wait wake-up <= 5 ms median.

    python benchmarks/store.py [--seconds 1.5] [--keys 5000] [--wakeups 30] [--binary PATH]

Prints markdown tables (medians of 3 rounds per cell).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as _dist

from etcd_rendezvous.server import EtcdServer
from etcd_rendezvous.torchrun import EtcdStore

dist: Any = _dist  # torch's stubs lack TCPStore.timeout etc.

# Stores that need a separate connection for the waiter of the wake-up test.
_WAITERS: dict[int, Any] = {}


def make_stores(server: EtcdServer) -> dict[str, Callable[[str], Any]]:
    """Factories: name -> f(prefix) returning a fresh, empty store."""
    factories: dict[str, Callable[[str], Any]] = {}
    client = server.get_client()
    factories["EtcdStore (v3, ours)"] = lambda prefix: EtcdStore(
        client, f"/bench/{prefix}/", timeout=timedelta(seconds=30)
    )
    try:
        import etcd
        from torch.distributed.elastic.rendezvous.etcd_store import EtcdStore as TorchV2Store

        v2 = etcd.Client(server.get_host(), server.get_port(), read_timeout=30)
        v2.version  # noqa: B018 - fails here when v2 is not served

        def torch_v2(prefix: str) -> Any:
            return TorchV2Store(v2, f"/bench/{prefix}", timeout=timedelta(seconds=30))

        factories["torch v2 EtcdStore"] = torch_v2
    except Exception as exc:  # python-etcd missing, or v2 off: say so, keep going
        print(f"(torch v2 EtcdStore skipped: {type(exc).__name__}: {exc})", file=sys.stderr)

    tcp_master = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30))
    # A TCPStore client is one socket: a blocked wait() would stall the setter's
    # requests, so the waiter of the wake-up test gets its own connection.
    tcp_waiter = dist.TCPStore(
        "127.0.0.1", tcp_master.port, is_master=False, timeout=timedelta(seconds=30)
    )

    def tcp(prefix: str) -> Any:
        store = dist.PrefixStore(f"/bench/{prefix}/", tcp_master)
        _WAITERS[id(store)] = dist.PrefixStore(f"/bench/{prefix}/", tcp_waiter)
        return store

    factories["TCPStore"] = tcp
    return factories


def ops_per_second(fn: Callable[[int], object], seconds: float, max_ops: int = 100_000) -> float:
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while n < max_ops:
        fn(n)
        n += 1
        if (n & 7) == 0 and time.perf_counter() >= deadline:
            break
    return n / (time.perf_counter() - start)


def fill(store: Any, count: int) -> None:
    if isinstance(store, EtcdStore):
        store.multi_set([f"fill/{i}" for i in range(count)], [b"x" * 32] * count)
        return
    for i in range(count):
        store.set(f"fill/{i}", b"x" * 32)


def wakeup_latencies(store: Any, rounds: int) -> list[float]:
    out: list[float] = []
    for i in range(rounds):
        key = f"wake/{i}"
        ready = threading.Event()
        done: list[float] = []

        def waiter(
            key: str = key, ready: threading.Event = ready, done: list[float] = done
        ) -> None:
            ready.set()
            _WAITERS.get(id(store), store).wait([key], timedelta(seconds=10))
            done.append(time.perf_counter())

        t = threading.Thread(target=waiter)
        t.start()
        ready.wait()
        time.sleep(0.05)  # let the waiter read, find nothing and start watching
        start = time.perf_counter()
        store.set(key, b"go")
        t.join(15)
        if done:
            out.append(done[0] - start)
    return out


def measure(store: Any, small: Any, args: argparse.Namespace) -> dict[str, float]:
    """ops/s of each operation on ``store`` (``small`` stays at one key)."""

    def do_set(n: int) -> None:
        store.set(f"k{n % 100}", b"v")

    def do_add(n: int) -> None:
        store.add("counter", 1)

    def get_small(n: int) -> None:
        small.get("one")

    def get_big(n: int) -> None:
        store.get("one")

    samples = {
        "set": ops_per_second(do_set, args.seconds),
        "get (1 key)": ops_per_second(get_small, args.seconds),
        "add": ops_per_second(do_add, args.seconds),
    }
    fill(store, args.keys)
    samples[f"get ({args.keys:,} keys)"] = ops_per_second(get_big, args.seconds)
    return samples


def run(args: argparse.Namespace) -> None:
    extra = ["--enable-v2"]
    with EtcdServer(binary=args.binary, extra_args=extra) as server:
        print(f"etcd {server.version} at {server.endpoint} (v2 enabled for torch's store)\n")
        factories = make_stores(server)
        names = list(factories)
        results: dict[str, dict[str, float]] = {name: {} for name in names}
        wake: dict[str, list[float]] = {name: [] for name in names}
        for rnd in range(args.rounds):
            for name, factory in factories.items():
                store = factory(f"r{rnd}-{names.index(name)}")
                store.set("one", b"value")
                # The small case first: a store holding one key (plus the 100 "set" writes).
                small = factory(f"small-r{rnd}-{names.index(name)}")
                small.set("one", b"value")
                samples = measure(store, small, args)
                for op, value in samples.items():
                    results[name][f"{op}#{rnd}"] = value
                wake[name] += wakeup_latencies(small, args.wakeups)

        ops = ["set", "get (1 key)", f"get ({args.keys:,} keys)", "add"]

        def med(name: str, op: str) -> float:
            return statistics.median(results[name][f"{op}#{r}"] for r in range(args.rounds))

        ours = names[0]
        v2 = "torch v2 EtcdStore" if "torch v2 EtcdStore" in names else None
        header = f"| op (ops/s, median of {args.rounds}) | " + " | ".join(names)
        header += " | ours / torch v2 |" if v2 else " |"
        print(header)
        print("|" + "---|" * (len(names) + (2 if v2 else 1)))
        for op in ops:
            row = f"| {op} | " + " | ".join(f"{med(n, op):,.0f}" for n in names)
            if v2:
                row += f" | {med(ours, op) / med(v2, op):.1f}x |"
            else:
                row += " |"
            print(row)
        print()
        print("| wait() wake-up latency | median | p90 | samples |")
        print("|---|---|---|---|")
        for name in names:
            lat = sorted(wake[name])
            if not lat:
                print(f"| {name} | - | - | 0 |")
                continue
            p90 = lat[min(len(lat) - 1, int(len(lat) * 0.9))]
            print(
                f"| {name} | {statistics.median(lat) * 1000:.2f} ms | {p90 * 1000:.2f} ms "
                f"| {len(lat)} |"
            )
        print()
        if v2:
            big = f"get ({args.keys:,} keys)"
            ratio = med(ours, big) / med(v2, big)
            print(
                f"goal get >= 10x torch v2 at {args.keys:,} keys: {ratio:.1f}x "
                f"{'MET' if ratio >= 10 else 'NOT MET'}"
            )
        wake_ms = statistics.median(wake[ours]) * 1000 if wake[ours] else float("nan")
        print(
            f"goal wait wake-up <= 5 ms median: {wake_ms:.2f} ms "
            f"{'MET' if wake_ms <= 5 else 'NOT MET'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=1.5, help="per measurement")
    parser.add_argument("--keys", type=int, default=5000)
    parser.add_argument("--wakeups", type=int, default=30, help="per store and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--binary", default=None, help="etcd binary (default: discovery)")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
