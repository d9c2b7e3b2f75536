"""Forward kernel parity with the float64 reference (design.md's rule), every branch.

On CPU these run through Triton's interpreter (fp16 and fp32; bf16 tl.dot is broken there), on CUDA
on the GPU. Every output buffer of the kernel is NaN-poisoned before launch.
"""
import pytest
import torch

import rollingq
from rollingq.functional import uses_kernel
from rollingq.kernels import attention_fwd, common
from rollingq.reference import rollingq_attention_reference
from tests.numerics import CUDA_LARGE_SHAPES, assert_close_by_rule, nan_buffer, stats_tol

pytestmark = pytest.mark.kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(common, "new_buffer", nan_buffer)


def random_rotation(h, d, gen):
    a = torch.randn(h, d, d, generator=gen, dtype=torch.float64)
    qmat, r = torch.linalg.qr(a)
    return (qmat * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)).float()


def make_case(B, H, Hkv, Lq, Lk, D, M, dtype, seed, ids_mode="batch", pad=0.2, strided=False):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        if strided:  # a [B, L, H, D] buffer seen as [B, H, L, D]: non-contiguous, as users pass it
            b, h, l, d = shape
            return torch.randn(b, l, h, d, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    q, k, v = rnd(B, H, Lq, D), rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, D)
    shape = (Lk,) if ids_mode == "shared" else (B, Lk)
    ids = torch.randint(0, M, shape, generator=gen)
    ids[torch.rand(shape, generator=gen) < pad] = -1
    rot = random_rotation(H, D, gen).to(DEVICE)
    return q, k, v, ids.to(DEVICE), rot, gen


def check(q, k, v, ids, M, rot, rotate_rows, causal=False, scale=None, stats=True):
    assert uses_kernel(q.device), "these tests must run the Triton kernel"
    out, st = rollingq.rollingq_attention(q, k, v, ids, M, rotation=rot, rotate_rows=rotate_rows,
                                          causal=causal, scale=scale, stats=stats)
    r64_rot = None if rot is None else rot.double()
    rr = rotate_rows
    o64, s64 = rollingq_attention_reference(q.double(), k.double(), v.double(), ids, M, r64_rot, rr, causal, scale)
    olp, _ = rollingq_attention_reference(q, k, v, ids, M, rot, rr, causal, scale, stats=False)
    assert out.dtype == v.dtype and out.shape == q.shape
    assert_close_by_rule("out", out, o64, olp)
    if not stats:
        assert st is None
        return out, None, s64
    tol = stats_tol(q.dtype)
    assert st.attn_mass.dtype == torch.float32 and st.key_sum.dtype == torch.float32
    assert (st.attn_mass.double() - s64.attn_mass).abs().max().item() <= tol
    assert (st.key_sum.double() - s64.key_sum).abs().max().item() <= tol * max(1.0, s64.key_sum.abs().max().item())
    # Counted here, not by the host function both paths share: [B, M] keys of each modality.
    per_batch = ids.expand(q.shape[0], ids.shape[-1]).cpu()
    counts = (per_batch[..., None] == torch.arange(M)).sum(1)
    assert torch.equal(st.key_count.cpu().long(), counts)
    return out, st, s64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
def test_parity_core(dtype, causal, gqa, tma, monkeypatch):
    """Both ways of fetching K/V tiles: tensor descriptors (taken where the layout allows) and
    per-element pointers (other layouts, and cards before sm_90)."""
    monkeypatch.setattr(attention_fwd, "USE_TMA", tma)
    H, Hkv = (4, 2) if gqa else (2, 2)
    q, k, v, ids, rot, _ = make_case(2, H, Hkv, 37, 37, 24, 3, dtype, seed=hash((str(dtype), causal, gqa)) % 10000)
    check(q, k, v, ids, 3, rot, rotate_rows=5, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["none", "int", "zero", "mask1d", "mask2d", "no_rotation"])
def test_rotate_rows_forms(dtype, form):
    B, Lq = 2, 21
    q, k, v, ids, rot, gen = make_case(B, 2, 1, Lq, 29, 16, 2, dtype, seed=11, ids_mode="shared")
    rows = {"none": None, "int": 7, "zero": 0, "no_rotation": 4,
            "mask1d": (torch.rand(Lq, generator=gen) < 0.5).to(DEVICE),
            "mask2d": (torch.rand(B, Lq, generator=gen) < 0.5).to(DEVICE)}[form]
    check(q, k, v, ids, 2, None if form == "no_rotation" else rot, rows)


