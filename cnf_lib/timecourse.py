r"""Trajectories from snapshots: a CNF through a single-cell time course (TrajectoryNet-style).

Single-cell sequencing destroys the cells it measures, so a time course is a series of
*unpaired* snapshots :math:`X_0, \dots, X_{K-1}` taken at times :math:`t_0 < \dots < t_{K-1}`.
This module fits **one** time-dependent vector field through all of them and reads cell paths
off its flow (Tong et al., 2020):

* :class:`TimeCourse` — the snapshots of an AnnData (``time_key``, ``use_rep``, ``n_comps``),
  with clear errors for a missing time column, a single time point or non-numeric times; the
  representation is read by :func:`cnf_lib.singlecell.get_representation`, with its checks.
* :class:`TrajectoryCNF` — the multi-time CNF. The prior :math:`\mathcal N(0, I)` sits at model
  time :math:`\tau = 0`, one mean snapshot interval (``prior_gap``) *before* the first snapshot
  (and, in the model's coordinates, centred on it), and snapshot :math:`k` is the CNF's marginal
  at its own model time :math:`\tau_k`, so every snapshot, the first included, has a likelihood:

  .. math:: \mathcal L = -\frac{1}{K}\sum_k \frac{1}{n_k}\sum_{x \in X_k} \log p_{\tau_k}(x)
            + \lambda \, \frac{1}{n}\sum_{\text{paths}} \int \lVert f(\tau, x(\tau)) \rVert^2 d\tau .

  The snapshots are integrated back to the prior in one sweep: the latest batch is solved from
  :math:`\tau_{K-1}` to :math:`\tau_{K-2}`, the batch of that time joins it, and so on down to 0
  (each segment is one :meth:`cnf_lib.cnf.CNF.flow` call).
* :class:`SnapshotLikelihood` — that loss as an objective of the one
  :class:`~cnf_lib.train.Trainer`; :func:`fit_timecourse` trains with it (guards, checkpoints,
  exact resume), :func:`fit_trajectories` is the scanpy-style entry point.

The simulator of time courses is :mod:`cnf_lib.simulation`; the baselines a model is measured
against are :mod:`cnf_lib.baselines`.

References:
    Tong, Huang, Wolf, van Dijk and Krishnaswamy (2020). TrajectoryNet: a dynamic optimal
    transport network for modeling cellular dynamics. ICML. https://arxiv.org/abs/2002.04461
    Benamou and Brenier (2000). A computational fluid mechanics solution to the
    Monge-Kantorovich mass transfer problem. Numerische Mathematik 84.
    Finlay et al. (2020). How to train your neural ODE. https://arxiv.org/abs/2002.02798
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .checks import check_points, randn, randperm, uniform
from .cnf import CNF, standard_normal_log_prob
from .matching import MatchingObjective, MatchingResult, conditional_path, field_at_times, ot_pairing
from .singlecell import get_representation
from .train import TrainConfig, Trainer

if TYPE_CHECKING:  # for type hints only
    from anndata import AnnData

__all__ = [
    "TimeCourse",
    "SnapshotLogProbs",
    "TrajectoryCNF",
    "SnapshotLikelihood",
    "SnapshotMatching",
    "fit_timecourse",
    "fit_trajectories",
    "get_trajectories",
    "predict_cells",
    "TRAJECTORY_EVAL_SETTINGS",
]

#: How a fitted trajectory model evaluates unless asked otherwise: adaptive dopri5 at 1e-5 (a
#: model trained on a fixed grid can learn the grid; the grid is a training device only).
TRAJECTORY_EVAL_SETTINGS: dict[str, Any] = dict(method="dopri5", rtol=1e-5, atol=1e-5)


# ==============================================================================================
# From an AnnData to snapshots
# ==============================================================================================


def _numeric_times(column: Any, time_key: str) -> np.ndarray:
    """The time column as floats, or a ValueError that says what is wrong."""
    import pandas as pd

    values = column
    if isinstance(values.dtype, pd.CategoricalDtype):
        values = values.astype(object)
    if values.dtype.kind in "iuf":
        t = values.to_numpy(dtype=np.float64)
    elif values.dtype.kind == "b":
        raise ValueError(f"adata.obs[{time_key!r}] is boolean; the time column must hold numbers")
    else:
        try:
            t = np.array([float(v) for v in values], dtype=np.float64)
        except (TypeError, ValueError):
            examples = list(dict.fromkeys(map(str, values)))[:3]
            raise ValueError(
                f"adata.obs[{time_key!r}] is not numeric (values like {examples}); store the times as "
                f"numbers, e.g. adata.obs['t'] = "
                f"adata.obs[{time_key!r}].str.extract(r'(\\d+\\.?\\d*)')[0].astype(float)"
            ) from None
    if not np.isfinite(t).all():
        raise ValueError(f"adata.obs[{time_key!r}] has {int((~np.isfinite(t)).sum())} missing or infinite times")
    return t


@dataclass
class TimeCourse:
    """The snapshots of a time course in one representation.

    Attributes:
        times: the distinct time points, increasing, shape (K,).
        snapshots: the cells of each time point, ``snapshots[k]`` of shape (n_k, D), float32.
        obs_indices: the rows of the AnnData behind each snapshot (integer arrays).
        use_rep, time_key: where the coordinates and the times came from.
    """

    times: np.ndarray
    snapshots: list[Tensor]
    obs_indices: list[np.ndarray] = field(default_factory=list)
    use_rep: str = ""
    time_key: str = ""

    def __post_init__(self) -> None:
        self.times = np.asarray(self.times, dtype=np.float64).reshape(-1)
        if len(self.times) < 2:
            raise ValueError(f"a time course needs at least 2 time points, got {len(self.times)}")
        if not np.all(np.diff(self.times) > 0):
            raise ValueError(f"times must be strictly increasing, got {self.times.tolist()}")
        if len(self.snapshots) != len(self.times):
            raise ValueError(f"{len(self.snapshots)} snapshots for {len(self.times)} times")
        self.snapshots = [check_points(s, f"snapshot {k}") for k, s in enumerate(self.snapshots)]
        dims = {s.shape[1] for s in self.snapshots}
        if len(dims) != 1:
            raise ValueError(f"all snapshots must have the same dimension, got {sorted(dims)}")

    @classmethod
    def from_anndata(
        cls, adata: AnnData, time_key: str = "time", use_rep: str = "X_pca", n_comps: int | None = None
    ) -> TimeCourse:
        """Splits an AnnData's cells by ``adata.obs[time_key]`` in the representation ``use_rep``.

        Arguments:
            adata: the cells, with a numeric time column (numbers stored as categories or
                strings, like ``"2"`` or ``"2.5"``, are read as numbers too).
            time_key: the column of ``adata.obs`` with each cell's time.
            use_rep: a key of ``adata.obsm`` (``"X_pca"``) or ``"X"``.
            n_comps: keep the first ``n_comps`` columns of the representation.

        Raises:
            ValueError: missing time column, non-numeric or missing times, a single time point,
                a time point with fewer than 2 cells, or a bad representation.
        """
        if time_key not in adata.obs:
            raise ValueError(f"time_key={time_key!r} is not a column of adata.obs; columns: {list(adata.obs.columns)}")
        t = _numeric_times(adata.obs[time_key], time_key)
        x = get_representation(adata, use_rep, n_comps).astype(np.float32)
        times = np.unique(t)
        if len(times) < 2:
            raise ValueError(
                f"adata.obs[{time_key!r}] has a single time point ({times[0]:g}); a trajectory needs at least 2"
            )
        idx = [np.flatnonzero(t == s) for s in times]
        small = [f"{s:g}" for s, i in zip(times, idx) if len(i) < 2]
        if small:
            raise ValueError(f"time point(s) {small} have fewer than 2 cells")
        return cls(times, [torch.from_numpy(x[i]) for i in idx], idx, use_rep, time_key)

    @property
    def dim(self) -> int:
        """The dimension D of the representation."""
        return self.snapshots[0].shape[1]

    def index(self, t: float) -> int:
        """The position of time point ``t`` in :attr:`times` (a ValueError if it is not one)."""
        hits = np.flatnonzero(np.isclose(self.times, float(t), rtol=0, atol=1e-9 * max(1.0, abs(float(t)))))
        if len(hits) != 1:
            raise ValueError(f"{t!r} is not a time point of this course; time points: {self.times.tolist()}")
        return int(hits[0])

    def pooled(self) -> Tensor:
        """All cells, shape (sum n_k, D)."""
        return torch.cat(self.snapshots)


# ==============================================================================================
# The multi-time CNF
# ==============================================================================================


@dataclass
class SnapshotLogProbs:
    """What one sweep of :meth:`TrajectoryCNF.snapshot_log_probs` returns.

    Attributes:
        log_probs: per snapshot, ``log p_{τ_k}(x)`` of its points in the model's standardized
            coordinates, shape (n_k,), or ``None`` for a snapshot not given.
        kinetic: per snapshot, ``∫_0^{τ_k} ‖f‖² dτ`` along each of its points' paths, shape
            (n_k,) (``None`` without ``regularize``).
        nfe_forward: function evaluations of all the segments' forward solves.
        nfe_backward: function evaluations of their backward (adjoint) solves so far.
    """

    log_probs: list[Tensor | None]
    kinetic: list[Tensor | None]
    nfe_forward: int
    _results: list[Any] = field(default_factory=list, repr=False)

    @property
    def nfe_backward(self) -> int:
        return sum(r.nfe_backward for r in self._results)


class TrajectoryCNF(nn.Module):
    r"""One CNF whose marginals pass through every snapshot of a time course.

    Data time :math:`t` maps to model time :math:`\tau = g + (t - t_0)/\bar\Delta` (``g`` =
    ``prior_gap``, :math:`\bar\Delta` the mean interval between time points): the standard-normal
    prior is at :math:`\tau = 0`, the first snapshot at :math:`\tau = g`, and consecutive
    snapshots about one model time unit apart. The CNF works in standardized coordinates
    :math:`(x - m)/s` (``center`` :math:`m`, one global ``scale`` :math:`s`, which keeps the
    geometry: distances and the kinetic energy only scale); every public method takes and returns
    the representation's own coordinates and data times.

    Arguments:
        times: the time points of the course (data units), increasing.
        dim: the dimension D.
        hidden, activation: the field (a ConcatSquash MLP).
        center: :math:`m`, shape (D,) (default 0); scale: :math:`s > 0` (default 1).
        prior_gap: :math:`g`, the model time between the prior and the first snapshot.
        **settings: :class:`~cnf_lib.cnf.SolverSettings` of the CNF.
    """

    def __init__(
        self,
        times: Sequence[float],
        dim: int,
        hidden: Sequence[int] = (64, 64),
        activation: str = "tanh",
        *,
        center: Tensor | None = None,
        scale: float = 1.0,
        prior_gap: float = 1.0,
        **settings: Any,
    ) -> None:
        super().__init__()
        times_arr = np.asarray(times, dtype=np.float64).reshape(-1)
        if len(times_arr) < 2 or not np.all(np.diff(times_arr) > 0):
            raise ValueError(f"times must be at least 2 strictly increasing values, got {times_arr.tolist()}")
        if not (prior_gap > 0 and scale > 0 and math.isfinite(scale)):
            raise ValueError(f"prior_gap and scale must be positive, got {prior_gap}, {scale}")
        self.times = tuple(float(t) for t in times_arr)
        self.unit = float(np.mean(np.diff(times_arr)))
        self.prior_gap = float(prior_gap)
        self.cnf = CNF(dim, hidden=hidden, activation=activation, t1=self.model_time(self.times[-1]), **settings)
        self.dim = self.cnf.dim
        c = torch.zeros(self.dim) if center is None else torch.as_tensor(center, dtype=torch.float32).reshape(-1)
        if c.shape != (self.dim,):
            raise ValueError(f"center must have shape ({self.dim},), got {tuple(c.shape)}")
        self.register_buffer("center", c.clone())
        self.register_buffer("scale", torch.tensor(float(scale)))

    @classmethod
    def for_course(cls, course: TimeCourse, leave_out: float | None = None, **kwargs: Any) -> TrajectoryCNF:
        """A model for ``course``: its times, centred on its first snapshot, scaled by its spread.

        The centre :math:`m` is the mean of the first snapshot, so the standard-normal prior
        sits on the first population and the segment from the prior to it only reshapes the
        cloud instead of also moving it (fitting the first snapshot this way is much easier);
        the scale :math:`s` is the root mean square deviation of all cells from their pooled mean,
        per coordinate. A time point ``leave_out`` takes no part in either, so that nothing of a
        held-out snapshot reaches the model.

        Arguments:
            course: the snapshots.
            leave_out: a time point to ignore (``None``: use all).
            **kwargs: the other arguments of :class:`TrajectoryCNF` (``hidden``, solver settings...).
        """
        skip = None if leave_out is None else course.index(leave_out)
        kept = [x.double() for k, x in enumerate(course.snapshots) if k != skip]
        pooled = torch.cat(kept)
        center = kept[0].mean(0)
        scale = float((pooled - pooled.mean(0)).pow(2).sum(1).mean().div(course.dim).sqrt())
        return cls(course.times, course.dim, center=center.float(), scale=scale, **kwargs)

    def config(self) -> dict[str, Any]:
        """What rebuilds this model (with :meth:`from_config`), as plain values; the centre and
        scale are buffers of its state dict."""
        return dict(times=list(self.times), prior_gap=self.prior_gap, cnf=self.cnf.config())

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TrajectoryCNF:
        """A new model (fresh parameters, centre 0, scale 1 until a state dict is loaded)."""
        c = config["cnf"]
        return cls(config["times"], int(c["dim"]), hidden=tuple(c["hidden"]), activation=c["activation"],
                   prior_gap=float(config["prior_gap"]), **c["settings"])

    # -- coordinates ---------------------------------------------------------------------------
    def model_time(self, t: float) -> float:
        """Model time τ of data time ``t``."""
        return self.prior_gap + (float(t) - self.times[0]) / self.unit

    def standardize(self, x: Tensor) -> Tensor:
        """Representation → model coordinates, shape (n, D) → (n, D)."""
        x = check_points(x, "x", dim=self.dim).to(self.center)
        return (x - self.center) / self.scale

    def unstandardize(self, z: Tensor) -> Tensor:
        """Model → representation coordinates, shape (n, D) → (n, D)."""
        return z * self.scale + self.center

    # -- densities -----------------------------------------------------------------------------
    def snapshot_log_probs(
        self,
        snapshots: Sequence[Tensor | None],
        *,
        regularize: bool = False,
        generator: torch.Generator | None = None,
        **overrides: Any,
    ) -> SnapshotLogProbs:
        r"""Log-densities of standardized snapshots at their own model times, in one backward sweep.

        Arguments:
            snapshots: one entry per time point, points in *model* coordinates of shape
                (n_k, D), or ``None`` to leave that time point out.
            regularize: also integrate the kinetic energy (and the Frobenius norm).
            generator: for Hutchinson probes.
            **overrides: solver settings for these solves.

        Returns:
            A :class:`SnapshotLogProbs`.
        """
        if len(snapshots) != len(self.times):
            raise ValueError(f"expected {len(self.times)} snapshots (one per time point, None to skip), "
                             f"got {len(snapshots)}")
        taus = [self.model_time(t) for t in self.times]
        pos: Tensor | None = None
        delta = kin = None
        owner: list[tuple[int, int]] = []  # (snapshot, rows) in the order they were stacked
        results = []
        nfe = 0
        for k in reversed(range(len(taus))):
            x = snapshots[k]
            if x is not None:
                x = check_points(x, f"snapshot {k}", dim=self.dim).to(self.center)
                zeros = x.new_zeros(x.shape[0])
                if pos is None:
                    pos, delta, kin = x, zeros, zeros
                else:
                    pos, delta, kin = torch.cat([pos, x]), torch.cat([delta, zeros]), torch.cat([kin, zeros])
                owner.append((k, x.shape[0]))
            if pos is None:
                continue
            t_end = taus[k - 1] if k > 0 else 0.0
            res = self.cnf.flow(pos, taus[k], t_end, logdet=True, regularize=regularize, generator=generator,
                                **overrides)
            results.append(res)
            nfe += res.nfe_forward
            pos, delta = res.x, delta + res.delta_logp
            if regularize:
                kin = kin + res.kinetic
        if pos is None:
            raise ValueError("every snapshot is None: nothing to evaluate")
        logp = standard_normal_log_prob(pos) + delta
        log_probs: list[Tensor | None] = [None] * len(taus)
        kinetic: list[Tensor | None] = [None] * len(taus)
        start = 0
        for k, n in owner:
            log_probs[k] = logp[start:start + n]
            kinetic[k] = kin[start:start + n] if regularize else None
            start += n
        return SnapshotLogProbs(log_probs, kinetic, nfe, results)

    def log_prob(self, x: Tensor, t: float, **overrides: Any) -> Tensor:
        """Log-density of the model's marginal at data time ``t``, in representation units, shape (n,)."""
        z = self.standardize(x)
        return self.cnf.log_prob(z, self.model_time(t), **overrides) - self.dim * torch.log(self.scale)

    # -- maps ----------------------------------------------------------------------------------
    def push(self, x: Tensor, t_from: float, t_to: float, *, return_nfe: bool = False, **overrides: Any) -> Any:
        """Move cells observed at ``t_from`` along the flow to ``t_to`` (either direction).

        Arguments:
            x: the cells, shape (n, D), representation coordinates.
            t_from, t_to: data times.
            return_nfe: also return the number of function evaluations of the solve.
            **overrides: solver settings of this solve (e.g. ``method="dopri5", rtol=1e-5``).

        Returns:
            The moved cells, shape (n, D) (and the NFE with ``return_nfe``).
        """
        z = self.standardize(x)
        res = self.cnf.flow(z, self.model_time(t_from), self.model_time(t_to), logdet=False, **overrides)
        out = self.unstandardize(res.x)
        return (out, res.nfe_forward) if return_nfe else out

    def kinetic_energy(self, x: Tensor, t_from: float, t_to: float, **overrides: Any) -> Tensor:
        r"""Kinetic energy :math:`\int \lVert dx/d\tau \rVert^2 d\tau` of each cell's path from ``t_from`` to ``t_to``.

        In representation units per model time unit (one mean interval between time points),
        so models of the same course compare directly. Shape (n, D) → (n,).
        """
        z = self.standardize(x)
        res = self.cnf.flow(z, self.model_time(t_from), self.model_time(t_to), logdet=True, regularize=True,
                            **overrides)
        return res.kinetic * self.scale**2

    def trajectory(self, x: Tensor, t_from: float, times: Sequence[float], **overrides: Any) -> Tensor:
        """Positions of cells observed at ``t_from`` at each of ``times`` (monotone, starting at ``t_from``).

        Returns:
            shape (T, n, D).
        """
        times = [float(t) for t in times]
        if not times or abs(times[0] - float(t_from)) > 1e-12:
            raise ValueError(f"times must start at t_from={t_from}, got {times[:1]}")
        z = self.standardize(x)
        traj = self.cnf.trajectory(z, [self.model_time(t) for t in times], **overrides)
        return self.unstandardize(traj)

    def sample(self, n: int, t: float, *, generator: torch.Generator | None = None, **overrides: Any) -> Tensor:
        """``n`` samples of the model's marginal at data time ``t``, shape (n, D)."""
        return self.unstandardize(self.cnf.sample(n, self.model_time(t), generator=generator, **overrides))


