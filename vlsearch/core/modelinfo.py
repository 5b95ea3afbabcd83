"""``ModelInfo``: what identifies an embedding space (kept free of torch so readers import fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    """What identifies an embedding space: recorded in every collection manifest."""

    name: str
    pretrained: str | None
    dim: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pretrained": self.pretrained, "dim": self.dim}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelInfo":
        return cls(name=data["name"], pretrained=data.get("pretrained"), dim=int(data["dim"]))
