"""Throughput of rollingq against its peers (pytest-benchmark); see peers.py for the list.

GPU cases (peak memory first, then every shape of shapes.GPU_SHAPES x every implementation) are timed with
triton.testing.do_bench (median after warm-up); pytest-benchmark wraps each measurement in a single
pedantic round, so its own timing is of the harness and is ignored: the numbers are the records in
extra_info (ms, tflops, status). On a machine without CUDA every GPU case skips ("CUDA not available")
and only the CPU smoke case runs.

Run: `pytest bench/ --benchmark-json=OUT/bench.json`, then `python bench/summarize.py OUT/bench.json`.
bench/gpu_check.sh runs it as one process per unit instead (ROLLINGQ_BENCH_SELECT, conftest.py): the
memory case (with the CPU smoke case), then each shape, so a CUDA error in one shape stays there.
"""
import os

import pytest
import torch

import peers
import rollingq
import shapes

CASES = [(s.name, impl) for s in shapes.GPU_SHAPES for impl in peers.IMPL_ORDER]  # shape-major: flex
# compiles once per shape and direction, rollingq autotunes once per shape
EXTRA_CASES = [(s.name, impl) for s in shapes.GPU_SHAPES for impl in peers.EXTRA_IMPL_ORDER]


def test_cpu_smoke(benchmark, bench_record):
    """The public API on a tiny fp32 CPU problem (PyTorch reference path), all rows rotated,
    statistics on. Runs everywhere, so `pytest bench/` always exercises the API."""
    shape = shapes.CPU_SMOKE_SHAPE
    inp = shapes.make_inputs(shape, "cpu", torch.float32)

    def call():
        return rollingq.rollingq_attention(inp.q, inp.k, inp.v, inp.modality_ids, shape.num_modalities,
                                           rotation=inp.rotation, rotate_rows=shape.seq_len, stats=True)

    from rollingq.functional import set_cpu_backend

    previous = set_cpu_backend("reference")  # the reference, even under TRITON_INTERPRET=1
    try:
        out, st = benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
    finally:
        set_cpu_backend(previous)
    assert out.shape == inp.q.shape and bool(torch.isfinite(out).all())
    mass_rows = st.attn_mass.sum(-1)
    assert torch.allclose(mass_rows, torch.ones_like(mass_rows), atol=1e-5)
    expected_counts = torch.tensor(shape.segments).expand(shape.batch, -1)
    assert torch.equal(st.key_count.cpu(), expected_counts)
    rec = {"kind": "cpu_smoke", "shape": shape.name, "impl": "rollingq_fwd", "dtype": "float32"}
    rec.update(peers.env_info("cpu"))
    bench_record(benchmark, rec)


def test_peak_memory(cuda_device, benchmark, bench_record):
    """Peak memory of fwd+bwd at L = 16384: rollingq against SDPA flash (ratio checked in summarize).
    First of the GPU cases (design.md's memory target), so a run cut short still measures it."""
    rec = benchmark.pedantic(peers.measure_peak_memory, args=(shapes.MEMORY_SHAPE, cuda_device),
                             rounds=1, iterations=1)
    bench_record(benchmark, rec)
    assert rec["rollingq_fwdbwd_bytes"] is not None and rec["rollingq_fwdbwd_bytes"] > 0


@pytest.mark.parametrize("shape_name,impl", CASES, ids=[f"{s}-{i}" for s, i in CASES])
def test_attention(cuda_device, benchmark, bench_record, shape_name, impl):
    """One (shape, impl) timing; a peer that declines or crashes is a record, rollingq must run."""
    shape = shapes.BY_NAME[shape_name]
    rec = benchmark.pedantic(peers.measure_case, args=(shape, impl, cuda_device), rounds=1, iterations=1)
    bench_record(benchmark, rec)
    if peers.IMPLS[impl].family in ("rollingq", "unfused"):
        assert rec["status"] == "ok", rec["status"]
    else:
        assert rec["status"] == "ok" or rec["status"].startswith(("n/a: ", "fails: ")), rec["status"]
    if rec["status"] == "ok":
        assert rec["ms"] > 0 and rec["tflops"] > 0


@pytest.mark.skipif(os.environ.get("ROLLINGQ_BENCH_EXTRA", "") in ("", "0"),
                    reason="opt-in: ROLLINGQ_BENCH_EXTRA=1 times rollingq with dropout, padded rows, a mask and a learned bias")
@pytest.mark.parametrize("shape_name,impl", EXTRA_CASES, ids=[f"{s}-{i}" for s, i in EXTRA_CASES])
def test_attention_extra(cuda_device, benchmark, bench_record, shape_name, impl):
    """rollingq with attention dropout 0.1, with rows padded at the end, with a bool attention
    mask, and with a learned bias (peers.EXTRA_IMPL_ORDER): after every other case, and not in
    gpu_check.sh."""
    rec = benchmark.pedantic(peers.measure_case, args=(shapes.BY_NAME[shape_name], impl, cuda_device),
                             rounds=1, iterations=1)
    bench_record(benchmark, rec)
    assert rec["status"] == "ok", rec["status"]
    assert rec["ms"] > 0 and rec["tflops"] > 0
