"""Ahead-of-time compiles of the kernel variants and autotune configs for Hopper (sm_90) and Ampere
(sm_80), on the CPU: the interpreter cannot catch what only the GPU compiler rejects (compile errors,
shared memory over the card's limit, register spills). make test compiles one problem's variants and
checks the record of the last whole-matrix compile against the tree (bench/aot_record.py)."""
import json
import os
import subprocess
import sys

import pytest

from rollingq.kernels.aot import SHARED_FLOOR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import aot_record  # noqa: E402  (plain data, no Triton)


def run_with_compiler(*args: str, timeout: int = 300, **env_extra: str):
    """Run python with the real compiler (TRITON_INTERPRET unset: the interpreter replaces it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def run_bench_script(script: str, *args: str, timeout: int = 300, **env_extra: str):
    """Run bench/<script> with the real compiler."""
    return run_with_compiler(os.path.join(ROOT, "bench", script), *args, timeout=timeout, **env_extra)


# The whole matrix (sm_90 and sm_80, fp16, bf16 and fp32: ~1200 compiles, ~25 min on 2 cores) is
# too long for make test. `inspect_kernels.py --record` compiles it and keeps a record keyed by the
# kernels' source and the variants; make test checks that key (next test), and compiles one
# problem's variants (test_sass_counts_show_the_score_loop). ROLLINGQ_FULL_AOT=1 runs the matrix
# here too, arch by arch.
_FULL = pytest.mark.skipif(os.environ.get("ROLLINGQ_FULL_AOT") != "1",
                           reason="~25 min; bench/aot_record.json holds the last run (ROLLINGQ_FULL_AOT=1 runs it)")


def test_full_compile_record_matches_the_kernels():
    """The record of the last whole-matrix compile (bench/aot_record.json) is of this tree: same
    kernels' source, same variants, same Triton, and nothing failed, spilled or ran over."""
    import triton

    rec = aot_record.load()
    assert tuple(rec["archs"]) == aot_record.FULL_ARCHS and tuple(rec["dtypes"]) == aot_record.FULL_DTYPES, rec
    assert rec["bad"] == 0 and rec["variants"] > 0 and rec["triton"] == triton.__version__, rec
    proc = run_bench_script("inspect_kernels.py", "--key")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == rec["key"], (
        "the kernels or their launches changed since bench/aot_record.json was written: run "
        "`python bench/inspect_kernels.py --record` (~25 min on 2 cores) and commit the record with the change")


@_FULL
@pytest.mark.parametrize("arch, dtypes", [("90", "bf16,fp32"), ("80", "bf16"), ("90", "fp16"), ("80", "fp16,fp32")])
def test_every_config_compiles_without_spills(arch, dtypes, tmp_path):
    out = tmp_path / "reports.json"
    proc = run_bench_script("inspect_kernels.py", "--arch", arch, "--dtypes", dtypes, "--json", str(out), timeout=1800)
    reports = json.loads(out.read_text()) if out.exists() else []
    assert reports, f"no reports:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # Each launch (kernel, dtype, problem) also offers the autotuner a config that fits the plan's
    # smallest card (the Ampere plan's 99 KB cards skip the bigger rows as out of resources).
    problems = aot_record.report_problems(reports, int(arch), SHARED_FLOOR[int(arch)])
    assert not problems, "\n".join(problems)
    assert proc.returncode == 0


def test_variants_carry_the_launch_specialisation():
    """The compiled variants are the launches a GPU would run: recorded from the launchers on real
    shapes, with Triton's run-time argument specialisation and the pruned config list per card."""
    from rollingq.kernels.attention_fwd import FWD_CONFIGS_BY_ARCH

    proc = run_bench_script("inspect_kernels.py", "--arch", "90,80", "--dtypes", "bf16", "--list")
    assert proc.returncode == 0, proc.stderr[-3000:]
    variants = json.loads(proc.stdout)
    assert {v["kernel"] for v in variants} == {"_rollingq_fwd_kernel", "_bwd_preprocess_kernel",
                                               "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_low_rank_rotate_kernel",
                                               "_dense_rows_rotate_kernel"}

    def fwd(arch, specimen):
        return [v for v in variants if v["arch"] == arch and v["kernel"] == "_rollingq_fwd_kernel"
                and f" {specimen} " in v["name"]]

    for arch in (90, 80):
        long = fwd(arch, "H16_L4096_D128")
        assert {(v["constexprs"]["BLOCK_M"], v["constexprs"]["BLOCK_N"], v["num_warps"], v["num_stages"])
                for v in long} == set(FWD_CONFIGS_BY_ARCH[arch][("16bit", 128)]
                                      + FWD_CONFIGS_BY_ARCH[arch].get(("16bit", 128, "tma"), []))
        for v in long:
            assert v["constexprs"]["s_qd"] == 1 and v["constexprs"]["s_kd"] == 1  # unit strides become constants
            assert {"s_qm", "s_kn", "Lq", "Lk", "Q", "K"} <= set(v["divisible_by_16"])
        for v in fwd(arch, "paper_L907_D768"):
            assert v["constexprs"]["SPLIT"] and not {"Lq", "Lk"} & set(v["divisible_by_16"])  # 907 is not


