"""Ahead-of-time compiles for NVIDIA targets on a machine without a GPU.

Triton compiles for sm_90 / sm_80 without a device; ptxas (shipped inside Triton) then reports
registers and spills, and cuobjdump's SASS shows whether Hopper's HGMMA (wgmma) instructions are
there. Catches what the interpreter cannot: compile errors, shared memory over the card's limit,
register spills. Must run with TRITON_INTERPRET unset (the interpreter replaces the compiler).
"""
import os
import re
import subprocess
import tempfile
from typing import Dict

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # H100/H200 and A100 per-block opt-in maxima


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_report(name, fn, signature, constexprs, num_warps, num_stages, arch: int = 90) -> Dict:
    """Compile one kernel variant for sm_<arch>; return shared bytes, registers, spills, HGMMA count."""
    rep = {"name": name, "arch": arch, "error": None}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=num_warps, num_stages=num_stages))
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
    rep["hgmma"] = k.asm["ptx"].count("wgmma.mma_async") if arch == 90 else 0
    rep["over_shared"] = rep["shared"] > SHARED_LIMIT[arch]
    return rep
