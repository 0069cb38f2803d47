"""The ``torchquant`` command: reproducible quantization experiments (``torchquant bench``).

* :mod:`torchquant.cli.recipes`: recipes by name, bit settings, recipe files;
* :mod:`torchquant.cli.engine`: training, calibration and evaluation loops (one process or ``torchrun``);
* :mod:`torchquant.cli.tasks`: datasets and models by name;
* :mod:`torchquant.cli.bench`: the grid runner, :func:`~torchquant.cli.bench.run_bench`;
* :mod:`torchquant.cli.report`: table, CSV, JSON and plot;
* :mod:`torchquant.cli.main`: argument parsing.
"""

from .main import main

__all__ = ["main"]
