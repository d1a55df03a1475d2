"""cnf_lib.simulation's second course, simulate_three_fates: cells per day, three populated
fates on curved arms, negative-binomial counts, seeding, ground truth usable by true_paths and
preprocess_holding_out, and clear errors. (simulate_differentiation is tested in test_timecourse.py.)"""

from __future__ import annotations

import hashlib

import anndata as ad
import numpy as np
import pytest

from cnf_lib.simulation import (
    preprocess,
    preprocess_holding_out,
    project_counts,
    simulate_differentiation,
    simulate_three_fates,
    true_paths,
)

PER_DAY = (26, 30, 34, 28, 32, 30)


@pytest.fixture(scope="module")
def three() -> ad.AnnData:
    return simulate_three_fates(n_cells=PER_DAY, n_genes=40, seed=3)


def test_cells_per_time_point_and_layout(three: ad.AnnData) -> None:
    counts = three.obs["time"].value_counts().sort_index()
    assert counts.index.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert counts.tolist() == list(PER_DAY)
    assert three.n_vars == 40 and three.obsm["latent"].shape == (sum(PER_DAY), 2)
    x = three.layers["counts"]
    assert (x >= 0).all() and np.array_equal(x, np.round(x))
    sim = three.uns["simulation"]
    assert sim["paths"].shape == (three.n_obs, len(sim["path_times"]), 2)
    own = np.round(three.obs["time"].to_numpy() / 0.05).astype(int)
    np.testing.assert_array_equal(sim["paths"][np.arange(three.n_obs), own], three.obsm["latent"])
    # one integer means that many cells at every time point
    assert (simulate_three_fates(n_cells=7, n_genes=8).obs["time"].value_counts() == 7).all()


def test_default_course_has_two_hundred_genes_and_unequal_days() -> None:
    adata = simulate_three_fates(n_genes=200, seed=0)
    per_day = adata.obs["time"].value_counts().sort_index().tolist()
    assert adata.n_vars == 200 and len(per_day) == 6 and len(set(per_day)) > 1
    assert min(per_day) >= 260 and max(per_day) <= 340


def test_three_fates_are_populated_and_apart() -> None:
    adata = simulate_three_fates(n_cells=150, n_genes=8, seed=0)
    state = adata.uns["simulation"]["paths"]
    fate = adata.obs["fate"].to_numpy()
    share = {f: np.mean(fate == f) for f in "ABC"}
    assert all(v > 0.15 for v in share.values()), share
    # at the last time the fates sit on three separate arms of z; at the first, close (a bias)
    end = {f: state[fate == f, -1].mean(0) for f in "ABC"}
    start = {f: state[fate == f, 0].mean(0) for f in "ABC"}
    gaps_end = [np.linalg.norm(end[f] - end[g]) for f, g in ("AB", "BC", "AC")]
    gaps_start = [np.linalg.norm(start[f] - start[g]) for f, g in ("AB", "BC", "AC")]
    assert min(gaps_end) > 1.0 and max(gaps_start) < 0.25 * min(gaps_end), (gaps_end, gaps_start)
    # the fate coordinate has settled into the wells 1, 0, -1
    v = adata.obsm["state"][adata.obs["time"].to_numpy() == 5.0, 1]
    assert np.mean(np.min(np.abs(v[:, None] - np.array([1.0, 0.0, -1.0])), axis=1) < 0.2) > 0.9


def test_the_arms_are_curved() -> None:
    adata = simulate_three_fates(n_cells=60, n_genes=8, seed=1)
    paths = adata.uns["simulation"]["paths"]
    straight = simulate_three_fates(n_cells=60, n_genes=8, seed=1, bend=0.0).uns["simulation"]["paths"]
    grid = adata.uns["simulation"]["path_times"]
    late = grid >= 2.5   # past the branch point (1.5) by a unit of maturation at least
    # with bend = 0 a path past the branch point is a straight line: its heading never turns
    for p, turns in ((straight, False), (paths, True)):
        step = np.diff(p[:, late], axis=1)
        heading = np.unwrap(np.arctan2(step[..., 1], step[..., 0]), axis=1)
        turn = np.median(heading[:, -5:].mean(1) - heading[:, :5].mean(1))
        assert (abs(turn) > 0.5) == turns, turn


