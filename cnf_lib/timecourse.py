r"""Trajectories from snapshots: a CNF through a single-cell time course (TrajectoryNet-style).

Single-cell sequencing destroys the cells it measures, so a time course is a series of
*unpaired* snapshots :math:`X_0, \dots, X_{K-1}` taken at times :math:`t_0 < \dots < t_{K-1}`.
This module fits **one** time-dependent vector field through all of them and reads cell paths
off its flow (Tong et al., 2020):

* :func:`simulate_differentiation` — a branching differentiation whose true cell paths are
  known: a stochastic process in a two-dimensional latent landscape (a pitchfork), mapped to gene
  counts with Poisson sampling noise, returned as an :class:`~anndata.AnnData` with a time column;
  :func:`preprocess` processes it the way a single-cell user processes real data (scanpy's
  ``normalize_total``, ``log1p``, ``pca``); :func:`true_paths` maps the known latent paths into
  the same representation and :func:`project_counts` places new cells (a replicate) in it.
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
* :func:`fit_timecourse` — the seeded training loop (a time point can be left out);
  :func:`fit_trajectories` — the scanpy-style entry point.
* :func:`holdout_baselines`, :func:`ot_paths`, :func:`path_error` — what the CNF is measured
  against: the previous, next and a random snapshot, the optimal-transport interpolation between
  the two neighbours, and the chained OT matching of consecutive snapshots.

References:
    Tong, Huang, Wolf, van Dijk and Krishnaswamy (2020). TrajectoryNet: a dynamic optimal
    transport network for modeling cellular dynamics. ICML. https://arxiv.org/abs/2002.04461
    Benamou and Brenier (2000). A computational fluid mechanics solution to the
    Monge-Kantorovich mass transfer problem. Numerische Mathematik 84.
    Finlay et al. (2020). How to train your neural ODE. https://arxiv.org/abs/2002.02798
    Schiebinger et al. (2019). Optimal-transport analysis of single-cell gene expression
    identifies developmental trajectories in reprogramming. Cell 176.
    Wolf, Angerer and Theis (2018). SCANPY. Genome Biology 19.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import ot
import torch
from scipy.spatial.distance import cdist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .cnf import CNF, SolverError, standard_normal_log_prob
from .checks import check_points
from .metrics import ot_interpolate
from .singlecell import get_representation
from .train import TrainConfig, TrainingError

if TYPE_CHECKING:  # for type hints only (the functions that build AnnData objects import it)
    from anndata import AnnData

__all__ = [
    "SIMULATION_KEY",
    "PREPROCESS_KEY",
    "simulate_differentiation",
    "preprocess",
    "true_paths",
    "project_counts",
    "TimeCourse",
    "SnapshotLogProbs",
    "TrajectoryCNF",
    "fit_timecourse",
    "fit_trajectories",
    "holdout_baselines",
    "ot_paths",
    "path_error",
]

#: ``adata.uns`` key of :func:`simulate_differentiation`'s ground truth (latent paths, gene map).
SIMULATION_KEY = "simulation"
#: ``adata.uns`` key where :func:`preprocess` records what it did (target sum, PCA mean).
PREPROCESS_KEY = "timecourse_preprocess"

_PROGRAMS = ("early", "late", "branch A", "branch B", "primed A", "primed B", "housekeeping")


# ==============================================================================================
# Simulation: a branching differentiation with known paths
# ==============================================================================================


def _gene_programs(n_genes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random gene programs: each gene switches on along one direction of the latent space.

    early: on while u is small; late: on once u is large; branch A / B: on far out on one
    branch (v > c or v < -c, sharp); primed A / B: graded in v from the start (a fate bias that
    is visible before the branch point); housekeeping: constant.
    """
    # one row per program: early, late, branch A, branch B, primed A, primed B, housekeeping
    directions = np.array([[-1, 0], [1, 0], [0.35, 1], [0.35, -1], [0, 1], [0, -1], [0, 0]], dtype=float)
    lo = np.array([-2.5, 1.0, 0.3, 0.3, 0.0, 0.0, 0.0])
    hi = np.array([-0.5, 3.5, 1.2, 1.2, 0.0, 0.0, 0.0])
    steep_lo = np.array([1.0, 1.0, 1.5, 1.5, 1.0, 1.0, 0.0])
    steep_hi = np.array([2.0, 2.0, 2.5, 2.5, 1.5, 1.5, 0.0])
    program = np.arange(n_genes) % len(_PROGRAMS)
    active = program < len(_PROGRAMS) - 1
    direction = directions[program] + rng.normal(0.0, 0.1, size=(n_genes, 2)) * active[:, None]
    threshold = rng.uniform(lo[program], hi[program])
    steepness = rng.uniform(steep_lo[program], steep_hi[program])
    amplitude = rng.uniform(1.5, 3.0, size=n_genes) * active
    baseline = rng.normal(0.0, 0.5, size=n_genes)
    return dict(program=program, direction=direction, threshold=threshold, amplitude=amplitude,
                baseline=baseline, steepness=steepness)


