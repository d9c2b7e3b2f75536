"""Fused forward kernel: query rotation + flash attention + per-modality statistics, one launch.

Each program owns BLOCK_M query rows of one (batch, head). Before its key loop it forms the rotated
Q tile (q' = q @ R^T, summed over narrow slices of R^T) and keeps the selected rows of it, then
walks the key blocks with the online softmax: keep a running row maximum m and row sum l; when a new block
raises the maximum, rescale everything accumulated so far by 2^(m_old - m_new). The per-modality
attention mass is one more accumulator of that loop ([BLOCK_M, MP], fed by p @ one_hot(ids)), so it
is rescaled exactly like the output. Key sums per modality do not depend on the queries, so they are
split across the programs of a (batch, kv-head) and written as partial sums that the launcher adds.

Head dims up to MAX_SINGLE_D run in one program. Larger heads (the paper's 768) split the output
over D: each program computes full-D scores by looping over D chunks of (already rotated) Q and K
and accumulates one BLOCK_DV chunk of the output; only chunk 0 writes the log-sum-exp and the mass.
On Hopper (16-bit) the autotuner may instead pick the wide split for heads up to WIDE_MAX_D: Q is
loaded once as up to six WIDE_CHUNK-wide tiles that stay in shared memory, and two programs share
the output columns, so the scores are computed twice rather than once per output chunk, and no Q
chunk is reloaded per key block.
fp32 inputs and the split path get Q rotated once up front by the launcher (see rollingq_fwd).
With dropout (DROPOUT) the probabilities that weight V are masked by kernels/dropout.py's draw and
the output is scaled by 1 / (1 - p) at the end; m, l and the mass use every probability.
A user attention mask (MASK, kernels/attn_mask.py) is read per score tile: a bool one hides
elements like padding keys do, a float one is added to the scaled scores; both shape the mass too.
"""

import torch
import triton
import triton.language as tl

from . import common
from .attn_mask import launch_args as mask_launch_args
from .attn_mask import offset_slices as mask_slices
from .attn_mask import mask_tile
from .common import interpreting, next_pow2, target_arch
from .dropout import kept
from .dropout import launch_args as dropout_launch_args
from .grid import launch_grid, program_ids
from .offsets import int64_offsets, widen, widen2
from .rotate import dense_rotation
from .rotate import rotate as rotate_rows
from .tiles import WIDE_CHUNK, WIDE_MAX_D, load_chunk, store_chunk, wide_accumulators, wide_plan
from .tma import enabled_by_default, ensure_scratch_allocator, tma_ready

MAX_SINGLE_D = 256  # larger heads take the D-split path (tests lower it to reach that branch)
MAX_SINGLE_D_PRE_HOPPER = 128  # the Ampere plan (every card without Hopper's plan): D 256 spills in one program
SPLIT_D_CHUNK = 64  # D chunk of the score loop (q'.k over D) on the D-split path
# Output columns per program on the D-split path: each program recomputes the full-D scores, so
# wider output chunks mean fewer recomputations (D 768: 3 programs at 256 instead of 6 at 128).
SPLIT_DV_CHUNK = 256
SPLIT_DV_CHUNK_NARROW = 128  # fp32 (FMA dots) and the Ampere plan: 256 wide spills
# The wide variant of the split (Hopper, 16-bit, heads up to WIDE_MAX_D): Q stays resident as up
# to 6 WIDE_CHUNK-wide tiles and two programs share the output (3 chunks each), so the scores are
# computed twice instead of three times at D 768; the autotuner picks it or the plain split.
# WIDE_CHUNK and WIDE_MAX_D come from kernels/tiles.py.
KS_BLOCK = 64  # keys per step of the key-sum loop; fixed so the partial buffer is config-independent
MAX_BLOCK_M = 128  # largest BLOCK_M of any config: bounds the number of key-sum workers
ROT_CHUNK = 16  # columns of D per step of the in-kernel rotation
FORCE_MASS_F16 = False  # tests set it to run bf16's fp16 mass branch with fp16 (interpreter) inputs
USE_TMA = enabled_by_default()  # descriptor tiles where possible (kernels/tma.py); off: tests, ROLLINGQ_TMA=0


