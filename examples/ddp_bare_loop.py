"""The bare loop of examples/bare_loop.py on several processes with torch DistributedDataParallel.

    torchrun --nproc_per_node 2 examples/ddp_bare_loop.py        # gloo on CPU, NCCL on GPUs

The whole causal LM is wrapped in DDP, and every loss goes through the wrapper's forward:
``bare_loop.hidden_and_labels`` calls ``model(..., output_hidden_states=True, logits_to_keep=1)`` and
``bare_loop.head_weight`` takes the lm_head weight after it. DDP then averages the gradient of every
parameter over the ranks, the lm_head's included (tied to the embedding or not). Two patterns that look
equivalent and are not: calling the inner module's backbone (``model.module.model(...)``) bypasses DDP's
forward, so no gradient is synchronised and the ranks silently drift apart; wrapping only the backbone
leaves an untied lm_head unsynchronised. tests/test_ddp_example.py runs this loop on 2 CPU processes and
checks that the ranks stay identical and equal one process on the global batch (and that the inner-module
call does drift, so the check can fail).

Each rank trains on its own, equal share of every global batch: DDP averages over ranks, so the update is
the one-process update on the global batch (GRAO's loss is a mean over prompts).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bare_loop import grao_loss
from toy_data import collate_groups, tiny_model, toy_groups


def train_ddp(steps: int = 2, prompts_per_rank: int = 2, lr: float = 1e-3, seed: int = 0):
    """``steps`` DDP steps of GRAO on this rank's share of each global batch; returns (model, losses).
    Needs the default process group (:func:`main` creates it from torchrun's environment)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else None
    local = tiny_model(seed=seed).to(device or "cpu")
    data = toy_groups(num_prompts=steps * world * prompts_per_rank, vocab_size=local.config.vocab_size, seed=seed)

    model = DistributedDataParallel(local, device_ids=[device] if device else None)  # the whole causal LM
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        start = (step * world + rank) * prompts_per_rank  # this rank's share of the global batch
        batch = collate_groups(data[start:start + prompts_per_rank])
        batch = {k: v.to(device or "cpu") for k, v in batch.items()}
        loss = grao_loss(model, batch)  # model(...) goes through DDP's forward; the lm_head weight after it
        loss.backward()  # DDP averages every gradient over the ranks, the lm_head's included
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return local, losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompts-per-rank", type=int, default=2)
    args = parser.parse_args(argv)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        _, losses = train_ddp(args.steps, args.prompts_per_rank)
        print(f"rank {dist.get_rank()}: losses {[round(v, 4) for v in losses]}")
        dist.barrier()  # every rank is done with every collective
    finally:
        # Destroy the group explicitly, before exit, once the DDP wrapper is gone (train_ddp returned, so
        # the group's last reference is torch's own Python one). A wrapper kept alive past this line would
        # hold the group's last reference in its C++ Reducer, and freeing it later (with the GIL held) can
        # deadlock gloo's destructor on a worker thread that waits for the GIL (pytorch/pytorch#56297).
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
