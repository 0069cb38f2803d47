"""The equivalence contract of ``quantize_model`` on a zoo of real architectures.

Random weights, small inputs, nothing downloaded. ``FULL`` models get the whole
contract (bypassed and CALIBRATION outputs equal the float model's; QAT forward
and backward give every parameter a finite gradient; deepcopy; strict state_dict
round trip into a freshly converted model); ``LIGHT`` models, to fit the test-time
budget, get conversion plus the bypassed and CALIBRATION equalities.
``benchmarks/convert_zoo.py`` runs the conversion over every torchvision
classification model and a wider timm list.

Parameters that legitimately get no gradient in the QAT check are listed in
``NO_GRAD`` (BERT's pooler: the check back-propagates from the last hidden state).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import torchquant as tq
from torchquant.bench.models import MNIST1DCNN, DigitsCNN, DigitsMobileNet

S = tq.QModuleState


def wf(m, name):
    return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0))


def af(m, name):
    return tq.AffineQuantizer(8, tq.ExpAvgMinMax())


def _first(y):
    if hasattr(y, "last_hidden_state"):
        return y.last_hidden_state
    while not isinstance(y, torch.Tensor):
        y = next(iter(y.values())) if isinstance(y, dict) else y[0]
    return y


# ------------------------------------------------------------------ builders (imports stay lazy)
def tv(name, **kw):
    def build():
        import torchvision

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torchvision.models.get_model(name, **kw)

    return build


def tv_vit():
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)


def tv_swin():
    from torchvision.models import SwinTransformer
    from torchvision.models.swin_transformer import SwinTransformerBlockV2

    return SwinTransformer([4, 4], 16, [1, 1], [2, 2], [4, 4], block=SwinTransformerBlockV2)


def tv_swin_v1():
    from torchvision.models import SwinTransformer

    return SwinTransformer([4, 4], 16, [1, 1], [2, 2], [4, 4])


def tv_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)])


def tv_maxvit():
    from torchvision.models import MaxVit

    return MaxVit(
        input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16], block_layers=[1, 1],
        head_dim=4, stochastic_depth_prob=0.0,
    )  # fmt: skip


def tm(name, **kw):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, **kw)

    return build


def timm_mixer():
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(img_size=32, patch_size=8, num_blocks=2, embed_dim=32)


def effnet_b0():
    from efficientnet_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-b0")


def bert():
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16,
    )  # fmt: skip
    return transformers.BertModel(cfg)


IMG32 = (1, 3, 32, 32)
IMG64 = (1, 3, 64, 64)
TOKENS = "tokens"

# name: (builder, input shape, method)
FULL = {
    "digits_cnn": (DigitsCNN, (1, 1, 8, 8), "fx"),
    "digits_mobilenet": (DigitsMobileNet, (1, 1, 8, 8), "fx"),
    "mnist1d_cnn": (MNIST1DCNN, (1, 1, 40), "fx"),
    "tv-resnet18": (tv("resnet18"), IMG32, "fx"),
    "tv-mobilenet_v3_small": (tv("mobilenet_v3_small"), IMG32, "fx"),
    "tv-vit-tiny": (tv_vit, IMG32, "fx"),
    "timm-lcnet_050": (tm("lcnet_050"), IMG32, "fx"),
    "timm-vit-tiny": (tm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), IMG32, "fx"),
    "efficientnet_pytorch-b0": (effnet_b0, IMG32, "fx"),
    "bert-tiny-swap": (bert, TOKENS, "swap"),
    # Swin's attention passes qkv.weight and proj.weight to a function: the reads go to the wrappers
    "tv-swin-v2-tiny": (tv_swin, IMG32, "fx"),
    "tv-swin-tiny-swap": (tv_swin_v1, IMG32, "swap"),
}
LIGHT = {
    "tv-mobilenet_v2": (tv("mobilenet_v2", width_mult=0.25), IMG32),
    "tv-efficientnet_b0": (tv("efficientnet_b0"), IMG32),
    "tv-squeezenet1_1": (tv("squeezenet1_1"), IMG64),
    "tv-shufflenet_v2_x0_5": (tv("shufflenet_v2_x0_5"), IMG32),
    "tv-mnasnet0_5": (tv("mnasnet0_5"), IMG32),
    "tv-regnet_y_400mf": (tv("regnet_y_400mf"), IMG32),
    "tv-googlenet": (tv("googlenet", init_weights=False), IMG32),
    "tv-densenet121": (tv("densenet121"), IMG32),
    "tv-convnext-tiny": (tv_convnext, IMG32),
    "tv-maxvit-tiny": (tv_maxvit, IMG32),
    "tv-inception_v3": (tv("inception_v3", init_weights=False, aux_logits=False), (1, 3, 75, 75)),
    "tv-efficientnet_v2_s": (tv("efficientnet_v2_s"), IMG32),
    "timm-resnet10t": (tm("resnet10t"), IMG32),
    "timm-efficientnet_b0": (tm("efficientnet_b0"), IMG32),
    "timm-convnext_atto": (tm("convnext_atto"), IMG32),
    "timm-mixer": (timm_mixer, IMG32),
    "timm-regnetx_002": (tm("regnetx_002"), IMG32),
    "timm-mobilenetv3_small_050": (tm("mobilenetv3_small_050"), IMG32),
    "timm-ghostnet_050": (tm("ghostnet_050"), IMG32),
    "timm-mobilevit_xxs": (tm("mobilevit_xxs"), IMG64),
    "timm-efficientvit_b0": (tm("efficientvit_b0"), IMG32),
    "timm-repvgg_a0": (tm("repvgg_a0"), IMG32),
    "timm-levit_128s": (tm("levit_128s", img_size=64), IMG64),
    "timm-swin-tiny": (
        tm("swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 1)),
        IMG32,
    ),
    "timm-convnextv2_atto": (tm("convnextv2_atto"), IMG32),
    # F.linear(x, qkv.weight, torch.cat((q_bias, k_bias, v_bias))): the wrapper is called with the bias
    "timm-eva02-tiny": (tm("eva02_tiny_patch14_224", img_size=28, depth=2), (1, 3, 28, 28)),
    "timm-poolformer_s12": (tm("poolformer_s12"), IMG32),
    # registered fx leaves (NormFreeBlock, EdgeNeXt's attention) and weight-standardised convolutions
    "timm-nfnet_l0": (tm("nfnet_l0"), IMG32),
    "timm-tf_efficientnet_b0": (tm("tf_efficientnet_b0"), IMG32),  # timm's Conv2dSame
    "timm-edgenext_xx_small": (tm("edgenext_xx_small"), IMG64),
    "torch-transformer-encoder": (
        lambda: torch.nn.TransformerEncoder(
            torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2, enable_nested_tensor=False
        ),
        (2, 5, 16),
    ),
}
SLOW = {
    "tv-densenet121",
    "tv-regnet_y_400mf",
    "tv-efficientnet_b0",
    "tv-efficientnet_v2_s",
    "timm-levit_128s",
    "timm-ghostnet_050",
    "timm-nfnet_l0",
}
NO_GRAD = {"bert-tiny-swap": {"pooler.dense.layer.weight", "pooler.dense.layer.bias"}}


def _input(shape):
    if shape == TOKENS:
        return torch.randint(0, 64, (1, 8))
    return torch.rand(*shape)


# GoogLeNet's forward runs its auxiliary classifiers in training only: fx's trace cannot follow that.
TRAINING_BRANCH = {LIGHT["tv-googlenet"][0]}


def _build_and_convert(build, method, seed=0):
    torch.manual_seed(seed)
    net = build().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", tq.TrainingBranchWarning)
        q = tq.quantize_model(copy.deepcopy(net) if method == "swap" else net, wf, af, method=method).eval()
    for w in caught:  # the others, as they were
        if not issubclass(w.category, tq.TrainingBranchWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    branches = [str(w.message) for w in caught if issubclass(w.category, tq.TrainingBranchWarning)]
    assert len(branches) == (build in TRAINING_BRANCH), branches  # every other model's mode reads are followed
    return net, q


# GoogLeNet's auxiliary classifiers run only in training: fx traces the model's eval forward, which skips them.
KNOWN_FLOAT = {"tv-googlenet": [f"aux{i}.{p}" for i in (1, 2) for p in ("conv.conv", "fc1", "fc2")]}


def _float_layers(net, q, method="fx"):
    """Conv/linear layers (subclasses included) and MultiheadAttention modules whose weight no QModule holds, and
    what the conversion's warning names. Read on the float model for fx (which shares its parameters: a weight
    the traced code reads as an attribute is no layer of the GraphModule); on ``q`` for swap (a converted copy)."""
    kinds = (torch.nn.modules.conv._ConvNd, torch.nn.Linear, torch.nn.MultiheadAttention)
    if method == "fx":
        held = {id(p) for _, m in tq.iter_qmodules(q) for p in m.parameters()}
        weight = lambda m: m.in_proj_weight if isinstance(m, torch.nn.MultiheadAttention) else m.weight  # noqa: E731
        layers = [n for n, m in net.named_modules() if isinstance(m, kinds) and id(weight(m)) not in held]
    else:
        owners = [n for n, m in q.named_modules() if isinstance(m, tq.QModule)]
        layers = [
            n
            for n, m in q.named_modules()
            if isinstance(m, kinds) and not any(h == "" or n == h or n.startswith(h + ".") for h in owners)
        ]
    return sorted({*layers, *tq.convert.float_layers(q)})


def _check_equal(net, q, x):
    with torch.no_grad():
        ref = _first(net(x))
        assert torch.allclose(_first(q(x)), ref, atol=1e-5)
        with tq.qmodule_state(q, S.CALIBRATION):
            assert torch.allclose(_first(q(x)), ref, atol=1e-5)


def _params(marks, names):
    return [pytest.param(n, marks=[pytest.mark.slow] if n in marks else [], id=n) for n in names]


@pytest.mark.parametrize("name", _params(set(FULL) - {"digits_cnn", "digits_mobilenet", "mnist1d_cnn"}, FULL))
def test_full_contract(name):
    build, shape, method = FULL[name]
    x = _input(shape)
    net, q = _build_and_convert(build, method)
    assert tq.iter_qmodules(q)
    assert _float_layers(net, q, method) == KNOWN_FLOAT.get(name, [])  # every conv/linear layer is quantized
    _check_equal(net, q, x)

    q.train()  # QAT: forward + backward, every parameter gets a finite gradient
    with tq.qmodule_state(q, S.QUANT_AWARE_TRAIN):
        _first(q(torch.cat([x, x]))).float().square().mean().backward()
    no_grad = {n for n, p in q.named_parameters() if p.requires_grad and p.grad is None}
    assert no_grad == NO_GRAD.get(name, set())
    assert all(torch.isfinite(p.grad).all() for p in q.parameters() if p.grad is not None)

    q.eval()
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    with torch.no_grad():
        y = _first(q(x))
        assert torch.equal(_first(copy.deepcopy(q)(x)), y)
        buf = io.BytesIO()
        torch.save(q.state_dict(), buf)
        buf.seek(0)
        _, fresh = _build_and_convert(build, method, seed=1)
        fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
        tq.set_qmodule_state(fresh, S.QUANT_EVAL)
        assert torch.equal(_first(fresh(x)), y)


@pytest.mark.parametrize("name", _params(SLOW, LIGHT))
def test_light_contract(name):
    build, shape = LIGHT[name]
    net, q = _build_and_convert(build, "fx")
    assert tq.iter_qmodules(q)
    assert _float_layers(net, q) == KNOWN_FLOAT.get(name, [])  # every conv/linear layer, inside timm's leaves too
    _check_equal(net, q, _input(shape))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_cnn", "timm-vit-tiny", "tv-swin-tiny-swap"])
def test_torch_compile(name):
    build, shape, method = FULL[name]
    x = _input(shape)
    _, q = _build_and_convert(build, method)
    with tq.qmodule_state(q, S.CALIBRATION), torch.no_grad():
        q(x)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    with torch.no_grad():
        ref = q(x)
        assert torch.allclose(torch.compile(q)(x), ref, atol=1e-5)


def test_bert_is_not_fx_traceable_and_the_error_says_what_to_do():
    with pytest.raises(tq.FxTraceError, match="method='swap'") as info:
        tq.quantize_model(bert(), wf, af)
    msg = str(info.value)  # the model's own code, not torchquant's tracing call
    assert "transformers/" in msg and "modeling_bert.py" in msg and "torchquant/graph/fx.py" not in msg
