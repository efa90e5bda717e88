"""torchrun target of tests/test_ddp_example.py (not a test module): the loop of examples/ddp_bare_loop.py
as written, then the same loop with the backbone called on the inner module (the pitfall the README warns
against); each rank saves its final weights and losses to the directory given as the first argument."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import bare_loop  # noqa: E402
import ddp_bare_loop  # noqa: E402


def inner_hidden_and_labels(model, batch, rows=None):
    """The pitfall: hidden states from ``ddp.module.model(...)``, which bypasses DDP's forward."""
    hidden = model.module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False).last_hidden_state
    return hidden, F.pad(batch["labels"][:, 1:], (0, 1), value=-100)


def main(out: Path, steps: int, prompts_per_rank: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        for name in ("wrapper", "inner"):
            if name == "inner":
                bare_loop.hidden_and_labels = inner_hidden_and_labels
            model, losses = ddp_bare_loop.train_ddp(steps=steps, prompts_per_rank=prompts_per_rank)
            torch.save({"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "losses": losses},
                       out / f"{name}-rank{rank}.pt")
        dist.barrier()  # both ranks are done with every collective
    finally:
        # explicit, before exit, and after train_ddp's DDP wrapper is gone (its C++ Reducer holds the group;
        # see examples/ddp_bare_loop.py and grao.trainer.distributed.shutdown_distributed)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