def _expression_fractions(latent: np.ndarray, genes: dict[str, Any]) -> np.ndarray:
    """Expected fraction of a cell's counts in each gene, shape (..., n_genes), rows sum to 1.

    Gene ``g`` has log-rate ``b_g + a_g * sigmoid(s_g * (w_g · z - c_g))`` at latent state ``z``.
    """
    z = np.asarray(latent, dtype=np.float64)
    w = np.asarray(genes["direction"], dtype=np.float64)
    act = np.asarray(genes["steepness"]) * (z @ w.T - np.asarray(genes["threshold"]))
    log_rate = np.asarray(genes["baseline"]) + np.asarray(genes["amplitude"]) / (1.0 + np.exp(-act))
    log_rate -= log_rate.max(axis=-1, keepdims=True)
    rate = np.exp(log_rate)
    return rate / rate.sum(axis=-1, keepdims=True)


def simulate_differentiation(
    n_cells: int = 200,
    times: Sequence[float] = (0.0, 1.0, 2.0, 3.0, 4.0),
    n_genes: int = 40,
    *,
    library_size: float = 5000.0,
    noise: float = 0.05,
    start_spread: tuple[float, float] = (0.15, 0.4),
    speed_spread: float = 0.15,
    branch_point: float = 1.0,
    record_dt: float = 0.05,
    seed: int = 0,
    gene_seed: int = 0,
) -> AnnData:
    r"""Simulates a branching differentiation observed as destructive snapshots.

    Each cell follows a latent state :math:`z = (u, v)`: :math:`u` is maturation, :math:`v` the
    fate. Euler–Maruyama steps of :math:`dt = 0.01` integrate

    .. math:: du = r_i\, dt + \sigma\, dW_1, \qquad
              dv = \big((u - u_c)\, v - v^3\big)\, dt + \sigma\, dW_2 ,

    a pitchfork: before the branch point :math:`u_c` the fate :math:`v` is pulled to 0, after it
    to :math:`\pm\sqrt{u - u_c}` (two lineages, "A" for :math:`v > 0`, "B" for :math:`v < 0`).
    Cell :math:`i` matures at its own speed :math:`r_i`. Cells start at
    :math:`u \sim \mathcal N(0, s_u^2)`, :math:`v \sim \mathcal N(0, s_v^2)` (``start_spread``):
    a fate bias present from the start, which the "primed" genes show. Gene :math:`g` is expressed
    at a rate proportional to :math:`\exp(b_g + a_g\, \mathrm{sigmoid}(s_g (w_g \cdot z - c_g)))`
    (programs, in turn: early, late, branch A, branch B, primed A, primed B, housekeeping) and a
    cell's counts are Poisson with a log-normal library size. ``n_cells`` cells are simulated *per time point*, each from its own
    path, and observed (destroyed) at that time only; the whole path stays known.

    Arguments:
        n_cells: cells per time point.
        times: the snapshot times, increasing, :math:`\geq 0`.
        n_genes: number of genes (at least 7, one per program).
        library_size: median total counts of a cell.
        noise: :math:`\sigma`, the diffusion of the latent process.
        start_spread: :math:`(s_u, s_v)`, the spread of the starting states.
        speed_spread: :math:`s_r`, the spread of the speeds :math:`r_i \sim \mathcal N(1, s_r^2)`:
            the snapshots spread out along the lineages as time goes on (asynchronous
            differentiation).
        branch_point: :math:`u_c`.
        record_dt: spacing of the recorded path grid (a divisor of the simulation step grid).
        seed: seeds the cells: their paths, library sizes and counts (NumPy generator).
        gene_seed: seeds the gene map; two simulations with the same ``gene_seed`` and different
            ``seed`` are two replicate experiments of the same biology.

    Returns:
        An AnnData with counts in ``X`` (float32) and ``layers["counts"]``, ``obs["time"]``
        (float), ``obs["lineage"]`` ("A"/"B" by the sign of :math:`v` at the last time),
        ``obsm["latent"]`` (:math:`z` at the cell's own time, shape (n, 2)), ``var["program"]``,
        and ``uns["simulation"]`` with ``path_times`` (G,), ``paths`` (n, G, 2), the gene map and
        the settings. :func:`true_paths` maps ``paths`` into a processed representation.
    """
    import anndata as ad
    import pandas as pd

    times_arr = np.asarray(times, dtype=np.float64).reshape(-1)
    if times_arr.size < 2 or not np.all(np.diff(times_arr) > 0) or times_arr[0] < 0:
        raise ValueError(f"times must be at least 2 increasing values >= 0, got {list(times_arr)}")
    if int(n_cells) != n_cells or n_cells < 2:
        raise ValueError(f"n_cells must be an integer >= 2, got {n_cells!r}")
    if int(n_genes) != n_genes or n_genes < len(_PROGRAMS):
        raise ValueError(f"n_genes must be an integer >= {len(_PROGRAMS)} (one per program), got {n_genes!r}")
    dt = 0.01
    every = round(record_dt / dt)
    if every < 1 or abs(every * dt - record_dt) > 1e-9:
        raise ValueError(f"record_dt must be a positive multiple of {dt}, got {record_dt}")
    if np.any(np.abs(times_arr / record_dt - np.round(times_arr / record_dt)) > 1e-6):
        raise ValueError(f"the times {list(times_arr)} must lie on the record grid (multiples of {record_dt})")

    rng = np.random.default_rng(seed)
    n_cells, n_genes = int(n_cells), int(n_genes)
    n_total = n_cells * len(times_arr)
    n_steps = round(times_arr[-1] / dt)
    grid = np.arange(0, n_steps + 1, every) * dt

    z = rng.normal(0.0, 1.0, size=(n_total, 2)) * np.asarray(start_spread, dtype=np.float64)
    speed = 1.0 + speed_spread * rng.normal(size=n_total)
    paths = np.empty((n_total, len(grid), 2))
    paths[:, 0] = z
    sq = noise * math.sqrt(dt)
    for step in range(1, n_steps + 1):
        u, v = z[:, 0], z[:, 1]
        drift = np.stack([speed, (u - branch_point) * v - v**3], axis=1)
        z = z + drift * dt + sq * rng.normal(size=z.shape)
        if step % every == 0:
            paths[:, step // every] = z

    time_of_cell = np.repeat(times_arr, n_cells)
    grid_index = np.round(time_of_cell / record_dt).astype(int)
    latent = paths[np.arange(n_total), grid_index]

    genes = _gene_programs(n_genes, np.random.default_rng(gene_seed))
    fractions = _expression_fractions(latent, genes)
    library = library_size * np.exp(rng.normal(0.0, 0.25, size=n_total))
    counts = rng.poisson(library[:, None] * fractions).astype(np.float32)

    obs = pd.DataFrame(
        {
            "time": time_of_cell,
            "lineage": pd.Categorical(np.where(paths[:, -1, 1] > 0, "A", "B")),
        },
        index=[f"cell{i}" for i in range(n_total)],
    )
    var = pd.DataFrame({"program": pd.Categorical([_PROGRAMS[p] for p in genes["program"]])},
                       index=[f"gene{g}" for g in range(n_genes)])
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.layers["counts"] = counts.copy()
    adata.obsm["latent"] = latent.astype(np.float32)
    adata.uns[SIMULATION_KEY] = dict(
        path_times=grid,
        paths=paths.astype(np.float32),
        genes={k: np.asarray(v) for k, v in genes.items()},
        settings=dict(n_cells=n_cells, times=times_arr, n_genes=n_genes, library_size=library_size,
                      noise=noise, start_spread=np.asarray(start_spread), speed_spread=speed_spread,
                      branch_point=branch_point, record_dt=record_dt, seed=seed,
                      gene_seed=gene_seed),
    )
    return adata


def preprocess(adata: AnnData, n_comps: int = 10, target_sum: float = 1e4) -> AnnData:
    """Normalize, log-transform and reduce with PCA, as for real data (scanpy), in place.

    ``sc.pp.normalize_total(target_sum)``, ``sc.pp.log1p``, ``sc.pp.pca(n_comps)``; the raw
    counts are kept in ``layers["counts"]``, and what a projection of new profiles needs (the
    target sum and the PCA mean) is recorded in ``uns["timecourse_preprocess"]``.

    Arguments:
        adata: cells × genes counts.
        n_comps: number of principal components (``obsm["X_pca"]``).
        target_sum: counts per cell after normalization.

    Returns:
        ``adata`` (modified in place).
    """
    import scanpy as sc

    if "counts" not in adata.layers:
        adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
    n_comps = int(min(n_comps, adata.n_vars - 1, adata.n_obs - 1))
    sc.pp.pca(adata, n_comps=n_comps, random_state=0)
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    adata.uns[PREPROCESS_KEY] = dict(target_sum=float(target_sum), pca_mean=x.mean(axis=0).astype(np.float64))
    return adata


def true_paths(
    adata: AnnData,
    times: Sequence[float] | None = None,
    n_comps: int | None = None,
    cells: Any = None,
) -> Tensor:
    """The known paths of simulated cells, in the PCA representation of :func:`preprocess`.

    A latent state ``z`` is mapped to its *expected* profile (the gene fractions, normalized to
    the target sum, ``log1p``), centred with the PCA mean and projected on the loadings
    ``varm["PCs"]``: what the cell would look like without sampling noise.

    Arguments:
        adata: from :func:`simulate_differentiation` then :func:`preprocess`.
        times: times on the simulation's record grid (default: the whole grid).
        n_comps: number of leading PCs (default: all).
        cells: which cells (a boolean mask or integer indices over ``adata.obs``; default all).

    Returns:
        Positions, shape (T, n, n_comps), float32.
    """
    if SIMULATION_KEY not in adata.uns:
        raise ValueError("adata has no uns['simulation']: true paths exist only for simulate_differentiation() data")
    if PREPROCESS_KEY not in adata.uns or "PCs" not in adata.varm:
        raise ValueError("adata has not been processed by cnf_lib.timecourse.preprocess() (no PCA to project on)")
    sim, pre = adata.uns[SIMULATION_KEY], adata.uns[PREPROCESS_KEY]
    grid = np.asarray(sim["path_times"], dtype=np.float64)
    if times is None:
        idx = np.arange(len(grid))
    else:
        t = np.asarray(times, dtype=np.float64).reshape(-1)
        idx = np.abs(grid[None, :] - t[:, None]).argmin(axis=1)
        off = np.abs(grid[idx] - t)
        if (off > 1e-6).any():
            raise ValueError(f"times {t[off > 1e-6].tolist()} are not on the simulation's record grid")
    paths = np.asarray(sim["paths"])
    if cells is not None:
        paths = paths[np.asarray(cells)]
    z = np.transpose(paths[:, idx], (1, 0, 2))  # (T, n, 2)
    expected = float(pre["target_sum"]) * _expression_fractions(z, sim["genes"])
    return torch.as_tensor(_project(adata, np.log1p(expected), n_comps), dtype=torch.float32)


def _project(reference: AnnData, log_expression: np.ndarray, n_comps: int | None) -> np.ndarray:
    """Centre log-normalized profiles (..., n_genes) with the reference's PCA mean and project them."""
    pcs = np.asarray(reference.varm["PCs"], dtype=np.float64)
    n_comps = pcs.shape[1] if n_comps is None else n_comps
    if int(n_comps) != n_comps or not 1 <= n_comps <= pcs.shape[1]:
        raise ValueError(f"n_comps must be an integer between 1 and {pcs.shape[1]}, got {n_comps!r}")
    mean = np.asarray(reference.uns[PREPROCESS_KEY]["pca_mean"], dtype=np.float64)
    return (log_expression - mean) @ pcs[:, : int(n_comps)]


def project_counts(adata: AnnData, reference: AnnData, n_comps: int | None = None) -> np.ndarray:
    """New cells' counts in the PCA coordinates of a reference processed by :func:`preprocess`.

    The same normalization (the reference's target sum), ``log1p``, centring (the reference's
    mean) and loadings (``reference.varm["PCs"]``): how a second experiment, or a replicate, is
    placed in the coordinates a model was trained in.

    Arguments:
        adata: the new cells, raw counts in ``layers["counts"]`` (or ``X``), the reference's genes.
        reference: the processed AnnData.
        n_comps: number of leading PCs (default: all).

    Returns:
        float32 array, shape (adata.n_obs, n_comps).
    """
    if PREPROCESS_KEY not in reference.uns or "PCs" not in reference.varm:
        raise ValueError("reference has not been processed by cnf_lib.timecourse.preprocess() (no PCA to project on)")
    if list(adata.var_names) != list(reference.var_names):
        raise ValueError("adata and reference must have the same genes in the same order")
    counts = adata.layers["counts"] if "counts" in adata.layers else adata.X
    counts = counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    if (totals <= 0).any():
        raise ValueError(f"{int((totals <= 0).sum())} cell(s) have no counts")
    expr = np.log1p(float(reference.uns[PREPROCESS_KEY]["target_sum"]) * counts / totals)
    return _project(reference, expr, n_comps).astype(np.float32)


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
                f"numbers, e.g. adata.obs['t'] = adata.obs[{time_key!r}].str.extract(r'(\\d+\\.?\\d*)')[0].astype(float)"
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
            raise ValueError(f"expected {len(self.times)} snapshots (one per time point, None to skip), got {len(snapshots)}")
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
            res = self.cnf.flow(pos, taus[k], t_end, logdet=True, regularize=regularize, generator=generator, **overrides)
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


def fit_timecourse(
    model: TrajectoryCNF,
    course: TimeCourse,
    *,
    leave_out: float | None = None,
    iterations: int = 200,
    batch_size: int = 128,
    lr: float = 5e-3,
    lr_final: float = 5e-4,
    kinetic: float = 0.1,
    grad_clip: float | None = 5.0,
    seed: int = 0,
    train_settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    r"""Trains a :class:`TrajectoryCNF` on every snapshot of ``course`` but ``leave_out``.

    Each iteration draws ``batch_size`` cells from every training snapshot (all of them if it
    has fewer), evaluates their log-densities at their own times in one backward sweep, and
    takes an Adam step on

    .. math:: -\frac{1}{K'}\sum_k \overline{\log p_{\tau_k}(x)} + \lambda\, \overline{\textstyle\int \lVert f \rVert^2 d\tau}

    (:math:`K'` training snapshots; ``kinetic`` is :math:`\lambda`) with the learning rate on a
    cosine from ``lr`` to ``lr_final`` (:meth:`cnf_lib.train.TrainConfig.lr_at`).

    Arguments:
        model: the model (its times must be the course's).
        course: the snapshots.
        leave_out: a time point to hold out (``None``: train on all).
        iterations, batch_size, lr, lr_final, kinetic, grad_clip: the optimization.
        seed: seeds the batches and the Hutchinson probes (seed the model's initialization
            yourself, ``torch.manual_seed``, before building it).
        train_settings: solver settings of the training solves.
        progress: a tqdm bar with the loss and the NFE.

    Returns:
        The history: per iteration ``iteration``, ``loss``, ``nll`` (mean over snapshots, nats,
        model coordinates), ``kinetic`` (mean ∫‖f‖²), ``nfe_forward``, ``nfe_backward``, ``time``
        (cumulative seconds), ``lr``; and ``leave_out``.

    Raises:
        TrainingError: a non-finite loss or a solver failure (parameters of the last good step).
    """
    if len(model.times) != len(course.times) or not np.allclose(model.times, course.times):
        raise ValueError(f"the model's times {list(model.times)} are not the course's {course.times.tolist()}")
    if model.dim != course.dim:
        raise ValueError(f"the model has dimension {model.dim}, the course {course.dim}")
    if kinetic < 0:
        raise ValueError(f"kinetic must be >= 0, got {kinetic}")
    cfg = TrainConfig(iterations=iterations, batch_size=batch_size, lr=lr, lr_final=lr_final,
                      kinetic=kinetic, seed=seed, grad_clip=grad_clip, train_settings=dict(train_settings or {}))
    skip = None if leave_out is None else course.index(leave_out)
    if skip is not None and len(course.times) < 3:
        raise ValueError("leaving a time point out of a course of 2 leaves a single snapshot")
    data = [None if k == skip else model.standardize(x) for k, x in enumerate(course.snapshots)]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    regularize = kinetic > 0
    history: dict[str, Any] = {k: [] for k in ("iteration", "loss", "nll", "kinetic", "nfe_forward",
                                                "nfe_backward", "time", "lr")}
    history["leave_out"] = leave_out
    elapsed = 0.0
    bar = tqdm(range(cfg.iterations), disable=not progress, desc="training", mininterval=1.0)
    for it in bar:
        start = time.perf_counter()
        rate = cfg.lr_at(it)
        for group in optimizer.param_groups:
            group["lr"] = rate
        batch = []
        for x in data:
            if x is None or x.shape[0] <= cfg.batch_size:
                batch.append(x)
            else:
                batch.append(x[torch.randperm(x.shape[0], generator=generator)[: cfg.batch_size]])
        model.train()
        try:
            out = model.snapshot_log_probs(batch, regularize=regularize, generator=generator, **cfg.train_settings)
        except SolverError as err:
            raise TrainingError(f"iteration {it}: {err}") from err
        nll = -torch.stack([lp.mean() for lp in out.log_probs if lp is not None]).mean()
        loss = nll
        kin = torch.zeros(())
        if regularize:
            kin = torch.cat([k for k in out.kinetic if k is not None]).mean()
            loss = loss + kinetic * kin
        if not torch.isfinite(loss):
            raise TrainingError(
                f"iteration {it}: the loss is {loss.item()} (not finite). Try a smaller lr, a larger "
                "kinetic weight, or check the representation for huge values."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        elapsed += time.perf_counter() - start
        for key, value in (("iteration", it + 1), ("loss", loss.item()), ("nll", nll.item()),
                           ("kinetic", kin.item()), ("nfe_forward", out.nfe_forward),
                           ("nfe_backward", out.nfe_backward), ("time", elapsed), ("lr", rate)):
            history[key].append(value)
        bar.set_postfix(loss=f"{loss.item():.3f}", nfe=out.nfe_forward, refresh=False)
    bar.close()
    model.eval()
    return history


def fit_trajectories(
    adata: AnnData,
    time_key: str = "time",
    use_rep: str = "X_pca",
    n_comps: int | None = None,
    *,
    leave_out: float | None = None,
    hidden: Sequence[int] = (64, 64),
    kinetic: float = 0.1,
    iterations: int = 200,
    batch_size: int = 128,
    lr: float = 5e-3,
    lr_final: float = 5e-4,
    seed: int = 0,
    key_added: str | None = "trajectory_cnf",
    progress: bool = True,
    **settings: Any,
) -> TrajectoryCNF:
    """Fits a :class:`TrajectoryCNF` to the cells of an AnnData time course (scanpy style).

    Arguments:
        adata: the cells, with times in ``adata.obs[time_key]`` and coordinates in
            ``adata.obsm[use_rep]``.
        time_key, use_rep, n_comps: see :meth:`TimeCourse.from_anndata`.
        leave_out: a time point to hold out of training.
        hidden, kinetic, iterations, batch_size, lr, lr_final, seed: the model and its training
            (``seed`` also seeds the initialization).
        key_added: where a summary (times, settings, loss history) goes in ``adata.uns``
            (``None``: nowhere).
        progress: show a progress bar.
        **settings: solver settings of the CNF (``method``, ``rtol``, ``step_size``, ...).

    Returns:
        The trained model; ``model.history`` is its training history.
    """
    course = TimeCourse.from_anndata(adata, time_key, use_rep, n_comps)
    torch.manual_seed(seed)
    model = TrajectoryCNF.for_course(course, leave_out=leave_out, hidden=hidden, **settings)
    model.history = fit_timecourse(model, course, leave_out=leave_out, iterations=iterations,
                                   batch_size=batch_size, lr=lr, lr_final=lr_final, kinetic=kinetic,
                                   seed=seed, progress=progress)
    if key_added is not None:
        adata.uns[key_added] = dict(
            params=dict(time_key=time_key, use_rep=use_rep, n_comps=course.dim, hidden=list(hidden),
                        kinetic=kinetic, iterations=iterations, batch_size=batch_size, seed=seed,
                        leave_out=np.nan if leave_out is None else float(leave_out)),
            times=np.asarray(model.times),
            model_times=np.asarray([model.model_time(t) for t in model.times]),
            loss=np.asarray(model.history["loss"]),
            nfe_forward=np.asarray(model.history["nfe_forward"]),
        )
    return model


# ==============================================================================================
# Baselines and path errors
# ==============================================================================================


def holdout_baselines(
    course: TimeCourse, leave_out: float, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """The four baseline guesses for a held-out intermediate time point.

    * ``"previous"``: the snapshot before it; ``"next"``: the one after it;
    * ``"random"``: another snapshot, drawn uniformly with ``generator``;
    * ``"OT interpolation"``: McCann's interpolation between the two neighbours along their
      exact W2 plan (:func:`cnf_lib.metrics.ot_interpolate`), at the held-out time's fraction
      of the interval. Equal-sized neighbours give one point per pair; otherwise ``n`` pairs
      (the held-out size) are drawn from the plan with ``generator``.

    Arguments:
        course: the time course.
        leave_out: the held-out time point (not the first or last).
        generator: for the random snapshot (and the plan's draws); a fixed default if ``None``.

    Returns:
        ``{name: points (m, D)}``.
    """
    k = course.index(leave_out)
    if k == 0 or k == len(course.times) - 1:
        raise ValueError(
            f"time point {leave_out!r} is the first or last one; the baselines need a neighbour on both sides"
        )
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    prev, nxt = course.snapshots[k - 1], course.snapshots[k + 1]
    others = [j for j in range(len(course.times)) if j != k]
    pick = others[int(torch.randint(len(others), (1,), generator=generator))]
    s = (course.times[k] - course.times[k - 1]) / (course.times[k + 1] - course.times[k - 1])
    if prev.shape[0] == nxt.shape[0]:
        ot = ot_interpolate(prev, nxt, s)
    else:
        ot = ot_interpolate(prev, nxt, s, generator=generator, n_samples=course.snapshots[k].shape[0])
    return {"previous": prev.clone(), "next": nxt.clone(), "random": course.snapshots[pick].clone(),
            "OT interpolation": ot.to(prev.dtype)}


def ot_paths(snapshots: Sequence[Tensor], times: Sequence[float], eval_times: Sequence[float]) -> Tensor:
    r"""Paths of the first snapshot's cells by chaining exact OT matchings of consecutive snapshots.

    The W2 plan :math:`\pi_k` between snapshots :math:`k` and :math:`k+1` (uniform weights) is
    turned into a transition matrix :math:`T_k = n_k \pi_k` (rows sum to one); a cell of the
    first snapshot sits at :math:`w_k X_k` at time :math:`t_k`, with :math:`w_0` its indicator and
    :math:`w_{k+1} = w_k T_k` (the barycentric projection; a permutation when the snapshots have
    equal sizes, so the path visits one cell per snapshot), and moves on straight lines between
    snapshot times: McCann's interpolation, chained.

    Arguments:
        snapshots: K point clouds, shapes (n_k, D).
        times: their K increasing times.
        eval_times: where to read the paths, within ``[times[0], times[-1]]``.

    Returns:
        Positions, shape (len(eval_times), n_0, D), float32.
    """
    if len(snapshots) != len(times) or len(times) < 2:
        raise ValueError(f"need at least 2 snapshots with one time each, got {len(snapshots)} and {len(times)}")
    t = np.asarray(times, dtype=np.float64)
    if not np.all(np.diff(t) > 0):
        raise ValueError(f"times must be strictly increasing, got {t.tolist()}")
    xs = [check_points(s, f"snapshot {k}", dtype=torch.float64).detach().cpu().numpy() for k, s in enumerate(snapshots)]
    te = np.asarray(eval_times, dtype=np.float64).reshape(-1)
    if te.size == 0 or te.min() < t[0] - 1e-9 or te.max() > t[-1] + 1e-9:
        raise ValueError(f"eval_times must lie in [{t[0]}, {t[-1]}], got {te.tolist()}")
    w = np.eye(len(xs[0]))
    at_snapshots = [xs[0]]
    for k in range(len(xs) - 1):
        n, m = len(xs[k]), len(xs[k + 1])
        plan = ot.emd(np.full(n, 1.0 / n), np.full(m, 1.0 / m), cdist(xs[k], xs[k + 1], "sqeuclidean"),
                      numItermax=10_000_000)
        w = w @ (plan * n)
        at_snapshots.append(w @ xs[k + 1])
    pos = np.stack(at_snapshots)  # (K, n0, D)
    seg = np.clip(np.searchsorted(t, te, side="right") - 1, 0, len(t) - 2)
    frac = ((te - t[seg]) / (t[seg + 1] - t[seg]))[:, None, None]
    out = (1 - frac) * pos[seg] + frac * pos[seg + 1]
    return torch.as_tensor(out, dtype=torch.float32)


def path_error(predicted: Tensor, true: Tensor) -> float:
    """Mean Euclidean distance between predicted and true paths over cells and times.

    Arguments:
        predicted, true: positions of the same cells at the same times, shape (T, n, D).
    """
    p, q = torch.as_tensor(predicted).detach().double(), torch.as_tensor(true).detach().double()
    if p.shape != q.shape or p.ndim != 3:
        raise ValueError(f"predicted and true must have the same shape (T, n, D), got {tuple(p.shape)} and {tuple(q.shape)}")
    if not (torch.isfinite(p).all() and torch.isfinite(q).all()):
        raise ValueError("paths contain NaN or infinite values")
    return float((p - q).norm(dim=-1).mean())
