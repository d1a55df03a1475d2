"""The cost of one function evaluation with the exact trace against Hutchinson's, D = 2 … 512.

One evaluation is what the ODE solver asks for at each stage: the field ``f(t, x)`` and its
divergence, for a batch of points. Measured two ways:

* **training** — with the graph kept and backpropagated through (the forward and backward
  cost of one evaluation inside a training step);
* **inference** — no graph, as when a trained model's log-density is evaluated.

Four divergences, two by autograd (what any field gets) and two by the ConcatSquash MLP's own
forward-mode propagation (what the CNF uses with it): the exact trace by D vector-Jacobian
products (``divergence_exact``) or by the forward-mode Jacobian (``ConcatSquashMLP.divergence``),
and Hutchinson's estimator by one vector-Jacobian product (``divergence_hutchinson``) or by one
forward tangent (``ConcatSquashMLP.divergence_hutchinson``). Each exact route is compared with
the Hutchinson route of the same kind. The field is the book's default (three hidden layers of
64, tanh).
"""

from __future__ import annotations

from typing import Any

import torch
from common import interleaved

DIMS = (2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH = 256
HIDDEN = (64, 64, 64)


def _methods(field: Any, x: torch.Tensor, t: torch.Tensor, train: bool) -> dict[str, Any]:
    from cnf_lib.trace import divergence_exact, divergence_hutchinson, sample_probe

    probe = sample_probe(x, "rademacher", torch.Generator().manual_seed(0))

    def autograd_exact() -> None:
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            f = field(t, xr)
            div, _ = divergence_exact(f, xr, create_graph=train)
        if train:
            (f.sum() + div.sum()).backward()

    def forward_mode() -> None:
        with torch.set_grad_enabled(train):
            f, div, _ = field.divergence(t, x)
        if train:
            (f.sum() + div.sum()).backward()

    def hutchinson() -> None:
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            f = field(t, xr)
            div, _ = divergence_hutchinson(f, xr, probe, create_graph=train)
        if train:
            (f.sum() + div.sum()).backward()

    def hutchinson_forward() -> None:
        with torch.set_grad_enabled(train):
            f, div, _ = field.divergence_hutchinson(t, x, probe, frobenius=False)
        if train:
            (f.sum() + div.sum()).backward()

    return {"exact_autograd": autograd_exact, "exact_forward": forward_mode, "hutchinson": hutchinson,
            "hutchinson_forward": hutchinson_forward}


def run(quick: bool = False) -> dict[str, Any]:
    from cnf_lib.fields import ConcatSquashMLP

    dims = DIMS if not quick else (2, 8)
    rows = []
    for dim in dims:
        torch.manual_seed(0)
        field = ConcatSquashMLP(dim, HIDDEN, "tanh")  # as measured (the default is SiLU above 2-D)
        x = torch.randn(BATCH, dim)
        t = torch.tensor(0.5)
        row: dict[str, Any] = dict(dim=dim)
        for mode, train in (("train", True), ("infer", False)):
            repeats = 3 if quick else (9 if dim <= 64 else 5 if dim <= 256 else 3)
            res = interleaved(_methods(field, x, t, train), repeats=repeats)
            for name, r in res.items():
                row[f"{mode}_{name}_ms"] = r["wall"] * 1e3
                row[f"{mode}_{name}_cpu_ms"] = r["cpu"] * 1e3
            row[f"{mode}_ratio_exact_autograd"] = res["exact_autograd"]["wall"] / res["hutchinson"]["wall"]
            row[f"{mode}_ratio_exact_forward"] = res["exact_forward"]["wall"] / res["hutchinson_forward"]["wall"]
            row[f"{mode}_hutchinson_vjp_over_forward"] = res["hutchinson"]["wall"] / res["hutchinson_forward"]["wall"]
        rows.append(row)
        print(f"  D={dim:4d}: training evaluation exact/Hutchinson = {row['train_ratio_exact_autograd']:.1f} "
              f"(autograd VJPs), {row['train_ratio_exact_forward']:.1f} (forward-mode)", flush=True)
        field.zero_grad(set_to_none=True)
    return dict(batch=BATCH, hidden=list(HIDDEN), rows=rows)
