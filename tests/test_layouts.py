"""No hidden copies: design.md's strided inputs (a [B, L, H, D] projection seen as [B, H, L, D]) pass
through forward and backward without a q-sized copy. The output and dq take q's layout, dk and dv
those of k and v (as FlashAttention's do), so autograd has nothing to copy into the inputs' layouts,
and no zero gradient is materialised for the op's non-differentiable outputs (q_rot, the size of q)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rollingq
from rollingq.functional import uses_kernel

pytestmark = pytest.mark.kernel
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# What writes a whole new tensor's worth of data: copies, clones, casts and zero fills.
_COPIES = ("copy_", "clone", "_to_copy", "zeros", "zeros_like", "new_zeros", "full", "full_like", "fill_")


class _BigWrites(TorchDispatchMode):
    """Every copy, clone, cast or fill (by its ATen name) whose result holds at least `numel` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        results = out if isinstance(out, (tuple, list)) else (out,)
        if name in _COPIES and any(isinstance(r, torch.Tensor) and r.numel() >= self.numel for r in results):
            self.seen.append(f"{func.__name__} {[tuple(r.shape) for r in results if isinstance(r, torch.Tensor)]}")
        return out


def _blhd(B, L, H, D, dtype, gen):
    """A leaf [B, L, H, D] tensor and its [B, H, L, D] view (non-contiguous, as a projection gives it)."""
    x = torch.randn(B, L, H, D, generator=gen, dtype=torch.float32).to(dtype).to(DEVICE).requires_grad_()
    return x, x.transpose(1, 2)


@pytest.mark.skipif(not uses_kernel(torch.device(DEVICE)), reason="the kernel path (CUDA or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype, D, rotated", [(torch.float16, 32, "fusion"), (torch.float16, 32, None),
                                               (torch.float32, 16, "fusion"), (torch.float16, 264, "fusion"),
                                               (torch.float32, 264, None)])
def test_strided_inputs_are_not_copied(dtype, D, rotated):
    gen = torch.Generator().manual_seed(D + (rotated is None))
    B, L, H, Hkv, M = 2, 24, 4, 2, 2
    (xq, q), (xk, k), (xv, v) = _blhd(B, L, H, D, dtype, gen), _blhd(B, L, Hkv, D, dtype, gen), \
        _blhd(B, L, Hkv, D, dtype, gen)
    ids = (torch.arange(L) % M).to(DEVICE)
    rot = torch.linalg.qr(torch.randn(H, D, D, generator=gen, dtype=torch.float64))[0].float().to(DEVICE)
    kwargs = dict(rotation=rot, rotate_rows=1) if rotated else {}
    grad = torch.randn(B, L, H, D, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)
    with _BigWrites(q.numel() // 2) as forward:
        out, stats = rollingq.rollingq_attention(q, k, v, ids, M, **kwargs)
    assert out.stride() == q.stride()  # [B, L, H, D] in memory, as q
    with _BigWrites(q.numel() // 2) as backward:
        out.backward(grad)
    # The split path rotates the selected rows up front into a contiguous copy (saved for the backward).
    expected_forward = 1 if (rotated and D > 256) else 0
    assert len(forward.seen) <= expected_forward, forward.seen
    assert backward.seen == [], backward.seen
    for x in (xq, xk, xv):
        assert x.grad.stride() == x.stride() and torch.isfinite(x.grad).all()


@pytest.mark.skipif(not uses_kernel(torch.device(DEVICE)), reason="the kernel path (CUDA or TRITON_INTERPRET=1)")
def test_module_keeps_one_copy_of_its_output():
    """RollingQAttention's [B, L, E] output projection reads the op's output as a view: before, the op
    returned [B, H, L, D] contiguous and the reshape to [B, L, E] copied it (kept for out_proj's
    backward: q's size again per layer)."""
    torch.manual_seed(7)
    B, L, E, H = 2, 20, 64, 4
    layer = rollingq.RollingQAttention(E, H, 2).to(DEVICE).half()
    x = torch.randn(B, L, E, device=DEVICE, dtype=torch.float16, requires_grad=True)
    ids = (torch.arange(L - 1) % 2).to(DEVICE)
    with _BigWrites(B * L * E) as forward:
        y, _ = layer(x, ids)
    with _BigWrites(B * L * E) as backward:
        y.float().square().mean().backward()
    assert [s for s in forward.seen if "clone" in s or "copy_" in s] == [], forward.seen
    assert [s for s in backward.seen if "clone" in s or "copy_" in s] == [], backward.seen
