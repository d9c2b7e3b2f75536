"""Parity of the fused backward kernels (kernels/attention_bwd.py) against the reference's autograd.

Runs the Triton kernels through the interpreter on the CPU (TRITON_INTERPRET=1), or on CUDA when
present. Rule (design.md, "Numerics"): max |kernel - ref64| <= 2 * max |ref_lowp - ref64| + 1e-5 for
dq, dk and dv, where ref64 is the reference in float64 and ref_lowp the reference in the test dtype.
The kernel's inputs q_rot, lse and out are built here from the same q, k, v the way the forward
produces them (q_rot rotated in fp32 and cast; lse's (log2 l, m) exact, (+inf, 0) on rows with no
live key).
"""
import math
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the kernels run in Triton's interpreter; triton.jit reads this at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rollingq.kernels import attention_bwd as bwd  # noqa: E402
from rollingq.kernels import common  # noqa: E402
from rollingq.reference import rollingq_attention_reference, rotate_queries  # noqa: E402
from rollingq.validation import rotate_row_mask  # noqa: E402
from tests.numerics import assert_close_by_rule, nan_buffer  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NUM_MODALITIES = 3


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernels write starts NaN-filled, so an unwritten element fails the test."""
    monkeypatch.setattr(common, "new_buffer", nan_buffer)


def _seed(*params) -> int:
    return zlib.crc32(repr(params).encode())  # stable across processes, unlike hash()


def _rotation(h: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """Random orthogonal [H, D, D] (never the identity)."""
    a = torch.randn(h, d, d, generator=gen, dtype=torch.float64)
    qm, r = torch.linalg.qr(a)
    return (qm * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]).float()


def _ids(b: int, lk: int, per_batch: bool, gen: torch.Generator) -> torch.Tensor:
    """Modality ids with some -1 padding: int64 [Lk] (shared) or [B, Lk]."""
    ids = torch.randint(0, NUM_MODALITIES, (b if per_batch else 1, lk), generator=gen)
    ids[:, -3:] = -1  # tail padding
    ids[:, lk // 2] = -1  # a hole in the middle
    return ids if per_batch else ids[0]


def _kernel_inputs(q, k, v, ids2d, rotation, rot_mask, causal, scale):
    """What the forward hands to the backward: q_rot, out (q's dtype) and lse [2, B, H, Lq] fp32, each
    row's log2 l and max m of the scores in base 2 (+inf and 0 on a row with no live key)."""
    dt = q.dtype
    q_rot = rotate_queries(q.float(), rotation, rot_mask).to(dt)
    group = q.shape[1] // k.shape[1]
    kh = k.double().repeat_interleave(group, 1)
    vh = v.double().repeat_interleave(group, 1)
    s = (q_rot.double() @ kh.transpose(-1, -2)) * scale
    vis = (ids2d >= 0)[:, None, None, :]
    if causal:
        vis = vis & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~vis, float("-inf"))
    s2 = s * math.log2(math.e)
    m = s2.amax(-1)
    empty = m == float("-inf")
    m = torch.where(empty, torch.zeros_like(m), m)
    log2_l = torch.where(empty, float("inf"), torch.exp2(s2 - m[..., None]).sum(-1).log2())
    p = torch.exp2(s2 - m[..., None] - log2_l[..., None])
    out = (p @ vh).to(v.dtype)
    return q_rot, out, torch.stack((log2_l, m)).float().contiguous()


def _reference_grads(q, k, v, ids, rotation, rotate_rows, causal, scale, do, dtype):
    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    rot = None if rotation is None else rotation.to(torch.float64 if dtype == torch.float64 else torch.float32)
    out, _ = rollingq_attention_reference(qq, kk, vv, ids, NUM_MODALITIES, rotation=rot, rotate_rows=rotate_rows,
                                          causal=causal, scale=scale, stats=False)
    out.backward(do.to(dtype))
    return qq.grad, kk.grad, vv.grad


