"""Cross-layer equalization and high-bias absorption (Nagel et al. 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction").

Per-tensor weight quantization suffers when the output channels of a layer have
very different ranges (typical of depthwise convolutions after BatchNorm is
folded). For two consecutive layers ``y = B(f(A(x)))`` with ``f`` positive
homogeneous (``f(z / s) = f(z) / s`` for ``s > 0``: ReLU, LeakyReLU, identity),
scaling output channel ``i`` of ``A`` by ``1 / s_i`` and input channel ``i`` of
``B`` by ``s_i`` leaves ``y`` unchanged; ``s_i = sqrt(r1_i / r2_i)`` makes both
ranges ``sqrt(r1_i r2_i)``.

Which pairs are found: two :class:`~torchquant.qmodules.QWrapper` s that follow
each other in module order inside a container, looking through nested
``nn.Sequential`` s and skipping ``nn.Identity`` (the layout that
``quantize_model(method="swap")`` produces: ``expand -> depthwise -> project``
in an inverted residual, ``conv1 -> conv2`` in a residual block). A module of
any other type between them (pooling, ``Flatten``, a whole block) breaks the
chain, so pairs across residual adds or concatenations are never formed. With
``example_input`` the pairs are also checked on a forward pass: the output
tensor of ``A`` must be the input tensor of ``B``.

ReLU6 is only approximately positive homogeneous: ``relu6(z / s) * s`` clips at
``6 s``. With ``relu6="clip"`` (default) the ReLU6 between the two layers is
replaced by a :class:`ChannelClip` whose per-channel upper bound ``6 / s_i``
keeps the float output exactly equal; ``relu6="skip"`` leaves pairs through
ReLU6 alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..folding import fold_wrapper_bn_
from ..layers import BN_FOR_LAYER
from ..qmodules import QModule, QModuleState, QWrapper
from ..quantizers import RangeQuantizer
from ..utils import call_model, restoring_states, set_qmodule_state
from ._common import Snapshot, require_qmodules, tied_weights
from .registry import register_ptq_algorithm

__all__ = ["ChannelClip", "EqualizationResult", "equalize", "find_layer_pairs", "fold_qwrapper_batchnorm"]


class ChannelClip(nn.Module):
    """``clamp(x, 0, upper[c])`` with one upper bound per channel (``dim``: 1 after a convolution,
    -1 after a ``Linear``, whose features are last: ``(N, C)`` or ``(N, T, C)``).

    What a ReLU6 becomes after cross-layer equalization rescaled its input
    channels by ``1 / s``: ``upper = 6 / s``.

    Args:
        upper: ``(C,)`` positive upper bounds.
        dim: the channel dimension of the input.
    """

    upper: Tensor
    dim: int = 1  # a module pickled before it had a dim bounds channels first

    def __init__(self, upper: Tensor, dim: int = 1) -> None:
        super().__init__()
        if upper.dim() != 1:
            raise ValueError(f"ChannelClip: upper must have shape (C,), got {tuple(upper.shape)}")
        if dim not in (1, -1):
            raise ValueError(f"ChannelClip: dim must be 1 (channels first) or -1 (features last), got {dim}")
        self.register_buffer("upper", upper.detach().clone())
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        # (C,) -> (1, C, 1, ...) channels first, or along the last dimension
        shape = [1, -1] + [1] * (x.dim() - 2) if self.dim == 1 and x.dim() > 1 else [-1]
        return torch.minimum(torch.relu(x), self.upper.reshape(shape))

    def extra_repr(self) -> str:
        return f"channels={self.upper.numel()}" + (", dim=-1" if self.dim == -1 else "")


def _layer_in_out(layer: nn.Module) -> tuple[int, int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, 1
    return layer.in_channels, layer.out_channels, layer.groups


def fold_qwrapper_batchnorm(wrapper: QWrapper) -> tuple[Tensor, Tensor] | None:
    """Fold ``wrapper.bn`` (eval statistics) into ``wrapper.layer`` and set ``bn`` to ``None``.

    The layer gets a bias if it had none. Returns the per-channel mean and
    standard deviation of the BatchNorm's output as modelled by its affine
    parameters (``beta``, ``|gamma|``), which high-bias absorption and analytic
    bias correction use; ``None`` if there was no BatchNorm.
    """
    bn = wrapper.bn
    if bn is None:
        return None
    c, dev = bn.num_features, wrapper.layer.weight.device
    beta = bn.bias.detach().clone() if bn.bias is not None else torch.zeros(c, device=dev)
    gamma = bn.weight.detach().abs().clone() if bn.weight is not None else torch.ones(c, device=dev)
    fold_wrapper_bn_(wrapper)
    return beta, gamma


def _flat_children(module: nn.Module) -> Iterator[nn.Module]:
    for c in module.children():
        if isinstance(c, nn.Identity):
            continue
        if isinstance(c, nn.Sequential):
            yield from _flat_children(c)
        else:
            yield c


_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, ChannelClip)


def _pair_ok(a: QWrapper, b: QWrapper, relu6: str) -> bool:
    # Linear and Conv pairs only: an Embedding feeds no layer's input channels, and Conv1D's (in, out) layout
    # is not what the scaling arithmetic assumes.
    if type(a.layer) is not type(b.layer) or type(a.layer) not in BN_FOR_LAYER:
        return False
    if a.weight_is_computed or b.weight_is_computed:  # weight norm: rescaling `weight` would not last
        return False
    act_ok = a.act is None or isinstance(a.act, _HOMOGENEOUS) or (isinstance(a.act, nn.ReLU6) and relu6 == "clip")
    return act_ok and _layer_in_out(a.layer)[1] == _layer_in_out(b.layer)[0]


def find_layer_pairs(model: nn.Module, example_input: Any = None, *, relu6: str = "clip") -> list[tuple[str, str]]:
    """Qualified names of the consecutive QWrapper pairs cross-layer equalization rescales.

    See the module docstring for which pairs are found.

    Args:
        model: a model with QWrappers.
        example_input: optional batch (as for :func:`~torchquant.ptq.calibrate`); if given,
            a pair is kept only if ``A``'s output tensor is ``B``'s input tensor in a forward pass.
        relu6: ``"clip"`` to accept pairs through ReLU6, ``"skip"`` to reject them.

    Returns:
        ``[(name_a, name_b), ...]`` in module order.
    """
    if relu6 not in ("clip", "skip"):
        raise ValueError(f"find_layer_pairs: relu6 must be 'clip' or 'skip', got {relu6!r}")
    names = {m: n for n, m in model.named_modules()}
    pairs: dict[tuple[QWrapper, QWrapper], None] = {}
    for m in model.modules():
        if isinstance(m, QModule):
            continue
        flat = list(_flat_children(m))
        for a, b in itertools.pairwise(flat):
            if isinstance(a, QWrapper) and isinstance(b, QWrapper) and _pair_ok(a, b, relu6):
                pairs[(a, b)] = None
    position = {m: i for i, m in enumerate(names)}
    # A weight other modules hold too (a module listed twice) would be rescaled for all of them.
    tied = tied_weights(model, [(n, m) for m, n in names.items() if isinstance(m, QWrapper)])
    found = sorted((p for p in pairs if p[0] not in tied and p[1] not in tied), key=lambda p: position[p[0]])
    if example_input is not None and found:
        outs: dict[QWrapper, Tensor] = {}
        ins: dict[QWrapper, Tensor] = {}
        calls: dict[tuple[QWrapper, str], int] = {}
        handles = []

        def output(mod: nn.Module, args: tuple, out: Tensor) -> None:  # returns None: the output stays
            outs.setdefault(mod, out)
            calls[mod, "out"] = calls.get((mod, "out"), 0) + 1

        def input_(mod: nn.Module, args: tuple) -> None:
            ins.setdefault(mod, args[0])
            calls[mod, "in"] = calls.get((mod, "in"), 0) + 1

        for a, b in found:
            handles.append(a.register_forward_hook(output))
            handles.append(b.register_forward_pre_hook(input_))
        try:
            # eval: a forward pass in training mode would update the BatchNorm statistics; BYPASSED: the float
            # model (before calibration there are no ranges to quantize with, and no mode may observe this input)
            with restoring_states(model), torch.no_grad():
                model.eval()
                set_qmodule_state(model, QModuleState.BYPASSED)
                call_model(model, example_input, "find_layer_pairs")
        finally:
            for h in handles:
                h.remove()
        # A layer called more than once (shared weights) would be rescaled for every call, not only for the pair's.
        once = {m for (m, _), n in calls.items() if n == 1}
        found = [(a, b) for a, b in found if a in outs and b in ins and outs[a] is ins[b] and a in once and b in once]
    return [(names[a], names[b]) for a, b in found]


@dataclass
class EqualizationResult:
    """What :func:`equalize` did.

    Attributes:
        pairs: the equalized ``(name_a, name_b)`` pairs.
        scales: per pair name ``name_a``, the cumulative ``(C,)`` scales ``s`` (``A``'s
            channel ``i`` was divided by ``s_i``).
        absorbed: per ``name_a``, the ``(C,)`` bias moved from ``A`` into ``B``.
        bn_stats: per QWrapper name whose BatchNorm was folded, the ``(mean, std)`` of
            its pre-activation output per channel (after rescaling and absorption),
            for :func:`~torchquant.ptq.bias_correction` with ``method="analytic"``.
    """

    pairs: list[tuple[str, str]] = field(default_factory=list)
    scales: dict[str, Tensor] = field(default_factory=dict)
    absorbed: dict[str, Tensor] = field(default_factory=dict)
    bn_stats: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


def _out_ranges(w: Tensor) -> Tensor:
    return w.detach().abs().flatten(1).amax(1)  # (C_out, ...) -> (C_out,)


def _in_view(w: Tensor, groups: int) -> Tensor:
    # (C_out, C_in / g, ...) -> (g, C_out / g, C_in / g, k) with input channel i at [i // cpg, :, i % cpg]
    c_out, cpg = w.shape[0], w.shape[1]
    return w.reshape(groups, c_out // groups, cpg, -1)


def _in_ranges(w: Tensor, groups: int) -> Tensor:
    v = _in_view(w.detach().abs(), groups)
    return v.amax(dim=(1, 3)).reshape(-1)  # (g, cpg) -> (C_in,)


def _scale_in(w: Tensor, groups: int, s: Tensor) -> Tensor:
    v = _in_view(w, groups)
    return (v * s.reshape(groups, 1, -1, 1)).reshape(w.shape)


def _reset_ranges(wrapper: QWrapper) -> None:
    for q in wrapper.quantizers().values():
        if isinstance(q, RangeQuantizer):
            q.range_observer.reset()


def equalize(
    model: nn.Module,
    *,
    example_input: Any = None,
    iterations: int = 20,
    absorb_bias: bool = True,
    relu6: str = "clip",
    tolerance: float = 1e-4,
) -> EqualizationResult:
    """Cross-layer equalization (and high-bias absorption) of ``model`` in place.

    BatchNorm is folded into every QWrapper of a pair first. Then, ``iterations``
    times or until every scale is within ``tolerance`` of 1, each pair is
    rescaled with ``s_i = sqrt(r1_i / r2_i)`` (``r1_i``: max ``|W_A|`` of output
    channel ``i``; ``r2_i``: max ``|W_B|`` of input channel ``i``; a depthwise
    ``B`` has one weight row per input channel). In float the outputs are
    unchanged (up to rounding) when ``absorb_bias=False``.

    High-bias absorption (Nagel et al. 2019, sec. 4.2): for a pair through a
    ReLU-like activation whose ``A`` had BatchNorm with ``(beta, gamma)``,
    ``c = max(0, beta - 3 |gamma|)`` (scaled like the channel) is almost always
    passed through unchanged, so it is subtracted from ``A``'s bias (and from a
    ChannelClip's bound) and ``B``'s bias gains ``B``'s weights applied to ``c``.
    This is exact where the pre-activation stays above ``c`` and away from ``B``'s
    zero padding, approximate elsewhere.

    The ranges of the quantizers of rescaled QWrappers (RangeQuantizers) are reset:
    calibrate afterwards. Other quantizer types must be re-initialised by the user.

    Args:
        model: a model with QWrappers (e.g. from ``quantize_model(method="swap")``).
        example_input: optional batch used to verify the pairs (see :func:`find_layer_pairs`).
        iterations: maximum passes over all pairs (chains need several).
        absorb_bias: do high-bias absorption after equalization.
        relu6: ``"clip"`` or ``"skip"``, see the module docstring.
        tolerance: stop when ``max |s - 1|`` of a pass is below this.

    Returns:
        An :class:`EqualizationResult`.

    Raises:
        ValueError: ``model`` has no QModule, no pair is found, or an argument is out of range.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torchquant as tq
        >>> net = tq.quantize_model(nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), nn.Conv2d(4, 3, 1)),
        ...                         None, None, method="swap")
        >>> x = torch.randn(2, 2, 5, 5)
        >>> ref = net(x)
        >>> tq.ptq.equalize(net, absorb_bias=False).pairs
        [('0', '2')]
        >>> torch.allclose(net(x), ref, atol=1e-5)
        True
    """
    require_qmodules(model, "equalize")
    if relu6 not in ("clip", "skip"):
        raise ValueError(f"equalize: relu6 must be 'clip' or 'skip', got {relu6!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"equalize: iterations must be an int >= 1, got {iterations!r}")
    pair_names = find_layer_pairs(model, example_input, relu6=relu6)
    if not pair_names:
        raise ValueError(
            f"equalize: found no consecutive QWrapper pairs in {type(model).__name__} "
            "(Conv->Conv or Linear->Linear inside an nn.Sequential or block, through ReLU/LeakyReLU/ReLU6/no "
            "activation; layers sharing their weight or, with example_input, called more than once per forward "
            "pass are left out); see torchquant.ptq.equalize's documentation"
        )
    mods = dict(model.named_modules())
    pairs = [(mods[a], mods[b]) for a, b in pair_names]
    result = EqualizationResult(pairs=pair_names)
    snapshot = Snapshot(model)
    try:
        stats: dict[QWrapper, tuple[Tensor, Tensor]] = {}
        wrappers = list(dict.fromkeys([w for p in pairs for w in p]))
        for w in wrappers:
            st = fold_qwrapper_batchnorm(w)
            if st is not None:
                stats[w] = st
        for a, _ in pairs:
            if isinstance(a.act, nn.ReLU6):
                w = a.layer.weight  # the bound in the layer's dtype: a float32 one would promote a half model
                upper = torch.full((_layer_in_out(a.layer)[1],), 6.0, device=w.device, dtype=w.dtype)
                a.act = ChannelClip(upper, dim=-1 if isinstance(a.layer, nn.Linear) else 1)
        name_of = {m: n for n, m in model.named_modules()}
        cumulative = {a: torch.ones(_layer_in_out(a.layer)[1], device=a.layer.weight.device) for a, _ in pairs}
        with torch.no_grad():
            for _ in range(iterations):
                worst = 0.0
                for a, b in pairs:
                    groups = _layer_in_out(b.layer)[2]
                    r1 = _out_ranges(a.layer.weight)
                    r2 = _in_ranges(b.layer.weight, groups)
                    s = torch.sqrt(r1 / r2)
                    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
                    _apply_scale(a, b, s, stats)
                    cumulative[a] *= s
                    worst = max(worst, float((s - 1).abs().max()))
                if worst < tolerance:
                    break
            if absorb_bias:
                for a, b in pairs:
                    if a not in stats or not isinstance(a.act, _HOMOGENEOUS):
                        continue
                    result.absorbed[name_of[a]] = _absorb(a, b, stats)
        for a, _ in pairs:
            result.scales[name_of[a]] = cumulative[a]
        for w, st in stats.items():
            result.bn_stats[name_of[w]] = st
        for w in wrappers:
            _reset_ranges(w)
    except BaseException:
        snapshot.restore()
        raise
    return result


def _apply_scale(a: QWrapper, b: QWrapper, s: Tensor, stats: dict) -> None:
    la, lb = a.layer, b.layer
    shape = [-1] + [1] * (la.weight.dim() - 1)
    la.weight.div_(s.reshape(shape))
    if la.bias is not None:
        la.bias.div_(s)
    lb.weight.copy_(_scale_in(lb.weight, _layer_in_out(lb)[2], s))
    if isinstance(a.act, ChannelClip):
        a.act.upper.div_(s)
    if a in stats:
        mean, std = stats[a]
        stats[a] = (mean / s, std / s)


def _absorb(a: QWrapper, b: QWrapper, stats: dict) -> Tensor:
    mean, std = stats[a]
    c = torch.clamp(mean - 3 * std, min=0.0)  # (C,)
    if isinstance(a.act, ChannelClip):
        c = torch.minimum(c, a.act.upper)
        a.act.upper.sub_(c)
    la, lb = a.layer, b.layer
    la.bias.sub_(c)
    groups = _layer_in_out(lb)[2]
    v = _in_view(lb.weight, groups).sum(-1)  # (g, C_out / g, cpg): weights summed over the kernel
    delta = (v * c.reshape(groups, 1, -1)).sum(-1).reshape(-1)  # (C_out,)
    if lb.bias is None:
        lb.bias = nn.Parameter(delta.clone())
    else:
        lb.bias.add_(delta)
    stats[a] = (mean - c, std)
    return c


@register_ptq_algorithm(
    "equalize",
    options=("iterations", "absorb_bias", "relu6", "tolerance"),
    before_calibration=True,
    aliases=("cle",),
)
def _equalize_on_data(model: nn.Module, data: list, **options: Any) -> EqualizationResult:
    """Cross-layer equalization (:func:`equalize`), its layer pairs checked on the first batch of ``data``."""
    return equalize(model, example_input=data[0], **options)
