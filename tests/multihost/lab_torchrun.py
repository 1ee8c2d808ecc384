"""``torchrun`` on a lab host, recording every rendezvous assignment of its agent.

Runs torch's ``torchrun`` main with the native handler's ``...native.rounds`` logger at
DEBUG, into ``$LAB_ROUNDS_DIR/<host name>-<pid>.jsonl``: one JSON object per line
(``node``, ``round``, ``rank``, ``world_size``, ``members``), what
:func:`multihost.checker.check_rounds` reads (as ``assigned`` events).
"""

from __future__ import annotations

import logging
import os
import socket
import sys


class _JsonOnly(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return str(record.args[0]) if isinstance(record.args, tuple) and record.args else ""


def main() -> None:
    directory = os.environ["LAB_ROUNDS_DIR"]
    path = os.path.join(directory, f"{socket.gethostname()}-{os.getpid()}.jsonl")
    handler = logging.FileHandler(path)
    handler.setFormatter(_JsonOnly())
    rounds = logging.getLogger("etcd_rendezvous.torchrun.native.rounds")
    rounds.setLevel(logging.DEBUG)
    rounds.propagate = False
    rounds.addHandler(handler)
    from torch.distributed.run import main as torchrun

    sys.argv[0] = "torchrun"
    torchrun()


if __name__ == "__main__":
    main()
