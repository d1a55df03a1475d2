"""Tuning the trainer's defaults above two dimensions, on sets that ``bench_heldout.py`` does not report.

``bench_heldout.py`` reports elongated-6d and warped-12d (and the 2-D sets). The settings that
``TrainConfig.for_dim`` picks for D > 2 were chosen here, on two **tuning sets** of the same
families but other dimensions and other components: ``elongated-8d`` (four elongated Gaussians
in 8-D, components drawn with seed 5, eigenvalues 0.02–4, raw scale 20) and ``warped-10d`` (the
warped mixture in 10-D, whose components are drawn with seed 10). Same sizes as the benchmark
(20,000 training, 5,000 test points), same standardization, same scoring (exact trace, dopri5 at
1e-5); one torch thread.

    .venv/bin/python benchmarks/tune_heldout.py --sets elongated-8d,warped-10d --seeds 0 \
        --set '{"lr": 1e-2}' --set '{"batch_size": 256, "hidden": [128, 128, 128]}'

Measured (seed 0; the tables with every candidate and what they say are in RECIPE.md, fifth and
sixth sweeps): the 2-D defaults gave gaps of 0.280 (elongated-8d) and 0.565 (warped-10d) nats;
Hutchinson's estimator in training with 512 points per iteration, at about the same CPU time,
0.207 and 0.456 (kept: ``cnf_lib.train.HIGH_DIM_DEFAULTS``); that, after a warm start of 2,000
flow-matching iterations and with 400 likelihood iterations instead of 600 (``--set '{"warm_start":
2000, "iterations": 400, "lr_period": 400}'``), 0.140 and 0.285 (an option, not a default: on a
reported set it was not monotone in the budget; RECIPE.md, sixth sweep); flow matching alone, 3,000
iterations of 2,048 points on the tanh field (``--set '{"objective": "flow_matching", "times": "uniform",
"iterations": 3000, "batch_size": 2048, "model": {"activation": "tanh"}}'``), 0.148 and 0.299 in about 50 CPU s
(RECIPE.md, seventh sweep); with a SiLU field (now ``CNF``'s default above two dimensions), times weighted
towards the data and 6,000 iterations of 1,024 points (``--set '{"objective": "flow_matching"}'``, now the
defaults of ``FlowMatching.default_config`` for D > 2), 0.077 and 0.208; and maximum likelihood's defaults
on the SiLU field (``{}``) 0.119 and 0.311 (RECIPE.md, eighth sweep). ``warped-12d-other`` (the warped
mixture in 12-D, components drawn with seed 5) checked them.

Each ``--set`` is one JSON dictionary of ``Trainer`` settings, plus ``hidden`` (the field's
widths), ``model`` (other ``CNF`` arguments, e.g. ``{"activation": "tanh"}``), ``objective``
(``"likelihood"`` or ``"flow_matching"``), ``times`` (flow matching's) and ``warm_start``
(flow-matching iterations before the trainer); ``{}`` is the trainer's defaults for that
dimension. Each run prints the gap (test NLL minus true NLL, nats), the NLL on the training grid
minus the adaptive one, and the CPU seconds of training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_heldout  # noqa: E402
import common  # noqa: E402
from bench_heldout import elongated, warped_mixture  # noqa: E402

TUNING_SETS = {"elongated-8d": lambda n, rng: elongated(n, rng, dim=8, components_seed=5),
               "warped-10d": lambda n, rng: warped_mixture(n, rng, dim=10),
               "warped-12d-other": lambda n, rng: warped_mixture(n, rng, dim=12, components_seed=5)}

#: Sets of 16 dimensions that chose nothing: run once, after the eighth sweep's defaults were fixed
#: and reported, to check them in the issue's upper dimension (RECIPE.md, eighth sweep).
CHECK_SETS = {"elongated-16d": lambda n, rng: elongated(n, rng, dim=16, components_seed=16),
              "warped-16d": lambda n, rng: warped_mixture(n, rng, dim=16)}


def train_and_score(name: str, settings: dict[str, Any], seed: int) -> dict[str, float]:
    """One run of ``Trainer(CNF(D, hidden, **model), x, **settings).fit()`` on a tuning set."""
    out = bench_heldout.fit_and_score({**TUNING_SETS, **CHECK_SETS}[name], seed, **settings)
    return dict(gap=out["gap"], grid=out["grid_minus_adaptive"], cpu=out["cpu"], wall=out["seconds"])


def _cols(runs: list[dict[str, float]], key: str, fmt: str) -> str:
    return " ".join(format(r[key], fmt) for r in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(TUNING_SETS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--set", action="append", default=None, help="JSON settings (repeatable)")
    args = parser.parse_args(argv)
    common.setup_threads(1)
    for raw in args.set or ["{}"]:
        settings = json.loads(raw)
        for name in args.sets.split(","):
            runs = [train_and_score(name, settings, int(seed)) for seed in args.seeds.split(",")]
            print(f"{name:13s} {raw:70s} gap {_cols(runs, 'gap', '.3f')}  "
                  f"grid-adaptive {_cols(runs, 'grid', '+.3f')}  CPU s {_cols(runs, 'cpu', '.0f')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
