"""``fit_trajectories`` against the number of cells per snapshot: fit time and held-out W1.

Chapter 7's simulated course (``simulate_differentiation``, days 0-4, 40 genes) with 200, 2,000
and 20,000 cells per day. Day 2 is held out under the chapter's protocol: the PCA is fitted
without it (``preprocess_holding_out``), ``fit_trajectories`` trains with its defaults (5
principal components, 200 iterations of 128 cells per snapshot) on the other days, the day-1
cells are pushed to day 2 (dopri5 at 1e-5) and compared with the held-out cells, beside exact OT
interpolation between days 1 and 3.

Distances: exact W1 (POT's network simplex) while the problem fits
(:data:`cnf_lib.metrics.EXACT_MAX_PAIRS`, about 6,000 cells a side); above it
:func:`cnf_lib.metrics.wasserstein_quantized` with 2,000 centres per cloud, whose certified
lower and upper bounds are printed beside the estimate; OT interpolation there runs between the
two neighbours' quantized clouds (2,000 weighted centres each), an approximation stated as such.
Nothing is tuned here. One torch thread.

    .venv/bin/python benchmarks/bench_timecourse.py [--cells 200,2000,20000] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402

from cnf_lib import metrics  # noqa: E402
from cnf_lib.simulation import preprocess_holding_out, simulate_differentiation  # noqa: E402
from cnf_lib.timecourse import TimeCourse, fit_trajectories  # noqa: E402

HELD_OUT = 2.0
CENTRES = 2000
PUSH = dict(method="dopri5", rtol=1e-5, atol=1e-5)


def _w1(x: torch.Tensor, y: torch.Tensor, a: Any = None) -> dict[str, float]:
    """W1 exactly where it fits, else the quantized estimate with its bounds."""
    if len(x) * len(y) <= metrics.EXACT_MAX_PAIRS:
        value = metrics.wasserstein(x, y, a=a)
        return dict(w1=value, lower=value, upper=value, exact=True)
    q = metrics.wasserstein_quantized(x, y, a=a, n_centres=CENTRES)
    return dict(w1=q.value, lower=q.lower, upper=q.upper, exact=False)


def _ot_interpolation(prev: torch.Tensor, nxt: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OT interpolation with its weights; between quantized neighbours when they are too large."""
    if len(prev) * len(nxt) <= metrics.EXACT_MAX_PAIRS:
        return metrics.ot_interpolate(prev, nxt, s, return_weights=True)
    q0, q1 = metrics.quantize(prev, CENTRES), metrics.quantize(nxt, CENTRES)
    return metrics.ot_interpolate(q0.centres, q1.centres, s, return_weights=True, a=q0.weights, b=q1.weights)


def one_size(n_cells: int, quick: bool) -> dict[str, Any]:
    """One course of ``n_cells`` cells a day: the fit, the prediction, the distances and their times."""
    with common.Timer() as t_sim:
        adata = simulate_differentiation(n_cells=n_cells, times=(0, 1, 2, 3, 4), n_genes=40, seed=0)
    with common.Timer() as t_pre:
        held = preprocess_holding_out(adata, HELD_OUT, n_comps=10)
    course = TimeCourse.from_anndata(held, time_key="time", use_rep="X_pca", n_comps=5)
    k = course.index(HELD_OUT)
    with common.Timer() as t_fit:
        model = fit_trajectories(held, leave_out=HELD_OUT, seed=0, progress=False, key_added=None,
                                 **(dict(iterations=20) if quick else {}))
    with common.Timer() as t_push, torch.no_grad():
        pred = model.push(course.snapshots[k - 1], course.times[k - 1], HELD_OUT, **PUSH)
    s = (HELD_OUT - course.times[k - 1]) / (course.times[k + 1] - course.times[k - 1])
    with common.Timer() as t_ot:
        ot_points, ot_weights = _ot_interpolation(course.snapshots[k - 1], course.snapshots[k + 1], s)
    with common.Timer() as t_w1:
        cnf = _w1(pred, course.snapshots[k])
    ot = _w1(ot_points, course.snapshots[k], a=ot_weights)
    return dict(cells=n_cells, simulate_cpu=t_sim.cpu, preprocess_cpu=t_pre.cpu, fit_cpu=t_fit.cpu, fit_wall=t_fit.wall,
                push_cpu=t_push.cpu, ot_cpu=t_ot.cpu, w1_cpu=t_w1.cpu, cnf=cnf, ot=ot,
                iterations=len(model.history["loss"]))


def run(quick: bool = False, cells: tuple[int, ...] = (200, 2000, 20_000)) -> dict[str, Any]:
    """Every size once; one row each."""
    rows = []
    for n in ((100, 300) if quick else cells):
        r = one_size(n, quick)
        rows.append(r)
        print(f"  {n} cells/day: fit {r['fit_cpu']:.0f} CPU s ({r['iterations']} it.), push {r['push_cpu']:.1f} s, "
              f"OT interpolation {r['ot_cpu']:.1f} s, W1 {r['w1_cpu']:.1f} s; W1 CNF {r['cnf']['w1']:.3f} "
              f"[{r['cnf']['lower']:.3f}, {r['cnf']['upper']:.3f}], OT interpolation {r['ot']['w1']:.3f} "
              f"[{r['ot']['lower']:.3f}, {r['ot']['upper']:.3f}]", flush=True)
    return dict(held_out=HELD_OUT, n_centres=CENTRES, exact_max_pairs=metrics.EXACT_MAX_PAIRS, rows=rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="200,2000,20000")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    common.setup_threads(1)
    run(args.quick, tuple(int(c) for c in args.cells.split(",")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
