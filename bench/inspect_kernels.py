"""Compile every kernel launch and autotune config ahead of time for sm_90 (and sm_80) on a CPU
machine, and print shared memory, registers, spills and Hopper HGMMA (wgmma) counts.

    python bench/inspect_kernels.py [--arch 90,80] [--dtypes bf16,fp32] [--json out.json] [--list]

The launchers are driven with CPU tensors of real problems (the SPECIMENS below: the benchmark
shapes at batch 1, plus a GQA and a D 256 problem), all rows rotated, statistics on, gradients
wanted; their kernel launches are recorded instead of run (kernels/aot.py). Each recorded launch
is compiled for every autotune config its pruner keeps, with the argument specialisation Triton
gives it at run time (strides equal to 1 become constants, multiples of 16 carry divisibility
hints), so the report describes the kernels a GPU would run. Identical compiles are done once.

Exits 1 when any variant fails to compile, needs more shared memory than the card has, or spills
registers: such a config is dead weight in an autotune list (../shared/docs/gpu.md). Runs with
TRITON_INTERPRET unset, since the interpreter replaces the compiler.
"""
import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import List, NamedTuple

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Specimen(NamedTuple):
    name: str
    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    head_dim: int
    causal: bool
    modalities: int


SPECIMENS = (
    Specimen("paper_L907_D768", 1, 1, 1, 907, 768, False, 3),
    Specimen("H12_L907_D64", 1, 12, 12, 907, 64, False, 3),
    Specimen("H16_L4096_D128", 1, 16, 16, 4096, 128, False, 2),
    Specimen("H16_L8192_D64", 1, 16, 16, 8192, 64, False, 2),
    Specimen("H32_L8192_D128_causal", 1, 32, 32, 8192, 128, True, 2),
    Specimen("gqa_H8_Hkv2_L1024_D128_causal", 1, 8, 2, 1024, 128, True, 2),
    Specimen("H4_L2048_D256", 1, 4, 4, 2048, 256, False, 2),
)


def _launches(sp: Specimen, dtype: torch.dtype):
    """The forward and backward kernel launches of one training step on `sp`, recorded, not run."""
    from rollingq.kernels import attention_bwd as bwd
    from rollingq.kernels import attention_fwd as fwd
    from rollingq.kernels.aot import captured_launches

    B, H, Hkv, L, D = sp.batch, sp.heads, sp.kv_heads, sp.seq_len, sp.head_dim
    q = torch.empty(B, H, L, D, dtype=dtype)
    k = torch.empty(B, Hkv, L, D, dtype=dtype)
    v = torch.empty(B, Hkv, L, D, dtype=dtype)
    ids = torch.arange(L, dtype=torch.int32).remainder(sp.modalities).expand(B, L)  # as functional.py passes them
    rotation = torch.eye(D).expand(H, D, D).contiguous()
    rot_mask = torch.ones(B, L, dtype=torch.uint8)
    with captured_launches(fwd, ["_rollingq_fwd_kernel"]) as rec:
        out, lse, q_rot, _, _ = fwd.rollingq_fwd(q, k, v, ids, sp.modalities, rotation, rot_mask, sp.causal,
                                                 D ** -0.5, True, True)
    with captured_launches(bwd, ["_bwd_preprocess_kernel", "_bwd_dkdv", "_bwd_dq"]) as rec_b:
        bwd.attention_bwd(torch.empty_like(out), q_rot.contiguous(), k, v, out, lse, ids, sp.causal, D ** -0.5,
                          rotation, rot_mask)
    return rec + rec_b


def _short(fn_name: str) -> str:
    return {"_rollingq_fwd_kernel": "fwd", "_bwd_preprocess_kernel": "bwd_pre", "_bwd_dkdv_kernel": "bwd_dkdv",
            "_bwd_dq_kernel": "bwd_dq"}.get(fn_name, fn_name)


def variants(dtypes, arch=90, specimens=SPECIMENS) -> List[tuple]:
    """(name, fn, signature, constexprs, attrs, num_warps, num_stages) per distinct compile; the
    launchers and the autotuners' pruners plan for `arch` as they would on that card."""
    from rollingq.kernels import common

    common.TARGET_ARCH = arch
    try:
        return _variants(dtypes, specimens)
    finally:
        common.TARGET_ARCH = None


