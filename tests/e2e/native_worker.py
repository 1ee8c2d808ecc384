"""Worker for the native-handler end-to-end tests: a training-like loop of all_reduces.

Each step all_reduces ``[rank + 1, stop]``; the loop ends on the step where any rank
votes stop (so every rank leaves at the same step). A rank votes stop once the file
``E2E_FINISH_FILE`` exists (or at once without it) and the world size is
``E2E_EXPECT_WORLD`` (default: any). Writes ``E2E_MARKER_DIR/started-<pid>-r<restart>-w<world>``
(with the wall time) once its process group is up, and prints
``RESULT rank=<r> world=<w> sum=<s> restart=<n> steps=<k>`` on success.
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
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=15))
    if dist.get_rank() != rank or dist.get_world_size() != world:
        print(f"MISMATCH rank={dist.get_rank()}/{rank} world={dist.get_world_size()}/{world}")
        return 3
    marker_dir = os.environ.get("E2E_MARKER_DIR")
    if marker_dir:
        path = os.path.join(marker_dir, f"started-{os.getpid()}-r{restart}-w{world}")
        with open(path, "w") as fh:
            fh.write(f"{rank} {world} {time.time():.6f}\n")
    finish = os.environ.get("E2E_FINISH_FILE")
    expect = int(os.environ.get("E2E_EXPECT_WORLD", str(world)))
    step_sleep = float(os.environ.get("E2E_STEP", "0.05"))
    deadline = time.monotonic() + float(os.environ.get("E2E_MAX_SECONDS", "150"))
    expected = world * (world + 1) // 2
    steps = 0
    while True:
        stop = int(world == expect and (finish is None or os.path.exists(finish)))
        tensor = torch.tensor([rank + 1, stop], dtype=torch.int64)
        dist.all_reduce(tensor)
        steps += 1
        if int(tensor[0].item()) != expected:
            print(f"BADSUM rank={rank} got={int(tensor[0].item())} expected={expected}")
            return 4
        if int(tensor[1].item()) > 0:
            break
        if time.monotonic() > deadline:
            print(f"TOOLONG rank={rank} world={world}", flush=True)
            return 5
        time.sleep(step_sleep)
    dist.barrier()
    dist.destroy_process_group()
    print(
        f"RESULT rank={rank} world={world} sum={expected} restart={restart} steps={steps}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
