"""Rotations as the identity plus a low rank (rollingq.rotation.LowRankRotation): the factorization,
the kernel that applies them (kernels/rotate.py) and attention parity, forward and backward, with
the rotation in that form on every path (in-kernel rotation, D split, fp32).

On CPU the kernels run through Triton's interpreter; every kernel output starts NaN-filled.
"""
import zlib

import pytest
import torch

import rollingq
from rollingq.functional import uses_kernel
from rollingq.kernels import attention_bwd, attention_fwd, common, rotate
from rollingq.reference import rollingq_attention_reference
from rollingq.rotation import low_rank_rotation, plane_rotation, svd_rotation
from tests.numerics import CUDA_LARGE_SHAPES, assert_close_by_rule, nan_buffer, stats_tol

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _gen(*params) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


_nan_new = nan_buffer


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(common, "new_buffer", _nan_new)


def _plane_rotations(H, D, n, gen) -> torch.Tensor:
    """float32 [H, D, D]: n random plane rotations composed (R - I of rank 2n)."""
    R = torch.eye(D, dtype=torch.float64).repeat(H, 1, 1)
    for _ in range(n):
        x, y = torch.randn(2, H, D, generator=gen, dtype=torch.float64)
        R = plane_rotation(x, y) @ R
    return R.float()


def _random_rotations(H, D, gen) -> torch.Tensor:
    """float32 [H, D, D] random orthogonal matrices: R - I of full rank (up to D)."""
    return torch.linalg.qr(torch.randn(H, D, D, generator=gen, dtype=torch.float64))[0].float()


# ------------------------------------------------------------------------------- factorization
@pytest.mark.parametrize("n", [1, 2, 3])
def test_composed_plane_rotations_factor_exactly(n):
    R = _plane_rotations(3, 24, n, _gen("plane", n))
    f = low_rank_rotation(R)
    assert f.rank == 2 * n and f.left.shape == f.right.shape == (3, 24, 2 * n)
    assert f.left.dtype == torch.float32 and f.right.dtype == torch.float32
    # Within the rounding of R's float32 entries, which is all R knows.
    assert (f.dense(torch.float64) - R.double()).abs().max().item() < 1e-6
    assert low_rank_rotation(R, max_rank=2 * n).rank == 2 * n
    assert low_rank_rotation(R, max_rank=2 * n - 1) is None


def test_identity_has_rank_zero_and_is_no_rotation():
    f = low_rank_rotation(torch.eye(16).repeat(2, 1, 1))
    assert f.rank == 0 and f.left.shape == (2, 16, 0)
    assert torch.equal(f.dense(), torch.eye(16).repeat(2, 1, 1))
    gen = _gen("identity")
    q, k, v = (torch.randn(1, 2, 9, 16, generator=gen) for _ in range(3))
    ids = torch.tensor([0, 1] * 4 + [-1])
    a, sa = rollingq.rollingq_attention(q, k, v, ids, 2, rotation=f, rotate_rows=9)
    b, sb = rollingq.rollingq_attention(q, k, v, ids, 2)
    assert torch.equal(a, b) and torch.equal(sa.attn_mass, sb.attn_mass)


def test_heads_of_different_rank_share_the_widest():
    gen = _gen("mixed")
    R = torch.eye(12).repeat(3, 1, 1)
    R[1] = _plane_rotations(1, 12, 1, gen)[0]
    R[2] = _plane_rotations(1, 12, 2, gen)[0]
    f = low_rank_rotation(R)
    assert f.rank == 4
    assert f.left[0].abs().max() == 0  # the identity head: all its columns zero
    assert (f.dense(torch.float64) - R.double()).abs().max().item() < 1e-6


