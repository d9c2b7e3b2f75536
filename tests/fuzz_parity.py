"""Random-combination parity fuzzer of the kernels against the float64 reference (design.md's rule).

    TRITON_INTERPRET=1 python tests/fuzz_parity.py [START] [SECONDS] [--only=i,j,k] [--out=FILE]

A developer's tool, not collected by pytest (tests/test_fuzz_parity_tool.py runs two cases of it).
Case i draws everything from i: its options from random.Random(i) (dtype, GQA, lengths, head dim,
causal, ids forms and padding, rotation form and rows, scale, stats, dropout, attn_mask kind, shape,
layout and gradient, input layouts, D-split / wide-split paths, descriptors, deterministic mode),
its tensors from a generator seeded with i. It prints one line per case and appends failures (with
their options) to --out (default ./fuzz_failures.jsonl). A gradient that misses the rule is rerun with
the backward's delta = do . out formed from the exact output: "[exactdelta:pass]" marks the known
rounding term of the kernels' delta from their rounded output (README, "Numerics"). Kinds
"exception", "harness", "nonfinite" and "meta" are bugs; "rule" and "stats" are measured against
the reference run in the kernel's dtype and need reading (bench/NOTES.md, eighth session).
First run (2026-11-27, 1159 cases, CPU interpreter): no bug; 61 rule or tolerance misses, all
rounding (38 the delta term).
"""
import os
import sys

if __name__ == "__main__":  # before Triton is imported; an import from pytest leaves the setting alone
    os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import json  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
from pytest import MonkeyPatch  # noqa: E402

import rollingq  # noqa: E402
from rollingq.functional import dropout_seed, set_cpu_backend, uses_kernel  # noqa: E402
from rollingq.kernels import attention_bwd as bwd  # noqa: E402
from rollingq.kernels import attention_fwd, common  # noqa: E402
from rollingq.kernels.dropout import keep_mask  # noqa: E402
from rollingq.reference import attention_probs, rollingq_attention_reference  # noqa: E402
from rollingq.rotation import LowRankRotation, low_rank_rotation, plane_rotation  # noqa: E402
from tests.kernel_paths import force_d_split, force_wide_split  # noqa: E402
from tests.numerics import assert_bias_grad_close, nan_buffer, stats_tol  # noqa: E402



poisoned_buffer = nan_buffer  # every buffer the kernels write starts NaN-filled: an unwritten element fails

DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
IDS_DTYPES = {"int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
              "uint8": torch.uint8}


