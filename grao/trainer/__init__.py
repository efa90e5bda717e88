"""A thin GRAO trainer for Hugging Face causal LMs (any ``AutoModelForCausalLM``), and its baselines.

Start at :class:`Trainer` (``trainer.py``): :meth:`Trainer.train_step` is one step, a method per phase.
Each module owns one job:

* ``config.py``      TrainConfig: every option, its default, its help text and its validation
* ``model.py``       loading the policy and tokenizer (LoRA checkpoints too); backbone / lm_head split; autocast
* ``lora.py``        LoRA adapters through peft (imported only for --lora-r), the weights' dtype (--model-dtype)
* ``rollout.py``     sampling G completions per prompt and scoring them (Rollout, RolloutEngine)
* ``forward.py``     the policy's forward for the losses (through DDP / FSDP2) and the fused / eager loss choice
* ``methods.py``     one object per method (GRAO, GRPO, SFT, DPO): its rows, update, normaliser, checks
* ``plan.py``        the micro-batch planner: which row ranges go through one forward/backward pass
* ``update.py``      the per-method losses of one step, forward and backward over the planned micro-batches
* ``distributed.py`` process group, DistributedDataParallel and FSDP2 set-up, the few collectives
* ``checkpoint.py``  atomic checkpoints, resume, repair after a kill
* ``metrics.py``     step metrics, metrics.jsonl / TensorBoard, plots and console curves
* ``trainer.py``     Trainer: wires the above

The names below are the package's public API (``from grao.trainer import Trainer, TrainConfig``).
"""

from grao.trainer.checkpoint import (
    STATE_FILE,
    checkpoint_dirs,
    recover_interrupted_saves,
)
from grao.trainer.config import LOSS_IMPLS, METHODS, PARALLELS, ConfigError, TrainConfig
from grao.trainer.distributed import (
    init_distributed,
    launch_parallel,
    shard_range,
    shutdown_distributed,
)
from grao.trainer.forward import LossBackend, PolicyForward, pad_rows, resolve_loss_impl
from grao.trainer.methods import REGISTRY, Method, accumulate_gradients, get_method
from grao.trainer.metrics import ascii_curve, peak_memory_bytes, plot_history, smooth
from grao.trainer.model import lm_parts, load_model_and_tokenizer
from grao.trainer.plan import chunk_ranges, plan_micro_batches
from grao.trainer.rollout import Rollout, RolloutEngine, prompt_seed
from grao.trainer.trainer import Trainer, make_schedule

__all__ = [
    "Trainer", "TrainConfig", "METHODS", "LOSS_IMPLS", "PARALLELS", "Rollout", "RolloutEngine", "PolicyForward",
    "LossBackend", "accumulate_gradients", "pad_rows", "chunk_ranges", "resolve_loss_impl", "lm_parts",
    "load_model_and_tokenizer", "make_schedule", "prompt_seed", "checkpoint_dirs", "recover_interrupted_saves",
    "STATE_FILE", "init_distributed", "launch_parallel", "shard_range", "shutdown_distributed", "plot_history",
    "ascii_curve", "smooth", "peak_memory_bytes", "ConfigError", "Method", "REGISTRY", "get_method",
    "plan_micro_batches",
]
