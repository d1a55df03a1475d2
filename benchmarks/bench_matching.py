"""Flow matching beside maximum likelihood on the 2-D toys, over several seeds (chapter 8's comparison).

Chapter 8 trains one field three ways on two moons and eight Gaussians, seed 0: maximum likelihood
with the ``Trainer``'s defaults, and flow matching (:data:`cnf_lib.matching.TOY_SETTINGS`) with
independent and with OT pairs. Here each of the six runs is repeated with seeds 0–4 (initialization,
batches, probes), all judged on the chapter's 5,000 test points (seed 123) by the exact trace at
dopri5 1e-5. For each toy and pair of methods: the NLL difference per seed, its mean ± standard
error over seeds, how many seeds the first method was ahead, and the largest ratio of a seed's
difference to its paired standard error (the per-point log-density differences). Two worker
processes, one torch thread each.

    .venv/bin/python benchmarks/bench_matching.py [--seeds 0,1,2,3,4] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cnf_lib.datasets import make_toy  # noqa: E402
from cnf_lib.jobs import TrainJob, fit_jobs  # noqa: E402
from cnf_lib.matching import TOY_SETTINGS, FlowMatching  # noqa: E402

TOYS = ("moons", "8gaussians")
METHODS = {"ML": None, "FM independent": FlowMatching(pairs="independent"), "FM OT": FlowMatching(pairs="ot")}
PAIRS = (("ML", "FM independent"), ("ML", "FM OT"), ("FM OT", "FM independent"))
MODEL = dict(hidden=(64, 64, 64), activation="tanh")


def _job(toy: str, method: str, seed: int, quick: bool) -> TrainJob:
    config = dict(eval_every=0) if METHODS[method] is None else dict(TOY_SETTINGS)
    if quick:
        config["iterations"] = 5
    return TrainJob(data=toy, model=MODEL, objective=METHODS[method], config=dict(config, seed=seed),
                    init_seed=seed, name=f"{toy} {method} {seed}")


def run(quick: bool = False, seeds: tuple[int, ...] = (0, 1, 2, 3, 4)) -> dict[str, Any]:
    """Train every toy × method × seed, two at a time; per-seed gaps and paired comparisons."""
    runs = [(toy, method, seed) for toy in TOYS for method in METHODS for seed in seeds]
    # the cheap runs (independent pairs) last, so that the two workers finish together
    runs.sort(key=lambda r: r[1] == "FM independent")
    trained = fit_jobs([_job(*r, quick) for r in runs], processes=2)
    n_test = 200 if quick else common.TEST_SIZE
    tests = {toy: make_toy(toy).sample(n_test, generator=torch.Generator().manual_seed(common.TEST_SEED))
             for toy in TOYS}
    logps, cpu = {}, {}
    for (toy, method, seed), (trainer, _, cpu_s) in zip(runs, trained):
        with torch.no_grad():
            logps[toy, method, seed] = trainer.model.log_prob(tests[toy], **common.EVAL_SETTINGS).double()
        cpu[toy, method, seed] = cpu_s
    rows, comparisons = [], []
    for toy in TOYS:
        true_nll = make_toy(toy).nll(tests[toy])
        for method in METHODS:
            gaps = [-logps[toy, method, s].mean().item() - true_nll for s in seeds]
            rows.append(dict(toy=toy, method=method, gaps=gaps, mean_gap=float(np.mean(gaps)),
                             sd_gap=float(np.std(gaps, ddof=1)) if len(gaps) > 1 else math.nan,
                             cpu=common.median([cpu[toy, method, s] for s in seeds])))
        for a, b in PAIRS:
            d = [logps[toy, b, s] - logps[toy, a, s] for s in seeds]  # per point: NLL(a) - NLL(b)
            diffs = np.array([x.mean().item() for x in d])
            ratios = [abs(x.mean().item()) / (x.std().item() / math.sqrt(len(x))) for x in d]
            comparisons.append(dict(toy=toy, a=a, b=b, diffs=diffs.tolist(), mean=float(diffs.mean()),
                                    se=float(diffs.std(ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else math.nan,
                                    a_ahead=int((diffs < 0).sum()), largest_ratio=max(ratios),
                                    smallest_ratio=min(ratios)))
    for c in comparisons:
        print(f"  {c['toy']}: {c['a']} − {c['b']} = {c['mean']:+.4f} ± {c['se']:.4f} (ahead on {c['a_ahead']} of "
              f"{len(seeds)} seeds; |diff| / paired SE per seed {c['smallest_ratio']:.1f}–{c['largest_ratio']:.1f})",
              flush=True)
    return dict(seeds=list(seeds), n_test=n_test, settings=dict(TOY_SETTINGS), rows=rows, comparisons=comparisons)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that the script runs")
    args = parser.parse_args(argv)
    common.setup_threads(1)
    out = run(args.quick, tuple(int(v) for v in args.seeds.split(",")))
    from report import _matching

    print("\n".join(_matching(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
