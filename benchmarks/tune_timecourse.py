"""How chapter 7 chose its recipes for its two simulated courses, on courses it never reports.

Chapter 7's leave-one-out runs on two courses in 5 principal components: the first
(``simulate_differentiation(n_cells=200, times=(0, 1, 2, 3, 4), n_genes=40, seed=0)``, two fates)
and the second (``simulate_three_fates(seed=0)``). Each course's CNF recipe was chosen here, on
**another simulation** of the same process (simulator seed 2, the tuning course), under the
chapter's protocol: for each intermediate day, a PCA fitted without it
(``preprocess_holding_out``, 10 components), the model trained on the other days in the first 5,
the previous day's cells pushed to the held-out time (dopri5, 1e-5) and scored by exact W1 against
the held-out cells (exact OT interpolation scored with its plan weights). One training seed per
candidate. A candidate is eligible when it costs at most the course's budget of CPU seconds a fit
(``COURSES``), so that the chapter's fits (13 for the first course, 12 for the second) keep it
within its six minutes; the references beside them (more iterations, ``fit_trajectories``'s
defaults) are printed for comparison and are not eligible. The eligible candidate with the lowest
mean W1 is the chapter's recipe.

    .venv/bin/python benchmarks/tune_timecourse.py --course second [--seed 2]
    .venv/bin/python benchmarks/tune_timecourse.py --course first [--seed 2]

About 6 minutes a course with one torch thread on a 2-core machine (shared). Printed on
2026-11-30 (seed 2, W1 per held-out day, mean; CPU seconds per fit):

Second course (days 1, 2, 3, 4):

    OT interpolation                             1.209   2.038   2.341   2.316   1.976
    previous                                     4.138   3.956   5.218   5.651   4.740
    next                                         3.976   5.207   5.673   3.999   4.714
    exact trace, 70 it, batch 64                 1.879   1.964   3.664   4.171   2.919   9.4
    Hutchinson, 90 it                            1.688   1.901   3.593   4.089   2.818   8.6
    Hutchinson, 90 it, kinetic 1                 1.839   1.996   3.923   4.328   3.022   9.2
    Hutchinson, 90 it, lr 2e-2 to 2e-3           1.931   1.894   3.725   4.024   2.894  10.0
    chapter 7's first recipe (180 it, exact)     1.647   1.829   3.507   3.705   2.672  33.8

Chosen: Hutchinson, 90 iterations (kinetic 0.1, lr 1e-2 to 1e-3, width 64, batch 128, RK4 grid
of step 1). No candidate came near OT interpolation, nor did the first recipe at four times the
cost: the CNF lost before the branch point (days 1, 2) by less than after it (days 3, 4).

First course (days 1, 2, 3; chapter 7 ran it in 2 PCs with "chapter 7's first recipe" before):

    OT interpolation                             0.791   1.178   1.151   1.040
    previous                                     1.887   2.548   3.053   2.496
    next                                         2.549   3.055   2.442   2.682
    Hutchinson, 90 it                            0.865   1.034   1.850   1.250    7.5
    Hutchinson, 150 it                           0.788   0.778   1.632   1.066   11.8
    Hutchinson, 200 it                           0.789   0.719   1.547   1.018   16.5
    exact trace, 90 it                           0.858   0.954   1.861   1.224   11.8
    exact trace, 90 it, kinetic 1                0.856   1.419   2.118   1.464   11.6
    chapter 7's first recipe (180 it, exact)     0.790   0.743   1.581   1.038   24.3
    fit_trajectories' defaults                   0.804   0.867   1.721   1.131   25.5

Chosen: Hutchinson, 150 iterations (the rest as the second course's recipe), the best within the
budget of 12 CPU s a fit. Hutchinson at 200 iterations was added in a second run, after 150 (then
the longest) came out best in the first; it is better still (1.018, ahead of OT interpolation's
1.040) but at 16.5 CPU s a fit the chapter's 13 fits of this course would take it past six
minutes. Both runs used the tuning course only.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from cnf_lib.baselines import holdout_baselines  # noqa: E402
from cnf_lib.metrics import wasserstein  # noqa: E402
from cnf_lib.simulation import preprocess_holding_out, simulate_differentiation, simulate_three_fates  # noqa: E402
from cnf_lib.timecourse import TimeCourse, fit_trajectories  # noqa: E402

PUSH = dict(method="dopri5", rtol=1e-5, atol=1e-5)
RK4 = dict(method="rk4", step_size=1.0)
HUTCH = dict(method="rk4", step_size=1.0, trace="hutchinson")
SHARED = dict(hidden=(64, 64), kinetic=0.1, batch_size=128, lr=1e-2, lr_final=1e-3)
SECOND: dict[str, dict] = {
    "exact trace, 70 it, batch 64": dict(iterations=70, batch_size=64, train_settings=RK4),
    "Hutchinson, 90 it": dict(iterations=90, train_settings=HUTCH),
    "Hutchinson, 90 it, kinetic 1": dict(iterations=90, kinetic=1.0, train_settings=HUTCH),
    "Hutchinson, 90 it, lr 2e-2 to 2e-3": dict(iterations=90, lr=2e-2, lr_final=2e-3, train_settings=HUTCH),
}
# the first course has fewer, smaller days: a fit of the same recipe costs about half as much
FIRST: dict[str, dict] = {
    "Hutchinson, 90 it": dict(iterations=90, train_settings=HUTCH),
    "Hutchinson, 150 it": dict(iterations=150, train_settings=HUTCH),
    "Hutchinson, 200 it": dict(iterations=200, train_settings=HUTCH),
    "exact trace, 90 it": dict(iterations=90, train_settings=RK4),
    "exact trace, 90 it, kinetic 1": dict(iterations=90, kinetic=1.0, train_settings=RK4),
}
REFERENCES: dict[str, dict] = {
    "chapter 7's first recipe (180 it, exact)": dict(iterations=180, train_settings=RK4),
    "fit_trajectories' defaults": dict(iterations=200, lr=5e-3, lr_final=5e-4, train_settings=None),
}
# per course: the simulator, the candidates, its name, the budget of CPU seconds a fit
COURSES = {
    "first": (lambda seed: simulate_differentiation(n_cells=200, times=(0, 1, 2, 3, 4), n_genes=40, seed=seed),
              FIRST, "simulate_differentiation", 12.0),
    "second": (simulate_three_fates, SECOND, "simulate_three_fates", 10.0),
}
BASELINES = ("OT interpolation", "previous", "next")


def leave_one_out(cells, candidates: dict[str, dict], n_comps: int = 5, shared: dict = SHARED,
                  baselines: tuple[str, ...] = BASELINES) -> tuple[list[float], dict, dict]:
    """Chapter 7's protocol on a tuning course: W1 of each baseline and candidate per held-out day.

    Returns the held-out days, ``{name: [W1 per day]}`` and ``{candidate: [CPU s per fit]}``.
    """
    days = sorted(set(cells.obs["time"].tolist()))[1:-1]
    rows: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    for day in days:
        a_day = preprocess_holding_out(cells, day, n_comps=10)
        course = TimeCourse.from_anndata(a_day, time_key="time", use_rep="X_pca", n_comps=n_comps)
        k = course.index(day)
        guesses, weights = holdout_baselines(course, day, torch.Generator().manual_seed(0), return_weights=True)
        for name in baselines:
            rows.setdefault(name, []).append(wasserstein(guesses[name], course.snapshots[k], a=weights[name]))
        for name, candidate in candidates.items():
            start = time.process_time()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = fit_trajectories(a_day, leave_out=day, seed=0, progress=False, key_added=None,
                                         n_comps=n_comps, **{**shared, **candidate})
            seconds.setdefault(name, []).append(time.process_time() - start)
            with torch.no_grad():
                pred = model.push(course.snapshots[k - 1], course.times[k - 1], day, **PUSH)
            rows.setdefault(name, []).append(wasserstein(pred, course.snapshots[k]))
            print(f"day {day:g} {name}: W1 {rows[name][-1]:.3f}, {seconds[name][-1]:.1f} CPU s"
                  + "".join(f"; warning: {w.message}" for w in caught), flush=True)
    return days, rows, seconds


def print_table(days: list[float], rows: dict, seconds: dict) -> None:
    """One line per method: W1 per held-out day, the mean, CPU seconds a fit."""
    head = " ".join(f"{f'day {d:g}':>7s}" for d in days)
    print(f"{'method':48s} {head} {'mean':>7s} {'CPU s/fit':>10s}")
    for name, w1 in rows.items():
        cpu = sum(seconds[name]) / len(seconds[name]) if name in seconds else 0.0
        print(f"{name:48s} " + " ".join(f"{v:7.3f}" for v in w1) + f" {sum(w1) / len(w1):7.3f} {cpu:10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--course", choices=sorted(COURSES), default="second", help="which of chapter 7's courses")
    parser.add_argument("--seed", type=int, default=2, help="simulator seed of the tuning course (not 0 or 1)")
    args = parser.parse_args()
    if args.seed in (0, 1):
        raise SystemExit("seeds 0 and 1 are the course chapter 7 reports and its replicate: tune on another one")
    torch.set_num_threads(1)
    simulate, candidates, simulator, budget = COURSES[args.course]
    days, rows, seconds = leave_one_out(simulate(seed=args.seed), {**candidates, **REFERENCES})
    print(f"tuning course: {simulator}(seed={args.seed}), 5 PCs; W1 of each held-out day (lower is better)")
    print_table(days, rows, seconds)
    eligible = [n for n in candidates if sum(seconds[n]) / len(seconds[n]) <= budget]
    best = min(eligible, key=lambda n: sum(rows[n]))
    print(f"chosen (the lowest mean W1 within {budget:g} CPU s a fit): {best}")


if __name__ == "__main__":
    main()
