"""A rendezvous participant on a lab host: tests/rendezvous/rdzv_node.py, with its logs.

Same arguments and JSON lines on stdout as ``rdzv_node.py``; in addition the engine's
log goes to stderr (INFO, and DEBUG for the engine, which names every probe verdict),
so a test can tell a probe's eviction ("is gone ... revoking its lease") from a lease
expiry, and see the probes that gave no verdict ("probe of X: unknown").
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "rendezvous"))

import rdzv_node

if __name__ == "__main__":
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("etcd_rendezvous.rendezvous.engine").setLevel(logging.DEBUG)
    rdzv_node.main()
