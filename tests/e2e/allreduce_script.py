"""Worker script for the end-to-end tests: all_reduce over gloo, check rank and world size.

Prints one line ``RESULT rank=<r> world=<w> sum=<s> restart=<n>`` on success and
exits non-zero when anything is off. ``E2E_EXPECT_WORLD`` (optional) is the world
size the run must end with; ``E2E_SLEEP`` keeps the workers alive (seconds) so a
test can kill an agent mid-job; ``E2E_MARKER_DIR`` receives a file per worker once its
process group is up.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist


def main() -> int:
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    # Short: a collective with a dead peer must fail fast so the agent restarts.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=15))
    if dist.get_rank() != rank or dist.get_world_size() != world:
        print(f"MISMATCH rank={dist.get_rank()}/{rank} world={dist.get_world_size()}/{world}")
        return 3
    # The marker says "this worker is connected to its peers": a test kills nodes only then.
    marker_dir = os.environ.get("E2E_MARKER_DIR")
    if marker_dir:
        path = os.path.join(marker_dir, f"started-{os.getpid()}-r{restart}-w{world}")
        with open(path, "w") as fh:
            fh.write(f"{rank} {world}\n")
    sleep = float(os.environ.get("E2E_SLEEP", "0"))
    expect = os.environ.get("E2E_EXPECT_WORLD")
    if sleep and (expect is None or world != int(expect)):
        time.sleep(sleep)
    tensor = torch.tensor([rank + 1], dtype=torch.int64)
    dist.all_reduce(tensor)
    expected = world * (world + 1) // 2
    if int(tensor.item()) != expected:
        print(f"BADSUM rank={rank} got={int(tensor.item())} expected={expected}")
        return 4
    dist.barrier()
    dist.destroy_process_group()
    print(f"RESULT rank={rank} world={world} sum={expected} restart={restart}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
