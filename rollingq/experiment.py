"""The comparison experiment: `python -m rollingq.experiment [--quick] [--seeds 3] [--out DIR]`.

Trains vanilla attention fusion, RollingQ, and the concat / sum baselines on the default synthetic
task for each seed (CPU processes in parallel, one thread each), then writes into the folder:
`results.md` (mean ± std over seeds of the final epoch), `results.json` (every epoch of every run),
`curves.png` (per-epoch AIR, attention mass, key gap, accuracy) and each run's metrics.jsonl.
"""
import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

# Variants compared: name -> TrainConfig overrides. `rollingq` is the official schedule (decide at
# the end of each epoch, one rotation); `rollingq-step40` rotates once after 40 training steps
# (two thirds into the first epoch, during warm-up), the rotation timing that worked best when
# the task was tuned (docs/training.md).
VARIANTS = {
    "vanilla": {"method": "vanilla"},
    "rollingq": {"method": "rollingq"},
    "rollingq-step40": {"method": "rollingq", "every_n_steps": 40},
    "concat": {"method": "concat"},
    "sum": {"method": "sum"},
}
METHODS = tuple(VARIANTS)


def _run_one(job: Dict[str, Any]) -> Tuple[str, int, List[Dict[str, Any]]]:
    """Worker: one (variant, seed) run; job = {name, seed, out, spec, train}. Imports torch
    inside the (spawned) worker."""
    import torch
    from .data import SyntheticSpec, make_synthetic
    from .train import TrainConfig, run

    torch.set_num_threads(job.get("threads", 1))
    spec = SyntheticSpec(seed=job["seed"], **job.get("spec", {}))
    name = job.get("name", job.get("method"))
    overrides = {**VARIANTS.get(name, {"method": job.get("method")}), **job.get("train", {})}
    cfg = TrainConfig(seed=job["seed"], device="cpu", out=job["out"], progress=False,
                      quiet=True, threads=job.get("threads", 1), **overrides)
    return name, job["seed"], run(cfg, make_synthetic(spec))


def run_jobs(jobs: List[Dict[str, Any]], workers: int) -> Dict[str, Dict[int, List[Dict[str, Any]]]]:
    """Run the jobs (in `workers` spawned processes when > 1); -> {method: {seed: history}}."""
    results: Dict[str, Dict[int, List[Dict[str, Any]]]] = {}
    if workers <= 1:
        done = map(_run_one, jobs)
        for method, seed, hist in done:
            results.setdefault(method, {})[seed] = hist
            print(f"  done {method} seed {seed}", flush=True)
        return results
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for method, seed, hist in pool.map(_run_one, jobs):
            results.setdefault(method, {})[seed] = hist
            print(f"  done {method} seed {seed}", flush=True)
    return results


def _final(hist: List[Dict[str, Any]]) -> Dict[str, Optional[float]]:
    r = hist[-1]
    mass = r.get("mass") or {}
    return {
        "acc": r["test_acc"],
        "acc_clean": r["acc"].get("clean"),
        "acc_fav_corrupt": r["acc"].get("corrupt_0"),
        "acc_other_corrupt": r["acc"].get("corrupt_1"),
        "probe_audio": r["probe_acc"][0],
        "probe_visual": r["probe_acc"][1],
        "abs_air": None if r.get("air") is None else abs(r["air"]),
        "max_abs_air": max((abs(h["air"]) for h in hist if h.get("air") is not None), default=None),
        "mass_clean_on_audio": mass["clean"][0] if "clean" in mass else None,
        "mass_favcorr_on_visual": mass["corrupt_0"][1] if "corrupt_0" in mass else None,
        "mass_favcorr_on_audio": mass["corrupt_0"][0] if "corrupt_0" in mass else None,
        "key_gap": r.get("key_gap"),
    }


COLUMNS = [
    ("acc", "test acc"),
    ("acc_clean", "acc clean"),
    ("acc_fav_corrupt", "acc, audio (favoured) corrupted"),
    ("acc_other_corrupt", "acc, visual corrupted"),
    ("probe_visual", "visual probe acc"),
    ("abs_air", "final abs(AIR)"),
    ("max_abs_air", "max abs(AIR) over epochs"),
    ("mass_favcorr_on_visual", "mass on visual (clean modality), audio corrupted"),
    ("mass_favcorr_on_audio", "mass on audio, audio corrupted"),
    ("mass_clean_on_audio", "mass on audio, clean samples"),
    ("key_gap", "key gap"),
]


def _field(rec: Dict[str, Any], *path: Any) -> Optional[float]:
    """rec[path[0]][path[1]]...; None where the record lacks it or holds null."""
    v: Any = rec
    for k in path:
        try:
            v = v[k]
        except (KeyError, IndexError, TypeError):
            return None
        if v is None:
            return None
    return v


def _stats(vals: Sequence[Optional[float]]) -> Optional[Tuple[float, float]]:
    """Mean and population std (ddof=0) over the values that exist (None = missing, as NaN);
    None when all are missing. A run can lack a value (e.g. AIR of an epoch with no statistics)."""
    arr = np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64)
    if arr.size == 0 or np.isnan(arr).all():
        return None
    return float(np.nanmean(arr)), float(np.nanstd(arr))


