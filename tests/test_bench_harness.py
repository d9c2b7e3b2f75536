"""The benchmark harness (bench/) on the CPU: shapes, FLOPs, peers, summary, plot, `pytest bench/`.

Numbers in the FAKE_* records below are made up: they test the formatting and ratio code, they are
not measurements. The dry run feeds the real measurement code tiny CPU problems (wall-clock timer)
and relabels its records as a GPU run only to push them through the summary.
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import peers  # noqa: E402
import plot_results  # noqa: E402
import shapes  # noqa: E402
import summarize  # noqa: E402

import rollingq  # noqa: E402


def child_env(**extra: str) -> dict:
    """This process's environment for a child `pytest bench/` or tool run, without the variables a
    pytest-xdist worker carries (pytest-benchmark disables itself when it sees them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST_", "PYTEST_CURRENT_TEST"))}
    env.update(extra)
    return env


@pytest.fixture
def reference_path():
    """CPU calls of rollingq go to the PyTorch reference: these tests check the harness, not kernels.
    (TRITON_INTERPRET is left alone: Triton reads it when a kernel module is first imported.)"""
    from rollingq.functional import set_cpu_backend

    previous = set_cpu_backend("reference")
    yield
    set_cpu_backend(previous)


# ------------------------------------------------------------------------------------ FLOPs, shapes
def test_flop_formula():
    fwd = shapes.attention_flops(2, 3, 5, 7, 8, causal=False, direction="fwd")
    assert fwd == 4 * 2 * 3 * 5 * 7 * 8
    assert shapes.attention_flops(2, 3, 5, 7, 8, causal=True, direction="fwd") == fwd / 2
    assert shapes.attention_flops(2, 3, 5, 7, 8, causal=False, direction="fwdbwd") == 3.5 * fwd
    assert shapes.attention_flops(2, 3, 5, 7, 8, causal=True, direction="fwdbwd") == 3.5 * fwd / 2
    s = shapes.BY_NAME["B2_H32_L8192_D128_causal"]
    assert s.flops("fwd") == 4 * 2 * 32 * 8192 * 8192 * 128 / 2
    with pytest.raises(ValueError, match="direction"):
        shapes.attention_flops(1, 1, 1, 1, 8, causal=False, direction="bwd")
    with pytest.raises(ValueError, match="head_dim"):
        shapes.attention_flops(1, 1, 1, 1, 0, causal=False, direction="fwd")


def test_shape_names_match_their_fields():
    names = [s.name for s in shapes.GPU_SHAPES]
    assert names == ["B64_H1_L907_D768", "B64_H12_L907_D64", "B4_H16_L4096_D128", "B4_H16_L8192_D64",
                     "B2_H32_L8192_D128_causal"]
    for s in shapes.BY_NAME.values():
        m = re.fullmatch(r"B(\d+)_H(\d+)_L(\d+)_D(\d+)(_causal)?", s.name)
        assert m, s.name
        assert (s.batch, s.heads, s.seq_len, s.head_dim) == tuple(int(g) for g in m.groups()[:4])
        assert s.causal == bool(m.group(5))


def test_modality_layouts():
    paper = shapes.BY_NAME[shapes.PAPER_LAYER]
    ids = paper.modality_ids("cpu")
    assert paper.num_modalities == 3 and ids.shape == (907,)
    assert ids[0] == 0 and torch.equal(torch.bincount(ids), torch.tensor([1, 513, 393]))
    assert bool((ids[1:514] == 1).all()) and bool((ids[514:] == 2).all())
    long = shapes.BY_NAME["B4_H16_L8192_D64"]
    assert torch.equal(torch.bincount(long.modality_ids("cpu")), torch.tensor([4096, 4096]))
    with pytest.raises(ValueError, match="segments"):
        shapes.Shape("bad", 1, 1, 10, 8, (3, 3))


def test_random_rotation_is_a_rotation():
    r = shapes.random_rotation(3, 16, seed=1).double()
    eye = torch.eye(16, dtype=torch.float64).expand(3, 16, 16)
    assert torch.allclose(r @ r.transpose(-1, -2), eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(r), torch.ones(3, dtype=torch.float64), atol=1e-5)
    assert not torch.allclose(r, eye, atol=0.1)  # not the identity
    assert not torch.allclose(r[0], r[1])  # one per head


def test_benchmark_rotations():
    """The product's rotation is a plane rotation per head, factored at rank 2 as the module passes
    it; the dense one is a general rotation (R - I of full rank)."""
    inp = shapes.make_inputs(shapes.Shape("t", 1, 3, 8, 16, (4, 4)), "cpu", torch.float32, seed=2)
    assert inp.rotation.rank == 2
    r = inp.rotation.dense(torch.float64)
    eye = torch.eye(16, dtype=torch.float64).expand(3, 16, 16)
    assert torch.allclose(r @ r.transpose(-1, -2), eye, atol=1e-6) and not torch.allclose(r, eye, atol=0.1)
    assert torch.linalg.matrix_rank(inp.dense_rotation.double() - eye).min() == 16


# ------------------------------------------------------------------------------------------- peers
@pytest.mark.parametrize("causal", [False, True])
def test_unfused_pipeline_matches_reference(causal):
    shape = shapes.Shape("t", 2, 4, 24, 16, (5, 11, 8), causal=causal, kv_heads=2)
    inp = shapes.make_inputs(shape, "cpu", torch.float64, seed=3)
    rot_t = inp.rotation.dense(torch.float64).transpose(-1, -2)
    onehot_v = peers.one_hot_values(inp.modality_ids, 3, 2, 2, 16, torch.float64)
    out, mass, key_sum = peers.unfused_attention(inp.q, inp.k, inp.v, rot_t, onehot_v, 3, causal)
    ref_out, ref = rollingq.rollingq_attention_reference(
        inp.q, inp.k, inp.v, inp.modality_ids, 3, rotation=inp.rotation, rotate_rows=24, causal=causal)
    assert torch.allclose(out, ref_out, atol=1e-10)
    assert torch.allclose(mass.double(), ref.attn_mass, atol=1e-6)
    assert torch.allclose(key_sum.double(), ref.key_sum, atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa_flash_fwd", "flex_fwd"])
@pytest.mark.parametrize("causal", [False, True])
def test_peer_outputs_match_plain_attention(impl, causal, reference_path):
    shape = shapes.Shape("t", 1, 2, 32, 16, (16, 16), causal=causal)
    inp = shapes.make_inputs(shape, "cpu", torch.float32, seed=4)
    out = peers.build(impl, inp, compile_flex=False)()
    ref, _ = rollingq.rollingq_attention_reference(inp.q, inp.k, inp.v, inp.modality_ids, 2, causal=causal)
    assert torch.allclose(out, ref, atol=1e-5)


def test_short_reason_prefers_the_resource_line():
    exc = RuntimeError("Traceback junk\n  more\ntriton.runtime.errors.OutOfResources: out of resource: shared "
                       "memory, Required: 524288, Hardware limit: 232448\nmore")
    assert peers.short_reason(exc).startswith("RuntimeError: triton.runtime.errors.OutOfResources: out of resource")
    assert peers.short_reason(ValueError("x" * 500), limit=50).endswith("...")
    assert len(peers.short_reason(ValueError("x" * 500), limit=50)) == 50


def test_bench_attn_mask_keeps_every_row_live():
    mask = peers.attn_mask_of(40, "cpu")
    assert mask.shape == (40, 40) and mask.diagonal().all()
    assert abs(mask.float().mean().item() - 0.9) < 0.01
    assert summarize.family_of("rollingq_mask_fwdbwd") == "rollingq"


def test_bench_learned_bias():
    bias = peers.bias_of(3, 20, torch.float16, "cpu", requires_grad=True)
    assert bias.shape == (1, 3, 20, 20) and bias.dtype == torch.float16 and bias.requires_grad
    assert torch.isfinite(bias).all() and 0.4 < bias.float().std().item() < 0.6
    assert not peers.bias_of(3, 20, torch.float16, "cpu", requires_grad=False).requires_grad
    assert summarize.family_of("rollingq_bias_fwdbwd") == "rollingq"


def test_varlen_ids_pad_rows_at_the_end():
    ids = peers.varlen_ids(torch.arange(8) % 2, 4)
    assert ids.shape == (4, 8) and ((ids >= 0).sum(1)).tolist() == [8, 7, 6, 5]
    assert all((row[:n] == torch.arange(n) % 2).all() and (row[n:] == -1).all()
               for row, n in zip(ids, (8, 7, 6, 5)))


def test_build_rejects_bad_arguments():
    inp = shapes.make_inputs(shapes.CPU_SMOKE_SHAPE, "cpu", torch.float32)
    with pytest.raises(ValueError, match="impl must be one of"):
        peers.build("sdpa_magic_fwd", inp)
    with pytest.raises(ValueError, match="requires_grad"):
        peers.build("sdpa_flash_fwdbwd", inp)


def test_dry_run_every_impl_then_summarize(tmp_path, reference_path):
    """The real measure_case on a tiny CPU shape for every implementation, then the summary."""
    shape = shapes.Shape("B1_H2_L32_D16", 1, 2, 32, 16, (16, 16))
    recs = [peers.measure_case(shape, impl, "cpu", timer=peers.wallclock_ms, dtype=torch.float32,
                               compile_flex=False) for impl in peers.IMPL_ORDER + peers.EXTRA_IMPL_ORDER]
    status = {r["impl"]: r["status"] for r in recs}
    for impl in ("rollingq_fwd", "rollingq_fwd_nostats", "rollingq_fwdbwd", "sdpa_flash_fwd",
                 "sdpa_flash_fwdbwd", "flex_fwd", "unfused_fwd") + peers.EXTRA_IMPL_ORDER:
        assert status[impl] == "ok", (impl, status[impl])
    for impl in ("sdpa_efficient_fwd", "sdpa_cudnn_fwdbwd"):  # no CPU kernel: declined, not an error
        assert status[impl].startswith("n/a: "), status[impl]
    assert status["flex_fwdbwd"].startswith("fails: NotImplementedError"), status["flex_fwdbwd"]
    for r in recs:
        assert r["device"] == "cpu" and r["card"] == "cpu"
        if r["status"] == "ok":
            assert r["ms"] > 0 and math.isclose(r["tflops"], shape.flops(r["direction"]) / r["ms"] / 1e9)
        else:
            assert r["ms"] is None and r["tflops"] is None

    # CPU records are not GPU figures: the summary leaves them out...
    assert summarize.summarize(recs, commit="x")["records"] == []
    # ...relabelled (dry run only), they go through the same table code as a GPU run.
    relabelled = [dict(r, device="cuda", card="DRY-RUN-CPU") for r in recs]
    res = summarize.summarize(relabelled, commit="x")
    assert {r["impl"] for r in res["records"]} == set(peers.IMPL_ORDER + peers.EXTRA_IMPL_ORDER)
    report = summarize.format_report(res)
    assert "| B1_H2_L32_D16 | sdpa_efficient_fwd | n/a: " in report
    assert re.search(r"^\| B1_H2_L32_D16 \| sdpa_flash_fwd \| [0-9.]+ \| [0-9.]+ \| 1\.00x \(sdpa_flash_fwd\) \|$",
                     report, flags=re.MULTILINE), report


# -------------------------------------------------------------------------------------- summarize
PAPER = shapes.PAPER_LAYER
CARD = "FAKE-CARD"


def fake(shape, impl, tflops=None, status="ok"):
    """A made-up attention record (not a measurement); ms follows from the shape's FLOPs."""
    direction = summarize.direction_of(impl)
    flops = shapes.BY_NAME[shape].flops(direction)
    ms = flops / tflops / 1e9 if tflops else None
    return {"kind": "attention", "shape": shape, "impl": impl, "family": summarize.family_of(impl),
            "direction": direction, "status": status, "ms": ms, "tflops": tflops, "card": CARD,
            "device": "cuda", "torch": "FAKE-torch", "triton": "FAKE-triton"}


FAKE_RECORDS = [
    # the paper's layer: flash / cuDNN decline, flex crashes, efficient is the only peer
    fake(PAPER, "rollingq_fwd", 240.0), fake(PAPER, "rollingq_fwd_nostats", 250.0),
    fake(PAPER, "sdpa_flash_fwd", status="n/a: Flash attention requires last dimension <= 256"),
    fake(PAPER, "sdpa_cudnn_fwd", status="n/a: cuDNN declined"),
    fake(PAPER, "sdpa_efficient_fwd", 120.0),
    fake(PAPER, "flex_fwd", status="fails: OutOfResources: out of resource: shared memory"),
    fake(PAPER, "unfused_fwd", 70.0),
    fake(PAPER, "rollingq_fwdbwd", 70.0), fake(PAPER, "sdpa_efficient_fwdbwd", 40.0),
    fake(PAPER, "flex_fwdbwd", status="fails: OutOfResources: out of resource: shared memory"),
    # a second shape: rollingq slower than flex forward, faster than 0.9x flex fwd+bwd
    fake("B4_H16_L4096_D128", "rollingq_fwd", 400.0), fake("B4_H16_L4096_D128", "rollingq_fwd_nostats", 480.0),
    fake("B4_H16_L4096_D128", "sdpa_flash_fwd", 340.0), fake("B4_H16_L4096_D128", "sdpa_cudnn_fwd", 600.0),
    fake("B4_H16_L4096_D128", "flex_fwd", 500.0), fake("B4_H16_L4096_D128", "unfused_fwd", 150.0),
    fake("B4_H16_L4096_D128", "flex_fwdbwd", 400.0), fake("B4_H16_L4096_D128", "sdpa_flash_fwdbwd", 300.0),
    fake("B4_H16_L4096_D128", "rollingq_fwdbwd", 380.0),
    fake(PAPER, "rollingq_fwd_denserot", 200.0),  # the dense rotation's line (no record: MISSING elsewhere)
]
FAKE_MEMORY = {"kind": "peak_memory", "shape": "B1_H16_L16384_D128", "dtype": "bfloat16", "card": CARD,
               "device": "cuda", "torch": "FAKE-torch", "triton": "FAKE-triton",
               "rollingq_fwdbwd_bytes": 1_100_000_000, "sdpa_flash_fwdbwd_bytes": 1_000_000_000, "ratio": 1.1}


def write_fake_report(path, records):
    """The pytest-benchmark JSON layout, records in extra_info, plus a CPU smoke entry to be ignored."""
    smoke = {"kind": "cpu_smoke", "shape": "B2_H2_L64_D32", "impl": "rollingq_fwd", "card": "cpu", "device": "cpu"}
    data = {"datetime": "2026-01-02T03:04:05", "commit_info": {"id": "abc123", "dirty": True},
            "benchmarks": [{"name": f"t{i}", "extra_info": r} for i, r in enumerate(records + [smoke])]}
    path.write_text(json.dumps(data))
    return path


def targets_by(res):
    return {(t["target"], t["shape"]): t for t in res["targets"]}


def test_summarize_schema_ratios_and_targets(tmp_path, capsys):
    src = write_fake_report(tmp_path / "bench.json", FAKE_RECORDS + [FAKE_MEMORY])
    out, table = tmp_path / "results.json", tmp_path / "table.md"
    assert summarize.main([str(src), "--out", str(out), "--table", str(table)]) == 0
    res = json.loads(out.read_text())
    assert {"card", "date", "commit", "torch", "triton", "records", "peak_memory", "targets"} <= set(res)
    assert (res["card"], res["date"], res["commit"]) == (CARD, "2026-01-02T03:04:05", "abc123-dirty")
    assert len(res["records"]) == len(FAKE_RECORDS)  # the CPU smoke entry is not a GPU record
    for r in res["records"]:
        assert {"shape", "impl", "ms", "tflops", "direction", "status", "ratio_to_best_peer"} <= set(r)
    rec = {(r["shape"], r["impl"]): r for r in res["records"]}
    # best forward peer of the long shape is cuDNN (600), of its fwd+bwd flex (400); the paper's layer: efficient
    assert rec["B4_H16_L4096_D128", "rollingq_fwd"]["best_peer"] == "sdpa_cudnn_fwd"
    assert math.isclose(rec["B4_H16_L4096_D128", "rollingq_fwd"]["ratio_to_best_peer"], 400 / 600)
    assert math.isclose(rec["B4_H16_L4096_D128", "unfused_fwd"]["ratio_to_best_peer"], 150 / 600)
    assert math.isclose(rec["B4_H16_L4096_D128", "rollingq_fwdbwd"]["ratio_to_best_peer"], 380 / 400)
    assert math.isclose(rec[PAPER, "rollingq_fwd"]["ratio_to_best_peer"], 2.0)
    assert math.isclose(rec[PAPER, "rollingq_fwdbwd"]["ratio_to_best_peer"], 70 / 40)
    assert rec[PAPER, "flex_fwd"]["ratio_to_best_peer"] is None and rec[PAPER, "flex_fwd"]["ms"] is None
    assert math.isclose(res["peak_memory"]["ratio"], 1.1)

    t = targets_by(res)
    assert t["fwd >= 1.0x flex_fwd", PAPER]["result"] == "N/A"
    assert t["fwd >= 1.0x flex_fwd", "B4_H16_L4096_D128"]["result"] == "FAIL"  # 400 < 500
    assert math.isclose(t["fwd >= 1.0x flex_fwd", "B4_H16_L4096_D128"]["value"], 0.8)
    assert t["fwd >= 3x unfused_fwd", PAPER]["result"] == "PASS"  # 240 / 70 = 3.43
    assert t["fwd >= 3x unfused_fwd", "B4_H16_L4096_D128"]["result"] == "FAIL"  # 2.67
    assert t["fwd+bwd >= 0.9x flex_fwdbwd", "B4_H16_L4096_D128"]["result"] == "PASS"  # 0.95
    assert t["fwd+bwd >= 0.9x flex_fwdbwd", PAPER]["result"] == "N/A"  # flex_fwdbwd failed
    assert t["paper layer fwd >= 1.5x sdpa_efficient_fwd", PAPER]["result"] == "PASS"  # 2.0
    assert t["paper layer fwd+bwd >= 2x sdpa_efficient_fwdbwd", PAPER]["result"] == "FAIL"  # 1.75
    assert ("paper layer fwd >= 1.5x sdpa_efficient_fwd", "B4_H16_L4096_D128") not in t
    overhead = "forward only: rotation+stats time <= 1.1x rollingq_fwd_nostats"
    assert t[overhead, PAPER]["result"] == "PASS"  # 250 / 240 = 1.04
    assert t[overhead, "B4_H16_L4096_D128"]["result"] == "FAIL"  # 480 / 400 = 1.2
    assert math.isclose(t[overhead, "B4_H16_L4096_D128"]["value"], 1.2)
    dense = "forward only: dense rotation+stats time <= 1.1x rollingq_fwd_nostats"
    assert t[dense, PAPER]["result"] == "FAIL"  # 250 / 200 = 1.25
    assert t[dense, "B4_H16_L4096_D128"]["result"] == "MISSING"
    mem = [x for x in res["targets"] if x["target"].startswith("peak memory")]
    assert len(mem) == 1 and mem[0]["result"] == "PASS"  # 1.1 exactly is within 1.1x

    printed = capsys.readouterr().out
    assert printed == table.read_text()
    lines = printed.splitlines()
    assert lines[0].startswith(f"rollingq bench: {CARD}")
    row = next(ln for ln in lines if ln.startswith("| B4_H16_L4096_D128 | rollingq_fwd |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "400.0" and cells[4] == "0.67x (sdpa_cudnn_fwd)"
    assert math.isclose(float(cells[2]), rec["B4_H16_L4096_D128", "rollingq_fwd"]["ms"], rel_tol=1e-3)
    assert any(ln.startswith("| B64_H1_L907_D768 | flex_fwd | fails: OutOfResources") for ln in lines)
    # the target lines come last, after the table
    first_target = next(i for i, ln in enumerate(lines) if re.match(r"(PASS|FAIL|N/A|MISSING) ", ln))
    assert all(re.match(r"(PASS|FAIL|N/A|MISSING) ", ln) for ln in lines[first_target:])
    assert max(i for i, ln in enumerate(lines) if ln.startswith("|")) < first_target


def test_summarize_missing_rollingq_and_memory():
    recs = [r for r in FAKE_RECORDS if r["impl"] != "rollingq_fwdbwd"]
    recs.append(fake(PAPER, "rollingq_fwdbwd", status="fails: should never be recorded for rollingq"))
    res = summarize.summarize(recs, commit="c")
    t = targets_by(res)
    assert t["fwd+bwd >= 0.9x flex_fwdbwd", "B4_H16_L4096_D128"]["result"] == "MISSING"
    assert t["paper layer fwd+bwd >= 2x sdpa_efficient_fwdbwd", PAPER]["result"] == "MISSING"
    assert res["peak_memory"] is None
    unrun = summarize.summarize([r for r in FAKE_RECORDS if r["impl"] != "unfused_fwd"], commit="c")
    assert targets_by(unrun)["fwd >= 3x unfused_fwd", PAPER]["result"] == "MISSING"  # a cut-short run
    assert [x["result"] for x in res["targets"] if x["target"].startswith("peak memory")] == ["MISSING"]
    over = dict(FAKE_MEMORY, rollingq_fwdbwd_bytes=1_200_000_000, ratio=1.2)
    res = summarize.summarize(FAKE_RECORDS + [over], commit="c")
    assert [x["result"] for x in res["targets"] if x["target"].startswith("peak memory")] == ["FAIL"]


def test_summarize_reads_jsonl_and_rejects_bad_input(tmp_path, capsys):
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in FAKE_RECORDS[:3]))
    out = tmp_path / "r.json"
    assert summarize.main([str(jsonl), "--out", str(out), "--commit", "deadbeef"]) == 0
    res = json.loads(out.read_text())
    assert res["commit"] == "deadbeef" and len(res["records"]) == 3
    capsys.readouterr()

    mixed = [FAKE_RECORDS[0], dict(FAKE_RECORDS[1], card="OTHER-FAKE-CARD")]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    assert summarize.main([str(jsonl)]) == 2
    assert "several cards" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"no": "benchmarks"}')
    assert summarize.main([str(bad)]) == 2
    assert "'benchmarks' list" in capsys.readouterr().err
    assert summarize.main([str(tmp_path / "absent.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_summary_constants_agree_with_the_bench():
    assert summarize.PEER_FAMILIES == peers.PEER_FAMILIES
    assert summarize.PAPER_LAYER == shapes.PAPER_LAYER
    for impl in peers.IMPL_ORDER + peers.EXTRA_IMPL_ORDER:
        assert summarize.family_of(impl) == peers.IMPLS[impl].family
        assert summarize.direction_of(impl) == peers.IMPLS[impl].direction
    named = {t[2] for t in summarize.TARGETS} | {t[3] for t in summarize.TARGETS} | set(summarize.MEMORY_PAIR)
    assert named <= set(peers.IMPL_ORDER)
    # gpu_check.sh takes its list of bench processes from summarize.GPU_SHAPE_NAMES (no torch import)
    assert summarize.GPU_SHAPE_NAMES == tuple(s.name for s in shapes.GPU_SHAPES)
    assert summarize.MEMORY_SHAPE_NAME == shapes.MEMORY_SHAPE.name
    assert summarize.MEMORY_PAIR == peers.MEMORY_IMPLS


# ------------------------------------------------------------------------------------------- plot
def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    res = summarize.summarize(FAKE_RECORDS + [FAKE_MEMORY], commit="c")
    (tmp_path / "results.json").write_text(json.dumps(res))
    png = tmp_path / "sub" / "plot.png"
    assert plot_results.main([str(tmp_path / "results.json"), "--out", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_without_matplotlib_or_records(tmp_path, monkeypatch, capsys):
    res = summarize.summarize(FAKE_RECORDS, commit="c")
    (tmp_path / "results.json").write_text(json.dumps(res))
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    assert plot_results.main([str(tmp_path / "results.json"), "--out", str(tmp_path / "p.png")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()
    (tmp_path / "empty.json").write_text(json.dumps(dict(res, records=[])))
    assert plot_results.main([str(tmp_path / "empty.json")]) == 2
    assert "no GPU records" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- pytest bench/
def test_pytest_bench_passes_on_cpu(tmp_path):
    """`pytest bench/` on a machine without CUDA: the smoke case runs, every GPU case skips."""
    env = child_env(CUDA_VISIBLE_DEVICES="")  # even on a GPU box: the full run is gpu_check.sh's
    env.pop("TRITON_INTERPRET", None)
    env.pop("ROLLINGQ_BENCH_JSONL", None)
    report = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/", "-q", "-rs", "-p", "no:cacheprovider",
                           f"--benchmark-json={report}", "--benchmark-storage", str(tmp_path / ".benchmarks")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    n_gpu = len(shapes.GPU_SHAPES) * (len(peers.IMPL_ORDER) + len(peers.EXTRA_IMPL_ORDER)) + 1
    assert re.search(rf"\b1 passed, {n_gpu} skipped\b", proc.stdout), proc.stdout[-2000:]
    assert "CUDA not available" in proc.stdout
    kinds = [b["extra_info"].get("kind") for b in json.loads(report.read_text())["benchmarks"]]
    assert kinds == ["cpu_smoke"]


def test_autotune_log_records_every_decision(tmp_path):
    """bench/autotune_log.py appends one line per new autotune key: each config's median time
    (None for a config that failed) and the winner; a cached key adds nothing."""
    import triton
    import triton.language as tl

    import autotune_log

    @triton.jit
    def _copy(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)

    fake_ms = {16: [2.0, 1.9, 2.1], 32: [float("inf")] * 3, 64: [1.5, 1.4, 1.6]}
    tuned = triton.autotune(
        configs=[triton.Config({"BLOCK": b}) for b in fake_ms], key=["n"],
        do_bench=lambda fn, quantiles: fake_ms[current[0]])(_copy)
    current = [None]
    original_bench = tuned._bench

    def bench(*args, config, **meta):  # which config do_bench is timing
        current[0] = config.kwargs["BLOCK"]
        return original_bench(*args, config=config, **meta)

    tuned._bench = bench
    path = tmp_path / "autotune.jsonl"
    undo = autotune_log.install(str(path))
    try:
        x = torch.arange(100, dtype=torch.float32)
        for n in (100, 100, 50):  # the second call hits the cache
            y = torch.zeros(100)
            tuned[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, n)
            assert torch.equal(y[:n], x[:n])
    finally:
        undo()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["key"][0] for r in lines] == ["100", "50"] and all(r["key_names"] == ["n"] for r in lines)
    for r in lines:
        assert r["kernel"] == "_copy" and "BLOCK: 64" in r["best"]
        assert sorted(r["ms"].values(), key=lambda v: (v is None, v)) == [1.5, 2.0, None]


def test_autotune_report_ranks_configs_and_compares_the_wide_split(tmp_path, capsys):
    """bench/autotune_report.py on decisions in the log's format (config strings as Triton prints
    them): fastest first with ratios, failed configs last, the plain/wide comparison where a key
    timed both; an empty log reads as no decision, a missing file exits 2."""
    import triton

    import autotune_report

    def cfg(bm, bn, s, wide):
        return str(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WIDE": wide}, num_warps=8, num_stages=s))

    line = {"kernel": "_rollingq_fwd_kernel", "key": ["907", "907", "768", "torch.bfloat16"],
            "key_names": ["Lq", "Lk", "HEAD_D"], "best": cfg(64, 16, 2, 1),
            "ms": {cfg(64, 32, 1, 0): 3.0, cfg(64, 16, 2, 1): 2.0, cfg(64, 16, 3, 1): None, cfg(128, 16, 1, 0): 2.5}}
    path = tmp_path / "autotune.jsonl"
    path.write_text(json.dumps(line) + "\n")
    assert autotune_report.main([str(path), "--out", str(tmp_path / "a.md")]) == 0
    text = capsys.readouterr().out
    assert text.strip() == (tmp_path / "a.md").read_text().strip()
    assert "_rollingq_fwd_kernel: Lq=907 Lk=907 HEAD_D=768 torch.bfloat16" in text
    rows = [r for r in text.splitlines() if r.startswith("| BM")]
    assert rows == ["| BM64 BN16 w8 s2 wide | 2.0000 | 1.00 |", "| BM128 BN16 w8 s1 | 2.5000 | 1.25 |",
                    "| BM64 BN32 w8 s1 | 3.0000 | 1.50 |", "| BM64 BN16 w8 s3 wide | failed | - |"]
    assert "best plain / best wide split: 1.25 (wide faster)" in text
    path.write_text("")
    assert autotune_report.main([str(path)]) == 0 and "no autotuning decision" in capsys.readouterr().out
    assert autotune_report.main([str(tmp_path / "missing.jsonl")]) == 2


# ------------------------------------------------------------------------- flex at D > 256 (audit 3)
def test_flex_is_not_compiled_above_head_dim_256(monkeypatch):
    """FlexAttention cannot run D > 256 (shared memory; docs/gpu.md, the paper's D 768): its cases
    are recorded as the known failure without building (torch.compile on the GPU check's clock)."""
    built = []

    def build(impl_name, inp, compile_flex=True):
        built.append((impl_name, inp.shape.head_dim))
        raise peers.PeerFailed("boom")

    monkeypatch.setattr(peers, "build", build)
    assert shapes.BY_NAME[PAPER].head_dim > peers.FLEX_MAX_HEAD_DIM == 256
    wide = shapes.Shape("B1_H1_L16_D288", 1, 1, 16, 288, (8, 8))
    for impl in ("flex_fwd", "flex_fwdbwd"):
        rec = peers.measure_case(wide, impl, "cpu", timer=peers.wallclock_ms, dtype=torch.float32)
        assert rec["status"] == peers.FLEX_KNOWN_FAILURE and rec["ms"] is None and rec["tflops"] is None
    assert built == []
    at_limit = shapes.Shape("B1_H1_L16_D256", 1, 1, 16, 256, (8, 8))  # still tried (and here made to fail)
    assert peers.measure_case(at_limit, "flex_fwd", "cpu", dtype=torch.float32)["status"] == "fails: boom"
    assert built == [("flex_fwd", 256)]
    # in the summary: the flex targets of that shape are N/A, the table row names the known failure in full
    recs = [r for r in FAKE_RECORDS if r["family"] != "flex"] + [
        fake(PAPER, "flex_fwd", status=peers.FLEX_KNOWN_FAILURE), fake(PAPER, "flex_fwdbwd", status=peers.FLEX_KNOWN_FAILURE)]
    res = summarize.summarize(recs, commit="c")
    t = targets_by(res)
    assert t["fwd >= 1.0x flex_fwd", PAPER]["result"] == "N/A"
    assert t["fwd >= 1.0x flex_fwd", PAPER]["detail"] == "flex_fwd: " + peers.FLEX_KNOWN_FAILURE
    assert f"| {PAPER} | flex_fwdbwd | {peers.FLEX_KNOWN_FAILURE} | | |" in summarize.format_report(res)


# ------------------------------------------------------------------ every target listed (audit 7, 6)
def test_summary_lists_every_shape_and_target_measured_or_not():
    """Shapes the run never reached show every target as MISSING instead of vanishing; the
    statistics/rotation target says it is measured on the forward only."""
    res = summarize.summarize(FAKE_RECORDS + [FAKE_MEMORY], commit="c")
    t = targets_by(res)
    unreached = [n for n in summarize.GPU_SHAPE_NAMES if n not in (PAPER, "B4_H16_L4096_D128")]
    assert unreached == ["B64_H12_L907_D64", "B4_H16_L8192_D64", "B2_H32_L8192_D128_causal"]
    for name in unreached:
        for text, only, ours, _, _, _ in summarize.TARGETS:
            if only is None:
                assert t[text, name]["result"] == "MISSING" and t[text, name]["detail"] == f"{ours}: not run"
            else:
                assert (text, name) not in t
    empty = summarize.summarize([], commit="c")
    expected = [(text, name) for text, only, *_ in summarize.TARGETS for name in summarize.GPU_SHAPE_NAMES
                if only in (None, name)] + [(f"peak memory fwd+bwd <= {summarize.MEMORY_THRESHOLD}x sdpa_flash_fwdbwd",
                                             summarize.MEMORY_SHAPE_NAME)]
    assert [(x["target"], x["shape"]) for x in empty["targets"]] == expected
    assert {x["result"] for x in empty["targets"]} == {"MISSING"}
    report = summarize.format_report(empty)
    assert sum(ln.startswith("MISSING ") for ln in report.splitlines()) == len(expected) == 5 * 5 + 2 + 1
    assert "[B2_H32_L8192_D128_causal]" in report
    overhead = [text for text, _, ours, theirs, _, _ in summarize.TARGETS
                if (ours, theirs) == ("rollingq_fwd", "rollingq_fwd_nostats")]
    assert overhead and all("forward only" in text for text in overhead)


def test_summary_warns_when_the_commit_is_unknown():
    lines = summarize.format_report(summarize.summarize([], commit="unknown")).splitlines()
    assert lines[0].endswith(("commit unknown, torch None, triton None")) and lines[1].startswith(
        "WARNING: COMMIT UNKNOWN") and "ROLLINGQ_COMMIT=" in lines[1]
    assert "WARNING" not in summarize.format_report(summarize.summarize([], commit="abc123"))


# ----------------------------------------------------------------------- merged reports (audit 5)
def test_merge_reports_joins_the_per_process_reports(tmp_path, capsys):
    import merge_reports

    a = write_fake_report(tmp_path / "a.json", FAKE_RECORDS[:2])
    b = write_fake_report(tmp_path / "b.json", FAKE_RECORDS[2:4])
    (tmp_path / "cut.json").write_text("")  # a process cut short writes nothing readable
    out = tmp_path / "bench.json"
    parts = [a, tmp_path / "cut.json", b, tmp_path / "absent.json"]
    assert merge_reports.main([str(out)] + [str(p) for p in parts]) == 0
    err = capsys.readouterr().err
    assert "cut.json" in err and "absent.json" in err
    merged = json.loads(out.read_text())
    assert merged["datetime"] == "2026-01-02T03:04:05"
    infos = [bm["extra_info"] for bm in merged["benchmarks"]]
    assert [i for i in infos if i.get("kind") == "attention"] == FAKE_RECORDS[:4]
    assert len(summarize.load_raw(out)[0]) == 6  # 4 records and the smoke entry of each part
    assert merge_reports.main([str(out), str(tmp_path / "cut.json")]) == 1
    assert json.loads(out.read_text()) == {"benchmarks": []}


def test_bench_select_runs_one_unit_and_rejects_unknown_names():
    env = child_env(CUDA_VISIBLE_DEVICES="", ROLLINGQ_BENCH_SELECT="memory,bogus")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider",
                           "--benchmark-disable", "--co"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "unknown ['bogus']" in proc.stdout + proc.stderr
    env["ROLLINGQ_BENCH_SELECT"] = "B4_H16_L8192_D64"
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider",
                           "--benchmark-disable", "--co"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    ids = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    assert proc.returncode == 0 and ids and all("[B4_H16_L8192_D64-" in ln for ln in ids), proc.stdout[-2000:]
    assert len([i for i in ids if "::test_attention[" in i]) == len(peers.IMPL_ORDER)


# ------------------------------------------------------------------- precompile's jobs (audit 1, 4)
_PLAN_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, "bench")
import launches as L
import precompile as P
plan = L.gpu_check_plan()
real = [(L.bench_problems(None), L.BENCH_DTYPES)]
out = {"jobs": [j[0] for j in L.plan_jobs(plan, 90)], "n_parity": len(L.plan_jobs(plan[:1], 90)),
       "bench": [(p.name, p.batch) for p in plan[1][0]], "dtypes": [list(d) for _, d in plan],
       "uncovered": L.uncovered_launches(plan, real, 90)}
L.RECORD_BATCH = 1  # the batch precompile used to record at: the check must see what it misses
out["uncovered_at_b1"] = L.uncovered_launches(L.gpu_check_plan(), real, 90)
os.sched_getaffinity = lambda pid: set(range(64))
out["workers_64"] = P.default_workers()
os.sched_getaffinity = lambda pid: {3, 5}
out["workers_2"] = P.default_workers()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def precompile_plan():
    env = child_env()
    env.pop("TRITON_INTERPRET", None)  # the recorded specialisation is the compiler's, not the interpreter's
    proc = subprocess.run([sys.executable, "-c", _PLAN_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_precompile_records_the_bench_at_its_real_batch(precompile_plan):
    """At B = 1 the shared ids and row mask have a batch stride of L, not 0: other divisibility hints,
    another cache key, so the B 64 shapes' kernels (the paper's layer) compiled on the clock. The
    jobs must cover every bench launch at the shape's own batch; the check sees a B = 1 recording."""
    plan = precompile_plan
    for name, batch in plan["bench"]:
        shape = next(s for s in shapes.GPU_SHAPES + (shapes.MEMORY_SHAPE,) if name.startswith(s.name + "_"))
        assert batch == shape.batch, (name, batch)
    assert plan["uncovered"] == []
    missed = plan["uncovered_at_b1"]
    assert any(f" {PAPER}_fwd " in m for m in missed) and any(" B64_H12_L907_D64_fwdbwd " in m for m in missed)


def test_precompile_builds_only_what_is_launched_parity_first(precompile_plan):
    """The bench runs bf16 only, no fwd+bwd without statistics, only fwd+bwd at the memory shape;
    the parity tests (which run first) get their kernels first; at most 16 workers, by affinity."""
    plan = precompile_plan
    mem = shapes.MEMORY_SHAPE.name
    expected = [f"{mem}_fwdbwd"] + [f"{s.name}_{suffix}" for s in shapes.GPU_SHAPES
                                    for suffix in ("fwd", "fwd_nostats", "fwd_denserot", "fwdbwd")]
    assert [name for name, _ in plan["bench"]] == expected  # the bench's own order: memory first
    assert plan["dtypes"] == [["bf16", "fp16", "fp32"], ["bf16"]]
    jobs, n = [j.split() for j in plan["jobs"]], plan["n_parity"]
    assert 0 < n < len(jobs)
    assert all(j[2].startswith("test_") for j in jobs[:n])
    assert all(not j[2].startswith("test_") and j[1] == "bf16" for j in jobs[n:])
    assert plan["workers_64"] == 16 and plan["workers_2"] == 2


# ------------------------------------------------------------------------- gpu_check.sh (audit 2, 5, 6)
ALLOWED_OUT = {"bench.json", "results.json", "table.md", "autotune.md", "parity.log", "bench.log", "records.jsonl",
               "autotune.jsonl"}
_FAKE_RECORD = json.dumps({"kind": "attention", "shape": "B64_H12_L907_D64", "impl": "rollingq_fwd",
                           "family": "rollingq", "direction": "fwd", "status": "ok", "ms": 1.0, "tflops": 100.0,
                           "card": "FAKE-CARD", "device": "cuda", "torch": "FAKE", "triton": "FAKE"})
# Stands in for python3: the real interpreter, except for the steps a case replaces (FAKE_MODE).
_FAKE_PY = r"""#!/usr/bin/env bash
case "$*" in
  "-m pytest tests/"*) echo "fake parity: 1 passed"; exit 0 ;;
  "bench/precompile.py"*) echo "fake precompile"; exit 0 ;;
  "-m pytest bench/"*)
    case "$FAKE_MODE:$ROLLINGQ_BENCH_SELECT" in
      hang:memory,smoke) trap '' INT; exec sleep 60 ;;  # ignores SIGINT: killed after the grace
      crash:B64_H1_L907_D768) echo "killed"; exit 137 ;;
      crash:B64_H12_L907_D64) echo '%s' >> "$ROLLINGQ_BENCH_JSONL"; echo "fake illegal address"; exit 1 ;;
    esac ;;
  "-c import sys, torch, triton"*) [ "$FAKE_MODE" = hang ] && { echo "fake versions"; exit 3; } ;;
esac
exec %s "$@"
"""


def _gpu_check(tmp_path, mode, **env_extra):
    """bash bench/gpu_check.sh on this CPU box, the interpreter picked from PATH (a python3 stand-in
    first, a `python` that works only for the pick's look-up), git failing as in a copy without .git."""
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"python3": _FAKE_PY % (_FAKE_RECORD, sys.executable), "git": "#!/bin/sh\nexit 128\n",
               "python": f'#!/usr/bin/env bash\ncase "$1 $2" in "-c import importlib.util"*) exec {sys.executable} '
                         f'"$@" ;; esac\necho "WRONG INTERPRETER: python before python3"; exit 1\n'}
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in child_env().items() if not k.startswith(("ROLLINGQ_", "TRITON_INTERPRET", "PYTHON"))}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", CUDA_VISIBLE_DEVICES="", ROLLINGQ_SKIP_INSTALL="1",
               OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path), FAKE_MODE=mode, **env_extra)
    start = time.monotonic()
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    return proc, time.monotonic() - start


@pytest.mark.slow
def test_gpu_check_isolates_each_bench_unit(tmp_path):
    """A dry run of the one-call check: the memory measurement first, then one pytest process per
    shape; a shape killed (137) or crashed (a sticky CUDA error) leaves the later shapes running and
    its records in the summary; unreached targets MISSING; at most the 8 files under $OUT; python3
    preferred; no .git: commit unknown, loudly."""
    proc, _ = _gpu_check(tmp_path, "crash")
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-2000:]
    assert "WRONG INTERPRETER" not in out
    assert "steps failed: no-cuda-device bench:B64_H1_L907_D768(timeout) bench:B64_H12_L907_D64(rc=1);" in out
    units = re.findall(r"^--- (\S+) \(limit \d+ s", out, flags=re.MULTILINE)
    assert units == ["memory"] + list(summarize.GPU_SHAPE_NAMES)
    assert re.search(r"--- B4_H16_L4096_D128 .*\n\d+ skipped, \d+ deselected", out)  # ran after the crash
    assert re.search(r"--- memory .*\n1 passed, 1 skipped, \d+ deselected", out)  # memory + the CPU smoke case
    assert out.count("WARNING: COMMIT UNKNOWN") >= 2  # at the start, and again before the table
    files = set(os.listdir(tmp_path / "out"))
    assert files <= ALLOWED_OUT and len(files) <= 8, files
    assert not list(tmp_path.glob("rollingq_bench_parts.*"))  # the per-process reports, merged and removed
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["commit"] == "unknown"
    assert [(r["shape"], r["impl"]) for r in res["records"]] == [("B64_H12_L907_D64", "rollingq_fwd")]
    assert len([t for t in res["targets"] if t["result"] == "MISSING"]) == len(res["targets"]) == 28
    table = (tmp_path / "out" / "table.md").read_text()
    assert out.rstrip().endswith(table.rstrip())  # the table prints last
    kinds = [b["extra_info"]["kind"] for b in json.loads((tmp_path / "out" / "bench.json").read_text())["benchmarks"]]
    assert kinds == ["cpu_smoke"]


@pytest.mark.slow
def test_gpu_check_keeps_the_total_budget(tmp_path):
    """A unit that ignores SIGINT is killed after the grace (rc 137: a timeout); the units after it
    share the bench deadline, so they are not started; the whole run stays within TOTAL_BUDGET."""
    budget = 22
    proc, wall = _gpu_check(tmp_path, "hang", TOTAL_BUDGET=str(budget), KILL_GRACE="2", BENCH_MIN_UNIT_S="3")
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-2000:]
    not_run = " ".join(f"bench:{n}(not run)" for n in summarize.GPU_SHAPE_NAMES)
    assert f"steps failed: no-cuda-device bench:memory(timeout) {not_run};" in out, out[-3000:]
    assert "memory hit the bench deadline (rc=137)" in out
    assert wall <= budget, wall
    assert "MISSING peak memory" in out
