"""What a training iteration minimizes: the objectives the one :class:`~cnf_lib.train.Trainer` runs.

An objective says how a mini-batch is drawn from the training data, what loss it gives and how a
held-out score is computed; the trainer owns everything else (the optimizer and its schedule, the
generator, the NaN and solver guards, clipping, progress, history, checkpoints and exact resume).
So every entry point of ``cnf_lib`` that trains (a CNF density, a time course) inherits the same
guards by running its own objective through the same loop.

* :class:`MaximumLikelihood` — the default: ``-mean log p(x)`` of a batch of points, plus the
  RNODE regularizers ``kinetic * mean ∫‖f‖² dt + frobenius * mean ∫‖∂f/∂x‖²_F dt`` (Finlay et al.,
  2020), integrated as extra ODE states.

An objective is any object with the methods of :class:`Objective`; :mod:`cnf_lib.timecourse`
defines one for snapshots of a time course.

References:
    Finlay et al. (2020). How to train your neural ODE (RNODE). https://arxiv.org/abs/2002.02798
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from .checks import check_points, randperm, user_stacklevel

if TYPE_CHECKING:  # type hints only (train imports this module)
    from .train import TrainConfig

__all__ = ["Objective", "MaximumLikelihood", "Sampler"]

#: A sampler of fresh training points: ``(n, generator) -> (n, D)`` (the 2-D toys' ``sample``).
Sampler = Callable[[int, torch.Generator], Tensor]


def _warn_if_far_from_unit_scale(x: Tensor) -> None:
    """The recipes (and the N(0, I) prior) expect roughly standardized data; say so when it is not."""
    std = x.detach().double().std(0)
    mean = x.detach().double().mean(0)
    if (std < 0.2).any() or (std > 5).any() or (mean.abs() > 5 * std.clamp_min(1e-12)).any():
        warnings.warn(
            f"train_data is far from unit scale (column means {mean.min().item():.3g} to {mean.max().item():.3g}, "
            f"standard deviations {std.min().item():.3g} to {std.max().item():.3g}); the prior is N(0, I) and the "
            "recipes are tuned for standardized data. Standardize it: s = cnf_lib.datasets.Standardizer.fit(x); "
            "train on s.transform(x) and add s.log_abs_det() to every log-likelihood of x (fit_density does both).",
            UserWarning, stacklevel=user_stacklevel(),
        )


class Objective(Protocol):
    """The interface the trainer calls; see :class:`MaximumLikelihood` for the reference one.

    Attributes:
        records: names of extra per-iteration values that :meth:`loss` returns (besides ``nll``
            and ``nfe_forward``), kept in the trainer's history.

    An objective may also have ``default_config(dim, **fields) -> TrainConfig``: the settings the
    trainer takes when it is given fields rather than a config (maximum likelihood's are
    :meth:`TrainConfig.for_dim <cnf_lib.train.TrainConfig.for_dim>`; flow matching's,
    :meth:`FlowMatching.default_config <cnf_lib.matching.FlowMatching.default_config>`).
    """

    records: tuple[str, ...]
    #: whether :meth:`loss` solves the ODE (on ``config.train_settings``); flow matching does not
    solves_in_training: bool

    def check_data(self, model: nn.Module, data: Any, name: str) -> Any:
        """Validate training or held-out data for ``model`` (raise a clear ``ValueError``)."""

    def batch(self, data: Any, batch_size: int, generator: torch.Generator) -> Any:
        """A mini-batch of ``data``, drawn with ``generator`` only."""

    def loss(self, model: nn.Module, batch: Any, config: TrainConfig,
             generator: torch.Generator) -> tuple[Tensor, dict[str, float], Any]:
        """``(loss, records, result)``: the scalar loss, the values to record (``nll``,
        ``nfe_forward`` and :attr:`records`) and an object whose ``nfe_backward`` counts the
        backward pass's evaluations once it ran."""

    def evaluate(self, model: nn.Module, data: Any, config: TrainConfig,
                 generator: torch.Generator) -> tuple[float, int]:
        """``(held-out NLL, NFE)`` of ``data`` under ``config.eval_settings``."""


class MaximumLikelihood:
    """Maximum likelihood of points under a :class:`~cnf_lib.cnf.CNF`, with RNODE regularizers.

    The data is a tensor (n, D), whose batches are ``batch_size`` rows drawn without replacement
    (all of them when ``batch_size >= n``), or a :data:`Sampler` that draws fresh points.
    """

    records: tuple[str, ...] = ()
    solves_in_training: bool = True

    def check_data(self, model: nn.Module, data: Any, name: str) -> Tensor | Sampler:
        """Points (n, D) (a warning when training data is far from unit scale), or a sampler."""
        if callable(data) and not isinstance(data, Tensor):
            if name != "train_data":
                raise ValueError(f"{name} must be points of shape (n, D), not a sampler")
            return data
        points = check_points(data, name, dim=model.dim)
        if name == "train_data" and points.shape[0] > 1:
            _warn_if_far_from_unit_scale(points)
        return points

    def batch(self, data: Tensor | Sampler, batch_size: int, generator: torch.Generator) -> Tensor:
        if not isinstance(data, Tensor):
            return data(batch_size, generator)
        n = data.shape[0]
        if batch_size >= n:
            return data
        return data[randperm(n, generator, data.device)[:batch_size]]

    def loss(self, model: nn.Module, batch: Tensor, config: TrainConfig,
             generator: torch.Generator) -> tuple[Tensor, dict[str, float], Any]:
        batch = check_points(batch, "sampled batch", dim=model.dim)
        regularize = config.kinetic > 0 or config.frobenius > 0
        logp, res = model.log_prob_result(batch, regularize=regularize, generator=generator,
                                          **config.train_settings)
        nll = -logp.mean()
        loss = nll
        if regularize:
            loss = loss + config.kinetic * res.kinetic.mean() + config.frobenius * res.frobenius.mean()
        return loss, dict(nll=nll.item(), nfe_forward=res.nfe_forward), res

    def evaluate(self, model: nn.Module, data: Tensor, config: TrainConfig,
                 generator: torch.Generator) -> tuple[float, int]:
        logp, res = model.log_prob_result(data, generator=generator, **config.eval_settings)
        return -logp.mean().item(), res.nfe_forward
