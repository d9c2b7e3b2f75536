"""No hidden copies: design.md's strided inputs (a [B, L, H, D] projection seen as [B, H, L, D]) pass
through forward and backward without a q-sized copy. The output and dq take q's layout, dk and dv
those of k and v (as FlashAttention's do), so autograd has nothing to copy into the inputs' layouts,
and no zero gradient is materialised for the op's non-differentiable outputs (q_rot, the size of q)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rollingq
from rollingq import ops
from rollingq.functional import uses_kernel
from rollingq.kernels import common

pytestmark = pytest.mark.kernel
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# What writes a whole new tensor's worth of data: copies, clones, casts and zero fills.
_COPIES = ("copy_", "clone", "_to_copy", "zeros", "zeros_like", "new_zeros", "full", "full_like", "fill_")


# A dispatch mode sees a custom op as one call: it runs these bodies under itself to see inside.
_OP_BODIES = {"rollingq::attention_fwd": ops.attention_fwd_impl, "rollingq::attention_bwd": ops.attention_bwd_impl}


class _BigWrites(TorchDispatchMode):
    """Every copy, clone, cast or fill (by its ATen name) whose result holds at least `numel` elements,
    inside the rollingq ops too (`ops_entered` counts them, so a test knows it looked there)."""

    def __init__(self, numel, ignore=()):
        super().__init__()
        self.numel, self.seen, self.shapes, self.ops_entered, self.in_launch = numel, [], [], 0, False
        self.ignore = set(ignore)  # shapes not to count
        self._depth, self._patch = 0, pytest.MonkeyPatch()

    def __enter__(self):
        # Triton's interpreter stages each kernel argument through a host copy and back (copy_ of the
        # whole storage): not data movement a GPU launch does, so the mode looks away meanwhile.
        if self._depth == 0 and common.interpreting():
            from triton.runtime.interpreter import GridExecutor

            launch, mode = GridExecutor.__call__, self

            def unseen(executor, *args, **kwargs):
                mode.in_launch, before = True, mode.in_launch
                try:
                    return launch(executor, *args, **kwargs)
                finally:
                    mode.in_launch = before

            self._patch.setattr(GridExecutor, "__call__", unseen)
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            self._patch.undo()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.in_launch:
            return func(*args, **(kwargs or {}))
        body = _OP_BODIES.get(func._schema.name)
        if body is not None:
            self.ops_entered += 1
            with self:
                return body(*args, **(kwargs or {}))
        # Below autograd (inside an op body) a composite such as matmul arrives whole: run its
        # decomposition under the mode to see the copies it makes (a broadcast operand's expand).
        with self:
            out = func.decompose(*args, **(kwargs or {}))
        if out is not NotImplemented:
            return out
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        results = out if isinstance(out, (tuple, list)) else (out,)
        big = [tuple(r.shape) for r in results if isinstance(r, torch.Tensor) and r.numel() >= self.numel]
        if name in _COPIES and big and not set(big) <= self.ignore:
            self.seen.append(f"{func.__name__} {big}")
            self.shapes += big
        return out


def _blhd(B, L, H, D, dtype, gen):
    """A leaf [B, L, H, D] tensor and its [B, H, L, D] view (non-contiguous, as a projection gives it)."""
    x = torch.randn(B, L, H, D, generator=gen, dtype=torch.float32).to(dtype).to(DEVICE).requires_grad_()
    return x, x.transpose(1, 2)


@pytest.mark.skipif(not uses_kernel(torch.device(DEVICE)), reason="the kernel path (CUDA or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype, D, rotated", [(torch.float16, 32, "fusion"), (torch.float16, 32, None),
                                               (torch.float32, 16, "fusion"), (torch.float16, 264, "fusion"),
                                               (torch.float32, 264, None), (torch.float32, 16, "every"),
                                               (torch.float16, 264, "every")])
def test_strided_inputs_are_not_copied(dtype, D, rotated):
    gen = torch.Generator().manual_seed(D + (rotated is None))
    B, L, H, Hkv, M = 2, 24, 4, 2, 2
    (xq, q), (xk, k), (xv, v) = _blhd(B, L, H, D, dtype, gen), _blhd(B, L, Hkv, D, dtype, gen), \
        _blhd(B, L, Hkv, D, dtype, gen)
    ids = (torch.arange(L) % M).to(DEVICE)
    rot = torch.linalg.qr(torch.randn(H, D, D, generator=gen, dtype=torch.float64))[0].float().to(DEVICE)
    kwargs = dict(rotation=rot, rotate_rows=1 if rotated == "fusion" else L) if rotated else {}
    grad = torch.randn(B, L, H, D, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)
    # The rotation's own float32 / dtype copies ([H, D, D], qr's column-major R here) do not scale
    # with B or L: not counted. At these small shapes they would pass for "q-sized".
    with _BigWrites(q.numel() // 2, ignore=[(H, D, D)]) as forward:
        out, stats = rollingq.rollingq_attention(q, k, v, ids, M, **kwargs)
    assert out.stride() == q.stride()  # [B, L, H, D] in memory, as q
    with _BigWrites(q.numel() // 2, ignore=[(H, D, D)]) as backward:
        out.backward(grad)
    assert forward.ops_entered == 1 and backward.ops_entered == 1  # the mode looked inside the ops
    if rotated == "every":
        # Every row under a dense R with D > 256 or in fp32 is one broadcast matmul (kernels/rotate.py):
        # torch copies the strided q into [B*H, L, D] and R expanded to [B, H, D, D] (with H > 1 and
        # B > 1: B*H*D^2, D/L of q's size), and the backward puts dq back into q's layout.
        allowed = {(B, H, L, D), (B, H, D, D)}
        assert set(forward.shapes) <= allowed and len(forward.shapes) <= 2, forward.seen
        assert set(backward.shapes) <= allowed and len(backward.shapes) <= 3, backward.seen
    else:
        assert forward.seen == [], forward.seen
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
