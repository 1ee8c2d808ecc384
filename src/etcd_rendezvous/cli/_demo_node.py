"""One simulated node of ``etcd-rendezvous demo`` (run as a subprocess).

Protocol with the demo: the node prints JSON lines on stdout (``ready``,
``assigned``, ``rejoin``, ``closed``, ``error``); it waits for one line on stdin
before its first join, and leaves and exits when stdin closes (the demo is gone),
so a node never outlives the demo. Like a torchrun agent, it joins, keeps its rank
until the membership changes (a member lost, nodes waiting), then joins again;
it exits once the rendezvous is closed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.errors import EtcdRendezvousError
from etcd_rendezvous.rendezvous import (
    Assignment,
    ChangeKind,
    Rendezvous,
    RendezvousClosedError,
)

_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    with _lock:
        sys.stdout.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
        sys.stdout.flush()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="etcd-rendezvous-demo-node")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--node-id", required=True)
    p.add_argument("--key-prefix", required=True)
    p.add_argument("--min-nodes", type=int, required=True)
    p.add_argument("--max-nodes", type=int, required=True)
    p.add_argument("--lease-ttl", type=int, required=True)
    p.add_argument("--last-call", type=float, required=True)
    p.add_argument("--join-timeout", type=float, default=60.0)
    p.add_argument("--fast-quorum", action="store_true")
    return p.parse_args(argv)


def _why_rejoin(rdzv: Rendezvous, assignment: Assignment) -> str | None:
    """Wait until this round needs a new one (the reason), or None once closed."""
    while True:
        change = rdzv.wait_for_change(timeout=3600.0)
        if change is None:
            continue
        if change.kind is ChangeKind.CLOSED:
            return None
        if change.kind is ChangeKind.LEASE_LOST:
            return "my lease was lost"
        if change.kind is ChangeKind.ROUND_COMMITTED and change.round > assignment.round:
            return f"round {change.round} was committed without me"
        if change.kind is ChangeKind.MEMBERSHIP and change.round == assignment.round:
            if change.lost:
                return f"{', '.join(change.lost)} lost"
            if change.waiting:
                return f"{change.waiting} node(s) waiting"


def _exit_when_orphaned(rdzv: Rendezvous) -> None:
    """The demo closed our stdin (it exited or was killed): leave and exit now."""
    sys.stdin.read()
    try:
        rdzv.leave()
    finally:
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    client = EtcdClient(args.endpoint, timeout=5.0)
    rdzv = Rendezvous(
        client,
        args.run_id,
        args.min_nodes,
        args.max_nodes,
        node_id=args.node_id,
        node_data={"pid": str(os.getpid()), "addr": f"127.0.0.1:{29500 + os.getpid() % 1000}"},
        last_call_timeout=args.last_call,
        join_timeout=args.join_timeout,
        lease_ttl=args.lease_ttl,
        key_prefix=args.key_prefix,
        fast_quorum=args.fast_quorum,
    )
    emit("ready", pid=os.getpid())
    if not sys.stdin.readline():
        return 1  # the demo is gone before the start
    threading.Thread(target=_exit_when_orphaned, args=(rdzv,), daemon=True).start()
    try:
        while True:
            started = time.monotonic()
            try:
                assignment = rdzv.join()
            except RendezvousClosedError:
                emit("closed")
                return 0
            emit(
                "assigned",
                round=assignment.round,
                rank=assignment.rank,
                world_size=assignment.world_size,
                waited=time.monotonic() - started,
            )
            reason = _why_rejoin(rdzv, assignment)
            if reason is None:
                emit("closed")
                return 0
            emit("rejoin", round=assignment.round, reason=reason)
    except EtcdRendezvousError as exc:
        emit("error", error=str(exc))
        return 1
    finally:
        rdzv.leave()
        client.close()


if __name__ == "__main__":
    sys.exit(main())
