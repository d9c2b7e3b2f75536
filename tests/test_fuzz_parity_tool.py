"""The parity fuzzer (tests/fuzz_parity.py) keeps working: two of its cases, each through the
kernels (the interpreter on CPU) and the float64 reference, with no failure of a kind that marks a
bug (an exception, a harness error, a non-finite value, a wrong shape or dtype)."""
import pytest

from rollingq.kernels.common import interpreting
from tests import fuzz_parity

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(not interpreting(), reason="the fuzzer runs the kernels through TRITON_INTERPRET=1")]


@pytest.mark.parametrize("index", [0, 4])
def test_fuzz_cases_run(index):
    params = fuzz_parity.draw_params(index)
    fails, info = fuzz_parity.run_case(params)
    assert "out" in info, params
    bugs = [f for f in fails if f["kind"] in ("nonfinite", "meta") or f["check"] in ("exception", "harness")]
    assert not bugs, bugs
