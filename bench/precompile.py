"""Compile, in parallel, every kernel bench/gpu_check.sh will launch, into Triton's cache.

    python bench/precompile.py [--workers N] [--dtypes bf16,fp16,fp32] [--dry-run] [--limit N]

Triton's autotuner compiles each config of each new autotune key in turn, on the clock of the
check: with the config tables of kernels/ that is a few hundred sequential compiles across the
CUDA parity tests and the benchmarks. The jobs here are the same compiles (bench/launches.py:
recorded launches, run-time argument specialisation, pruned config lists for this machine's GPU),
spread over the CPU cores; each lands in Triton's on-disk cache under the key the JIT computes at
launch, so the launch finds it there. A job that fails or a key that does not match costs only
the time spent here: the launch then compiles as it always did.
"""
import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from launches import compile_jobs, gpu_check_problems, jit_function, jit_key_mismatches, portable  # noqa: E402


def _compile(job) -> str:
    (name, (module, fn_name), sig, cx, attrs, w, s), cap = job
    from rollingq.kernels.aot import compile_for

    try:
        compile_for(jit_function(module, fn_name), sig, cx, attrs, w, s, cap)
    except Exception as e:  # reported, never fatal: the launch would compile (and fail) the same way
        return f"FAILED {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--dry-run", action="store_true", help="count the jobs, compile nothing (any machine)")
    ap.add_argument("--cap", type=int, help="compile for this compute capability (e.g. 90) even without its GPU; "
                                            "default: this machine's GPU")
    ap.add_argument("--limit", type=int, help="compile only the first N jobs (a test of the compile path)")
    ap.add_argument("--verify-keys", action="store_true",
                    help="check, on any machine, that every job lands under the JIT's cache key; exit 1 if not")
    a = ap.parse_args(argv)
    import torch

    if a.verify_keys:
        bad = jit_key_mismatches(gpu_check_problems(), a.dtypes.split(","))
        for m in bad:
            print("cache key differs:", m)
        print(f"{len(bad)} launches whose precompiled kernel the JIT would not find")
        return 1 if bad else 0

    start = time.time()
    if a.cap is None and not a.dry_run and not torch.cuda.is_available():
        print("no CUDA device and no --cap: nothing compiled")
        return 0
    cap = a.cap if a.cap is not None else (
        (lambda mj, mn: mj * 10 + mn)(*torch.cuda.get_device_capability()) if torch.cuda.is_available() else 90)
    jobs = compile_jobs(gpu_check_problems(), a.dtypes.split(","), arch=90 if cap >= 90 else 80)
    print(f"{len(jobs)} distinct compiles ({time.time() - start:.1f} s to record)")
    jobs = jobs[:a.limit] if a.limit is not None else jobs
    if a.dry_run:
        return 0
    # spawn, not fork: this process has initialised CUDA, which a forked child must not inherit
    with ProcessPoolExecutor(max_workers=a.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        failures = [m for m in pool.map(_compile, [(portable(j), cap) for j in jobs]) if m]
    for m in failures:
        print(m)
    print(f"compiled {len(jobs) - len(failures)} of {len(jobs)} for sm_{cap} with {a.workers} workers "
          f"in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
