import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples in every run, whatever ran before them in the worker,
# and no example database carries failures from one run (or torch version) into the next.
settings.register_profile("torchquant", derandomize=True, database=None)
settings.load_profile("torchquant")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Runs a test on the CPU, and on CUDA where a GPU exists."""
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    float reductions that do not depend on the machine, and the fastest setting for tiny models."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