# Autotune lists per GPU generation and (precision, head-dim class): (BLOCK_M, BLOCK_N, num_warps,
# num_stages). Every entry compiles for its target (sm_90: H100/H200; sm_80: A100, also used for
# the other cards from sm_80 on, whose 99 KB each class fits with one row) without register spills
# and within shared memory, as checked by
# bench/inspect_kernels.py (and tests/test_aot_compile.py) on the launches of real shapes; the
# next wider tiles spill (e.g. BN 128 at D 128 on sm_90 with pointer loads, statistics and rotation on).
# A (precision, class, "tma") list is offered only with descriptor loads, which free the registers
# that its tiles need; "wide" lists are the wide split's (offered beside "split", see _prune).
FWD_CONFIGS_BY_ARCH = {
    90: {
        ("16bit", 64): [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
        ("16bit", 128): [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
        ("16bit", 128, "tma"): [(128, 128, 8, 3)],  # spills with pointer loads: descriptors only
        # a float mask with dropout spills every row above (bf16); stand-ins, checked as the rest
        ("16bit", 128, "bias+dropout"): [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
        ("16bit", 256): [(64, 64, 8, 2), (64, 32, 8, 2)],
        ("16bit", "split"): [(64, 32, 8, 1), (64, 64, 8, 1), (128, 16, 8, 1)],
        ("16bit", "wide"): [(64, 16, 8, 2), (64, 16, 8, 3)],
        ("fp32", 64): [(32, 32, 4, 2)],
        ("fp32", 128): [(32, 32, 8, 1)],
        ("fp32", 128, "mask+dropout"): [(32, 16, 8, 1)],
        ("fp32", 256): [(32, 16, 8, 1)],
        ("fp32", "split"): [(16, 16, 8, 1)],
    },
    80: {
        ("16bit", 64): [(128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 2)],
        ("16bit", 128): [(128, 32, 8, 2), (64, 32, 4, 2)],
        ("16bit", 128, "dropout"): [(64, 16, 8, 2)],
        ("16bit", 64, "bias+dropout"): [(64, 32, 8, 2), (128, 16, 8, 2)],  # every row above spills with them
        # BM32 first: 78 KB with every extra, so it serves 99 KB cards (sm_86/89/120) and the
        # deterministic pick; the BM64 rows keep Q in 104-128 KB, A100 only.
        ("16bit", "split"): [(32, 16, 8, 2), (64, 32, 8, 1), (64, 16, 8, 2)],
        ("fp32", 64): [(32, 32, 4, 2)],
        ("fp32", 128): [(32, 32, 8, 2)],
        ("fp32", "split"): [(16, 16, 8, 1)],
    },
}
# Dropout launches (kernels/dropout.py) hold the Philox draw in the loop, mask launches
# (kernels/attn_mask.py) a mask tile: the rows that spill with them are not offered to them
# (bench/inspect_kernels.py --only dropout / --only mask, fp16/bf16/fp32; common.launch_extras names
# the combinations). Their (..., extra) lists in FWD_CONFIGS_BY_ARCH ("dropout", "mask+dropout",
# "bias+dropout") are added for them (stand-ins, chosen where a class lost every row).
FWD_DROPOUT_SPILLS = {
    90: {("16bit", 128, "tma"): [(128, 128, 8, 3)], ("16bit", "split"): [(64, 64, 8, 1)]},
    80: {("16bit", 64): [(64, 64, 4, 2)], ("16bit", 128): [(128, 32, 8, 2), (64, 32, 4, 2)]},
}
FWD_MASK_SPILLS = {
    90: {("16bit", 64): [(128, 128, 8, 2), (128, 128, 8, 3)], ("16bit", 128, "tma"): [(128, 128, 8, 3)],
         ("16bit", "split"): [(64, 32, 8, 1), (64, 64, 8, 1)]},
    80: {("16bit", 64): [(128, 64, 8, 3)], ("16bit", 128): [(128, 32, 8, 2)], ("16bit", "split"): [(64, 32, 8, 1)]},
}
FWD_SPILLS = {"dropout": FWD_DROPOUT_SPILLS, "mask": FWD_MASK_SPILLS,
              "mask+dropout": {90: {("16bit", 128): [(128, 64, 8, 2), (128, 64, 8, 3)],  # s3: fp16, 8 B
                                    ("fp32", 128): [(32, 32, 8, 1)]},
                               80: {("16bit", 64): [(64, 64, 4, 2)]}},
              # a float mask's tile costs more registers than a bool one's
              "bias+dropout": {90: {("16bit", 128): [(128, 64, 8, 3), (64, 64, 4, 3)]},
                               80: {("16bit", 64): [(128, 32, 8, 2)]}}}
INTERPRET_CONFIG = (16, 16, 4, 1)


def _d_class(head_d: int, split: bool, ieee: bool):
    prec = "fp32" if ieee else "16bit"
    if split:
        return prec, "split"
    return prec, 64 if head_d <= 64 else (128 if head_d <= 128 else 256)


def _config(t, wide=False):
    bm, bn, w, s = t
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WIDE": int(wide)}, num_warps=w, num_stages=s)


def _table_configs():
    """Every row of every table once (a row of a "wide" list as a wide-split config)."""
    return [_config(t, wide) for wide, t in sorted({(key[1] == "wide", t) for table in FWD_CONFIGS_BY_ARCH.values()
                                                    for key, lst in table.items() for t in lst})]


def _configs():
    return [_config(INTERPRET_CONFIG)] if interpreting() else _table_configs()


def _max_single_d(arch: int) -> int:
    return MAX_SINGLE_D if arch >= 90 else min(MAX_SINGLE_D, MAX_SINGLE_D_PRE_HOPPER)


def _prune(configs, named_args, **kwargs):
    if len(configs) == 1:
        return configs
    args = dict(named_args, **kwargs)
    table = FWD_CONFIGS_BY_ARCH[target_arch()]
    prec, cls = _d_class(args["HEAD_D"], args["SPLIT"], args["IEEE"])
    extras = common.launch_extras(args)
    spills = common.spill_rows(FWD_SPILLS, extras, target_arch())

    def rows_of(k, stand_ins=()):
        return [t for t in table.get(k, []) + list(stand_ins) if t not in spills.get(k, [])]

    rows = rows_of((prec, cls), [t for extra in extras for t in table.get((prec, cls, extra), [])])
    wanted = {(t, 0) for t in rows + (rows_of((prec, cls, "tma")) if args["TMA"] else [])}
    if cls == "split" and args["HEAD_D"] <= WIDE_MAX_D:
        wanted |= {(t, 1) for t in table.get((prec, "wide"), [])}
    key = lambda c: ((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages), c.kwargs["WIDE"])  # noqa: E731
    if args.get("DETERMINISTIC"):  # one fixed config (common.deterministic): the class list's first row
        wanted = {(rows[0], 0)}
    return [c for c in configs if key(c) in wanted]


@triton.jit
def _kv(desc, base, start_n, offs_n, n_ok, s_n, s_c, col0, offs_w, HEAD_D, DESC: tl.constexpr):
    """A [BLOCK_N, WC] K or V chunk, through the descriptor or by pointers."""
    if DESC:
        return desc.load([start_n, col0])
    else:
        return load_chunk(base, offs_n, n_ok, s_n, s_c, col0, offs_w, HEAD_D)


@triton.jit
def _qk(s, qc, desc, base, start_n, offs_n, n_ok, s_n, s_c, col0, offs_w, HEAD_D, DESC: tl.constexpr,
        prec: tl.constexpr):
    """s + qc . k^T over one WC-wide chunk of D (columns col0 + offs_w)."""
    return tl.dot(qc, _kv(desc, base, start_n, offs_n, n_ok, s_n, s_c, col0, offs_w, HEAD_D, DESC).T, s,
                  input_precision=prec)


@triton.jit
def _weights(p, p_dt, seed, bh, offs_m, start_n, drop_thresh, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """The probabilities that weight V, in V's dtype: p, or with dropout p where kept (rescaled at
    the end), 0 elsewhere."""
    if DROPOUT:
        return tl.where(kept(seed, bh, offs_m[:, None], start_n, drop_thresh, BLOCK_M, BLOCK_N), p, 0.0).to(p_dt.dtype)
    else:
        return p_dt


@triton.autotune(
    configs=_configs(),
    # Lengths by bucket (common.tune_length); TMA because the pruner offers other rows with it;
    # the kind of card (common.tune_device), since Triton's own key does not hold the device.
    key=["TUNE_LQ", "TUNE_LK", "TUNE_DEV", "HEAD_D", "BLOCK_DV", "CAUSAL", "ROTATE", "STATS", "SPLIT", "IEEE", "TMA",
         "DETERMINISTIC", "DROPOUT", "TRIM", "MASK"],
    prune_configs_by={"early_config_prune": _prune},
)
# drop_thresh: any p compiles to one kernel (a divisible-by-16 hint would split them, unchecked).
@triton.jit(do_not_specialize=["TUNE_DEV", "DETERMINISTIC", "drop_thresh"])
def _rollingq_fwd_kernel(
    Q, K, V, O, LSE, QROT, ROT, ROWMASK, IDS, MASS, KSUM, SEED,
    KV_END,  # TRIM: int32 [B], one past each batch row's last live key (common.live_key_ends)
    AMASK,  # MASK: the user's attention mask, [B, H, Lq, Lk] (stride 0 on broadcast dims; attn_mask.py)
    ROWMAX,  # each row's max m (base 2); LSE holds log2(l) (common.lse_shape)
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od,
    s_rmb, s_rmm,
    s_ib, s_in,
    s_ab, s_ah, s_am, s_an,
    H, Lq, Lk, M, GROUP, NUM_WORKERS,
    qk_scale,  # softmax scale * log2(e): the loop works in base 2
    drop_thresh, drop_scale,  # dropout (kernels/dropout.py): keep threshold, 1 / (1 - p)
    TUNE_LQ, TUNE_LK,  # the lengths' autotuning buckets (kernels/common.tune_length); not read
    TUNE_DEV,  # the kind of card (common.tune_device): keyed on; not read
    DETERMINISTIC,  # common.deterministic(): keyed and pruned on; not read
    HEAD_D: tl.constexpr,  # true head dim
    BLOCK_D: tl.constexpr,  # power of two >= HEAD_D (single path) / D chunk of the score loop (split path)
    BLOCK_DV: tl.constexpr,  # output columns per program
    NUM_DC: tl.constexpr,  # number of D chunks in the score loop (1 on the single path)
    MP: tl.constexpr,  # modality count padded to a power of two >= 16 (tl.dot minimum)
    CAUSAL: tl.constexpr, ROTATE: tl.constexpr, STATS: tl.constexpr, SAVE_QROT: tl.constexpr,
    DROPOUT: tl.constexpr,  # drop attention probabilities (the statistics still see them all)
    TRIM: tl.constexpr,  # per-batch ids: stop each row's key loop at its last live key (KV_END)
    MASK: tl.constexpr,  # attention mask: 0 none, 1 bool (True = attend), 2 additive bias (attn_mask.py)
    EVERY_ROW: tl.constexpr,  # ROTATE applies to every row: no row mask, no unrotated Q tile
    SPLIT: tl.constexpr, IEEE: tl.constexpr, MASS_F16: tl.constexpr, KS_N: tl.constexpr,
    TMA: tl.constexpr,  # K/V tiles through tensor descriptors (Hopper's bulk copy engine)
    WC: tl.constexpr,  # chunk width of the wide split (WIDE_CHUNK)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RC: tl.constexpr, WIDE: tl.constexpr,
    OFFS64: tl.constexpr = False,  # a slice spans 2^31 elements: 64-bit strides (offsets.py)
):
    if OFFS64:
        s_qm, s_qd, s_kn, s_kd = widen(s_qm, s_qd, s_kn, s_kd)
        s_vn, s_vd, s_om, s_od = widen(s_vn, s_vd, s_om, s_od)
        s_am, s_an = widen2(s_am, s_an)
    # The wide split (a config choice on the split path): Q resident as NQC tiles of WC columns,
    # each program accumulating NACC output chunks of WC columns (acc, a1, a2: no arrays of tiles).
    WIDE_ON: tl.constexpr = WIDE != 0 and SPLIT
    NQC: tl.constexpr = (HEAD_D + WC - 1) // WC
    NACC: tl.constexpr = (NQC + 1) // 2
    # Descriptors serve the single path (tiles of BLOCK_D == BLOCK_DV) and the wide split (WC chunks).
    DESC: tl.constexpr = TMA and (WIDE_ON or not SPLIT)
    DESC_W: tl.constexpr = WC if WIDE_ON else BLOCK_D
    if WIDE_ON:
        tl.static_assert(NQC <= 6, "the wide split holds at most 6 Q chunks")
        pid_m, pid_d, h, b = program_ids((NQC + NACC - 1) // NACC)
    else:
        pid_m, pid_d, h, b = program_ids((HEAD_D + BLOCK_DV - 1) // BLOCK_DV)
    hkv = (h // GROUP).to(tl.int64)
    prec: tl.constexpr = "ieee" if IEEE else "tf32"
    dt = Q.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Lq
    dv_ok = offs_dv < HEAD_D
    q_base = Q + b * s_qb + h.to(tl.int64) * s_qh
    k_base = K + b * s_kb + hkv * s_kh
    v_base = V + b * s_vb + hkv * s_vh
    ids_base = IDS + b * s_ib
    amask_base = AMASK + b * s_ab + h.to(tl.int64) * s_ah
    seed = 0  # placeholders without dropout
    bh = 0
    if DROPOUT:
        seed = tl.load(SEED)
        bh = (b * H + h).to(tl.uint32)

    q = q_base  # placeholder: the split path reloads Q chunks in the loop
    if not SPLIT:
        d_ok = offs_d < HEAD_D
        if ROTATE:
            # q' = q @ R^T, summed over RC-wide slices of D so that only an [RC, D] slice of R^T
            # (loaded directly as rt[d, e] = R[e, d]) is live at a time: a whole [D, D] tile spills.
            r_base = ROT + h.to(tl.int64) * HEAD_D * HEAD_D
            offs_r = tl.arange(0, RC)
            rot_d = HEAD_D
            if not EVERY_ROW:
                sel = tl.load(ROWMASK + b * s_rmb + offs_m * s_rmm, mask=m_ok, other=0) != 0
                # A tile without a selected row (all but the first with rotate_rows = a few
                # fusion tokens) skips the rotation: its loop runs no step.
                rot_d = tl.where(tl.max(sel.to(tl.int32), 0) > 0, HEAD_D, 0)
            q_rot = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for c in range(0, rot_d, RC):
                r_ok = (c + offs_r) < HEAD_D
                qc = tl.load(q_base + offs_m[:, None] * s_qm + (c + offs_r)[None, :] * s_qd,
                             mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                rt = tl.load(r_base + offs_d[None, :] * HEAD_D + (c + offs_r)[:, None],
                             mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(dt)
                q_rot = tl.dot(qc, rt, q_rot, input_precision=prec)
            if EVERY_ROW:
                q = q_rot.to(dt)
            else:
                # The full Q tile is loaded only now, so it is not live during the rotation loop.
                q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                            mask=m_ok[:, None] & d_ok[None, :], other=0.0)
                q = tl.where(sel[:, None], q_rot.to(dt), q)
        else:
            q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                        mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if SAVE_QROT:
            tl.store(QROT + ((b * H + h) * Lq + offs_m[:, None]) * HEAD_D + offs_d[None, :], q,
                     mask=m_ok[:, None] & d_ok[None, :])

    offs_w = tl.arange(0, WC)
    a_col = pid_d * NACC * WC  # first output column of a wide-split program
    if WIDE_ON:
        # Loaded once; only ever a dot operand, so the compiler keeps them in shared memory.
        q0 = load_chunk(q_base, offs_m, m_ok, s_qm, s_qd, 0, offs_w, HEAD_D)
        if NQC > 1:
            q1 = load_chunk(q_base, offs_m, m_ok, s_qm, s_qd, WC, offs_w, HEAD_D)
        if NQC > 2:
            q2 = load_chunk(q_base, offs_m, m_ok, s_qm, s_qd, 2 * WC, offs_w, HEAD_D)
        if NQC > 3:
            q3 = load_chunk(q_base, offs_m, m_ok, s_qm, s_qd, 3 * WC, offs_w, HEAD_D)
        if NQC > 4:
            q4 = load_chunk(q_base, offs_m, m_ok, s_qm, s_qd, 4 * WC, offs_w, HEAD_D)
        if NQC > 5:
            q5 = load_chunk(q_base, offs_m, m_ok, s_qm, s_qd, 5 * WC, offs_w, HEAD_D)
        acc, a1, a2 = wide_accumulators(BLOCK_M, WC)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    mass = tl.zeros([BLOCK_M, MP], tl.float32)
    mod = tl.arange(0, MP)

    k_desc = K  # placeholders when the pointer path runs
    v_desc = V
    if DESC:
        # The copy engine fetches whole tiles (zero-filled past Lk and HEAD_D): no per-element
        # addresses or masks in registers.
        k_desc = tl.make_tensor_descriptor(k_base, shape=[Lk, HEAD_D], strides=[s_kn, 1],
                                           block_shape=[BLOCK_N, DESC_W])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[Lk, HEAD_D], strides=[s_vn, 1],
                                           block_shape=[BLOCK_N, DESC_W])
    hi = Lk
    if TRIM:
        hi = tl.load(KV_END + b)  # key blocks past the last live key hold only padding: skipped
    if CAUSAL:
        # Lq == Lk, so only the last query block overshoots; masks cover it
        if TRIM:
            hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M)
        else:
            hi = (pid_m + 1) * BLOCK_M
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < Lk
        ids = tl.load(ids_base + offs_n * s_in, mask=n_ok, other=-1)
        if WIDE_ON:
            s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            s = _qk(s, q0, k_desc, k_base, start_n, offs_n, n_ok, s_kn, s_kd, 0, offs_w, HEAD_D, DESC, prec)
            if NQC > 1:
                s = _qk(s, q1, k_desc, k_base, start_n, offs_n, n_ok, s_kn, s_kd, WC, offs_w, HEAD_D, DESC, prec)
            if NQC > 2:
                s = _qk(s, q2, k_desc, k_base, start_n, offs_n, n_ok, s_kn, s_kd, 2 * WC, offs_w, HEAD_D, DESC, prec)
            if NQC > 3:
                s = _qk(s, q3, k_desc, k_base, start_n, offs_n, n_ok, s_kn, s_kd, 3 * WC, offs_w, HEAD_D, DESC, prec)
            if NQC > 4:
                s = _qk(s, q4, k_desc, k_base, start_n, offs_n, n_ok, s_kn, s_kd, 4 * WC, offs_w, HEAD_D, DESC, prec)
            if NQC > 5:
                s = _qk(s, q5, k_desc, k_base, start_n, offs_n, n_ok, s_kn, s_kd, 5 * WC, offs_w, HEAD_D, DESC, prec)
        elif SPLIT:
            s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for c in tl.static_range(NUM_DC):
                offs_c = c * BLOCK_D + offs_d
                c_ok = offs_c < HEAD_D
                qc = tl.load(q_base + offs_m[:, None] * s_qm + offs_c[None, :] * s_qd,
                             mask=m_ok[:, None] & c_ok[None, :], other=0.0)
                kc = tl.load(k_base + offs_n[None, :] * s_kn + offs_c[:, None] * s_kd,
                             mask=n_ok[None, :] & c_ok[:, None], other=0.0)
                s = tl.dot(qc, kc, s, input_precision=prec)
        elif DESC:
            s = tl.dot(q, k_desc.load([start_n, 0]).T, input_precision=prec)
        else:
            kt = tl.load(k_base + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, kt, input_precision=prec)
        live = ids[None, :] >= 0
        if CAUSAL:
            live = live & (offs_m[:, None] >= offs_n[None, :])
        if MASK == 1:
            live = live & mask_tile(amask_base, offs_m, offs_n, m_ok, n_ok, s_am, s_an, MASK)
        if MASK == 2:
            s = s * qk_scale + mask_tile(amask_base, offs_m, offs_n, m_ok, n_ok, s_am, s_an, MASK)
            s = tl.where(live, s, float("-inf"))
        else:
            s = tl.where(live, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no live key yet keeps m = -inf; shift it by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if WIDE_ON:
            p_dt = p.to(dt)
            pv_dt = _weights(p, p_dt, seed, bh, offs_m, start_n, drop_thresh, DROPOUT, BLOCK_M, BLOCK_N)
            acc = tl.dot(pv_dt, _kv(v_desc, v_base, start_n, offs_n, n_ok, s_vn, s_vd, a_col, offs_w, HEAD_D, DESC),
                         acc * alpha[:, None], input_precision=prec)
            if NACC > 1:
                a1 = tl.dot(pv_dt, _kv(v_desc, v_base, start_n, offs_n, n_ok, s_vn, s_vd, a_col + WC, offs_w, HEAD_D,
                                      DESC), a1 * alpha[:, None], input_precision=prec)
            if NACC > 2:
                a2 = tl.dot(pv_dt, _kv(v_desc, v_base, start_n, offs_n, n_ok, s_vn, s_vd, a_col + 2 * WC, offs_w,
                                      HEAD_D, DESC), a2 * alpha[:, None], input_precision=prec)
        else:
            if DESC:
                v = v_desc.load([start_n, 0])
            else:
                v = tl.load(v_base + offs_n[:, None] * s_vn + offs_dv[None, :] * s_vd,
                            mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
            # p is cast after the V load, as before dropout existed: the other order spills
            # (sm_90, D128 BM128 BN128 s3, 32 B).
            p_dt = p.to(dt)
            pv_dt = _weights(p, p_dt, seed, bh, offs_m, start_n, drop_thresh, DROPOUT, BLOCK_M, BLOCK_N)
            acc = tl.dot(pv_dt, v, acc * alpha[:, None], input_precision=prec)
        if STATS:
            if MASS_F16:
                # bf16 inputs: p rounded to bf16 (8 bits) misses the mass bound; fp16 (11 bits,
                # p <= 1) meets it, as on fp16 inputs. One cvt per element and a 16-bit operand:
                # fewer instructions than p = hi + lo in two bf16 dots, fewer registers than tf32.
                onehot = (ids[:, None] == mod[None, :]).to(tl.float16)
                mass = tl.dot(p.to(tl.float16), onehot, mass * alpha[:, None], input_precision=prec)
            else:
                onehot = (ids[:, None] == mod[None, :]).to(dt)
                mass = tl.dot(p_dt, onehot, mass * alpha[:, None], input_precision=prec)
        m_i = m_new

    empty = l_i == 0.0
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    inv_lv = inv_l  # the output's normaliser: with dropout also 1 / (1 - p); the mass's stays 1 / l
    if DROPOUT:
        inv_lv = inv_l * drop_scale
    o_base = O + b * s_ob + h.to(tl.int64) * s_oh
    if WIDE_ON:
        store_chunk(o_base, offs_m, m_ok, s_om, s_od, a_col, offs_w, HEAD_D, acc * inv_lv[:, None])
        if NACC > 1:
            store_chunk(o_base, offs_m, m_ok, s_om, s_od, a_col + WC, offs_w, HEAD_D, a1 * inv_lv[:, None])
        if NACC > 2:
            store_chunk(o_base, offs_m, m_ok, s_om, s_od, a_col + 2 * WC, offs_w, HEAD_D, a2 * inv_lv[:, None])
    else:
        tl.store(o_base + offs_m[:, None] * s_om + offs_dv[None, :] * s_od,
                 (acc * inv_lv[:, None]).to(O.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])
    if pid_d == 0:
        # m and log2(l) apart (common.lse_shape): in m + log2(l) a large m would swamp log2(l).
        # log2(l) = +inf (m = 0) marks a row with no live key: p = 0 there in the backward.
        tl.store(ROWMAX + (b * H + h) * Lq + offs_m, tl.where(empty, 0.0, m_i), mask=m_ok)
        tl.store(LSE + (b * H + h) * Lq + offs_m, tl.where(empty, float("inf"), tl.log2(tl.where(empty, 1.0, l_i))),
                 mask=m_ok)
        if STATS:
            tl.store(MASS + ((b * H + h) * Lq + offs_m[:, None]) * M + mod[None, :], mass * inv_l[:, None],
                     mask=m_ok[:, None] & (mod[None, :] < M))

    if STATS:
        # Key sums: worker w of this (b, kv-head) adds key blocks w, w + W, ... for its D columns.
        # A wide-split program covers NACC chunks of WC columns, any other one BLOCK_DV columns.
        w = pid_m * GROUP + h % GROUP
        KS_C: tl.constexpr = NACC if WIDE_ON else 1
        KS_W: tl.constexpr = WC if WIDE_ON else BLOCK_DV
        if w < NUM_WORKERS:
            offs_kn0 = tl.arange(0, KS_N)
            ks_base = KSUM + ((b * (H // GROUP) + hkv) * NUM_WORKERS + w) * MP * HEAD_D
            for j in tl.static_range(KS_C):
                offs_ks = (pid_d * KS_C + j) * KS_W + tl.arange(0, KS_W)
                ks_ok = offs_ks < HEAD_D
                ks = tl.zeros([MP, KS_W], tl.float32)
                for start in range(w * KS_N, Lk, NUM_WORKERS * KS_N):
                    offs_kn = start + offs_kn0
                    kn_ok = offs_kn < Lk
                    kid = tl.load(ids_base + offs_kn * s_in, mask=kn_ok, other=-1)
                    kk = tl.load(k_base + offs_kn[:, None] * s_kn + offs_ks[None, :] * s_kd,
                                 mask=kn_ok[:, None] & ks_ok[None, :], other=0.0)
                    onehot_t = (mod[:, None] == kid[None, :]).to(dt)
                    ks = tl.dot(onehot_t, kk, ks, input_precision="ieee" if IEEE else "tf32")
                tl.store(ks_base + mod[:, None] * HEAD_D + offs_ks[None, :], ks, mask=ks_ok[None, :])


def _d_plan(d: int, split: bool, ieee: bool, arch: int):
    """Head dim -> (BLOCK_D, BLOCK_DV, NUM_DC): score-loop chunk, output columns per program, chunks."""
    if not split:
        block = max(16, next_pow2(d))
        return block, block, 1
    dv = min(SPLIT_DV_CHUNK_NARROW if ieee or arch < 90 else SPLIT_DV_CHUNK, next_pow2(d))
    return SPLIT_D_CHUNK, dv, triton.cdiv(d, SPLIT_D_CHUNK)


def rollingq_fwd(q, k, v, ids, num_modalities, rotation, rot_mask, causal, scale, stats, save_qrot,
                 dropout_p=0.0, seed=None, attn_mask=None):
    """Launch the fused forward.

    q [B, H, Lq, D], k/v [B, Hkv, Lk, D] (any strides); ids int32 [B, Lk] (stride 0 allowed);
    rotation float32 [H, D, D], packed [H, 2, D, r] (I + left @ right^T, see rotate.py) or None;
    rot_mask uint8 [B, Lq] (stride 0 allowed) selects the rotated rows, None: every row (when a
    rotation is given). dropout_p in [0, 1) with seed int64 [1] on q's device (kernels/dropout.py):
    the dropped probabilities do not weight v; lse and the statistics are those without dropout.
    attn_mask: bool (True = attend) or float (added to the scaled scores), broadcastable to
    [B, H, Lq, Lk], or None (kernels/attn_mask.py).
    Returns out [B, H, Lq, D] in q's memory layout (common.new_buffer), lse [2, B, H, Lq] fp32
    (each row's log2 l and max m in base 2: common.lse_shape), q_rot [B, H, Lq, D] contiguous or None, attn_mass
    [B, H, Lq, M] fp32 or None, key_sum [B, Hkv, M, D] fp32 or None.
    """
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = H // Hkv
    dev = q.device
    arch = target_arch()
    out = common.new_buffer((B, H, Lq, D), dev, v.dtype, like=q)  # q's layout, as the ops' fake promises
    split = D > _max_single_d(arch)
    rotate = rotation is not None
    if rotate and (split or q.dtype == torch.float32):
        # The split path cannot hold a full rotated Q row per program, and fp32's exact (non-tensor-
        # core) dot spills registers when it rotates in-kernel: both rotate once up front.
        q = rotate_rows(q, rotation, rot_mask)
        rotate = False
    drop_args = dropout_launch_args(dropout_p, seed, dev)
    trim = common.trims_padding(ids)
    amask, amask_strides, mask_kind = mask_launch_args(attn_mask, B, H, Lq, Lk, ids)
    q_rot_out = None
    if save_qrot:
        q_rot_out = q if not rotate else common.new_buffer((B, H, Lq, D), dev, q.dtype)

    lse = common.new_buffer(common.lse_shape(B, H, Lq), dev, torch.float32)
    lse_arg, rowmax_arg = common.lse_planes(lse)
    mp = max(16, next_pow2(num_modalities))
    if stats:
        workers = min(triton.cdiv(Lk, KS_BLOCK), triton.cdiv(Lq, MAX_BLOCK_M) * group)
        mass = common.new_buffer((B, H, Lq, num_modalities), dev, torch.float32)
        ksum_part = common.new_buffer((B, Hkv, workers, mp, D), dev, torch.float32)
    else:
        workers = 0
        mass = ksum_part = lse  # never touched: STATS is a constexpr False
    block_d, block_dv, num_dc = _d_plan(D, split, q.dtype == torch.float32, arch)
    rot = dense_rotation(rotation) if rotate else lse
    rm = rot_mask if (rotate and rot_mask is not None) else ids  # ids: a stand-in the kernel never reads
    n_dv = triton.cdiv(D, block_dv)

    def grid(meta):
        chunks = wide_plan(D, WIDE_CHUNK)[2] if (meta["WIDE"] and split) else n_dv
        return launch_grid(triton.cdiv(Lq, meta["BLOCK_M"]), chunks, H, B)

    # fp32 (FMA dots) spills registers with descriptor tiles: it keeps the pointer path. On the split
    # path only the wide configs use descriptors (the kernel decides per config).
    tma = USE_TMA and arch >= 90 and q.dtype != torch.float32 and tma_ready(k, v)
    if tma and q.is_cuda:
        ensure_scratch_allocator()
    with common.LAUNCH_LOCK:
        _rollingq_fwd_kernel[grid](
            q, k, v, out, lse_arg, q_rot_out if (save_qrot and rotate) else lse, rot, rm, ids, mass, ksum_part,
            seed if dropout_p > 0 else lse, common.live_key_ends(ids) if trim else lse, amask, rowmax_arg,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            rm.stride(0), rm.stride(1), ids.stride(0), ids.stride(1), *amask_strides,
            H, Lq, Lk, num_modalities, group, workers,
            scale * 1.4426950408889634, *drop_args, common.tune_length(Lq), common.tune_length(Lk),
            common.tune_device(), common.deterministic(),
            HEAD_D=D, BLOCK_D=block_d, BLOCK_DV=block_dv, NUM_DC=num_dc, MP=mp,
            CAUSAL=causal, ROTATE=rotate, STATS=stats, SAVE_QROT=bool(save_qrot and rotate), DROPOUT=dropout_p > 0,
            TRIM=trim, MASK=mask_kind,
            EVERY_ROW=rotate and rot_mask is None, SPLIT=split, IEEE=q.dtype == torch.float32,
            MASS_F16=q.dtype == torch.bfloat16 or FORCE_MASS_F16, KS_N=KS_BLOCK, RC=ROT_CHUNK, TMA=tma, WC=WIDE_CHUNK,
            OFFS64=int64_offsets(q, k, v, out, *mask_slices(amask, mask_kind)),
        )
    key_sum = ksum_part[:, :, :, :num_modalities].sum(2) if stats else None  # contiguous [B, Hkv, M, D]
    return out, lse, q_rot_out, (mass if stats else None), key_sum
