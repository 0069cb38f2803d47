"""Which torchvision / timm models ``quantize_model(method="fx")`` converts, and why the others fail.

For every torchvision classification model (``torchvision.models.list_models``) and a
list of timm models covering its families (random weights, nothing downloaded), it
converts the model with 8-bit quantizers, runs it bypassed and in ``CALIBRATION`` at a
small input (64x64, or the model's own input size where 64 does not fit) and checks
that both outputs match the float model (``allclose``, atol 1e-5). Models with more than
``--max-params`` parameters (the large members of families whose small members are
run) are only converted, on the ``meta`` device where their builder allows it, to save
time. One line per model, then the counts and the failures::

    python benchmarks/convert_zoo.py            # torchvision + the timm list
    python benchmarks/convert_zoo.py --only tv  # torchvision only
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

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
    "fastvit_t8",
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


def _convert(net):
    return tq.quantize_model(
        net,
        lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)),
        lambda m, n: tq.AffineQuantizer(8, tq.ExpAvgMinMax()),
    ).eval()


def _counts(q) -> str:
    rows = tq.summary_rows(q)
    n_w = sum(r["kind"] == "QWrapper" for r in rows)
    n_o = sum(r["kind"] == "QOp" for r in rows)
    n_f = sum(r["kind"] == "float" for r in rows)
    return f"{n_w} QWrapper, {n_o} QOp, {n_f} float"


def check(build, sizes, max_params: float) -> tuple[str, str]:
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
            return "FAIL", str(e).splitlines()[0].replace("quantize_model(method='fx'): ", "")
        return "converted", f"{_counts(q)}, {n_params / 1e6:.0f}M params: not run"
    torch.manual_seed(0)
    net = build().eval()
    x, ref = _forward(net, sizes)
    try:
        q = _convert(net)
    except tq.FxTraceError as e:
        return "FAIL", str(e).splitlines()[0].replace("quantize_model(method='fx'): ", "")
    except Exception as e:  # a bug in the rewriting: report it, keep going
        return "ERROR", f"{type(e).__name__}: {e}"
    with torch.no_grad():
        a = _first(q(x))
        with tq.qmodule_state(q, tq.QModuleState.CALIBRATION):
            b = _first(q(x))
    if not (torch.allclose(a, ref, atol=1e-5) and torch.allclose(b, ref, atol=1e-5)):
        return "MISMATCH", f"max |diff| {(a - ref).abs().max():.3g}"
    return "ok", f"{_counts(q)}, input {x.shape[-1]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["tv", "timm"], default=None)
    p.add_argument("--max-params", type=float, default=30e6, help="larger models are converted but not run")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    results: dict[str, list] = {"torchvision": [], "timm": []}
    if args.only in (None, "tv"):
        import torchvision

        for name in torchvision.models.list_models(module=torchvision.models):
            t = time.time()
            try:
                status, info = check(
                    lambda name=name: torchvision.models.get_model(name), (64, 96, 224), args.max_params
                )
            except Exception as e:
                status, info = "ERROR", f"{type(e).__name__}: {e}"
            results["torchvision"].append((name, status, info))
            print(f"torchvision {name:28s} {status:8s} {info}  ({time.time() - t:.1f}s)", flush=True)
    if args.only in (None, "timm"):
        import timm

        for name in TIMM_MODELS:
            t = time.time()
            try:
                m = timm.create_model(name, pretrained=False)
                size = m.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
                del m
                status, info = check(
                    lambda name=name: timm.create_model(name, pretrained=False), (64, size), args.max_params
                )
            except Exception as e:
                status, info = "ERROR", f"{type(e).__name__}: {e}"
            results["timm"].append((name, status, info))
            print(f"timm {name:35s} {status:8s} {info}  ({time.time() - t:.1f}s)", flush=True)
    for lib, res in results.items():
        if res:
            ok = sum(s == "ok" for _, s, _ in res)
            conv = sum(s == "converted" for _, s, _ in res)
            print(f"\n{lib}: {ok + conv}/{len(res)} convert; {ok} of them run with outputs equal to the float model")
            for name, s, info in res:
                if s not in ("ok", "converted"):
                    print(f"  {name}: {s}: {info}")


if __name__ == "__main__":
    main()