# ==============================================================================================
# Training
# ==============================================================================================


class SnapshotLikelihood:
    r"""The multi-time objective of a :class:`TrajectoryCNF`, for :class:`~cnf_lib.train.Trainer`.

    The training data is one entry per time point: the snapshot's cells in the model's
    coordinates, shape (n_k, D), or ``None`` for a time point left out. A batch draws
    ``batch_size`` cells from every snapshot (all of them if it has fewer), and the loss is

    .. math:: -\frac{1}{K'}\sum_k \overline{\log p_{\tau_k}(x)}
              + \lambda\, \overline{\textstyle\int \lVert f \rVert^2 d\tau}

    (:math:`K'` snapshots given, :math:`\lambda` = ``config.kinetic``), from one backward sweep
    (:meth:`TrajectoryCNF.snapshot_log_probs`) with ``config.train_settings``.
    """

    records: tuple[str, ...] = ("kinetic",)
    solves_in_training: bool = True

    def check_data(self, model: nn.Module, data: Any, name: str) -> list[Tensor | None]:
        data = list(data)
        if len(data) != len(model.times):
            raise ValueError(f"{name} needs one entry per time point ({len(model.times)}, None to leave one "
                             f"out), got {len(data)}")
        if all(x is None for x in data):
            raise ValueError(f"{name} has no snapshot (every entry is None)")
        return [None if x is None else check_points(x, f"{name} snapshot {k}", dim=model.dim)
                for k, x in enumerate(data)]

    def batch(self, data: list[Tensor | None], batch_size: int, generator: torch.Generator) -> list[Tensor | None]:
        return [x if x is None or x.shape[0] <= batch_size
                else x[randperm(x.shape[0], generator, x.device)[:batch_size]] for x in data]

    def _nll(self, model: nn.Module, batch: list[Tensor | None], settings: dict[str, Any], regularize: bool,
             generator: torch.Generator) -> tuple[Tensor, SnapshotLogProbs]:
        out = model.snapshot_log_probs(batch, regularize=regularize, generator=generator, **settings)
        return -torch.stack([lp.mean() for lp in out.log_probs if lp is not None]).mean(), out

    def loss(self, model: nn.Module, batch: list[Tensor | None], config: TrainConfig,
             generator: torch.Generator) -> tuple[Tensor, dict[str, float], Any]:
        regularize = config.kinetic > 0
        nll, out = self._nll(model, batch, config.train_settings, regularize, generator)
        loss, kin = nll, torch.zeros(())
        if regularize:
            kin = torch.cat([k for k in out.kinetic if k is not None]).mean()
            loss = loss + config.kinetic * kin
        return loss, dict(nll=nll.item(), nfe_forward=out.nfe_forward, kinetic=kin.item()), out

    def evaluate(self, model: nn.Module, data: list[Tensor | None], config: TrainConfig,
                 generator: torch.Generator) -> tuple[float, int]:
        nll, out = self._nll(model, data, config.eval_settings, False, generator)
        return nll.item(), out.nfe_forward


