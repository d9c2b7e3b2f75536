"""Merge the pytest-benchmark JSON reports of several pytest processes into one report.

    python bench/merge_reports.py OUT/bench.json PART.json [PART.json ...]

bench/gpu_check.sh runs the bench as one pytest process per shape (crash isolation), each with its
own --benchmark-json; this writes them as one report: the first readable part's metadata and every
part's "benchmarks" list, in the order given. A part that is missing or not a report (a process cut
short writes none) is named on stderr and skipped. The summary does not need this file (it reads
records.jsonl); it is the raw report docs/gpu.md asks for.

Standard library only. Exit status 0 when at least one part was merged, 1 when none was (an empty
report is still written), 2 for bad arguments.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple


def merge(parts: Sequence[Path]) -> Tuple[dict, List[str]]:
    """(merged report, one line per part skipped)."""
    merged: Optional[dict] = None
    skipped: List[str] = []
    for part in parts:
        try:
            data = json.loads(Path(part).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            skipped.append(f"{part}: {type(exc).__name__}: {exc}")
            continue
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
            skipped.append(f"{part}: not a pytest-benchmark report")
            continue
        if merged is None:
            merged = dict(data, benchmarks=[])
        merged["benchmarks"].extend(data["benchmarks"])
    return (merged if merged is not None else {"benchmarks": []}), skipped


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the merged report to write")
    ap.add_argument("parts", type=Path, nargs="*", help="pytest-benchmark JSON reports, in order")
    a = ap.parse_args(argv)
    report, skipped = merge(a.parts)
    for line in skipped:
        print(f"merge_reports: skipped {line}", file=sys.stderr)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0 if len(skipped) < len(a.parts) else 1


if __name__ == "__main__":
    sys.exit(main())
