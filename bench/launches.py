"""The kernel launches of real problems, recorded on the CPU, as ahead-of-time compile jobs.

A problem (shape, ids form, rotation, statistics, gradients) is run through the same argument
preparation as `rollingq.rollingq_attention` (`functional.kernel_arguments`) and the launchers, with
CPU tensors and the kernels replaced by recorders (kernels/aot.py). Each recorded launch becomes
one compile job per autotune config its pruner keeps, specialised as Triton specialises it at run
time, so a job compiles exactly the kernel a GPU would (and, compiled on that GPU's machine, lands
under the same Triton cache key). Used by inspect_kernels.py (register and spill report) and
precompile.py (parallel compiles before the GPU check: gpu_check_plan, exactly what the check
launches, parity tests first, the benchmarks at their real batch and dtype).
"""
import contextlib
import importlib
import os
import sys
from typing import List, NamedTuple, Optional, Tuple

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Problem(NamedTuple):
    name: str
    batch: int
    heads: int
    kv_heads: int
    lq: int
    lk: int
    head_dim: int
    causal: bool
    modalities: int
    ids_per_batch: bool  # ids [B, Lk] (the tests) or shared [Lk] (the benchmarks)
    rotate_rows: Optional[int]  # rows 0..n-1 rotated; None: no rotation
    stats: bool
    grad: bool  # a backward follows (the forward saves the rotated queries)
    dense: bool = False  # the rotation as a dense [H, D, D] matrix instead of a plane rotation's factors
    dropout: float = 0.0  # attention dropout probability
    trim: Optional[bool] = None  # force the key loops' trailing-padding trim on or off (None: the launchers decide)
    # user attention mask: None, "bool" (keep) or "float" (bias) in tests.numerics.mask_shape's shapes,
    # or a bias that requires grad: "learned" ([1, H, Lq, Lk]: dQ adds its gradient by atomics when
    # B > 1), "learned_full" ([B, H, Lq, Lk]: stored densely in its dtype), "learned_keys" ([Lk]:
    # stored densely in float32, then summed); kernels/attn_mask.grad_plan
    mask: Optional[str] = None


def _problem(name, b, h, hkv, lq, lk, d, causal, m, per_batch=False, rotate_rows="all", stats=True, grad=True,
             dense=False, dropout=0.0, trim=None, mask=None):
    assert mask in (None, "bool", "float", "learned", "learned_full", "learned_keys"), mask
    return Problem(name, b, h, hkv, lq, lk, d, causal, m, per_batch, lq if rotate_rows == "all" else rotate_rows,
                   stats, grad, dense, dropout, trim, mask)


