"""cnf_lib.timecourse: the simulator's ground truth, snapshots from AnnData, the multi-time CNF
against closed forms (linear fields), leave-one-out training, baselines and path errors on
constructed data."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from cnf_lib.baselines import holdout_baselines, ot_paths, path_error
from cnf_lib.fields import LinearField
from cnf_lib.metrics import wasserstein
from cnf_lib.simulation import preprocess, project_counts, simulate_differentiation, true_paths
from cnf_lib.timecourse import TimeCourse, TrajectoryCNF, fit_timecourse, fit_trajectories


@pytest.fixture(scope="module")
def sim() -> ad.AnnData:
    adata = simulate_differentiation(n_cells=60, seed=3)
    return preprocess(adata, n_comps=5)


def cells_adata(x: np.ndarray, times, key: str = "time") -> ad.AnnData:
    adata = ad.AnnData(X=np.zeros((len(x), 1), dtype=np.float32),
                       obs=pd.DataFrame({key: times}, index=[f"c{i}" for i in range(len(x))]))
    adata.obsm["X_pca"] = np.asarray(x, dtype=np.float32)
    return adata


def translated_course(times=(0.0, 1.0, 2.0), n: int = 30, v=(1.5, -0.5), seed: int = 0) -> TimeCourse:
    """Snapshots x0 + t v: the whole population translates at constant velocity."""
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    v = torch.tensor(v)
    return TimeCourse(np.asarray(times), [x0 + t * v for t in times])


# ----------------------------------------------------------------------------- simulation


def test_simulation_shapes_counts_and_times(sim: ad.AnnData) -> None:
    assert sim.n_obs == 5 * 60 and sim.n_vars == 40
    assert sorted(set(sim.obs["time"])) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert (sim.obs["time"].value_counts() == 60).all()
    counts = sim.layers["counts"]
    assert (counts >= 0).all() and np.array_equal(counts, np.round(counts))
    assert set(sim.obs["lineage"]) == {"A", "B"}
    paths = sim.uns["simulation"]["paths"]
    assert paths.shape == (sim.n_obs, len(sim.uns["simulation"]["path_times"]), 2)


def test_true_paths_pass_through_the_snapshots(sim: ad.AnnData) -> None:
    grid = sim.uns["simulation"]["path_times"]
    paths = sim.uns["simulation"]["paths"]
    own = np.round(sim.obs["time"].to_numpy() / 0.05).astype(int)
    # the latent state a cell was measured in is its path at its own time, exactly
    np.testing.assert_array_equal(paths[np.arange(sim.n_obs), own], sim.obsm["latent"])
    assert grid[0] == 0.0 and grid[-1] == pytest.approx(4.0)
    # in PCA space the measured cell is its noise-free position plus Poisson noise: close, unbiased
    tp = true_paths(sim, sorted(set(sim.obs["time"])), n_comps=2)  # (5, n, 2)
    k = np.searchsorted([0, 1, 2, 3, 4], sim.obs["time"].to_numpy())
    at_own = tp[k, np.arange(sim.n_obs)].numpy()
    diff = sim.obsm["X_pca"][:, :2] - at_own
    spread = sim.obsm["X_pca"][:, :2].std(0)
    assert np.linalg.norm(diff, axis=1).mean() < 0.1 * spread.sum()
    assert np.abs(diff.mean(0)).max() < 0.05 * spread.max()


def test_lineages_branch_and_fate_is_primed(sim: ad.AnnData) -> None:
    paths = sim.uns["simulation"]["paths"]
    end_v = paths[:, -1, 1]
    a = (sim.obs["lineage"] == "A").to_numpy()
    assert np.all(end_v[a] > 0) and np.all(end_v[~a] < 0)
    assert 0.35 < a.mean() < 0.65
    # the two lineages are apart at the last time, together at the first
    assert end_v[a].mean() - end_v[~a].mean() > 2.0
    assert abs(paths[a, 0, 1].mean() - paths[~a, 0, 1].mean()) < 1.0
    # most cells keep the fate their starting state leans to
    assert np.mean(np.sign(paths[:, 0, 1]) == np.sign(end_v)) > 0.75


def test_simulation_is_seeded_and_replicates_share_the_genes() -> None:
    a = simulate_differentiation(n_cells=10, seed=1)
    b = simulate_differentiation(n_cells=10, seed=1)
    c = simulate_differentiation(n_cells=10, seed=2)
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.array_equal(a.X, c.X)
    for key in ("direction", "threshold", "amplitude"):
        np.testing.assert_array_equal(a.uns["simulation"]["genes"][key], c.uns["simulation"]["genes"][key])


def test_project_counts_reproduces_the_pca(sim: ad.AnnData) -> None:
    again = project_counts(sim, sim, n_comps=3)
    np.testing.assert_allclose(again, sim.obsm["X_pca"][:, :3], atol=1e-3)
    other = simulate_differentiation(n_cells=10, seed=9, n_genes=12)
    with pytest.raises(ValueError, match="same genes"):
        project_counts(other, sim)


@pytest.mark.parametrize(
    "kwargs, msg",
    [(dict(times=(0.0,)), "times"), (dict(times=(2.0, 1.0)), "times"), (dict(n_cells=1), "n_cells"),
     (dict(n_genes=3), "n_genes"), (dict(times=(0.0, 1.03)), "record grid")],
)
def test_simulation_bad_arguments(kwargs, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        simulate_differentiation(**kwargs)


def test_true_paths_errors(sim: ad.AnnData) -> None:
    with pytest.raises(ValueError, match="simulate_differentiation"):
        true_paths(cells_adata(np.zeros((4, 2)), [0, 0, 1, 1]))
    with pytest.raises(ValueError, match="record grid"):
        true_paths(sim, [0.013])
    with pytest.raises(ValueError, match="n_comps"):
        true_paths(sim, [0.0], n_comps=99)


# ----------------------------------------------------------------------------- snapshots


def test_time_course_from_anndata_splits_by_time() -> None:
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    course = TimeCourse.from_anndata(cells_adata(x, [2.0, 0.0, 2.0, 0.0, 1.0, 1.0]))
    np.testing.assert_array_equal(course.times, [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(course.snapshots[0].numpy(), x[[1, 3]])
    np.testing.assert_array_equal(course.obs_indices[2], [0, 2])
    assert course.dim == 2 and course.index(1.0) == 1
    with pytest.raises(ValueError, match="not a time point"):
        course.index(1.5)


def test_time_course_reads_numbers_stored_as_strings_or_categories() -> None:
    x = np.zeros((4, 2))
    for times in (["0", "0", "1.5", "1.5"], pd.Categorical([3, 3, 7, 7])):
        course = TimeCourse.from_anndata(cells_adata(x, times))
        assert len(course.times) == 2 and course.times[1] > course.times[0]


@pytest.mark.parametrize(
    "times, key, msg",
    [
        ([0, 0, 1, 1], "day", "time_key='day' is not a column"),
        ([5, 5, 5, 5], "time", "single time point"),
        (["d0", "d0", "d1", "d1"], "time", "not numeric"),
        ([0.0, np.nan, 1.0, 1.0], "time", "missing"),
        ([0, 0, 0, 1], "time", "fewer than 2 cells"),
        ([True, True, False, False], "time", "boolean"),
    ],
)
def test_time_course_errors(times, key, msg) -> None:
    adata = cells_adata(np.zeros((4, 2)), times)
    with pytest.raises(ValueError, match=msg):
        TimeCourse.from_anndata(adata, time_key=key)


def test_time_course_missing_representation() -> None:
    adata = cells_adata(np.zeros((4, 2)), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="X_umap"):
        TimeCourse.from_anndata(adata, use_rep="X_umap")


# ----------------------------------------------------------------------------- the model


def linear_model(a: float, times=(0.0, 1.0, 3.0), dim: int = 2, **kw) -> TrajectoryCNF:
    model = TrajectoryCNF(times, dim, method="dopri5", rtol=1e-8, atol=1e-8, **kw).double()
    model.cnf.field = LinearField(a * torch.eye(dim, dtype=torch.float64))
    return model


def test_model_time_places_the_prior_before_the_first_snapshot() -> None:
    model = TrajectoryCNF([2.0, 4.0, 8.0], 2, prior_gap=0.5)
    assert model.unit == 3.0  # mean interval
    assert model.model_time(2.0) == 0.5
    assert model.model_time(8.0) == pytest.approx(2.5)
    assert model.cnf.t1 == pytest.approx(2.5)


def test_snapshot_sweep_matches_closed_form_of_a_linear_field() -> None:
    # f(x) = a x: from tau back to 0, z = x e^{-a tau}, log p_tau(x) = log N(z) - D a tau,
    # kinetic = ∫_0^tau |a x(s)|^2 ds = a |x|^2 (1 - e^{-2 a tau}) / 2
    a = 0.3
    model = linear_model(a)
    gen = torch.Generator().manual_seed(0)
    snaps = [torch.randn(5 + k, 2, generator=gen, dtype=torch.float64) for k in range(3)]
    out = model.snapshot_log_probs(snaps, regularize=True)
    for k, x in enumerate(snaps):
        tau = model.model_time(model.times[k])
        z = x * math.exp(-a * tau)
        expected = -0.5 * z.pow(2).sum(1) - math.log(2 * math.pi) - 2 * a * tau
        torch.testing.assert_close(out.log_probs[k], expected, rtol=1e-6, atol=1e-6)
        kin = a * x.pow(2).sum(1) * (1 - math.exp(-2 * a * tau)) / 2
        torch.testing.assert_close(out.kinetic[k], kin, rtol=1e-6, atol=1e-6)
    assert out.nfe_forward > 0


def test_snapshot_sweep_equals_separate_solves_and_skips_none() -> None:
    torch.manual_seed(0)
    model = TrajectoryCNF([0.0, 1.0, 2.0, 3.0], 2, hidden=(16, 16), method="dopri5", rtol=1e-8, atol=1e-8).double()
    gen = torch.Generator().manual_seed(1)
    snaps = [torch.randn(4, 2, generator=gen, dtype=torch.float64) for _ in range(4)]
    snaps[2] = None
    out = model.snapshot_log_probs(snaps)
    assert out.log_probs[2] is None and out.kinetic[0] is None
    for k in (0, 1, 3):
        alone = model.cnf.log_prob(snaps[k], model.model_time(model.times[k]))
        torch.testing.assert_close(out.log_probs[k], alone, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="expected 4 snapshots"):
        model.snapshot_log_probs(snaps[:3])


def test_representation_units_zero_field() -> None:
    # a zero field keeps the prior: in representation units every marginal is N(m, s^2 I)
    m, s = torch.tensor([1.0, -2.0], dtype=torch.float64), 3.0
    model = linear_model(0.0, center=m, scale=s)
    x = torch.randn(6, 2, dtype=torch.float64)
    expected = torch.distributions.Normal(m, s).log_prob(x).sum(1)
    torch.testing.assert_close(model.log_prob(x, 1.0), expected.to(model.log_prob(x, 1.0).dtype), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.unstandardize(model.standardize(x)), x.float().double(), rtol=1e-6, atol=1e-6)


def test_push_and_trajectory_of_a_linear_field() -> None:
    a = -0.4
    m = torch.tensor([0.5, 1.0], dtype=torch.float64)
    model = linear_model(a, center=m, scale=2.0)
    x = torch.randn(5, 2, dtype=torch.float64)
    dtau = model.model_time(3.0) - model.model_time(1.0)
    expected = m + (x - m) * math.exp(a * dtau)
    pushed, nfe = model.push(x, 1.0, 3.0, return_nfe=True)
    torch.testing.assert_close(pushed, expected, rtol=1e-5, atol=1e-5)
    assert nfe > 0
    torch.testing.assert_close(model.push(pushed, 3.0, 1.0), x, rtol=1e-5, atol=1e-5)
    traj = model.trajectory(x, 1.0, [1.0, 2.0, 3.0])
    assert traj.shape == (3, 5, 2)
    torch.testing.assert_close(traj[-1], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="start at t_from"):
        model.trajectory(x, 1.0, [2.0, 3.0])
    assert model.sample(7, 3.0, generator=torch.Generator().manual_seed(0)).shape == (7, 2)


def test_model_bad_arguments() -> None:
    with pytest.raises(ValueError, match="increasing"):
        TrajectoryCNF([1.0, 1.0], 2)
    with pytest.raises(ValueError, match="positive"):
        TrajectoryCNF([0.0, 1.0], 2, prior_gap=0.0)
    with pytest.raises(ValueError, match="center"):
        TrajectoryCNF([0.0, 1.0], 2, center=torch.zeros(3))


# ----------------------------------------------------------------------------- training

RECIPE = dict(iterations=15, batch_size=32, lr=1e-2, lr_final=1e-3, progress=False)


def small(course: TimeCourse, seed: int = 0, leave_out: float | None = None) -> TrajectoryCNF:
    torch.manual_seed(seed)
    return TrajectoryCNF.for_course(course, leave_out=leave_out, hidden=(16, 16), method="rk4", step_size=0.5)


def test_for_course_centres_on_the_first_snapshot_and_ignores_the_held_out_one() -> None:
    course = TimeCourse(np.arange(3.0), [torch.zeros(4, 2) + 1.0, torch.tensor([[0.0, 0.0], [4.0, 0.0]]),
                                         torch.zeros(3, 2) - 2.0])
    model = TrajectoryCNF.for_course(course)
    np.testing.assert_allclose(model.center.numpy(), [1.0, 1.0])
    pooled = course.pooled().double()
    expected = ((pooled - pooled.mean(0)).pow(2).sum(1).mean() / 2).sqrt().item()
    assert model.scale.item() == pytest.approx(expected, rel=1e-6)
    held = TrajectoryCNF.for_course(course, leave_out=1.0)
    kept = torch.cat([course.snapshots[0], course.snapshots[2]]).double()
    assert held.scale.item() == pytest.approx(((kept - kept.mean(0)).pow(2).sum(1).mean() / 2).sqrt().item(), rel=1e-6)
    first_out = TrajectoryCNF.for_course(course, leave_out=0.0)
    np.testing.assert_allclose(first_out.center.numpy(), [2.0, 0.0])


def test_training_lowers_the_loss_and_is_deterministic() -> None:
    course = translated_course(n=64)
    h1 = fit_timecourse(small(course), course, kinetic=0.1, seed=4, **RECIPE)
    h2 = fit_timecourse(small(course), course, kinetic=0.1, seed=4, **RECIPE)
    assert h1["loss"] == h2["loss"]
    assert np.mean(h1["nll"][-3:]) < h1["nll"][0] - 0.3
    # 3 segments (2 intervals + the prior gap) of 2 rk4 steps
    assert all(k > 0 for k in h1["kinetic"]) and h1["nfe_forward"][0] == 3 * 2 * 4
    h0 = fit_timecourse(small(course), course, kinetic=0.0, seed=4, **RECIPE)
    assert all(k == 0 for k in h0["kinetic"])


def test_left_out_snapshot_never_reaches_the_model() -> None:
    course = translated_course(times=(0.0, 1.0, 2.0, 3.0), n=40)
    other = TimeCourse(course.times, [s.clone() for s in course.snapshots])
    other.snapshots[2] = other.snapshots[2] + 5.0  # change only the held-out cells
    m1, m2 = small(course, leave_out=2.0), small(other, leave_out=2.0)
    assert torch.equal(m1.center, m2.center) and torch.equal(m1.scale, m2.scale)
    fit_timecourse(m1, course, leave_out=2.0, kinetic=0.1, **RECIPE)
    fit_timecourse(m2, other, leave_out=2.0, kinetic=0.1, **RECIPE)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    m3 = small(course)
    fit_timecourse(m3, other, kinetic=0.1, **RECIPE)
    assert any(not torch.equal(p, q) for p, q in zip(m1.parameters(), m3.parameters()))


def test_training_errors() -> None:
    course = translated_course()
    model = small(course)
    with pytest.raises(ValueError, match="not a time point"):
        fit_timecourse(model, course, leave_out=0.5, **RECIPE)
    with pytest.raises(ValueError, match="kinetic"):
        fit_timecourse(model, course, kinetic=-1.0, **RECIPE)
    with pytest.raises(ValueError, match="times"):
        fit_timecourse(small(translated_course(times=(0.0, 1.0, 5.0))), course, **RECIPE)
    two = translated_course(times=(0.0, 1.0))
    with pytest.raises(ValueError, match="first or last"):
        fit_timecourse(small(two), two, leave_out=1.0, **RECIPE)


def test_fit_trajectories_scanpy_style() -> None:
    course = translated_course(n=20)
    x = torch.cat(course.snapshots).numpy()
    adata = cells_adata(x, np.repeat(course.times, 20), key="day")
    model = fit_trajectories(adata, time_key="day", n_comps=2, hidden=(8,), iterations=3, batch_size=8,
                             progress=False, key_added="traj")
    assert isinstance(model, TrajectoryCNF) and len(model.history["loss"]) == 3
    info = adata.uns["traj"]
    assert info["params"]["time_key"] == "day" and len(info["loss"]) == 3
    np.testing.assert_array_equal(info["times"], course.times)
    with pytest.raises(ValueError, match="not a column"):
        fit_trajectories(adata, progress=False)


def test_fit_trajectories_leave_out_sees_nothing_of_the_held_out_cells() -> None:
    course = translated_course(times=(0.0, 1.0, 2.0, 3.0), n=20)
    x = torch.cat(course.snapshots).numpy()
    times = np.repeat(course.times, 20)
    a = cells_adata(x, times)
    moved = x.copy()
    moved[times == 2.0] += 7.0
    b = cells_adata(moved, times)
    kw = dict(n_comps=2, leave_out=2.0, hidden=(8,), iterations=4, batch_size=8,
              progress=False, key_added=None)
    ma, mb = fit_trajectories(a, **kw), fit_trajectories(b, **kw)
    assert ma.history["loss"] == mb.history["loss"]
    for p, q in zip(ma.state_dict().values(), mb.state_dict().values()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- baselines and paths


def test_baselines_on_a_translating_population() -> None:
    v = torch.tensor([1.5, -0.5])
    course = translated_course(times=(0.0, 1.0, 3.0), v=v.tolist())
    base = holdout_baselines(course, 1.0, torch.Generator().manual_seed(0))
    held = course.snapshots[1]
    assert set(base) == {"previous", "next", "random", "OT interpolation"}
    # OT interpolation of a translate is exact: 1/3 of the way from t=0 to t=3
    assert wasserstein(base["OT interpolation"], held) == pytest.approx(0.0, abs=1e-5)
    assert wasserstein(base["previous"], held) == pytest.approx(v.norm().item(), rel=1e-5)
    assert wasserstein(base["next"], held) == pytest.approx(2 * v.norm().item(), rel=1e-5)
    assert wasserstein(base["random"], held) == pytest.approx(v.norm().item(), rel=1e-5) or \
        wasserstein(base["random"], held) == pytest.approx(2 * v.norm().item(), rel=1e-5)


def test_random_baseline_varies_with_the_generator_and_unequal_sizes_work() -> None:
    x0 = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    course = TimeCourse(np.arange(4.0), [x0, x0[:15] + 1, x0[:10] + 2, x0 + 3])
    picks = {holdout_baselines(course, 1.0, torch.Generator().manual_seed(s))["random"].shape[0] for s in range(12)}
    assert picks == {20, 10}  # snapshots 0 and 3 have 20 cells, snapshot 2 has 10
    guesses, weights = holdout_baselines(course, 1.0, return_weights=True)
    # the plan of 20 and 10 cells: its support has between 20 and 20 + 10 - 1 pairs, weighted
    assert 20 <= guesses["OT interpolation"].shape[0] <= 29
    assert weights["OT interpolation"].shape == (guesses["OT interpolation"].shape[0],)
    with pytest.raises(ValueError, match="first or last"):
        holdout_baselines(course, 3.0)


def test_ot_paths_of_a_translate_are_straight_lines() -> None:
    v = torch.tensor([1.0, 2.0])
    course = translated_course(times=(0.0, 1.0, 2.5), v=v.tolist())
    shuffled = [s[torch.randperm(len(s), generator=torch.Generator().manual_seed(1))] for s in course.snapshots]
    shuffled[0] = course.snapshots[0]
    eval_times = [0.0, 0.5, 1.0, 2.0, 2.5]
    paths = ot_paths(shuffled, course.times, eval_times)
    expected = torch.stack([course.snapshots[0] + t * v for t in eval_times])
    torch.testing.assert_close(paths, expected, rtol=1e-5, atol=1e-5)
    assert path_error(paths, expected) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="eval_times"):
        ot_paths(shuffled, course.times, [3.0])


def test_ot_paths_with_unequal_sizes_use_the_barycentre() -> None:
    x0 = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    x1 = torch.tensor([[0.0, 1.0], [0.0, -1.0], [10.0, 1.0], [10.0, -1.0]])  # each splits in two
    paths = ot_paths([x0, x1], [0.0, 1.0], [1.0])
    torch.testing.assert_close(paths[0], x0)


def test_path_error_closed_form() -> None:
    true = torch.randn(4, 6, 3)
    shift = torch.tensor([0.0, 3.0, 4.0])
    assert path_error(true + shift, true) == pytest.approx(5.0, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        path_error(true[:, :5], true)


def test_kinetic_energy_of_a_linear_field_in_representation_units() -> None:
    # x(tau) = m + (x0 - m) e^{a tau}: ∫_0^T |a (x - m)|^2 = a |x0 - m|^2 (e^{2aT} - 1) / 2
    a, m = 0.25, torch.tensor([1.0, 2.0], dtype=torch.float64)
    model = linear_model(a, center=m, scale=3.0)
    x = torch.randn(4, 2, dtype=torch.float64) + m
    T = model.model_time(3.0) - model.model_time(1.0)
    expected = a * (x - m).pow(2).sum(1) * (math.exp(2 * a * T) - 1) / 2
    torch.testing.assert_close(model.kinetic_energy(x, 1.0, 3.0), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- one trainer


def test_a_nan_in_the_time_course_fit_stops_with_the_last_good_parameters() -> None:
    from cnf_lib import TrainingError

    course = translated_course()
    model = small(course)
    fit_timecourse(model, course, **{**RECIPE, "iterations": 2})
    good = [p.detach().clone() for p in model.parameters()]
    original = model.snapshot_log_probs

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        out.log_probs = [None if lp is None else lp * float("nan") for lp in out.log_probs]
        return out

    model.snapshot_log_probs = poisoned
    with pytest.raises(TrainingError, match="not finite"):
        fit_timecourse(model, course, **RECIPE)
    for p, q in zip(model.parameters(), good):
        assert torch.equal(p, q)


def test_the_time_course_fit_trains_with_hutchinson_and_resumes_exactly(tmp_path) -> None:
    course = translated_course()
    kw = dict(RECIPE, iterations=6, kinetic=0.1, seed=2)

    def model() -> TrajectoryCNF:
        torch.manual_seed(0)
        return TrajectoryCNF.for_course(course, hidden=(16,), trace="hutchinson", method="rk4", step_size=0.5)

    full_model = model()
    full = fit_timecourse(full_model, course, **kw)
    assert full["loss"][-1] < full["loss"][0]
    first = model()
    fit_timecourse(first, course, **dict(kw, iterations=6), checkpoint_path=tmp_path / "c.pt")
    # a new process: the same call finds the finished checkpoint and resumes from it
    again = model()
    h = fit_timecourse(again, course, **kw, checkpoint_path=tmp_path / "c.pt")
    assert h["loss"] == full["loss"]
    for p, q in zip(again.parameters(), full_model.parameters()):
        assert torch.equal(p, q)


def test_fit_trajectories_trains_on_a_grid_but_evaluates_adaptively() -> None:
    course = translated_course(n=20)
    adata = cells_adata(torch.cat(course.snapshots).numpy(), np.repeat(course.times, 20))
    model = fit_trajectories(adata, n_comps=2, hidden=(8,), iterations=2, batch_size=8, progress=False, key_added=None)
    # RK4 with step 1: three unit segments (the prior gap and two intervals), 4 evaluations each
    assert model.history["nfe_forward"] == [12, 12]
    assert model.cnf.settings.method == "dopri5" and model.cnf.settings.rtol == 1e-5
    with pytest.raises(ValueError, match="first or last"):
        fit_trajectories(adata, n_comps=2, leave_out=0.0, hidden=(8,), iterations=1, progress=False, key_added=None)


def test_the_ot_baseline_of_unequal_neighbours_is_deterministic_and_weighted() -> None:
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(0))
    course = TimeCourse(np.arange(3.0), [x[:10], x[10:25] + 1.0, x[25:] + 2.0])
    (g1, w1), (g2, w2) = (holdout_baselines(course, 1.0, torch.Generator().manual_seed(s), return_weights=True)
                          for s in (0, 1))
    assert torch.equal(g1["OT interpolation"], g2["OT interpolation"])
    assert w1["OT interpolation"] is not None and float(w1["OT interpolation"].sum()) == pytest.approx(1.0)
    assert w1["previous"] is None and torch.equal(w1["OT interpolation"], w2["OT interpolation"])


def test_a_fitted_trajectory_model_survives_h5ad_and_predicts_cells_as_anndata(tmp_path) -> None:
    from cnf_lib.timecourse import get_trajectories, predict_cells

    course = translated_course(n=20)
    adata = cells_adata(torch.cat(course.snapshots).numpy(), np.repeat(course.times, 20))
    model = fit_trajectories(adata, n_comps=2, hidden=(8,), iterations=2, batch_size=8, progress=False)
    adata.write_h5ad(tmp_path / "course.h5ad")
    back = ad.read_h5ad(tmp_path / "course.h5ad")
    loaded = get_trajectories(back)
    x = course.snapshots[0]
    assert torch.equal(loaded.push(x, 0.0, 2.0), model.push(x, 0.0, 2.0))
    predicted = predict_cells(back, 0.0, 1.5)
    assert predicted.n_obs == 20 and predicted.obsm["X_pca"].shape == (20, 2)
    np.testing.assert_allclose(predicted.obsm["X_pca"], model.push(x, 0.0, 1.5).detach().numpy(), rtol=1e-6)
    assert (predicted.obs["time"] == 1.5).all() and predicted.obs["source"].iloc[0] == adata.obs_names[0]
    with pytest.raises(ValueError, match="outside the course"):
        predict_cells(back, 0.0, 5.0)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['iteration'\] of fit_trajectories"):
        fit_trajectories(adata, n_comps=2, iteration=3)


def test_preprocessing_holding_a_day_out_never_sees_its_cells() -> None:
    from cnf_lib.simulation import preprocess_holding_out

    adata = simulate_differentiation(n_cells=40, n_genes=30, seed=2)
    a = preprocess_holding_out(adata, 2.0, n_comps=4)
    changed = adata.copy()
    held = changed.obs["time"].to_numpy() == 2.0
    changed.layers["counts"][held] = changed.layers["counts"][held][::-1] * 3  # other counts at the held-out day
    b = preprocess_holding_out(changed, 2.0, n_comps=4)
    np.testing.assert_array_equal(a.obsm["X_pca"][~held], b.obsm["X_pca"][~held])
    assert not np.allclose(a.obsm["X_pca"][held], b.obsm["X_pca"][held])
    # the held-out cells are placed as a new experiment would be
    np.testing.assert_allclose(a.obsm["X_pca"][held], project_counts(adata[held], a, n_comps=4), rtol=1e-5)
    with pytest.raises(ValueError, match="no cell has time"):
        preprocess_holding_out(adata, 7.0)


# ------------------------------------------------------------------- flow matching through snapshots


def test_snapshot_matching_targets_pair_consecutive_ends_by_exact_ot_and_skip_the_held_out_one() -> None:
    from scipy.optimize import linear_sum_assignment

    from cnf_lib.timecourse import SnapshotMatching

    course = translated_course(times=(0.0, 1.0, 2.0, 4.0), n=12)
    shuffled = TimeCourse(course.times, [s[torch.randperm(12, generator=torch.Generator().manual_seed(k))]
                                         for k, s in enumerate(course.snapshots)])
    model = small(shuffled)
    data = [model.standardize(x) for x in shuffled.snapshots]
    data[2] = None  # time 2 left out: times 1 and 4 are joined across the gap
    tau, x, u, w = SnapshotMatching("ot").regression_targets(model, data, torch.Generator().manual_seed(0))
    taus = [0.0] + [model.model_time(t) for t in (0.0, 1.0, 4.0)]
    assert tau.shape == (36,) and x.shape == u.shape == (36, 2)
    assert torch.isclose(w.sum(), torch.tensor(1.0))
    for i, (a, b) in enumerate(zip(taus[:-1], taus[1:])):
        seg = slice(12 * i, 12 * (i + 1))
        assert ((tau[seg] >= a) & (tau[seg] <= b)).all()
        s = ((tau[seg] - a) / (b - a)).unsqueeze(1)
        start = x[seg] - s * (b - a) * u[seg]     # x = (1 - s) x_a + s x_b and u = (x_b - x_a) / (b - a)
        end = start + (b - a) * u[seg]
        if i == 0:
            continue  # the prior's points are drawn, not given
        xa, xb = data[[0, 1, 3][i - 1]], data[[0, 1, 3][i]]
        rows, cols = linear_sum_assignment(torch.cdist(xa.double(), xb.double()).pow(2).numpy())
        expected = {tuple(xa[r].tolist()): cols[k] for k, r in enumerate(rows)}
        for p, q in zip(start, end):  # each start is a cell of x_a; its end is the cell the plan gives it
            row = int(torch.cdist(p[None].double(), xa.double()).argmin())
            torch.testing.assert_close(p, xa[row], atol=1e-5, rtol=0)
            torch.testing.assert_close(q, xb[expected[tuple(xa[row].tolist())]], atol=1e-5, rtol=0)
    # a translated population is matched to its own translate: u is the velocity in model units
    last = slice(24, 36)
    velocity = torch.tensor([1.5, -0.5]) * model.unit / model.scale  # model units per model time
    torch.testing.assert_close(u[last], velocity.expand(12, 2), atol=1e-5, rtol=0)


def test_snapshot_matching_learns_a_translation_and_refuses_a_kinetic_term() -> None:
    from cnf_lib.timecourse import SnapshotMatching

    course = translated_course(n=64)
    with pytest.raises(ValueError, match="kinetic"):
        fit_timecourse(small(course), course, kinetic=0.1, objective=SnapshotMatching(), **RECIPE)
    with pytest.raises(ValueError, match="unknown pairs"):
        SnapshotMatching(pairs="sinkhorn")
    model = small(course)
    h = fit_timecourse(model, course, objective=SnapshotMatching(), seed=1,
                       **{**RECIPE, "iterations": 300, "lr": 1e-2})
    assert h["kinetic_weight"] == 0.0 and all(n == 0 for n in h["nfe_forward"]) and math.isnan(h["nll"][0])
    assert np.mean(h["loss"][-20:]) < 0.2 * np.mean(h["loss"][:20])
    with torch.no_grad():
        moved = model.push(course.snapshots[0], 0.0, 2.0, method="dopri5", rtol=1e-5, atol=1e-5)
    # the population moves by 2 v = (3, -1); each cell follows its own translate
    torch.testing.assert_close(moved.mean(0), course.snapshots[2].mean(0), atol=0.15, rtol=0)
    assert (moved - course.snapshots[2]).norm(dim=1).median() < 0.3


def test_fit_trajectories_by_flow_matching_round_trips_and_names_a_bad_objective(tmp_path) -> None:
    from cnf_lib.timecourse import get_trajectories

    course = translated_course(n=40)
    adata = cells_adata(torch.cat(course.snapshots).numpy(), np.repeat(course.times, 40))
    with pytest.raises(ValueError, match="unknown objective 'mle'"):
        fit_trajectories(adata, n_comps=2, objective="mle", progress=False)
    model = fit_trajectories(adata, n_comps=2, objective="matching", hidden=(16,), iterations=20, progress=False)
    params = adata.uns["trajectory_cnf"]["params"]
    assert params["objective"] == "matching" and params["kinetic"] == 0.0
    path = tmp_path / "fm.h5ad"
    adata.write_h5ad(path)
    again = get_trajectories(ad.read_h5ad(path))
    x = course.snapshots[0][:5]
    torch.testing.assert_close(again.push(x, 0.0, 1.0), model.push(x, 0.0, 1.0))