def _run_and_check(q, k, v, ids, rotation, rotate_rows, causal, do, scale=None, pass_mask=True, pass_rotation=True):
    """Run attention_bwd on (q, k, v) and check dq, dk, dv against the references."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    ids2d = (ids.expand(B, Lk) if ids.dim() == 1 else ids).to(torch.int32)
    rot_mask = rotate_row_mask(rotate_rows, B, Lq, q.device)
    # Rows are rotated only when the rotation reaches the kernel; without a mask, every row.
    eff_rot = rotation if pass_rotation else None
    eff_rows = (rotate_rows if pass_mask else Lq) if pass_rotation else None
    if pass_rotation and not pass_mask:
        rot_mask = rotate_row_mask(Lq, B, Lq, q.device)  # what the forward used
    q_rot, out, lse = _kernel_inputs(q, k, v, ids2d, eff_rot, rot_mask, causal, scale)
    dq, dk, dv, _ = bwd.attention_bwd(do, q_rot, k, v, out, lse, ids2d, causal, scale,
                                   rotation if pass_rotation else None, rot_mask if pass_mask else None)
    ref64 = _reference_grads(q, k, v, ids, eff_rot, eff_rows, causal, scale, do, torch.float64)
    reflp = _reference_grads(q, k, v, ids, eff_rot, eff_rows, causal, scale, do, q.dtype)
    for name, got, r64, rlp, like in (("dq", dq, ref64[0], reflp[0], q), ("dk", dk, ref64[1], reflp[1], k),
                                      ("dv", dv, ref64[2], reflp[2], v)):
        assert got.shape == like.shape and got.dtype == like.dtype, (name, got.shape, got.dtype)
        assert torch.isfinite(got).all(), f"{name} has NaN/inf"
        err = (got.double() - r64).abs().max().item()
        ref_err = (rlp.double() - r64).abs().max().item()
        assert err <= 2 * ref_err + 1e-5, f"{name}: kernel error {err:.3e} > 2 * reference error {ref_err:.3e} + 1e-5"
    return dq, dk, dv, ref64


def _qkv(b, h, hkv, lq, lk, d, dtype, gen):
    q = torch.randn(b, h, lq, d, generator=gen).to(DEV, dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen).to(DEV, dtype)
    v = torch.randn(b, hkv, lk, d, generator=gen).to(DEV, dtype)
    do = torch.randn(b, h, lq, d, generator=gen).to(DEV, dtype)
    return q, k, v, do


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
def test_bwd_parity_core(dtype, heads, causal, tma, monkeypatch):
    """fp16/fp32 x MHA/GQA x causal: shared ids with padding, first 13 rows rotated, D = 24; tiles
    fetched through tensor descriptors (fp16 here; fp32 always uses pointers) and through pointers."""
    monkeypatch.setattr(bwd, "USE_TMA", tma)
    gen = torch.Generator().manual_seed(_seed(dtype, heads, causal))
    h, hkv = heads
    q, k, v, do = _qkv(2, h, hkv, 37, 37, 24, dtype, gen)
    ids = _ids(2, 37, per_batch=False, gen=gen).to(DEV)
    _run_and_check(q, k, v, ids, _rotation(h, 24, gen).to(DEV), 13, causal, do)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_bwd_cross_lengths_per_batch_ids(monkeypatch, dtype):
    """Lq != Lk (non-causal), per-batch ids with padding, bool [B, Lq] row mask, D = 40, GQA, custom
    scale; the dq rotation epilogue in 4 column chunks of 16 (the last two partly/fully masked)."""
    monkeypatch.setattr(bwd, "ROT_CHUNK", 16)
    monkeypatch.setattr(bwd, "ROT_CHUNK_IEEE", 16)
    gen = torch.Generator().manual_seed(_seed("cross", dtype))
    q, k, v, do = _qkv(2, 4, 2, 21, 40, 40, dtype, gen)
    ids = _ids(2, 40, per_batch=True, gen=gen).to(DEV)
    rows = torch.rand(2, 21, generator=gen).to(DEV) < 0.5
    _run_and_check(q, k, v, ids, _rotation(4, 40, gen).to(DEV), rows, False, do, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_bwd_rows_without_live_keys(dtype):
    """Batch 1 all padding: its rows have lse = +inf; grads finite, zero for that batch, parity elsewhere."""
    gen = torch.Generator().manual_seed(_seed("empty", dtype))
    q, k, v, do = _qkv(2, 2, 1, 19, 19, 16, dtype, gen)
    ids = _ids(2, 19, per_batch=True, gen=gen).to(DEV)
    ids[1] = -1
    dq, dk, dv, _ = _run_and_check(q, k, v, ids, _rotation(2, 16, gen).to(DEV), 19, False, do)
    assert dq[1].abs().max() == 0 and dk[1].abs().max() == 0 and dv[1].abs().max() == 0
    assert dq[0].abs().max() > 0 and dk[0].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_bwd_causal_first_key_padded(dtype):
    """Causal with key 0 padded: query row 0 sees nothing (zero dq row); padded keys get zero dk/dv."""
    gen = torch.Generator().manual_seed(_seed("causal-empty", dtype))
    q, k, v, do = _qkv(2, 4, 4, 33, 33, 24, dtype, gen)
    ids = _ids(2, 33, per_batch=True, gen=gen).to(DEV)
    ids[:, 0] = -1
    rows = torch.zeros(33, dtype=torch.bool, device=DEV)
    rows[::3] = True
    dq, dk, dv, _ = _run_and_check(q, k, v, ids, _rotation(4, 24, gen).to(DEV), rows, True, do)
    assert dq[:, :, 0].abs().max() == 0
    padded = (ids < 0)[:, None, :, None].expand_as(dk)
    assert dk[padded].abs().max() == 0 and dv[padded].abs().max() == 0


@pytest.mark.parametrize("rows", [None, 7], ids=["no_mask", "mask"])
def test_bwd_unrotated_forms(rows):
    """No rotation reaches the kernel (with or without a row mask): no row is rotated."""
    gen = torch.Generator().manual_seed(_seed("unrot", rows))
    q, k, v, do = _qkv(1, 2, 2, 18, 18, 16, torch.float32, gen)
    ids = _ids(1, 18, per_batch=False, gen=gen).to(DEV)
    rot = _rotation(2, 16, gen).to(DEV)
    _run_and_check(q, k, v, ids, rot, rows, True, do, pass_rotation=False)


@pytest.mark.parametrize("dq_chunk", [None, 16], ids=["in-kernel", "split"])
def test_bwd_every_row_without_mask(dq_chunk, monkeypatch):
    """A rotation with rot_mask None rotates every row (what the public function passes for
    rotate_rows == Lq): in dQ's rotation epilogue and in the split path's rotation afterwards."""
    if dq_chunk:  # dq in 3 chunks of 16: no program holds a whole row, the launcher rotates afterwards
        for name, value in (("DKDV_MAX_RESIDENT_D", 32), ("DQ_MAX_RESIDENT_D", 32), ("SPLIT_D_CHUNK", 16),
                            ("SPLIT_DKDV_CHUNK", 32), ("SPLIT_DQ_CHUNK", 16), ("SPLIT_DQ_CHUNK_IEEE", 16)):
            monkeypatch.setattr(bwd, name, value)
    gen = torch.Generator().manual_seed(_seed("every_row", dq_chunk))
    q, k, v, do = _qkv(2, 2, 1, 19, 19, 40 if dq_chunk else 16, torch.float32, gen)
    ids = _ids(2, 19, per_batch=True, gen=gen).to(DEV)
    rot = _rotation(2, q.shape[-1], gen).to(DEV)
    _run_and_check(q, k, v, ids, rot, 5, True, do, pass_mask=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_bwd_strided_inputs(dtype):
    """q, k, v, do, q_rot as [B, L, H, D].transpose(1, 2) views; ids and rot_mask expanded (stride 0)."""
    gen = torch.Generator().manual_seed(_seed("strided", dtype))
    B, H, Hkv, L, D = 2, 4, 2, 26, 24
    q = torch.randn(B, L, H, D, generator=gen).to(DEV, dtype).transpose(1, 2)
    k = torch.randn(B, L, Hkv, D, generator=gen).to(DEV, dtype).transpose(1, 2)
    v = torch.randn(B, L, Hkv, D, generator=gen).to(DEV, dtype).transpose(1, 2)
    do = torch.randn(B, L, H, D, generator=gen).to(DEV, dtype).transpose(1, 2)
    assert not q.is_contiguous() and not do.is_contiguous()
    ids = _ids(B, L, per_batch=False, gen=gen).to(DEV)
    rot = _rotation(H, D, gen).to(DEV)
    rows = torch.rand(L, generator=gen).to(DEV) < 0.5
    ids2d = ids.to(torch.int32).expand(B, L)
    rot_mask = rows.expand(B, L)
    assert ids2d.stride(0) == 0 and rot_mask.stride(0) == 0
    q_rot, out, lse = _kernel_inputs(q, k, v, ids2d, rot, rot_mask, False, D ** -0.5)
    q_rot = q_rot.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous, like a saved view
    out = out.transpose(1, 2).contiguous().transpose(1, 2)
    dq, dk, dv, _ = bwd.attention_bwd(do, q_rot, k, v, out, lse, ids2d, False, D ** -0.5, rot, rot_mask)
    ref64 = _reference_grads(q, k, v, ids, rot, rows, False, D ** -0.5, do, torch.float64)
    reflp = _reference_grads(q, k, v, ids, rot, rows, False, D ** -0.5, do, dtype)
    for name, got, r64, rlp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref64, reflp):
        err = (got.double() - r64).abs().max().item()
        ref_err = (rlp.double() - r64).abs().max().item()
        assert torch.isfinite(got).all() and err <= 2 * ref_err + 1e-5, (name, err, ref_err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dq_chunk", [16, 64], ids=["dq-chunked", "dq-whole"])
def test_bwd_d_split(monkeypatch, dtype, causal, dq_chunk):
    """D-split branches (thresholds lowered to 32), D = 40, GQA, rotated rows: reductions in 3 chunks
    of 16; dk/dv in 2 output chunks of 32 (the last one masked); dq either in 3 chunks of 16 (rotation
    applied afterwards in torch) or in one chunk of 64 (rotation epilogue in the kernel, 3 R chunks);
    the delta pre-pass chunked over D too."""
    monkeypatch.setattr(bwd, "DKDV_MAX_RESIDENT_D", 32)
    monkeypatch.setattr(bwd, "DQ_MAX_RESIDENT_D", 32)
    monkeypatch.setattr(bwd, "SPLIT_D_CHUNK", 16)
    monkeypatch.setattr(bwd, "SPLIT_DKDV_CHUNK", 32)
    monkeypatch.setattr(bwd, "SPLIT_DQ_CHUNK", dq_chunk)
    monkeypatch.setattr(bwd, "SPLIT_DQ_CHUNK_IEEE", dq_chunk)
    monkeypatch.setattr(bwd, "PRE_D_CHUNK", 16)
    monkeypatch.setattr(bwd, "ROT_CHUNK", 16)
    monkeypatch.setattr(bwd, "ROT_CHUNK_IEEE", 16)
    assert bwd._dkdv_plan(40) == (True, 16, 32, 3) and bwd._pre_blocks(40) == (16, 3)
    assert bwd._dq_plan(40, dtype == torch.float32) == (True, 16, dq_chunk, 3)
    gen = torch.Generator().manual_seed(_seed("split", dtype, causal, dq_chunk))
    lq = 29 if causal else 17
    q, k, v, do = _qkv(2, 4, 2, lq, 29, 40, dtype, gen)
    ids = _ids(2, 29, per_batch=causal, gen=gen).to(DEV)
    rows = torch.rand(2, lq, generator=gen).to(DEV) < 0.6
    _run_and_check(q, k, v, ids, _rotation(4, 40, gen).to(DEV), rows, causal, do)


def test_bwd_scores_above_the_forwards_max():
    """A recomputed score a few ulps above the forward's row max m (another dot order rounds it
    there; at |s| ~ 1e10 an ulp is 1024) still gives p <= 1 / l: without the min in p = 2^(min(s - m, 0)
    - log2 l), m 2 ulps low made p = 2^2048 = inf and the gradients NaN. Rows are one-hot or a tie
    (gaps of ~1e9 between scores), so m's error moves nothing else; dq, dk divided by the scale."""
    gen = torch.Generator().manual_seed(_seed("above-max"))
    q = torch.zeros(1, 2, 7, 16)
    q[..., :2] = torch.randint(1, 4, (1, 2, 7, 2), generator=gen).float()
    k = torch.zeros(1, 1, 9, 16)
    k[..., :2] = torch.randint(-3, 4, (1, 1, 9, 2), generator=gen).float()
    k[0, 0, 4] = 3.0  # the top key on every row
    v = torch.randn(1, 1, 9, 16, generator=gen)
    do = torch.randn(1, 2, 7, 16, generator=gen)
    q, k, v, do = (t.to(DEV) for t in (q, k, v, do))
    ids = torch.zeros(9, dtype=torch.long, device=DEV)
    ids2d = ids.to(torch.int32).expand(1, 9)
    scale = 2.0 ** 29
    q_rot, out, lse = _kernel_inputs(q, k, v, ids2d, None, None, False, scale)
    assert lse[1].abs().min().item() > 1e9
    lse[1] -= 2048.0
    dq, dk, dv, _ = bwd.attention_bwd(do, q_rot, k, v, out, lse, ids2d, False, scale, None, None)
    ref64 = _reference_grads(q, k, v, ids, None, None, False, scale, do, torch.float64)
    ref32 = _reference_grads(q, k, v, ids, None, None, False, scale, do, torch.float32)
    for name, got, r64, r32, u in zip(("dq", "dk", "dv"), (dq, dk, dv), ref64, ref32, (1 / scale, 1 / scale, 1.0)):
        assert_close_by_rule(name, got * u, r64 * u, r32 * u)


