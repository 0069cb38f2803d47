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


def test_examples_come_from_registration_or_default_arguments():
    reg = tq.registry.Registry("thing")
    reg.register("stateless")(tq.BinaryQuantizer)  # clip has a default
    (default,) = reg.examples("stateless")
    assert default.name == "default" and default.role == "any" and isinstance(default.build(), tq.BinaryQuantizer)
    reg.register("needs-bits")(tq.LSQQuantizer)
    with pytest.raises(TypeError, match=r"'needs-bits' .*LSQQuantizer.*register it with examples="):
        reg.examples("needs-bits")
    lsq4 = tq.registry.Example("w4", lambda: tq.LSQQuantizer(4), role="weight")
    reg.register("lsq4", examples=[lsq4])(tq.LSQQuantizer)
    assert reg.examples("LSQ4") == [lsq4]


def test_bad_examples_raise():
    with pytest.raises(ValueError, match="role must be one of"):
        tq.registry.Example("x", tq.BinaryQuantizer, role="activation")
    with pytest.raises(TypeError, match=r"registry\.Example"):
        tq.registry.Registry("thing").register("x", examples=[tq.BinaryQuantizer])
