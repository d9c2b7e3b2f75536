"""The parity fuzzer (tests/fuzz_parity.py) keeps working: two of its cases (case 0 takes the D
split), each through the kernels (the interpreter on CPU) and the float64 reference, pass every
check it makes: design.md's rule on out and the gradients, the statistics tolerance, shapes and
dtypes, no exception or non-finite value. (Its random runs also report rounding misses of the rule;
these two draws have none, so any failure here is a change in the kernels or the harness.)"""
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
    assert not fails, fails
