"""Fixtures of the benchmark suite: CUDA gating and the record sink.

Every measurement is a dict (see peers.measure_case) stored in pytest-benchmark's extra_info, so it
lands in the --benchmark-json report that summarize.py reads. When ROLLINGQ_BENCH_JSONL names a file,
each record is also appended there as soon as it exists, so a run cut short still leaves its numbers.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:  # shapes.py / peers.py import each other by bare name
    sys.path.insert(0, str(BENCH_DIR))

JSONL_ENV = "ROLLINGQ_BENCH_JSONL"
AUTOTUNE_ENV = "ROLLINGQ_AUTOTUNE_JSONL"  # where autotune_log.py appends each tuning decision
# The value checks stay on, as users get them: every repeat passes the same ids and rotation
# tensors, whose values are read back once (rollingq.validation.checked_values), not per call.


def pytest_report_header(config):
    import triton

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return f"rollingq bench: {card}, torch {torch.__version__}, triton {triton.__version__}"


@pytest.fixture(scope="session", autouse=True)
def autotune_log():
    """With ROLLINGQ_AUTOTUNE_JSONL set (gpu_check.sh sets it), log every autotuning decision."""
    path = os.environ.get(AUTOTUNE_ENV)
    if not path:
        yield
        return
    import autotune_log as log

    undo = log.install(path)
    yield
    undo()


@pytest.fixture
def cuda_device() -> torch.device:
    """The CUDA device the GPU cases run on; skips the case on a machine without one."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture
def bench_record():
    """record(benchmark, dict): store a measurement in extra_info (and the JSONL file if asked)."""

    def record(benchmark, rec: dict) -> None:
        benchmark.extra_info.update(rec)
        path = os.environ.get(JSONL_ENV)
        if path:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec, sort_keys=True) + "\n")

    return record
