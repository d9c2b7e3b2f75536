"""Fused backward kernels (FlashAttention-2 style) through the query rotation.

The forward computed, per (batch b, head h), with q' the rotated queries it saved:
    s_ij = scale * q'_i . k_j   on live (ids >= 0) and visible (causal: j <= i) keys,
    p_ij = exp(s_ij - lse_i),   out_i = sum_j p_ij v_j,
and kept, in base 2, each row's max m_i and log2 of its sum l_i (common.lse_shape).
The backward never materialises p. Three launches:
  1. `_bwd_preprocess`: delta_i = sum_d do_id * out_id (fp32), the row term of the softmax gradient.
  2. `_bwd_dkdv`: one program per (b, kv head, key block, D chunk). It keeps its K/V tile and the
     dK/dV accumulators on chip, walks the query heads of its GQA group and the query blocks that can
     see the key block, recomputes p = 2^(min(s - m, 0) - log2 l) from q', k, m and l, and accumulates
         dv += p^T do,   dp = do v^T,   ds = p * (dp - delta),   dk += scale * ds^T q'.
     Summing the group inside the program needs no atomics, so results are deterministic.
  3. `_bwd_dq`: one program per (b, head, query block, D chunk); walks the key blocks and accumulates
     dq' += scale * ds k; the epilogue applies the chain rule of q' = q R^T on the rotated rows,
     dq = dq' R, once per Q tile.
With dropout the forward's output was sum_j z_ij p_ij v_j / (1 - p_drop), z the keep mask that
kernels/dropout.py redraws here: dv takes z * p / (1 - p_drop), and dp is replaced by
z * dp / (1 - p_drop) in ds = p * (dp - delta); delta = do . out needs no change.
A user attention mask (MASK, kernels/attn_mask.py) is reread per tile and enters p as in the forward.
A bias that requires grad (MASK_GRAD) gets d(bias) = ds, the gradient of the natural-log scores,
which the dQ kernel forms once per score tile. A contiguous bias shared over the batch and/or the
heads (a learned [1, H, L, L] or [L, L] bias) has its ds tiles added by atomics into a float32
buffer of its own shape, through its own (stride-0 broadcast) strides (MASK_GRAD 2); otherwise,
and under torch.use_deterministic_algorithms, dQ stores them into a dense [B, H, Lq, Lk] buffer
that the launcher sums over the broadcast dims, as SDPA's memory-efficient backward does
(MASK_GRAD 1; attn_mask.grad_plan).

Numerics: fp32 accumulators everywhere; fp32 inputs use IEEE dots (no tf32); fp16/bf16 inputs cast
p and ds to the input type before their dots, as FlashAttention does. bf16 differs from fp16 only
in the element type (`Q.dtype.element_ty`), so the interpreter's fp16 tests cover its code path.

Head dims: each kernel holds its resident tiles (K/V for dK/dV, Q/dO for dQ) across its loop while
D <= DKDV_MAX_RESIDENT_D / DQ_MAX_RESIDENT_D (256 for 16-bit inputs on Hopper, NARROW_MAX_RESIDENT_D
= 128 for fp32 and on the Ampere plan; D padded to a power of two under masks). Beyond that the kernel
takes the split path: the full-D reductions q'.k and do.v loop over SPLIT_D_CHUNK-wide chunks
reloaded every step, and each program owns a SPLIT_DKDV_CHUNK / SPLIT_DQ_CHUNK-wide slice of its
outputs (a grid dimension over D chunks). When one dq slice covers the whole head the rotation
epilogue stays in the kernel; otherwise (the paper's D = 768) no program holds a full dq' row, so
dq = dq' @ R[h] on the rotated rows runs afterwards (kernels/rotate.py): for a dense R a batched
matmul in q's dtype when every row is rotated, else a kernel over the blocks holding a rotated row;
in place by the low-rank kernel for a factored one.
The split path recomputes the full-D scores once per output slice: at D = 768 with 256-wide slices
dK/dV does (768/256) x (2 + 2/3) = 8 units of M*N*D work where a resident kernel would do 4, and dQ
(768/256) x (2 + 1/3) = 7 instead of 3. On Hopper (16-bit) dQ's autotuner also tries a wide split
(two programs, each with three 128-wide dq accumulators: 2 x (2 + 1/2) = 5 units at D = 768).
Thresholds, chunk widths and configs come from ptxas register/spill reports for sm_90a and sm_80
(bench/inspect_kernels.py); timing them on a GPU is open.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import common
from .attn_mask import grad_buffer as mask_grad_buffer
from .attn_mask import grad_plan as mask_grad_plan
from .attn_mask import mask_tile
from .attn_mask import launch_args as mask_launch_args
from .attn_mask import offset_slices as mask_slices
from .common import interpreting, next_pow2, target_arch
from .dropout import kept
from .dropout import launch_args as dropout_launch_args
from .grid import launch_grid, program_ids
from .offsets import int64_offsets, widen, widen2
from .rotate import dense_rotation, is_low_rank
from .rotate import rotate as rotate_rows
from .tiles import (WIDE_CHUNK, WIDE_MAX_D, chunked_products, load_chunk, store_chunk, wide_accumulators,
                    wide_plan)
from .tma import enabled_by_default, ensure_scratch_allocator, tma_ready

DKDV_MAX_RESIDENT_D = 256  # dK/dV: larger heads take the split path (tests lower it)
DQ_MAX_RESIDENT_D = 256  # dQ: larger heads take the split path (tests lower it)
NARROW_MAX_RESIDENT_D = 128  # both kernels, for fp32 inputs and the Ampere plan (common.target_arch)
SPLIT_D_CHUNK = 64  # D chunk of the full-D reductions (q'.k, do.v) on the split path
SPLIT_DKDV_CHUNK = 256  # dk/dv columns owned by one program on the split path
SPLIT_DKDV_CHUNK_NARROW = 128  # the same for fp32 inputs and the Ampere plan
SPLIT_DQ_CHUNK = 256  # dq columns owned by one program on the split path (fp16/bf16)
SPLIT_DQ_CHUNK_IEEE = 64  # the same for fp32 inputs (FMA dots: a 256-wide fp32 tile spills)
# dQ's wide split (Hopper, 16-bit, heads up to WIDE_MAX_D, a config choice): two programs share the
# dq columns as up to three WIDE_CHUNK-wide accumulators each, so the full-D scores and do.v^T
# are recomputed twice instead of three times at D 768 (2 x (768 + 768 + 384) units of M*N*D
# work instead of 3 x (768 + 768 + 256)). WIDE_CHUNK and WIDE_MAX_D come from kernels/tiles.py.
ROT_CHUNK = 32  # R columns per step of the in-kernel dq rotation epilogue (fp16/bf16)
ROT_CHUNK_IEEE = 16  # the same for fp32 inputs
PRE_BLOCK_M = 64  # rows per program of the delta pre-pass (memory bound: no tuning)
PRE_D_CHUNK = 64  # the pre-pass sums do * out over D in chunks of this width (bounds its registers)

USE_TMA = enabled_by_default()  # descriptor tiles where possible (kernels/tma.py); off: tests, ROLLINGQ_TMA=0
_LOG2E = 1.4426950408889634


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per GPU generation and D class. dK/dV: BLOCK_N keys
# owned, BLOCK_M queries per step; dQ: BLOCK_M queries owned, BLOCK_N keys per step. Every listed
# config compiles without register spills and within shared memory (ptxas -v, causal, rotation on,
# with the argument specialisation of a real launch; bench/inspect_kernels.py): sm_90 in
# fp16/bf16/fp32, sm_80 in bf16. "ieee-*" classes are fp32 inputs (FMA dots, no tensor cores).
# The autotuner sees the union; the pruner keeps the launch's class for the card it runs on.
_IEEE_DKDV = {
    "ieee-64": [(16, 32, 4, 2), (32, 32, 8, 2)],
    "ieee-128": [(16, 32, 8, 2), (16, 16, 4, 2)],
    "ieee-split": [(16, 32, 8, 2)],
    ("ieee-split", "dropout"): [(16, 16, 4, 2)],  # for dropout launches, whose draw spills the row above
    ("ieee-split", "mask"): [(16, 16, 8, 2)],  # for mask launches (sm_80: the dropout row spills with a mask)
    ("ieee-128", "bias+dropout"): [(16, 32, 4, 2), (16, 16, 8, 2)],  # sm_80: both rows above spill with them
}
_IEEE_DQ = {
    "ieee-64": [(16, 32, 8, 2), (32, 32, 8, 2)],
    "ieee-128": [(16, 32, 8, 2)],
    "ieee-split": [(16, 16, 8, 2)],  # (16, 16, 4, 2) spills 8 B on sm_90 with m held beside log2 l
    ("ieee-split", "mask+dropout"): [(16, 16, 8, 1)],
}
_DKDV_TABLE = {
    90: {
        64: [(32, 128, 8, 2), (64, 64, 8, 2), (64, 128, 8, 2)],
        128: [(32, 128, 8, 2), (32, 64, 8, 2)],
        256: [(16, 64, 8, 2), (32, 64, 8, 2)],
        "split": [(16, 64, 8, 2), (32, 64, 8, 2), (64, 64, 8, 1)],
        **_IEEE_DKDV,
    },
    80: {
        64: [(32, 64, 8, 2), (16, 64, 8, 2), (32, 64, 4, 1)],
        128: [(64, 64, 8, 2), (32, 64, 8, 2)],
        "split": [(16, 64, 8, 2), (16, 64, 8, 1)],
        **_IEEE_DKDV,
    },
}
_DQ_TABLE = {
    90: {
        64: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2)],
        128: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)],
        256: [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
        "split": [(64, 32, 8, 2), (64, 64, 8, 1), (128, 16, 8, 2)],
        **_IEEE_DQ,
    },
    80: {
        64: [(64, 32, 4, 3), (128, 32, 8, 2)],
        128: [(64, 32, 8, 2), (128, 32, 8, 2)],  # the first within 99 KB (sm_86/89) with a learned causal bias
        "split": [(64, 16, 8, 2)],
        ("split", "bias+dropout"): [(32, 16, 8, 2), (32, 16, 4, 2)],  # the row above spills with them (D 768)
        (64, "bias+dropout"): [(64, 32, 8, 2), (64, 16, 8, 2)],  # a learned bias with dropout spills both above
        **_IEEE_DQ,
    },
}
# Dropout launches (kernels/dropout.py) hold the Philox draw in the loop, mask launches
# (kernels/attn_mask.py) a mask tile, and dQ under a learned bias stores its gradient: the rows that
# spill with them are not offered to them (bench/inspect_kernels.py --only dropout / --only mask,
# fp16/bf16/fp32; common.launch_extras names the combinations). Their (class, extra) lists in the
# table are added for them (stand-ins, chosen where a class lost every row). "wide" keys dQ's wide rows.
_DKDV_DROPOUT_SPILLS = {90: {128: [(32, 128, 8, 2)], "split": [(64, 64, 8, 1)], "ieee-split": [(16, 32, 8, 2)]},
                        80: {64: [(32, 64, 8, 2)], "ieee-split": [(16, 32, 8, 2)]}}
_DQ_DROPOUT_SPILLS = {90: {128: [(128, 64, 8, 2)], 256: [(128, 32, 8, 2)]}}
_DKDV_SPILLS = {"dropout": _DKDV_DROPOUT_SPILLS,
                "mask": {90: {"split": [(64, 64, 8, 1)]},
                         80: {64: [(32, 64, 8, 2)], 128: [(64, 64, 8, 2)], "ieee-split": [(16, 32, 8, 2)]}},
                # dropout's fp32 stand-in spills with a mask (sm_80: 24-36 B; left out on sm_90 too,
                # where it was not built with both); the mask's stand-in serves mask + dropout
                "mask+dropout": {90: {64: [(64, 128, 8, 2)], 256: [(32, 64, 8, 2)], "ieee-64": [(32, 32, 8, 2)],
                                      "ieee-128": [(16, 16, 4, 2)], "ieee-split": [(16, 16, 4, 2)]},
                                 80: {"ieee-split": [(16, 16, 4, 2)]}},
                "bias+dropout": {90: {64: [(64, 64, 8, 2)], "split": [(32, 64, 8, 2)]},
                                 80: {"ieee-128": [(16, 32, 8, 2), (16, 16, 4, 2)]}}}
_DQ_SPILLS = {"dropout": _DQ_DROPOUT_SPILLS,
              "mask": {90: {256: [(128, 32, 8, 2), (64, 64, 8, 2)]}},
              "mask+dropout": {90: {128: [(128, 64, 8, 2)], "split": [(128, 16, 8, 2)], "wide": [(64, 64, 8, 2)]}},
              # (built with a learned bias, the rows also leave float masks without a gradient: their
              # dQ with dropout was not built on its own)
              "bias+dropout": {90: {64: [(64, 64, 4, 2)], "wide": [(64, 64, 8, 2)]},
                               80: {64: [(128, 32, 8, 2), (64, 32, 4, 3)], 128: [(128, 32, 8, 2)],
                                    "split": [(64, 16, 8, 2)]}},
              # writing ds, a learned bias's gradient (sm_90 16-bit: 8-136 B, the atomics' [BM, BN]
              # pointer tile the most; fp32: 8 B)
              "mask_grad": {90: {64: [(128, 64, 8, 2), (64, 64, 4, 2)], 128: [(128, 64, 8, 2)],
                                 "split": [(128, 16, 8, 2), (64, 64, 8, 1)], "wide": [(64, 64, 8, 2)],
                                 "ieee-64": [(16, 32, 8, 2)]}}}
# dQ's wide-split rows (WIDE_CHUNK accumulators), offered beside the "split" class where it applies.
_DQ_WIDE = {90: [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 3)]}
# Under the interpreter one small config whose BLOCK_M != BLOCK_N, so the causal block bounds are
# exercised with unaligned tiles.
_INTERPRET_DKDV = (16, 32, 4, 1)
_INTERPRET_DQ = (32, 16, 4, 1)


def _d_class(split: bool, width: int, ieee: bool):
    cls = "split" if split else (64 if width <= 64 else 128 if width <= 128 else 256)
    return f"ieee-{cls}" if ieee else cls


def _union(table) -> list:
    rows = []
    for by_class in table.values():
        for lst in by_class.values():
            rows += [r for r in lst if r not in rows]
    return rows


def _to_configs(rows, **extra) -> List[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **extra}, num_warps=w, num_stages=s)
            for bm, bn, w, s in rows]


def _row(c: triton.Config) -> tuple:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _pruner(table, wide_table=None, spills=None):
    """Keep the launch's class list for the card (less the rows `spills` names for the launch's
    dropout and mask, plus their stand-in rows); with `wide_table`, also its wide-split rows where
    that split applies (16-bit split heads up to WIDE_MAX_D, no in-kernel rotation epilogue)."""
    def prune(configs, named_args, **kwargs):
        if len(configs) == 1:
            return configs
        width = max(kwargs["BLOCK_D"], kwargs["BLOCK_DV"])
        cls = _d_class(kwargs["SPLIT"], width, kwargs["IEEE"])
        keep = table[target_arch()][cls]
        extras = common.launch_extras(kwargs)
        if extras and spills:
            spilling = common.spill_rows(spills, extras, target_arch()).get(cls, [])
            stand_ins = [r for extra in extras for r in table[target_arch()].get((cls, extra), [])]
            keep = [r for r in keep + stand_ins if r not in spilling]
        chosen = [c for c in configs if not c.kwargs.get("WIDE") and _row(c) in keep]
        if dict(named_args, **kwargs).get("DETERMINISTIC"):  # one fixed config (common.deterministic)
            return [c for c in chosen if _row(c) == keep[0]] or configs[-1:]
        if (wide_table and kwargs["SPLIT"] and not kwargs["IEEE"] and not kwargs.get("ROTATE")
                and kwargs["HEAD_D"] <= WIDE_MAX_D):
            wide_spills = common.spill_rows(spills, extras, target_arch()).get("wide", []) if spills else []
            wide = [r for r in wide_table.get(target_arch(), []) if r not in wide_spills]
            chosen += [c for c in configs if c.kwargs.get("WIDE") and _row(c) in wide]
        return chosen or configs[-1:]
    return prune


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA,
    s_ob, s_oh, s_om, s_od,
    s_db, s_dh, s_dm, s_dd,
    H, Lq,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, NUM_DC: tl.constexpr, BLOCK_M: tl.constexpr,
    OFFS64: tl.constexpr = False,  # a slice spans 2^31 elements: 64-bit strides (offsets.py)
):
    if OFFS64:
        s_om, s_od, s_dm, s_dd = widen(s_om, s_od, s_dm, s_dd)
    pid_m, _, h, b = program_ids(1)
    h = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    o_base = O + b * s_ob + h * s_oh
    do_base = DO + b * s_db + h * s_dh
    delta = tl.zeros([BLOCK_M], tl.float32)
    for c in tl.static_range(NUM_DC):
        offs_d = c * BLOCK_D + tl.arange(0, BLOCK_D)
        msk = m_ok[:, None] & (offs_d[None, :] < HEAD_D)
        o = tl.load(o_base + offs_m[:, None] * s_om + offs_d[None, :] * s_od, mask=msk, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd, mask=msk, other=0.0)
        delta += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * H + h) * Lq + offs_m, delta, mask=m_ok)


@triton.jit
def _below_max(s, row_max):
    """s - m, at most 0: s recomputed here (another tile shape, another dot order) can round a few
    ulps above the forward's m, which is 2^1024 in exp2 once |s| nears 1e10. NaN passes through."""
    return tl.minimum(s - row_max, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit(do_not_specialize=["TUNE_DEV", "DETERMINISTIC", "drop_thresh"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, IDS, DK, DV, SEED,
    AMASK,  # MASK: the user's attention mask, [B, H, Lq, Lk] (stride 0 on broadcast dims; attn_mask.py)
    ROWMAX,  # each row's max m (base 2); LSE holds log2(l) (common.lse_shape)
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dm, s_dd,
    s_dkb, s_dkh, s_dkn, s_dkd,
    s_dvb, s_dvh, s_dvn, s_dvd,
    s_ib, s_in,
    s_ab, s_ah, s_am, s_an,
    H, Lq, Lk, GROUP,
    sm_scale,  # softmax scale
    qk_scale,  # softmax scale * log2(e): p is recomputed with exp2
    drop_thresh, drop_scale,  # dropout (kernels/dropout.py): keep threshold, 1 / (1 - p)
    TUNE_LQ, TUNE_LK,  # the lengths' autotuning buckets (kernels/common.tune_length); not read
    TUNE_DEV,  # the kind of card (common.tune_device): keyed on; not read
    DETERMINISTIC,  # common.deterministic(): keyed and pruned on; not read
    HEAD_D: tl.constexpr,  # true head dim
    BLOCK_D: tl.constexpr,  # power of two >= HEAD_D (single path) / reduction chunk (split path)
    BLOCK_DV: tl.constexpr,  # dk/dv columns per program
    NUM_DC: tl.constexpr,  # reduction chunks per score (1 on the single path)
    CAUSAL: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
    TMA: tl.constexpr,  # Q/dO tiles through tensor descriptors (single path only; kernels/tma.py)
    DROPOUT: tl.constexpr,
    MASK: tl.constexpr,  # attention mask: 0 none, 1 bool (True = attend), 2 additive bias (attn_mask.py)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    OFFS64: tl.constexpr = False,  # a slice spans 2^31 elements: 64-bit strides (offsets.py)
):
    if OFFS64:
        s_qm, s_qd, s_kn, s_kd = widen(s_qm, s_qd, s_kn, s_kd)
        s_vn, s_vd, s_dm, s_dd = widen(s_vn, s_vd, s_dm, s_dd)
        s_dkn, s_dkd, s_dvn, s_dvd = widen(s_dkn, s_dkd, s_dvn, s_dvd)
        s_am, s_an = widen2(s_am, s_an)
    pid_n, pid_d, hkv, b = program_ids((HEAD_D + BLOCK_DV - 1) // BLOCK_DV)
    hkv = hkv.to(tl.int64)
    prec: tl.constexpr = "ieee" if IEEE else "tf32"
    dt = Q.dtype.element_ty

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Lk
    dv_ok = offs_dv < HEAD_D
    ids = tl.load(IDS + b * s_ib + offs_n * s_in, mask=n_ok, other=-1)
    key_ok = ids >= 0  # false on padding and past Lk
    k_base = K + b * s_kb + hkv * s_kh
    v_base = V + b * s_vb + hkv * s_vh

    if not SPLIT:
        d_ok = offs_d < HEAD_D
        kv_msk = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_msk, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_msk, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo = 0
    if CAUSAL:
        # The first query row that can see key pid_n * BLOCK_N lives in this query block.
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    # A key block that is all padding gets zero gradients without walking the queries.
    hi = tl.where(tl.max(key_ok.to(tl.int32), 0) > 0, Lq, lo)
    if DROPOUT:
        seed = tl.load(SEED)

    for g in range(GROUP):
        h = hkv * GROUP + g
        q_base = Q + b * s_qb + h * s_qh
        do_base = DO + b * s_db + h * s_dh
        row_base = (b * H + h) * Lq
        amask_base = AMASK + b * s_ab + h * s_ah
        if TMA:
            q_desc = tl.make_tensor_descriptor(q_base, shape=[Lq, HEAD_D], strides=[s_qm, 1],
                                               block_shape=[BLOCK_M, BLOCK_D])
            do_desc = tl.make_tensor_descriptor(do_base, shape=[Lq, HEAD_D], strides=[s_dm, 1],
                                                block_shape=[BLOCK_M, BLOCK_D])
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            m_ok = offs_m < Lq
            if SPLIT:
                # Full-D scores and do.v^T, chunk by chunk; only this program's D slice is kept.
                st, dpt = chunked_products(k_base, s_kn, s_kd, q_base, s_qm, s_qd, v_base, s_vn, s_vd,
                                           do_base, s_dm, s_dd, offs_n, n_ok, offs_m, m_ok, offs_d, HEAD_D,
                                           NUM_DC, BLOCK_D, prec)
                o_msk = m_ok[:, None] & dv_ok[None, :]
                q_o = tl.load(q_base + offs_m[:, None] * s_qm + offs_dv[None, :] * s_qd, mask=o_msk, other=0.0)
                do_o = tl.load(do_base + offs_m[:, None] * s_dm + offs_dv[None, :] * s_dd, mask=o_msk, other=0.0)
            else:
                if TMA:
                    q_o = q_desc.load([start_m, 0])
                    do_o = do_desc.load([start_m, 0])
                else:
                    msk = m_ok[:, None] & d_ok[None, :]
                    q_o = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=msk, other=0.0)
                    do_o = tl.load(do_base + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd, mask=msk, other=0.0)
                st = tl.dot(k, tl.trans(q_o), input_precision=prec)
                dpt = tl.dot(v, tl.trans(do_o), input_precision=prec)
            # log2 l = +inf on rows with no live key (and past Lq): p = exp2(-inf) = 0 there.
            log2_l = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
            row_max = tl.load(ROWMAX + row_base + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
            vis = key_ok[:, None] & m_ok[None, :]
            if CAUSAL:
                vis = vis & (offs_m[None, :] >= offs_n[:, None])
            st = st * qk_scale
            if MASK == 1:
                vis = vis & mask_tile(amask_base, offs_n, offs_m, n_ok, m_ok, s_an, s_am, MASK)
            if MASK == 2:
                st = st + mask_tile(amask_base, offs_n, offs_m, n_ok, m_ok, s_an, s_am, MASK)
            pt = tl.where(vis, tl.exp2(_below_max(st, row_max[None, :]) - log2_l[None, :]), 0.0)
            if DROPOUT:
                # out used z * p / (1 - p_drop), z the keep mask: dv takes the kept p (rescaled at
                # the end) and ds = p * (z * dp / (1 - p_drop) - delta); delta = do . out is unchanged.
                keep = tl.trans(kept(seed, (b * H + h).to(tl.uint32), offs_m[:, None], pid_n * BLOCK_N, drop_thresh,
                                     BLOCK_M, BLOCK_N))
                dv = tl.dot(tl.where(keep, pt, 0.0).to(dt), do_o, dv, input_precision=prec)
                dst = pt * (tl.where(keep, dpt * drop_scale, 0.0) - delta[None, :])
            else:
                dv = tl.dot(pt.to(dt), do_o, dv, input_precision=prec)
                dst = pt * (dpt - delta[None, :])
            dk = tl.dot(dst.to(dt), q_o, dk, input_precision=prec)

    dk = dk * sm_scale
    if DROPOUT:
        dv = dv * drop_scale
    o_msk = n_ok[:, None] & dv_ok[None, :]
    tl.store(DK + b * s_dkb + hkv * s_dkh + offs_n[:, None] * s_dkn + offs_dv[None, :] * s_dkd,
             dk.to(DK.dtype.element_ty), mask=o_msk)
    tl.store(DV + b * s_dvb + hkv * s_dvh + offs_n[:, None] * s_dvn + offs_dv[None, :] * s_dvd,
             dv.to(DV.dtype.element_ty), mask=o_msk)


@triton.jit
def _dq_rotated_chunk(dq, r_base, offs_dv, dv_ok, c0, dq_ptr, s_dqd, rot_rows, HEAD_D: tl.constexpr,
                      ROT_CHUNK: tl.constexpr, prec: tl.constexpr):
    """Columns c0 .. c0 + ROT_CHUNK of dq' @ R, stored on the rotated rows."""
    offs_e = c0 + tl.arange(0, ROT_CHUNK)
    e_ok = offs_e < HEAD_D
    r = tl.load(r_base + offs_dv[:, None] * HEAD_D + offs_e[None, :], mask=dv_ok[:, None] & e_ok[None, :],
                other=0.0).to(dq.dtype)
    dq_rot = tl.dot(dq, r, input_precision=prec)
    tl.store(dq_ptr + offs_e[None, :] * s_dqd, dq_rot.to(dq_ptr.dtype.element_ty),
             mask=rot_rows[:, None] & e_ok[None, :])


@triton.jit(do_not_specialize=["TUNE_DEV", "DETERMINISTIC", "drop_thresh"])
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, IDS, ROT, ROWMASK, DQ, SEED,
    KV_END,  # TRIM: int32 [B], one past each batch row's last live key (common.live_key_ends)
    AMASK,  # MASK: the user's attention mask, [B, H, Lq, Lk] (stride 0 on broadcast dims; attn_mask.py)
    ROWMAX,  # each row's max m (base 2); LSE holds log2(l) (common.lse_shape)
    DMASK,  # MASK_GRAD: the bias gradient (1: a contiguous [B, H, Lq, Lk] buffer; 2: float32, AMASK's strides)
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dm, s_dd,
    s_dqb, s_dqh, s_dqm, s_dqd,
    s_ib, s_in,
    s_rmb, s_rmm,
    s_ab, s_ah, s_am, s_an,
    H, Lq, Lk, GROUP,
    sm_scale, qk_scale,
    drop_thresh, drop_scale,  # dropout (kernels/dropout.py): keep threshold, 1 / (1 - p)
    TUNE_LQ, TUNE_LK,  # the lengths' autotuning buckets (kernels/common.tune_length); not read
    TUNE_DEV,  # the kind of card (common.tune_device): keyed on; not read
    DETERMINISTIC,  # common.deterministic(): keyed and pruned on; not read
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_DC: tl.constexpr,
    CAUSAL: tl.constexpr, ROTATE: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
    ROT_CHUNK: tl.constexpr,  # R columns per step of the rotation epilogue
    EVERY_ROW: tl.constexpr,  # ROTATE applies to every row: no row mask, no unrotated store
    TMA: tl.constexpr,  # K/V tiles through tensor descriptors (single path only; kernels/tma.py)
    WC: tl.constexpr,  # chunk width of the wide split (WIDE_CHUNK)
    DROPOUT: tl.constexpr,
    TRIM: tl.constexpr,  # per-batch ids: stop each row's key loop at its last live key (KV_END)
    MASK: tl.constexpr,  # attention mask: 0 none, 1 bool (True = attend), 2 additive bias (attn_mask.py)
    MASK_GRAD: tl.constexpr,  # MASK == 2 and the bias requires grad: 1 store ds into DMASK, 2 add it (atomics)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr,
    OFFS64: tl.constexpr = False,  # a slice spans 2^31 elements: 64-bit strides (offsets.py)
):
    if OFFS64:
        s_qm, s_qd, s_kn, s_kd = widen(s_qm, s_qd, s_kn, s_kd)
        s_vn, s_vd, s_dm, s_dd = widen(s_vn, s_vd, s_dm, s_dd)
        s_dqm, s_dqd, s_am, s_an = widen(s_dqm, s_dqd, s_am, s_an)
    # The wide split (a config choice on the split path): NACC accumulators of WC dq columns
    # (dq, dq1, dq2) per program, two programs per query block.
    WIDE_ON: tl.constexpr = WIDE != 0 and SPLIT
    NQC: tl.constexpr = (HEAD_D + WC - 1) // WC
    NACC: tl.constexpr = (NQC + 1) // 2
    if WIDE_ON:
        tl.static_assert(NQC <= 6 and not ROTATE, "the wide split: at most 6 chunks, rotation afterwards")
        pid_m, pid_d, h, b = program_ids((NQC + NACC - 1) // NACC)
    else:
        pid_m, pid_d, h, b = program_ids((HEAD_D + BLOCK_DV - 1) // BLOCK_DV)
    h = h.to(tl.int64)
    hkv = h // GROUP
    prec: tl.constexpr = "ieee" if IEEE else "tf32"
    dt = Q.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Lq
    dv_ok = offs_dv < HEAD_D
    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_db + h * s_dh
    k_base = K + b * s_kb + hkv * s_kh
    v_base = V + b * s_vb + hkv * s_vh
    ids_base = IDS + b * s_ib
    amask_base = AMASK + b * s_ab + h * s_ah
    row_base = (b * H + h) * Lq
    if MASK_GRAD:
        # The D-split programs of one query block compute the same ds: the first one writes it.
        g_rows = m_ok & (pid_d == 0)
    if MASK_GRAD == 2:  # the mask's own strides: a shared bias's broadcast dims sum in place
        dmask_base = DMASK + b * s_ab + h * s_ah
    if MASK_GRAD == 1:
        dmask_base = DMASK + row_base * Lk  # strides from the shape: no arguments (registers, ptxas)
    # p = exp2(min(s - m, 0) - log2 l); log2 l = +inf (m = 0) where the row is empty
    row_max = tl.load(ROWMAX + row_base + offs_m, mask=m_ok, other=0.0)
    log2_l = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    if DROPOUT:
        seed = tl.load(SEED)
        bh = (b * H + h).to(tl.uint32)

    if not SPLIT:
        d_ok = offs_d < HEAD_D
        msk = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=msk, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd, mask=msk, other=0.0)

    if TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[Lk, HEAD_D], strides=[s_kn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[Lk, HEAD_D], strides=[s_vn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
    offs_w = tl.arange(0, WC)
    a_col = pid_d * NACC * WC  # first dq column of a wide-split program
    if WIDE_ON:
        dq, dq1, dq2 = wide_accumulators(BLOCK_M, WC)
    else:
        dq = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    hi = Lk
    if TRIM:
        hi = tl.load(KV_END + b)  # key blocks past the last live key hold only padding: skipped
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < Lk
        ids = tl.load(ids_base + offs_n * s_in, mask=n_ok, other=-1)
        if SPLIT:
            s, dp = chunked_products(q_base, s_qm, s_qd, k_base, s_kn, s_kd, do_base, s_dm, s_dd,
                                     v_base, s_vn, s_vd, offs_m, m_ok, offs_n, n_ok, offs_d, HEAD_D,
                                     NUM_DC, BLOCK_D, prec)
            if not WIDE_ON:
                k_o = tl.load(k_base + offs_n[:, None] * s_kn + offs_dv[None, :] * s_kd,
                              mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        else:
            if TMA:
                k_o = k_desc.load([start_n, 0])
                v = v_desc.load([start_n, 0])
            else:
                kv_msk = n_ok[:, None] & d_ok[None, :]
                k_o = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_msk, other=0.0)
                v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_msk, other=0.0)
            s = tl.dot(q, tl.trans(k_o), input_precision=prec)
            dp = tl.dot(do, tl.trans(v), input_precision=prec)
        vis = m_ok[:, None] & (ids[None, :] >= 0)
        if CAUSAL:
            vis = vis & (offs_m[:, None] >= offs_n[None, :])
        s = s * qk_scale
        if MASK == 1:
            vis = vis & mask_tile(amask_base, offs_m, offs_n, m_ok, n_ok, s_am, s_an, MASK)
        if MASK == 2:
            s = s + mask_tile(amask_base, offs_m, offs_n, m_ok, n_ok, s_am, s_an, MASK)
        p = tl.where(vis, tl.exp2(_below_max(s, row_max[:, None]) - log2_l[:, None]), 0.0)
        if DROPOUT:
            keep = kept(seed, bh, offs_m[:, None], start_n, drop_thresh, BLOCK_M, BLOCK_N)
            ds = p * (tl.where(keep, dp * drop_scale, 0.0) - delta[:, None])
        else:
            ds = p * (dp - delta[:, None])
        # s = scale * q.k + bias, so d(bias) = ds (0 wherever p is)
        if MASK_GRAD == 1:
            tl.store(dmask_base + offs_m[:, None] * Lk + offs_n[None, :], ds.to(DMASK.dtype.element_ty),
                     mask=g_rows[:, None] & n_ok[None, :])
        if MASK_GRAD == 2:  # no atomic for padding, causal or out-of-range elements (a -inf bias adds 0)
            tl.atomic_add(dmask_base + offs_m[:, None] * s_am + offs_n[None, :] * s_an, ds,
                          mask=g_rows[:, None] & vis, sem="relaxed")
        if WIDE_ON:
            ds_dt = ds.to(dt)
            dq = tl.dot(ds_dt, load_chunk(k_base, offs_n, n_ok, s_kn, s_kd, a_col, offs_w, HEAD_D), dq,
                        input_precision=prec)
            if NACC > 1:
                dq1 = tl.dot(ds_dt, load_chunk(k_base, offs_n, n_ok, s_kn, s_kd, a_col + WC, offs_w, HEAD_D), dq1,
                             input_precision=prec)
            if NACC > 2:
                dq2 = tl.dot(ds_dt, load_chunk(k_base, offs_n, n_ok, s_kn, s_kd, a_col + 2 * WC, offs_w, HEAD_D),
                             dq2, input_precision=prec)
        else:
            dq = tl.dot(ds.to(dt), k_o, dq, input_precision=prec)
    if MASK_GRAD == 1:  # the key blocks the loop skips (causal, trailing padding) have zero gradient
        for start_n in range(tl.cdiv(hi, BLOCK_N) * BLOCK_N, Lk, BLOCK_N):
            offs_n = start_n + offs_n0
            tl.store(dmask_base + offs_m[:, None] * Lk + offs_n[None, :], tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                     .to(DMASK.dtype.element_ty), mask=g_rows[:, None] & (offs_n < Lk)[None, :])

    dq = dq * sm_scale
    dq_ptr = DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqm
    if WIDE_ON:
        dq_base = DQ + b * s_dqb + h * s_dqh
        store_chunk(dq_base, offs_m, m_ok, s_dqm, s_dqd, a_col, offs_w, HEAD_D, dq)  # scaled above
        if NACC > 1:
            store_chunk(dq_base, offs_m, m_ok, s_dqm, s_dqd, a_col + WC, offs_w, HEAD_D, dq1 * sm_scale)
        if NACC > 2:
            store_chunk(dq_base, offs_m, m_ok, s_dqm, s_dqd, a_col + 2 * WC, offs_w, HEAD_D, dq2 * sm_scale)
    elif ROTATE:
        # Chain rule of q' = q R^T: dq = dq' R on the rotated rows (the launcher sets ROTATE only
        # when this program holds whole dq' rows: one D chunk, BLOCK_DV >= HEAD_D). Unrotated rows
        # are stored as they are; rotated rows column chunk by column chunk, so only a
        # [BLOCK_DV, ROT_CHUNK] slice of R is on chip at once (a whole fp32 256x256 R is 256 KB of
        # shared memory). dq' and R go into the dot in q's dtype (fp32 accumulation): the
        # arithmetic autograd does for q @ R^T in that dtype, and an fp32 dq' operand spilled
        # registers at D = 256 (ptxas, sm_90a).
        dq = dq.to(DQ.dtype.element_ty)
        if EVERY_ROW:
            rot_rows = m_ok
        else:
            sel = tl.load(ROWMASK + b * s_rmb + offs_m * s_rmm, mask=m_ok, other=0) != 0
            tl.store(dq_ptr + offs_dv[None, :] * s_dqd, dq, mask=(m_ok & ~sel)[:, None] & dv_ok[None, :])
            rot_rows = m_ok & sel
        r_base = ROT + h * HEAD_D * HEAD_D
        if EVERY_ROW:
            for c in tl.static_range(BLOCK_DV // ROT_CHUNK):
                _dq_rotated_chunk(dq, r_base, offs_dv, dv_ok, c * ROT_CHUNK, dq_ptr, s_dqd, rot_rows, HEAD_D,
                                  ROT_CHUNK, prec)
        else:
            # A tile without a rotated row (all but the first with rotate_rows = a few fusion
            # tokens) skips the epilogue's dots: its chunk loop runs no step.
            rot_d = tl.where(tl.max(rot_rows.to(tl.int32), 0) > 0, BLOCK_DV, 0)
            for c0 in range(0, rot_d, ROT_CHUNK):
                _dq_rotated_chunk(dq, r_base, offs_dv, dv_ok, c0, dq_ptr, s_dqd, rot_rows, HEAD_D, ROT_CHUNK, prec)
    else:
        tl.store(dq_ptr + offs_dv[None, :] * s_dqd, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])


def table_configs(table, wide_table=None) -> List[triton.Config]:
    """The union of the tables' rows as configs; a kernel with a wide split gets WIDE in every
    config (0 for the table rows, 1 for the wide rows)."""
    if wide_table is None:
        return _to_configs(_union(table))
    return _to_configs(_union(table), WIDE=0) + _to_configs(sorted({r for rows in wide_table.values() for r in rows}),
                                                            WIDE=1)


def _zero_shared_mask_grad(nargs, reset_only=False):
    """The autotuner's pre-hook: before each timed launch, and before the real launch after timing,
    zero the buffer that a shared bias's gradient is added into (MASK_GRAD 2, atomics), so that
    timing runs leave nothing in it. Every other output of the backward is overwritten, not added to."""
    if nargs.get("MASK_GRAD") == 2:
        nargs["DMASK"].zero_()


def _autotuned(kernel, table, interp_row, key, wide_table=None, spills=None, pre_hook=None):
    """Autotune over `table_configs` (the interpreter: its one row)."""
    if interpreting():
        configs = _to_configs([interp_row], **({} if wide_table is None else {"WIDE": 0}))
    else:
        configs = table_configs(table, wide_table)
    return triton.autotune(
        configs=configs,
        key=key,
        prune_configs_by={"early_config_prune": _pruner(table, wide_table, spills)},
        pre_hook=pre_hook,
    )(kernel)


# TMA in the keys: a tile timed on the descriptor path is not reused on the pointer path (a view
# that tma_ready refuses), whose loads and best tile differ. TUNE_DEV: nor on another kind of card.
_bwd_dkdv = _autotuned(_bwd_dkdv_kernel, _DKDV_TABLE, _INTERPRET_DKDV,
                       ["TUNE_LQ", "TUNE_LK", "TUNE_DEV", "GROUP", "HEAD_D", "BLOCK_D", "BLOCK_DV", "CAUSAL", "SPLIT",
                        "IEEE", "TMA", "DETERMINISTIC", "DROPOUT", "MASK"], spills=_DKDV_SPILLS)
_bwd_dq = _autotuned(_bwd_dq_kernel, _DQ_TABLE, _INTERPRET_DQ,
                     ["TUNE_LQ", "TUNE_LK", "TUNE_DEV", "HEAD_D", "BLOCK_D", "BLOCK_DV", "CAUSAL", "ROTATE", "SPLIT",
                      "IEEE", "TMA", "DETERMINISTIC", "DROPOUT", "TRIM", "MASK", "MASK_GRAD"],
                     _DQ_WIDE, _DQ_SPILLS, pre_hook=_zero_shared_mask_grad)


def _plan(d: int, max_resident: int, split_chunk: int) -> Tuple[bool, int, int, int]:
    """Head dim -> (split, BLOCK_D, BLOCK_DV, NUM_DC) for one kernel, under the module constants."""
    if d <= max_resident:
        block = max(16, next_pow2(d))
        return False, block, block, 1
    return True, SPLIT_D_CHUNK, min(split_chunk, max(16, next_pow2(d))), triton.cdiv(d, SPLIT_D_CHUNK)


def _narrow(ieee: bool) -> bool:
    """fp32 inputs (FMA dots) and the Ampere plan's cards have less room for resident tiles."""
    return ieee or target_arch() < 90


def _dkdv_plan(d: int, ieee: bool = False) -> Tuple[bool, int, int, int]:
    if _narrow(ieee):
        return _plan(d, min(DKDV_MAX_RESIDENT_D, NARROW_MAX_RESIDENT_D), min(SPLIT_DKDV_CHUNK, SPLIT_DKDV_CHUNK_NARROW))
    return _plan(d, DKDV_MAX_RESIDENT_D, SPLIT_DKDV_CHUNK)


def _dq_plan(d: int, ieee: bool = False) -> Tuple[bool, int, int, int]:
    max_resident = min(DQ_MAX_RESIDENT_D, NARROW_MAX_RESIDENT_D) if _narrow(ieee) else DQ_MAX_RESIDENT_D
    return _plan(d, max_resident, SPLIT_DQ_CHUNK_IEEE if ieee else SPLIT_DQ_CHUNK)


def _rot_chunk(block_dv: int, ieee: bool) -> int:
    return min(block_dv, ROT_CHUNK_IEEE if ieee else ROT_CHUNK)


def _pre_blocks(d: int) -> Tuple[int, int]:
    block = max(16, next_pow2(min(d, PRE_D_CHUNK)))
    return block, triton.cdiv(d, block)


def _check(do, q_rot, k, v, out, lse, ids, causal, rotation, rot_mask) -> None:
    for name, t in (("do", do), ("q_rot", q_rot), ("k", k), ("v", v), ("out", out)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t))}")
    B, H, Lq, D = q_rot.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B or Dk != D or v.shape != k.shape:
        raise ValueError(f"k and v must be [B, Hkv, Lk, D] = [{B}, *, *, {D}] alike, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of k/v heads ({Hkv})")
    if out.shape != q_rot.shape or do.shape != q_rot.shape:
        raise ValueError(f"out and do must have q_rot's shape {tuple(q_rot.shape)}, got out {tuple(out.shape)}, "
                         f"do {tuple(do.shape)}")
    if k.dtype != q_rot.dtype or v.dtype != q_rot.dtype:
        raise TypeError(f"q_rot, k, v must share one dtype, got {q_rot.dtype}, {k.dtype}, {v.dtype}")
    if q_rot.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q_rot must be float16, bfloat16 or float32, got {q_rot.dtype}")
    want = common.lse_shape(B, H, Lq)
    if tuple(lse.shape) != want or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous float32 {list(want)} tensor (the forward's (log2 l, m) planes), "
                         f"got {lse.dtype} {tuple(lse.shape)} strides {lse.stride()}")
    if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 2 or tuple(ids.shape) != (B, Lk):
        raise ValueError(f"ids must be an int32/int64 [B, Lk] = [{B}, {Lk}] tensor, got {ids.dtype} "
                         f"{tuple(ids.shape)}")
    if causal and Lq != Lk:
        raise ValueError(f"causal=True requires Lq == Lk, got Lq {Lq}, Lk {Lk}")
    if rotation is not None and not (tuple(rotation.shape) == (H, D, D) or (
            rotation.dim() == 4 and tuple(rotation.shape[:3]) == (H, 2, D) and 1 <= rotation.shape[3] <= D)):
        raise ValueError(f"rotation must be [H, D, D] = [{H}, {D}, {D}] or packed [H, 2, D, r] = [{H}, 2, {D}, r], "
                         f"got {tuple(rotation.shape)}")
    if rot_mask is not None and (rot_mask.dim() != 2 or tuple(rot_mask.shape) != (B, Lq)
                                 or rot_mask.dtype not in (torch.bool, torch.uint8)):
        raise ValueError(f"rot_mask must be a bool/uint8 [B, Lq] = [{B}, {Lq}] tensor, got "
                         f"{rot_mask.dtype} {tuple(rot_mask.shape)}")


def attention_bwd(
    do: torch.Tensor,
    q_rot: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    ids: torch.Tensor,
    causal: bool,
    scale: float,
    rotation: Optional[torch.Tensor],
    rot_mask: Optional[torch.Tensor],
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    mask_grad: bool = False,
    need_dq: bool = True,
    need_dkdv: bool = True,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of the fused forward in q, k, v (and a float attn_mask when `mask_grad`).

    Args:
        do: [B, H, Lq, D] gradient of `out` (any strides).
        q_rot: [B, H, Lq, D] the rotated queries the forward used (q's dtype, any strides).
        k, v: [B, Hkv, Lk, D] (any strides); query head h reads kv head h // (H // Hkv).
        out: [B, H, Lq, D] the forward output.
        lse: [2, B, H, Lq] float32 contiguous, the forward's row statistics in base 2: log2 of each
            row's sum l and its max m (common.lse_shape); log2 l = +inf and m = 0 on rows with no
            live visible key (they get zero gradient).
        ids: int [B, Lk] modality ids, -1 = padding (stride(0) == 0 allowed; a 1-D [Lk] is expanded).
        causal: query i sees keys 0..i (Lq == Lk).
        scale: the softmax scale the forward used.
        rotation: float [H, D, D], packed [H, 2, D, r] (I + left @ right^T, see rotate.py) or
            None; rot_mask: bool/uint8 [B, Lq] (stride(0) == 0 allowed)
            selects the rotated rows, None: every row (when a rotation is given).
        dropout_p, seed: the forward's dropout probability in [0, 1) and its int64 [1] seed on the
            tensors' device (kernels/dropout.py); the masks are redrawn from it.
        attn_mask: the forward's attention mask (bool: True = attend; float: added to the scaled
            scores), broadcastable to [B, H, Lq, Lk], or None.
        mask_grad: also return the gradient of a float attn_mask, summed over its broadcast dims:
            added up by float32 atomics in the mask's own shape for a contiguous mask shared by
            batch and/or heads, else (and in deterministic mode) formed in a dense [B, H, Lq, Lk]
            buffer and summed afterwards, where Lq * Lk must stay below 2^31 (attn_mask.grad_plan).
        need_dq, need_dkdv: False skips the dQ kernel (unless `mask_grad`: it forms that gradient)
            or the dK/dV kernel, for inputs that do not require grad (frozen keys and values, say).

    Returns:
        dq [B, H, Lq, D] in q_rot's dtype (gradient w.r.t. the unrotated q); dk, dv [B, Hkv, Lk, D]
        in k's dtype. Freshly allocated, in the layouts of out (the forward's q's), k and v
        (common.new_buffer); None where not needed. Then d_mask, in
        attn_mask's shape and dtype, or None without `mask_grad`.
    """
    if isinstance(ids, torch.Tensor) and ids.dim() == 1:
        ids = ids.expand(q_rot.shape[0], ids.shape[0])
    _check(do, q_rot, k, v, out, lse, ids, causal, rotation, rot_mask)
    B, H, Lq, D = q_rot.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = H // Hkv
    dev = q_rot.device
    rotate = rotation is not None
    ieee = q_rot.dtype == torch.float32
    qk_scale = float(scale) * _LOG2E
    dropout = dropout_p > 0
    drop_args = dropout_launch_args(dropout_p, seed, dev)
    amask, amask_strides, mask_kind = mask_launch_args(attn_mask, B, H, Lq, Lk, lse)
    lse, row_max = common.lse_planes(lse)
    grad_mode = mask_grad_plan(attn_mask, B, H, Lq, Lk, common.deterministic()) if mask_grad else 0
    dmask = mask_grad_buffer(attn_mask, B, H, Lq, Lk, grad_mode) if mask_grad else None

    delta = common.new_buffer((B, H, Lq), dev, torch.float32)
    pre_d, pre_dc = _pre_blocks(D)
    with common.LAUNCH_LOCK:
        _bwd_preprocess_kernel[launch_grid(triton.cdiv(Lq, PRE_BLOCK_M), 1, H, B)](
            out, do, delta, *out.stride(), *do.stride(), H, Lq,
            HEAD_D=D, BLOCK_D=pre_d, NUM_DC=pre_dc, BLOCK_M=PRE_BLOCK_M, OFFS64=int64_offsets(out, do),
        )

    # Tensor descriptors (Hopper, 16-bit, aligned layouts): dK/dV streams q_rot and do, dQ streams k and v.
    tma_ok = USE_TMA and not ieee and target_arch() >= 90
    tma_dkdv = tma_ok and tma_ready(q_rot, do)
    tma_dq = tma_ok and tma_ready(k, v)
    if (tma_dkdv or tma_dq) and dev.type == "cuda":
        ensure_scratch_allocator()

    dk = dv = dq = None
    if need_dkdv:
        dk = common.new_buffer((B, Hkv, Lk, D), dev, k.dtype, like=k)
        dv = common.new_buffer((B, Hkv, Lk, D), dev, v.dtype, like=v)
        split, block_d, block_dv, num_dc = _dkdv_plan(D, ieee)
        n_dv = triton.cdiv(D, block_dv)
        with common.LAUNCH_LOCK:
            _bwd_dkdv[lambda meta: launch_grid(triton.cdiv(Lk, meta["BLOCK_N"]), n_dv, Hkv, B)](
                q_rot, k, v, do, lse, delta, ids, dk, dv, seed if dropout else delta, amask, row_max,
                *q_rot.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
                ids.stride(0), ids.stride(1), *amask_strides,
                H, Lq, Lk, group, float(scale), qk_scale, *drop_args, common.tune_length(Lq), common.tune_length(Lk),
                common.tune_device(), common.deterministic(),
                HEAD_D=D, BLOCK_D=block_d, BLOCK_DV=block_dv, NUM_DC=num_dc,
                CAUSAL=bool(causal), SPLIT=split, IEEE=ieee, TMA=tma_dkdv and not split, DROPOUT=dropout, MASK=mask_kind,
                OFFS64=int64_offsets(q_rot, k, v, do, dk, dv, *mask_slices(amask, mask_kind)),
            )

    if need_dq or mask_grad:  # dQ also forms the bias gradient
        # out has the forward's q's layout (q_rot may be a contiguous rotated copy of q)
        dq = common.new_buffer((B, H, Lq, D), dev, q_rot.dtype, like=out)
        trim = common.trims_padding(ids)
        split, block_d, block_dv, num_dc = _dq_plan(D, ieee)
        n_dv = triton.cdiv(D, block_dv)
        in_kernel_rot = rotate and n_dv == 1
        rot = dense_rotation(rotation.detach()) if in_kernel_rot else delta  # delta: never read
        every_row = in_kernel_rot and rot_mask is None
        rm = ids if (every_row or not in_kernel_rot) else rot_mask.view(torch.uint8)  # ids: never read
        n_wide = wide_plan(D, WIDE_CHUNK)[2]
        with common.LAUNCH_LOCK:
            _bwd_dq[lambda meta: launch_grid(triton.cdiv(Lq, meta["BLOCK_M"]), n_wide if meta["WIDE"] and split else n_dv,
                                             H, B)](
                q_rot, k, v, do, lse, delta, ids, rot, rm, dq, seed if dropout else delta,
                common.live_key_ends(ids) if trim else delta, amask, row_max, delta if dmask is None else dmask,
                *q_rot.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
                ids.stride(0), ids.stride(1), rm.stride(0), rm.stride(1), *amask_strides,
                H, Lq, Lk, group, float(scale), qk_scale, *drop_args, common.tune_length(Lq), common.tune_length(Lk),
                common.tune_device(), common.deterministic(),
                HEAD_D=D, BLOCK_D=block_d, BLOCK_DV=block_dv, NUM_DC=num_dc,
                CAUSAL=bool(causal), ROTATE=in_kernel_rot, DROPOUT=dropout, TRIM=trim, MASK=mask_kind, MASK_GRAD=grad_mode,
                SPLIT=split, IEEE=ieee, ROT_CHUNK=_rot_chunk(block_dv, ieee),
                EVERY_ROW=every_row, TMA=tma_dq and not split, WC=WIDE_CHUNK,
                OFFS64=int64_offsets(q_rot, k, v, do, dq, *mask_slices(amask, mask_kind)),
            )
        if rotate and not in_kernel_rot and need_dq:
            # dq is split over D chunks, so no program held a full dq' row: dq = dq' @ R afterwards,
            # in place for the factored form (no second dq buffer; unrotated rows are not touched).
            dq = rotate_rows(dq, rotation.detach(), rot_mask, transpose=True, in_place=is_low_rank(rotation),
                             keep_layout=True)
    if dmask is not None:  # dense: the broadcast dims' sum (a no-op for a full [B, H, Lq, Lk] mask)
        dmask = (dmask.sum_to_size(attn_mask.shape) if grad_mode == 1 else dmask).to(attn_mask.dtype)
    return dq if need_dq else None, dk, dv, dmask