# ------------------------------------------------------------------------------------ parameters
def draw_params(i: int) -> dict:
    r = random.Random(i)
    p = {"idx": i}
    p["dtype"] = r.choice(["fp16", "fp32"])
    p["B"] = r.randint(1, 3)
    p["Hkv"] = r.choice([1, 1, 2])
    p["H"] = p["Hkv"] * r.choice([1, 1, 2, 3])
    p["causal"] = r.random() < 0.3
    small = r.random() < 0.5
    p["Lq"] = r.randint(1, 20 if small else 70)
    p["Lk"] = p["Lq"] if p["causal"] else r.randint(1, 20 if small else 70)
    p["D"] = r.choice([8, 16, 24, 40, 64, 72, 96, 128])
    p["M"] = r.randint(1, 5)
    # modality ids
    p["ids_form"] = r.choice(["shared", "shared", "per_batch", "per_batch", "per_batch", "shared_as_batch_view"])
    p["pad"] = r.choice(["none", "holes", "trailing", "holes+trailing"])
    p["hole_p"] = round(r.uniform(0.05, 0.5), 3)
    p["full_pad_row"] = r.random() < 0.15
    p["ids_dtype"] = r.choice(["int64", "int64", "int32", "int16", "int8", "uint8"])
    # rotation
    p["rotation"] = r.choice(["none", "dense", "dense", "lowrank", "lowrank", "dense_plane"])
    p["rot_planes"] = r.randint(1, 3)
    p["rot_dtype"] = r.choice(["fp32"] * 6 + ["fp16", "fp64"])
    p["rotate_rows"] = r.choice(["none", "int", "int_all", "mask1d", "mask2d"])
    p["rows_n"] = r.randint(0, p["Lq"])
    p["rows_p"] = round(r.uniform(0.1, 0.9), 3)
    # scale, stats, dropout
    sc = r.random()
    p["scale"] = None if sc < 0.55 else (round(r.uniform(0.05, 0.6), 4) if sc < 0.9 else
                                         (round(-r.uniform(0.05, 0.3), 4) if sc < 0.95 else round(r.uniform(0.6, 1.5), 4)))
    p["stats"] = r.random() < 0.6
    p["dropout_p"] = 0.0 if r.random() < 0.6 else round(r.uniform(0.1, 0.5), 4)
    # attention mask
    p["mask_kind"] = r.choice(["none", "none", "bool", "float", "float"])
    p["mask_shape"] = r.choice(["k", "qk", "b1qk", "1hqk", "bhqk", "hqk", "b1q1", "1h1k"])
    p["mask_dtype"] = r.choice(["fp32", "fp32", "fp16", "same"])
    p["mask_layout"] = r.choice(["contig", "contig", "transposed", "sliced"])
    p["mask_grad"] = p["mask_kind"] == "float" and r.random() < 0.5
    p["mask_hidden_row"] = r.random() < 0.3
    p["mask_neg_inf_p"] = r.choice([0.0, 0.2, 0.5])
    p["mask_big_finite"] = r.random() < 0.1
    # layouts
    p["q_layout"] = r.choice(["contig", "transposed", "sliced_d", "sliced_l"])
    p["k_layout"] = r.choice(["contig", "transposed", "sliced_d", "sliced_l", "expand_b", "expand_h"])
    p["v_layout"] = r.choice(["contig", "transposed", "sliced_d", "sliced_l", "expand_b", "expand_h"])
    p["do_layout"] = r.choice(["contig", "contig", "transposed", "row_stride0"])
    # gradients
    p["grad_q"], p["grad_k"], p["grad_v"] = (r.random() < 0.75 for _ in range(3))
    # kernel paths
    p["path"] = r.choice(["default", "default", "default", "d_split", "d_split", "wide"])
    p["tma"] = r.random() < 0.7
    p["deterministic"] = r.random() < 0.1
    # constraints: the wide split exists on 16-bit inputs only, and holds at most 6 chunks
    # (WIDE_MAX_D = 6 * WIDE_CHUNK; forced WIDE_CHUNK = 16 -> D <= 96)
    if p["path"] == "wide" and (p["dtype"] != "fp16" or p["D"] > 96):
        p["path"] = "d_split"
    if p["ids_dtype"] == "uint8" and (p["pad"] != "none" or p["full_pad_row"]):
        p["ids_dtype"] = "int64"
    return p


# ------------------------------------------------------------------------------------- tensors
def plane_rotations(H, D, n, gen):
    R = torch.eye(D, dtype=torch.float64).repeat(H, 1, 1)
    for _ in range(n):
        x, y = torch.randn(2, H, D, generator=gen, dtype=torch.float64)
        R = plane_rotation(x, y) @ R
    return R


def make_leaf(shape, layout, gen, dtype):
    """(leaf, view_fn): the leaf tensor requiring grad gets its gradient; view_fn maps a tensor of
    the leaf's shape (in any dtype) to the [B, h, L, D] input."""
    B, h, L, D = shape
    if layout == "transposed":
        base = torch.randn(B, L, h, D, generator=gen)
        return base.to(dtype), lambda t: t.transpose(1, 2)
    if layout == "sliced_d":
        base = torch.randn(B, h, L, D + 8, generator=gen)
        return base.to(dtype), lambda t: t[..., 3:3 + D]
    if layout == "sliced_l":
        base = torch.randn(B, h, 2 * L + 1, D, generator=gen)
        return base.to(dtype), lambda t: t[:, :, 1::2]
    if layout == "expand_b":
        base = torch.randn(1, h, L, D, generator=gen)
        return base.to(dtype), lambda t: t.expand(B, h, L, D)
    if layout == "expand_h":
        base = torch.randn(B, 1, L, D, generator=gen)
        return base.to(dtype), lambda t: t.expand(B, h, L, D)
    base = torch.randn(B, h, L, D, generator=gen)
    return base.to(dtype), lambda t: t


