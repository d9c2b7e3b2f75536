import os

import pytest
import torch

# Without a GPU the Triton kernels run through Triton's interpreter. Triton reads this variable when
# a kernel is defined, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (make test: a worker per core) each worker keeps to one thread, so torch's
# own thread pool does not fight the other worker for the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA not available")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every buffer the kernels write starts NaN-filled (kernels/common.new_buffer), so an
    unwritten element fails the test. Modules opt in with pytest.mark.usefixtures."""
    from rollingq.kernels import common
    from tests.numerics import nan_buffer

    monkeypatch.setattr(common, "new_buffer", nan_buffer)


@pytest.fixture(autouse=True)
def _cpu_backend(request):
    """CPU tests run the PyTorch reference unless marked `kernel` (then the Triton interpreter):
    the interpreter is far too slow for training-sized tests."""
    from rollingq.functional import set_cpu_backend

    previous = set_cpu_backend("auto" if "kernel" in request.keywords else "reference")
    yield
    set_cpu_backend(previous)
