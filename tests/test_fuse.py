"""BatchNorm folding (vlsearch.models.batchnorm): same outputs, refused where it would change them."""

from __future__ import annotations

import torch
from torch import nn

from vlsearch.models.batchnorm import conv_bn_pairs, fold_batchnorm


def _trained_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():  # non-trivial statistics and affine parameters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn.eval()


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = _trained_bn(8)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class NormFirst(nn.Module):
    """Registered conv-then-bn, but the data flows through the norm first: not foldable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.bn = _trained_bn(8)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_folding_removes_the_norm_and_keeps_the_output():
    torch.manual_seed(0)
    model = nn.Sequential(ConvBnRelu(), nn.Conv2d(8, 8, 3, padding=1), _trained_bn(8)).eval()
    x = torch.randn(2, 3, 16, 16)
    folded, n = fold_batchnorm(model, lambda m: m(x))
    assert n == 2 and folded is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is left alone
    y = torch.randn(3, 3, 16, 16)  # another input than the probe
    torch.testing.assert_close(folded(y), model(y), atol=1e-5, rtol=1e-5)


def test_a_pair_whose_data_flow_differs_is_not_folded():
    torch.manual_seed(0)
    model = NormFirst().eval()
    assert len(conv_bn_pairs(model)) == 1  # looks foldable by registration order...
    x = torch.randn(2, 8, 5, 5)
    kept, n = fold_batchnorm(model, lambda m: m(x))
    assert n == 0 and kept is model  # ...but the probe shows the output would change
    assert isinstance(model.bn, nn.BatchNorm2d)


def test_training_mode_and_modules_without_pairs_are_untouched():
    model = ConvBnRelu().train()
    assert fold_batchnorm(model, lambda m: m(torch.randn(2, 3, 8, 8)))[1] == 0
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    assert fold_batchnorm(plain, lambda m: m(torch.randn(2, 4))) == (plain, 0)
