"""Tests for cnf_lib.singlecell on small AnnData objects built here (no scanpy data needed)."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

from cnf_lib import CNF
from cnf_lib.datasets import Standardizer
from cnf_lib.fields import LinearField
from cnf_lib.singlecell import (
    MIN_CELLS_PER_DIM,
    CellDensity,
    check_enough_cells,
    fit_base,
    fit_density,
    get_density,
    get_representation,
    map_to_reference,
    sample_cells,
    score_cells,
    split_cells,
)

torch.set_num_threads(1)

# the classic CNF from N(0, I), trained throughout: these tests are about the training mechanics
FAST = dict(hidden=(16, 16), iterations=30, eval_every=10, lr=1e-2, lr_final=1e-3, base="normal",
            patience=None)


def make_adata(n: int = 240, n_pcs: int = 6, n_genes: int = 12, seed: int = 0) -> ad.AnnData:
    """Two clusters of cells: a PCA-like obsm with very different column scales, a UMAP, labels."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n)
    scales = 10.0 / (1.0 + np.arange(n_pcs))
    pcs = (rng.normal(size=(n, n_pcs)) + 3.0 * label[:, None] * (np.arange(n_pcs) < 2)) * scales
    obs = pd.DataFrame({"cell_type": pd.Categorical(np.where(label == 1, "B", "T"))},
                       index=[f"cell{i}" for i in range(n)])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    x = rng.normal(size=(n, n_genes)).astype(np.float32)
    return ad.AnnData(X=x, obs=obs, var=var,
                      obsm={"X_pca": pcs.astype(np.float32), "X_umap": pcs[:, :2] * 0.5 + 1.0})


@pytest.fixture(scope="module")
def fitted() -> ad.AnnData:
    adata = make_adata()
    fit_density(adata, "X_pca", n_comps=2, seed=0, **FAST)
    return adata


# -- get_representation -----------------------------------------------------------------------


def test_representation_is_a_float64_copy_of_the_leading_columns() -> None:
    adata = make_adata()
    x = get_representation(adata, "X_pca", n_comps=3)
    assert x.dtype == np.float64 and x.shape == (adata.n_obs, 3)
    np.testing.assert_array_equal(x, adata.obsm["X_pca"][:, :3])
    x[:] = 0.0
    assert adata.obsm["X_pca"][:, :3].any()  # not a view
    assert get_representation(adata, "X_pca").shape == (adata.n_obs, 6)


def test_representation_from_a_dataframe_and_from_x() -> None:
    adata = make_adata()
    adata.obsm["X_df"] = pd.DataFrame(adata.obsm["X_pca"][:, :2], index=adata.obs_names)
    np.testing.assert_array_equal(get_representation(adata, "X_df"), adata.obsm["X_pca"][:, :2])
    dense = get_representation(adata, "X")
    adata.X = sparse.csr_matrix(adata.X)
    np.testing.assert_array_equal(get_representation(adata, "X"), dense)


def test_missing_obsm_key_lists_the_existing_ones() -> None:
    with pytest.raises(ValueError, match=r"no key 'X_scvi'.*'X_pca', 'X_umap'"):
        get_representation(make_adata(), "X_scvi")
    adata = make_adata()
    del adata.obsm["X_pca"]
    with pytest.raises(ValueError, match=r"sc\.pp\.pca"):
        get_representation(adata, "X_pca")


def test_nan_in_the_representation_names_the_cell() -> None:
    adata = make_adata()
    adata.obsm["X_pca"][7, 1] = np.nan
    adata.obsm["X_pca"][9, 0] = np.inf
    with pytest.raises(ValueError, match=r"1 cell\(s\) with NaN and 1 with inf.*'cell7'"):
        get_representation(adata, "X_pca", 2)
    with pytest.raises(ValueError, match="NaN"):
        fit_density(adata, "X_pca", 2, **FAST)


