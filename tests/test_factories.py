import pytest
from torch import nn

from torchquant import AffineQuantizer, BatchMinMax, call_factory


def test_two_and_one_argument_factories():
    conv = nn.Conv2d(2, 2, 1)
    q = call_factory(lambda m, name: AffineQuantizer(8 if name == "first" else 4, BatchMinMax()), conv, "first")
    assert q.n_bits == 8
    q = call_factory(lambda m: AffineQuantizer(m.out_channels, BatchMinMax()), conv, "x")
    assert q.n_bits == 2
    assert call_factory(None, conv, "x") is None
    assert call_factory(lambda m, n: None, conv, "x") is None


def test_instance_instead_of_factory_is_explained():
    with pytest.raises(TypeError, match="must be a factory"):
        call_factory(AffineQuantizer(8, BatchMinMax()), nn.Linear(1, 1), "fc", "weight_quantizer")


def test_factory_returning_junk():
    with pytest.raises(TypeError, match="returned int"):
        call_factory(lambda m, n: 3, nn.Linear(1, 1), "fc")
