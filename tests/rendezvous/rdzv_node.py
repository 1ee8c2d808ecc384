"""One rendezvous participant as a process, for the fault tests (test_faults.py).

Usage: python rdzv_node.py ENDPOINTS RUN_ID NODE_ID MIN MAX [LAST_CALL [LEASE_TTL]]

Joins with the engine's defaults (lease TTL, keep-alive, fast quorum, probes; last call
30 s unless given), prints its assignment as one JSON line, then re-joins whenever the
membership changes (a member lost, a node waiting, a newer round, its own lease lost),
or when told so by a line ``rejoin`` on its stdin (as torch's agent does when a worker
fails), printing every change and every new assignment. Runs until it is killed or the
rendezvous closes; SIGTERM makes it leave cleanly.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.rendezvous import (
    DEFAULT_LEASE_TTL,
    ChangeKind,
    Rendezvous,
    RendezvousClosedError,
)


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    endpoints, run_id, node_id, min_nodes, max_nodes = sys.argv[1:6]
    last_call = float(sys.argv[6]) if len(sys.argv) > 6 else 30.0
    lease_ttl = int(sys.argv[7]) if len(sys.argv) > 7 else DEFAULT_LEASE_TTL
    rejoin = threading.Event()

    def commands() -> None:
        for line in sys.stdin:
            if line.strip() == "rejoin":
                rejoin.set()

    threading.Thread(target=commands, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    client = EtcdClient(endpoints)
    rdzv = Rendezvous(
        client,
        run_id,
        int(min_nodes),
        int(max_nodes),
        node_id=node_id,
        last_call_timeout=last_call,
        join_timeout=60.0,
        lease_ttl=lease_ttl,
    )
    say(event="started", node=node_id)
    try:
        while True:
            a = rdzv.join()
            say(
                event="assigned",
                node=node_id,
                round=a.round,
                rank=a.rank,
                world_size=a.world_size,
                members=list(a.members),
                causes=list(a.causes),
                reason=a.reason,
                t=time.time(),
            )
            while True:
                change = rdzv.wait_for_change(0.1)
                if change is None:
                    if rejoin.is_set():
                        rejoin.clear()
                        say(event="rejoin", node=node_id, t=time.time())
                        break
                    continue
                say(
                    event="change",
                    node=node_id,
                    kind=change.kind.value,
                    round=change.round,
                    lost=list(change.lost),
                    left=list(change.left),
                    waiting=change.waiting,
                    t=time.time(),
                )
                if (
                    change.kind is ChangeKind.LEASE_LOST
                    or (
                        change.kind is ChangeKind.MEMBERSHIP
                        and change.round == a.round
                        and bool(change.lost or change.waiting)
                    )
                    or (change.kind is ChangeKind.ROUND_COMMITTED and change.round > a.round)
                ):
                    break
    except RendezvousClosedError:
        say(event="closed", node=node_id)
    finally:
        rdzv.leave()
        client.close()


if __name__ == "__main__":
    main()
