"""cnf_lib against the best peer library, zuko (``zuko.flows.CNF``), at equal settings.

Both models have the same width and depth (three hidden layers of 64, tanh), see the same
batches of the same data, use Adam with the same learning-rate schedule, integrate with
Dormand–Prince (dopri5) at the same tolerance, and use the same kind of trace: exact in 2-D,
Hutchinson with a Gaussian probe (zuko's only probe) in 10-D. What differs is each library's
own design: zuko conditions its MLP on sin/cos features of t and backpropagates with its
adaptive-checkpoint adjoint, with a max-norm error control in which the log-density state is
100× looser; cnf_lib uses ConcatSquash layers, backpropagates through the solver's operations
(torchdiffeq) with an RMS error control, and computes the exact trace by a forward-mode
Jacobian. No regularization on either side.

Two measurements, each with the two models trained side by side in one process (one iteration
of one, then one of the other, so that the machine's noise falls on both):

* the time of one training iteration (median over the run) and its NFE (forward solve, and
  backward for zuko, whose backward pass re-evaluates the field);
* the held-out NLL that each reaches in the same wall-clock budget (the learning rate follows a
  cosine in elapsed time), evaluated with the exact trace at tolerance 1e-5 by each library.

Beside them, cnf_lib with its own default recipe (``Trainer``'s defaults: a fixed grid of four
RK4 steps, kinetic penalty, clipping; the same field, data, trace and probe), trained alone for
its 600 iterations: the NLL a reader gets from cnf_lib without choosing settings, and its time.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from common import EVAL_SETTINGS, TEST_SEED, TEST_SIZE, Timer, cosine_lr, median
from torch import nn

HIDDEN = (64, 64, 64)
BATCH = 256
TOL = 1e-3
LR, LR_FINAL = 5e-3, 5e-4
TIMING_ITERATIONS = 60
BUDGET_S = 20.0


class Lifted8Gaussians:
    """A 10-D density with a known log-density: 8 Gaussians in two coordinates, N(0, 0.5²) in
    eight more, all rotated by a fixed random orthogonal matrix."""

    def __init__(self, dim: int = 10, noise: float = 0.5, seed: int = 0) -> None:
        from cnf_lib.datasets import make_toy

        self.toy, self.dim, self.noise = make_toy("8gaussians"), dim, noise
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        self.rotation = q

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        plane = self.toy.sample(n, generator=generator).to(torch.float64)
        rest = self.noise * torch.randn(n, self.dim - 2, generator=generator, dtype=torch.float64)
        return (torch.cat([plane, rest], 1) @ self.rotation.T).float()

    def nll(self, x: torch.Tensor) -> float:
        y = x.to(torch.float64) @ self.rotation
        rest = y[:, 2:]
        log_rest = (-0.5 * (rest / self.noise).pow(2) - math.log(self.noise) - 0.5 * math.log(2 * math.pi)).sum(1)
        return -(self.toy.log_prob(y[:, :2]) + log_rest).mean().item()


class Ours:
    name = "cnf_lib"

    def __init__(self, dim: int, trace: str, seed: int) -> None:
        from cnf_lib import CNF

        torch.manual_seed(seed)
        self.model = CNF(dim, hidden=HIDDEN, activation="tanh", method="dopri5", rtol=TOL, atol=TOL,
                         trace=trace, probe="gaussian")
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, int]]:
        logp, res = self.model.log_prob_result(x, generator=self.generator)
        return -logp.mean(), dict(nfe_forward=res.nfe_forward)

    def after_backward(self, counts: dict[str, int]) -> None:
        counts["nfe_backward"] = 0  # backpropagation through the solver's operations

    @torch.no_grad()
    def test_nll(self, x: torch.Tensor) -> float:
        return -self.model.log_prob(x, **EVAL_SETTINGS).mean().item()


class Zuko:
    name = "zuko"

    def __init__(self, dim: int, trace: str, seed: int) -> None:
        import zuko

        torch.manual_seed(seed)
        self.flow = zuko.flows.CNF(dim, hidden_features=HIDDEN, activation=nn.Tanh, atol=TOL, rtol=TOL,
                                   exact=(trace == "exact"))
        self.calls = 0
        self.flow.transform.ode.register_forward_pre_hook(self._count)
        self.optimizer = torch.optim.Adam(self.flow.parameters(), lr=LR)

    def _count(self, *_: Any) -> None:
        self.calls += 1

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, int]]:
        self.flow.train()
        self.calls = 0
        loss = -self.flow().log_prob(x).mean()
        return loss, dict(nfe_forward=self.calls)

    def after_backward(self, counts: dict[str, int]) -> None:
        counts["nfe_backward"] = self.calls - counts["nfe_forward"]

    @torch.no_grad()
    def test_nll(self, x: torch.Tensor) -> float:
        t = self.flow.transform
        saved = (t.atol, t.rtol, t.exact)
        t.atol, t.rtol, t.exact = EVAL_SETTINGS["atol"], EVAL_SETTINGS["rtol"], True
        self.flow.eval()
        try:
            return -self.flow().log_prob(x).mean().item()
        finally:
            t.atol, t.rtol, t.exact = saved


def _step(side: Any, x: torch.Tensor, lr: float) -> dict[str, float]:
    for group in side.optimizer.param_groups:
        group["lr"] = lr
    with Timer() as t:
        loss, counts = side.loss(x)
        side.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        side.after_backward(counts)
        side.optimizer.step()
    return dict(wall=t.wall, cpu=t.cpu, loss=loss.item(), **counts)


def _setting(dim: int, trace: str, quick: bool) -> dict[str, Any]:
    if dim == 2:
        from cnf_lib.datasets import make_toy

        data = make_toy("moons")
        label = "two moons, 2-D, exact trace"
    else:
        data = Lifted8Gaussians(dim)
        label = f"8 Gaussians lifted to {dim}-D, Hutchinson (Gaussian probe)"
    test = data.sample(TEST_SIZE if not quick else 500, generator=torch.Generator().manual_seed(TEST_SEED))
    true_nll = data.nll(test)
    batches = torch.Generator().manual_seed(1)
    iterations = TIMING_ITERATIONS if not quick else 3
    budget = BUDGET_S if not quick else 1.0

    # 1. per-iteration time and NFE, the two trained side by side on the same batches
    sides = [Ours(dim, trace, 0), Zuko(dim, trace, 0)]
    per_iteration: dict[str, list[dict[str, float]]] = {s.name: [] for s in sides}
    for i in range(iterations):
        x = data.sample(BATCH, generator=batches)
        lr = cosine_lr(LR, LR_FINAL, i / iterations)
        for s in sides:
            per_iteration[s.name].append(_step(s, x, lr))
    timing = {}
    for name, recs in per_iteration.items():
        timing[name] = dict(
            wall=median([r["wall"] for r in recs]), cpu=median([r["cpu"] for r in recs]),
            nfe_forward=median([r["nfe_forward"] for r in recs]),
            nfe_backward=median([r["nfe_backward"] for r in recs]),
        )
        nfe = timing[name]["nfe_forward"] + timing[name]["nfe_backward"]
        timing[name]["wall_per_nfe"] = timing[name]["wall"] / nfe
    ratio = timing["zuko"]["wall"] / timing["cnf_lib"]["wall"]
    ratio_cpu = timing["zuko"]["cpu"] / timing["cnf_lib"]["cpu"]
    print(f"  {label}: one iteration cnf_lib {timing['cnf_lib']['wall'] * 1e3:.0f} ms, zuko "
          f"{timing['zuko']['wall'] * 1e3:.0f} ms (zuko / cnf_lib = {ratio:.2f})", flush=True)

    # 2. held-out NLL after the same wall-clock budget, trained side by side from scratch
    sides = [Ours(dim, trace, 1), Zuko(dim, trace, 1)]
    elapsed = {s.name: 0.0 for s in sides}
    iters = {s.name: 0 for s in sides}
    batches = torch.Generator().manual_seed(2)
    while any(elapsed[s.name] < budget for s in sides):
        x = data.sample(BATCH, generator=batches)
        for s in sides:
            if elapsed[s.name] < budget:
                rec = _step(s, x, cosine_lr(LR, LR_FINAL, elapsed[s.name] / budget))
                elapsed[s.name] += rec["wall"]
                iters[s.name] += 1
    budget_rows = {}
    for s in sides:
        with Timer() as t:
            nll = s.test_nll(test)
        budget_rows[s.name] = dict(iterations=iters[s.name], train_wall=elapsed[s.name], test_nll=nll,
                                   gap=nll - true_nll, eval_wall=t.wall)
    print(f"  {label}: after {budget:.0f} s, NLL gap cnf_lib {budget_rows['cnf_lib']['gap']:.3f} "
          f"({iters['cnf_lib']} it), zuko {budget_rows['zuko']['gap']:.3f} ({iters['zuko']} it)", flush=True)

    # 3. cnf_lib with its own default recipe, alone
    own = _own_recipe(dim, trace, data, test, quick)
    own["gap"] = own["test_nll"] - true_nll
    print(f"  {label}: cnf_lib's default recipe, {own['iterations']} it in {own['train_wall']:.1f} s, "
          f"NLL gap {own['gap']:.3f}", flush=True)
    return dict(label=label, dim=dim, trace=trace, timing=timing, ratio_wall=ratio, ratio_cpu=ratio_cpu,
                budget_s=budget, budget=budget_rows, own_recipe=own, true_nll=true_nll)


def _own_recipe(dim: int, trace: str, data: Any, test: torch.Tensor, quick: bool) -> dict[str, Any]:
    """cnf_lib's ``Trainer`` with its defaults (seed 1), then the held-out NLL as in the race."""
    from cnf_lib import CNF, Trainer

    torch.manual_seed(1)
    model = CNF(dim, hidden=HIDDEN, activation="tanh", trace=trace, probe="gaussian")
    trainer = Trainer(model, data.sample, None, seed=1, eval_every=0, progress=False,
                      eval_settings=dict(EVAL_SETTINGS), **({"iterations": 3} if quick else {}))
    with Timer() as t:
        trainer.fit()
    return dict(iterations=trainer.iteration, train_wall=t.wall, train_cpu=t.cpu, test_nll=trainer.evaluate(test))


def run(quick: bool = False) -> dict[str, Any]:
    import zuko

    settings = [_setting(2, "exact", quick), _setting(10, "hutchinson", quick)]
    return dict(zuko_version=zuko.__version__, hidden=list(HIDDEN), batch=BATCH, tol=TOL, lr=LR,
                lr_final=LR_FINAL, timing_iterations=TIMING_ITERATIONS, settings=settings)