def test_bwd_bad_arguments():
    """Wrong lse dtype, ids shape or causal lengths raise errors naming the argument."""
    q = torch.randn(1, 2, 8, 16, device=DEV)
    k = torch.randn(1, 1, 8, 16, device=DEV)
    lse = torch.zeros(2, 1, 2, 8, device=DEV)
    ids = torch.zeros(1, 8, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="lse"):
        bwd.attention_bwd(q, q, k, k, q, lse.half(), ids, False, 0.25, None, None)
    with pytest.raises(ValueError, match="ids"):
        bwd.attention_bwd(q, q, k, k, q, lse, ids[:, :5], False, 0.25, None, None)
    with pytest.raises(ValueError, match="causal"):
        bwd.attention_bwd(q, q, k[:, :, :5], k[:, :, :5], q, lse, ids[:, :5], True, 0.25, None, None)
    with pytest.raises(ValueError, match="rot_mask"):
        bwd.attention_bwd(q, q, k, k, q, lse, ids, False, 0.25, torch.eye(16).expand(2, 16, 16),
                          torch.ones(1, 7, dtype=torch.bool))


@pytest.mark.parametrize("arch", [90, 80])
def test_autotune_pruner_keeps_the_class_list(arch, monkeypatch):
    """The autotuner's pruner keeps exactly the configs listed for the launch's D class on the card."""
    monkeypatch.setattr(common, "TARGET_ARCH", arch)
    for table in (bwd._DKDV_TABLE, bwd._DQ_TABLE):
        prune = bwd._pruner(table)
        configs = bwd._to_configs(bwd._union(table))
        for kwargs, cls in ((dict(BLOCK_D=64, BLOCK_DV=64, SPLIT=False, IEEE=False), 64),
                            (dict(BLOCK_D=128, BLOCK_DV=128, SPLIT=False, IEEE=False), 128),
                            (dict(BLOCK_D=64, BLOCK_DV=128, SPLIT=True, IEEE=False), "split"),
                            (dict(BLOCK_D=32, BLOCK_DV=32, SPLIT=False, IEEE=True), "ieee-64"),
                            (dict(BLOCK_D=64, BLOCK_DV=64, SPLIT=True, IEEE=True), "ieee-split")):
            kept = prune(configs, {}, **kwargs)
            rows = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
            assert sorted(rows) == sorted(table[arch][cls])