def test_bad_n_comps() -> None:
    adata = make_adata()
    with pytest.raises(ValueError, match=r"has 6 columns; n_comps=7"):
        get_representation(adata, "X_pca", 7)
    with pytest.raises(ValueError, match="positive integer"):
        get_representation(adata, "X_pca", 0)
    with pytest.raises(ValueError, match="more than max_dim=4: pass n_comps"):
        get_representation(adata, "X_pca", max_dim=4)


def test_x_with_too_many_genes_asks_for_a_reduction() -> None:
    adata = make_adata(n_genes=200)
    for x in (adata.X, sparse.csr_matrix(adata.X)):
        adata.X = x
        with pytest.raises(ValueError, match=r"200 variables.*sc\.pp\.pca.*use_rep='X_pca'"):
            get_representation(adata, "X")


def test_x_with_raw_counts_or_no_x_or_n_comps() -> None:
    adata = make_adata()
    counts = np.random.default_rng(0).poisson(3.0, size=adata.shape)
    for x in (counts, counts.astype(np.float32), sparse.csr_matrix(counts.astype(np.float32))):
        adata.X = x
        with pytest.raises(ValueError, match=r"raw counts.*log1p"):
            get_representation(adata, "X")
    with pytest.raises(ValueError, match="no meaning for use_rep='X'"):
        get_representation(make_adata(), "X", n_comps=3)
    bare = ad.AnnData(obs=pd.DataFrame(index=["a", "b"]), obsm={"X_pca": np.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"adata.X is None.*'X_pca'"):
        get_representation(bare, "X")


def test_not_an_anndata() -> None:
    with pytest.raises(ValueError, match="must be an AnnData"):
        get_representation(np.zeros((10, 2)), "X")


def test_too_few_cells_for_the_dimension() -> None:
    check_enough_cells(MIN_CELLS_PER_DIM * 3, 3)
    adata = make_adata(n=40)
    # 40 cells, 20% held out for validation: 32 training cells for 5 dimensions.
    with pytest.raises(ValueError, match=r"only 32 training cells for a 5-dimensional.*n_comps"):
        fit_density(adata, "X_pca", n_comps=5, **FAST)


def test_bad_settings() -> None:
    adata = make_adata()
    with pytest.raises(ValueError, match="validation_fraction"):
        fit_density(adata, validation_fraction=0.9, **FAST)
    with pytest.raises(ValueError, match="patience"):
        fit_density(adata, **{**FAST, "patience": 0})
    with pytest.raises(ValueError, match="unknown solver setting"):
        fit_density(adata, n_comps=2, solver=dict(tolerance=1e-3), **FAST)


# -- the density: units, closed forms ---------------------------------------------------------


def test_log_prob_includes_the_standardization_jacobian() -> None:
    """A zero field leaves N(0, I) in z; in x = m + s z that is N(m, diag(s^2)) exactly."""
    mean, std = torch.tensor([5.0, -2.0, 0.5]), torch.tensor([10.0, 0.1, 2.0])
    model = CNF(3, field=LinearField(torch.zeros(3, 3)))
    density = CellDensity(model=model, standardizer=Standardizer(mean, std))
    x = mean + std * torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.distributions.Normal(mean.double(), std.double()).log_prob(x.double()).sum(1)
    torch.testing.assert_close(density.log_prob(x), expected, rtol=1e-5, atol=1e-5)


def test_log_prob_and_samples_of_a_linear_flow_match_the_gaussian() -> None:
    """f(t, x) = A x maps N(0, I) to N(0, M M^T), M = e^A; standardized, to N(m, S M M^T S)."""
    gen = torch.Generator().manual_seed(1)
    a = 0.4 * torch.randn(2, 2, generator=gen)
    mean, std = torch.tensor([3.0, -1.0]), torch.tensor([4.0, 0.5])
    model = CNF(2, field=LinearField(a)).double()
    density = CellDensity(model=model, standardizer=Standardizer(mean, std))
    m = torch.linalg.matrix_exp(a.double())
    s = torch.diag(std.double())
    target = torch.distributions.MultivariateNormal(mean.double(), s @ m @ m.T @ s)
    torch.manual_seed(0)
    x = target.sample((40,))
    expected = target.log_prob(x)
    # at the default solver tolerance (1e-5), then at a tight one
    torch.testing.assert_close(density.log_prob(x), expected, rtol=1e-4, atol=1e-4)
    tight = density.log_prob(x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tight, expected, rtol=1e-8, atol=1e-8)

    samples = density.sample(20000, generator=torch.Generator().manual_seed(2))
    assert samples.shape == (20000, 2) and samples.dtype == torch.float64
    cov = target.covariance_matrix
    se = (cov.diagonal() / 20000).sqrt()
    assert ((samples.mean(0) - mean.double()).abs() < 5 * se).all()
    atol = 0.05 * cov.abs().max().item()
    torch.testing.assert_close(torch.cov(samples.T), cov, rtol=0.05, atol=atol)


# -- fit, score, sample -----------------------------------------------------------------------


def test_fit_stores_the_density_and_the_split(fitted: ad.AnnData) -> None:
    uns = fitted.uns["cnf"]
    assert uns["params"]["use_rep"] == "X_pca" and uns["params"]["n_comps"] == 2
    split = fitted.obs["cnf_split"]
    assert list(split.cat.categories) == ["train", "validation"]
    assert (split == "validation").sum() == round(0.2 * fitted.n_obs)
    density = get_density(fitted)
    assert isinstance(density, CellDensity) and density.dim == 2
    # The standardization is that of the training cells.
    train = get_representation(fitted[split == "train"], "X_pca", 2)
    np.testing.assert_allclose(density.standardizer.mean.numpy(), train.mean(0), rtol=1e-10)
    np.testing.assert_allclose(density.standardizer.std.numpy(), train.std(0), rtol=1e-10)


def test_the_best_validation_state_is_kept(fitted: ad.AnnData) -> None:
    density = get_density(fitted)
    h = density.history
    assert h["eval_iteration"] == [10, 20, 30]
    best = int(np.argmin(h["validation_nll"]))
    assert density.best_iteration == h["eval_iteration"][best]
    val = fitted[fitted.obs["cnf_split"] == "validation"]
    nll = -density.log_prob(get_representation(val, "X_pca", 2)).mean().item()
    assert nll == pytest.approx(h["validation_nll"][best], abs=2e-4)
    assert h["validation_nll"][best] < h["validation_nll"][0] or best == 0


def test_patience_stops_after_that_many_evaluations_without_improvement() -> None:
    adata = make_adata()
    fit_density(adata, n_comps=2, seed=0, **{**FAST, "patience": 1, "iterations": 200, "lr": 5e-2,
                                                           "lr_final": 5e-2})
    h = get_density(adata).history
    best = int(np.argmin(h["validation_nll"]))
    assert len(h["eval_iteration"]) < 20  # it stopped early (200 iterations, eval every 10)...
    assert len(h["eval_iteration"]) - 1 - best == 1  # ...one evaluation after the best
    assert h["validation_nll"][-1] >= h["validation_nll"][best]
    assert get_density(adata).best_iteration == h["eval_iteration"][best]


def test_scores_are_in_the_units_of_the_representation(fitted: ad.AnnData) -> None:
    out = score_cells(fitted, copy=True)
    assert "cnf_log_likelihood" not in fitted.obs and "cnf_log_likelihood" in out.obs
    density = get_density(fitted)
    x = get_representation(fitted, "X_pca", 2)
    with torch.no_grad():
        z = density.standardizer.transform(torch.as_tensor(x)).float()
        direct = density.model.log_prob(z, trace="exact", rtol=1e-5, atol=1e-5).double()
    expected = direct - density.standardizer.std.log().sum()
    scores = out.obs["cnf_log_likelihood"].to_numpy()
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-6, atol=1e-6)
    assert abs(density.standardizer.log_abs_det()) > 1.0  # the Jacobian term matters here