def make_ids(p, gen):
    B, Lk, M = p["B"], p["Lk"], p["M"]
    rows = 1 if p["ids_form"] != "per_batch" else B
    ids = torch.randint(0, M, (rows, Lk), generator=gen)
    if "holes" in p["pad"]:
        ids[torch.rand(rows, Lk, generator=gen) < p["hole_p"]] = -1
    if "trailing" in p["pad"]:
        for b in range(rows):
            n = int(torch.randint(0, Lk + 1, (1,), generator=gen))
            ids[b, n:] = -1
    if p["full_pad_row"]:
        ids[int(torch.randint(0, rows, (1,), generator=gen))] = -1
    ids = ids.to(IDS_DTYPES[p["ids_dtype"]])
    if p["ids_form"] == "shared":
        return ids[0]
    if p["ids_form"] == "shared_as_batch_view":
        return ids[0].expand(B, Lk)
    return ids


def make_mask(p, gen, dtype):
    if p["mask_kind"] == "none":
        return None
    B, H, Lq, Lk = p["B"], p["H"], p["Lq"], p["Lk"]
    shape = {"k": (Lk,), "qk": (Lq, Lk), "b1qk": (B, 1, Lq, Lk), "1hqk": (1, H, Lq, Lk), "bhqk": (B, H, Lq, Lk),
             "hqk": (H, Lq, Lk), "b1q1": (B, 1, Lq, 1), "1h1k": (1, H, 1, Lk)}[p["mask_shape"]]
    if p["mask_kind"] == "bool":
        m = torch.rand(shape, generator=gen) < 0.7
    else:
        m = 2 * torch.randn(shape, generator=gen)
        m[torch.rand(shape, generator=gen) < p["mask_neg_inf_p"]] = float("-inf")
        if p["mask_big_finite"] and len(shape) >= 2:
            m[..., int(torch.randint(0, shape[-2], (1,), generator=gen)), :] = -1e4
    if p["mask_hidden_row"] and len(shape) >= 2 and shape[-2] == Lq:
        m[..., int(torch.randint(0, Lq, (1,), generator=gen)), :] = False if p["mask_kind"] == "bool" else float("-inf")
    if p["mask_kind"] == "float":
        m = m.to(dtype if p["mask_dtype"] == "same" else DTYPES[p["mask_dtype"]])
    if p["mask_layout"] == "transposed" and m.dim() >= 2:
        m = m.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif p["mask_layout"] == "sliced":
        big = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=m.dtype)
        big[..., ::2] = m
        m = big[..., ::2]
    return m


# ----------------------------------------------------------------------------------- the check
class _FakePre:
    """Stands in for bwd._bwd_preprocess_kernel: writes a given delta [B, H, Lq]."""

    def __init__(self, delta):
        self.delta = delta

    def __getitem__(self, grid):
        def launch(out, do, delta, *args, **kwargs):
            delta.copy_(self.delta.reshape(delta.shape))
        return launch


def rule(name, got, r64, rlp, fails, info, factor=2.0, slack=1e-5):
    finite = bool(torch.isfinite(got).all())
    err = (got.double() - r64.double()).abs().max().item() if got.numel() else 0.0
    base = (rlp.double() - r64.double()).abs().max().item() if got.numel() else 0.0
    info[name] = (err, base)
    if not finite:
        fails.append({"check": name, "kind": "nonfinite", "nan": int(torch.isnan(got).sum()),
                      "inf": int(torch.isinf(got).sum())})
    elif not err <= factor * base + slack:
        fails.append({"check": name, "kind": "rule", "err": err, "base": base,
                      "ratio": (err - slack) / base if base > 0 else float("inf")})


