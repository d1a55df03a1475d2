"""cnf_lib.saving: one way to save CNF, TrajectoryCNF and CellDensity; mismatches refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cnf_lib import CNF, LinearField
from cnf_lib.saving import load_model, save_model
from cnf_lib.singlecell import fit_density, get_density
from cnf_lib.timecourse import TimeCourse, TrajectoryCNF, fit_timecourse

X = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
EXACT = dict(rtol=1e-6, atol=1e-6)


def test_a_cnf_round_trips_with_its_settings(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CNF(2, hidden=(8, 8), activation="softplus", t1=2.0, trace="hutchinson", rtol=1e-4, atol=1e-4)
    loaded = load_model(save_model(model, tmp_path / "m.pt"))
    assert loaded.config() == model.config()
    assert torch.equal(loaded.log_prob(X, trace="exact"), model.log_prob(X, trace="exact"))


def test_loading_into_another_model_names_every_field_that_differs(tmp_path: Path) -> None:
    path = save_model(CNF(2, hidden=(8,), activation="softplus", t1=1.0), tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"activation: saved 'softplus', here 'tanh'.*t1: saved 1.0, here 3.0"):
        load_model(path, model=CNF(2, hidden=(8,), activation="tanh", t1=3.0))
    with pytest.raises(ValueError, match="holds a CNF, not a TrajectoryCNF"):
        load_model(path, model=TrajectoryCNF([0.0, 1.0], 2, hidden=(8,)))


def test_a_custom_field_loads_into_a_model_built_the_same_way(tmp_path: Path) -> None:
    model = CNF(2, field=LinearField(torch.tensor([[0.1, 0.2], [0.0, -0.3]])))
    path = save_model(model, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="custom field"):
        load_model(path)
    other = CNF(2, field=LinearField(torch.zeros(2, 2)))
    assert torch.equal(load_model(path, model=other).log_prob(X), model.log_prob(X))


def test_bad_files_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="truncated or not a torch file"):
        load_model(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a model saved by cnf_lib"):
        load_model(tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="cannot save"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x.pt")


def test_a_trained_trajectory_model_round_trips(tmp_path: Path) -> None:
    x0 = torch.randn(30, 2, generator=torch.Generator().manual_seed(1))
    course = TimeCourse(np.arange(3.0), [x0 + t for t in range(3)])
    torch.manual_seed(0)
    model = TrajectoryCNF.for_course(course, hidden=(8,))
    fit_timecourse(model, course, iterations=3, batch_size=16, progress=False,
                   train_settings=dict(method="rk4", step_size=0.5))
    loaded = load_model(save_model(model, tmp_path / "t.pt"))
    assert loaded.times == model.times and torch.equal(loaded.center, model.center)
    assert torch.equal(loaded.push(x0, 0.0, 2.0, **EXACT), model.push(x0, 0.0, 2.0, **EXACT))


def test_a_cell_density_round_trips(tmp_path: Path) -> None:
    import anndata as ad

    rng = np.random.default_rng(0)
    adata = ad.AnnData(X=np.zeros((120, 1), dtype=np.float32))
    adata.obsm["X_pca"] = (rng.normal(size=(120, 3)) * [5.0, 1.0, 0.2]).astype(np.float32)
    fit_density(adata, "X_pca", n_comps=2, hidden=(8,), iterations=4, eval_every=2)
    density = get_density(adata)
    loaded = load_model(save_model(density, tmp_path / "d.pt"))
    cells = adata.obsm["X_pca"][:10, :2]
    assert torch.equal(loaded.log_prob(cells), density.log_prob(cells))
    assert loaded.best_iteration == density.best_iteration and loaded.n_comps == 2