def test_a_trained_density_beats_a_gaussian_on_held_out_cells() -> None:
    """Two separated clusters along PC 1: the CNF's held-out NLL must be well below one Gaussian's
    and not below the true mixture's (up to sampling noise)."""
    rng = np.random.default_rng(3)
    n, scale = 600, np.array([10.0, 0.5])
    centre = np.where(rng.random(n) < 0.5, -4.0, 4.0)
    z = rng.normal(size=(n, 2)) + np.stack([centre, np.zeros(n)], 1)
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n)])
    adata = ad.AnnData(obs=obs, obsm={"X_pca": z * scale})
    train, test = split_cells(adata, 0.25, seed=0)
    fit_density(train, n_comps=2, hidden=(32, 32), iterations=150, eval_every=50, lr=1e-2,
                lr_final=1e-3)
    score_cells(test, density=get_density(train))
    cnf_nll = -test.obs["cnf_log_likelihood"].mean()
    x_train, x_test = train.obsm["X_pca"], test.obsm["X_pca"]
    gauss = torch.distributions.MultivariateNormal(torch.as_tensor(x_train.mean(0)),
                                                   torch.as_tensor(np.cov(x_train.T)))
    gauss_nll = -gauss.log_prob(torch.as_tensor(x_test)).mean().item()
    u = torch.as_tensor(x_test / scale)
    comp = torch.distributions.Normal(torch.tensor([-4.0, 4.0], dtype=torch.float64), 1.0)
    log_p1 = torch.logsumexp(comp.log_prob(u[:, :1]), 1) - math.log(2)
    log_p2 = torch.distributions.Normal(0.0, 1.0).log_prob(u[:, 1])
    true_nll = -(log_p1 + log_p2 - np.log(scale).sum()).mean().item()
    assert gauss_nll - true_nll > 0.6  # the test is not trivial
    assert true_nll - 0.1 < cnf_nll < gauss_nll - 0.4, (true_nll, cnf_nll, gauss_nll)


