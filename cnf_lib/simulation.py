r"""A simulated single-cell time course whose true cell paths are known (chapter 7's data).

* :func:`simulate_differentiation` — a branching differentiation: a stochastic process in a
  two-dimensional latent landscape (a pitchfork), mapped to gene counts with Poisson sampling
  noise, returned as an :class:`~anndata.AnnData` with a time column;
* :func:`simulate_three_fates` — a second course of another geometry: three fates on curved
  arms, more genes, negative-binomial counts and unequal numbers of cells per time point;
* :func:`preprocess` — processes it the way a single-cell user processes real data (scanpy's
  ``normalize_total``, ``log1p``, ``pca``);
* :func:`true_paths` — the known latent paths in the same representation;
* :func:`project_counts` — places new cells (a replicate, or a held-out time point) in the
  coordinates of a processed reference.

This module knows nothing of the trajectory model (:mod:`cnf_lib.timecourse`) or the baselines
(:mod:`cnf_lib.baselines`).

References:
    Wolf, Angerer and Theis (2018). SCANPY. Genome Biology 19.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # for type hints only (the functions that build AnnData objects import it)
    from anndata import AnnData

__all__ = ["SIMULATION_KEY", "PREPROCESS_KEY", "simulate_differentiation", "simulate_three_fates", "preprocess",
           "preprocess_holding_out", "true_paths", "project_counts"]

#: ``adata.uns`` key of :func:`simulate_differentiation`'s ground truth (latent paths, gene map).
SIMULATION_KEY = "simulation"
#: ``adata.uns`` key where :func:`preprocess` records what it did (target sum, PCA mean).
PREPROCESS_KEY = "timecourse_preprocess"

_PROGRAMS = ("early", "late", "branch A", "branch B", "primed A", "primed B", "housekeeping")
_PROGRAMS_3 = ("early", "late", "fate A", "fate B", "fate C", "primed A", "primed C", "housekeeping")
_FATES = ("A", "B", "C")


# ==============================================================================================
# Simulation: a branching differentiation with known paths
# ==============================================================================================


def _draw_gene_map(n_genes: int, directions: np.ndarray, thresholds: tuple[np.ndarray, np.ndarray],
                   steepness: tuple[np.ndarray, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draws each gene's response to the latent state, given one row per program (the last: housekeeping).

    Gene ``g`` takes program ``g mod P``; its direction is the program's plus N(0, 0.1²) noise, its
    threshold and steepness uniform in the program's ranges (``thresholds`` = (lo, hi), ``steepness`` =
    (lo, hi), each shape (P,)), its amplitude uniform in [1.5, 3] (0 for housekeeping) and its baseline
    N(0, 0.5²). ``directions``: shape (P, 2). Returns the map :func:`_expression_fractions` reads.
    """
    n_programs = len(directions)
    program = np.arange(n_genes) % n_programs
    active = program < n_programs - 1
    direction = directions[program] + rng.normal(0.0, 0.1, size=(n_genes, 2)) * active[:, None]
    threshold = rng.uniform(thresholds[0][program], thresholds[1][program])
    steep = rng.uniform(steepness[0][program], steepness[1][program])
    amplitude = rng.uniform(1.5, 3.0, size=n_genes) * active
    baseline = rng.normal(0.0, 0.5, size=n_genes)
    return dict(program=program, direction=direction, threshold=threshold, amplitude=amplitude,
                baseline=baseline, steepness=steep)


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
    return _draw_gene_map(n_genes, directions, (lo, hi), (steep_lo, steep_hi), rng)


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
    cell's counts are Poisson with a log-normal library size. ``n_cells`` cells are simulated *per time point*, each
    from its own path, and observed (destroyed) at that time only; the whole path stays known.

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


def _fate_drift(v: np.ndarray) -> np.ndarray:
    r"""The pull of three fate wells at ``v = 1, 0, -1`` (barriers at ``±1/2``), shape of ``v``.

    :math:`g(v) = -v\,(4v^2 - 1)(v^2 - 1)`: zero at the wells and the barriers, restoring beyond
    :math:`\pm 1`.
    """
    return -v * (4.0 * v**2 - 1.0) * (v**2 - 1.0)


