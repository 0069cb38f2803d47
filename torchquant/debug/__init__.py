"""Per-layer diagnostics: which quantization point loses what, and what to do about it.

* :func:`sqnr_report`: signal-to-quantization-noise ratio (dB) at every quantization point;
* :func:`sensitivity`: the metric with one layer quantized (and with all but one);
* :func:`plot_ranges`: histograms of weights and activations with the clipping range marked (PNG);
* :func:`mixed_precision`: a greedy per-layer weight bit-width under a size budget.

``data`` is a tensor (one batch) or an iterable of batches; a batch that is a
tuple or list contributes its first element as the model input.
"""

from .diagnostics import Report, mixed_precision, plot_ranges, sensitivity, sqnr_report

__all__ = ["Report", "mixed_precision", "plot_ranges", "sensitivity", "sqnr_report"]
