"""Time until every one of N rendezvous nodes (threads, one process) has its rank.

Usage: python benchmarks/engine_scale.py [--binary ETCD] [N ...]
       (default N: 2 8 32 64 128 256 512 1024)

One etcd (EtcdServer), one shared client, min_nodes = max_nodes = N. Reports the time
until every node has its rank, the etcd requests per node for that (unary requests plus
watch streams opened, counted by a subclass of EtcdClient), and the time for every node
to leave afterwards. Goal (issue 4): N=1024 under 10 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

from etcd_rendezvous.client import EtcdClient, Watch
from etcd_rendezvous.rendezvous import Rendezvous
from etcd_rendezvous.server import EtcdServer


class CountingClient(EtcdClient):
    """An EtcdClient that counts the requests it sends and the watches it opens."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests = 0
        self.watches = 0
        self._count_lock = threading.Lock()

    def _call(self, path: str, body: Any, **kwargs: Any) -> dict[str, Any]:
        with self._count_lock:
            self.requests += 1
        return super()._call(path, body, **kwargs)

    def watch(self, key: bytes | str, **kwargs: Any) -> Watch:
        with self._count_lock:
            self.watches += 1
        return super().watch(key, **kwargs)

    def reset(self) -> tuple[int, int]:
        with self._count_lock:
            counts = (self.requests, self.watches)
            self.requests = self.watches = 0
        return counts


def run(server: EtcdServer, n: int) -> tuple[float, int, int, float]:
    """(seconds to all ranks, requests, watches, seconds for all to leave)."""
    client = CountingClient(server.endpoint)
    nodes = [
        Rendezvous(client, f"bench{n}", n, n, node_id=f"n{i:04d}", lease_ttl=30) for i in range(n)
    ]
    ranks: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def go(r: Rendezvous) -> None:
        try:
            a = r.join(120.0)
            with lock:
                ranks.append(a.rank)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(r,)) for r in nodes]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(150.0)
    elapsed = time.monotonic() - start
    requests, watches = client.reset()
    start = time.monotonic()
    for r in nodes:
        r.leave()
    left = time.monotonic() - start
    client.close()
    if errors or sorted(ranks) != list(range(n)):
        raise SystemExit(f"N={n}: {len(errors)} errors ({errors[:1]}), {len(ranks)} ranks")
    return elapsed, requests, watches, left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--binary", default=None, help="etcd binary (default: discovery)")
    parser.add_argument("sizes", nargs="*", type=int, default=[2, 8, 32, 64, 128, 256, 512, 1024])
    args = parser.parse_args()
    with EtcdServer(binary=args.binary) as server:
        print(f"etcd {server.version}")
        print(f"{'N':>5} {'seconds':>8} {'req/node':>9} {'watches':>8} {'leave s':>8}")
        for n in args.sizes:
            elapsed, requests, watches, left = run(server, n)
            print(f"{n:5d} {elapsed:8.3f} {requests / n:9.2f} {watches:8d} {left:8.3f}", flush=True)


if __name__ == "__main__":
    main()
