"""Several processes: a 2-process CPU run (gloo) under ``accelerate launch`` equals a 1-process run.

Both runs train the demo model for two steps on the same global batch of P = 5 prompts (shards of 3 and
2 prompts: unequal, so a per-rank mean averaged over ranks, as plain DDP averaging would give, differs
from the global mean). With ``sample_seeding="prompt"`` every prompt is sampled with a seed of
(seed, step, prompt index), so the rollouts are identical; the gradients are reduced by torch's
DistributedDataParallel (``no_sync`` on every micro-batch but a rank's last; it averages over ranks) and
each rank's loss is scaled by world size x its share of the global number of prompts, so the updates are
the same up to float rounding. The 2-process run also uses row micro-batches (the surrogate-gradient
path), which give the ranks different numbers of passes.

The FSDP2 run (``accelerate launch --use_fsdp --fsdp_version 2``, or ``--parallel fsdp`` under torchrun)
shards the decoder layers and the root (tied embedding / lm_head) over the 2 ranks; FSDP reduce-scatters
the gradients itself (averaged, compensated by the trainer), the loss gets the full lm_head weight, and
the checkpoint is gathered into an ordinary HF checkpoint: the same comparison holds. Its row
micro-batches give the ranks 4 and 3 passes, so the rank with fewer adds a zero-loss pass.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from grao.trainer import shard_range
from tests import procs

REPO = Path(__file__).resolve().parents[1]
LR = 1e-3
ARGS = ["--model", "demo", "--task", "copy", "--task-train-size", "16", "--task-eval-size", "2", "--steps", "2",
        "--prompts-per-step", "5", "--group-size", "3", "--max-new-tokens", "4", "--lr", str(LR),
        "--save-every", "1", "--reward", "char_f1", "--sample-seeding", "prompt", "--loss-impl", "eager", "--seed", "3",
        "--no-progress", "--no-plot", "--tensorboard", "false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(_free_port())]


def _launcher(nproc: int, fsdp: bool = False) -> list[str]:
    """accelerate launch (FSDP2: --use_fsdp --fsdp_version 2), else torchrun (FSDP2: the --parallel flag)."""
    if importlib.util.find_spec("accelerate") is not None:
        mode = ["--use_fsdp", "--fsdp_version", "2"] if fsdp else ["--multi_gpu"]
        return [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(nproc),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port()), "-m", "grao.cli"]
    return _torchrun(nproc) + ["-m", "grao.cli"]


def _run(cmd: list[str], timeout: float = 240) -> str:
    """Run ``cmd`` (its processes in a session of their own, all killed on a timeout: tests/procs.py);
    asserts exit status 0 with the output in the message; returns the output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    env.pop("WORLD_SIZE", None)
    return procs.check(cmd, timeout=timeout, cwd=REPO, env=env)