def test_rotation_changes_the_output():
    """Guards against a kernel that ignores the rotation: rotated and unrotated outputs must differ."""
    q, k, v, ids, rot, _ = make_case(1, 2, 2, 16, 16, 16, 2, torch.float32, seed=3, pad=0.0)
    a, _ = rollingq.rollingq_attention(q, k, v, ids, 2, rotation=rot, rotate_rows=16, stats=False)
    b, _ = rollingq.rollingq_attention(q, k, v, ids, 2, stats=False)
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stats", [True, False])
def test_stats_toggle_and_lengths(dtype, stats):
    # Lq != Lk, lengths that are not multiples of any block size.
    q, k, v, ids, rot, _ = make_case(2, 3, 1, 19, 45, 40, 4, dtype, seed=5)
    check(q, k, v, ids, 4, rot, rotate_rows=19, stats=stats, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(dtype):
    q, k, v, ids, rot, _ = make_case(2, 4, 2, 23, 23, 16, 2, dtype, seed=8, strided=True)
    assert not q.is_contiguous() and not k.is_contiguous()
    check(q, k, v, ids, 2, rot, rotate_rows=3, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_without_live_keys(dtype):
    B, Lk = 3, 20
    q, k, v, _, rot, gen = make_case(B, 2, 2, Lk, Lk, 16, 2, dtype, seed=9)
    ids = torch.randint(0, 2, (B, Lk), generator=gen)
    ids[1] = -1  # batch 1: every key is padding
    ids[2, :3] = -1  # batch 2, causal: rows 0..2 see nothing
    ids = ids.to(DEVICE)
    for causal in (False, True):
        out, st, _ = check(q, k, v, ids, 2, rot, rotate_rows=Lk, causal=causal)
        assert torch.all(out[1] == 0) and torch.all(st.attn_mass[1] == 0)
        assert torch.all(st.key_sum[1] == 0) and torch.all(st.key_count[1] == 0)
        if causal:
            assert torch.all(out[2, :, :3] == 0) and torch.all(st.attn_mass[2, :, :3] == 0)
    live = st.attn_mass[0].sum(-1)
    assert torch.allclose(live, torch.ones_like(live), atol=1e-3)


@pytest.mark.parametrize("M", [1, 16])
def test_modality_count_extremes(M):
    q, k, v, ids, rot, _ = make_case(2, 2, 2, 17, 33, 16, M, torch.float32, seed=M, pad=0.1)
    check(q, k, v, ids, M, rot, rotate_rows=2)


def test_key_sums_ignore_causal_masking():
    """key_sum covers every live key even where causal masking hides keys from query blocks."""
    q, k, v, ids, rot, _ = make_case(1, 2, 1, 40, 40, 16, 3, torch.float32, seed=21)
    _, a = rollingq.rollingq_attention(q, k, v, ids, 3, causal=True)
    _, b = rollingq.rollingq_attention(q[:, :, :5], k, v, ids, 3, causal=False)
    torch.testing.assert_close(a.key_sum, b.key_sum, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [8, 24, 40, 64])
def test_head_dims(head_dim):
    q, k, v, ids, rot, _ = make_case(1, 2, 2, 18, 18, head_dim, 2, torch.float16, seed=head_dim)
    check(q, k, v, ids, 2, rot, rotate_rows=18, causal=head_dim == 40)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal, rows", [(False, 4), (True, 4), (True, 21)])
def test_d_split(dtype, causal, rows, monkeypatch):
    """The split over D that serves heads above MAX_SINGLE_D (the paper's 768), on a small head;
    rows 21 = Lq: every row rotated, which the launcher knows without a mask."""
    monkeypatch.setattr(attention_fwd, "MAX_SINGLE_D", 16)
    monkeypatch.setattr(attention_fwd, "SPLIT_D_CHUNK", 16)
    monkeypatch.setattr(attention_fwd, "SPLIT_DV_CHUNK", 32)
    monkeypatch.setattr(attention_fwd, "SPLIT_DV_CHUNK_NARROW", 16)
    q, k, v, ids, rot, _ = make_case(2, 2, 1, 21, 21, 40, 3, dtype, seed=31 + rows)
    check(q, k, v, ids, 3, rot, rotate_rows=rows, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D, causal, tma, stats", [(40, True, True, True), (72, False, False, True),
                                                   (96, True, False, True), (96, False, True, True),
                                                   (96, True, True, False)])
def test_wide_split(dtype, D, causal, tma, stats, monkeypatch):
    """The wide split (Q resident in WIDE_CHUNK-wide tiles, two programs share the output), forced,
    with 16-wide chunks: D 40 is 3 chunks (the second program's last chunk lies past the head),
    D 72 is 5, D 96 is 6 (every unrolled Q chunk and all 3 accumulators). GQA, padding; rotated
    rows with statistics, or neither."""
    monkeypatch.setattr(attention_fwd, "MAX_SINGLE_D", 16)
    monkeypatch.setattr(attention_fwd, "WIDE_CHUNK", 16)
    monkeypatch.setattr(attention_fwd, "USE_TMA", tma)
    kernel = attention_fwd._rollingq_fwd_kernel
    monkeypatch.setattr(kernel, "configs", [attention_fwd._config((16, 16, 4, 1), wide=True)])
    monkeypatch.setattr(kernel, "cache", {})
    assert attention_fwd.wide_plan(D, 16)[2] == 2
    q, k, v, ids, rot, _ = make_case(2, 2, 1, 37, 37, D, 3, dtype, seed=D + 7 * causal)
    check(q, k, v, ids, 3, rot if stats else None, rotate_rows=9 if stats else None, causal=causal, stats=stats)


@pytest.mark.parametrize("D, tma", [(768, True), (520, False)])
def test_wide_split_real_widths(D, tma, monkeypatch):
    """The wide split at its real chunk width (128) on the paper's D 768 (6 chunks, all three
    accumulators; descriptors) and on D 520 (5 chunks, the last one 8 columns wide; pointers)."""
    monkeypatch.setattr(attention_fwd, "USE_TMA", tma)
    kernel = attention_fwd._rollingq_fwd_kernel
    monkeypatch.setattr(kernel, "configs", [attention_fwd._config((16, 16, 4, 1), wide=True)])
    monkeypatch.setattr(kernel, "cache", {})
    q, k, v, ids, rot, _ = make_case(1, 1, 1, 40, 40, D, 3, torch.float16, seed=D)
    check(q, k, v, ids, 3, rot, rotate_rows=40, causal=True)


def test_wide_split_is_offered_up_to_its_limit():
    """Hopper's 16-bit split class autotunes over the plain and the wide split while the head fits
    6 chunks; wider heads, fp32 and pre-Hopper cards get the plain split only."""
    from rollingq.kernels.common import planning_for

    configs = attention_fwd._table_configs()

    def wide_kept(arch, d, ieee):
        with planning_for(arch):
            kept = attention_fwd._prune(configs, {"HEAD_D": d, "SPLIT": True, "IEEE": ieee, "TMA": True})
        assert kept
        return sum(c.kwargs["WIDE"] for c in kept)

    assert wide_kept(90, 768, False) == len(attention_fwd.FWD_CONFIGS_BY_ARCH[90][("16bit", "wide")])
    assert wide_kept(90, 520, False) > 0
    assert wide_kept(90, 776, False) == 0 and wide_kept(90, 768, True) == 0 and wide_kept(80, 768, False) == 0


def test_descriptor_only_rows_need_descriptors():
    """A ("16bit", class, "tma") row (it spills with pointer loads) is offered only to launches
    that fetch K/V through tensor descriptors."""
    from rollingq.kernels.common import planning_for

    rows = attention_fwd.FWD_CONFIGS_BY_ARCH[90][("16bit", 128, "tma")]
    configs = attention_fwd._table_configs()

    def kept(tma):
        with planning_for(90):
            got = attention_fwd._prune(configs, {"HEAD_D": 128, "SPLIT": False, "IEEE": False, "TMA": tma})
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in got}

    plain = set(attention_fwd.FWD_CONFIGS_BY_ARCH[90][("16bit", 128)])
    assert kept(False) == plain and kept(True) == plain | set(rows)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", CUDA_LARGE_SHAPES)
