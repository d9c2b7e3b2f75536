"""What the autotuner chose in a GPU run: autotune.jsonl (bench/autotune_log.py) as a table per
kernel and key, each config's median time against the winner's, fastest first; and, where a key
timed both the plain and the wide split (the `WIDE` config flag), how the best of each compare.

    python bench/autotune_report.py OUT/autotune.jsonl [--out OUT/autotune.md]

Standard library only. The exit status is 0 for a readable file (empty included), 2 otherwise.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

_SHORT = (("BLOCK_M", "BM"), ("BLOCK_N", "BN"), ("num_warps", "w"), ("num_stages", "s"))


def parse_config(text: str) -> Dict[str, str]:
    """'BLOCK_M: 64, BLOCK_N: 16, WIDE: 1, num_warps: 8, ...' -> {'BLOCK_M': '64', ...}."""
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition(":")
        if sep:
            out[name.strip()] = value.strip()
    return out


def short(config: Dict[str, str]) -> str:
    """BM64 BN16 w8 s2 (wide), the other kwargs appended as name=value."""
    known = {name for name, _ in _SHORT} | {"WIDE", "num_ctas", "maxnreg"}
    words = [f"{tag}{config[name]}" for name, tag in _SHORT if name in config]
    words += [f"{k}={v}" for k, v in config.items() if k not in known]
    if config.get("WIDE", "0") not in ("0", "None"):
        words.append("wide")
    return " ".join(words)


def key_label(line: dict) -> str:
    names = line.get("key_names") or []
    values = line.get("key", [])
    named = [f"{n}={v}" for n, v in zip(names, values)]
    return " ".join(named + list(values[len(names):]))


def decision_rows(line: dict) -> List[dict]:
    """[{config, ms, ratio}] fastest first; ratio = ms / the fastest ms (None for a failed config)."""
    timed = [(parse_config(c), ms) for c, ms in line.get("ms", {}).items()]
    best = min((ms for _, ms in timed if ms is not None), default=None)
    rows = [{"config": short(c), "wide": c.get("WIDE", "0") not in ("0", "None"), "ms": ms,
             "ratio": (ms / best) if (ms is not None and best) else None} for c, ms in timed]
    return sorted(rows, key=lambda r: (r["ms"] is None, r["ms"] or 0.0))


def wide_vs_plain(rows: Sequence[dict]) -> Optional[float]:
    """Best plain time over best wide time (> 1: the wide split is faster), when a key timed both."""
    wide = [r["ms"] for r in rows if r["wide"] and r["ms"] is not None]
    plain = [r["ms"] for r in rows if not r["wide"] and r["ms"] is not None]
    return min(plain) / min(wide) if wide and plain else None


def report(lines: Sequence[dict]) -> str:
    out = ["# Autotuning decisions", ""]
    for line in lines:
        rows = decision_rows(line)
        out += [f"## {line.get('kernel', '?')}: {key_label(line)}", "", "| config | ms | x fastest |", "|---|---|---|"]
        for r in rows:
            ms = "failed" if r["ms"] is None else f"{r['ms']:.4f}"
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
            out.append(f"| {r['config']} | {ms} | {ratio} |")
        wvp = wide_vs_plain(rows)
        if wvp is not None:
            out += ["", f"best plain / best wide split: {wvp:.2f} ({'wide' if wvp > 1 else 'plain'} faster)"]
        out.append("")
    if not lines:
        out.append("(no autotuning decision recorded)")
    return "\n".join(out)


def load(path: Path) -> List[dict]:
    return [json.loads(t) for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", type=Path, help="autotune.jsonl of a GPU run")
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    a = ap.parse_args(argv)
    try:
        lines = load(a.input)
    except (OSError, ValueError) as e:
        print(f"cannot read {a.input}: {e}", file=sys.stderr)
        return 2
    text = report(lines)
    print(text)
    if a.out:
        a.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
