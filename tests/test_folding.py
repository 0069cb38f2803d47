import torch
from torch import nn

from torchquant import fold_bn_params


def test_fold_matches_conv_bn_eval():
    conv = nn.Conv2d(3, 5, 3, bias=True)
    bn = nn.BatchNorm2d(5)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-1, 1)
    bn.eval()
    x = torch.randn(2, 3, 8, 8)
    w, b = fold_bn_params(conv.weight, conv.bias, bn)
    assert torch.allclose(nn.functional.conv2d(x, w, b), bn(conv(x)), atol=1e-5)
    w, b = fold_bn_params(conv.weight, None, bn)
    ref = bn(nn.functional.conv2d(x, conv.weight))
    assert torch.allclose(nn.functional.conv2d(x, w, b), ref, atol=1e-5)
