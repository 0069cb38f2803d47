"""The scripts in examples/ run: their steps, at a size that keeps the suite fast."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_qat_loads_the_float_weights_into_models_of_other_bit_widths():
    # the float model's 8-bit quantizer state refused to load into the 4-bit model: the script always failed
    ex = _load("digits_qat")
    torch.manual_seed(0)
    fp = ex.build()
    for w_bits, a_bits in ((8, 8), (4, 4)):
        model = ex.build(w_bits, a_bits)
        missing, unexpected = model.load_state_dict(ex.float_weights(fp), strict=False)
        assert not unexpected
        assert all("_quantizer." in k or k.endswith("_extra_state") for k in missing)
        assert torch.equal(model[0].layer.weight, fp[0].layer.weight)
