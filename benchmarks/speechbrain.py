"""Keyword spotting on synthesised spoken digits with SpeechBrain: float vs PTQ vs QAT accuracy.

The data (:mod:`torchquant.integrations.speechbrain.data`): "zero".."nine" spoken by espeak-ng
voices, noise added, 16 kHz, split by voice variant (no test voice is heard in training),
log-mel features from speechbrain's ``Fbank``. The model
(:class:`~torchquant.integrations.speechbrain.models.KWSNet`) is built from ``speechbrain.nnet``
layers and trained in a ``speechbrain.Brain``. Each quantized row converts a copy of it with
:func:`~torchquant.integrations.speechbrain.quantize_speechbrain`:

* PTQ: ``tq.calibrate`` on training batches (weights: per-channel symmetric, MSE ranges;
  activations: per-tensor, MSE ranges), then ``QUANT_EVAL``;
* PTQ + AdaRound (4-bit weights): the same, then ``tq.ptq.adaround`` on the weights;
* QAT: LSQ quantizers fine-tuned in a ``speechbrain.Brain`` with
  :class:`~torchquant.integrations.speechbrain.QATBrainMixin` (calibration steps, then QAT).

Targets: W8A8 PTQ within 1 point of float, W4A4 QAT within 3 points.

    python benchmarks/speechbrain.py [--quick] [--out results.md]

Needs espeak-ng on PATH and ``torchquant[speechbrain]``; the first run synthesises the data
(about a minute) into the cache (``$TORCHQUANT_CACHE`` or ``~/.cache/torchquant``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and this file would shadow the speechbrain package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import torchquant as tq  # noqa: E402
from torchquant.integrations.speechbrain import QATBrainMixin, QATSchedule, quantize_speechbrain  # noqa: E402
from torchquant.integrations.speechbrain.data import SpeechDigitsRecipe, fbank_features, speech_digits  # noqa: E402
from torchquant.integrations.speechbrain.models import KWSNet  # noqa: E402

QUICK_RECIPE = SpeechDigitsRecipe(
    accents=("en-us", "en-gb"), train_variants=("m1", "m2", "f1"), test_variants=("m5", "f4"), takes=1
)
BITS = ((8, 8), (4, 8), (4, 4))
METHODS = {"W8A8": ("ptq", "qat"), "W4A8": ("ptq", "ptq+adaround", "qat"), "W4A4": ("ptq", "ptq+adaround", "qat")}
"""What each bit setting runs: AdaRound only where rounding matters (4-bit weights)."""
TARGETS = {("W8A8", "ptq"): 1.0, ("W4A4", "qat"): 3.0}  # allowed accuracy drop, points


@dataclass(frozen=True)
class Config:
    """One benchmark run's sizes."""

    recipe: SpeechDigitsRecipe
    float_epochs: int
    qat_epochs: int
    adaround_iters: int
    channels: int = 64
    batch_size: int = 64
    seed: int = 0


FULL = Config(SpeechDigitsRecipe(), float_epochs=12, qat_epochs=3, adaround_iters=200)
QUICK = Config(QUICK_RECIPE, float_epochs=2, qat_epochs=1, adaround_iters=5, channels=16)


def _brain_classes():
    import math

    import speechbrain as sb

    class KWSBrain(sb.Brain):
        """Cross-entropy on ``(features, labels)`` batches; Adam with a cosine learning rate per epoch
        (``hparams``: ``lr``, ``epochs``)."""

        def compute_forward(self, batch, stage):
            return self.modules.model(batch[0].to(self.device))

        def compute_objectives(self, logits, batch, stage):
            return F.cross_entropy(logits, batch[1].to(self.device))

        def on_stage_start(self, stage, epoch=None):
            if stage == sb.Stage.TRAIN:
                lr = self.hparams.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.hparams.epochs))
                for group in self.optimizer.param_groups:
                    group["lr"] = lr

    class QATKWSBrain(QATBrainMixin, KWSBrain):
        pass

    return KWSBrain, QATKWSBrain


RUN_OPTS = {"device": "cpu", "noprogressbar": True}


def fit(model: nn.Module, train: tuple[Tensor, Tensor], cfg: Config, *, epochs: int, lr: float, qat=None):
    """Train ``model`` in a ``speechbrain.Brain`` (Adam, ``lr`` with cosine decay over ``epochs``)."""
    KWSBrain, QATKWSBrain = _brain_classes()
    g = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(TensorDataset(*train), batch_size=cfg.batch_size, shuffle=True, generator=g)
    kwargs = {
        "modules": {"model": model},
        "opt_class": lambda params: torch.optim.Adam(params, lr=lr),
        "hparams": {"lr": lr, "epochs": epochs},
        "run_opts": RUN_OPTS,
    }
    brain = KWSBrain(**kwargs) if qat is None else QATKWSBrain(**kwargs, qat_schedule=qat)
    brain.fit(range(epochs), loader)
    return brain


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    """Top-1 accuracy (%) of ``model`` in its current QModule modes, eval mode."""
    model.eval()
    x, y = data
    hits = sum((model(x[i : i + 256]).argmax(1) == y[i : i + 256]).sum().item() for i in range(0, len(x), 256))
    return 100.0 * hits / len(x)


