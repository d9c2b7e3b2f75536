"""Compile, in parallel, every kernel bench/gpu_check.sh will launch, into Triton's cache.

    python bench/precompile.py [--workers N] [--dtypes bf16,fp16,fp32] [--dry-run | --list] [--limit N]
    python bench/precompile.py --verify-keys

Triton's autotuner compiles each config of each new autotune key in turn, on the clock of the
check: with the config tables of kernels/ that is a few hundred sequential compiles across the
CUDA parity tests and the benchmarks. The jobs here are the same compiles (bench/launches.py:
recorded launches, run-time argument specialisation, pruned config lists for this machine's GPU),
spread over the CPU cores; each lands in Triton's on-disk cache under the key the JIT computes at
launch, so the launch finds it there. A job that fails or a key that does not match costs only
the time spent here: the launch then compiles as it always did.

Only what the check launches is built (launches.gpu_check_plan): the parity tests' kernels in every
dtype first (they run first, and the step may be cut short), then the benchmarks' in bf16, in the
order the bench runs them, at their real batch.
"""
import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rollingq.kernels.common import target_arch  # noqa: E402
from launches import (BENCH_DTYPES, bench_problems, gpu_check_plan, jit_function, only_dtypes,  # noqa: E402
                      plan_jobs, plan_key_mismatches, portable, uncovered_launches)

MAX_WORKERS = 16  # the GPU machines have 16 cores


def default_workers() -> int:
    """The CPUs this process may run on (its affinity, not the machine's count), at most MAX_WORKERS."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 2
    return max(1, min(MAX_WORKERS, n))


def _compile(job) -> str:
    (name, (module, fn_name), sig, cx, attrs, w, s), cap = job
    from rollingq.kernels.aot import compile_for

    try:
        compile_for(jit_function(module, fn_name), sig, cx, attrs, w, s, cap)
    except Exception as e:  # reported, never fatal: the launch would compile (and fail) the same way
        return f"FAILED {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return ""


def verify_keys(dtypes=None, cap: int = 90) -> int:
    """Exit status 1 unless every job lands under the JIT's cache key and the jobs cover the
    benchmarks' launches at their real batch (not only at the batch they are recorded at)."""
    plan = only_dtypes(gpu_check_plan(), dtypes)
    bad = plan_key_mismatches(plan, cap)
    for m in bad:
        print("cache key differs:", m)
    print(f"{len(bad)} launches whose precompiled kernel the JIT would not find")
    real = only_dtypes([(bench_problems(None), BENCH_DTYPES)], dtypes)
    missing = uncovered_launches(plan, real, cap // 10 * 10)
    for m in missing:
        print("not precompiled:", m)
    print(f"{len(missing)} benchmark launches at the real batch that precompile does not build")
    return 1 if bad or missing else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--dtypes", help="only these dtypes (default: each part's own, launches.gpu_check_plan)")
    ap.add_argument("--dry-run", action="store_true", help="count the jobs, compile nothing (any machine)")
    ap.add_argument("--list", action="store_true", help="print the jobs in build order, compile nothing")
    ap.add_argument("--cap", type=int, help="compile for this compute capability (e.g. 90) even without its GPU; "
                                            "default: this machine's GPU")
    ap.add_argument("--limit", type=int, help="compile only the first N jobs (a test of the compile path)")
    ap.add_argument("--verify-keys", action="store_true",
                    help="check, on any machine, that every job lands under the JIT's cache key and that the "
                         "jobs cover the benchmarks at their real batch; exit 1 if not")
    a = ap.parse_args(argv)
    dtypes = a.dtypes.split(",") if a.dtypes else None
    import torch

    if a.verify_keys:
        return verify_keys(dtypes)

    start = time.time()
    if a.cap is None and not (a.dry_run or a.list) and not torch.cuda.is_available():
        print("no CUDA device and no --cap: nothing compiled")
        return 0
    cap = a.cap if a.cap is not None else (
        (lambda mj, mn: mj * 10 + mn)(*torch.cuda.get_device_capability()) if torch.cuda.is_available() else 90)
    plan = only_dtypes(gpu_check_plan(), dtypes)
    # The plan the launchers will take on this card (capability and shared memory), or by --cap alone.
    arch = target_arch() if a.cap is None else (90 if cap >= 90 else 80)
    parts = [len(plan_jobs(plan[:1], arch))]
    jobs = plan_jobs(plan, arch)
    print(f"{len(jobs)} distinct compiles ({parts[0]} for the parity tests first, {len(jobs) - parts[0]} for the "
          f"benchmarks; {time.time() - start:.1f} s to record)")
    jobs = jobs[:a.limit] if a.limit is not None else jobs
    if a.list:
        for j in jobs:
            print(j[0])
    if a.dry_run or a.list:
        return 0
    # spawn, not fork: this process has initialised CUDA, which a forked child must not inherit.
    # Jobs start in list order, so a cut-short run has built the parity tests' kernels.
    with ProcessPoolExecutor(max_workers=a.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        failures = [m for m in pool.map(_compile, [(portable(j), cap) for j in jobs]) if m]
    for m in failures:
        print(m)
    print(f"compiled {len(jobs) - len(failures)} of {len(jobs)} for sm_{cap} with {a.workers} workers "
          f"in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
