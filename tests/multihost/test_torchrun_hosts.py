"""torchrun across lab hosts on etcd-v3: kill a whole host, the survivors run again.

An etcd member on host ``etcd``; one agent on each of ``h0``, ``h1``, ``h2``
(``--nnodes=2:3``, gloo), each reaching etcd, and its peers, by host name. ``h0`` is
killed (every process on it: agent and worker; it held rank 0, so the workers' gloo
store and the probe of a late member both cross hosts): ``h1`` and ``h2`` run again in a
world of 2 and finish cleanly. (Timing: ``benchmarks/lab.py``, against ``c10d``.)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from multihost.harness import TorchrunJob, start_etcd
from multihost.netlab import Lab

pytest.importorskip("torch")

pytestmark = [pytest.mark.torch, pytest.mark.slow]
BOUND = 150.0  # four torch imports at once on a loaded 2-core machine take a while


def test_a_killed_host_costs_one_round_not_the_job(make_lab: Callable[[list[str]], Lab]) -> None:
    lab = make_lab(["etcd", "h0", "h1", "h2"])
    endpoint = start_etcd(lab, lab["etcd"])
    hosts = [lab["h0"], lab["h1"], lab["h2"]]
    job = TorchrunJob(lab, hosts, "etcd-v3", endpoint, finish_world=2, bound=BOUND)
    deadline = time.monotonic() + BOUND
    assert job.wait_running(3, deadline), f"the 3 agents never ran together:\n{job.logs()}"
    lab["h0"].kill()
    killed = time.time()
    times = job.wait_running(2, deadline)
    assert times, f"the survivors did not run again:\n{job.logs()}"
    codes = job.finish(dead=["h0"])
    assert codes == {"h1": 0, "h2": 0}, (
        f"recovered {times[-1] - killed:.1f} s after the kill, then {codes}:\n{job.logs()}"
    )