def ptq_factories(w_bits: int, a_bits: int):
    wf = lambda m, n: tq.AffineQuantizer(w_bits, tq.MSEObserver(w_bits, True, axis=0), symmetric=True)  # noqa: E731
    af = lambda m, n: tq.AffineQuantizer(a_bits, tq.MSEObserver(a_bits))  # noqa: E731
    return wf, af


def qat_factories(w_bits: int, a_bits: int):
    wf = lambda m, n: tq.LSQQuantizer(w_bits, axis=0)  # noqa: E731
    af = lambda m, n: tq.LSQQuantizer(a_bits)  # noqa: E731
    return wf, af


def quantized(float_model: nn.Module, factories) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.FloatLayersWarning)  # every layer of KWSNet is quantized
        return quantize_speechbrain(copy.deepcopy(float_model), *factories)


def run(cfg: Config, log=print) -> list[dict]:
    """Every row of the table as dicts: ``bits``, ``method``, ``accuracy``, ``drop``, ``seconds``."""
    t0 = time.perf_counter()
    (xw, ytr), (xt, yte) = speech_digits(cfg.recipe)
    train, test = (fbank_features(xw), ytr), (fbank_features(xt), yte)
    log(f"data: {len(ytr)} train / {len(yte)} test utterances, features {tuple(train[0].shape[1:])}, "
        f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = KWSNet(n_mels=train[0].shape[-1], n_classes=len(cfg.recipe.words), channels=cfg.channels)
    t = time.perf_counter()
    fit(model, train, cfg, epochs=cfg.float_epochs, lr=3e-3)
    ref = accuracy(model, test)
    rows = [dict(bits="float", method="float", accuracy=ref, drop=0.0, seconds=time.perf_counter() - t)]
    log(f"float: {ref:.2f} % ({rows[0]['seconds']:.0f} s)")
    calib = [train[0][i : i + cfg.batch_size] for i in range(0, min(len(train[0]), 8 * cfg.batch_size), cfg.batch_size)]
    for w_bits, a_bits in BITS:
        bits = f"W{w_bits}A{a_bits}"
        for method in METHODS[bits]:
            t = time.perf_counter()
            if method == "qat":
                q = quantized(model, qat_factories(w_bits, a_bits))
                schedule = QATSchedule(calibration_steps=1)
                fit(q, train, cfg, epochs=cfg.qat_epochs, lr=5e-4, qat=schedule)
                schedule.evaluation(q)
            else:
                q = quantized(model, ptq_factories(w_bits, a_bits))
                tq.calibrate(q, calib, progress=False)
                if method == "ptq+adaround":
                    tq.ptq.adaround(q, calib, iters=cfg.adaround_iters, progress=False)
                tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
            acc = accuracy(q, test)
            rows.append(dict(bits=bits, method=method, accuracy=acc, drop=ref - acc, seconds=time.perf_counter() - t))
            log(f"{bits} {method}: {acc:.2f} % ({ref - acc:+.2f} points below float, {rows[-1]['seconds']:.0f} s)")
    return rows


def markdown(rows: list[dict]) -> str:
    """The table: one line per bit setting, PTQ / PTQ+AdaRound / QAT accuracy and the targets' verdicts."""
    ref = rows[0]["accuracy"]
    lines = [
        "| weights/acts | PTQ | PTQ + AdaRound | QAT | target |",
        "|---|---|---|---|---|",
        f"| float | {ref:.2f} | | | |",
    ]
    for w, a in BITS:
        bits = f"W{w}A{a}"
        got = {r["method"]: r for r in rows if r["bits"] == bits}
        target = ""
        for (tb, tm), limit in TARGETS.items():
            if tb == bits:
                ok = got[tm]["drop"] <= limit
                target = f"{tm.upper()} within {limit:g}: {'PASS' if ok else 'FAIL'} ({got[tm]['drop']:+.2f})"
        cells = " | ".join(f"{got[m]['accuracy']:.2f}" if m in got else "-" for m in ("ptq", "ptq+adaround", "qat"))
        lines.append(f"| {bits} | {cells} | {target} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny data set and one epoch per stage (a smoke test)")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    rows = run(QUICK if args.quick else FULL)
    table = markdown(rows)
    print(table)
    print(f"total {time.perf_counter() - t:.0f} s")
    if args.out is not None:
        args.out.write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
