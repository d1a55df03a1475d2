"""Where the time of one training iteration goes, before any lever is pulled.

A CNF with the recipe's field (three hidden layers of 64, tanh) is trained for a few dozen
iterations on two moons with the adaptive recipe (dopri5 at 1e-3: the solver this profile led
away from), so that its NFE is typical of mid-training, then one iteration (the forward solve
with the exact trace, and the backward pass) is taken apart:

* forward solve vs backward pass;
* inside the forward solve: the field and its divergence (the same evaluations timed alone)
  against the solver's own bookkeeping (step-size control, the Runge–Kutta combinations);
* the cost per function evaluation against the batch size, down to one point: at one point
  nothing is computed and what is left is Python and autograd overhead;
* the divergence: D vector-Jacobian products (autograd), the forward-mode Jacobian, Hutchinson;
* backpropagation through the solver's operations against the adjoint (with and without seminorm);
* torch threads: one against two.
"""

from __future__ import annotations

from typing import Any

import torch
from common import ADAPTIVE_RECIPE, Timer, interleaved, median

WARMUP_ITERATIONS = 40
BATCHES = (1, 64, 256, 1024)  # and the recipe's batch


def _trained_model(quick: bool) -> Any:
    from cnf_lib import CNF, Trainer
    from cnf_lib.datasets import make_toy

    moons = make_toy("moons")
    torch.manual_seed(0)
    recipe = ADAPTIVE_RECIPE
    model = CNF(2, hidden=recipe["hidden"], activation=recipe["activation"], **recipe["train_settings"])
    config = {k: v for k, v in recipe.items() if k not in ("hidden", "activation", "iterations")}
    Trainer(model, moons.sample, None, iterations=3 if quick else WARMUP_ITERATIONS, eval_every=0,
            progress=False, **config).fit()
    return model, moons


def run(quick: bool = False) -> dict[str, Any]:
    from common import AutogradDivergence

    from cnf_lib import CNF

    model, moons = _trained_model(quick)
    batch = ADAPTIVE_RECIPE["batch_size"]
    x = moons.sample(batch, generator=torch.Generator().manual_seed(5)).float()
    repeats = 3 if quick else 15

    # 1. forward solve, backward pass, and the field alone
    def iteration() -> dict[str, float]:
        model.zero_grad(set_to_none=True)
        with Timer() as tf:
            logp, res = model.log_prob_result(x)
        with Timer() as tb:
            (-logp.mean()).backward()
        return dict(forward=tf.wall, backward=tb.wall, nfe=res.nfe_forward)

    iteration()
    recs = [iteration() for _ in range(repeats)]
    nfe = int(median([r["nfe"] for r in recs]))
    t = torch.tensor(0.5)

    def field_calls() -> None:  # the same number of evaluations, with the graph, no solver
        for _ in range(nfe):
            f, div, _ = model.field.divergence(t, x)
        return None

    field_only = interleaved({"field": field_calls}, repeats=repeats)["field"]["wall"]
    forward = median([r["forward"] for r in recs])
    backward = median([r["backward"] for r in recs])
    split = dict(nfe=nfe, forward_ms=forward * 1e3, backward_ms=backward * 1e3,
                 field_in_forward_ms=field_only * 1e3, solver_overhead_ms=(forward - field_only) * 1e3,
                 solver_overhead_share=(forward - field_only) / forward)
    print(f"  one iteration: NFE {nfe}, forward {forward * 1e3:.0f} ms (field {field_only * 1e3:.0f} ms), "
          f"backward {backward * 1e3:.0f} ms", flush=True)

    # 2. cost of one evaluation (with graph, forward and backward) against the batch size
    per_batch = []
    for n in sorted({*BATCHES, batch}):
        xb = moons.sample(n, generator=torch.Generator().manual_seed(6)).float()

        def one_eval(xb: torch.Tensor = xb) -> None:
            f, div, _ = model.field.divergence(t, xb)
            (f.sum() + div.sum()).backward()

        r = interleaved({"eval": one_eval}, repeats=repeats * 4)["eval"]
        per_batch.append(dict(batch=n, ms=r["wall"] * 1e3, us_per_point=r["wall"] * 1e6 / n))
    model.zero_grad(set_to_none=True)

    # 3. the divergence, per training iteration (same model, same batch)
    slow = CNF(2, field=AutogradDivergence(model.field), **ADAPTIVE_RECIPE["train_settings"])
    nfes: dict[str, int] = {}

    def step(m: Any, name: str, **kw: Any):
        def go() -> None:
            m.zero_grad(set_to_none=True)
            logp, res = m.log_prob_result(x, generator=torch.Generator().manual_seed(0), **kw)
            (-logp.mean()).backward()
            nfes[name] = res.nfe_forward
        return go

    routes = interleaved({
        "exact_autograd": step(slow, "exact_autograd"),
        "exact_forward": step(model, "exact_forward"),
        "hutchinson": step(model, "hutchinson", trace="hutchinson"),
    }, repeats=repeats)
    divergence = {k: dict(ms=v["wall"] * 1e3, cpu_ms=v["cpu"] * 1e3, nfe=nfes[k]) for k, v in routes.items()}

    # 4. backpropagation: through the solver's operations, or the adjoint (with seminorm)
    grads: dict[str, int] = {}

    def backprop(name: str, **kw: Any):
        def go() -> None:
            model.zero_grad(set_to_none=True)
            logp, res = model.log_prob_result(x, **kw)
            (-logp.mean()).backward()
            grads[name] = res.nfe_forward + res.nfe_backward
        return go

    bp = interleaved({
        "through the solver": backprop("through the solver"),
        "adjoint": backprop("adjoint", adjoint=True),
        "adjoint + seminorm": backprop("adjoint + seminorm", adjoint=True, adjoint_seminorm=True),
    }, repeats=repeats)
    backprop_rows = {k: dict(ms=v["wall"] * 1e3, cpu_ms=v["cpu"] * 1e3, nfe=grads[k]) for k, v in bp.items()}

    # 5. threads
    saved = torch.get_num_threads()

    def with_threads(n: int):
        def go() -> None:
            torch.set_num_threads(n)
            try:
                step(model, "threads")()
            finally:
                torch.set_num_threads(saved)
        return go

    th = interleaved({"1": with_threads(1), "2": with_threads(2)}, repeats=repeats)
    threads = {k: dict(ms=v["wall"] * 1e3, cpu_ms=v["cpu"] * 1e3) for k, v in th.items()}
    model.zero_grad(set_to_none=True)
    return dict(batch=batch, warmup_iterations=WARMUP_ITERATIONS, split=split, per_batch=per_batch,
                divergence=divergence, backprop=backprop_rows, threads=threads)
