"""GRAO inside the Hugging Face ``Trainer``: a custom ``compute_loss`` calling the fused loss.

The dataset holds one item per prompt: its G sampled completions and its reference answer,
tokenised, with precomputed rewards (see ``toy_data.toy_groups`` for the layout). The loss is
computed from the backbone's last hidden states and the lm_head weight by
``grao_kernels.fused_linear_grao_loss``: no [tokens x vocab] logits are built.

    python examples/hf_trainer_grao.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from grao_kernels import fused_linear_grao_loss


class GRAOTrainer(Trainer):
    """``Trainer`` whose loss is GRAO on batches from ``collate_groups`` (rows [P*(G+1), T], rewards [P, G+1])."""

    def __init__(self, *args, beta: float = 0.5, lam: float = 0.6, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta, self.lam = beta, lam
        # The loss is a mean over prompts, not a token sum: let Trainer divide it by the
        # gradient-accumulation steps as it does for any plain loss.
        self.model_accepts_loss_kwargs = False
        self.grao_parts = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Through model(...) so DDP / accelerate wrappers stay in the loop; logits_to_keep=1 limits the
        # model's own lm_head to one position, hidden_states[-1] is the final (normed) hidden state.
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    output_hidden_states=True, logits_to_keep=1, use_cache=False)
        hidden = out.hidden_states[-1]
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        weight = head.weight.to(hidden.dtype)  # a no-op unless autocast (bf16=True) made hidden bf16
        bias = None if head.bias is None else head.bias.to(hidden.dtype)
        labels = F.pad(inputs["labels"][:, 1:], (0, 1), value=-100)  # hidden state t predicts token t+1
        loss, stats = fused_linear_grao_loss(hidden, weight, labels, inputs["rewards"], bias=bias,
                                             beta=self.beta, lam=self.lam)
        self.grao_parts = {k: stats[k] for k in ("exploration", "imitation", "alignment")}
        return (loss, out) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:  # the three GRAO components of the last micro-batch
            logs.update({f"loss_{k}": float(v) for k, v in self.grao_parts.items()})
        super().log(logs, *args, **kwargs)


def build_trainer(output_dir: str, *, max_steps: int = 5, num_prompts: int = 8, group: int = 4,
                  learning_rate: float = 1e-3, seed: int = 0, **training_args) -> GRAOTrainer:
    from toy_data import collate_groups, tiny_model, toy_groups

    model = tiny_model(seed=seed)
    settings = dict(per_device_train_batch_size=2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                    report_to="none", use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=False,
                    disable_tqdm=True)
    settings.update(training_args)
    # remove_unused_columns=False: keep "rewards", which the model's forward does not take
    args = TrainingArguments(output_dir=output_dir, max_steps=max_steps, learning_rate=learning_rate, seed=seed,
                             remove_unused_columns=False, **settings)
    data = toy_groups(num_prompts, group, model.config.vocab_size, seed=seed)
    return GRAOTrainer(model=model, args=args, train_dataset=data, data_collator=collate_groups, beta=0.5, lam=0.6)


def main(output_dir: str = "runs/hf_trainer_grao", max_steps: int = 5) -> GRAOTrainer:
    trainer = build_trainer(output_dir, max_steps=max_steps)
    trainer.train()  # logs loss, loss_exploration, loss_imitation, loss_alignment every step
    return trainer


if __name__ == "__main__":
    main()
