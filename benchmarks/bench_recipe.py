"""The 20-second target: the recipe on 8 Gaussians and two moons, three seeds, against the truth.

Each run trains a fresh CNF with :data:`common.RECIPE` (RK4 on a fixed grid of 4 steps), then
evaluates the held-out NLL on 5,000 test points with the exact trace, adaptively at tolerance 1e-5,
beside the true NLL of the same points. The issue's starting point (the "tuned simple recipe":
batch 512, Adam 5e-3, 500 iterations, the exact trace by autograd as before the forward-mode
Jacobian), chapter 3's longer adaptive recipe (:data:`common.CHAPTER_RECIPE`, 600 iterations) and
the previous fast recipe (:data:`common.ADAPTIVE_RECIPE`, 300 adaptive iterations) run once per
data set beside it.
"""

from __future__ import annotations

from typing import Any

from common import ADAPTIVE_RECIPE, CHAPTER_RECIPE, RECIPE, REFERENCE, median, train_toy

TOYS = ("8gaussians", "moons")
SEEDS = (0, 1, 2)


def run(quick: bool = False) -> dict[str, Any]:
    recipe = dict(RECIPE)
    reference = dict(REFERENCE)
    chapter = dict(CHAPTER_RECIPE)
    adaptive = dict(ADAPTIVE_RECIPE)
    seeds = SEEDS
    if quick:
        recipe["iterations"] = reference["iterations"] = chapter["iterations"] = adaptive["iterations"] = 5
        seeds = (0,)
    rows: list[dict[str, Any]] = []
    for toy in TOYS:
        for seed in seeds:
            r = train_toy(toy, recipe, seed)
            r["run"] = "recipe"
            rows.append(r)
            print(f"  recipe    {toy:10s} seed {seed}: {r['train_wall']:.1f} s, gap {r['gap']:.3f}", flush=True)
        r = train_toy(toy, adaptive, 0)
        r["run"] = "adaptive"
        rows.append(r)
        print(f"  adaptive  {toy:10s} seed 0: {r['train_wall']:.1f} s, gap {r['gap']:.3f}", flush=True)
        r = train_toy(toy, chapter, 0)
        r["run"] = "chapter 3"
        rows.append(r)
        print(f"  chapter 3 {toy:10s} seed 0: {r['train_wall']:.1f} s, gap {r['gap']:.3f}", flush=True)
        r = train_toy(toy, reference, 0, autograd_divergence=True)
        r["run"] = "reference"
        rows.append(r)
        print(f"  reference {toy:10s} seed 0: {r['train_wall']:.1f} s, gap {r['gap']:.3f}", flush=True)
    pitfall = _fixed_grid_pitfall(recipe, quick)
    summary = {}
    for toy in TOYS:
        mine = [r for r in rows if r["toy"] == toy and r["run"] == "recipe"]
        ref = [r for r in rows if r["toy"] == toy and r["run"] == "reference"][0]
        chap = [r for r in rows if r["toy"] == toy and r["run"] == "chapter 3"][0]
        adap = [r for r in rows if r["toy"] == toy and r["run"] == "adaptive"][0]
        summary[toy] = dict(
            median_gap=median([r["gap"] for r in mine]),
            max_gap=max(r["gap"] for r in mine),
            median_train_wall=median([r["train_wall"] for r in mine]),
            median_train_cpu=median([r["train_cpu"] for r in mine]),
            reference_gap=ref["gap"],
            reference_train_wall=ref["train_wall"],
            reference_train_cpu=ref["train_cpu"],
            speedup_wall=ref["train_wall"] / median([r["train_wall"] for r in mine]),
            speedup_cpu=ref["train_cpu"] / median([r["train_cpu"] for r in mine]),
            chapter_gap=chap["gap"],
            chapter_train_wall=chap["train_wall"],
            adaptive_gap=adap["gap"],
            adaptive_train_wall=adap["train_wall"],
            true_nll=mine[0]["true_nll"],
        )
    return dict(recipe=_plain(recipe), reference=_plain(reference), chapter=_plain(chapter),
                adaptive=_plain(adaptive), runs=rows, summary=summary, pitfall=pitfall)


def _fixed_grid_pitfall(recipe: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Train on a grid too coarse (two RK4 steps, 8 evaluations per solve: half the recipe's
    four) and evaluate the same model on that grid and with dopri5 at 1e-5."""
    import torch
    from common import TEST_SEED, TEST_SIZE

    from cnf_lib.datasets import make_toy

    coarse = dict(recipe, iterations=5 if quick else 300,
                  train_settings=dict(trace="exact", method="rk4", step_size=0.5))
    toy = make_toy("8gaussians")
    test = toy.sample(TEST_SIZE, generator=torch.Generator().manual_seed(TEST_SEED))
    r = train_toy("8gaussians", coarse, 0, test=test, keep_model=True)
    model = r.pop("model")
    with torch.no_grad():
        own = -model.log_prob(test, trace="exact", method="rk4", step_size=0.5).mean().item()
    print(f"  fixed grid: gap {own - r['true_nll']:.3f} on its own grid, {r['gap']:.3f} with dopri5", flush=True)
    return dict(r, gap_on_own_grid=own - r["true_nll"], settings=coarse["train_settings"],
                iterations=coarse["iterations"])


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
