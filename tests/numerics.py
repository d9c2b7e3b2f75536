"""design.md's parity rule, shared by the kernel tests."""
import torch

from rollingq.kernels import common

# (B, H, Hkv, Lq, Lk, D, causal) of the CUDA-only parity tests, forward and gradients. Also read by
# bench/launches.py, which compiles their kernels ahead of the GPU check.
CUDA_LARGE_SHAPES = [(2, 8, 2, 907, 907, 64, False), (1, 4, 4, 1000, 1000, 128, True),
                     (2, 1, 1, 300, 300, 768, False), (1, 2, 1, 513, 700, 256, False)]
# (B, H, Hkv, L, D) of the CUDA-only dropout parity tests (tests/test_dropout.py), also precompiled.
CUDA_DROPOUT_SHAPES = [(2, 8, 2, 907, 64), (1, 1, 1, 300, 768)]
# (B, H, Hkv, L, D, mask kind) of the CUDA-only attention-mask parity tests (tests/test_attn_mask.py),
# also precompiled: a bool mask [B, 1, L, L] or a float one [1, H, L, L] (mask_shape below).
CUDA_MASK_SHAPES = [(2, 8, 2, 907, 64, "bool"), (1, 2, 1, 300, 768, "float")]


def mask_shape(kind: str, B: int, H: int, Lq: int, Lk: int) -> tuple:
    """The broadcast shape the mask tests give each kind: a per-batch bool mask shared by the heads,
    a per-head float bias shared by the batch."""
    return (B, 1, Lq, Lk) if kind == "bool" else (1, H, Lq, Lk)


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


_NEW_BUFFER = common.new_buffer  # the library's own, captured before any test swaps it


def nan_buffer(shape, device, dtype, like=None) -> torch.Tensor:
    """kernels.common.new_buffer (its shape and layout rules), NaN-filled: tests swap it in so that
    an element a kernel leaves unwritten fails them."""
    return poison_(_NEW_BUFFER(shape, device, dtype, like=like))


def assert_bias_grad_close(got: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor,
                           delta_term: torch.Tensor, slack: float = 1e-5) -> None:
    """A bias's gradient, element by element: |got - ref64| <= 2 * max|ref_lowp - ref64|
    + 2 * delta_term + slack. The kernels (as FlashAttention's) form ds = p * (dp - delta) with
    delta = do . out from their own rounded output, so each element carries p_ij * |do_i . (out_i -
    out64_i)| (`delta_term`, summed as the gradient is over broadcast dims) that no summation over
    keys averages out; the reference's autograd forms delta from its exact probabilities instead."""
    assert torch.isfinite(got).all(), "d_mask: non-finite values in the kernel result"
    base = (ref_lowp.double() - ref64.double()).abs().max().item()
    excess = ((got.double() - ref64.double()).abs() - 2 * delta_term).max().item()
    assert excess <= 2 * base + slack, f"d_mask: error beyond the delta term {excess:.3e} > 2 x {base:.3e} + {slack}"
