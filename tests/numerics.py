"""design.md's parity rule, shared by the kernel tests."""
import torch

# (B, H, Hkv, Lq, Lk, D, causal) of the CUDA-only parity tests, forward and gradients. Also read by
# bench/launches.py, which compiles their kernels ahead of the GPU check.
CUDA_LARGE_SHAPES = [(2, 8, 2, 907, 907, 64, False), (1, 4, 4, 1000, 1000, 128, True),
                     (2, 1, 1, 300, 300, 768, False), (1, 2, 1, 513, 700, 256, False)]
# (B, H, Hkv, L, D) of the CUDA-only dropout parity tests (tests/test_dropout.py), also precompiled.
CUDA_DROPOUT_SHAPES = [(2, 8, 2, 907, 64), (1, 1, 1, 300, 768)]


def assert_close_by_rule(name: str, got: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor,
                         factor: float = 2.0, slack: float = 1e-5) -> None:
    """max|got - ref64| <= factor * max|ref_lowp - ref64| + slack, and no NaN/inf in got."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values in the kernel result"
    err = (got.double() - ref64.double()).abs().max().item()
    base = (ref_lowp.double() - ref64.double()).abs().max().item()
    assert err <= factor * base + slack, f"{name}: error {err:.3e} > {factor} x reference error {base:.3e} + {slack}"


def stats_tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-3


def poison_(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan"))
