"""BatchNorm folding: whole-model and per-wrapper passes.

The arithmetic (:func:`bn_scale_shift`, :func:`fold_bn_params`) lives in
:mod:`torchquant.layers` with the table of layer types; it is re-exported here.

* :func:`fold_batchnorm`: a copy of a model with every BatchNorm that follows a
  Linear/Conv folded into it, for post-training quantization.
* :func:`freeze_bn_stats`: switch the ``fold_bn=True`` wrappers of a model from
  batch to running statistics (the last phase of QAT with folding).
"""

from __future__ import annotations

import copy
import itertools
import warnings

import torch
from torch import nn

from .layers import FOLDABLE_TYPES, bn_scale_shift, fold_bn_params
from .qmodules import QModule, QWrapper
from .weight_reads import is_redirected

__all__ = ["bn_scale_shift", "fold_batchnorm", "fold_bn_params", "fold_wrapper_bn_", "freeze_bn_stats"]


def _foldable_pair(layer: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(layer, FOLDABLE_TYPES) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return False
    if bn.running_mean is None or bn.running_var is None:
        return False
    if isinstance(layer, nn.modules.conv._ConvTransposeNd) and layer.groups != 1:
        return False  # the output channels of a grouped transposed weight are not one axis
    n_out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return bn.num_features == n_out


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    w, b = fold_bn_params(layer.weight, layer.bias, bn, transposed=transposed)
    layer.weight.copy_(w)
    if layer.bias is None:
        layer.bias = nn.Parameter(b.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(b)


def fold_wrapper_bn_(wrapper: nn.Module) -> bool:
    """Fold a QWrapper's BatchNorm (running statistics) into its layer, in place.

    The layer gets the folded weight and bias (a bias is created if it had none),
    ``wrapper.bn`` becomes ``None`` and a ``fold_bn=True`` wrapper becomes a plain one.

    Returns:
        ``True`` if a BatchNorm was folded, ``False`` if the wrapper had none.

    Raises:
        ValueError: the BatchNorm cannot be folded into the layer (no running
            statistics, mismatched channels, grouped transposed convolution).
    """
    bn = wrapper.bn
    if bn is None:
        return False
    if not _foldable_pair(wrapper.layer, bn):
        raise ValueError(f"cannot fold {bn} into {wrapper.layer}")
    _fold_into(wrapper.layer, bn)
    wrapper.bn = None
    if wrapper.fold_bn:
        wrapper.fold_bn = False
        wrapper._bn_frozen = False
        del wrapper._buffers["bn_frozen"]
    return True


def fold_batchnorm(model: nn.Module, trace: bool = False) -> nn.Module:
    """A deep copy of ``model`` with each BatchNorm that follows a Linear/Conv folded into it.

    Folded, with the BatchNorm's running statistics (:func:`fold_bn_params`):

    * every :class:`~torchquant.QWrapper` with a BatchNorm: its layer gets the folded
      weight and bias and its ``bn`` becomes ``None`` (a ``fold_bn=True`` wrapper becomes
      a plain one);
    * in every ``nn.Sequential``, each Linear/Conv/ConvTranspose (``groups=1`` for
      transposed) immediately followed by the matching BatchNorm: the layer gets the
      folded parameters and the BatchNorm is replaced by ``nn.Identity``.

    * with ``trace=True``, also every BatchNorm module that a ``torch.fx`` trace of the
      model shows applied directly to the output of a foldable layer module used nowhere
      else (e.g. torchvision ResNet's ``conv1`` / ``bn1``, called from ``forward``); the
      result is then a ``torch.fx.GraphModule`` without those BatchNorms.

    Other BatchNorms are left as they are, and so are those after a layer that appears twice in the model
    or shares its weight with another module (a conv with one BatchNorm per domain), with a warning
    naming them. In eval mode the result computes the same function as ``model`` (up to
    float rounding); in training mode it does not, as the BatchNorms are gone. Weight
    ranges that quantizers calibrated before folding are stale: calibrate after.

    Args:
        model: any module; it is not modified.
        trace: also fold through a ``torch.fx`` symbolic trace (the model must be traceable).

    Returns:
        The folded copy (a ``torch.fx.GraphModule`` with ``trace=True``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
        >>> f = fold_batchnorm(m)
        >>> f
        Sequential(
          (0): Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1))
          (1): Identity()
          (2): ReLU()
        )
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(f(x), m(x), atol=1e-5)
        True
    """
    model = copy.deepcopy(model)
    shared = _shared_layers(model)
    kept: list[str] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QWrapper) and module.bn is not None:
            if id(module.layer) in shared:
                kept.append(f"{name}.layer" if name else "layer")
                continue
            fold_wrapper_bn_(module)
        elif isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (layer_name, layer), (bn_name, bn) in itertools.pairwise(children):
                if _foldable_pair(layer, bn):
                    if id(layer) in shared:
                        kept.append(f"{name}.{layer_name}" if name else layer_name)
                        continue
                    _fold_into(layer, bn)
                    setattr(module, bn_name, nn.Identity())
    if trace:
        model = _fold_traced(model, kept)
    if kept:
        warnings.warn(
            f"fold_batchnorm: {', '.join(dict.fromkeys(kept))} kept their BatchNorm: the layer (or its weight) is "
            "also used elsewhere in the model, where the folded weight would be wrong",
            UserWarning,
            stacklevel=2,
        )
    return model


def _shared_layers(model: nn.Module) -> set[int]:
    """Ids of the modules that appear more than once in ``model`` (listed twice, in two containers) or hold a
    weight or bias another module holds too: folding a BatchNorm into one would change the other uses."""
    seen: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen[id(m)] = seen.get(id(m), 0) + 1
    holders: dict[int, set[int]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            holders.setdefault(id(p), set()).add(id(m))
    out = {i for i, n in seen.items() if n > 1}
    for ms in holders.values():
        if len(ms) > 1:
            out |= ms
    return out


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # traced, a module whose weight reads go to its wrappers would read the float weights; QModules
        # (their BatchNorm folded above) are kept whole
        return isinstance(m, QModule) or is_redirected(m) or super().is_leaf_module(m, module_qualified_name)


def _fold_traced(model: nn.Module, kept: list[str]) -> nn.Module:
    gm = torch.fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    modules = dict(gm.named_modules())
    shared = _shared_layers(gm)
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            uses[node.target] = uses.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        layer, bn = modules[src.target], modules[node.target]
        if uses[src.target] != 1 or uses[node.target] != 1 or not _foldable_pair(layer, bn):
            continue
        if id(layer) in shared:  # its weight is another module's too (tied)
            kept.append(src.target)
            continue
        _fold_into(layer, bn)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
    gm.graph.lint()
    gm.recompile()
    return gm


def freeze_bn_stats(model: nn.Module, frozen: bool = True) -> int:
    """Make every ``fold_bn=True`` :class:`~torchquant.QWrapper` in ``model`` use running statistics.

    After this call, training steps fold the weights with the running mean and
    variance (no batch statistics, no correction factor) and stop updating them, as
    in the last phase of Krishnamoorthi 2018's schedule (section 3.2: freeze the
    statistics after enough steps). ``frozen=False`` switches back. The state is the
    wrapper's ``bn_frozen`` buffer, so it survives ``state_dict`` round trips.

    Args:
        model: a model containing ``QWrapper(..., fold_bn=True)`` modules.
        frozen: ``True`` to freeze, ``False`` to unfreeze.

    Returns:
        The number of wrappers switched.

    Raises:
        ValueError: ``model`` holds no ``fold_bn=True`` wrapper (nothing would change).
    """
    wrappers = [m for m in model.modules() if isinstance(m, QWrapper) and m.fold_bn]
    if not wrappers:
        raise ValueError(f"freeze_bn_stats: {type(model).__name__} holds no QWrapper built with fold_bn=True")
    for w in wrappers:
        w.set_bn_frozen(frozen)
    return len(wrappers)