def test_precompile_jobs_land_under_the_jit_cache_key():
    """bench/precompile.py fills Triton's cache before the GPU check. Its jobs help only if each
    lands under the key the JIT computes at launch; recomputed through the JIT's own argument
    binder for every launch of the check (parity tests and benchmarks, all dtypes)."""
    proc = run_bench_script("precompile.py", "--verify-keys")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 launches whose precompiled kernel the JIT would not find" in proc.stdout


def test_precompile_fills_the_cache(tmp_path):
    """The parallel compile path itself (spawned workers, kernels found again by name), for sm_90
    without a GPU; the first 4 fp32 jobs (the empty cache makes every one a cold compile)."""
    proc = run_bench_script("precompile.py", "--cap", "90", "--dtypes", "fp32", "--limit", "4", timeout=600,
                            TRITON_CACHE_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = int(proc.stdout.split(" distinct compiles")[0].split()[-1])
    assert jobs > 4 and "compiled 4 of 4 for sm_90" in proc.stdout, proc.stdout
    assert len(list(tmp_path.iterdir())) >= 4  # one cache entry per compiled kernel


def test_launch_grids_fit_cuda_limits():
    """CUDA caps grid dimensions 1 and 2 at 65535; batch * heads alone passes that for many short
    sequences. Every launch of a fwd+bwd step with B * H = 80000 must stay within the limits."""
    from launches import _problem, record

    import torch
    from rollingq.kernels.grid import MAX_GRID_YZ, launch_grid

    launches = record(_problem("many_heads", 40000, 2, 2, 20, 20, 16, True, 2), torch.float32)
    assert {launch.fn.__name__ for launch in launches} == {  # fp32 rotates before the forward kernel
        "_low_rank_rotate_kernel", "_rollingq_fwd_kernel", "_bwd_preprocess_kernel", "_bwd_dkdv_kernel",
        "_bwd_dq_kernel"}
    for launch in launches:
        for cfg in launch.configs():
            x, y, z = launch.grid_for(cfg)
            assert x < 2**31 and y <= MAX_GRID_YZ and z <= MAX_GRID_YZ and y * z == 80000, (launch.fn.__name__, x, y, z)
    with pytest.raises(ValueError, match="batch .70000. and heads .2. must each be at most 65535"):
        launch_grid(1, 1, 2, 70000)


def test_sass_counts_show_the_score_loop(tmp_path):
    """--sass counts SASS opcodes from the compiled cubins: each kernel's exp2s are there, Hopper's
    16-bit dots are HGMMA, and every backward exp2 has its clamp (p = 2^(min(s - m, 0) - log2 l):
    one FMNMX per MUFU.EX2 at least), so dropping it shows here before a GPU times it."""
    out = tmp_path / "reports.json"
    proc = run_bench_script("inspect_kernels.py", "--arch", "90", "--dtypes", "bf16", "--only", "H16_L8192_D64",
                            "--sass", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sass: total=" in proc.stdout
    reports = json.loads(out.read_text())
    problems = aot_record.report_problems(reports, 90, SHARED_FLOOR[90], full=False)
    assert not problems, "\n".join(problems)
    by_kernel = {}
    for r in reports:
        by_kernel.setdefault(r["name"].split()[0], []).append(r["sass"])
    assert {"fwd", "bwd_pre", "bwd_dkdv", "bwd_dq"} <= set(by_kernel)
    for name in ("fwd", "bwd_dkdv", "bwd_dq"):
        for c in by_kernel[name]:
            assert c["MUFU.EX2"] > 0 and c["HGMMA"] > 0 and c["total"] > sum(v for k, v in c.items() if k != "total")
    for name in ("bwd_dkdv", "bwd_dq"):
        assert all(c["FMNMX"] >= c["MUFU.EX2"] for c in by_kernel[name]), by_kernel[name]


_RANK_SCRIPT = """
import json, sys, torch
from rollingq.functional import MAX_FACTORED_RANK
from rollingq.kernels import aot, rotate
out = []
for D in (264, 768):
    for dt in (torch.bfloat16, torch.float32):
        x = torch.randn(1, 1, 64, D, dtype=dt)
        with aot.captured_launches(rotate, ["_low_rank_rotate_kernel"]) as sink:
            rotate.rotate(x, torch.randn(1, 2, D, MAX_FACTORED_RANK), None)
        launch, = sink
        cfg = launch.configs()[0]
        sig, constexprs, attrs = launch.specialization(cfg)
        for arch in (90, 80):
            rep = aot.compile_report(f"rotate D{D} {dt} sm_{arch}", launch.fn, sig, constexprs, cfg.num_warps,
                                     cfg.num_stages, arch, attrs)
            out.append(dict(rep, arch=arch))
print(json.dumps(out, default=str))
"""


def test_factored_rotation_at_its_largest_rank_fits_the_cards():
    """The factored rotate kernel keeps [rows, r] and [D, r] tiles on chip: unbounded, r = 768 asked
    sm_90 for 397 KB of shared memory. kernel_arguments sends ranks above MAX_FACTORED_RANK as the
    dense matrix; at that rank the kernel builds for sm_90 and sm_80 without spills, within the
    smallest card's shared memory (the interpreter models neither)."""
    proc = run_with_compiler("-c", _RANK_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(reports) == 8
    for rep in reports:
        assert not aot_record.bad(rep) and rep["shared"] <= SHARED_FLOOR[rep["arch"]], rep
