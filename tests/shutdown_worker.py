"""torchrun target of tests/test_distributed.py (not a test module): the end of a ``grao train`` DDP run,
``TRIALS`` times in a row in one pair of processes, each time in a fresh gloo group.

Each trial wraps the demo model with ``wrap_ddp``, makes the collectives a step and a checkpoint end with
(``all_gather_object``, ``all_reduce`` of Python tensors dropped at once, barriers), then calls
``shutdown_distributed`` with the wrapper still referenced, as the Trainer does. The group's worker
threads must be joined inside ``shutdown_distributed`` (the process is back to its thread count of before
the group), and without a deadlock: with the group's last reference in DDP's C++ Reducer, freed later with
the GIL held, a worker still releasing a tensor waits for the GIL while ``~ProcessGroupGloo`` joins it
(see ``grao.trainer.distributed.shutdown_distributed``); that hung within the first few trials.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn  # imported before a group exists: its defaults (group=WORLD) hold none

from grao import demo
from grao.trainer.distributed import (
    all_gather,
    all_reduce_sum,
    shutdown_distributed,
    wrap_ddp,
)


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def main(trials: int) -> None:
    faulthandler.dump_traceback_later(120, exit=True)  # a hang shows the Python stacks, then ends the rank
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]) + 1, world, rank == 0,
                          timeout=timedelta(seconds=60))
    tokenizer = demo.build_tokenizer()
    for trial in range(trials):
        before = threads()
        dist.init_process_group("gloo", store=dist.PrefixStore(f"trial{trial}", store), rank=rank, world_size=world)
        ddp = wrap_ddp(demo.build_model(tokenizer, seed=trial), torch.device("cpu"))
        for _ in range(3):
            all_gather({"rank": rank, "trial": trial})
            all_reduce_sum([float(rank), 1.0], "cpu")
            dist.barrier()
        shutdown_distributed()
        left = threads()
        assert left == before, f"rank {rank}, trial {trial}: {left} threads after shutdown, {before} before the group"
        assert not ddp.__dict__.get("reducer")  # detached; the wrapper itself is still referenced here
        del ddp
    print(f"rank {rank}: {trials} trials, every group's threads joined in shutdown_distributed", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
