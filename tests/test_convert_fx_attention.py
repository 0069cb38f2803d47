"""quantize_model(method="fx") on hand-written attention: what gets a quantizer, and where values land."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchquant as tq

S = tq.QModuleState


class _Attention(nn.Module):
    """q/k/v projections, attention written out (``sdpa=False``) or as one F.scaled_dot_product_attention call."""

    def __init__(self, sdpa: bool, hidden: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.sdpa, self.heads = sdpa, heads
        self.q, self.k, self.v, self.out = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            probs = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
            y = probs @ v
        return self.out(y.transpose(1, 2).reshape(b, t, d))


def _on_grid(x: torch.Tensor, q: tq.Quantizer) -> bool:
    g = q.grid()
    steps = (g.from_int(g.to_int(x)) - x).abs() / g.scale
    return bool(steps.max() < 1e-3)


def _convert(sdpa: bool):
    net = _Attention(sdpa).eval()
    q = tq.quantize_model(
        net,
        lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True),
        lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()),
    )
    x = torch.randn(2, 6, 16)
    with torch.no_grad(), tq.qmodule_state(q, S.CALIBRATION):
        q(x)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    return net, q, x


@pytest.mark.parametrize("sdpa", [False, True], ids=["written-out", "sdpa"])
def test_attention_inputs_and_outputs_are_quantized(sdpa):
    net, q, x = _convert(sdpa)
    ops = [r["layers"] for r in tq.summary_rows(q) if r["kind"] == "QOp"]
    assert ops == (["scaled_dot_product_attention"] if sdpa else ["matmul", "truediv", "softmax", "matmul"])
    attention = q.scaled_dot_product_attention if sdpa else q.matmul_1  # the op that reads the values
    seen = {}
    attention.register_forward_pre_hook(lambda mod, args: seen.update(args=args))
    attention.register_forward_hook(lambda mod, args, out: seen.update(out=out))
    with torch.no_grad():
        y = q(x)
    # the values (and for sdpa the queries and keys) are the projections' quantized outputs, in heads
    for t, proj in zip(seen["args"][-3:] if sdpa else seen["args"][1:], (q.q, q.k, q.v)[-3 if sdpa else 2 :]):
        assert _on_grid(t, proj.acts_quantizer)
    assert _on_grid(seen["out"], attention.acts_quantizer)
    if not sdpa:  # the probabilities
        assert _on_grid(seen["args"][0], q.softmax.acts_quantizer)
    ref = net(x)
    assert 10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean()) > 25
