"""Compile every kernel launch and autotune config ahead of time for sm_90 (and sm_80) on a CPU
machine, and print shared memory, registers, spills and Hopper HGMMA (wgmma) counts.

    python bench/inspect_kernels.py [--arch 90,80] [--dtypes bf16,fp32] [--only NAME] [--json out.json] [--list]
                                    [--sass]
    python bench/inspect_kernels.py --record     # the whole matrix; writes bench/aot_record.json if clean

The launches are those of real problems (launches.CHECK_PROBLEMS: every head-dim class and path,
rotation, statistics and backward on), recorded from the launchers and compiled with the argument
specialisation Triton gives them at run time (bench/launches.py), so the report describes the
kernels a GPU would run. Identical compiles are done once. --sass adds static SASS instruction
counts (cuobjdump, bundled with Triton): the total and the softmax's element-wise opcodes, to see
what a change to the score loop adds before a GPU times it (kernels/aot.sass_counts).

Exits 1 when any variant fails to compile, needs more shared memory than the card has, or spills
registers: such a config is dead weight in an autotune list (../shared/docs/gpu.md). Runs with
TRITON_INTERPRET unset, since the interpreter replaces the compiler. After any change to the kernels
or their launches run `--record` (sm_90 and sm_80, fp16, bf16 and fp32: ~25 min on 2 cores); the
suite fails until the record's key matches the tree (bench/aot_record.py).
"""
import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import aot_record  # noqa: E402
from launches import CHECK_PROBLEMS, compile_jobs, jit_function, portable  # noqa: E402


def describe(job, arch: int) -> dict:
    """A compile job as plain data: what `--list` prints."""
    name, fn, sig, cx, attrs, w, s = job
    hinted = [fn.arg_names[i] for (i,), a in attrs.items() if ["tt.divisibility", 16] in a]
    return {"name": name, "arch": arch, "kernel": fn.__name__, "signature": sig,
            "constexprs": {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in cx.items()},
            "divisible_by_16": hinted, "num_warps": w, "num_stages": s}


def _one(job):
    (name, (module, fn_name), sig, cx, attrs, w, s), arch, sass = job
    from rollingq.kernels.aot import compile_report

    return compile_report(name, jit_function(module, fn_name), sig, cx, w, s, arch=arch, attrs=attrs, sass=sass)


def run(archs, dtypes, workers=2, problems=CHECK_PROBLEMS, sass=False):
    jobs = [(portable(j), a, sass) for a in archs for j in compile_jobs(problems, dtypes, a)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_one, jobs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90,80", help="comma-separated compute capabilities")
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", help="the problems whose name contains this string (default: all)")
    ap.add_argument("--json", help="write the reports here")
    ap.add_argument("--list", action="store_true",
                    help="print the variants (signature, constants, divisibility hints) as JSON; compile nothing")
    ap.add_argument("--sass", action="store_true", help="also print static SASS instruction counts")
    ap.add_argument("--key", action="store_true",
                    help="print the record key of the whole matrix (bench/aot_record.py); compile nothing")
    ap.add_argument("--record", nargs="?", const=aot_record.RECORD, metavar="PATH",
                    help="compile the whole matrix and, if nothing is bad, write the record (default %(const)s)")
    a = ap.parse_args(argv)
    if a.record or a.key:
        if a.only or a.arch != ap.get_default("arch") or a.dtypes != ap.get_default("dtypes"):
            ap.error("--record and --key cover every arch and dtype: no --only, --arch or --dtypes")
        a.arch, a.dtypes = ",".join(map(str, aot_record.FULL_ARCHS)), ",".join(aot_record.FULL_DTYPES)
    archs = [int(x) for x in a.arch.split(",")]
    dtypes = a.dtypes.split(",")
    problems = [p for p in CHECK_PROBLEMS if not a.only or a.only in p.name]
    if a.list or a.key or a.record:
        variants = [describe(j, arch) for arch in archs for j in compile_jobs(problems, dtypes, arch)]
        if a.list:
            print(json.dumps(variants, indent=1))
            return 0
        import triton

        key = aot_record.record_key(variants, triton.__version__)
        if a.key:
            print(key)
            return 0
    start = time.time()
    reports = run(archs, dtypes, a.workers, problems, a.sass)
    print(f"{'variant':<66} {'sm':>3} {'smem KB':>8} {'regs':>5} {'spill B':>8} {'wgmma':>6}  status")
    for r in reports:
        status = "ERROR " + r["error"] if r["error"] else ("OVER SHARED" if r.get("over_shared") else
                                                          ("SPILLS" if r.get("spill_bytes") else "ok"))
        smem = f"{r['shared'] / 1024:.0f}" if r.get("shared") is not None else "-"
        print(f"{r['name']:<66} {r['arch']:>3} {smem:>8} {r.get('regs') or '-':>5} "
              f"{r.get('spill_bytes', '-'):>8} {r.get('hgmma', '-'):>6}  {status}")
        if r.get("sass"):
            print("    sass: " + " ".join(f"{k}={v}" for k, v in r["sass"].items() if v))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(reports, f, indent=1)
    failed = [r for r in reports if aot_record.bad(r)]
    print(f"{len(reports)} variants, {len(failed)} bad")
    if a.record:
        from rollingq.kernels.aot import SHARED_FLOOR

        wrong = [w for arch in archs for w in aot_record.report_problems(reports, arch, SHARED_FLOOR[arch])]
        print("\n".join(wrong))
        if wrong or len(reports) != len(variants):  # wrong includes every bad variant
            print(f"record NOT written: {len(wrong)} problems, {len(reports)} of {len(variants)} variants compiled")
            return 1
        counts = {}
        for r in reports:
            k = f"sm_{r['arch']} {r['name'].split()[1]} {r['name'].split()[0]}"
            counts[k] = counts.get(k, 0) + 1
        with open(a.record, "w") as f:
            json.dump({"key": key, "archs": archs, "dtypes": dtypes, "triton": triton.__version__,
                       "variants": len(reports), "bad": 0, "compile_wall_s": round(time.time() - start),
                       "date": time.strftime("%Y-%m-%d"), "variants_by_arch_dtype_kernel": dict(sorted(counts.items()))},
                      f, indent=1)
            f.write("\n")
        print(f"record written: {a.record}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
