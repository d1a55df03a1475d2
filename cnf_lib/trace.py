"""Divergence of a vector field: exact, and Hutchinson's stochastic estimator.

The instantaneous change of variables needs ``tr(∂f/∂x)`` at every function evaluation of the
ODE solver. For a batch of points this module computes it

* exactly, with one vector-Jacobian product (VJP) per dimension, O(D) backward passes; the same
  products give the exact squared Frobenius norm ``‖∂f/∂x‖²_F`` for free;
* with Hutchinson's estimator ``εᵀ (∂f/∂x) ε`` for a probe ``ε`` with ``E[εεᵀ] = I``, one VJP
  whatever ``D``. The VJP ``εᵀ ∂f/∂x`` is returned too: its squared norm is an unbiased
  estimate of ``‖∂f/∂x‖²_F`` (the Jacobian-Frobenius regularizer reuses it at no extra cost).

The probe must be drawn **once per solve** and reused at every evaluation (Grathwohl et al.,
2019): a probe redrawn at each evaluation makes the dynamics random and the adaptive solver
shrinks its steps. :func:`sample_probe` draws it; the CNF keeps it fixed for one solve.

References:
    Girard (1989). A fast 'Monte-Carlo cross-validation' procedure for large least squares
    problems with noisy data (the Gaussian probe).
    Hutchinson (1990). A stochastic estimator of the trace of the influence matrix.
    Grathwohl et al. (2019). FFJORD. https://arxiv.org/abs/1810.01367
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import rademacher, randn

__all__ = ["PROBES", "sample_probe", "divergence_exact", "divergence_hutchinson"]

PROBES: tuple[str, ...] = ("rademacher", "gaussian")


def sample_probe(like: Tensor, kind: str = "rademacher", generator: torch.Generator | None = None) -> Tensor:
    """Draw a Hutchinson probe with zero mean and identity covariance.

    Arguments:
        like: a tensor whose shape, dtype and device the probe takes, shape (n, D).
        kind: ``"rademacher"`` (entries ±1) or ``"gaussian"`` (entries N(0, 1)).
        generator: optional torch generator for reproducible probes. The numbers are drawn on
            its device and moved to ``like``'s (:mod:`cnf_lib.checks`): a CPU generator gives
            the same probe for a CPU and a CUDA ``like``.

    Returns:
        The probe, shape (n, D), on ``like``'s device.
    """
    if kind == "gaussian":
        return randn(like.shape, generator, like.dtype, like.device)
    if kind == "rademacher":
        return rademacher(like.shape, generator, like.dtype, like.device)
    raise ValueError(f"unknown probe {kind!r}; expected one of {PROBES}")


def divergence_exact(f: Tensor, x: Tensor, create_graph: bool = True) -> tuple[Tensor, Tensor]:
    """Exact divergence ``Σ_i ∂f_i/∂x_i`` and squared Frobenius norm of ``∂f/∂x``.

    Arguments:
        f: field values, shape (n, D), computed from ``x`` with autograd on.
        x: the points, shape (n, D), with ``requires_grad``.
        create_graph: keep the graph, so that the result can be differentiated (training).

    Returns:
        ``(div, frobenius)``, each shape (n,): the trace and ``‖∂f/∂x‖²_F`` of each point's
        Jacobian, from D vector-Jacobian products (one row of the Jacobian each).
    """
    div = torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
    frob = torch.zeros_like(div)
    for i in range(f.shape[1]):
        (row,) = torch.autograd.grad(f[:, i].sum(), x, create_graph=create_graph, retain_graph=True)
        div = div + row[:, i]
        frob = frob + row.pow(2).sum(1)
    return div, frob


def divergence_hutchinson(
    f: Tensor, x: Tensor, probe: Tensor, create_graph: bool = True
) -> tuple[Tensor, Tensor]:
    """Hutchinson's estimate ``εᵀ (∂f/∂x) ε`` of the divergence, from one VJP.

    Arguments:
        f: field values, shape (n, D), computed from ``x`` with autograd on.
        x: the points, shape (n, D), with ``requires_grad``.
        probe: the probe ε, shape (n, D), from :func:`sample_probe`.
        create_graph: keep the graph, so that the result can be differentiated (training).

    Returns:
        ``(div, frobenius)``, each shape (n,): the trace estimate and ``‖εᵀ ∂f/∂x‖²``, an
        unbiased estimate of ``‖∂f/∂x‖²_F`` that reuses the same VJP.
    """
    (vjp,) = torch.autograd.grad(f, x, probe, create_graph=create_graph, retain_graph=True)
    return (vjp * probe).sum(1), vjp.pow(2).sum(1)