def test_parity_cuda_large(dtype, shape):
    B, H, Hkv, Lq, Lk, D, causal = shape
    q, k, v, ids, rot, _ = make_case(B, H, Hkv, Lq, Lk, D, 3, dtype, seed=D + Lq)
    check(q, k, v, ids, 3, rot, rotate_rows=Lq, causal=causal)


_SPLIT_CONFIGS = [(t, False) for t in attention_fwd.FWD_CONFIGS_BY_ARCH[90][("16bit", "split")]] + \
    [(t, True) for t in attention_fwd.FWD_CONFIGS_BY_ARCH[90][("16bit", "wide")]]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config, wide", _SPLIT_CONFIGS,
                         ids=lambda c: ("wide" if c is True else "plain" if c is False else "BM{}_BN{}_w{}_s{}".format(*c)))
def test_split_class_configs_cuda(dtype, config, wide, monkeypatch):
    """A parity test through the autotuner checks only the config it picks, so each config of the
    paper layer's class (plain and wide split) is forced on D 768, with padding. The shape is
    test_parity_cuda_large's, so bench/precompile.py has already built these kernels."""
    from rollingq.kernels.common import target_arch

    if target_arch() < 90:
        pytest.skip("the sm_90 split-class table: this card plans with the sm_80 one")
    kernel = attention_fwd._rollingq_fwd_kernel
    monkeypatch.setattr(kernel, "configs", [attention_fwd._config(config, wide)])
    monkeypatch.setattr(kernel, "cache", {})
    assert (2, 1, 1, 300, 300, 768, False) in CUDA_LARGE_SHAPES
    q, k, v, ids, rot, _ = make_case(2, 1, 1, 300, 300, 768, 3, dtype, seed=sum(config) + wide)
    check(q, k, v, ids, 3, rot, rotate_rows=300)