def run_case(p, exact_delta=False):
    dtype = DTYPES[p["dtype"]]
    gen = torch.Generator().manual_seed(p["idx"])
    B, H, Hkv, Lq, Lk, D, M = p["B"], p["H"], p["Hkv"], p["Lq"], p["Lk"], p["D"], p["M"]
    q_leaf, q_view = make_leaf((B, H, Lq, D), p["q_layout"], gen, dtype)
    k_leaf, k_view = make_leaf((B, Hkv, Lk, D), p["k_layout"], gen, dtype)
    v_leaf, v_view = make_leaf((B, Hkv, Lk, D), p["v_layout"], gen, dtype)
    ids = make_ids(p, gen)
    # rotation
    rot = rot64 = None
    rdt = DTYPES[p["rot_dtype"]]
    if p["rotation"] == "dense":
        R = torch.linalg.qr(torch.randn(H, D, D, generator=gen, dtype=torch.float64))[0]
        rot, rot64 = R.to(rdt), R.to(rdt).double()
    elif p["rotation"] == "dense_plane":
        R = plane_rotations(H, D, p["rot_planes"], gen)
        rot, rot64 = R.to(rdt), R.to(rdt).double()
    elif p["rotation"] == "lowrank":
        R = plane_rotations(H, D, p["rot_planes"], gen).float()
        rot = rot64 = low_rank_rotation(R)
    # rotate_rows
    rr = {"none": None, "int": p["rows_n"], "int_all": Lq}[p["rotate_rows"]] if p["rotate_rows"] in (
        "none", "int", "int_all") else None
    if p["rotate_rows"] == "mask1d":
        rr = torch.rand(Lq, generator=gen) < p["rows_p"]
    elif p["rotate_rows"] == "mask2d":
        rr = torch.rand(B, Lq, generator=gen) < p["rows_p"]
    mask = make_mask(p, gen, dtype)
    do_base = torch.randn(B, H, Lq, D, generator=gen).to(dtype)
    if p["do_layout"] == "transposed":
        do = do_base.transpose(1, 2).contiguous().transpose(1, 2)
    elif p["do_layout"] == "row_stride0":
        do = do_base[:, :, :1].expand(B, H, Lq, D)
    else:
        do = do_base

    grad_flags = (p["grad_q"], p["grad_k"], p["grad_v"])
    leaves = [t.clone().requires_grad_(g) for t, g in zip((q_leaf, k_leaf, v_leaf), grad_flags)]
    mask_in = mask
    if p["mask_grad"]:
        mask_in = mask.detach().requires_grad_()  # a leaf with the mask's own (maybe strided) layout
    wants_grad = any(grad_flags) or p["mask_grad"]

    keep = None
    if p["dropout_p"] > 0:
        torch.manual_seed(p["idx"])
        keep = keep_mask(dropout_seed(q_leaf.device), B, H, Lq, Lk, p["dropout_p"])
    def ref(dt, r):
        ls = [t.detach().to(dt).requires_grad_(g) for t, g in zip((q_leaf, k_leaf, v_leaf), grad_flags)]
        mm = mask
        if p["mask_grad"]:
            mm = mask.detach().to(dt if dt == torch.float64 else mask.dtype).requires_grad_()
        elif mask is not None and mask.is_floating_point() and dt == torch.float64:
            mm = mask.double()
        o, s = rollingq_attention_reference(q_view(ls[0]), k_view(ls[1]), v_view(ls[2]), ids, M, r, rr, p["causal"],
                                            p["scale"], True, p["dropout_p"], dropout_mask=keep, attn_mask=mm)
        gl = [t for t, g in zip(ls, grad_flags) if g] + ([mm] if p["mask_grad"] else [])
        gs = torch.autograd.grad(o, gl, do.to(dt)) if wants_grad else ()
        return o, gs, s, mm

    o64, g64, s64, m64 = ref(torch.float64, rot64)
    olp, glp, slp, _ = ref(dtype, rot)
    fake_delta = None
    if exact_delta == "consistent" and rot is not None and rr is not None:
        # delta from the exact output of the queries the kernel actually used: rotated in float32 and
        # rounded to the input dtype (q' is what the kernel's p is computed from)
        from rollingq.reference import rotate_queries
        from rollingq.validation import rotate_row_mask
        rot32 = rot.dense(torch.float32) if isinstance(rot, LowRankRotation) else rot.float()
        if dtype != torch.float32 and p["path"] == "default":  # in-kernel rotation: R goes into the dot in q's dtype
            rot32 = rot32.to(dtype).float()
        qr = rotate_queries(q_view(q_leaf).float(), rot32, rotate_row_mask(rr, B, Lq, q_leaf.device)).to(dtype)
        mm = mask.double() if (mask is not None and mask.is_floating_point()) else mask
        oc, _ = rollingq_attention_reference(qr.double(), k_view(k_leaf.double()), v_view(v_leaf.double()), ids, M,
                                             None, None, p["causal"], p["scale"], False, p["dropout_p"],
                                             dropout_mask=keep, attn_mask=mm)
        fake_delta = (do.double() * oc).sum(-1).float()
    elif exact_delta:  # the backward's delta = do . out from the exact output instead of the kernel's rounded one
        fake_delta = (do.double() * o64.detach()).sum(-1).float()

    mp = MonkeyPatch()
    was_det = torch.are_deterministic_algorithms_enabled()
    fails, info = [], {}
    previous_backend = set_cpu_backend("interpreter")
    try:
        mp.setattr(common, "new_buffer", poisoned_buffer)
        if p["path"] == "d_split":
            force_d_split(mp)
        elif p["path"] == "wide":
            force_wide_split(mp)
        if not p["tma"]:
            mp.setattr(attention_fwd, "USE_TMA", False)
            mp.setattr(bwd, "USE_TMA", False)
        if p["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if fake_delta is not None:
            mp.setattr(bwd, "_bwd_preprocess_kernel", _FakePre(fake_delta))
        q_in, k_in, v_in = q_view(leaves[0]), k_view(leaves[1]), v_view(leaves[2])
        assert uses_kernel(q_in.device)
        torch.manual_seed(p["idx"])
        try:
            out, st = rollingq.rollingq_attention(q_in, k_in, v_in, ids, M, rotation=rot, rotate_rows=rr,
                                                  causal=p["causal"], scale=p["scale"], stats=p["stats"],
                                                  dropout_p=p["dropout_p"], attn_mask=mask_in)
            grads = None
            if wants_grad:
                g_leaves = [t for t, g in zip(leaves, grad_flags) if g] + ([mask_in] if p["mask_grad"] else [])
                grads = torch.autograd.grad(out, g_leaves, do)
        except Exception as e:  # noqa: BLE001
            fails.append({"check": "exception", "kind": type(e).__name__, "msg": str(e)[:500],
                          "tb": traceback.format_exc()[-1500:]})
            return fails, info
    finally:
        mp.undo()
        torch.use_deterministic_algorithms(was_det)
        set_cpu_backend(previous_backend)

    # shapes / dtypes
    if out.shape != (B, H, Lq, D) or out.dtype != dtype:
        fails.append({"check": "out_meta", "kind": "meta", "msg": f"{tuple(out.shape)} {out.dtype}"})
    if (st is None) != (not p["stats"]):
        fails.append({"check": "stats_none", "kind": "meta"})

    rule("out", out, o64, olp, fails, info)
    names = [n for n, g in zip(("dq", "dk", "dv"), grad_flags) if g]
    if wants_grad:
        for j, name in enumerate(names):
            if grads[j].shape != g64[j].shape or grads[j].dtype != dtype:
                fails.append({"check": name + "_meta", "kind": "meta", "msg": f"{tuple(grads[j].shape)} {grads[j].dtype}"})
            rule(name, grads[j], g64[j], glp[j], fails, info)
        if p["mask_grad"]:
            gm = grads[-1]
            if gm.shape != mask.shape or gm.dtype != mask.dtype:
                fails.append({"check": "dmask_meta", "kind": "meta", "msg": f"{tuple(gm.shape)} {gm.dtype}"})
            ids2 = ids.expand(B, Lk) if ids.dim() == 1 else ids
            qd, kd = q_view(q_leaf.double()), k_view(k_leaf.double())
            p64 = attention_probs(qd, kd, ids2, rot64, rr, p["causal"], p["scale"], mask.detach().double())
            row = (do.double() * (out.detach().double() - o64.detach())).sum(-1).abs()
            dterm = (p64 * row[..., None]).sum_to_size(mask.shape)
            err = (gm.double() - g64[-1].double()).abs().max().item()
            base = (glp[-1].double() - g64[-1].double()).abs().max().item()
            info["dmask"] = (err, base)
            try:
                assert_bias_grad_close(gm, g64[-1], glp[-1], dterm)
            except AssertionError as e:
                excess = ((gm.double() - g64[-1].double()).abs() - 2 * dterm).max().item()
                fails.append({"check": "dmask", "kind": "rule" if torch.isfinite(gm).all() else "nonfinite",
                              "err": err, "base": base, "excess": excess, "msg": str(e)[:300]})
    if p["stats"] and st is not None:
        tol = stats_tol(dtype)
        em = (st.attn_mass.double() - s64.attn_mass.double()).abs().max().item() if st.attn_mass.numel() else 0.0
        ek = (st.key_sum.double() - s64.key_sum.double()).abs().max().item() if st.key_sum.numel() else 0.0
        info["mass"], info["key_sum"] = em, ek
        info["mass_lowp_ref"] = (slp.attn_mass.double() - s64.attn_mass.double()).abs().max().item()
        if not torch.isfinite(st.attn_mass).all() or not em <= tol:
            fails.append({"check": "attn_mass", "kind": "stats", "err": em, "tol": tol,
                          "lowp_ref_err": info["mass_lowp_ref"]})
        if not torch.isfinite(st.key_sum).all() or not ek <= tol:
            ks_rel = ek / max(s64.key_sum.abs().max().item(), 1e-30)
            fails.append({"check": "key_sum", "kind": "stats", "err": ek, "tol": tol, "rel": ks_rel})
        if not torch.equal(st.key_count.cpu().long(), s64.key_count.cpu().long()):
            fails.append({"check": "key_count", "kind": "stats"})
        if st.attn_mass.shape != (B, H, Lq, M) or st.key_sum.shape != (B, Hkv, M, D):
            fails.append({"check": "stats_meta", "kind": "meta"})
    return fails, info


def summary(p):
    keys = ["dtype", "B", "H", "Hkv", "Lq", "Lk", "D", "M", "causal", "ids_form", "pad", "rotation", "rotate_rows",
            "scale", "stats", "dropout_p", "mask_kind", "mask_shape", "mask_grad", "q_layout", "k_layout", "v_layout",
            "path", "tma"]
    short = []
    for k in keys:
        v = p[k]
        short.append(f"{k}={v}")
    return " ".join(short)


def main():
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        return
    args = [a for a in sys.argv[1:] if not a.startswith("--")]  # START SECONDS
    start = int(args[0]) if args else 0
    deadline = float(args[1]) if len(args) > 1 else 35 * 60
    only = None
    for a in sys.argv[1:]:
        if a.startswith("--only="):
            only = [int(x) for x in a.split("=", 1)[1].split(",")]
    out_path = "fuzz_failures.jsonl"
    for a in sys.argv[1:]:
        if a.startswith("--out="):
            out_path = a.split("=", 1)[1]
    t0 = time.time()
    i = start
    n_run = n_fail = 0
    indices = iter(only) if only is not None else None
    while True:
        if indices is not None:
            try:
                i = next(indices)
            except StopIteration:
                break
        elif time.time() - t0 > deadline:
            break
        p = draw_params(i)
        tc = time.time()
        try:
            fails, info = run_case(p)
        except Exception as e:  # noqa: BLE001  (harness error)
            fails, info = [{"check": "harness", "kind": type(e).__name__, "msg": str(e)[:500],
                            "tb": traceback.format_exc()[-2000:]}], {}
        grad_rule = [f for f in fails if f["check"] in ("dq", "dk", "dv", "dmask") and f["kind"] == "rule"]
        if grad_rule and not any(f["kind"] in ("nonfinite",) or f["check"] in ("exception", "harness") for f in fails):
            try:
                f2, info2 = run_case(p, exact_delta=True)
                for f in grad_rule:
                    f["exact_delta"] = [g for g in f2 if g["check"] == f["check"]] or "passes"
                    if f["check"] in info2:
                        f["exact_delta_err"] = info2[f["check"]]
            except Exception as e:  # noqa: BLE001
                for f in grad_rule:
                    f["exact_delta"] = f"rerun failed: {e!r}"[:300]
        dt = time.time() - tc
        n_run += 1
        status = "OK  " if not fails else "FAIL"
        desc = ", ".join(f"{f['check']}:{f['kind']}" + (f"(r={f['ratio']:.2f})" if 'ratio' in f else "")
                         + (f"(e={f['err']:.2e})" if f['kind'] == 'stats' else "")
                         + ("[exactdelta:pass]" if f.get("exact_delta") == "passes" else ("[exactdelta:FAIL]" if "exact_delta" in f else ""))
                         for f in fails)
        print(f"[{i:5d}] {status} {dt:6.1f}s {summary(p)} {desc}", flush=True)
        if fails:
            n_fail += 1
            with open(out_path, "a") as fh:
                fh.write(json.dumps({"idx": i, "params": p, "fails": fails,
                                     "info": {k: v for k, v in info.items()}}, default=str) + "\n")
        if indices is None:
            i += 1
    print(f"done: {n_run} cases, {n_fail} failing, {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
