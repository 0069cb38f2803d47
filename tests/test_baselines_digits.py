"""QAT with each research baseline on scikit-learn's digits (a small CNN with BatchNorm, fixed seed, CPU).

The recipes are those of ``benchmarks/baselines_digits.py`` (same seed and budget as its table); one
float32 model is pretrained per test session and shared.
"""

import benchmark_script
import pytest

pytest.importorskip("sklearn")

bench = benchmark_script.load("baselines_digits")


@pytest.fixture(scope="module")
def setup(one_thread):  # one thread: deterministic float reductions, whatever the machine
    train_set, test_set = bench.digits()
    fp = bench.pretrain(train_set)
    return fp, train_set, test_set, bench.accuracy(fp, test_set)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, w_bits, a_bits, floor",
    [
        ("lsq", 4, 4, "float-3"),
        ("lsq+", 4, 4, "float-3"),
        ("pact", 4, 4, "float-3"),
        ("dorefa", 4, 4, "float-3"),
        ("bnn", 1, 8, 80.0),
        ("xnor", 1, 8, 80.0),
        ("twn", 2, 8, 80.0),
    ],
    ids=["lsq-w4a4", "lsq+-w4a4", "pact-w4a4", "dorefa-w4a4", "bnn-w1a8", "xnor-w1a8", "twn-w2a8"],
)
def test_qat_on_digits(setup, method, w_bits, a_bits, floor):
    fp, train_set, test_set, fp_acc = setup
    assert fp_acc > 95.0
    weight, act = bench.METHODS[method]
    model = bench.qat(fp, weight, act, w_bits, a_bits, train_set, epochs=4)
    acc = bench.accuracy(model, test_set)
    threshold = fp_acc - 3.0 if floor == "float-3" else floor
    assert acc >= threshold, f"{method} W{w_bits}A{a_bits}: {acc:.2f}% < {threshold:.2f}% (float32 {fp_acc:.2f}%)"
