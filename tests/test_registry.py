import pytest

import torchquant as tq


def test_core_entries_and_make():
    assert {"affine", "qfmt"} <= set(tq.list_quantizers())
    assert {"batch_minmax", "running_minmax", "ema_minmax"} <= set(tq.list_observers())
    q = tq.make_quantizer("affine", n_bits=4, range_observer=tq.make_observer("ema_minmax", momentum=0.5, axis=0))
    assert isinstance(q, tq.AffineQuantizer) and q.range_observer.granularity.axis == 0


def test_unknown_name_lists_valid():
    with pytest.raises(KeyError, match=r"valid names: .*affine"):
        tq.make_quantizer("nope")


def test_register_decorator_and_duplicates():
    reg = tq.registry.Registry("thing")

    @reg.register("Sign")
    class Sign(tq.Quantizer):
        def pre_observe(self, x):
            pass

        def quantize(self, x):
            return x.sign()

        def post_observe(self, x):
            pass

    assert "sign" in reg and isinstance(reg.make("SIGN"), Sign)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("sign")(tq.AffineQuantizer)