@pytest.mark.parametrize("arch, ieee, plans", [
    (90, False, {64: (False, 64), 128: (False, 128), 256: (False, 256), 768: (True, 256)}),
    (90, True, {128: (False, 128), 256: (True, 128), 768: (True, 128)}),
    (80, False, {128: (False, 128), 256: (True, 128), 768: (True, 128)}),
])
def test_dkdv_plan_per_card_and_precision(arch, ieee, plans, monkeypatch):
    """Hopper keeps 16-bit K/V tiles resident up to D 256 and splits wider heads into 256-wide
    slices; fp32 and pre-Hopper cards have room for 128 only."""
    monkeypatch.setattr(common, "TARGET_ARCH", arch)
    for d, (split, width) in plans.items():
        got = bwd._dkdv_plan(d, ieee)
        assert (got[0], got[2]) == (split, width), (d, got)


@pytest.mark.parametrize("D, causal", [(40, True), (72, False), (96, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_bwd_dq_wide_split(D, causal, dtype, monkeypatch):
    """dQ's wide split, forced, with 16-wide chunks: D 40 is 3 chunks (the second program's last
    accumulator lies past the head), D 72 is 5, D 96 is 6 (all three accumulators in both
    programs). Score reductions in 16-wide chunks, GQA, padding, rotated rows (dq rotated afterwards)."""
    for name, value in (("DKDV_MAX_RESIDENT_D", 32), ("DQ_MAX_RESIDENT_D", 32), ("SPLIT_D_CHUNK", 16),
                        ("SPLIT_DKDV_CHUNK", 32), ("SPLIT_DQ_CHUNK", 16), ("SPLIT_DQ_CHUNK_IEEE", 16),
                        ("WIDE_CHUNK", 16)):
        monkeypatch.setattr(bwd, name, value)
    monkeypatch.setattr(bwd._bwd_dq, "configs", bwd._to_configs([bwd._INTERPRET_DQ], WIDE=1))
    monkeypatch.setattr(bwd._bwd_dq, "cache", {})
    assert bwd.wide_plan(D, 16)[2] == 2
    gen = torch.Generator().manual_seed(_seed("dq_wide", D, causal, dtype))
    q, k, v, do = _qkv(2, 2, 1, 29, 29, D, dtype, gen)
    ids = _ids(2, 29, per_batch=True, gen=gen).to(DEV)
    _run_and_check(q, k, v, ids, _rotation(2, D, gen).to(DEV), 11, causal, do)


@pytest.mark.parametrize("D", [768, 520])
def test_bwd_dq_wide_split_real_widths(D, monkeypatch):
    """dQ's wide split at its real widths (64-wide score chunks, 128-wide dq chunks) on the paper's
    D 768 (all three accumulators) and on D 520 (the last chunk 8 columns wide), fp16, causal."""
    monkeypatch.setattr(bwd._bwd_dq, "configs", bwd._to_configs([bwd._INTERPRET_DQ], WIDE=1))
    monkeypatch.setattr(bwd._bwd_dq, "cache", {})
    gen = torch.Generator().manual_seed(_seed("dq_wide_real", D))
    q, k, v, do = _qkv(1, 1, 1, 40, 40, D, torch.float16, gen)
    ids = _ids(1, 40, per_batch=True, gen=gen).to(DEV)
    _run_and_check(q, k, v, ids, _rotation(1, D, gen).to(DEV), 40, True, do)


def test_dq_wide_split_is_offered_where_it_applies(monkeypatch):
    """The dQ pruner adds the wide rows to Hopper's 16-bit split class up to WIDE_MAX_D, never with
    the in-kernel rotation epilogue, for fp32, or on pre-Hopper cards."""
    configs = bwd._bwd_dq.configs if len(bwd._bwd_dq.configs) > 1 else (
        bwd._to_configs(bwd._union(bwd._DQ_TABLE), WIDE=0)
        + bwd._to_configs(sorted({r for rows in bwd._DQ_WIDE.values() for r in rows}), WIDE=1))
    prune = bwd._pruner(bwd._DQ_TABLE, bwd._DQ_WIDE)

    def wide(arch, d=768, ieee=False, rotate=False):
        monkeypatch.setattr(common, "TARGET_ARCH", arch)
        kept = prune(configs, {}, BLOCK_D=64, BLOCK_DV=256, SPLIT=True, IEEE=ieee, ROTATE=rotate, HEAD_D=d)
        return sorted(_row for _row in (bwd._row(c) for c in kept if c.kwargs["WIDE"]))

    assert wide(90) == sorted(bwd._DQ_WIDE[90])
    assert wide(90, d=776) == [] and wide(90, ieee=True) == [] and wide(90, rotate=True) == [] and wide(80) == []


def _tiles(table):
    return sorted({(bm, bn): (bm, bn, w, s) for by_class in table.values()
                   for lst in by_class.values() for bm, bn, w, s in lst}.values())


@pytest.mark.parametrize("kernel, config", [("dkdv", c) for c in _tiles(bwd._DKDV_TABLE)]
                         + [("dq", c) for c in _tiles(bwd._DQ_TABLE)],
                         ids=lambda x: x if isinstance(x, str) else "BM{}_BN{}_w{}_s{}".format(*x))
def test_every_table_tile(kernel, config, monkeypatch):
    """Each tile shape the autotune tables can pick, forced, on lengths no tile divides (causal,
    GQA, padding, some rows rotated): the block bounds and masks hold for every BLOCK_M x BLOCK_N."""
    bm, bn, w, s = config
    at = bwd._bwd_dkdv if kernel == "dkdv" else bwd._bwd_dq
    monkeypatch.setattr(at, "configs", bwd._to_configs([config], **({} if kernel == "dkdv" else {"WIDE": 0})))
    monkeypatch.setattr(at, "cache", {})
    gen = torch.Generator().manual_seed(bm * 1000 + bn)
    q, k, v, do = _qkv(1, 4, 2, 203, 203, 32, torch.float16, gen)
    ids = _ids(1, 203, per_batch=False, gen=gen).to(DEV)
    _run_and_check(q, k, v, ids, _rotation(4, 32, gen).to(DEV), 77, True, do)