def _weights(out: Path, step: int) -> dict:
    from safetensors.torch import load_file
    return load_file(str(out / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_shard_range_covers_every_prompt_once():
    for total in range(1, 12):
        for world in range(1, total + 1):
            spans = [shard_range(total, r, world) for r in range(world)]
            assert [i for a, b in spans for i in range(a, b)] == list(range(total))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """Output dir of the 1-process reference run (shared by the DDP and FSDP comparisons)."""
    one = tmp_path_factory.mktemp("one")
    _run([sys.executable, "-m", "grao.cli", "train", *ARGS, "--output-dir", str(one)])
    return one


@pytest.mark.parametrize("parallel, micro", [
    ("ddp", ["--micro-batch-rows", "3"]),
    # a budget that splits every group: its passes share one forward of the prompt (PromptKV), whose backward
    # is the last pass's, the one DDP reduces in
    ("ddp", ["--micro-batch-tokens", "8"]),
    ("fsdp", ["--micro-batch-rows", "3"]),
], ids=["ddp rows", "ddp split groups", "fsdp rows"])
def test_two_processes_match_one_process(tmp_path, one_process, parallel, micro):
    two, one = tmp_path / "two", one_process
    fsdp = parallel == "fsdp"
    extra = ["--parallel", "fsdp"] if fsdp and importlib.util.find_spec("accelerate") is None else []
    _run(_launcher(2, fsdp) + ["train", *ARGS, "--output-dir", str(two), *micro, *extra])

    m1, m2 = _metrics(one), _metrics(two)
    assert [r["step"] for r in m2] == [1, 2] and all(r["world_size"] == 2 for r in m2)
    assert all(r["parallel"] == parallel for r in m2)  # FSDP2 really sharded the model
    assert "world_size" not in m1[0]
    for a, b in zip(m1, m2):
        # identical rollouts: the same samples give exactly the same rewards and lengths
        assert (a["sample"], a["reward_mean"], a["reward_std"], a["completion_len_mean"]) == \
               (b["sample"], b["reward_mean"], b["reward_std"], b["completion_len_mean"])
        assert a["train_rows"] == b["train_rows"] == 5 * 4
        # the same loss and gradient norm: the global normalisation (a plain per-rank mean would differ)
        for key in ("loss", "loss_exploration", "loss_imitation", "loss_alignment", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert m1[0]["reward_std"] > 0  # the rewards vary, so identical reward statistics mean identical samples

    from grao import demo
    init = demo.build_model(demo.build_tokenizer(), seed=3).state_dict()
    for step in (1, 2):
        w1, w2 = _weights(one, step), _weights(two, step)
        assert w1.keys() == w2.keys()  # FSDP: full (gathered) weights, the tied lm_head saved once
        conf1, conf2 = (json.loads((d / "checkpoints" / f"step-{step:08d}" / "config.json").read_text())
                        for d in (one, two))
        assert conf2["architectures"] == conf1["architectures"] == ["LlamaForCausalLM"]
        moved = max((w1[k] - init[k]).abs().max().item() for k in w1)
        assert moved > 0.5 * LR  # the step did update the weights
        for k in w1:
            # first Adam steps move each weight by about +-lr; rounding flips only near-zero gradients
            torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=0.05 * LR, msg=f"step {step}: {k}")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts the process's threads in /proc")
def test_shutdown_joins_the_gloo_threads_without_deadlock():
    """Issue 22: rank 0 of a 2-process run hung on exit, ``~ProcessGroupGloo`` joining a gloo worker that
    waited for the GIL (the group's last reference was DDP's C++ Reducer, freed with the GIL held). 20 times
    the end of a DDP run, each in a fresh group (tests/shutdown_worker.py): shutdown_distributed joins the
    group's threads itself, without a deadlock (the old teardown hung within a few trials)."""
    out = _run(_torchrun(2) + [str(REPO / "tests" / "shutdown_worker.py"), "20"], timeout=180)
    for rank in (0, 1):
        assert f"rank {rank}: 20 trials, every group's threads joined in shutdown_distributed" in out


@pytest.mark.parametrize("var,version,match", [
    ("ACCELERATE_USE_FSDP", "1", "ACCELERATE_USE_FSDP is set with FSDP_VERSION=1: .*FSDP2 .* only"),
    ("ACCELERATE_USE_FSDP", None, "ACCELERATE_USE_FSDP is set with FSDP_VERSION=1: .*FSDP2 .* only"),
    ("ACCELERATE_USE_DEEPSPEED", None, "ACCELERATE_USE_DEEPSPEED is set: .*DeepSpeed / Megatron sharding is not"),
])
def test_unsupported_sharded_launch_is_refused(monkeypatch, var, version, match):
    import torch.distributed as dist

    from grao.trainer import init_distributed
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(var, "true")
    if version is None:
        monkeypatch.delenv("FSDP_VERSION", raising=False)
    else:
        monkeypatch.setenv("FSDP_VERSION", version)
    with pytest.raises(NotImplementedError, match=match):
        init_distributed(want_cuda=False)
    assert not dist.is_initialized()


def test_launch_parallel_reads_accelerate_fsdp2(monkeypatch):
    from grao.trainer import TrainConfig, launch_parallel
    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_MEGATRON_LM", "FSDP_VERSION"):
        monkeypatch.delenv(var, raising=False)
    assert launch_parallel("ddp") == "ddp" and launch_parallel("fsdp") == "fsdp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert launch_parallel("ddp") == "fsdp"
    with pytest.raises(ValueError, match="parallel must be one of"):
        TrainConfig(parallel="zero3").validate()