def test_counts_are_overdispersed_negative_binomial() -> None:
    # many cells in (almost) one state: the day-0 progenitors with no spread and no library noise
    kw = dict(n_cells=(4000, 2), times=(0.0, 0.05), n_genes=8, start_spread=(0.0, 0.0), noise=0.0,
              speed_spread=0.0, seed=0)
    nb = simulate_three_fates(dispersion=5.0, **kw)
    poisson = simulate_three_fates(dispersion=np.inf, **kw)
    for adata, ratio in ((nb, (1.5, np.inf)), (poisson, (0.0, 1.5))):
        x = adata.layers["counts"][adata.obs["time"].to_numpy() == 0.0]
        # divide out the log-normal library size: counts per cell scaled to the median total
        scaled = x / x.sum(1, keepdims=True) * np.median(x.sum(1))
        mean, var = scaled.mean(0), scaled.var(0)
        expressed = mean > 5
        assert expressed.sum() >= 3
        r = var[expressed] / mean[expressed]
        assert ratio[0] < r.min() and r.max() < ratio[1], r


def test_same_seed_same_data_and_replicates_share_the_genes() -> None:
    a = simulate_three_fates(n_cells=12, n_genes=16, seed=4)
    b = simulate_three_fates(n_cells=12, n_genes=16, seed=4)
    c = simulate_three_fates(n_cells=12, n_genes=16, seed=5)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.uns["simulation"]["paths"], b.uns["simulation"]["paths"])
    assert not np.array_equal(a.X, c.X)
    for key in ("direction", "threshold", "amplitude"):
        np.testing.assert_array_equal(a.uns["simulation"]["genes"][key], c.uns["simulation"]["genes"][key])


def test_true_paths_and_holding_out_work_on_the_second_course(three: ad.AnnData) -> None:
    processed = preprocess(three.copy(), n_comps=5)
    times = sorted(set(three.obs["time"]))
    tp = true_paths(processed, times, n_comps=3)   # (6, n, 3)
    k = np.searchsorted(times, three.obs["time"].to_numpy())
    diff = processed.obsm["X_pca"][:, :3] - tp[k, np.arange(three.n_obs)].numpy()
    spread = processed.obsm["X_pca"][:, :3].std(0).sum()
    assert np.linalg.norm(diff, axis=1).mean() < 0.3 * spread   # measured = truth + counting noise
    held = preprocess_holding_out(three, 3.0, n_comps=5)
    mask = held.obs["time"].to_numpy() == 3.0
    np.testing.assert_allclose(project_counts(three[mask], held), held.obsm["X_pca"][mask], atol=1e-4)
    assert true_paths(held, [3.0], n_comps=2).shape == (1, three.n_obs, 2)


def test_the_first_simulator_is_unchanged() -> None:
    # simulate_differentiation's output, bit for bit, as before the second simulator was added
    # (chapter 7's first course rests on it)
    adata = simulate_differentiation(n_cells=5, seed=0)
    assert hashlib.sha256(adata.X.tobytes()).hexdigest()[:16] == "54276377e08cf4ea"
    paths = adata.uns["simulation"]["paths"]
    assert hashlib.sha256(paths.tobytes()).hexdigest()[:16] == "d00d5f9f58062487"


@pytest.mark.parametrize(
    "kwargs, msg",
    [(dict(n_cells=10, times=(0.0,)), "times"), (dict(n_cells=10, times=(2.0, 1.0)), "times"),
     (dict(n_cells=(10, 10)), "one per time point"), (dict(times=(0.0, 1.0)), "one per time point"),
     (dict(n_cells=1), "n_cells"),
     (dict(n_cells=(10, 10, 10, 10, 10, 2.5)), "integers"), (dict(n_genes=7), "n_genes"),
     (dict(dispersion=0.0), "dispersion"), (dict(dispersion=-1.0), "dispersion"),
     (dict(n_cells=10, times=(0.0, 1.03)), "record grid"), (dict(record_dt=0.015), "record_dt")],
)
def test_bad_arguments_raise_clear_errors(kwargs, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        simulate_three_fates(**kwargs)
