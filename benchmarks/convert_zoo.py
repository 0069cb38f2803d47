"""Which torchvision / timm models ``quantize_model(method="fx")`` converts, whether every
conv/linear layer is quantized, and why not where one is not.

For every torchvision classification model (``torchvision.models.list_models``) and a
list of timm models covering its families (random weights, nothing downloaded), it
converts the model with 8-bit quantizers, runs it bypassed and in ``CALIBRATION`` at a
small input (64x64, or the model's own input size where 64 does not fit) and checks
that both outputs match the float model (``allclose``, atol 1e-5). Models with more than
``--max-params`` parameters (the large members of families whose small members are
run) are only converted, on the ``meta`` device where their builder allows it, to save
time. Coverage counts the convolution and linear layers of the float model
(subclasses included, and ``nn.MultiheadAttention``'s packed input projection) and
names those whose weight no QModule of the converted model holds, with the reason the summary gives, and (for the models
that run) the wrapped layers the forward pass never calls (a module reading their weight
directly computes them in float). One line per
model, then the counts, the failures and the layers left in float::

    python benchmarks/convert_zoo.py                              # torchvision + the timm list
    python benchmarks/convert_zoo.py --only tv                    # torchvision only
    python benchmarks/convert_zoo.py --models resnet18,nfnet_l0   # a quick subset, by name
    python benchmarks/convert_zoo.py --examples                   # convert with example_inputs (the run input)

With ``--examples`` the models that run are converted with ``example_inputs`` (the input
they run at), so branches on sizes are traced, guarded, and leaves fx cannot trace alone are
traced with their inputs (compare the lines' counts of QOps and of float entries).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

import torchquant as tq

TIMM_MODELS = [
    "resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "skresnet18", "res2net50_26w_4s",
    "resnetv2_50", "nf_resnet26", "regnetx_002", "regnety_002", "repvgg_a0", "dla34", "dpn68", "densenet121",
    "inception_v3", "xception41", "selecsls42b", "hrnet_w18_small", "cspresnet50", "gernet_s", "tresnet_m",
    "efficientnet_b0", "tf_efficientnet_b0", "efficientnetv2_rw_t", "mobilenetv2_100", "mobilenetv3_large_100",
    "mobilenetv4_conv_small", "ghostnet_050", "rexnet_100", "lcnet_050", "tinynet_a", "hgnetv2_b0",
    "convnext_atto", "convnextv2_atto", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "eva02_tiny_patch14_224",
    "cait_xxs24_224", "crossvit_tiny_240", "pvt_v2_b0", "swin_tiny_patch4_window7_224", "swinv2_cr_tiny_ns_224",
    "mixer_s16_224", "resmlp_12_224", "gmlp_s16_224", "levit_128s", "mobilevit_xxs", "efficientvit_b0",
    "efficientformer_l1", "poolformer_s12", "coatnet_nano_rw_224", "maxvit_nano_rw_256", "edgenext_xx_small",
    "fastvit_t8", "nfnet_l0", "vgg11", "convit_tiny", "twins_svt_small",
]  # fmt: skip


def _first(y):
    while not isinstance(y, torch.Tensor):
        y = next(iter(y.values())) if isinstance(y, dict) else y[0]
    return y


def _forward(model, sizes):
    err = None
    for s in sizes:
        x = torch.rand(1, 3, s, s)
        try:
            with torch.no_grad():
                return x, _first(model(x))
        except Exception as e:  # the input size does not fit this model: try the next one
            err = e
    raise err


def _convert(net, example=None):
    return tq.quantize_model(
        net,
        lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)),
        lambda m, n: tq.AffineQuantizer(8, tq.ExpAvgMinMax()),
        example_inputs=example,
    ).eval()


def coverage(net: nn.Module, q: nn.Module) -> tuple[int, dict[str, str]]:
    """Number of conv/linear weights in the float model ``net`` and, for those no QModule of ``q`` holds
    (``q`` shares ``net``'s parameter tensors), the summary's reason. Counted on ``net``: a layer whose
    weight the traced code reads as an attribute is no module of ``q`` at all."""
    held = {id(p) for _, m in tq.iter_qmodules(q) for p in m.parameters()}
    notes = {r["name"]: r["note"] for r in tq.summary_rows(q) if r["kind"] == "float"}
    total, left = 0, {}
    for name, m in net.named_modules():
        if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            name, weight = f"{name}.in_proj_weight", m.in_proj_weight
        elif isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            weight = m.weight
        else:
            continue
        total += 1
        if id(weight) not in held:
            owner = next((n for n in sorted(notes, key=len, reverse=True) if name == n or name.startswith(n + ".")), "")
            left[name] = notes.get(owner, "not converted") if owner else "not converted"
    return total, left


def _counts(net, q) -> tuple[str, dict[str, str]]:
    rows = tq.summary_rows(q)
    n_w = sum(r["kind"] == "QWrapper" for r in rows)
    n_o = sum(r["kind"] == "QOp" for r in rows)
    n_f = sum(r["kind"] == "float" for r in rows)
    total, left = coverage(net, q)
    return f"{total - len(left)}/{total} layers quantized; {n_w} QWrapper, {n_o} QOp, {n_f} float", left


def check(build, sizes, max_params: float, examples: bool = False) -> tuple[str, str, dict[str, str]]:
    try:
        with torch.device("meta"):
            big = build()
    except Exception:  # some builders compute on tensors: build on the CPU
        big = build()
    n_params = sum(p.numel() for p in big.parameters())
    if n_params > max_params:
        try:
            q = _convert(big.eval())
        except tq.FxTraceError as e:
            return "FAIL", str(e).splitlines()[0].replace("quantize_model(method='fx'): ", ""), {}
        counts, left = _counts(big, q)
        return "converted", f"{counts}, {n_params / 1e6:.0f}M params: not run", left
    torch.manual_seed(0)
    net = build().eval()
    x, ref = _forward(net, sizes)
    try:
        q = _convert(net, x if examples else None)
    except tq.FxTraceError as e:
        return "FAIL", str(e).splitlines()[0].replace("quantize_model(method='fx'): ", ""), {}
    except Exception as e:  # a bug in the rewriting: report it, keep going
        return "ERROR", f"{type(e).__name__}: {e}", {}
    counts, left = _counts(net, q)
    qmodules = dict(tq.iter_qmodules(q))
    called: set[str] = set()
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: called.add(n)) for n, m in qmodules.items()]
    with torch.no_grad():
        a = _first(q(x))
        with tq.qmodule_state(q, tq.QModuleState.CALIBRATION):
            b = _first(q(x))
    for h in hooks:
        h.remove()
    for n in qmodules:  # held by a QModule but computing in float: its weight read directly, or a branch not taken
        if n not in called and isinstance(qmodules[n], tq.QWrapper):
            left[n] = "QWrapper never called by the forward pass"
    if not (torch.allclose(a, ref, atol=1e-5) and torch.allclose(b, ref, atol=1e-5)):
        return "MISMATCH", f"max |diff| {(a - ref).abs().max():.3g}; {counts}", left
    return "ok", f"{counts}, input {x.shape[-1]}", left


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["tv", "timm"], default=None)
    p.add_argument("--max-params", type=float, default=30e6, help="larger models are converted but not run")
    p.add_argument("--models", default=None, help="comma-separated model names: only these (torchvision and timm)")
    p.add_argument("--examples", action="store_true", help="convert the models that run with example_inputs")
    args = p.parse_args()
    wanted = None if args.models is None else set(args.models.split(","))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    results: dict[str, list] = {"torchvision": [], "timm": []}
    if args.only in (None, "tv"):
        import torchvision

        for name in torchvision.models.list_models(module=torchvision.models):
            if wanted is not None and name not in wanted:
                continue
            t = time.time()
            try:
                status, info, left = check(
                    lambda name=name: torchvision.models.get_model(name), (64, 96, 224), args.max_params, args.examples
                )
            except Exception as e:
                status, info, left = "ERROR", f"{type(e).__name__}: {e}", {}
            results["torchvision"].append((name, status, info, left))
            print(f"torchvision {name:28s} {status:8s} {info}  ({time.time() - t:.1f}s)", flush=True)
    if args.only in (None, "timm"):
        import timm

        for name in TIMM_MODELS:
            if wanted is not None and name not in wanted:
                continue
            t = time.time()
            try:
                m = timm.create_model(name, pretrained=False)
                size = m.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
                del m
                status, info, left = check(
                    lambda name=name: timm.create_model(name, pretrained=False),
                    (64, size),
                    args.max_params,
                    args.examples,
                )
            except Exception as e:
                status, info, left = "ERROR", f"{type(e).__name__}: {e}", {}
            results["timm"].append((name, status, info, left))
            print(f"timm {name:35s} {status:8s} {info}  ({time.time() - t:.1f}s)", flush=True)
    for lib, res in results.items():
        if res:
            ok = sum(s == "ok" for _, s, _, _ in res)
            conv = sum(s == "converted" for _, s, _, _ in res)
            full = sum(s in ("ok", "converted") and not left for _, s, _, left in res)
            print(f"\n{lib}: {ok + conv}/{len(res)} convert; {ok} of them run with outputs equal to the float model")
            print(f"{lib}: {full}/{ok + conv} converted models have every conv/linear layer quantized")
            for name, s, info, _ in res:
                if s not in ("ok", "converted"):
                    print(f"  {name}: {s}: {info}")
            for name, _, _, left in res:
                if left:
                    shown = "; ".join(f"{n} ({why})" for n, why in list(left.items())[:4])
                    more = f"; ... ({len(left) - 4} more)" if len(left) > 4 else ""
                    print(f"  {name}: {len(left)} layer(s) in float: {shown}{more}")


if __name__ == "__main__":
    main()