# The inspection set: every D class and path, the heaviest variant (rotation, statistics, backward).
CHECK_PROBLEMS = (
    _problem("paper_L907_D768", 1, 1, 1, 907, 907, 768, False, 3),
    _problem("H12_L907_D64", 1, 12, 12, 907, 907, 64, False, 3),
    _problem("H16_L4096_D128", 1, 16, 16, 4096, 4096, 128, False, 2),
    _problem("H16_L8192_D64", 1, 16, 16, 8192, 8192, 64, False, 2),
    _problem("H32_L8192_D128_causal", 1, 32, 32, 8192, 8192, 128, True, 2),
    _problem("gqa_H8_Hkv2_L1024_D128_causal", 1, 8, 2, 1024, 1024, 128, True, 2),
    _problem("H4_L2048_D256", 1, 4, 4, 2048, 2048, 256, False, 2),
    # RollingQAttention's fusion row with its dense buffer (under torch.compile, or an svd_rotation).
    _problem("paper_L907_D768_dense_row", 1, 1, 1, 907, 907, 768, False, 3, rotate_rows=1, dense=True),
    # Per-batch ids (sequences of different lengths): the key loops stop at each row's last live key.
    _problem("H12_L907_D64_varlen", 2, 12, 12, 907, 907, 64, False, 3, per_batch=True),
    _problem("H16_L4096_D128_causal_varlen", 2, 16, 16, 4096, 4096, 128, True, 2, per_batch=True),
    _problem("paper_L907_D768_varlen", 2, 1, 1, 907, 907, 768, False, 3, per_batch=True),
    # Attention dropout: a Philox draw per score element in the forward and in both backward kernels.
    _problem("H12_L907_D64_dropout", 1, 12, 12, 907, 907, 64, False, 3, dropout=0.1),
    _problem("H16_L4096_D128_dropout", 1, 16, 16, 4096, 4096, 128, True, 2, dropout=0.1),
    _problem("H4_L2048_D256_dropout", 1, 4, 4, 2048, 2048, 256, False, 2, dropout=0.1),
    _problem("paper_L907_D768_dropout", 1, 1, 1, 907, 907, 768, False, 3, dropout=0.1),
    # The user's attention mask (SDPA's attn_mask): a bool keep mask [B, 1, Lq, Lk] or a float bias
    # [1, H, Lq, Lk] (tests.numerics.mask_shape), read as a tile in the forward and both backward kernels.
    *(_problem(f"{name}_mask_{kind}", 1, h, h, length, length, d, causal, m, mask=kind)
      for name, h, length, d, causal, m in (("H12_L907_D64", 12, 907, 64, False, 3),
                                            ("H16_L4096_D128_causal", 16, 4096, 128, True, 2),
                                            ("H4_L2048_D256", 4, 2048, 256, False, 2),
                                            ("paper_L907_D768", 1, 907, 768, False, 3))
      for kind in ("bool", "float")),
    # A learned bias: dQ also writes ds, the bias's gradient (batch 2, so that a [1, H, L, L] bias is
    # shared and takes the atomics; a full one at batch 1 shares the float mask's forward and dK/dV;
    # L 1024 at D 128: the recording allocates the dense buffers, the variants are those of L 4096). Masks with dropout: a bool mask, and a learned
    # bias (the float mask's forward and dK/dV, plus the gradient in dQ), at every D class.
    *(_problem(f"{name}_mask_{kind}{'_dropout' * bool(p)}", 1 if kind == "learned_full" else 2, h, h, length,
               length, d, causal, m, dropout=p, mask=kind)
      for name, h, length, d, causal, m in (("H12_L907_D64", 12, 907, 64, False, 3),
                                            ("H16_L1024_D128_causal", 16, 1024, 128, True, 2),
                                            ("H4_L2048_D256", 4, 2048, 256, False, 2),
                                            ("paper_L907_D768", 1, 907, 768, False, 3))
      for kind, p in (("learned", 0.0), ("learned", 0.1), ("bool", 0.1), ("learned_full", 0.0),
                      ("learned_keys", 0.0))
      if (kind, p) in (("learned", 0.0), ("learned", 0.1)) or (d, kind, p) in (
          (256, "bool", 0.1), (768, "bool", 0.1), (64, "bool", 0.1), (64, "learned_full", 0.0),
          (768, "learned_full", 0.0), (128, "learned_keys", 0.0), (256, "learned_keys", 0.0))),
    _problem("H16_L4096_D128_causal_mask_bool_dropout", 1, 16, 16, 4096, 4096, 128, True, 2, dropout=0.1,
             mask="bool"),
)


def _repo_on_path() -> None:
    """The repository root on sys.path, for `bench.*` and `tests.numerics` (the test shapes), and
    bench/ itself (peers.py and shapes.py import each other by bare name)."""
    for path in (_ROOT, os.path.join(_ROOT, "bench")):
        if path not in sys.path:
            sys.path.insert(0, path)


# The dtypes each part of bench/gpu_check.sh launches: the CUDA parity tests run every dtype, the
# benchmarks bf16 only (peers.measure_case's dtype).
TEST_DTYPES = ("bf16", "fp16", "fp32")
BENCH_DTYPES = ("bf16",)
# The batch the benchmark launches are recorded at; None: each shape's own (B 64 for the D 768 and
# 907-token shapes). Not 1: at B = 1 the shared ids and row mask (rollingq.functional.kernel_arguments
# expands them) have a batch stride of L instead of 0, which changes Triton's divisibility hints and
# so the cache key of every kernel. `precompile.py --verify-keys` checks the recorded set against the
# real batch (bench_problems(None)), so a cheaper batch here cannot silently miss compiles.
RECORD_BATCH: Optional[int] = None