class SnapshotMatching(MatchingObjective):
    r"""Flow matching through a time course: the multi-snapshot objective without an ODE solve.

    The prior :math:`\mathcal N(0, I)` at :math:`\tau = 0` and the snapshots given (a time point
    left out is skipped, so its neighbours are joined across the gap) are linked in time order by
    straight paths. Each iteration draws up to ``batch_size`` cells of every snapshot (as
    :class:`SnapshotLikelihood` does) and as many prior points as cells of the first; the points of
    each pair of consecutive ends :math:`(a, b)` are coupled — ``m`` of each, the smaller count — by
    the exact optimal-transport plan of the batch (``pairs="ot"``, :func:`~cnf_lib.matching.ot_pairing`)
    or as drawn (``"independent"``); each pair gets :math:`s \sim U[0, 1]` and the field is
    regressed on the pair's velocity:

    .. math:: \big\lVert f\big(\tau_a + s(\tau_b - \tau_a),\; (1 - s) x_a + s x_b + \sigma\varepsilon\big)
              - \frac{x_b - x_a}{\tau_b - \tau_a} \big\rVert^2,

    averaged over each interval's pairs, then over the intervals. At each snapshot's time the
    marginal of these piecewise-straight paths is that snapshot, so the field that minimizes the
    loss carries the prior through every snapshot given (Tong et al., 2024, multi-marginal
    OT-CFM); the model is the same :class:`TrajectoryCNF` as with :class:`SnapshotLikelihood`, and
    :meth:`evaluate` scores it by that likelihood. The trainer's ``kinetic`` and ``frobenius`` must be
    0 and its ``train_settings`` are unused (no solve in training).

    Arguments:
        pairs: ``"ot"`` (exact mini-batch OT between consecutive snapshots) or ``"independent"``.
        sigma: the standard deviation of the tube around each straight path (model units), >= 0.
    """

    def __init__(self, pairs: str = "ot", sigma: float = 0.0) -> None:
        super().__init__(pairs, sigma)
        self._likelihood = SnapshotLikelihood()

    def check_data(self, model: nn.Module, data: Any, name: str) -> list[Tensor | None]:
        return self._likelihood.check_data(model, data, name)

    def batch(self, data: list[Tensor | None], batch_size: int, generator: torch.Generator) -> list[Tensor | None]:
        return self._likelihood.batch(data, batch_size, generator)

    def regression_targets(self, model: nn.Module, batch: list[Tensor | None],
                           generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The regression problem of one batch (model coordinates and times).

        Draws, from ``generator`` and in this order: the prior points, then per interval the
        fractions ``s`` and (``sigma > 0``) the noise.

        Returns:
            ``(tau, x, u, weight)``, shapes (N,), (N, D), (N, D), (N,): each pair's time, point
            and target velocity, and its weight in the loss (the weights sum to 1).
        """
        param = next(model.parameters())
        ends = [(model.model_time(t), x.to(param)) for t, x in zip(model.times, batch) if x is not None]
        first = ends[0][1]
        ends.insert(0, (0.0, randn(tuple(first.shape), generator, param.dtype, param.device)))
        taus, xs, us, weights = [], [], [], []
        n_intervals = len(ends) - 1
        for (tau_a, xa), (tau_b, xb) in zip(ends[:-1], ends[1:]):
            m = min(xa.shape[0], xb.shape[0])
            xa, xb = xa[:m], xb[:m]
            if self.pairs == "ot":
                xa = xa[torch.argsort(ot_pairing(xa, xb))]  # row i of xa now goes with row i of xb
            s = uniform((m,), generator, param.dtype, param.device)
            noise = randn((m, model.dim), generator, param.dtype, param.device) if self.sigma > 0 else None
            x, u = conditional_path(xa, xb, s, self.sigma, noise)
            taus.append(tau_a + s * (tau_b - tau_a))
            xs.append(x)
            us.append(u / (tau_b - tau_a))
            weights.append(torch.full((m,), 1.0 / (n_intervals * m), dtype=param.dtype, device=param.device))
        return torch.cat(taus), torch.cat(xs), torch.cat(us), torch.cat(weights)

    def loss(self, model: nn.Module, batch: list[Tensor | None], config: TrainConfig,
             generator: torch.Generator) -> tuple[Tensor, dict[str, float], Any]:
        """The matching loss of a batch (one evaluation of the field, no solve) and its records.

        Raises:
            ValueError: if ``config.kinetic`` or ``config.frobenius`` is not 0.
        """
        if config.kinetic != 0 or config.frobenius != 0:
            raise ValueError(
                f"SnapshotMatching has no kinetic or Frobenius term (got kinetic={config.kinetic}, "
                f"frobenius={config.frobenius}); pass kinetic=0 and frobenius=0"
            )
        tau, x, u, weight = self.regression_targets(model, batch, generator)
        residual = (field_at_times(model.cnf.field, tau, x) - u).pow(2).sum(1)
        return (weight * residual).sum(), dict(nll=math.nan, nfe_forward=0), MatchingResult()

    def evaluate(self, model: nn.Module, data: list[Tensor | None], config: TrainConfig,
                 generator: torch.Generator) -> tuple[float, int]:
        """``(mean snapshot NLL, NFE)``: the likelihood of :class:`SnapshotLikelihood` (an ODE solve)."""
        return self._likelihood.evaluate(model, data, config, generator)


def fit_timecourse(
    model: TrajectoryCNF,
    course: TimeCourse,
    *,
    leave_out: float | None = None,
    iterations: int = 200,
    batch_size: int = 128,
    lr: float = 5e-3,
    lr_final: float = 5e-4,
    kinetic: float | None = None,
    grad_clip: float | None = 5.0,
    seed: int = 0,
    train_settings: dict[str, Any] | None = None,
    objective: SnapshotLikelihood | SnapshotMatching | None = None,
    checkpoint_path: Any = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    r"""Trains a :class:`TrajectoryCNF` on every snapshot of ``course`` but ``leave_out``.

    Training runs through the one :class:`~cnf_lib.train.Trainer` with the objective
    :class:`SnapshotLikelihood` (or :class:`SnapshotMatching`): an Adam step per iteration with the
    learning rate on a cosine from ``lr`` to ``lr_final``, and the trainer's guards (a non-finite loss or gradient or a
    solver failure stops with :class:`~cnf_lib.train.TrainingError` and the last good
    parameters), checkpoints and exact resume. The model trains where it is (its device).

    Arguments:
        model: the model (its times must be the course's).
        course: the snapshots.
        leave_out: an intermediate time point to hold out (``None``: train on all).
        iterations, batch_size, lr, lr_final, kinetic, grad_clip: the optimization (``kinetic=None``:
            0.1 for the likelihood, 0 for flow matching, which has no such term).
        seed: seeds the batches and the Hutchinson probes (a CPU generator; seed the model's
            initialization yourself, ``torch.manual_seed``, before building it).
        train_settings: solver settings of the training solves (``None``: the model's own; unused
            by flow matching).
        objective: :class:`SnapshotLikelihood` (``None``, the default) or :class:`SnapshotMatching`.
        checkpoint_path: where to write checkpoints (at the end and on an interrupt); a run
            with the same arguments resumes from it when the file exists.
        progress: a tqdm bar with the loss and the NFE.

    Returns:
        The history: per iteration ``iteration``, ``loss``, ``nll`` (mean over snapshots, nats,
        model coordinates), ``kinetic`` (mean ∫‖f‖²), ``nfe_forward``, ``nfe_backward``, ``time``
        and ``cpu_time`` (cumulative seconds), ``lr``; and ``leave_out`` and ``kinetic_weight`` (the
        kinetic weight used).

    Raises:
        ValueError: times or dimension not the course's, a negative ``kinetic``, or ``leave_out``
            not an intermediate time point.
        TrainingError: a non-finite loss or gradient or a solver failure (parameters of the last
            good step).
    """
    if len(model.times) != len(course.times) or not np.allclose(model.times, course.times):
        raise ValueError(f"the model's times {list(model.times)} are not the course's {course.times.tolist()}")
    if model.dim != course.dim:
        raise ValueError(f"the model has dimension {model.dim}, the course {course.dim}")
    objective = SnapshotLikelihood() if objective is None else objective
    if kinetic is None:
        kinetic = 0.1 if isinstance(objective, SnapshotLikelihood) else 0.0
    if kinetic < 0:
        raise ValueError(f"kinetic must be >= 0, got {kinetic}")
    skip = None if leave_out is None else course.index(leave_out)
    if skip is not None and skip in (0, len(course.times) - 1):
        raise ValueError(
            f"leave_out={leave_out!r} is the first or last time point; hold out an intermediate one "
            f"({course.times[1:-1].tolist()}): the model interpolates between snapshots"
        )
    config = TrainConfig(iterations=iterations, batch_size=batch_size, lr=lr, lr_final=lr_final,
                         kinetic=kinetic, seed=seed, grad_clip=grad_clip, eval_every=0,
                         train_settings=dict(train_settings or {}))
    data = [None if k == skip else model.standardize(x) for k, x in enumerate(course.snapshots)]
    trainer = Trainer(model, data, None, config, objective=objective,
                      checkpoint_path=checkpoint_path, progress=progress)
    if checkpoint_path is not None and trainer.checkpoint_path.exists():
        trainer.resume()
    history = trainer.fit()
    model.eval()
    return {**history, "leave_out": leave_out, "kinetic_weight": kinetic}


def fit_trajectories(
    adata: AnnData,
    time_key: str = "time",
    use_rep: str = "X_pca",
    n_comps: int | None = 5,
    *,
    leave_out: float | None = None,
    hidden: Sequence[int] = (64, 64),
    objective: str = "likelihood",
    kinetic: float | None = None,
    iterations: int = 200,
    batch_size: int = 128,
    lr: float = 5e-3,
    lr_final: float = 5e-4,
    seed: int = 0,
    train_settings: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    key_added: str | None = "trajectory_cnf",
    progress: bool = True,
    **settings: Any,
) -> TrajectoryCNF:
    """Fits a :class:`TrajectoryCNF` to the cells of an AnnData time course (scanpy style).

    Arguments:
        adata: the cells, with times in ``adata.obs[time_key]`` and coordinates in
            ``adata.obsm[use_rep]``.
        time_key, use_rep, n_comps: see :meth:`TimeCourse.from_anndata` (``n_comps`` as in
            :func:`cnf_lib.singlecell.fit_density`: the first 5 columns by default).
        leave_out: an intermediate time point to hold out of training.
        hidden: the widths of the field's hidden layers.
        objective: ``"likelihood"`` (:class:`SnapshotLikelihood`, ODE solves in training) or
            ``"matching"`` (:class:`SnapshotMatching` with OT pairs and ``sigma = 0``: no solve in
            training, each iteration much cheaper; the fitted model is the same kind).
        kinetic, iterations, batch_size, lr, lr_final, seed: the training (``kinetic=None``: 0.1
            for the likelihood, 0 for matching; ``seed`` also seeds the initialization).
        train_settings: solver settings of the training solves; default RK4 on a fixed grid of
            step 1 (one step per snapshot interval), a training device only.
        device: where the model trains and is returned (``"cuda"`` for a GPU).
        key_added: where the fitted model (weights and every setting), the fit's arguments and
            its loss history go in ``adata.uns`` (``None``: nowhere); :func:`get_trajectories`
            rebuilds the model, :func:`predict_cells` uses it, and both survive an ``.h5ad``
            round trip.
        progress: show a progress bar.
        **settings: how the fitted model evaluates (``log_prob``, ``push``, ``sample``...):
            :class:`~cnf_lib.cnf.SolverSettings` fields over :data:`TRAJECTORY_EVAL_SETTINGS`
            (adaptive dopri5 at 1e-5).

    Returns:
        The trained model, on ``device``; ``model.history`` is its training history.

    Raises:
        ValueError: a bad representation or time column (:meth:`TimeCourse.from_anndata`), an
            end point as ``leave_out``, or an unknown argument (named, with the valid ones).
    """
    from .cnf import SolverSettings

    known = set(SolverSettings.__dataclass_fields__)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(
            f"unknown argument(s) {unknown} of fit_trajectories; its training arguments are leave_out, hidden, "
            "objective, kinetic, iterations, batch_size, lr, lr_final, seed, train_settings, device, key_added, "
            "progress, "
            f"and the solver settings of the fitted model are {sorted(known)}"
        )
    objectives = {"likelihood": SnapshotLikelihood, "matching": SnapshotMatching}
    if objective not in objectives:
        raise ValueError(f"unknown objective {objective!r}; expected one of {sorted(objectives)}")
    course = TimeCourse.from_anndata(adata, time_key, use_rep, n_comps)
    torch.manual_seed(seed)
    model = TrajectoryCNF.for_course(course, leave_out=leave_out, hidden=hidden,
                                     **{**TRAJECTORY_EVAL_SETTINGS, **settings}).to(device)
    grid = dict(method="rk4", step_size=1.0) if train_settings is None else dict(train_settings)
    model.history = fit_timecourse(model, course, leave_out=leave_out, iterations=iterations,
                                   batch_size=batch_size, lr=lr, lr_final=lr_final, kinetic=kinetic,
                                   seed=seed, train_settings=grid, objective=objectives[objective](),
                                   progress=progress)
    kinetic = model.history["kinetic_weight"]
    if key_added is not None:
        from .saving import model_to_uns, plain_config

        adata.uns[key_added] = dict(
            params=plain_config(dict(time_key=time_key, use_rep=use_rep, n_comps=course.dim, hidden=list(hidden),
                               objective=objective, kinetic=kinetic, iterations=iterations,
                               batch_size=batch_size, lr=lr, lr_final=lr_final, seed=seed, train_settings=grid,
                               leave_out=np.nan if leave_out is None else float(leave_out))),
            model=model_to_uns(model),
            times=np.asarray(model.times),
            model_times=np.asarray([model.model_time(t) for t in model.times]),
            loss=np.asarray(model.history["loss"]),
            nfe_forward=np.asarray(model.history["nfe_forward"]),
        )
    return model


def get_trajectories(adata: AnnData, key: str = "trajectory_cnf", device: str | torch.device = "cpu") -> TrajectoryCNF:
    """Rebuild the :class:`TrajectoryCNF` that :func:`fit_trajectories` stored in ``adata.uns[key]``.

    Raises:
        ValueError: no such key (the message lists the ``uns`` keys), or no model stored there.
    """
    from .saving import model_from_uns

    if key not in adata.uns:
        raise ValueError(f"adata.uns has no {key!r}: fit first (fit_trajectories(adata, key_added={key!r})); "
                         f"adata.uns has: {list(adata.uns.keys())}")
    if "model" not in adata.uns[key]:
        raise ValueError(f"adata.uns[{key!r}] holds no model (it was written by an older cnf_lib): fit again")
    return model_from_uns(adata.uns[key]["model"], device=device)


def predict_cells(
    adata: AnnData,
    t_from: float,
    t_to: float,
    key: str = "trajectory_cnf",
    **overrides: Any,
) -> AnnData:
    """Carry the cells observed at ``t_from`` along the fitted flow to ``t_to``, as a new AnnData.

    The representation and time column are those :func:`fit_trajectories` recorded in
    ``adata.uns[key]``; the predicted cells are in the same representation (``obsm[use_rep]``,
    its first ``n_comps`` columns), with ``obs["source"]`` the cell each one came from and
    ``obs[time_key] = t_to``. The solve is the model's own (adaptive unless ``overrides`` say
    otherwise).

    Arguments:
        adata: the time course the model was fitted to (or new cells in the same representation).
        t_from: a time point of ``adata.obs[time_key]``.
        t_to: any time within the course's first and last time points (either direction).
        key: where the model was stored.
        **overrides: solver settings for this solve.

    Returns:
        An AnnData with one row per cell of ``t_from`` and no variables.

    Raises:
        ValueError: ``t_to`` outside the course (the model was never fitted there), or ``t_from``
            with no cells.
    """
    import anndata as ad
    import pandas as pd

    model = get_trajectories(adata, key)
    params = adata.uns[key]["params"]
    time_key, use_rep, n_comps = str(params["time_key"]), str(params["use_rep"]), int(params["n_comps"])
    lo, hi = model.times[0], model.times[-1]
    if not lo <= float(t_to) <= hi:
        raise ValueError(f"t_to={t_to} is outside the course [{lo}, {hi}]: the model was not fitted there")
    times = _numeric_times(adata.obs[time_key], time_key)
    rows = np.flatnonzero(np.isclose(times, float(t_from)))
    if len(rows) == 0:
        raise ValueError(f"no cells at t_from={t_from} in adata.obs[{time_key!r}]; times: {np.unique(times).tolist()}")
    x = get_representation(adata[rows], use_rep, n_comps).astype(np.float32)
    with torch.no_grad():
        moved = model.push(torch.from_numpy(x), float(t_from), float(t_to), **overrides)
    obs = pd.DataFrame({"source": np.asarray(adata.obs_names[rows]), time_key: float(t_to)},
                       index=[f"{name}->{float(t_to):g}" for name in adata.obs_names[rows]])
    out = ad.AnnData(X=np.zeros((len(rows), 0), dtype=np.float32), obs=obs)
    out.obsm[use_rep] = moved.detach().cpu().numpy()
    return out
