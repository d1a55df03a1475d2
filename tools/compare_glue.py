"""Compare the numbers two executions of the book glued (see cnf_lib/glue.py).

Usage: python tools/compare_glue.py FIRST_LOG_DIR SECOND_LOG_DIR [--rtol 1e-6]

Exits 1 and lists the differences when a value that does not vary by nature (``varies=False``)
differs between the two runs, or when a name was glued in one run but not the other. Prints a
one-line summary otherwise. When either folder has no log, it says so and exits 0 (nothing to
compare: one of the two commands has not run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def load(folder: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    path = folder / "glue.jsonl"
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["name"]] = rec  # a name glued twice in one run keeps its last value
    return out


def same(a, b, rtol: float) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return True
        return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y, rtol) for x, y in zip(a, b))
    return a == b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", type=Path)
    ap.add_argument("second", type=Path)
    ap.add_argument("--rtol", type=float, default=1e-6)
    args = ap.parse_args()
    if not (args.first / "glue.jsonl").exists() or not (args.second / "glue.jsonl").exists():
        print(f"compare_glue: nothing to compare (a log is missing in {args.first} or {args.second})")
        return 0
    a, b = load(args.first), load(args.second)
    problems = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            problems.append(f"{name}: glued in only one run")
            continue
        if a[name]["varies"] or b[name]["varies"]:
            continue
        if not same(a[name]["value"], b[name]["value"], args.rtol):
            problems.append(f"{name}: {a[name]['value']!r} != {b[name]['value']!r}")
    compared = sum(1 for n in a if n in b and not (a[n]["varies"] or b[n]["varies"]))
    if problems:
        print("compare_glue: the two executions glued different numbers (same seeds must give the same numbers):")
        print("\n".join("  " + p for p in problems))
        return 1
    print(f"compare_glue: {compared} glued values identical in both executions "
          f"({len(a) - compared} marked as varying by nature were not compared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
