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

Measured (seed 0; the table with every candidate and what it says is in RECIPE.md, fifth sweep):
the 2-D defaults gave gaps of 0.280 (elongated-8d) and 0.565 (warped-10d) nats; Hutchinson's
estimator in training with 512 points per iteration, at about the same CPU time, 0.207 and 0.456
(kept: ``cnf_lib.train.HIGH_DIM_DEFAULTS``).

Each ``--set`` is one JSON dictionary of ``Trainer`` settings, plus ``hidden`` (the field's
widths); ``{}`` is the trainer's defaults for that dimension. Each run prints the gap (test NLL
minus true NLL, nats), the NLL on the training grid minus the adaptive one, and the CPU seconds of
training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_heldout import N_TEST, N_TRAIN, _elongated_components, _mixture_logpdf, _mixture_sample, warped_mixture  # noqa: E402

from cnf_lib import CNF, Trainer  # noqa: E402
from cnf_lib.datasets import Standardizer  # noqa: E402


def elongated_8d(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Four elongated 8-D Gaussians (components seed 5), weights 0.4/0.3/0.2/0.1, raw scale 20."""
    comps, weights = _elongated_components(8, 4, 5, 0.02, 4.0), [0.4, 0.3, 0.2, 0.1]
    x = _mixture_sample(n, weights, comps, rng)
    scale = 20.0
    return x * scale, _mixture_logpdf(x, weights, comps) - 8 * math.log(scale)


TUNING_SETS = {"elongated-8d": elongated_8d,
               "warped-10d": lambda n, rng: warped_mixture(n, rng, dim=10)}


def train_and_score(name: str, settings: dict[str, Any], seed: int) -> dict[str, float]:
    """One run of ``Trainer(CNF(D, hidden), x, **settings).fit()`` on a tuning set."""
    sample = TUNING_SETS[name]
    x_train, _ = sample(N_TRAIN, np.random.default_rng(1000 + seed))
    x_test, logp_test = sample(N_TEST, np.random.default_rng(2000 + seed))
    s = Standardizer.fit(torch.as_tensor(x_train, dtype=torch.float32))
    z_train = s.transform(torch.as_tensor(x_train, dtype=torch.float32))
    z_test = s.transform(torch.as_tensor(x_test, dtype=torch.float32))
    settings = dict(settings)
    hidden = tuple(settings.pop("hidden", (64, 64, 64)))
    model_settings = settings.pop("model", {})
    torch.manual_seed(seed)
    model = CNF(x_train.shape[1], hidden=hidden, **model_settings)
    trainer = Trainer(model, z_train, seed=seed, progress=False, **settings)
    with common.Timer() as t:
        trainer.fit()
    with torch.no_grad():
        logdet = float(s.log_abs_det())
        adaptive = -(model.log_prob(z_test, **common.EVAL_SETTINGS).double().mean().item() + logdet)
        grid = -(model.log_prob(z_test, trace="exact", method="rk4", step_size=trainer.grid_step)
                 .double().mean().item() + logdet)
    return dict(gap=adaptive + float(np.mean(logp_test)), grid=grid - adaptive, cpu=t.cpu, wall=t.wall)


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