def _curved_arms(u: np.ndarray, v: np.ndarray, branch_point: float, spread: float, bend: float,
                 prime: float) -> np.ndarray:
    r"""Maps maturation ``u`` and fate ``v`` (same shapes) to the gene-reading latent ``z``, (..., 2).

    Before the branch point the cells lie on a line, ``z = (u, prime * v)``; past it, a cell that
    has matured :math:`s = u - u_c` moves on a circular arc of curvature ``bend`` leaving the
    branch point at the angle :math:`\theta = \text{spread} \cdot v`: the three wells of ``v``
    become three curved arms (all bending the same way, like the blades of a fan).
    """
    s = np.maximum(u - branch_point, 0.0)
    theta = spread * v
    if bend == 0.0:
        dx, dy = s * np.cos(theta), s * np.sin(theta)
    else:
        dx = (np.sin(theta + bend * s) - np.sin(theta)) / bend
        dy = (np.cos(theta) - np.cos(theta + bend * s)) / bend
    x = np.minimum(u, branch_point) + dx
    return np.stack([x, prime * v + dy], axis=-1)


def _gene_programs_3(n_genes: int, arm_ends: np.ndarray, branch: np.ndarray,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Gene programs of :func:`simulate_three_fates` (the map that :func:`_expression_fractions` reads).

    early: on while z_1 is small; late: on once z_1 is large; fate A / B / C: on far out along one
    arm (the direction from the branch point to the arm's end, sharp); primed A / C: graded in
    z_2 from the start; housekeeping: constant. ``arm_ends``: (3, 2) ends of the arms A, B, C;
    ``branch``: (2,) the branch point.
    """
    arms = arm_ends - branch
    length = np.linalg.norm(arms, axis=1)
    unit = arms / length[:, None]
    directions = np.array([[-1.0, 0.0], [1.0, 0.0], *unit, [0.0, 1.0], [0.0, -1.0], [0.0, 0.0]])
    # a fate gene switches on between 40 and 80 % of the way out along its arm
    reach = unit @ branch
    lo = np.array([-1.5, 1.0, *(reach + 0.4 * length), 0.0, 0.0, 0.0])
    hi = np.array([0.0, 3.5, *(reach + 0.8 * length), 0.0, 0.0, 0.0])
    steep_lo = np.array([1.0, 1.0, 2.0, 2.0, 2.0, 1.5, 1.5, 0.0])
    steep_hi = np.array([2.0, 2.0, 3.5, 3.5, 3.5, 2.5, 2.5, 0.0])
    return _draw_gene_map(n_genes, directions, (lo, hi), (steep_lo, steep_hi), rng)


def simulate_three_fates(
    n_cells: int | Sequence[int] = (260, 300, 340, 280, 320, 300),
    times: Sequence[float] = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0),
    n_genes: int = 200,
    *,
    library_size: float = 5000.0,
    dispersion: float = 5.0,
    noise: float = 0.05,
    start_spread: tuple[float, float] = (0.15, 0.75),
    speed_spread: float = 0.15,
    branch_point: float = 1.5,
    pull: float = 3.0,
    spread: float = 0.8,
    bend: float = 0.35,
    prime: float = 0.3,
    record_dt: float = 0.05,
    seed: int = 0,
    gene_seed: int = 0,
) -> AnnData:
    r"""Simulates a differentiation into three fates along curved arms (a second geometry).

    Each cell carries a maturation :math:`u` and a fate :math:`v`; Euler–Maruyama steps of
    :math:`dt = 0.01` integrate

    .. math:: du = r_i\, dt + \sigma\, dW_1, \qquad
              dv = k\, (u - u_c)_+\, g(v)\, dt + \sigma\, dW_2, \qquad
              g(v) = -v\,(4v^2 - 1)(v^2 - 1),

    so before the branch point :math:`u_c` the fate drifts freely (a bias present from the start,
    :math:`v \sim \mathcal N(0, s_v^2)`), and after it :math:`v` settles, ever more firmly, into
    one of three wells, :math:`v = 1` (fate "A"), 0 ("B"), :math:`-1` ("C"). The genes read a
    latent position :math:`z` (2-D): before the branch point :math:`z = (u, p\, v)`; past it a
    cell moves on a circular arc of curvature ``bend``, leaving the branch point at the angle
    ``spread`` :math:`\cdot\, v`, so the three fates are three curved arms. Gene programs (early,
    late, fate A, fate B, fate C, primed A, primed C, housekeeping) map :math:`z` to expression as
    in :func:`simulate_differentiation`, and a cell's counts are **negative binomial** (a
    gamma–Poisson mixture: mean :math:`\mu`, variance :math:`\mu + \mu^2/\theta`) with a
    log-normal library size. Cells are simulated per time point, each on its own path, and
    observed at that time only; the whole latent path stays known.

    Arguments:
        n_cells: cells per time point: one integer for all, or one per time point.
        times: the snapshot times, increasing, :math:`\geq 0`, on the record grid.
        n_genes: number of genes (at least 8, one per program).
        library_size: median total counts of a cell.
        dispersion: :math:`\theta > 0`; smaller is noisier (``inf`` gives Poisson counts).
        noise: :math:`\sigma`, the diffusion of :math:`(u, v)`.
        start_spread: :math:`(s_u, s_v)`, the spread of the starting :math:`(u, v)`.
        speed_spread: :math:`s_r`, speeds :math:`r_i \sim \mathcal N(1, s_r^2)`.
        branch_point: :math:`u_c`.
        pull: :math:`k`, how fast the wells deepen past the branch point.
        spread: the angle (radians) between neighbouring arms where they leave the branch point.
        bend: the arms' curvature (1/length); 0 gives straight arms.
        prime: :math:`p`, how much of the early fate bias the genes see.
        record_dt: spacing of the recorded path grid (a multiple of the step 0.01).
        seed: seeds the cells (paths, library sizes, counts).
        gene_seed: seeds the gene map (same ``gene_seed``, other ``seed``: a replicate).

    Returns:
        An AnnData laid out as :func:`simulate_differentiation`'s: counts in ``X`` (float32) and
        ``layers["counts"]``, ``obs["time"]``, ``obs["fate"]`` ("A"/"B"/"C": the well nearest to
        the cell's :math:`v` at the last time), ``obsm["latent"]`` (:math:`z` at the cell's own
        time, (n, 2)), ``obsm["state"]`` (:math:`(u, v)` there, (n, 2)), ``var["program"]`` and
        ``uns["simulation"]`` with ``path_times`` (G,), ``paths`` of :math:`z` (n, G, 2), the gene
        map and the settings, so that :func:`true_paths`, :func:`project_counts` and
        :func:`preprocess_holding_out` work on it unchanged.

    Raises:
        ValueError: bad times, cell numbers, gene number, dispersion or record step.
    """
    import anndata as ad
    import pandas as pd

    times_arr = np.asarray(times, dtype=np.float64).reshape(-1)
    if times_arr.size < 2 or not np.all(np.diff(times_arr) > 0) or times_arr[0] < 0:
        raise ValueError(f"times must be at least 2 increasing values >= 0, got {list(times_arr)}")
    per_day = np.atleast_1d(np.asarray(n_cells))
    if per_day.size == 1:
        per_day = np.repeat(per_day, times_arr.size)
    if per_day.ndim != 1 or per_day.size != times_arr.size:
        raise ValueError(f"n_cells must be one integer or one per time point ({times_arr.size}), got {n_cells!r}")
    if not np.all(np.mod(per_day, 1) == 0) or (per_day < 2).any():
        raise ValueError(f"n_cells must be integers >= 2, got {n_cells!r}")
    per_day = per_day.astype(int)
    if int(n_genes) != n_genes or n_genes < len(_PROGRAMS_3):
        raise ValueError(f"n_genes must be an integer >= {len(_PROGRAMS_3)} (one per program), got {n_genes!r}")
    if not dispersion > 0:
        raise ValueError(f"dispersion must be > 0 (np.inf for Poisson counts), got {dispersion!r}")
    dt = 0.01
    every = round(record_dt / dt)
    if every < 1 or abs(every * dt - record_dt) > 1e-9:
        raise ValueError(f"record_dt must be a positive multiple of {dt}, got {record_dt}")
    if np.any(np.abs(times_arr / record_dt - np.round(times_arr / record_dt)) > 1e-6):
        raise ValueError(f"the times {list(times_arr)} must lie on the record grid (multiples of {record_dt})")

    rng = np.random.default_rng(seed)
    n_genes = int(n_genes)
    n_total = int(per_day.sum())
    n_steps = round(times_arr[-1] / dt)
    grid = np.arange(0, n_steps + 1, every) * dt

    state = rng.normal(0.0, 1.0, size=(n_total, 2)) * np.asarray(start_spread, dtype=np.float64)
    speed = 1.0 + speed_spread * rng.normal(size=n_total)
    states = np.empty((n_total, len(grid), 2))
    states[:, 0] = state
    sq = noise * math.sqrt(dt)
    for step in range(1, n_steps + 1):
        u, v = state[:, 0], state[:, 1]
        drift = np.stack([speed, pull * np.maximum(u - branch_point, 0.0) * _fate_drift(v)], axis=1)
        state = state + drift * dt + sq * rng.normal(size=state.shape)
        if step % every == 0:
            states[:, step // every] = state
    arm_settings = dict(branch_point=branch_point, spread=spread, bend=bend, prime=prime)
    paths = _curved_arms(states[..., 0], states[..., 1], **arm_settings)

    time_of_cell = np.repeat(times_arr, per_day)
    grid_index = np.round(time_of_cell / record_dt).astype(int)
    latent = paths[np.arange(n_total), grid_index]

    # the arms' ends: where a cell of mean speed in each well is at the last time
    wells = np.array([1.0, 0.0, -1.0])
    ends = _curved_arms(np.full(3, times_arr[-1]), wells, **arm_settings)
    branch = _curved_arms(np.array(branch_point), np.array(0.0), **arm_settings)
    genes = _gene_programs_3(n_genes, ends, branch, np.random.default_rng(gene_seed))
    fractions = _expression_fractions(latent, genes)
    library = library_size * np.exp(rng.normal(0.0, 0.25, size=n_total))
    mean = library[:, None] * fractions
    rate = mean if np.isinf(dispersion) else rng.gamma(dispersion, mean / dispersion)
    counts = rng.poisson(rate).astype(np.float32)

    fate = np.asarray(_FATES)[np.abs(states[:, -1, 1][:, None] - wells).argmin(axis=1)]
    obs = pd.DataFrame(
        {"time": time_of_cell, "fate": pd.Categorical(fate, categories=list(_FATES))},
        index=[f"cell{i}" for i in range(n_total)],
    )
    var = pd.DataFrame({"program": pd.Categorical([_PROGRAMS_3[p] for p in genes["program"]])},
                       index=[f"gene{g}" for g in range(n_genes)])
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.layers["counts"] = counts.copy()
    adata.obsm["latent"] = latent.astype(np.float32)
    adata.obsm["state"] = states[np.arange(n_total), grid_index].astype(np.float32)
    adata.uns[SIMULATION_KEY] = dict(
        path_times=grid,
        paths=paths.astype(np.float32),
        genes={k: np.asarray(v) for k, v in genes.items()},
        settings=dict(n_cells=per_day, times=times_arr, n_genes=n_genes, library_size=library_size,
                      dispersion=dispersion, noise=noise, start_spread=np.asarray(start_spread),
                      speed_spread=speed_spread, pull=pull, record_dt=record_dt, seed=seed,
                      gene_seed=gene_seed, **arm_settings),
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


def preprocess_holding_out(
    adata: AnnData, leave_out: float, time_key: str = "time", n_comps: int = 10, target_sum: float = 1e4
) -> AnnData:
    """A new AnnData processed as :func:`preprocess` does, with the PCA fitted **without** one time
    point: its cells are normalized the same way (a per-cell operation) and projected on the
    loadings of the other cells, as a new experiment would be (:func:`project_counts`). The
    honest protocol for holding a time point out: nothing of it reaches the representation.

    Arguments:
        adata: cells × genes, raw counts in ``layers["counts"]`` (as :func:`preprocess` keeps them)
            or in ``X``; its ``uns`` (the simulation's record) is carried over.
        leave_out: the held-out value of ``adata.obs[time_key]``.
        time_key: the time column.
        n_comps, target_sum: as in :func:`preprocess`.

    Returns:
        The processed copy: ``obsm["X_pca"]`` for every cell, ``varm["PCs"]`` and
        ``uns["timecourse_preprocess"]`` from the cells of the other time points.

    Raises:
        ValueError: no cell has time ``leave_out``.
    """
    import anndata as ad

    times = np.asarray(adata.obs[time_key], dtype=np.float64)
    held = np.isclose(times, float(leave_out))
    if not held.any():
        raise ValueError(f"no cell has {time_key} = {leave_out}; times: {np.unique(times).tolist()}")
    counts = adata.layers["counts"] if "counts" in adata.layers else adata.X
    fitted = ad.AnnData(X=counts[~held].copy(), obs=adata.obs[~held].copy(), var=adata.var.copy())
    preprocess(fitted, n_comps=n_comps, target_sum=target_sum)
    dense = counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts)
    fitted_keys = (PREPROCESS_KEY, "pca", "log1p")  # what the processing of all cells wrote
    uns = {k: v for k, v in adata.uns.items() if k not in fitted_keys}
    uns.update({k: fitted.uns[k] for k in fitted_keys if k in fitted.uns})
    out = ad.AnnData(X=dense.astype(np.float32), obs=adata.obs.copy(), var=adata.var.copy(), uns=uns)
    out.layers["counts"] = out.X.copy()
    out.X = np.log1p(float(target_sum) * dense / dense.sum(axis=1, keepdims=True)).astype(np.float32)
    x_pca = np.empty((out.n_obs, fitted.obsm["X_pca"].shape[1]), dtype=np.float32)
    x_pca[~held] = fitted.obsm["X_pca"]
    x_pca[held] = project_counts(out[held], fitted)
    out.obsm["X_pca"] = x_pca
    out.varm["PCs"] = fitted.varm["PCs"]
    return out


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
        adata: from :func:`simulate_differentiation` (or :func:`simulate_three_fates`) then
            :func:`preprocess`.
        times: times on the simulation's record grid (default: the whole grid).
        n_comps: number of leading PCs (default: all).
        cells: which cells (a boolean mask or integer indices over ``adata.obs``; default all).

    Returns:
        Positions, shape (T, n, n_comps), float32.
    """
    if SIMULATION_KEY not in adata.uns:
        raise ValueError("adata has no uns['simulation']: true paths exist only for the data of "
                         "simulate_differentiation() or simulate_three_fates()")
    if PREPROCESS_KEY not in adata.uns or "PCs" not in adata.varm:
        raise ValueError("adata has not been processed by cnf_lib.simulation.preprocess() (no PCA to project on)")
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
        raise ValueError("reference has not been processed by cnf_lib.simulation.preprocess() (no PCA to project on)")
    if list(adata.var_names) != list(reference.var_names):
        raise ValueError("adata and reference must have the same genes in the same order")
    counts = adata.layers["counts"] if "counts" in adata.layers else adata.X
    counts = counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    if (totals <= 0).any():
        raise ValueError(f"{int((totals <= 0).sum())} cell(s) have no counts")
    expr = np.log1p(float(reference.uns[PREPROCESS_KEY]["target_sum"]) * counts / totals)
    return _project(reference, expr, n_comps).astype(np.float32)