def _variants(dtypes, specimens) -> List[tuple]:
    seen, out = set(), []
    for dname in dtypes:
        for sp in specimens:
            for launch in _launches(sp, DTYPES[dname]):
                for cfg in launch.configs():
                    sig, cx, attrs = launch.specialization(cfg)
                    key = (launch.fn.__name__, tuple(sig.items()), tuple(sorted(cx.items())),
                           tuple(sorted(attrs)), cfg.num_warps, cfg.num_stages)
                    if key in seen:
                        continue
                    seen.add(key)
                    tile = f"BM{cx['BLOCK_M']} BN{cx['BLOCK_N']} " if "BLOCK_N" in cx else ""
                    name = f"{_short(launch.fn.__name__)} {dname} {sp.name} {tile}w{cfg.num_warps} s{cfg.num_stages}"
                    out.append((name, launch.fn, sig, cx, attrs, cfg.num_warps, cfg.num_stages))
    return out


def describe(variant, arch: int) -> dict:
    """A variant as plain data: what `--list` prints."""
    name, fn, sig, cx, attrs, w, s = variant
    hinted = [fn.arg_names[i] for (i,), a in attrs.items() if ["tt.divisibility", 16] in a]
    return {"name": name, "arch": arch, "kernel": fn.__name__, "signature": sig,
            "constexprs": {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in cx.items()},
            "divisible_by_16": hinted, "num_warps": w, "num_stages": s}


def _jit_function(module: str, name: str):
    """The JITFunction `name` of `module`, found again in a worker process (they do not pickle)."""
    import importlib

    import triton

    for obj in vars(importlib.import_module(module)).values():
        fn = getattr(obj, "fn", None) if isinstance(obj, triton.runtime.autotuner.Autotuner) else obj
        if isinstance(fn, triton.runtime.jit.JITFunction) and fn.__name__ == name:
            return fn
    raise LookupError(f"no kernel {name} in {module}")


def _one(job):
    name, (module, fn_name), sig, cx, attrs, w, s, arch = job
    from rollingq.kernels.aot import compile_report

    return compile_report(name, _jit_function(module, fn_name), sig, cx, w, s, arch=arch, attrs=attrs)


def run(archs, dtypes, workers=2):
    jobs = [(name, (fn.fn.__module__, fn.__name__), sig, cx, attrs, w, s, a)
            for a in archs for name, fn, sig, cx, attrs, w, s in variants(dtypes, a)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_one, jobs))


def bad(rep) -> bool:
    return bool(rep["error"]) or rep.get("over_shared", False) or rep.get("spill_bytes", 0) > 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90,80", help="comma-separated compute capabilities")
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", help="write the reports here")
    ap.add_argument("--list", action="store_true",
                    help="print the variants (signature, constants, divisibility hints) as JSON; compile nothing")
    a = ap.parse_args(argv)
    archs = [int(x) for x in a.arch.split(",")]
    dtypes = a.dtypes.split(",")
    if a.list:
        print(json.dumps([describe(v, arch) for arch in archs for v in variants(dtypes, arch)], indent=1))
        return 0
    reports = run(archs, dtypes, a.workers)
    print(f"{'variant':<66} {'sm':>3} {'smem KB':>8} {'regs':>5} {'spill B':>8} {'wgmma':>6}  status")
    for r in reports:
        status = "ERROR " + r["error"] if r["error"] else ("OVER SHARED" if r.get("over_shared") else
                                                          ("SPILLS" if r.get("spill_bytes") else "ok"))
        smem = f"{r['shared'] / 1024:.0f}" if r.get("shared") is not None else "-"
        print(f"{r['name']:<66} {r['arch']:>3} {smem:>8} {r.get('regs') or '-':>5} "
              f"{r.get('spill_bytes', '-'):>8} {r.get('hgmma', '-'):>6}  {status}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(reports, f, indent=1)
    failed = [r for r in reports if bad(r)]
    print(f"{len(reports)} variants, {len(failed)} bad")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
