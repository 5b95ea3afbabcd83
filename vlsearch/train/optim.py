"""The optimisation of a training run: AdamW with open_clip's parameter groups, a cosine
learning-rate schedule with linear warm-up, gradient clipping, and the fp16 GradScaler."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from vlsearch.train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as in open_clip: no weight decay on biases, norms, 1-d params and logit_scale."""

    def no_decay(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
    ]


def cosine_with_warmup(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        decay = max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / decay)))

    return factor


class Optimization:
    """Updates a model's trainable parameters, one optimizer step per :meth:`step`; the learning
    rate follows :func:`cosine_with_warmup` (a ``LambdaLR`` stepped once per step, used or skipped)."""

    def __init__(self, model: nn.Module, config: TrainConfig, total_steps: int, device: torch.device,
                 scale_gradients: bool):
        self.optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                                           betas=tuple(config.betas), eps=config.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(config.warmup_steps, total_steps))
        self.scaler = torch.amp.GradScaler(device.type, enabled=scale_gradients)
        self.grad_clip = config.grad_clip

    def step(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss``, update the weights and advance the schedule."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def skip(self) -> None:
        """Advance the schedule past a step that had no usable batch."""
        self.scheduler.step()