_FWD_TILES = sorted({(bm, bn): (bm, bn, w, s) for table in attention_fwd.FWD_CONFIGS_BY_ARCH.values()
                     for lst in table.values() for bm, bn, w, s in lst}.values())


@pytest.mark.parametrize("config", _FWD_TILES, ids=lambda c: "BM{}_BN{}_w{}_s{}".format(*c))
def test_every_table_tile(config, monkeypatch):
    """Each tile shape the autotune tables can pick, forced, on lengths no tile divides (causal,
    GQA, padding, some rows rotated): the block bounds and masks hold for every BLOCK_M x BLOCK_N."""
    bm, bn, w, s = config
    kernel = attention_fwd._rollingq_fwd_kernel
    monkeypatch.setattr(kernel, "configs", [attention_fwd._config(config)])
    monkeypatch.setattr(kernel, "cache", {})
    q, k, v, ids, rot, _ = make_case(1, 4, 2, 203, 203, 32, 3, torch.float16, seed=bm * 1000 + bn)
    check(q, k, v, ids, 3, rot, rotate_rows=77, causal=True)


def test_bf16_mass_branch(monkeypatch):
    """bf16 inputs sum the attention mass in an fp16 dot (its own branch of the kernel). The
    interpreter cannot run bf16 dots, so run that branch with fp16 inputs, causal, GQA, padding,
    rotated rows; its precision on bf16 is checked by the CUDA parity tests."""
    monkeypatch.setattr(attention_fwd, "FORCE_MASS_F16", True)
    q, k, v, ids, rot, _ = make_case(2, 4, 2, 150, 150, 32, 3, torch.float16, seed=77)
    check(q, k, v, ids, 3, rot, rotate_rows=40, causal=True)


def test_descriptor_eligibility():
    """Tensor descriptors need a unit innermost stride and 16-byte aligned base and strides; any
    other layout must take the pointer path (a descriptor over it would read wrong addresses)."""
    from rollingq.kernels.tma import tma_ready as ready

    k = torch.empty(2, 3, 40, 24, dtype=torch.float16)
    assert ready(k) and ready(k.transpose(1, 2).contiguous().transpose(1, 2))
    assert not ready(torch.empty(2, 3, 40, 20, dtype=torch.float16))  # rows of 40 bytes
    assert not ready(k[..., 1:])  # base off by 2 bytes
    assert not ready(torch.empty(2, 3, 24, 40, dtype=torch.float16).transpose(-1, -2))  # D not innermost
    assert not ready(torch.empty(2, 3, 1, 24, dtype=torch.float16).expand(2, 3, 40, 24))  # rows broadcast
    assert ready(torch.empty(1, 3, 40, 24, dtype=torch.float16).expand(2, 3, 40, 24))  # batch broadcast


def test_unaligned_head_dim_takes_pointers():
    """D 20 in fp16 (40-byte rows): the launcher falls back to pointer loads, with parity."""
    q, k, v, ids, rot, _ = make_case(2, 2, 1, 29, 29, 20, 3, torch.float16, seed=5)
    from rollingq.kernels.tma import tma_ready

    assert not tma_ready(k)
    check(q, k, v, ids, 3, rot, rotate_rows=7, causal=True)
