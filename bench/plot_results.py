"""Grouped bar chart of a results.json (from summarize.py): TFLOP/s per implementation per shape.

    python bench/plot_results.py OUT/results.json --out OUT/plot.png

Two panels, forward and forward + backward; a case that did not run (n/a, fails) has no bar and is
marked with an "x" on the axis. matplotlib is an optional extra (`pip install -e .[plot]`).
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

DIRECTION_TITLES = (("fwd", "forward"), ("fwdbwd", "forward + backward"))


class PlotError(RuntimeError):
    """Input that cannot be plotted, or matplotlib missing."""


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotError("plot_results.py needs matplotlib (pip install matplotlib, or pip install -e .[plot])") from exc
    matplotlib.use("Agg")  # files only: no display on the GPU box or in CI
    import matplotlib.pyplot as plt
    return plt


def plot(results: dict, out: Path) -> Path:
    """Write the chart of `results` (the summarize.py schema) to `out` (format from its suffix)."""
    records = results.get("records")
    if not isinstance(records, list):
        raise PlotError("results must hold a 'records' list (the output of bench/summarize.py)")
    if not records:
        raise PlotError("results hold no GPU records: nothing to plot")
    plt = _pyplot()
    shapes = list(dict.fromkeys(r["shape"] for r in records))
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 2.2 * len(shapes)), 9), squeeze=False)
    for ax, (direction, title) in zip(axes[:, 0], DIRECTION_TITLES):
        recs = [r for r in records if r.get("direction") == direction]
        impls = list(dict.fromkeys(r["impl"] for r in recs))
        width = 0.8 / max(1, len(impls))
        by_key = {(r["shape"], r["impl"]): r for r in recs}
        for j, impl in enumerate(impls):
            xs, ys, missing = [], [], []
            for i, shape in enumerate(shapes):
                x = i - 0.4 + width * (j + 0.5)
                r = by_key.get((shape, impl))
                if r is None:
                    continue
                if r.get("status") == "ok" and r.get("tflops") is not None:
                    xs.append(x)
                    ys.append(r["tflops"])
                else:
                    missing.append(x)
            bars = ax.bar(xs, ys, width=width, label=impl)
            if missing:
                ax.plot(missing, [0] * len(missing), "x", color=bars.patches[0].get_facecolor() if xs else "k",
                        clip_on=False)
        ax.set_title(title)
        ax.set_ylabel("TFLOP/s")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=15, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        if impls:
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"rollingq attention, bf16: {results.get('card')}, {results.get('date')}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.json written by bench/summarize.py")
    parser.add_argument("--out", type=Path, default=Path("plot.png"), help="image to write (default plot.png)")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text(encoding="utf-8"))
        path = plot(results, args.out)
    except (OSError, json.JSONDecodeError, PlotError) as exc:
        print(f"plot_results: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
