"""Waiting for a process state in the tests: a signal such as SIGSTOP lands asynchronously."""

from __future__ import annotations

import time


def wait_state(pid: int, state: str, timeout: float = 10.0) -> None:
    """Wait until /proc says process ``pid`` is in ``state`` (e.g. ``T``: stopped)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rpartition(")")[2].split()[0] == state:
                return
        assert time.monotonic() < deadline, f"process {pid} never reached state {state}"
        time.sleep(0.01)
