"""grao: the GRAO algorithm layer (eager reference, baselines, trainer and CLI).

The eager reference is the spec (docs/spec.md) in code; it lives in ``grao_kernels.reference``
(re-exported here and in ``grao.reference``), and the fused kernels in ``grao_kernels`` share its
signature and are tested against it. ``grao`` depends on ``grao_kernels``, never the reverse.
"""

from grao.baselines import (dpo_loss, gae_advantages, grpo_advantages, grpo_loss, masked_whiten, ppo_loss, ppo_rewards,
                            sft_loss)
from grao.reference import (COMPONENTS, GRAOInputError, grao_loss, grao_objective, grao_row_grad, group_advantages,
                            linear_grao_loss, linear_logits, sequence_logprob, token_logprobs)

__version__ = "0.1.0"

__all__ = [
    "GRAOInputError", "COMPONENTS", "token_logprobs", "sequence_logprob", "group_advantages", "grao_objective",
    "grao_row_grad", "grao_loss", "linear_logits", "linear_grao_loss", "sft_loss", "dpo_loss", "grpo_advantages",
    "grpo_loss", "ppo_rewards", "gae_advantages", "masked_whiten", "ppo_loss", "__version__",
]