def parity_problems() -> List[Problem]:
    """The launches of the CUDA-only parity tests (`pytest tests/ -m cuda`), which run before the bench."""
    _repo_on_path()
    from tests.numerics import CUDA_DROPOUT_SHAPES, CUDA_LARGE_SHAPES, CUDA_MASK_SHAPES

    out = []
    for b, h, hkv, lq, lk, d, causal in CUDA_LARGE_SHAPES:
        name = f"test_H{h}_Hkv{hkv}_L{lq}x{lk}_D{d}{'_causal' if causal else ''}"
        out.append(_problem(name + "_fwd", b, h, hkv, lq, lk, d, causal, 3, per_batch=True, grad=False))
        for dense in (False, True):  # test_gradients_cuda_large passes a dense rotation
            out.append(_problem(name + "_grad" + "_dense" * dense, b, h, hkv, lq, lk, d, causal, 3, per_batch=True,
                                rotate_rows=min(4, lq), dense=dense))
    for b, h, hkv, length, d in CUDA_DROPOUT_SHAPES:  # tests/test_dropout.py: 5 rows, dense rotation
        out.append(_problem(f"test_dropout_H{h}_Hkv{hkv}_L{length}_D{d}", b, h, hkv, length, length, d, False, 3,
                            per_batch=True, rotate_rows=5, dense=True, dropout=0.2))
    for b, h, hkv, length, d, kind in CUDA_MASK_SHAPES:  # tests/test_attn_mask.py: 5 rows, dense rotation
        for mask in (kind, "learned"):  # test_parity_cuda_large, test_bias_gradient_cuda_large
            out.append(_problem(f"test_mask_{mask}_H{h}_Hkv{hkv}_L{length}_D{d}", b, h, hkv, length, length, d, False,
                                3, per_batch=True, rotate_rows=5, dense=True, mask=mask))
    # tests/test_trailing_padding.py on CUDA: trimmed, and the same launches without the trim.
    for causal in (False, True):
        for trim in (True, False):
            out.append(_problem(f"test_trailing_L300{'_causal' if causal else ''}{'' if trim else '_notrim'}", 4, 2,
                                1, 300, 300, 16, causal, 3, per_batch=True, rotate_rows=3, dense=True, trim=trim))
    return out


def _impl_problem(shape, impl, batch: Optional[int]) -> Problem:
    """The launches of one rollingq implementation of bench/peers.py on one shape."""
    if impl.dropout or impl.varlen or impl.mask or impl.bias:
        raise NotImplementedError(f"{impl.name}: the gpu_check launch set knows no dropout, varlen, mask or bias "
                                  "benchmark; add it to bench_problems")
    rotated = "all" if impl.stats else None  # _build_rollingq: no rotation and no rows without statistics
    return _problem(f"{shape.name}_{impl.name.replace('rollingq_', '')}", shape.batch if batch is None else batch,
                    shape.heads, shape.num_kv_heads, shape.seq_len, shape.seq_len, shape.head_dim, shape.causal,
                    shape.num_modalities, rotate_rows=rotated, stats=impl.stats, grad=impl.direction == "fwdbwd",
                    dense=impl.stats and impl.dense_rotation)


def bench_problems(batch: Optional[int] = None) -> List[Problem]:
    """The rollingq launches of the bench as gpu_check.sh runs it, in its order: the peak-memory shape
    (peers.MEMORY_IMPLS), then every shape of GPU_SHAPES with each rollingq implementation of
    peers.IMPL_ORDER (shared ids [L], a plane rotation's factors or a dense rotation, bf16).
    `batch` None: each shape's own batch, what the GPU launches."""
    _repo_on_path()
    import peers
    from shapes import GPU_SHAPES, MEMORY_SHAPE

    plan = [(MEMORY_SHAPE, peers.MEMORY_IMPLS)] + [(s, peers.IMPL_ORDER) for s in GPU_SHAPES]
    return [_impl_problem(shape, peers.IMPLS[name], batch) for shape, names in plan for name in names
            if peers.IMPLS[name].family == "rollingq"]


Plan = List[Tuple[List[Problem], Tuple[str, ...]]]  # (problems, dtype names) groups, in launch order


def gpu_check_plan() -> Plan:
    """What bench/gpu_check.sh launches, in its order: the CUDA parity tests in every dtype, then the
    benchmarks in bf16 (recorded at RECORD_BATCH)."""
    return [(parity_problems(), TEST_DTYPES), (bench_problems(RECORD_BATCH), BENCH_DTYPES)]


def only_dtypes(plan: Plan, dtypes) -> Plan:
    """The plan restricted to `dtypes` (None: unchanged)."""
    return plan if dtypes is None else [(problems, tuple(d for d in dts if d in dtypes)) for problems, dts in plan]


