"""Time until every one of N rendezvous nodes (threads, one process) has its rank.

Usage: python benchmarks/engine_scale.py [N ...]   (default 2 8 32 64 128 256 512 1024)
One etcd (EtcdServer), one shared EtcdClient, min_nodes = max_nodes = N.
"""

from __future__ import annotations

import sys
import threading
import time

from etcd_rendezvous.rendezvous import Rendezvous
from etcd_rendezvous.server import EtcdServer


def run(server: EtcdServer, n: int) -> float:
    client = server.get_client()
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
    for r in nodes:
        r.leave()
    client.close()
    if errors or sorted(ranks) != list(range(n)):
        raise SystemExit(f"N={n}: {len(errors)} errors ({errors[:1]}), {len(ranks)} ranks")
    return elapsed


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [2, 8, 32, 64, 128, 256, 512, 1024]
    with EtcdServer() as server:
        print(f"etcd {server.version}")
        for n in sizes:
            print(f"N={n:5d}  {run(server, n):7.3f} s", flush=True)


if __name__ == "__main__":
    main()
