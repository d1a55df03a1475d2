r"""Flow matching: training a CNF's own field by regression, without solving the ODE.

A :class:`~cnf_lib.cnf.CNF` moves the prior :math:`p_0 = \mathcal N(0, I)` at :math:`t = 0` to the
data at :math:`t = t_1`. Flow matching (Lipman et al., 2023; Liu et al., 2023; Albergo and
Vanden-Eijnden, 2023) chooses a *probability path* between the two and regresses the field on the
velocities of that path. With the rescaled time :math:`s = t / t_1 \in [0, 1]`, a prior point
:math:`x_0 \sim \mathcal N(0, I)` paired with a data point :math:`x_1` moves on the straight line

.. math:: x_t = (1 - s)\, x_0 + s\, x_1 + \sigma \varepsilon, \qquad
          u_t(x_t \mid x_0, x_1) = \frac{x_1 - x_0}{t_1},

with :math:`\varepsilon \sim \mathcal N(0, I)` (:math:`\sigma \ge 0`, the same at every time: Tong et
al., 2024's I-CFM and OT-CFM), and the conditional flow-matching loss is

.. math:: \mathcal L(\theta) = \mathbb E_{t \sim U[0, t_1],\, (x_0, x_1),\, \varepsilon}
          \big\lVert f_\theta(t, x_t) - u_t(x_t \mid x_0, x_1) \big\rVert^2 .

Its minimizer is the *marginal* field :math:`\mathbb E[u_t \mid x_t = x]`, which carries the
marginal path from the prior to the data, so the regressed field is the CNF's field, used
unchanged by :meth:`CNF.log_prob <cnf_lib.cnf.CNF.log_prob>`, :meth:`~cnf_lib.cnf.CNF.sample` and
:meth:`~cnf_lib.cnf.CNF.trajectory` (time runs the same way: prior at 0, data at :math:`t_1`).
The pairs :math:`(x_0, x_1)` are drawn independently (``pairs="independent"``) or coupled within each
mini-batch by the exact optimal-transport plan for the squared Euclidean cost (``pairs="ot"``,
Tong et al., 2024; Pooladian et al., 2023), which straightens the paths.

With :math:`\sigma > 0` the path's ends are smoothed: its marginal is
:math:`\mathcal N(0, (1 + \sigma^2) I)` at :math:`t = 0` and the data convolved with
:math:`\mathcal N(0, \sigma^2 I)` at :math:`t_1`, while the CNF's prior stays
:math:`\mathcal N(0, I)`; keep :math:`\sigma` small (or 0).

:class:`FlowMatching` is an objective for the one :class:`~cnf_lib.train.Trainer`, so flow
matching gets the trainer's seeding, guards, checkpoints and exact resume. Its loss never calls
the ODE solver (``nfe_forward = nfe_backward = 0``); its held-out score is the maximum-likelihood
NLL under ``config.eval_settings`` (an ODE solve with the exact trace by default), so the
trainer's ``test_nll`` is comparable with a maximum-likelihood run.

References:
    Lipman et al. (2023). Flow matching for generative modeling. https://arxiv.org/abs/2210.02747
    Liu et al. (2023). Flow straight and fast: learning to generate and transfer data with
    rectified flow. https://arxiv.org/abs/2209.03003
    Albergo and Vanden-Eijnden (2023). Building normalizing flows with stochastic interpolants.
    https://arxiv.org/abs/2209.15571
    Tong et al. (2024). Improving and generalizing flow-based generative models with minibatch
    optimal transport. https://arxiv.org/abs/2302.00482
    Pooladian et al. (2023). Multisample flow matching: straightening flows with minibatch
    couplings. https://arxiv.org/abs/2304.14772
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import ot
import torch
from torch import Tensor, nn

from .checks import check_points, randn, uniform
from .fields import ConcatSquashMLP
from .objectives import MaximumLikelihood, Sampler
from .train import TrainConfig, Trainer

__all__ = ["PAIRINGS", "TIME_SAMPLINGS", "MatchingObjective", "FlowMatching", "MatchingResult", "ot_pairing",
           "conditional_path", "field_at_times", "gaussian_marginal_field", "gaussian_minimum_loss",
           "TOY_SETTINGS", "HIGH_DIM_MATCHING", "warm_start"]

#: The :class:`~cnf_lib.train.Trainer` settings of flow matching on the 2-D toys, chosen by chapter 8's
#: search on 2,000 validation points of two moons (eight Gaussians only checked): 2,000 iterations of
#: 256 points, Adam 3e-2 on one cosine to 3e-4, no clipping, no kinetic term (flow matching has none).
TOY_SETTINGS: dict[str, Any] = dict(iterations=2000, batch_size=256, lr=3e-2, lr_final=3e-4, lr_period=None,
                                    grad_clip=None, kinetic=0.0, eval_every=0)

#: What :meth:`FlowMatching.default_config` changes from :data:`TOY_SETTINGS` for data of more than two
#: dimensions: 6,000 iterations of 1,024 points (about the CPU time of 3,000 of 2,048: 30-50 s of one
#: core in 10-D, by machine). Chosen on the tuning sets of benchmarks/tune_heldout.py (an elongated
#: Gaussian mixture in 8-D, a warped mixture in 10-D; RECIPE.md, eighth sweep) with the SiLU field
#: (:func:`~cnf_lib.fields.default_activation`) and late times (:class:`FlowMatching`'s ``times``):
#: gaps 0.075 and 0.185 nats (seed 0), against 0.159 and 0.297 for the seventh sweep's 3,000
#: iterations of 2,048 points, uniform times and tanh.
HIGH_DIM_MATCHING: dict[str, Any] = dict(iterations=6000, batch_size=1024)

#: The couplings of prior and data points :class:`FlowMatching` knows.
PAIRINGS: tuple[str, ...] = ("independent", "ot")

#: How :class:`FlowMatching` draws the time of each regression point, as the fraction
#: :math:`s = t / t_1` of the way to the data: ``"uniform"`` (:math:`s \sim U[0, 1]`) or ``"late"``
#: (:math:`s = \sqrt{u}`, :math:`u \sim U[0, 1]`: density :math:`2s`, more points near the data,
#: where a likelihood needs the field's detail).
TIME_SAMPLINGS: tuple[str, ...] = ("uniform", "late")

# Largest number of network-simplex iterations for ot.emd (its default, 1e5, can stop short of
# the optimum on batches of a few hundred points; POT then warns and returns a non-optimal plan).
_EMD_MAX_ITER = 10_000_000


@dataclass
class MatchingResult:
    """What one flow-matching loss evaluation reports to the trainer: no solve, so no evaluations.

    Attributes:
        nfe_forward: ODE function evaluations of the loss (always 0).
        nfe_backward: evaluations of a backward (adjoint) solve (always 0).
    """

    nfe_forward: int = 0
    nfe_backward: int = 0


def ot_pairing(x0: Tensor, x1: Tensor) -> Tensor:
    r"""The exact optimal-transport pairing of two equal-sized batches (squared Euclidean cost).

    Solves :math:`\min_\pi \sum_{ij} \pi_{ij} \lVert x_{0,i} - x_{1,j} \rVert^2` over couplings with
    uniform marginals by POT's network simplex (:func:`ot.emd`, in float64). For equal sizes an
    optimal vertex of that polytope is a permutation matrix divided by :math:`n` (Birkhoff), which
    ``ot.emd`` returns; this function returns that permutation.

    Arguments:
        x0: prior points, shape (n, D).
        x1: data points, shape (n, D).

    Returns:
        ``j``, shape (n,), int64 on ``x1``'s device: ``x0[i]`` is paired with ``x1[j[i]]``.

    Raises:
        ValueError: if the batches differ in size or dimension, or hold NaN/inf values.
    """
    x0 = check_points(x0, "x0")
    x1 = check_points(x1, "x1", dim=x0.shape[1])
    n = x0.shape[0]
    if x1.shape[0] != n:
        raise ValueError(f"ot_pairing needs batches of equal size, got {n} prior and {x1.shape[0]} data points")
    a = x0.detach().cpu().double().numpy()
    b = x1.detach().cpu().double().numpy()
    cost = ot.dist(a, b, metric="sqeuclidean")
    weights = np.full(n, 1.0 / n)
    plan = ot.emd(weights, weights, cost, numItermax=_EMD_MAX_ITER)
    j = plan.argmax(axis=1)
    if not np.allclose(plan[np.arange(n), j], 1.0 / n, rtol=1e-6, atol=1e-12):  # pragma: no cover
        raise RuntimeError("ot.emd returned a plan that is not a permutation (a degenerate vertex)")
    return torch.as_tensor(j, dtype=torch.int64, device=x1.device)


def conditional_path(
    x0: Tensor, x1: Tensor, t: Tensor, sigma: float = 0.0, noise: Tensor | None = None, t1: float = 1.0
) -> tuple[Tensor, Tensor]:
    r"""The point on each pair's path at time ``t`` and the conditional field there.

    .. math:: x_t = (1 - s) x_0 + s x_1 + \sigma \varepsilon, \quad u_t = (x_1 - x_0) / t_1,
              \quad s = t / t_1 .

    Arguments:
        x0: prior points (at time 0), shape (n, D).
        x1: data points (at time ``t1``), shape (n, D).
        t: times in :math:`[0, t_1]`, shape (n,).
        sigma: the standard deviation of the Gaussian tube around each line (>= 0).
        noise: :math:`\varepsilon`, shape (n, D) (needed when ``sigma > 0``).
        t1: the time of the data.

    Returns:
        ``(x_t, u_t)``, shapes (n, D) and (n, D).
    """
    s = (t / t1).unsqueeze(1)
    xt = (1 - s) * x0 + s * x1
    if sigma > 0:
        if noise is None:
            raise ValueError("conditional_path needs noise (shape (n, D)) when sigma > 0")
        xt = xt + sigma * noise
    return xt, (x1 - x0) / t1


def field_at_times(field: nn.Module, t: Tensor, x: Tensor) -> Tensor:
    """Evaluates a field ``f(t, x)`` with one time per point.

    An ODE solve evaluates a field at one time for the whole batch; flow matching needs a time per
    point. A :class:`~cnf_lib.fields.ConcatSquashMLP` takes one (its ``forward`` accepts ``t`` of
    shape (n,)); any other field is evaluated through :func:`torch.func.vmap` over the points.

    Arguments:
        field: the field, called as ``field(t, x)`` with a scalar ``t`` and ``x`` of shape (m, D).
        t: times, shape (n,).
        x: points, shape (n, D).

    Returns:
        ``f(t_i, x_i)`` for each point, shape (n, D).
    """
    if isinstance(field, ConcatSquashMLP):
        return field(t.to(x), x)
    return torch.func.vmap(lambda ti, xi: field(ti, xi.unsqueeze(0)).squeeze(0))(t.to(x), x)


class MatchingObjective:
    """What every flow-matching objective shares: its two settings, checked, and their record.

    Arguments:
        pairs: one of :data:`PAIRINGS` (``"independent"`` or ``"ot"``).
        sigma: the standard deviation of the tube around each straight path, >= 0.
    """

    records: tuple[str, ...] = ()
    #: flow matching never solves the ODE in training (see :class:`~cnf_lib.objectives.Objective`)
    solves_in_training: bool = False

    def __init__(self, pairs: str, sigma: float) -> None:
        if pairs not in PAIRINGS:
            raise ValueError(f"unknown pairs {pairs!r}; expected one of {PAIRINGS}")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
        self.pairs = pairs
        self.sigma = float(sigma)

    def config(self) -> dict[str, Any]:
        """The objective's settings as plain values (``pairs``, ``sigma``)."""
        return dict(pairs=self.pairs, sigma=self.sigma)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pairs={self.pairs!r}, sigma={self.sigma})"


