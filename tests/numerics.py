"""design.md's parity rule, shared by the kernel tests."""
import torch


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
