"""Where and how a training run computes: its device and its autocast precision."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from vlsearch.models.factory import resolve_device, resolve_precision


@dataclass(frozen=True)
class Compute:
    """A run's device and forward precision: ``fp32``, or ``bf16`` / ``fp16`` autocast."""

    device: torch.device
    precision: str

    @classmethod
    def resolve(cls, device: str, precision: str) -> "Compute":
        """From ``TrainConfig.device`` / ``precision`` (``auto``: bf16 or fp16 autocast on CUDA, fp32 on CPU)."""
        resolved = resolve_device(device)
        return cls(resolved, resolve_precision(precision, resolved))

    def autocast(self) -> AbstractContextManager:
        """The context forward passes run in."""
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)
