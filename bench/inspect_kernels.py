"""Compile every kernel variant and autotune config ahead of time for sm_90 (and sm_80) on a CPU
machine, and print shared memory, registers, spills and Hopper HGMMA (wgmma) counts.

    python bench/inspect_kernels.py [--arch 90,80] [--dtypes bf16,fp32] [--json out.json]

Exits 1 when any variant fails to compile, needs more shared memory than the card has, or spills
registers: such a config is dead weight in an autotune list (../shared/docs/gpu.md). Runs with
TRITON_INTERPRET unset, since the interpreter replaces the compiler.
"""
import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_PTR_DTYPE = {"*fp16": "fp16", "*bf16": "bf16", "*fp32": "fp32"}


def variants(dtypes, head_dims, arch=90):
    """(name, fn, signature, constexprs, num_warps, num_stages) for the forward and backward kernels."""
    from rollingq.kernels.attention_bwd import bwd_compile_variants
    from rollingq.kernels.attention_fwd import fwd_compile_variants

    out = list(fwd_compile_variants(head_dims=head_dims, dtypes=[DTYPES[d] for d in dtypes], arch=arch))
    for fn, sig, cx, w, s in bwd_compile_variants(head_dims=head_dims):
        t = _PTR_DTYPE.get(sig.get("Q") or sig.get("O"), "?")
        if t not in dtypes:
            continue
        name = (f"bwd {fn.__name__.strip('_')} D{cx['HEAD_D']} {t} BM{cx.get('BLOCK_M', '-')} "
                f"BN{cx.get('BLOCK_N', '-')} w{w} s{s}")
        out.append((name, fn, sig, cx, w, s))
    return out


def _one(args):
    index, arch, dtypes, head_dims = args
    from rollingq.kernels.aot import compile_report

    return compile_report(*variants(dtypes, head_dims, arch)[index], arch=arch)


def run(archs, dtypes, head_dims, workers=2):
    jobs = [(i, a, dtypes, head_dims) for a in archs for i in range(len(variants(dtypes, head_dims, a)))]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_one, jobs))


def bad(rep) -> bool:
    return bool(rep["error"]) or rep.get("over_shared", False) or rep.get("spill_bytes", 0) > 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90,80", help="comma-separated compute capabilities")
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    ap.add_argument("--head-dims", default="64,128,256,768")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", help="write the reports here")
    a = ap.parse_args(argv)
    archs = [int(x) for x in a.arch.split(",")]
    dtypes = a.dtypes.split(",")
    head_dims = tuple(int(x) for x in a.head_dims.split(","))
    reports = run(archs, dtypes, head_dims, a.workers)
    print(f"{'variant':<52} {'sm':>3} {'smem KB':>8} {'regs':>5} {'spill B':>8} {'wgmma':>6}  status")
    for r in reports:
        status = "ERROR " + r["error"] if r["error"] else ("OVER SHARED" if r.get("over_shared") else
                                                          ("SPILLS" if r.get("spill_bytes") else "ok"))
        smem = f"{r['shared'] / 1024:.0f}" if r.get("shared") is not None else "-"
        print(f"{r['name']:<52} {r['arch']:>3} {smem:>8} {r.get('regs') or '-':>5} "
              f"{r.get('spill_bytes', '-'):>8} {r.get('hgmma', '-'):>6}  {status}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(reports, f, indent=1)
    failed = [r for r in reports if bad(r)]
    print(f"{len(reports)} variants, {len(failed)} bad")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
