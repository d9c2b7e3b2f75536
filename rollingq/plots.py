"""Per-epoch plots of training runs (matplotlib, Agg backend; optional dependency).

`plot_histories({method: [history_seed0, history_seed1, ...]}, path)`, where a history is the list
of per-epoch records of `rollingq.train.run` (the lines of metrics.jsonl). Curves are the mean over
seeds with a band of one standard deviation. Modality 0 is the favoured (easy) modality of the
synthetic task, modality 1 the clean one on the `corrupt_0` subset.
"""
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np


def _series(histories: Sequence[List[Dict[str, Any]]], get: Callable[[Dict[str, Any]], Any]) -> Optional[np.ndarray]:
    """[seeds, epochs] float array (NaN where missing), or None when no value exists at all."""
    rows = []
    for h in histories:
        row = []
        for rec in h:
            try:
                v = get(rec)
            except (KeyError, IndexError, TypeError):
                v = None
            row.append(np.nan if v is None else float(v))
        rows.append(row)
    if not rows or not rows[0]:
        return None
    n = max(len(r) for r in rows)
    arr = np.full((len(rows), n), np.nan)
    for i, r in enumerate(rows):
        arr[i, :len(r)] = r
    return None if np.isnan(arr).all() else arr


def plot_histories(runs: Dict[str, Sequence[List[Dict[str, Any]]]], path: str,
                   title: Optional[str] = None) -> Optional[str]:
    """Write a 2x2 figure (AIR, attention mass, key gap, accuracy per epoch) to `path`.
    Returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    colors = {"vanilla": "tab:red", "rollingq": "tab:blue", "rollingq-step40": "tab:cyan", "concat": "tab:gray",
              "sum": "tab:olive"}

    def draw(ax, name, get, style="-", label=None):
        arr = _series(runs[name], get)
        if arr is None:
            return
        x = np.arange(1, arr.shape[1] + 1)
        with np.errstate(all="ignore"):
            mean, std = np.nanmean(arr, 0), np.nanstd(arr, 0)
        color = colors.get(name)
        ax.plot(x, mean, style, color=color, label=label or name)
        if arr.shape[0] > 1:
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)

    for name in runs:
        draw(axes[0, 0], name, lambda r: r["air"], label=f"{name}: AIR (train)")
        draw(axes[0, 0], name, lambda r: r["air_test"]["corrupt_0"], "--", f"{name}: AIR, audio corrupted (test)")
        draw(axes[0, 1], name, lambda r: r["mass"]["clean"][0], "-", f"{name}: on audio, clean samples")
        draw(axes[0, 1], name, lambda r: r["mass"]["corrupt_0"][0], "--", f"{name}: on audio, audio corrupted")
        draw(axes[0, 1], name, lambda r: r["mass"]["corrupt_0"][1], ":", f"{name}: on visual, audio corrupted")
        draw(axes[1, 0], name, lambda r: r["key_gap"], label=name)
        draw(axes[1, 1], name, lambda r: r["test_acc"], "-", f"{name}: all test")
        draw(axes[1, 1], name, lambda r: r["acc"]["corrupt_0"], "--", f"{name}: audio corrupted")
    titles = ("AIR = c[audio] - c[visual]", "fusion-token attention mass", "key gap 1 - cos(kbar_audio, kbar_visual)",
              "test accuracy")
    for ax, t in zip(axes.flat, titles):
        ax.set_title(t)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0, 0].axhline(0, color="k", lw=0.5)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
