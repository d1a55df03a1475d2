"""The rule for randomness and devices (cnf_lib.checks): draws happen on the generator's device,
then move; every public entry point runs on the model's device. The CUDA tests skip without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnf_lib import CNF, Trainer
from cnf_lib.checks import rademacher, randn, randperm
from cnf_lib.trace import sample_probe

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def draws(monkeypatch):
    """Records (generator device, requested device) of every seeded torch draw."""
    seen = []
    for name in ("randn", "randint", "randperm", "rand"):
        original = getattr(torch, name)

        def spy(*args, _original=original, **kwargs):
            gen = kwargs.get("generator")
            if gen is not None:
                seen.append((gen.device, torch.device(kwargs.get("device") or "cpu")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    return seen


def test_every_seeded_draw_of_a_hutchinson_training_happens_on_the_generators_device(draws) -> None:
    torch.manual_seed(0)
    model = CNF(2, hidden=(8,), trace="hutchinson")
    data = torch.randn(64, 2)
    Trainer(model, data, data[:16], iterations=2, batch_size=16, progress=False, eval_every=1,
            eval_settings=dict(trace="hutchinson")).fit()
    model.sample(4, generator=torch.Generator().manual_seed(0))
    assert len(draws) >= 5  # batches, training probes, evaluation probes, prior draws
    assert all(gen == dev for gen, dev in draws), draws


def test_draws_equal_the_same_seed_drawn_on_the_cpu() -> None:
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(randn((3, 2), g(), torch.float64), torch.randn(3, 2, generator=g(), dtype=torch.float64))
    assert torch.equal(randperm(7, g()), torch.randperm(7, generator=g()))
    probe = sample_probe(torch.zeros(4, 3, dtype=torch.float64), generator=g())
    assert torch.equal(probe, rademacher((4, 3), g(), torch.float64))
    assert set(probe.unique().tolist()) == {-1.0, 1.0}


def test_cnf_trajectory_times_follow_the_points() -> None:
    torch.manual_seed(0)
    model = CNF(2, hidden=(8,)).double()
    out = model.trajectory(torch.zeros(3, 2, dtype=torch.float64), np.array([0.0, 0.5, 1.0]))
    assert out.shape == (3, 3, 2) and out.dtype == torch.float64


# ------------------------------------------------------------------------------------ CUDA


@CUDA
def test_cuda_hutchinson_training_sampling_and_plots_match_the_cpu_seeds() -> None:
    from cnf_lib.plot import density_grid, plot_vector_field

    def run(device: str):
        torch.manual_seed(0)
        model = CNF(2, hidden=(16,), trace="hutchinson").to(device)
        data = torch.randn(128, 2, generator=torch.Generator().manual_seed(1)).to(device)
        trainer = Trainer(model, data, data[:32], iterations=3, batch_size=32, progress=False)
        trainer.fit()
        s = model.sample(8, generator=torch.Generator().manual_seed(0))
        traj = model.trajectory(s, [1.0, 0.5, 0.0])
        return trainer.history["loss"], s, traj, model

    cpu_loss, cpu_s, _, _ = run("cpu")
    cuda_loss, cuda_s, traj, model = run("cuda")
    assert cuda_s.device.type == "cuda" and traj.device.type == "cuda"
    np.testing.assert_allclose(cuda_loss, cpu_loss, rtol=1e-3)  # same batches and probes; float rounding differs
    torch.testing.assert_close(cuda_s.cpu(), cpu_s, rtol=1e-3, atol=1e-3)
    density_grid(model.log_prob, n=8)
    plot_vector_field(model.field, 0.5, n=5)


@CUDA
def test_cuda_single_cell_and_time_course_entry_points() -> None:
    import anndata as ad

    from cnf_lib.baselines import path_error
    from cnf_lib.singlecell import fit_density, get_density
    from cnf_lib.timecourse import fit_trajectories

    rng = np.random.default_rng(0)
    adata = ad.AnnData(X=np.zeros((150, 1), dtype=np.float32))
    adata.obsm["X_pca"] = rng.normal(size=(150, 3)).astype(np.float32)
    adata.obs["time"] = np.repeat([0.0, 1.0, 2.0], 50)
    fit_density(adata, n_comps=2, hidden=(8,), iterations=4, eval_every=2, device="cuda")
    density = get_density(adata).to("cuda")
    assert density.log_prob(adata.obsm["X_pca"][:5, :2]).device.type == "cpu"
    assert density.sample(4, generator=torch.Generator().manual_seed(0)).shape == (4, 2)
    model = fit_trajectories(adata, n_comps=2, hidden=(8,), iterations=2, trace="hutchinson", device="cuda",
                             progress=False, key_added=None)
    x = torch.as_tensor(adata.obsm["X_pca"][:5, :2])
    pushed = model.push(x.cuda(), 0.0, 1.0)
    assert pushed.device.type == "cuda"
    assert path_error(pushed[None], x[None]) >= 0


def test_draws_for_tensors_on_another_device_still_happen_on_the_generators(draws) -> None:
    # "meta" tensors stand in for a GPU: a draw made on the tensors' device with a CPU generator
    # (the bug this rule prevents) would be recorded as ("cpu", "meta")
    from cnf_lib.objectives import MaximumLikelihood
    from cnf_lib.timecourse import SnapshotLikelihood

    g = torch.Generator().manual_seed(0)
    like = torch.empty(6, 3, device="meta")
    assert sample_probe(like, "rademacher", g).device.type == "meta"
    assert sample_probe(like, "gaussian", g).device.type == "meta"
    assert MaximumLikelihood().batch(like, 4, g).shape == (4, 3)
    assert SnapshotLikelihood().batch([like, None, like], 4, g)[0].device.type == "meta"
    assert len(draws) == 5 and all(gen == dev == torch.device("cpu") for gen, dev in draws), draws  # 2 + 1 + 2
