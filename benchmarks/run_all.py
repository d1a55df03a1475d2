"""Run every benchmark and write ``benchmarks/results.json`` and ``benchmarks/results.md``.

``make benchmarks`` calls this (after installing ``benchmarks/requirements.txt``, the peer
library). About 10–15 minutes on a 2-core machine, plus about 15 for ``cells`` and 3.5 hours for ``heldout``;
``--quick`` checks the scripts in a minute with tiny sizes (its numbers mean nothing and it writes
``results-quick.*`` instead).

    .venv/bin/python benchmarks/run_all.py [--quick] \
        [--only profile,recipe,peer,trace,heldout,matching,cells,timecourse,book]

Sections (each a module here, each with a docstring that says what it measures and how):

* ``profile`` — where the time of one training iteration goes (bench_profile.py);
* ``recipe`` — the 20-second target on 8 Gaussians and two moons, 3 seeds (bench_recipe.py);
* ``peer`` — cnf_lib against zuko at equal settings (bench_peer.py);
* ``trace`` — exact/Hutchinson cost per evaluation, D = 2 … 512 (bench_trace.py);
* ``heldout`` — the defaults on four untuned densities, 1×/2×/4× budgets, and on the 6-D and 12-D
  ones flow matching alone, the defaults on a tanh field, the warm-start option, flow matching's
  earlier defaults and the 2-D defaults (bench_heldout.py; about 3.5 hours of one core);
* ``matching`` — chapter 8's maximum likelihood vs flow matching on the toys, five seeds (bench_matching.py);
* ``cells`` — ``fit_density`` at 20,000 cells × 10 and 30 columns vs a BIC mixture (bench_cells.py);
* ``timecourse`` — ``fit_trajectories`` at 200, 2,000 and 20,000 cells a day: fit time, held-out W1
  beside OT interpolation (bench_timecourse.py);
* ``book`` — the execution time of every chapter in the last ``make book`` (bench_book.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from report import markdown  # noqa: E402

SECTIONS = ("profile", "recipe", "peer", "trace", "heldout", "matching", "cells", "timecourse", "book")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that the scripts run")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {SECTIONS}")

    common.setup_threads(1)
    here = os.path.dirname(os.path.abspath(__file__))
    stem = "results-quick" if args.quick else "results"
    json_path = os.path.join(here, stem + ".json")
    results: dict = {}
    if os.path.exists(json_path):  # a partial run (--only) updates the other sections in place
        with open(json_path) as fh:
            results = json.load(fh)
    machine, versions = common.machine(), common.versions(extra=("zuko",))
    if set(only) == set(SECTIONS) or "machine" not in results:
        # the top-level record describes the last run of every section; a partial run (--only), perhaps on
        # another machine, records its machine and versions in the sections it refreshed only
        results["machine"], results["versions"] = machine, versions
        results["quick"] = args.quick
        results["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    start = time.perf_counter()
    for name in only:
        print(f"== {name}", flush=True)
        module = __import__(f"bench_{name}")
        t0 = time.perf_counter()
        section = module.run(quick=args.quick)
        section["seconds"] = time.perf_counter() - t0
        section["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
        section["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        section["machine"], section["versions"] = machine, versions
        results[name] = section
        with open(json_path, "w") as fh:  # after each section: an interrupted run keeps its work
            json.dump(results, fh, indent=1)
        with open(os.path.join(here, stem + ".md"), "w") as fh:
            fh.write(markdown(results))
        print(f"   {name}: {section['seconds']:.0f} s", flush=True)
    del start  # the total is the sum of the sections, also when --only refreshed a few of them
    results["seconds"] = sum(results[k]["seconds"] for k in SECTIONS if k in results)
    with open(json_path, "w") as fh:
        json.dump(results, fh, indent=1)
    with open(os.path.join(here, stem + ".md"), "w") as fh:
        fh.write(markdown(results))
    print(f"wrote {json_path} and {stem}.md (the sections' own times add up to {results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