def _mean_cell(vals: Sequence[Optional[float]], fmt: str = "{:.3f}") -> str:
    st = _stats(vals)
    return "-" if st is None else fmt.format(st[0])


def summary_table(results: Dict[str, Dict[int, List[Dict[str, Any]]]]) -> str:
    """Markdown table, one row per method, mean ± population std (ddof=0) over seeds of the final
    epoch; missing values are left out of both, "-" when no seed has one."""
    lines = ["| method | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for method, by_seed in results.items():
        finals = [_final(h) for _, h in sorted(by_seed.items())]
        cells = []
        for key, _ in COLUMNS:
            st = _stats([f[key] for f in finals])
            cells.append("-" if st is None else f"{st[0]:.3f} ± {st[1]:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def epoch_table(results: Dict[str, Dict[int, List[Dict[str, Any]]]],
                methods=("vanilla", "rollingq", "rollingq-step40")) -> str:
    """Per-epoch means over seeds of AIR, visual mass on audio-corrupted samples, key gap and
    accuracy on the audio-corrupted subset, for the attention methods. A missing value (null AIR of
    an epoch without statistics) is left out of the mean; "-" when every seed lacks it."""
    lines = ["| epoch | " + " | ".join(f"{m} AIR | {m} mass visual (audio corr.) | {m} key gap | {m} acc (audio corr.)"
                                       for m in methods if m in results) + " |"]
    present = [m for m in methods if m in results]
    lines.append("|---|" + "---|" * (4 * len(present)))
    n = min(len(h) for m in present for h in results[m].values())
    for e in range(n):
        cells = []
        for m in present:
            rs = [h[e] for h in results[m].values()]
            cells += [_mean_cell([_field(r, "air") for r in rs], "{:+.3f}"),
                      _mean_cell([_field(r, "mass", "corrupt_0", 1) for r in rs]),
                      _mean_cell([_field(r, "key_gap") for r in rs]),
                      _mean_cell([_field(r, "acc", "corrupt_0") for r in rs])]
        lines.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rollingq.experiment", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny data and 2 epochs (a smoke test, not a result)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="default: the training default (quick: 2)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--out", default=None, help="folder (default runs/experiment-<time>)")
    p.add_argument("--workers", type=int, default=None, help="parallel CPU processes (default: cores)")
    ns = p.parse_args(argv)
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        p.error(f"--methods must list names from {METHODS}, got {ns.methods!r}")
    if ns.seeds < 1:
        p.error(f"--seeds must be >= 1, got {ns.seeds}")
    out = ns.out or os.path.join("runs", time.strftime("experiment-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    workers = ns.workers or (os.cpu_count() or 1)
    spec, train = {}, {}
    if ns.quick:
        spec = {"n_train": 256, "n_test": 64}
        train = {"epochs": 2, "dim": 32, "enc_layers": 1}
    if ns.epochs is not None:
        train["epochs"] = ns.epochs
    jobs = [{"name": m, "seed": s, "out": os.path.join(out, "runs", f"{m}-s{s}"), "spec": spec, "train": train}
            for s in range(ns.seeds) for m in methods]
    # Longest jobs first keeps the workers busy until the end.
    jobs.sort(key=lambda j: VARIANTS[j["name"]]["method"] not in ("vanilla", "rollingq"))
    print(f"{len(jobs)} runs on {workers} worker(s) -> {out}", flush=True)
    t0 = time.time()
    results = run_jobs(jobs, workers)
    results = {m: results[m] for m in methods if m in results}
    wall = time.time() - t0
    from .train import TrainConfig
    cfg = asdict(TrainConfig(**train))
    table = summary_table(results)
    epochs = epoch_table(results) if {"vanilla", "rollingq", "rollingq-step40"} & set(results) else ""
    md = [f"# RollingQ experiment ({time.strftime('%Y-%m-%d %H:%M')})", "",
          f"Synthetic task (defaults{', ' + json.dumps(spec) if spec else ''}), {ns.seeds} seed(s), "
          f"{cfg['epochs']} epochs, {cfg['optimizer']} lr {cfg['lr']}, batch {cfg['batch_size']}; "
          f"wall time {wall:.0f} s on {workers} worker(s). Mean ± std over seeds (population std, "
          "ddof=0), final epoch. "
          "Audio (modality 0) is the easy, favoured modality; 'audio corrupted' is the test subset "
          "where it carries only noise. Mass = share of the fusion token's attention.", "", table, ""]
    if epochs:
        md += ["Per epoch (mean over seeds):", "", epochs, ""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"wall_s": wall, "spec": spec, "train": cfg,
                   "runs": {m: {str(s): h for s, h in r.items()} for m, r in results.items()}}, f)
    from .plots import plot_histories
    png = plot_histories({m: list(r.values()) for m, r in results.items()}, os.path.join(out, "curves.png"),
                         title=f"{ns.seeds} seed(s), mean ± std")
    print()
    print(table)
    if epochs:
        print()
        print(epochs)
    print(f"\nwall time {wall:.0f} s; results in {out}" + (f", plot {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
