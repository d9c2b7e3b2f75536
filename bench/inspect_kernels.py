"""Compile every kernel launch and autotune config ahead of time for sm_90 (and sm_80) on a CPU
machine, and print shared memory, registers, spills and Hopper HGMMA (wgmma) counts.

    python bench/inspect_kernels.py [--arch 90,80] [--dtypes bf16,fp32] [--only NAME] [--json out.json] [--list]
                                    [--sass]

The launches are those of real problems (launches.CHECK_PROBLEMS: every head-dim class and path,
rotation, statistics and backward on), recorded from the launchers and compiled with the argument
specialisation Triton gives them at run time (bench/launches.py), so the report describes the
kernels a GPU would run. Identical compiles are done once. --sass adds static SASS instruction
counts (cuobjdump, bundled with Triton): the total and the softmax's element-wise opcodes, to see
what a change to the score loop adds before a GPU times it (kernels/aot.sass_counts).

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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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


def bad(rep) -> bool:
    return bool(rep["error"]) or rep.get("over_shared", False) or rep.get("spill_bytes", 0) > 0


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
    a = ap.parse_args(argv)
    archs = [int(x) for x in a.arch.split(",")]
    dtypes = a.dtypes.split(",")
    problems = [p for p in CHECK_PROBLEMS if not a.only or a.only in p.name]
    if a.list:
        print(json.dumps([describe(j, arch) for arch in archs for j in compile_jobs(problems, dtypes, arch)],
                         indent=1))
        return 0
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
    failed = [r for r in reports if bad(r)]
    print(f"{len(reports)} variants, {len(failed)} bad")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
