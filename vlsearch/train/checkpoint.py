"""Training checkpoints: ``last.pt`` (weights + full training state, for ``resume=True``) and
``model.pt`` (final weights + provenance), both loadable with ``load_model(name, pretrained=path)``."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch

from vlsearch.core.errors import TrainingError
from vlsearch.models.factory import save_checkpoint
from vlsearch.train.config import plain

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
FINAL_CHECKPOINT = "model.pt"


def run_state(run: Any) -> dict[str, Any]:
    """Everything ``resume`` needs besides the weights: step, optimiser, scaler, RNG, history (the
    learning rate is a function of the step: no scheduler state)."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "step": run.step,
        "total_steps": run.total_steps,
        "steps_per_epoch": run.steps_per_epoch,
        "config": plain(run.config.to_dict()),
        "pretrained": run.pretrained_tag,
        "optimizer": run.optim.optimizer.state_dict(),
        "scaler": run.optim.scaler.state_dict(),
        "rng": rng,
        "losses": list(run.losses),
        "val": list(run.val),
    }

def save_last(run: Any) -> Path:
    """Write ``last.pt`` (weights + :func:`run_state`) atomically."""
    return save_checkpoint(run.model, run.out_dir / LAST_CHECKPOINT, name=run.config.model,
                           extra={"train_state": run_state(run)})

def load_last(run: Any) -> None:
    """Restore a run from its ``last.pt``; refuses another model or another data layout. (The
    ``scheduler`` state that earlier versions wrote is not needed: the learning rate follows the step.)"""
    path = run.out_dir / LAST_CHECKPOINT
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        state = payload["vlsearch"]["train_state"]
    except Exception as exc:
        raise TrainingError(f"cannot resume from {path}: {type(exc).__name__}: {exc}") from exc
    saved = state["config"]
    if saved.get("model") != run.config.model:
        raise TrainingError(f"{path} was trained as {saved.get('model')}, not {run.config.model}")
    changed = sorted(k for k, v in plain(run.config.to_dict()).items() if saved.get(k) != v)
    if changed:
        log.warning("resuming with changed settings: %s", ", ".join(changed))
    if state["steps_per_epoch"] != run.steps_per_epoch:
        raise TrainingError(f"{path} had {state['steps_per_epoch']} steps per epoch, this run {run.steps_per_epoch}: "
                            "resume needs the same data, val_fraction and batch_size")
    run.model.load_state_dict(payload["state_dict"])
    run.optim.optimizer.load_state_dict(state["optimizer"])
    run.optim.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    run.step, run.losses, run.val = int(state["step"]), list(state["losses"]), list(state["val"])
    log.info("resumed %s at step %d", path, run.step)

def save_final(run: Any, seconds: float) -> Path:
    """Write ``model.pt``: the weights and their provenance."""
    extra = {
        "config": plain(run.config.to_dict()),
        "pretrained_init": run.pretrained_tag,
        "steps": run.step,
        "final_loss": run.losses[-1] if run.losses else None,
        "val": run.val[-1] if run.val else None,
        "train_seconds": round(seconds, 1),
    }
    return save_checkpoint(run.model, run.out_dir / FINAL_CHECKPOINT, name=run.config.model,
                           half=run.config.half_final, extra=extra)
