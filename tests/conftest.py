import os

import pytest
import torch

# Without a GPU the Triton kernels run through Triton's interpreter. Triton reads this variable when
# a kernel is defined, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA not available")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _cpu_backend(request):
    """CPU tests run the PyTorch reference unless marked `kernel` (then the Triton interpreter):
    the interpreter is far too slow for training-sized tests."""
    from rollingq.functional import set_cpu_backend

    previous = set_cpu_backend("auto" if "kernel" in request.keywords else "reference")
    yield
    set_cpu_backend(previous)
