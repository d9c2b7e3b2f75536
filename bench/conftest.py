"""Fixtures of the benchmark suite: CUDA gating and the record sink.

Every measurement is a dict (see peers.measure_case) stored in pytest-benchmark's extra_info, so it
lands in the --benchmark-json report that summarize.py reads. When ROLLINGQ_BENCH_JSONL names a file,
each record is also appended there as soon as it exists, so a run cut short still leaves its numbers.

ROLLINGQ_BENCH_SELECT (comma-separated) runs only part of the suite: a shape name (its cases of
test_attention and test_attention_extra), `memory` (test_peak_memory), `smoke` (test_cpu_smoke).
gpu_check.sh runs each shape, and the memory measurement, in a pytest process of its own, so a
sticky CUDA error (an illegal address) in one shape cannot poison the cases of the others.
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
SELECT_ENV = "ROLLINGQ_BENCH_SELECT"
_SELECT_TESTS = {"memory": "test_peak_memory", "smoke": "test_cpu_smoke"}
AUTOTUNE_ENV = "ROLLINGQ_AUTOTUNE_JSONL"  # where autotune_log.py appends each tuning decision
# The value checks stay on, as users get them: every repeat passes the same ids and rotation
# tensors, whose values are read back once (rollingq.validation.checked_values), not per call.


def pytest_report_header(config):
    import triton

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return f"rollingq bench: {card}, torch {torch.__version__}, triton {triton.__version__}"


def selected(item, tokens) -> bool:
    """Whether ROLLINGQ_BENCH_SELECT's tokens keep this test item."""
    shape = getattr(getattr(item, "callspec", None), "params", {}).get("shape_name")
    name = item.originalname if hasattr(item, "originalname") else item.name
    return (shape in tokens) if shape is not None else any(_SELECT_TESTS.get(t) == name for t in tokens)


def pytest_collection_modifyitems(config, items):
    spec = os.environ.get(SELECT_ENV, "").strip()
    if not spec:
        return
    import shapes

    tokens = {t.strip() for t in spec.split(",") if t.strip()}
    unknown = tokens - set(_SELECT_TESTS) - set(shapes.BY_NAME)
    if unknown:  # a misspelt shape would otherwise select nothing and "pass"
        raise pytest.UsageError(f"{SELECT_ENV}: unknown {sorted(unknown)}; known: shape names, "
                                f"{', '.join(_SELECT_TESTS)}")
    keep = [item for item in items if selected(item, tokens)]
    dropped = [item for item in items if not selected(item, tokens)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


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
