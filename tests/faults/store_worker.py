"""One worker process of the store chaos test; its results as JSON on stdout.

Run as ``python store_worker.py '<json>'`` with ``endpoints``, ``prefix``, ``ops`` (any
of ``add``, ``append``, ``compare_set``, done in turn), ``count`` (iterations at
least), ``stop_file`` (after ``count`` iterations, keep going until it exists) and
``worker`` (an id). Prints ``ready`` once connected, then one JSON line: per op, what
each call returned, the calls that raised "outcome unknown", and any other error (which
the test fails on).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.torchrun import EtcdStore, EtcdStoreOutcomeUnknownError


def _one(store: EtcdStore, op: str, worker: int, i: int) -> Any:
    if op == "add":
        return store.add("counter", 1)
    if op == "append":
        token = f"{worker}.{i}"
        store.append("log", token + ";")
        return token
    if op == "compare_set":
        # An increment by compare_set, retried until this call wins a swap. The value is
        # "<count>:<who>", so a failed swap cannot return what this call wanted to write.
        while True:
            current = store.get("cs")
            desired = b"%d:%d.%d" % (int(current.split(b":")[0]) + 1, worker, i)
            if store.compare_set("cs", current, desired) == desired:
                return int(desired.split(b":")[0])
    raise ValueError(f"unknown op {op!r}")


def main(argv: list[str]) -> int:
    args: dict[str, Any] = json.loads(argv[1])
    client = EtcdClient(args["endpoints"], timeout=float(args.get("timeout", 1.0)))
    store = EtcdStore(client, args["prefix"], retry_deadline=60.0, owns_client=True)
    ops: list[str] = args["ops"]
    count, worker, stop_file = int(args["count"]), int(args["worker"]), args["stop_file"]
    results: dict[str, dict[str, list[Any]]] = {
        op: {"returned": [], "unknown": [], "errors": []} for op in ops
    }
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    start = time.monotonic()
    i = 0
    try:
        while i < count or not os.path.exists(stop_file):
            for op in ops:
                out = results[op]
                try:
                    out["returned"].append(_one(store, op, worker, i))
                except EtcdStoreOutcomeUnknownError as exc:
                    out["unknown"].append(f"call {i}: {exc}"[:300])
                except Exception as exc:  # reported; the test fails on it
                    out["errors"].append(f"call {i}: {type(exc).__name__}: {exc}"[:500])
            i += 1
    finally:
        store.close()
    sys.stdout.write(
        json.dumps({"ops": results, "iterations": i, "seconds": time.monotonic() - start}) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