ROTATE_KERNELS = ["_low_rank_rotate_kernel", "_dense_rows_rotate_kernel"]


def record(p: Problem, dtype: torch.dtype) -> list:
    """The kernel launches of one forward (and backward when p.grad) on CPU tensors, not run."""
    from rollingq.functional import kernel_arguments
    from unittest import mock

    from rollingq.kernels import attention_bwd as bwd
    from rollingq.kernels import attention_fwd as fwd
    from rollingq.kernels import common, rotate
    from rollingq.kernels.aot import captured_launches
    from rollingq.rotation import LowRankRotation

    q = torch.empty(p.batch, p.heads, p.lq, p.head_dim, dtype=dtype)
    k = torch.empty(p.batch, p.kv_heads, p.lk, p.head_dim, dtype=dtype)
    v = torch.empty_like(k)
    ids = torch.zeros((p.batch, p.lk) if p.ids_per_batch else (p.lk,), dtype=torch.int64)
    # A plane rotation's factors (what the module and the benchmarks pass): the D-split and fp32 paths
    # then launch kernels/rotate.py's kernel; a dense rotation launches the same attention kernels.
    rotation = None
    if p.rotate_rows is not None:
        d, h = p.head_dim, p.heads
        rotation = torch.ones(h, d, d) if p.dense else LowRankRotation(torch.ones(h, d, 2), torch.ones(h, d, 2))
    ids32, rot, rot_mask = kernel_arguments(q, k, ids, rotation, p.rotate_rows)
    scale = p.head_dim ** -0.5
    save = p.grad and rot is not None
    seed = torch.zeros(1, dtype=torch.int64) if p.dropout else None
    attn_mask = None
    if p.mask is not None:  # only its dtype and (broadcast) strides reach the kernels, not its values
        _repo_on_path()
        from tests.numerics import mask_shape

        shape = {"learned_full": (p.batch, p.heads, p.lq, p.lk), "learned_keys": (p.lk,)}.get(
            p.mask, mask_shape(p.mask, p.batch, p.heads, p.lq, p.lk))
        attn_mask = torch.ones(shape, dtype=torch.bool) if p.mask == "bool" else torch.zeros(shape, dtype=dtype)
    forced = contextlib.nullcontext() if p.trim is None else mock.patch.object(common, "trims_padding",
                                                                               lambda ids: p.trim)
    with forced, captured_launches(fwd, ["_rollingq_fwd_kernel"]) as launches, \
            captured_launches(rotate, ROTATE_KERNELS) as rotations:
        out, lse, q_rot, _, _ = fwd.rollingq_fwd(q, k, v, ids32, p.modalities, rot, rot_mask, p.causal, scale,
                                                 p.stats, save, p.dropout, seed, attn_mask)
    launches = rotations + launches
    if p.grad:  # what rollingq/ops.py saves for and hands to the backward
        q_used = q_rot.contiguous() if save else q
        with forced, captured_launches(bwd, ["_bwd_preprocess_kernel", "_bwd_dkdv", "_bwd_dq"]) as rec, \
                captured_launches(rotate, ROTATE_KERNELS) as rotations:
            bwd.attention_bwd(torch.empty_like(out), q_used, k, v, out, lse, ids32, p.causal, scale, rot,
                              None if rot_mask is None else rot_mask.view(torch.bool), p.dropout, seed, attn_mask,
                              p.mask is not None and p.mask.startswith("learned"))
        launches += rec + rotations
    return launches


def short_name(fn_name: str) -> str:
    return {"_rollingq_fwd_kernel": "fwd", "_bwd_preprocess_kernel": "bwd_pre", "_bwd_dkdv_kernel": "bwd_dkdv",
            "_bwd_dq_kernel": "bwd_dq", "_low_rank_rotate_kernel": "rotate",
            "_dense_rows_rotate_kernel": "rotate_dense"}.get(fn_name, fn_name)


def _plan_launch_configs(plan: Plan, arch: Optional[int]):
    """(dtype name, problem, launch, config) for every config each recorded launch of the plan can
    run, planned for `arch` (None: this machine's GPU)."""
    from rollingq.kernels.common import planning_for

    with planning_for(arch):
        for problems, dtypes in plan:
            for dname in dtypes:
                for p in problems:
                    for launch in record(p, DTYPES[dname]):
                        for cfg in launch.configs():
                            yield dname, p, launch, cfg


