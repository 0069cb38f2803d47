"""Collection and reporting rules for the whole suite (tests/conftest.py holds the fixtures).

The floor-torch environment (``make test-floor``) installs torch without the ``vision`` extra
(a CPU-only torch build has no matching torchvision wheel) and without the ``speechbrain`` extra
(its torchaudio wheel is installed with ``--no-deps`` beside the main environment's torch). There,
a test or doctest that fails only because one of those packages is not installed is reported as
skipped, with the package and its extra named; where the package is installed, such a failure
stays a failure.
"""

from __future__ import annotations

import doctest
import importlib.util
import sys

import pytest

OPTIONAL = {
    "torchvision": "vision",
    "timm": "vision",
    "efficientnet_pytorch": "vision",
    "speechbrain": "speechbrain",
    "torchaudio": "speechbrain",
}
"""Optional packages whose absence turns a failure into a skip, and the extra that installs each."""
MISSING = {name for name in OPTIONAL if importlib.util.find_spec(name) is None}

# The Triton kernels import triton at module level; CPU-only torch builds ship without it.
collect_ignore = [] if importlib.util.find_spec("triton") else ["torchquant/kernels/_triton.py"]


def _missing_module(excinfo: pytest.ExceptionInfo) -> str | None:
    exc = excinfo.value
    if isinstance(exc, doctest.UnexpectedException):
        exc = exc.exc_info[1]
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in MISSING:
            return exc.name.split(".")[0]
        exc = exc.__cause__ or exc.__context__
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if MISSING and report.failed and call.excinfo is not None:
        name = _missing_module(call.excinfo)
        if name is not None:
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0, f"needs {name} (torchquant[{OPTIONAL[name]}])")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    """Drop modules whose attribute access raises ImportError before hypothesis scans them.

    SpeechBrain registers lazy redirect modules in ``sys.modules`` that import optional
    packages (k2) on first attribute access; hypothesis's plugin reads every module's
    ``__file__`` after collection and would crash the session on them.
    """
    for name, module in list(sys.modules.items()):
        try:
            getattr(module, "__file__", None)
        except ImportError:
            del sys.modules[name]