class FlowMatching(MatchingObjective):
    r"""Conditional flow matching of a :class:`~cnf_lib.cnf.CNF`'s field: an objective for the trainer.

    Each iteration draws ``batch_size`` data points :math:`x_1` (as maximum likelihood does: rows of
    a tensor without replacement, or a sampler's fresh points), as many prior points
    :math:`x_0 \sim \mathcal N(0, I)`, times :math:`t \in [0, t_1]` (as ``times`` says) and, with ``sigma > 0``,
    noise :math:`\varepsilon`, all from the trainer's generator (in that order; drawn on its
    device, then moved). With ``pairs="ot"`` the prior points are reordered by
    :func:`ot_pairing`. The loss is the batch mean of
    :math:`\lVert f_\theta(t, x_t) - u_t \rVert^2` (summed over the D coordinates) of
    :func:`conditional_path`: one evaluation of the field, no ODE solve.

    Records: ``nll`` is NaN (no likelihood is computed during training; the flow-matching loss is
    the history's ``loss``), ``nfe_forward`` is 0, and the result's ``nfe_backward`` is 0. The
    held-out score (:meth:`evaluate`) is the NLL by an ODE solve with ``config.eval_settings``,
    exactly as :class:`~cnf_lib.objectives.MaximumLikelihood` computes it.

    The trainer's ``kinetic``, ``frobenius`` must be 0 (flow matching has no such terms), and its
    ``train_settings`` are not used (there is no training solve). Given fields rather than a
    ``config``, the trainer takes :meth:`default_config`: chapter 8's settings (no kinetic term) in
    two dimensions, more iterations of more points above.

    **Times.** The minimizer of the loss is the marginal field whatever the distribution of the
    times, as long as it covers :math:`[0, t_1]`; the distribution only says where the regression
    spends its points. ``times=None`` (the default) draws them uniformly in one or two dimensions
    (chapter 8's setting) and ``"late"`` above (:data:`TIME_SAMPLINGS`: density growing linearly
    towards the data), chosen on the tuning sets of benchmarks/tune_heldout.py (RECIPE.md, eighth
    sweep).

    Arguments:
        pairs: ``"independent"`` or ``"ot"`` (exact mini-batch optimal transport, :func:`ot_pairing`).
        sigma: the standard deviation of the tube around each straight path, >= 0.
        times: one of :data:`TIME_SAMPLINGS`, or ``None``: ``"uniform"`` for data of one or two
            dimensions, ``"late"`` above (:meth:`time_sampling`).

    Example:
        >>> model = CNF(2, hidden=(64, 64, 64))
        >>> fm = FlowMatching(pairs="ot", sigma=0.0)
        >>> trainer = Trainer(model, toy.sample, test, objective=fm, kinetic=0.0, iterations=2000)
        >>> history = trainer.fit()          # history["test_nll"]: exact-trace NLL, as for MLE
        >>> samples = model.sample(1000)     # the same CNF, unchanged
    """

    def __init__(self, pairs: str = "independent", sigma: float = 0.0, times: str | None = None) -> None:
        super().__init__(pairs, sigma)
        if times is not None and times not in TIME_SAMPLINGS:
            raise ValueError(f"unknown times {times!r}; expected None or one of {TIME_SAMPLINGS}")
        self.times = times
        self._likelihood = MaximumLikelihood()

    def config(self) -> dict[str, Any]:
        """The objective's settings as plain values (``pairs``, ``sigma``, ``times``)."""
        return {**super().config(), "times": self.times}

    def __repr__(self) -> str:
        return f"FlowMatching(pairs={self.pairs!r}, sigma={self.sigma}, times={self.times!r})"

    def time_sampling(self, dim: int) -> str:
        """The time distribution used for ``dim``-dimensional data: ``times``, or for ``times=None``
        ``"uniform"`` in one or two dimensions and ``"late"`` above."""
        if self.times is not None:
            return self.times
        return "uniform" if dim <= 2 else "late"

    @staticmethod
    def _check_model(model: nn.Module) -> None:
        if not (hasattr(model, "field") and hasattr(model, "t1") and hasattr(model, "dim")):
            raise ValueError("FlowMatching trains a CNF (a model with .field, .dim and .t1), "
                             f"got {type(model).__name__}")
        if not model.t1 > 0:
            raise ValueError(f"FlowMatching needs the data at a time t1 > 0, got t1={model.t1}")
        if getattr(model, "base", None) is not None:
            raise ValueError("FlowMatching transports N(0, I) to the data, but this CNF has another base density "
                             f"({type(model.base).__name__}): train it by maximum likelihood, or build the CNF "
                             "without a base")

    @staticmethod
    def default_config(dim: int, **fields: Any) -> TrainConfig:
        """The trainer's settings for flow matching on ``dim``-dimensional data, ``fields`` overriding them.

        :data:`TOY_SETTINGS` (chapter 8's, chosen on two moons) in one or two dimensions; above,
        with :data:`HIGH_DIM_MATCHING` (more iterations of more points). :class:`~cnf_lib.train.Trainer`
        uses this when it is given fields rather than a ``config``.
        """
        if int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        settings = {**TOY_SETTINGS, **(HIGH_DIM_MATCHING if dim > 2 else {})}
        return TrainConfig(**{**settings, **fields})

    def check_data(self, model: nn.Module, data: Any, name: str) -> Tensor | Sampler:
        """Validates training data (points (n, D) or a sampler) or held-out points (n, D)."""
        self._check_model(model)
        return self._likelihood.check_data(model, data, name)

    def batch(self, data: Tensor | Sampler, batch_size: int, generator: torch.Generator) -> Tensor:
        """``batch_size`` data points: rows without replacement, or fresh draws of a sampler."""
        return self._likelihood.batch(data, batch_size, generator)

    def pair(self, x1: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Prior points for a batch of data points, coupled as ``pairs`` says.

        Arguments:
            x1: data points, shape (n, D).
            generator: draws the prior points (on its device, then moved to ``x1``'s).

        Returns:
            ``(x0, x1)``, each shape (n, D): ``x0[i]`` is the prior point paired with ``x1[i]``.
        """
        x0 = randn(tuple(x1.shape), generator, x1.dtype, x1.device)
        if self.pairs == "ot":
            j = ot_pairing(x0, x1)
            x0 = x0[torch.argsort(j)]  # x0 reordered so that row i goes with x1[i]
        return x0, x1

    def regression_targets(self, x1: Tensor, generator: torch.Generator | None,
                           t1: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        r"""The regression problem of one batch: times, points on the paths and target velocities.

        Arguments:
            x1: data points, shape (n, D).
            generator: draws the prior points, then the times (:meth:`time_sampling` of D), then
                (``sigma > 0``) the noise.
            t1: the time of the data.

        Returns:
            ``(t, x_t, u_t)``, shapes (n,), (n, D), (n, D).
        """
        x0, x1 = self.pair(x1, generator)
        s = uniform((x1.shape[0],), generator, x1.dtype, x1.device)
        if self.time_sampling(x1.shape[1]) == "late":
            s = s.sqrt()  # P(s <= a) = a²: density 2s on [0, 1]
        t = t1 * s
        noise = randn(tuple(x1.shape), generator, x1.dtype, x1.device) if self.sigma > 0 else None
        xt, ut = conditional_path(x0, x1, t, self.sigma, noise, t1)
        return t, xt, ut

    def loss(self, model: nn.Module, batch: Tensor, config: TrainConfig,
             generator: torch.Generator) -> tuple[Tensor, dict[str, float], MatchingResult]:
        """The flow-matching loss of a batch (no ODE solve), its records and a :class:`MatchingResult`.

        Raises:
            ValueError: if ``config.kinetic`` or ``config.frobenius`` is not 0.
        """
        if config.kinetic != 0 or config.frobenius != 0:
            raise ValueError(
                f"FlowMatching has no kinetic or Frobenius term (got kinetic={config.kinetic}, "
                f"frobenius={config.frobenius}); pass kinetic=0 and frobenius=0 to the Trainer"
            )
        param = next(model.parameters())
        x1 = check_points(batch, "sampled batch", dim=model.dim, dtype=param.dtype).to(param.device)
        t, xt, ut = self.regression_targets(x1, generator, model.t1)
        loss = (field_at_times(model.field, t, xt) - ut).pow(2).sum(1).mean()
        return loss, dict(nll=math.nan, nfe_forward=0), MatchingResult()

    def evaluate(self, model: nn.Module, data: Tensor, config: TrainConfig,
                 generator: torch.Generator) -> tuple[float, int]:
        """``(held-out NLL, NFE)`` by maximum likelihood with ``config.eval_settings`` (an ODE solve)."""
        return self._likelihood.evaluate(model, data, config, generator)


def warm_start(model: nn.Module, train_data: Tensor | Sampler, iterations: int = 2000, batch_size: int = 512,
               seed: int = 0, progress: bool = True) -> Trainer:
    r"""Trains a CNF's field by flow matching (independent pairs), to start maximum likelihood from.

    A flow-matching iteration evaluates the field once, with no ODE solve; a maximum-likelihood
    iteration solves the ODE with the trace and backpropagates through the solve (16 evaluations on
    the trainer's default grid). So a few thousand cheap iterations find the rough shape of the
    flow, and a :class:`~cnf_lib.train.Trainer` by maximum likelihood then refines the same model::

        warm_start(model, x)                          # 2,000 flow-matching iterations
        Trainer(model, x, iterations=400).fit()       # then maximum likelihood

    Measured in 6 and 12 dimensions on a tanh field (benchmarks/bench_heldout.py, variant
    ``warm_start``; the Performance appendix): with 400 likelihood iterations after it, closer to
    the truth than the 600 of the trainer's defaults on the same field at about the same CPU time
    (0.136 against 0.223 nats on a 6-D mixture, 0.388 against 0.492 on a 12-D one, medians of
    three seeds); but on the 6-D set four times the likelihood iterations after it ended farther
    from the truth than one (0.210 nats), the field fitting its training grid. So it is an option,
    not the default. Flow matching alone at its defaults for D (:meth:`FlowMatching.default_config`,
    on ``CNF(D)``'s SiLU field) ended closer at every budget (the same appendix: 0.065 and 0.255
    nats at 1x).

    Arguments:
        model: a :class:`~cnf_lib.cnf.CNF` with the N(0, I) base (flow matching transports it).
        train_data: training points (n, D) or a sampler ``(n, generator) -> (n, D)``.
        iterations: flow-matching iterations.
        batch_size: points per iteration.
        seed: seeds the trainer's generator (batches, prior points, times).
        progress: show the trainer's progress bar.

    Returns:
        The flow-matching :class:`~cnf_lib.train.Trainer`, fitted (its ``history`` has the loss);
        the model is trained in place. Settings: :meth:`FlowMatching.default_config`'s but for the
        iterations and the batch (Adam on one cosine from 3e-2 to 3e-4, no clipping), with times
        drawn uniformly in every dimension (as measured).

    Raises:
        ValueError: for a model with another base density, or bad data (as :class:`FlowMatching`).
    """
    trainer = Trainer(model, train_data, objective=FlowMatching("independent", times="uniform"), iterations=iterations,
                      batch_size=batch_size, seed=seed, progress=progress)
    trainer.fit()
    return trainer


# -- closed forms for a Gaussian target (tests and the chapter's exercise) ------------------------

def _symmetric_eig(cov: Tensor) -> tuple[Tensor, Tensor]:
    cov = torch.as_tensor(cov, dtype=torch.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square matrix, got shape {tuple(cov.shape)}")
    if not torch.allclose(cov, cov.T):
        raise ValueError("cov must be symmetric")
    lam, q = torch.linalg.eigh(cov)
    if (lam <= 0).any():
        raise ValueError(f"cov must be positive definite, got eigenvalues {lam.tolist()}")
    return lam, q


def gaussian_marginal_field(mean: Tensor, cov: Tensor, t1: float = 1.0) -> nn.Module:
    r"""The marginal field of independent-pair flow matching (``sigma = 0``) from
    :math:`\mathcal N(0, I)` to :math:`\mathcal N(m, \Sigma)`, as a module ``f(t, x)``.

    With :math:`s = t/t_1`, :math:`x_t = (1-s) x_0 + s x_1` is Gaussian with mean :math:`s m` and
    covariance :math:`C_s = (1-s)^2 I + s^2 \Sigma`, and :math:`u = (x_1 - x_0)/t_1` is jointly
    Gaussian with it, so

    .. math:: f(t, x) = \mathbb E[u \mid x_t = x]
              = \frac{1}{t_1}\Big(m + \big(s\Sigma - (1-s) I\big) C_s^{-1} (x - s m)\Big).

    It is the minimizer of the flow-matching loss, and its flow carries :math:`\mathcal N(0, I)` at
    :math:`t = 0` to :math:`\mathcal N(m, \Sigma)` at :math:`t_1`.

    Arguments:
        mean: :math:`m`, shape (D,).
        cov: :math:`\Sigma`, shape (D, D), symmetric positive definite.
        t1: the time of the data.

    Returns:
        A module (its constants are frozen float64 parameters) mapping ``(t, x)`` (scalar, (n, D)) to
        (n, D), in ``x``'s dtype.
    """
    lam, q = _symmetric_eig(cov)
    mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
    if mean.shape[0] != lam.shape[0]:
        raise ValueError(f"mean has {mean.shape[0]} entries, cov is {lam.shape[0]} x {lam.shape[0]}")
    return _GaussianMarginalField(mean, lam, q, float(t1))


class _GaussianMarginalField(nn.Module):
    """See :func:`gaussian_marginal_field`; in the eigenbasis of Σ the field is diagonal.

    Its constants are frozen parameters (``requires_grad=False``), not buffers, so that a
    :class:`~cnf_lib.cnf.CNF` built on it takes its dtype and device from them (``.double()``) and
    can sample.
    """

    def __init__(self, mean: Tensor, lam: Tensor, q: Tensor, t1: float) -> None:
        super().__init__()
        self.mean = nn.Parameter(mean, requires_grad=False)
        self.lam = nn.Parameter(lam, requires_grad=False)
        self.q = nn.Parameter(q, requires_grad=False)
        self.t1 = t1

    def _gain(self, s: Tensor) -> Tensor:
        """Diagonal of (sΣ - (1-s)I) C_s^{-1} in the eigenbasis, shape (..., D)."""
        return (s * self.lam - (1 - s)) / ((1 - s) ** 2 + s**2 * self.lam)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        s = torch.as_tensor(t, dtype=self.mean.dtype, device=x.device) / self.t1
        if s.ndim > 0:  # one time per point (vmap or a column)
            s = s.reshape(-1, 1)
        y = (x.to(self.mean.dtype) - s * self.mean) @ self.q  # eigen-coordinates
        out = self.mean + (self._gain(s) * y) @ self.q.T
        return (out / self.t1).to(x.dtype)

    def divergence(self, t: Tensor | float, x: Tensor, frobenius: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(f, tr ∂f/∂x, ‖∂f/∂x‖²_F)``, shapes (n, D), (n,), (n,) (the Jacobian is constant in x)."""
        s = torch.as_tensor(t, dtype=self.mean.dtype, device=x.device) / self.t1
        gain = self._gain(s) / self.t1
        n = x.shape[0]
        div = gain.sum().to(x.dtype).expand(n)
        frob = gain.pow(2).sum().to(x.dtype).expand(n) if frobenius else None
        return self.forward(t, x), div, frob


def gaussian_minimum_loss(cov: Tensor, t1: float = 1.0) -> float:
    r"""The minimum of the independent-pair flow-matching loss (``sigma = 0``) from
    :math:`\mathcal N(0, I)` to :math:`\mathcal N(m, \Sigma)`.

    The residual variance of :math:`u` given :math:`x_t` at :math:`s = t/t_1` is
    :math:`\sum_i \lambda_i / \big((1-s)^2 + s^2 \lambda_i\big) / t_1^2` (:math:`\lambda_i` the
    eigenvalues of :math:`\Sigma`); averaged over :math:`s \sim U[0, 1]` it is

    .. math:: \mathcal L^\ast = \frac{\pi}{2 t_1^2} \sum_i \sqrt{\lambda_i}
              = \frac{\pi}{2 t_1^2} \operatorname{tr} \Sigma^{1/2},

    whatever the mean :math:`m`. It is the loss of :func:`gaussian_marginal_field`.

    Arguments:
        cov: :math:`\Sigma`, shape (D, D), symmetric positive definite.
        t1: the time of the data.
    """
    lam, _ = _symmetric_eig(cov)
    return float(math.pi / 2 * lam.sqrt().sum() / t1**2)

