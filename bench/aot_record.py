"""The record of the last full ahead-of-time compile check (bench/aot_record.json).

Compiling every variant for sm_90 and sm_80 in every dtype takes ~1200 compiles (about 25 min on
2 cores), too long for `make test`. `inspect_kernels.py --record` runs that whole matrix and writes
the record only when nothing failed; its key hashes what decides the compiles: the kernels' source,
the variants (`--list`: signatures, constants, hints, warps, stages) and Triton's version. The suite
recomputes the key (tests/test_aot_compile.py) and fails when the kernels or their launches changed
since the record was written. Plain data functions: no Triton, so the tests can import this.
"""
import hashlib
import json
import os
from typing import Dict, Iterable, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = os.path.join(ROOT, "bench", "aot_record.json")
FULL_ARCHS = (90, 80)
FULL_DTYPES = ("fp16", "bf16", "fp32")
KERNEL_NAMES = {"fwd", "bwd_pre", "bwd_dkdv", "bwd_dq", "rotate", "rotate_dense"}


def record_key(variants: List[dict], triton_version: str) -> str:
    """sha256 over Triton's version, every kernels/*.py and the variants as `--list` prints them."""
    h = hashlib.sha256(triton_version.encode())
    kdir = os.path.join(ROOT, "kernels")
    for name in sorted(f for f in os.listdir(kdir) if f.endswith(".py")):
        with open(os.path.join(kdir, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    h.update(json.dumps(variants, sort_keys=True).encode())
    return h.hexdigest()


def bad(rep: dict) -> bool:
    """A variant that failed to compile, needs more shared memory than the card has, or spills."""
    return bool(rep["error"]) or rep.get("over_shared", False) or rep.get("spill_bytes", 0) > 0


def report_problems(reports: Iterable[dict], arch: int, shared_floor: int, full: bool = True) -> List[str]:
    """What is wrong with one arch's compile reports: errors, shared memory over the card, spills; a
    launch class (kernel, dtype, problem) with no config within the plan's smallest card; Hopper
    16-bit forwards without wgmma. `full`: every kernel must be there (a whole-matrix run)."""
    reports = [r for r in reports if r["arch"] == arch]
    out = [f"{r['name']} sm_{arch}: error={r['error']} shared={r.get('shared')} spills={r.get('spill_bytes')}"
           for r in reports if bad(r)]
    if not reports:
        return out + [f"sm_{arch}: no reports"]
    names = {r["name"].split()[0] for r in reports}
    if full and names != KERNEL_NAMES:
        out.append(f"sm_{arch}: kernels compiled {sorted(names)}, expected {sorted(KERNEL_NAMES)}")
    groups: Dict[str, List[int]] = {}
    for r in reports:
        if r.get("shared") is not None:
            groups.setdefault(" ".join(r["name"].split()[:3]), []).append(r["shared"])
    out += [f"{g} sm_{arch}: no config within {shared_floor // 1024} KB (smallest {min(s) // 1024} KB)"
            for g, s in groups.items() if min(s) > shared_floor]
    if arch == 90:  # Hopper builds must use wgmma, or the kernels leave the tensor cores idle
        out += [f"{r['name']} sm_90: no HGMMA" for r in reports
                if r["name"].startswith("fwd") and r["name"].split()[1] in ("bf16", "fp16") and not r.get("hgmma")]
    return out


def load(path: str = RECORD) -> dict:
    with open(path) as f:
        return json.load(f)