def _job_key(launch, cfg) -> tuple:
    """What makes two compiles the same kernel: function, signature, constants, hints, warps, stages."""
    sig, cx, attrs = launch.specialization(cfg)
    return (launch.fn.__name__, tuple(sig.items()), tuple(sorted(cx.items())), repr(sorted(attrs.items())),
            cfg.num_warps, cfg.num_stages)


def compile_jobs(problems, dtypes, arch: Optional[int] = None) -> List[tuple]:
    """(name, fn, signature, constexprs, attrs, num_warps, num_stages) per distinct compile of the
    problems in each dtype (names of DTYPES). `arch` plans for that card (launch paths and pruned
    config lists); None plans for the GPU of this machine."""
    return plan_jobs([(problems, dtypes)], arch)


def plan_jobs(plan: Plan, arch: Optional[int] = None) -> List[tuple]:
    """compile_jobs of every (problems, dtypes) group of the plan, in its order, each compile once."""
    seen, out = set(), []
    for dname, p, launch, cfg in _plan_launch_configs(plan, arch):
        key = _job_key(launch, cfg)
        if key in seen:
            continue
        seen.add(key)
        sig, cx, attrs = launch.specialization(cfg)
        tile = f"BM{cx['BLOCK_M']} BN{cx['BLOCK_N']} {'wide ' if cx.get('WIDE') else ''}" if "BLOCK_N" in cx else ""
        name = f"{short_name(launch.fn.__name__)} {dname} {p.name} {tile}w{cfg.num_warps} s{cfg.num_stages}"
        out.append((name, launch.fn, sig, cx, attrs, cfg.num_warps, cfg.num_stages))
    return out


def uncovered_launches(built: Plan, launched: Plan, arch: int = 90) -> List[str]:
    """The compiles `launched` needs that `built` does not make (names of the launched jobs): e.g. the
    benchmarks at their real batch against what precompile.py records. Empty when every launch finds
    its kernel precompiled."""
    have = {_job_key(launch, cfg) for _, _, launch, cfg in _plan_launch_configs(built, arch)}
    missing, seen = [], set()
    for dname, p, launch, cfg in _plan_launch_configs(launched, arch):
        key = _job_key(launch, cfg)
        if key not in have and key not in seen:
            seen.add(key)
            missing.append(f"{short_name(launch.fn.__name__)} {dname} {p.name} {cfg}")
    return missing


def portable(job) -> tuple:
    """A job with its kernel named by (module, function), for a worker process (kernels do not pickle)."""
    name, fn, sig, cx, attrs, w, s = job
    return name, (fn.fn.__module__, fn.__name__), sig, cx, attrs, w, s


def jit_function(module: str, name: str):
    """The JITFunction `name` of `module`, found again in a worker process."""
    import triton

    for obj in vars(importlib.import_module(module)).values():
        fn = obj.fn if isinstance(obj, triton.runtime.autotuner.Autotuner) else obj
        if isinstance(fn, triton.runtime.jit.JITFunction) and fn.__name__ == name:
            return fn
    raise LookupError(f"no kernel {name} in {module}")


def plan_key_mismatches(plan: Plan, cap: int = 90) -> List[str]:
    """Launches whose compile job would land under another Triton cache key than the JIT's own
    compile at launch (source hash: signature, constants, hints; and the options hash): recomputed
    here through the JIT's argument binder, on the CPU. Empty when precompiling can help."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    from rollingq.kernels.aot import aot_options

    backend = CUDABackend(GPUTarget("cuda", cap, 32))
    bad = []
    for dname, p, launch, cfg in _plan_launch_configs(plan, cap // 10 * 10):
        fn = launch.fn
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        # what Autotuner.run and JITFunction.run hand to the compiler
        kwargs = dict(launch.kwargs, **cfg.all_kwargs(), debug=False, instrumentation_mode="")
        bound, spec, opts = binder(*launch.args, **kwargs)
        options, sig, cx, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
        jit = (ASTSource(fn, sig, cx, attrs).hash(), options.hash())
        s2, cx2, at2 = launch.specialization(cfg)
        aot = (ASTSource(fn, s2, cx2, at2).hash(),
               backend.parse_options(aot_options(cfg.num_warps, cfg.num_stages)).hash())
        if jit != aot:
            bad.append(f"{short_name(fn.__name__)} {dname} {p.name} {cfg}")
    return bad
