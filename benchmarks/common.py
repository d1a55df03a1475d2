"""Shared helpers of the benchmarks: the machine, the versions, timers, medians, the recipe.

Every timing is taken with one torch thread (``torch.set_num_threads(1)``; see
``bench_profile.py`` for why), in one process, with the things compared run side by side
(interleaved), and reported as medians over repeats. Wall-clock time is what a reader waits
for; CPU time of the process is reported beside it, because on a machine shared with other work
the wall clock of a single-threaded job stretches while its CPU time barely moves.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The fast recipe (benchmarks/RECIPE.md; cnf_lib.train.TrainConfig's defaults): bench_recipe.py
# measures it against the 20-second target. Training solves: RK4 on a fixed grid of 4 steps (16
# evaluations); every test NLL is computed adaptively (EVAL_SETTINGS) and checked on a fine grid.
RECIPE: dict[str, Any] = dict(
    hidden=(64, 64, 64),
    activation="tanh",
    batch_size=128,
    lr=3e-2,
    lr_final=1e-4,
    iterations=600,
    train_settings=dict(method="rk4", step_size=0.25),
    kinetic=0.05,
    frobenius=0.0,
    grad_clip=1.0,
)
# The adaptive training solve of the earlier recipes: dopri5 at 1e-3 (the CNF's default), no clipping.
_ADAPTIVE = dict(train_settings=dict(trace="exact", method="dopri5", rtol=1e-3, atol=1e-3), grad_clip=None)
# The previous fast recipe (TrainConfig's defaults until the fixed grid): 300 adaptive iterations.
ADAPTIVE_RECIPE: dict[str, Any] = dict(RECIPE, **_ADAPTIVE, lr_final=1e-3, iterations=300)
# The longer recipe of chapter 3 (600 adaptive iterations), one seed beside it.
CHAPTER_RECIPE: dict[str, Any] = dict(RECIPE, **_ADAPTIVE, lr=2e-2, lr_final=1e-4, iterations=600, kinetic=0.1)
# The "tuned simple recipe" the issue starts from (about 60 s on these machines): larger batches,
# a smaller learning rate, no regularization.
REFERENCE: dict[str, Any] = dict(RECIPE, **_ADAPTIVE, batch_size=512, lr=5e-3, lr_final=5e-4, iterations=500,
                                 kinetic=0.0)
# How every test NLL in the benchmarks is evaluated: exact trace, dopri5 at a tight tolerance
# (the method is named: a model trained with a fixed-step method would otherwise be evaluated on
# its own training grid).
EVAL_SETTINGS: dict[str, Any] = dict(trace="exact", method="dopri5", rtol=1e-5, atol=1e-5)
# A second, independent evaluation: RK4 on a fine fixed grid (800 evaluations), reported beside
# the first; the two must agree. (A model trained on a coarse fixed grid, two RK4 steps, read
# 0.25 nats *below* the true NLL on its own grid and 0.68 above it on this one: it had learned
# features between the grid's times. Such a model is not a good continuous-time density.)
CHECK_SETTINGS: dict[str, Any] = dict(trace="exact", method="rk4", step_size=1 / 200)
TEST_SIZE = 5000
TEST_SEED = 123


def setup_threads(n: int = 1) -> None:
    """One torch thread (and one for the inter-op pool where it can still be set)."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as fh:
            mem_gib = round(int(fh.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        memory_gib=mem_gib,
        os=platform.platform(),
        load_average=[round(v, 2) for v in os.getloadavg()],
        torch_threads=torch.get_num_threads(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
    )


def versions(extra: Sequence[str] = ()) -> dict[str, str]:
    """Versions of Python and of the packages the numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "torchdiffeq", "numpy", "cnf_lib", *extra):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass
class Timer:
    """Wall-clock and CPU seconds of a block: ``with Timer() as t: ...; t.wall, t.cpu``."""

    wall: float = 0.0
    cpu: float = 0.0

    def __enter__(self) -> "Timer":
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Time each function ``repeats`` times, round-robin, so that the machine's noise is shared.

    Returns:
        ``{name: {"wall": median seconds, "cpu": median seconds}}``.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    walls: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            with Timer() as t:
                fn()
            walls[name].append(t.wall)
            cpus[name].append(t.cpu)
    return {k: dict(wall=median(walls[k]), cpu=median(cpus[k])) for k in fns}


def cosine_lr(lr: float, lr_final: float, frac: float) -> float:
    """The trainer's cosine schedule at fraction ``frac`` of the run."""
    frac = min(max(frac, 0.0), 1.0)
    return lr_final + 0.5 * (lr - lr_final) * (1 + math.cos(math.pi * frac))


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 10 ** -digits):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v, digits) for v in row) + " |")
    return "\n".join(lines)


class AutogradDivergence(torch.nn.Module):
    """Wraps a field and hides its ``divergence`` method: the CNF then computes the exact trace
    with one vector-Jacobian product per dimension (:func:`cnf_lib.trace.divergence_exact`), as
    it did before the forward-mode Jacobian. The parameters are the wrapped field's."""

    def __init__(self, field: torch.nn.Module) -> None:
        super().__init__()
        self.inner = field

    def forward(self, t: Any, x: torch.Tensor) -> torch.Tensor:
        return self.inner(t, x)


def train_toy(toy_name: str, recipe: dict[str, Any], seed: int, *, autograd_divergence: bool = False,
              test: torch.Tensor | None = None, keep_model: bool = False) -> dict[str, Any]:
    """Train a CNF on a 2-D toy with ``recipe`` (a :class:`~cnf_lib.train.TrainConfig`-like dict
    plus ``hidden``/``activation``), then evaluate the held-out NLL with :data:`EVAL_SETTINGS`.

    Returns:
        train wall/CPU seconds, test NLL, true NLL, gap, NFE of the first and last solves.
    """
    from cnf_lib import CNF, Trainer
    from cnf_lib.datasets import make_toy

    toy = make_toy(toy_name)
    if test is None:
        test = toy.sample(TEST_SIZE, generator=torch.Generator().manual_seed(TEST_SEED))
    torch.manual_seed(seed)
    model = CNF(2, hidden=recipe["hidden"], activation=recipe["activation"])
    if autograd_divergence:
        model.field = AutogradDivergence(model.field)
    config = {k: v for k, v in recipe.items() if k not in ("hidden", "activation")}
    trainer = Trainer(model, toy.sample, None, seed=seed, eval_every=0, progress=False,
                      eval_settings=dict(EVAL_SETTINGS), **config)
    with Timer() as t:
        history = trainer.fit()
    with Timer() as te:
        nll = trainer.evaluate(test)
    with torch.no_grad():
        check = -model.log_prob(test, **CHECK_SETTINGS).mean().item()
    true_nll = toy.nll(test)
    nfe = history["nfe_forward"]
    out = dict(
        toy=toy_name, seed=seed, train_wall=t.wall, train_cpu=t.cpu, eval_wall=te.wall,
        test_nll=nll, true_nll=true_nll, gap=nll - true_nll, check_gap=check - true_nll,
        nfe_first=nfe[0], nfe_last=float(statistics.mean(nfe[-10:])), nfe_mean=float(statistics.mean(nfe)),
        iterations=len(nfe),
    )
    if keep_model:
        out["model"] = model
    return out
