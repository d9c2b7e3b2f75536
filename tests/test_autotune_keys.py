"""What the autotuners key on: lengths by power-of-two bucket, so that training on lengths that vary
from batch to batch does not re-time every config at each new length."""
import os
import sys

import pytest
import torch

from rollingq.kernels.common import tune_length

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def autotune_keys(lq, lk, causal=False, head_dim=64, heads=4, kv_heads=2):
    """{kernel name: the key its autotuner would look up} for one forward and backward, computed
    from the recorded launch arguments as `triton.runtime.autotuner.Autotuner.run` computes it."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        from launches import _problem, record
    finally:
        sys.path.pop(0)
    import triton

    keys = {}
    p = _problem("keys", 2, heads, kv_heads, lq, lk, head_dim, causal, 3, per_batch=True, rotate_rows=5)
    for launch in record(p, torch.float16):
        at = launch.kernel
        if not isinstance(at, triton.runtime.autotuner.Autotuner):
            continue
        args = dict(zip(at.arg_names, launch.args), **launch.kwargs)
        assert all(name in args for name in at.keys), f"{launch.fn.__name__}: a key argument is not passed"
        key = [args[name] for name in at.keys] + [str(a.dtype) for a in args.values() if hasattr(a, "dtype")]
        keys[launch.fn.__name__] = tuple(key)
    assert set(keys) == {"_rollingq_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}
    return keys


def test_tune_length_buckets():
    assert [tune_length(n) for n in (1, 15, 16, 17, 907, 1024, 1025, 8192)] == [16, 16, 16, 32, 1024, 1024,
                                                                                 2048, 8192]


@pytest.mark.parametrize("causal", [False, True])
def test_lengths_in_one_bucket_share_the_tuning(causal):
    a = autotune_keys(600, 600 if causal else 700, causal)
    b = autotune_keys(907, 907 if causal else 1000, causal)
    c = autotune_keys(1100, 1100 if causal else 1000, causal)
    assert a == b
    for name in a:
        assert a[name] != c[name], name


def test_forward_key_holds_the_descriptor_choice(monkeypatch):
    """The forward's pruner offers other configs with descriptor loads (e.g. D128 BN128): a launch
    without them must not reuse a choice made among those."""
    from rollingq.kernels import attention_fwd

    monkeypatch.setattr(attention_fwd, "USE_TMA", True)
    with_tma = autotune_keys(256, 256, head_dim=128)["_rollingq_fwd_kernel"]
    monkeypatch.setattr(attention_fwd, "USE_TMA", False)
    without = autotune_keys(256, 256, head_dim=128)["_rollingq_fwd_kernel"]
    assert with_tma != without
