"""Client latency: our EtcdClient against etcd3gw, on the same etcd, in the same run.

For every installed etcd binary, one EtcdServer; then interleaved rounds of
put, get, txn (compare-and-swap) and watch delivery (put -> event seen by a
watch) for each client. Prints a markdown table of median and p99 latency
(ms) with the ratio ours/etcd3gw (lower is better; goal: < 1 on every row).

    python benchmarks/client.py [--ops 600] [--rounds 6]
"""

from __future__ import annotations

import argparse
import base64
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import etcd3gw

from etcd_rendezvous.client import Compare, EtcdClient, Op
from etcd_rendezvous.server import EtcdServer, list_etcd_binaries

Bench = Callable[[int], float]  # runs op #i, returns its latency in seconds


def _b64(data: str) -> str:
    return base64.b64encode(data.encode()).decode()


def ours_benches(client: EtcdClient) -> dict[str, Bench]:
    client.put("bench/get", "value")
    client.put("bench/txn", "0")
    watch = client.watch("bench/watch")

    def put(i: int) -> float:
        t = time.perf_counter()
        client.put("bench/put", "value")
        return time.perf_counter() - t

    def get(i: int) -> float:
        t = time.perf_counter()
        client.get("bench/get")
        return time.perf_counter() - t

    def txn(i: int) -> float:
        t = time.perf_counter()
        client.txn(
            [Compare.value("bench/txn", "==", "0")],
            [Op.put("bench/txn", "0")],
            [Op.get("bench/txn")],
        )
        return time.perf_counter() - t

    def watch_delivery(i: int) -> float:
        t = time.perf_counter()
        client.put("bench/watch", str(i))
        event = watch.next_event(5)
        if event is None:
            raise RuntimeError("our watch missed an event")
        return time.perf_counter() - t

    return {"put": put, "get": get, "txn": txn, "watch": watch_delivery}


def etcd3gw_benches(client: Any) -> dict[str, Bench]:
    client.put("bench3/get", "value")
    client.put("bench3/txn", "0")
    events, cancel = client.watch("bench3/watch")
    queue_lock = threading.Condition()
    seen: list[Any] = []

    def reader() -> None:
        for event in events:
            with queue_lock:
                seen.append(event)
                queue_lock.notify_all()

    threading.Thread(target=reader, daemon=True).start()
    time.sleep(0.2)  # etcd3gw's watch() returns before etcd confirmed it
    txn_body = {
        "compare": [
            {"key": _b64("bench3/txn"), "result": "EQUAL", "target": "VALUE", "value": _b64("0")}
        ],
        "success": [{"request_put": {"key": _b64("bench3/txn"), "value": _b64("0")}}],
        "failure": [{"request_range": {"key": _b64("bench3/txn")}}],
    }

    def put(i: int) -> float:
        t = time.perf_counter()
        client.put("bench3/put", "value")
        return time.perf_counter() - t

    def get(i: int) -> float:
        t = time.perf_counter()
        client.get("bench3/get")
        return time.perf_counter() - t

    def txn(i: int) -> float:
        t = time.perf_counter()
        client.transaction(txn_body)
        return time.perf_counter() - t

    def watch_delivery(i: int) -> float:
        with queue_lock:
            before = len(seen)
        t = time.perf_counter()
        client.put("bench3/watch", str(i))
        with queue_lock:
            if not queue_lock.wait_for(lambda: len(seen) > before, 5):
                raise RuntimeError("etcd3gw's watch missed an event")
        return time.perf_counter() - t

    benches: dict[str, Bench] = {"put": put, "get": get, "txn": txn, "watch": watch_delivery}
    benches["_cancel"] = lambda i: (cancel(), 0.0)[1]
    return benches


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def run(server: EtcdServer, ops: int, rounds: int) -> list[tuple[str, float, float, float, float]]:
    ours_client = EtcdClient(server.endpoint)
    gw_client = etcd3gw.client(host=server.get_host(), port=server.get_port())
    ours = ours_benches(ours_client)
    theirs = etcd3gw_benches(gw_client)
    names = ["put", "get", "txn", "watch"]
    results: dict[str, dict[str, list[float]]] = {n: {"ours": [], "etcd3gw": []} for n in names}
    per_round = max(1, ops // rounds)
    for name in names:  # warm up connections and code paths
        for i in range(20):
            ours[name](i)
            theirs[name](i)
    for r in range(rounds):
        order = [("ours", ours), ("etcd3gw", theirs)]
        if r % 2:
            order.reverse()
        for name in names:
            for label, benches in order:
                results[name][label].extend(benches[name](i) for i in range(per_round))
    theirs["_cancel"](0)
    ours_client.close()
    rows = []
    for name in names:
        mine, gw = results[name]["ours"], results[name]["etcd3gw"]
        rows.append(
            (name, statistics.median(mine) * 1e3, p99(mine) * 1e3,
             statistics.median(gw) * 1e3, p99(gw) * 1e3)
        )  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ops", type=int, default=600, help="operations per row and client")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    args = parser.parse_args()
    print(f"{args.ops} ops per row and client, {args.rounds} interleaved rounds; latency in ms\n")
    columns = ["etcd", "op", "ours median", "ours p99", "etcd3gw median", "etcd3gw p99"]
    print("| " + " | ".join([*columns, "ratio median", "ratio p99"]) + " |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for binary in list_etcd_binaries():
        with EtcdServer(binary=binary.path) as server:
            for name, om, op99, gm, gp99 in run(server, args.ops, args.rounds):
                print(
                    f"| {binary.version} | {name} | {om:.3f} | {op99:.3f} | {gm:.3f} | {gp99:.3f} "
                    f"| {om / gm:.2f}x | {op99 / gp99:.2f}x |"
                )


if __name__ == "__main__":
    main()