def test_score_cells_key_added_and_other_cells(fitted: ad.AnnData) -> None:
    other = make_adata(n=50, seed=5)
    score_cells(other, density=get_density(fitted), key_added="density")
    assert other.obs["density"].shape == (50,) and np.isfinite(other.obs["density"]).all()
    one_column = ad.AnnData(obs=pd.DataFrame(index=["a"]), obsm={"X_pca": np.zeros((1, 1))})
    with pytest.raises(ValueError, match="has 1 columns; n_comps=2"):
        score_cells(one_column, density=get_density(fitted))
    all_columns = get_density(fitted)
    all_columns.n_comps = None
    with pytest.raises(ValueError, match="fitted to 2 columns of 'X_pca'; this AnnData gives 6"):
        score_cells(make_adata(), density=all_columns)
    with pytest.raises(ValueError, match=r"no 'cnf': fit a density first"):
        score_cells(make_adata())


def test_fit_is_seeded_and_copy_follows_scanpy(fitted: ad.AnnData) -> None:
    adata = make_adata()
    assert fit_density(adata, n_comps=2, seed=0, **FAST) is None
    for k, v in fitted.uns["cnf"]["state_dict"].items():
        np.testing.assert_array_equal(adata.uns["cnf"]["state_dict"][k], v)
    fresh = make_adata()
    out = fit_density(fresh, n_comps=2, seed=1, key_added="cnf1", copy=True, **FAST)
    assert "cnf1" in out.uns and "cnf1_split" in out.obs
    assert "cnf1" not in fresh.uns and "cnf1_split" not in fresh.obs
    assert not np.array_equal(out.uns["cnf1"]["state_dict"]["field.layers.0.linear.weight"],
                              fitted.uns["cnf"]["state_dict"]["field.layers.0.linear.weight"])


def test_the_density_survives_h5ad(fitted: ad.AnnData, tmp_path) -> None:
    before = score_cells(fitted, copy=True).obs["cnf_log_likelihood"].to_numpy()
    path = tmp_path / "cells.h5ad"
    fitted.write_h5ad(path)
    back = ad.read_h5ad(path)
    score_cells(back)
    np.testing.assert_array_equal(back.obs["cnf_log_likelihood"].to_numpy(), before)
    assert get_density(back).history["eval_iteration"] == [10, 20, 30]


