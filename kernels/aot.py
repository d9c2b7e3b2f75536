"""Ahead-of-time compiles for NVIDIA targets on a machine without a GPU.

Triton compiles for sm_90 / sm_80 without a device; ptxas (shipped inside Triton) then reports
registers and spills, and cuobjdump's SASS shows whether Hopper's HGMMA (wgmma) instructions are
there. Catches what the interpreter cannot: compile errors, shared memory over the card's limit,
register spills. Must run with TRITON_INTERPRET unset (the interpreter replaces the compiler).

What to compile comes from real launches: `captured_launches` swaps a module's kernels for
recorders while a launcher runs on CPU tensors, and `Launch.specialization` derives the signature,
constants and divisibility hints as Triton's JIT does at launch (bench/launches.py drives it).
"""
import contextlib
import os
import re
import subprocess
import tempfile
from typing import Dict, Iterator, List, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # H100/H200 and A100 per-block opt-in maxima
# The least a card of each plan has (common.target_arch): sm_86/89/120 take the Ampere plan with
# 99 KB, so every launch class must offer a row within it (tests/test_aot_compile.py).
SHARED_FLOOR = {90: 227 * 1024, 80: 99 * 1024}


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


class Launch:
    """One kernel launch as the launcher issued it: the autotuned kernel and its arguments."""

    def __init__(self, kernel, args, kwargs, grid=None):
        self.kernel, self.args, self.kwargs, self.grid = kernel, args, kwargs, grid

    def grid_for(self, config) -> tuple:
        """The launch grid under one config (a grid may depend on its block sizes)."""
        return self.grid(dict(self.kwargs, **config.kwargs)) if callable(self.grid) else tuple(self.grid)

    @property
    def fn(self) -> "triton.runtime.jit.JITFunction":
        return self.kernel.fn if isinstance(self.kernel, triton.runtime.autotuner.Autotuner) else self.kernel

    def configs(self) -> List["triton.Config"]:
        """The configs this launch can run: those the autotuner's pruner keeps for these arguments,
        or for a plain `@triton.jit` kernel its launch options (Triton's defaults when absent)."""
        at = self.kernel
        if not isinstance(at, triton.runtime.autotuner.Autotuner):
            return [triton.Config({}, num_warps=self.kwargs.get("num_warps", 4),
                                  num_stages=self.kwargs.get("num_stages", 3))]
        if at.early_config_prune is None:
            return list(at.configs)
        return at.early_config_prune(at.configs, dict(zip(at.arg_names, self.args)), **self.kwargs)

    def specialization(self, config) -> tuple:
        """(signature, constexprs, attrs) exactly as `JITFunction.run` derives them at launch time:
        integer arguments equal to 1 become constants, integers and pointers divisible by 16 carry
        the divisibility hint. Compiling without these hints (all strides plain i32) gives a
        different kernel: with an unknown innermost stride no load can be vectorised or pipelined."""
        fn = self.fn
        values = dict(zip(fn.arg_names, self.args), **self.kwargs, **config.kwargs)
        signature, constexprs, attrs = {}, {}, {}
        for i, p in enumerate(fn.params):
            v = values[p.name]
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", v
                continue
            ty, spec = native_specialize_impl(CUDABackend, v, p.is_const, not p.do_not_specialize,
                                              not p.do_not_specialize_on_alignment)
            signature[p.name] = ty
            if ty == "constexpr":
                constexprs[p.name] = spec
            elif isinstance(spec, str):
                attrs[(i,)] = CUDABackend.parse_attr(spec)
        return signature, constexprs, attrs


class _Recorder:
    def __init__(self, kernel, sink):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(Launch(self.kernel, args, kwargs, grid))


@contextlib.contextmanager
def captured_launches(module, names) -> Iterator[List[Launch]]:
    """Within the block, the autotuned kernels `module.<name>` record their launches instead of
    running, so a launcher can be driven with CPU tensors of a real problem's shapes and strides."""
    sink: List[Launch] = []
    saved = {n: getattr(module, n) for n in names}
    try:
        for n, k in saved.items():
            setattr(module, n, _Recorder(k, sink))
        yield sink
    finally:
        for n, k in saved.items():
            setattr(module, n, k)


def aot_options(num_warps: int, num_stages: int) -> dict:
    """The compile options of every ahead-of-time build (the rest are Triton's defaults, as at launch)."""
    return dict(num_warps=num_warps, num_stages=num_stages)


def compile_for(fn, signature, constexprs, attrs, num_warps, num_stages, arch: int):
    """Compile one kernel variant for sm_<arch> (lands in Triton's on-disk cache like a JIT compile)."""
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=aot_options(num_warps, num_stages))


# SASS opcodes the reports count (sass=True): the softmax's element-wise work beside the matmuls.
SASS_OPS = ("HGMMA", "HMMA", "MUFU.EX2", "FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "LDG", "STG", "ATOMG", "RED")


def sass_counts(cubin: str) -> Dict[str, int]:
    """Static instruction counts of a cubin (cuobjdump -sass): "total" and each SASS_OPS opcode
    (its variants such as FMNMX.NAN or HGMMA.64x128x16.F32.BF16 included). Static: a loop body
    counts once however often it runs, an unrolled or pipelined one as often as it is copied."""
    r = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True)
    ops = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", r.stdout, re.M)
    counts = {"total": len(ops)}
    for want in SASS_OPS:
        counts[want] = sum(1 for op in ops if op == want or op.startswith(want + "."))
    return counts


def compile_report(name, fn, signature, constexprs, num_warps, num_stages, arch: int = 90,
                   attrs: Optional[dict] = None, sass: bool = False) -> Dict:
    """Compile one kernel variant for sm_<arch>; return shared bytes, registers, spills, HGMMA count
    and with `sass` the static SASS instruction counts (sass_counts)."""
    rep = {"name": name, "arch": arch, "error": None}
    try:
        k = compile_for(fn, signature, constexprs, attrs, num_warps, num_stages, arch)
    except Exception as e:  # a compile error is a finding, reported per variant
        rep["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        return rep
    rep["shared"] = int(k.metadata.shared)
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        r = subprocess.run([_tool("ptxas"), f"-arch={sm}", "-v", ptx, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
        info = r.stdout + r.stderr
        regs = re.search(r"Used (\d+) registers", info)
        spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", info)
        rep["regs"] = int(regs.group(1)) if regs else None
        rep["spill_bytes"] = sum(int(x) for x in spills)
        if r.returncode != 0:
            rep["error"] = "ptxas: " + info.strip().splitlines()[-1][:300]
        elif sass:
            rep["sass"] = sass_counts(os.path.join(d, "k.cubin"))
    rep["hgmma"] = k.asm["ptx"].count("wgmma.mma_async") if arch == 90 else 0
    rep["over_shared"] = rep["shared"] > SHARED_LIMIT[arch]
    return rep
