"""The PTQ harness's quantization protocols (torchquant.bench.ptq.quantized_copy)."""

import pytest
from torch import nn

from torchquant.bench.models import MNIST1DCNN, DigitsCNN
from torchquant.bench.ptq import quantized_copy
from torchquant.qmodules import QWrapper


def _bits(q):
    out = {}
    for name, m in q.named_modules():
        if isinstance(m, QWrapper):
            a = m.acts_quantizer
            out[name] = (m.weight_quantizer.n_bits, None if a is None else a.n_bits)
    return out


@pytest.mark.parametrize("cls", [DigitsCNN, MNIST1DCNN], ids=["digits_cnn", "mnist1d_cnn"])
def test_default_quantizes_every_layer_and_the_output_to_the_nominal_bits(cls):
    bits = _bits(quantized_copy(cls(), 4, 4))
    assert bits and set(bits.values()) == {(4, 4)}


@pytest.mark.parametrize("cls", [DigitsCNN, MNIST1DCNN], ids=["digits_cnn", "mnist1d_cnn"])
def test_paper_protocol_first_last_at_8_bits_and_float_output(cls):
    model = cls()
    bits = _bits(quantized_copy(model, 4, 4, first_last_bits=8, quantize_output=False))
    names = list(bits)
    assert bits[names[0]] == (8, 4)  # first layer: 8-bit weights, output at a_bits (as QDrop's code)
    assert bits[names[-2]] == (4, 8)  # the last layer's input
    assert bits[names[-1]] == (8, None)  # last layer: 8-bit weights, network output not quantized
    assert {bits[n] for n in names[1:-2]} == {(4, 4)}
    assert not any(isinstance(m, QWrapper) for m in model.modules())  # the float model is untouched


def test_options_are_independent():
    bits = _bits(quantized_copy(DigitsCNN(), 4, 4, quantize_output=False))
    names = list(bits)
    assert bits[names[-1]] == (4, None) and {bits[n] for n in names[:-1]} == {(4, 4)}
    bits = _bits(quantized_copy(DigitsCNN(), 4, 4, first_last_bits=6))
    assert bits[names[0]] == (6, 4) and bits[names[-2]] == (4, 6) and bits[names[-1]] == (6, 4)


def test_protocol_needs_two_layers():
    with pytest.raises(ValueError, match=r"quantized_copy: first_last_bits.*Sequential"):
        quantized_copy(nn.Sequential(nn.Linear(3, 2)), 4, 4, first_last_bits=8)
