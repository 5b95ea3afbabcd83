"""Inference-only graph tidying: fold eval-mode BatchNorm into the convolution before it.

A convolutional image tower (vlsearch-small's EfficientNet-Lite0) spends about a quarter of its
CPU forward pass in ``batch_norm``, an affine map that can be folded into the preceding
convolution's weights and bias (``torch.nn.utils.fusion.fuse_conv_bn_weights``). timm's
``BatchNormAct2d`` (norm + dropout + activation) keeps its dropout and activation.

Pairs are found as a ``Conv2d`` child directly followed by a ``BatchNorm2d`` child of the same
module (the order timm's blocks register them in); since registration order is not data flow in
general, :func:`fold_batchnorm` checks the folded module against the original on a probe input
and keeps the original when they differ.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

log = logging.getLogger(__name__)

#: Largest relative difference between folded and original outputs that counts as the same.
TOLERANCE = 1e-4


def conv_bn_pairs(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """``(parent, conv name, bn name)`` for each Conv2d child followed by a foldable BatchNorm2d child."""
    pairs = []
    for parent in module.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and bn.running_mean is not None and bn.num_features == conv.out_channels):
                pairs.append((parent, conv_name, bn_name))
    return pairs


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What a BatchNorm2d does after normalising: timm's BatchNormAct2d drops out and activates."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
            if m is not None and not isinstance(m, nn.Identity)]
    return nn.Sequential(*rest) if rest else nn.Identity()


def _fold_pairs(module: nn.Module) -> int:
    pairs = conv_bn_pairs(module)
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        conv.weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                 bn.weight, bn.bias)
        conv.bias = bias
        setattr(parent, bn_name, _after_norm(bn))
    return len(pairs)


@torch.no_grad()
def fold_batchnorm(module: nn.Module, probe: Callable[[nn.Module], torch.Tensor]) -> tuple[nn.Module, int]:
    """``(module with its Conv2d+BatchNorm2d pairs folded, pairs folded)``; eval mode only.

    ``probe(m)`` runs ``m`` on a fixed input; the folded copy is kept only when its output matches
    the original's within :data:`TOLERANCE` (relative), else ``(module, 0)``."""
    if module.training or not conv_bn_pairs(module):
        return module, 0
    folded = copy.deepcopy(module)
    n = _fold_pairs(folded)
    want, got = probe(module).float(), probe(folded).float()
    err = float((want - got).abs().max() / want.abs().max().clamp_min(1e-12))
    if err > TOLERANCE:
        log.warning("BatchNorm folding changed the output (relative error %.2g); kept the unfolded model", err)
        return module, 0
    log.info("folded %d BatchNorm layers into their convolutions (relative error %.1g)", n, err)
    return folded, n