def test_a_general_rotation_is_full_rank():
    gen = _gen("svd")
    x, y = torch.randn(2, 2, 32, generator=gen, dtype=torch.float64)
    R = svd_rotation(x, y).float()  # turns the whole complement: R - I is (nearly) full rank
    assert low_rank_rotation(R, max_rank=32 // 8) is None
    f = low_rank_rotation(R)
    assert f.rank > 16 and (f.dense(torch.float64) - R.double()).abs().max().item() < 1e-6


def test_factorization_errors():
    with pytest.raises(ValueError, match=r"rotation must be a floating point \[H, D, D\]"):
        low_rank_rotation(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="max_rank must be None or an int >= 0"):
        low_rank_rotation(torch.eye(4)[None], max_rank=-1)
    for bad in (float("nan"), float("inf"), 1e300):  # inf alone: NaN singular values, rank 0 if unchecked
        R = torch.eye(4, dtype=torch.float64)[None].clone()
        R[0, 1, 2] = bad
        with pytest.raises(ValueError, match="rotation must be finite in float32"):
            low_rank_rotation(R)


# ------------------------------------------------------------------------------ the rotate kernel
@pytest.mark.kernel
@pytest.mark.parametrize("r", [1, 2, 5, 20])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("rows", ["every", "shared_mask", "batch_mask"])
@pytest.mark.parametrize("transpose, in_place", [(False, False), (True, False), (True, True)])
def test_rotate_kernel(r, dtype, rows, transpose, in_place, poisoned):
    """x @ R^T (x @ R when transposed) from a float32 result rounded once; unselected rows come
    back bit for bit. In place (how the backward rotates dq) on a strided buffer too."""
    if DEVICE == "cpu":
        from rollingq.kernels.common import interpreting
        assert interpreting(), "the kernel tests run through TRITON_INTERPRET=1 on the CPU"
    gen = _gen("rotate", r, dtype, rows, transpose)
    B, H, L, D = 2, 3, 45, 72
    x = torch.randn(B, L, H, D, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)  # strided, as users pass q
    packed = (0.3 * torch.randn(H, 2, D, r, generator=gen)).to(DEVICE)
    mask = {"every": None,
            "shared_mask": (torch.rand(L, generator=gen) < 0.5).to(DEVICE).expand(B, L),
            "batch_mask": (torch.rand(B, L, generator=gen) < 0.5).to(DEVICE)}[rows]
    buf = x.clone()  # keeps the strided layout
    y = rotate.rotate(buf, packed, mask, transpose=transpose, in_place=in_place)
    assert (y is buf) == in_place
    R = packed[:, 0].double() @ packed[:, 1].double().transpose(1, 2) + torch.eye(D, dtype=torch.float64, device=DEVICE)
    ref = torch.einsum("bhld,hde->bhle" if transpose else "bhld,hed->bhle", x.double(), R)
    if mask is not None:
        ref = torch.where(mask[:, None, :, None], ref, x.double())
        assert torch.equal(y[~mask[:, None, :, None].expand_as(y)], x[~mask[:, None, :, None].expand_as(x)])
    assert y.dtype == dtype and y.shape == x.shape and torch.isfinite(y).all()
    # Bound: one rounding to the dtype, or twice the error of the same product done densely in
    # float32 (what float32 arithmetic over D terms costs).
    dense32 = torch.einsum("bhld,hde->bhle" if transpose else "bhld,hed->bhle", x.float(), R.float())
    if mask is not None:
        dense32 = torch.where(mask[:, None, :, None], dense32, x.float())
    bound = max(torch.finfo(dtype).eps * ref.abs().max().item(), 2 * (dense32.double() - ref).abs().max().item())
    err = (y.double() - ref).abs().max().item()
    assert err <= bound, (err, bound)


def test_dense_rotation_of_the_packed_form():
    gen = _gen("dense")
    packed = torch.randn(2, 2, 8, 3, generator=gen)
    want = torch.eye(8) + packed[:, 0] @ packed[:, 1].transpose(1, 2)
    got = rotate.dense_rotation(packed)
    assert got.dtype == torch.float32 and got.is_contiguous() and torch.allclose(got, want, atol=1e-6)
    dense = torch.randn(2, 8, 8, generator=gen).half()
    assert torch.equal(rotate.dense_rotation(dense), dense.float())


# ----------------------------------------------------------------------------- attention parity
def _force_split(monkeypatch):
    """Both directions take the D split (no program holds a whole row): the rotation runs before the
    forward kernel and after the dQ kernel, through kernels/rotate.py."""
    for name, value in (("MAX_SINGLE_D", 16), ("SPLIT_D_CHUNK", 16), ("SPLIT_DV_CHUNK", 32),
                        ("SPLIT_DV_CHUNK_NARROW", 16)):
        monkeypatch.setattr(attention_fwd, name, value)
    for name, value in (("DKDV_MAX_RESIDENT_D", 32), ("DQ_MAX_RESIDENT_D", 32), ("SPLIT_D_CHUNK", 16),
                        ("SPLIT_DKDV_CHUNK", 32), ("SPLIT_DQ_CHUNK", 16), ("SPLIT_DQ_CHUNK_IEEE", 16),
                        ("PRE_D_CHUNK", 16)):
        monkeypatch.setattr(attention_bwd, name, value)


def _reference(q, k, v, ids, M, rot, rows, causal, do, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, st = rollingq_attention_reference(*leaves, ids, M, rotation=rot, rotate_rows=rows, causal=causal)
    out.backward(do.to(dtype))
    return out, st, [t.grad for t in leaves]


def _check_parity(B, H, Hkv, L, D, M, dtype, rot, rot_rows, causal, gen, pad=2):
    """Forward (out and statistics) and gradients through the public function against the float64
    reference, by design.md's rule; the last `pad` keys of every batch are padding."""
    q, k, v, do = (torch.randn(B, h, L, D, generator=gen).to(dtype).to(DEVICE) for h in (H, Hkv, Hkv, H))
    ids = torch.randint(0, M, (B, L), generator=gen)
    ids[:, -pad:] = -1
    ids = ids.to(DEVICE)
    assert uses_kernel(q.device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, st = rollingq.rollingq_attention(*leaves, ids, M, rotation=rot, rotate_rows=rot_rows, causal=causal)
    out.backward(do)
    o64, s64, g64 = _reference(q, k, v, ids, M, rot, rot_rows, causal, do, torch.float64)
    olp, _, glp = _reference(q, k, v, ids, M, rot, rot_rows, causal, do, dtype)
    assert_close_by_rule("out", out, o64, olp)
    for name, got, r64, rlp in zip(("dq", "dk", "dv"), (t.grad for t in leaves), g64, glp):
        assert_close_by_rule(name, got, r64, rlp)
    assert (st.attn_mass.double() - s64.attn_mass).abs().max().item() <= stats_tol(dtype)


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["in_kernel", "split"])
@pytest.mark.parametrize("rows", ["every", "mask"])
def test_attention_parity(dtype, path, rows, poisoned, monkeypatch):
    """Forward (out and statistics) and gradients with a LowRankRotation against the float64
    reference, by design.md's rule. fp32 always rotates before the forward kernel."""
    if path == "split":
        _force_split(monkeypatch)
    gen = _gen("parity", dtype, path, rows)
    B, H, L, D = 2, 4, 23, 40
    rot = low_rank_rotation(_plane_rotations(H, D, 2, gen).to(DEVICE))
    assert rot.rank == 4
    rot_rows = L if rows == "every" else (torch.rand(B, L, generator=gen) < 0.5).to(DEVICE)
    _check_parity(B, H, 2, L, D, 3, dtype, rot, rot_rows, rows == "mask", gen)


def test_high_rank_factors_go_dense():
    """Above MAX_FACTORED_RANK the launchers get the dense matrix the factors stand for (the
    factored rotate kernel's on-chip tiles grow with r; tests/test_aot_compile.py builds it at that
    rank); at it, the packed factors."""
    from rollingq.functional import MAX_FACTORED_RANK, kernel_arguments

    gen = _gen("high_rank")
    H, D = 2, 72
    q = k = torch.zeros(1, H, 4, D)
    ids = torch.zeros(4, dtype=torch.long)
    at_cap = low_rank_rotation(_plane_rotations(H, D, MAX_FACTORED_RANK // 2, gen))
    above = low_rank_rotation(_random_rotations(H, D, gen))
    assert at_cap.rank == MAX_FACTORED_RANK and above.rank > MAX_FACTORED_RANK
    _, rot, _ = kernel_arguments(q, k, ids, at_cap, 4)
    assert rot.shape == (H, 2, D, MAX_FACTORED_RANK)
    _, rot, _ = kernel_arguments(q, k, ids, above, 4)
    assert rot.shape == (H, D, D) and rot.dtype == torch.float32
    assert torch.allclose(rot, above.dense(torch.float32), atol=1e-6)


@pytest.mark.kernel
@pytest.mark.parametrize("rows", ["every", "mask"])
def test_attention_parity_high_rank(rows, poisoned):
    """A full-rank rotation passed factored (low_rank_rotation of a random orthogonal matrix), in
    fp32, which rotates outside the attention kernels: it runs as the dense matrix, by the rule."""
    gen = _gen("parity_high_rank", rows)
    B, H, L, D = 2, 2, 13, 72
    rot = low_rank_rotation(_random_rotations(H, D, gen))
    assert rot.rank > 64
    rot_rows = L if rows == "every" else (torch.rand(B, L, generator=gen) < 0.5).to(DEVICE)
    _check_parity(B, H, 1, L, D, 3, torch.float32, rot, rot_rows, False, gen)


@pytest.mark.kernel
def test_the_low_rank_form_is_the_rotation():
    """Guards against a path that ignores the rotation or applies its transpose: the outputs with
    R, with R^T and without a rotation all differ, and R in either form gives one output."""
    gen = _gen("is_rotation")
    q, k, v = (torch.randn(1, 2, 16, 16, generator=gen).to(DEVICE) for _ in range(3))
    ids = torch.zeros(16, dtype=torch.long, device=DEVICE)
    R = _plane_rotations(2, 16, 1, gen).to(DEVICE)
    f = low_rank_rotation(R)

    def run(rot):
        return rollingq.rollingq_attention(q, k, v, ids, 1, rotation=rot, rotate_rows=16, stats=False)[0]

    lowrank, dense, transposed, plain = run(f), run(R), run(R.transpose(1, 2)), run(None)
    assert torch.allclose(lowrank, dense, atol=1e-5)
    assert (lowrank - transposed).abs().max() > 1e-2 and (lowrank - plain).abs().max() > 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", ["every", "mask"])
def test_attention_parity_cuda_paper_head(dtype, rows, poisoned):
    """The paper's head width (768, the D split) with RollingQ's plane rotation factored, as the
    module passes it: forward, statistics and gradients against the float64 reference. The shape is
    CUDA_LARGE_SHAPES' D 768 one, whose kernels the GPU check precompiles."""
    gen = _gen("cuda_paper", dtype, rows)
    B, H, Hkv, L, _, D, causal = next(s for s in CUDA_LARGE_SHAPES if s[5] == 768)
    rot = low_rank_rotation(_plane_rotations(H, D, 1, gen).to(DEVICE))
    assert rot.rank == 2
    _check_parity(B, H, Hkv, L, D, 3, dtype, rot, L if rows == "every" else 4, causal, gen, pad=5)
