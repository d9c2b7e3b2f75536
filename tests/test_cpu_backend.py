"""The CPU backend (the PyTorch reference behind `rollingq_attention` on CPU tensors) computes
16-bit inputs in float32, so it is as accurate as the dtype allows; the environment and the
dispatch refuse what they do not support instead of guessing."""
import os
import subprocess
import sys

import pytest
import torch

import rollingq
from rollingq import functional
from rollingq.reference import rollingq_attention_reference

M = 2


def problem(dtype: torch.dtype, magnitude: float = 1.0, seed: int = 0):
    """Tiny shapes (B=1, H=2, L=16, D=16) with a rotation of some rows and padding."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(1, 2, 16, 16, generator=gen) * magnitude).to(dtype).requires_grad_()
    k = (torch.randn(1, 2, 16, 16, generator=gen) * magnitude).to(dtype).requires_grad_()
    v = torch.randn(1, 2, 16, 16, generator=gen).to(dtype).requires_grad_()
    ids = torch.randint(0, M, (16,), generator=gen)
    ids[3] = -1
    rot = torch.linalg.qr(torch.randn(2, 16, 16, generator=gen, dtype=torch.float64))[0].float()
    grad = torch.randn(1, 2, 16, 16, generator=gen).to(dtype)
    return q, k, v, ids, rot, grad


def run(fn, q, k, v, ids, rot, grad):
    out, st = fn(q, k, v, ids, M, rot, 5)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    return out, st, (dq, dk, dv)


def run64(q, k, v, ids, rot, grad):
    """The float64 reference from the same (rounded) inputs."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    return run(rollingq_attention_reference, q64, k64, v64, ids, rot.double(), grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_cpu_backend_is_as_accurate_as_its_dtype(dtype):
    """Output and gradients within 2x (+ slack) of the float64 result rounded to the dtype: the
    error the dtype itself costs. (In the inputs' dtype, bf16 scores made it ~8x that.)"""
    q, k, v, ids, rot, grad = problem(dtype, seed=1)
    out, st, grads = run(rollingq.rollingq_attention, q, k, v, ids, rot, grad)
    out64, st64, grads64 = run64(q, k, v, ids, rot, grad)
    assert out.dtype == dtype and st.attn_mass.dtype == torch.float32 and st.key_sum.dtype == torch.float32
    for name, got, want in [("out", out, out64), ("dq", grads[0], grads64[0]), ("dk", grads[1], grads64[1]),
                            ("dv", grads[2], grads64[2])]:
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        err = (got.double() - want).abs().max().item()
        rounding = (want.to(dtype).double() - want).abs().max().item()
        assert err <= 2 * rounding + 1e-5, f"{name}: error {err:.3e} > 2 x rounding {rounding:.3e}"
    torch.testing.assert_close(st.attn_mass.double(), st64.attn_mass, rtol=0, atol=1e-5)


def test_fp16_large_magnitude_gives_no_nan():
    """|q|, |k| ~ 200 at D = 16: q . k overflows float16 (65504), not float32."""
    q, k, v, ids, rot, grad = problem(torch.float16, magnitude=200.0, seed=2)
    out, st, grads = run(rollingq.rollingq_attention, q, k, v, ids, rot, grad)
    out64, st64, grads64 = run64(q, k, v, ids, rot, grad)
    assert torch.isfinite(out).all() and torch.isfinite(st.attn_mass).all()
    torch.testing.assert_close(out.double(), out64, rtol=0, atol=2e-3)
    torch.testing.assert_close(st.attn_mass.double(), st64.attn_mass, rtol=0, atol=1e-5)
    for got, want in zip(grads, grads64):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-3 * max(1.0, want.abs().max().item()))


def test_16bit_empty_and_meta_keep_their_dtypes():
    """The same call serves empty and meta tensors: output dtypes and shapes as before."""
    for device in ("cpu", "meta"):
        q = torch.randn(2, 2, 0, 16, dtype=torch.float16, device=device)
        k = torch.randn(2, 2, 5, 16, dtype=torch.float16, device=device)
        out, st = rollingq.rollingq_attention(q, k, k, torch.zeros(5, dtype=torch.long, device=device), M)
        assert out.shape == (2, 2, 0, 16) and out.dtype == torch.float16
        assert st.attn_mass.dtype == torch.float32 and st.key_sum.shape == (2, 2, M, 16)
        assert st.key_sum.dtype == torch.float32


def test_cpu_backend_env_var_is_validated(monkeypatch):
    monkeypatch.setenv("ROLLINGQ_CPU_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"ROLLINGQ_CPU_BACKEND must be one of \('auto', 'reference', "
                                         r"'interpreter'\), got 'gpu'"):
        functional.cpu_backend_from_env()
    for value in ("auto", "reference", "interpreter"):
        monkeypatch.setenv("ROLLINGQ_CPU_BACKEND", value)
        assert functional.cpu_backend_from_env() == value
    monkeypatch.delenv("ROLLINGQ_CPU_BACKEND")
    assert functional.cpu_backend_from_env() == "auto"


def test_bad_cpu_backend_env_var_fails_the_import():
    env = dict(os.environ, ROLLINGQ_CPU_BACKEND="referense")
    done = subprocess.run([sys.executable, "-c", "import rollingq"], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "ROLLINGQ_CPU_BACKEND must be one of" in done.stderr


@pytest.mark.parametrize("device", ["mps", "xpu", "hpu"])
def test_other_devices_are_refused_not_run_on_the_reference(device):
    """Only the dispatch's device type is looked at, so a device object stands in for a tensor there
    (no mps/xpu tensor can be made on this machine)."""
    with pytest.raises(NotImplementedError, match=f"q is on a '{device}' device.*cuda.*cpu"):
        functional.uses_kernel(torch.device(device))
    assert functional.uses_kernel(torch.device("meta")) is False
