"""The optimisation of a training run: AdamW with open_clip's parameter groups, open_clip's
cosine learning-rate schedule with linear warm-up, gradient clipping, and the fp16 GradScaler."""

from __future__ import annotations

from typing import Any

import torch
from open_clip_train.scheduler import cosine_lr
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


class Optimization:
    """Updates a model's trainable parameters, one optimizer step per :meth:`step`.

    The learning rate of step ``s`` (0-based) is open_clip's ``cosine_lr``: ``lr * (s + 1) / warmup``
    during warm-up, then ``lr * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2``. It is a function
    of the step alone, so a resumed run needs no scheduler state.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, total_steps: int, device: torch.device,
                 scale_gradients: bool):
        self.optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                                           betas=tuple(config.betas), eps=config.eps)
        self.set_lr = cosine_lr(self.optimizer, config.lr, config.warmup_steps, total_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=scale_gradients)
        self.grad_clip = config.grad_clip

    def step(self, loss: torch.Tensor, step: int) -> None:
        """Back-propagate ``loss`` and update the weights at step ``step``'s learning rate."""
        self.set_lr(step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
