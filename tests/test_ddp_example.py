"""The README's DDP snippet (examples/ddp_bare_loop.py) on 2 CPU processes (gloo, torchrun).

The loss goes through the DDP wrapper's forward and takes the lm_head weight after it: both ranks end
with identical weights, equal to one process trained on the global batch. The same loop with the
backbone called on the inner module (``ddp.module.model(...)``, the pitfall) is run too, and its ranks
drift apart: the comparison does catch unsynchronised gradients. A tiny Llama built from a config.
"""

from __future__ import annotations

import importlib
import os
import re
import socket
import sys
from pathlib import Path

import pytest
import torch

from tests import procs

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
STEPS, PROMPTS_PER_RANK, WORLD, LR = 2, 2, 2, 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def examples():
    sys.path.insert(0, str(EXAMPLES))
    try:
        return {name: importlib.import_module(name) for name in ("toy_data", "bare_loop", "ddp_bare_loop")}
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[dict]]:
    """{"wrapper" | "inner": [rank 0 result, rank 1 result]} of one 2-process torchrun launch."""
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
           str(_free_port()), str(REPO / "tests" / "ddp_example_worker.py"), str(out), str(STEPS),
           str(PROMPTS_PER_RANK)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    procs.check(cmd, timeout=240, cwd=REPO, env=env)  # every process killed on a timeout (tests/procs.py)
    return {name: [torch.load(out / f"{name}-rank{r}.pt", weights_only=True) for r in range(WORLD)]
            for name in ("wrapper", "inner")}


def one_process(examples) -> dict[str, torch.Tensor]:
    """The same steps in one process, each on the global batch (both ranks' shares)."""
    toy, bare = examples["toy_data"], examples["bare_loop"]
    model = toy.tiny_model(seed=0)
    data = toy.toy_groups(num_prompts=STEPS * WORLD * PROMPTS_PER_RANK, vocab_size=model.config.vocab_size, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    per_step = WORLD * PROMPTS_PER_RANK
    for step in range(STEPS):
        bare.grao_loss(model, toy.collate_groups(data[step * per_step:(step + 1) * per_step])).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_ddp_through_the_wrapper_keeps_ranks_identical_and_equals_one_process(ranks, examples):
    r0, r1 = ranks["wrapper"]
    assert r0["losses"] != r1["losses"]  # the ranks did train on different shares
    for k in r0["state"]:
        torch.testing.assert_close(r1["state"][k], r0["state"][k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    single = one_process(examples)
    init = examples["toy_data"].tiny_model(seed=0).state_dict()
    assert "lm_head.weight" in single  # untied: the head's gradient needs DDP's reduction too
    moved = max((single[k] - init[k]).abs().max().item() for k in single)
    assert moved > 0.5 * LR
    for k, v in single.items():
        # first AdamW steps move each weight by about +-lr; rounding flips only near-zero gradients
        torch.testing.assert_close(r0["state"][k], v, rtol=0, atol=0.05 * LR, msg=lambda m, k=k: f"{k}: {m}")


def test_calling_the_inner_backbone_skips_ddp(ranks):
    """The pitfall is real: through ``ddp.module.model`` the ranks' weights differ (so the test above can fail)."""
    r0, r1 = ranks["inner"]
    differ = [k for k in r0["state"] if not torch.equal(r0["state"][k], r1["state"][k])]
    assert "lm_head.weight" in differ and len(differ) > len(r0["state"]) // 2


def test_readme_ddp_snippet_is_the_tested_code():
    """The README's DDP code block is copied from examples/ddp_bare_loop.py, line for line."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("examples/ddp_bare_loop.py)", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    norm = lambda text: "\n".join(line.strip() for line in text.strip().splitlines())
    assert norm(block) in norm((EXAMPLES / "ddp_bare_loop.py").read_text(encoding="utf-8"))
    assert "model.module.model" in section.split("```", 2)[2].split("###", 1)[0]  # the warning follows it
