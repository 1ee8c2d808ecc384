"""An etcd member on a lab host: ``python etcd_host.py HOST DATA_DIR [BINARY]``.

Starts our ``EtcdServer`` listening on ``HOST`` (the lab host's address, not loopback),
prints ``{"endpoint": ..., "version": ...}`` as one JSON line, and serves until its
stdin closes or it gets SIGTERM; then stops etcd (the data dir belongs to the lab).
"""

from __future__ import annotations

import json
import signal
import sys

from etcd_rendezvous.server import EtcdServer


def main() -> None:
    host, data_dir = sys.argv[1:3]
    binary = sys.argv[3] if len(sys.argv) > 3 else None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with EtcdServer(data_dir, host=host, binary=binary) as server:
        print(json.dumps({"endpoint": server.endpoint, "version": server.version}), flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