def test_sample_cells(fitted: ad.AnnData) -> None:
    a = sample_cells(fitted, 300, seed=4)
    b = sample_cells(get_density(fitted), 300, seed=4)
    assert a.obsm["X_pca"].shape == (300, 2) and a.n_vars == 0
    assert list(a.obs_names[:2]) == ["sample-0", "sample-1"]
    np.testing.assert_array_equal(a.obsm["X_pca"], b.obsm["X_pca"])
    assert not np.array_equal(a.obsm["X_pca"], sample_cells(fitted, 300, seed=5).obsm["X_pca"])
    # The samples are in the original units: their spread is that of the data, not ~1.
    real = get_representation(fitted, "X_pca", 2)
    ratio = a.obsm["X_pca"].std(0) / real.std(0)
    assert ((ratio > 0.6) & (ratio < 1.6)).all(), ratio
    score_cells(a)  # samples can be scored like cells
    with pytest.raises(ValueError, match="positive integer"):
        sample_cells(fitted, 0)


def test_fit_on_x_keeps_the_genes() -> None:
    adata = make_adata(n=200, n_genes=3)
    fit_density(adata, "X", **FAST)  # n_comps (default 5) is ignored for .X, as in scanpy
    new = sample_cells(adata, 10)
    assert new.X.shape == (10, 3) and list(new.var_names) == list(adata.var_names)
    renamed = adata.copy()
    renamed.var_names = ["a", "b", "c"]
    with pytest.raises(ValueError, match="var_names differ"):
        score_cells(renamed, density=get_density(adata))


# -- helpers ----------------------------------------------------------------------------------


def test_map_to_reference() -> None:
    ref = make_adata(n=100)
    same = ref.copy()
    del same.obsm["X_umap"]
    map_to_reference(same, ref, "X_pca", 2, obs=["cell_type"], obsm=["X_umap"], n_neighbors=1)
    np.testing.assert_allclose(same.obsm["X_umap"], ref.obsm["X_umap"])
    assert (same.obs["cell_type"] == ref.obs["cell_type"]).all()
    assert (same.obs["cell_type_agreement"] == 1.0).all()
    # With k neighbours the embedding is the mean of theirs.
    q = ad.AnnData(obs=pd.DataFrame(index=["q"]), obsm={"X_pca": ref.obsm["X_pca"][:1, :2] + 1e-3})
    out = map_to_reference(q, ref, "X_pca", 2, obsm=["X_umap"], n_neighbors=5, copy=True)
    d = np.linalg.norm(ref.obsm["X_pca"][:, :2] - q.obsm["X_pca"], axis=1)
    np.testing.assert_allclose(out.obsm["X_umap"][0], ref.obsm["X_umap"][np.argsort(d)[:5]].mean(0))
    with pytest.raises(ValueError, match=r"no column 'louvain'.*'cell_type'"):
        map_to_reference(q, ref, "X_pca", 2, obs=["louvain"])


def test_split_cells() -> None:
    adata = make_adata(n=101)
    train, test = split_cells(adata, 0.2, seed=1)
    assert (train.n_obs, test.n_obs) == (81, 20)
    assert set(train.obs_names).isdisjoint(test.obs_names)
    assert set(train.obs_names) | set(test.obs_names) == set(adata.obs_names)
    again = split_cells(adata, 0.2, seed=1)[1]
    assert list(again.obs_names) == list(test.obs_names)
    with pytest.raises(ValueError, match="test_fraction"):
        split_cells(adata, 1.0)
    assert math.isfinite(train.obsm["X_pca"].sum())


def test_fit_density_warns_when_the_best_validation_point_is_the_last() -> None:
    adata = make_adata()
    with pytest.warns(UserWarning, match="undertrained"):
        fit_density(adata, "X_pca", n_comps=2, seed=0, hidden=(16, 16), iterations=20, eval_every=10,
                    lr=1e-3, lr_final=1e-3, progress=False, base="normal")


# -- the default: a CNF on a Gaussian-mixture base --------------------------------------------


@pytest.fixture(scope="module")
def on_mixture() -> ad.AnnData:
    adata = make_adata()
    fit_density(adata, "X_pca", n_comps=2, seed=0, hidden=(16, 16), iterations=30, eval_every=10,
                progress=False)
    return adata


def test_the_mixture_base_is_the_first_candidate(on_mixture: ad.AnnData) -> None:
    """Evaluation 0 is the base alone (a zero field): its validation NLL is the mixture's own, computed
    here with scikit-learn's formula for the fitted weights, means and covariances."""
    density = get_density(on_mixture)
    base, h = density.model.base, density.history
    assert base is not None and density.train_config["base"] == "mixture"
    assert density.train_config["base_components"] == base.components >= 2  # two clusters
    assert h["eval_iteration"][0] == 0
    val = get_representation(on_mixture[on_mixture.obs["cnf_split"] == "validation"], "X_pca", 2)
    z = density.standardizer.transform(torch.as_tensor(val))
    w, mu = base.log_weights.double().exp(), base.means.double()
    cov = base.cholesky.double() @ base.cholesky.double().transpose(1, 2)
    comps = [torch.distributions.MultivariateNormal(mu[k], cov[k]).log_prob(z) + w[k].log()
             for k in range(base.components)]
    mixture_nll = -(torch.logsumexp(torch.stack(comps), 0) + density.standardizer.log_abs_det()).mean()
    assert h["validation_nll"][0] == pytest.approx(mixture_nll.item(), abs=1e-4)
    assert min(h["validation_nll"]) <= h["validation_nll"][0]
    best = int(np.argmin(h["validation_nll"]))
    assert density.best_iteration == h["eval_iteration"][best]


def test_a_mixture_base_density_round_trips(on_mixture: ad.AnnData, tmp_path) -> None:
    density = get_density(on_mixture)
    cells = get_representation(on_mixture, "X_pca", 2)[:20]
    before = density.log_prob(cells)
    assert torch.equal(CellDensity.from_uns(density.to_uns()).log_prob(cells), before)
    assert torch.equal(CellDensity.from_saved(*density.save_state()).log_prob(cells), before)
    path = tmp_path / "cells.h5ad"
    on_mixture.write_h5ad(path)
    back = get_density(ad.read_h5ad(path))
    assert torch.equal(back.log_prob(cells), before)
    assert back.model.base.components == density.model.base.components
    a = sample_cells(back, 50, seed=3).obsm["X_pca"]
    np.testing.assert_array_equal(a, sample_cells(density, 50, seed=3).obsm["X_pca"])


def test_fit_base_chooses_components_by_validation_nll() -> None:
    """Three well separated clusters: a mixture of 4 (the doubling after 2) fits them; 1 does not."""
    rng = np.random.default_rng(0)
    centres = np.array([[-6.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    z = centres[rng.integers(0, 3, 3000)] + rng.normal(size=(3000, 2))
    z_val = centres[rng.integers(0, 3, 600)] + rng.normal(size=(600, 2))
    assert fit_base(z, "normal") is None
    assert fit_base(z, "gaussian").components == 1
    assert fit_base(z, "mixture", z_val=z_val).components == 4
    assert fit_base(z, "mixture", max_components=2, z_val=z_val).components == 2
    assert fit_base(z[:40], "mixture", z_val=z_val).components == 2  # 40 points: at most 40 / (10 D)


def test_bad_base_settings_are_refused() -> None:
    adata = make_adata()
    with pytest.raises(ValueError, match=r"base must be one of \('normal', 'gaussian', 'mixture'\)"):
        fit_density(adata, n_comps=2, base="flow")
    with pytest.raises(ValueError, match="max_components must be a positive integer"):
        fit_density(adata, n_comps=2, max_components=0)
