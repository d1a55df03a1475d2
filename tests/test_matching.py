"""Tests for cnf_lib.matching: flow matching against closed forms, POT's plan, and the trainer."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from scipy.integrate import quad
from scipy.optimize import linear_sum_assignment
from torch import nn

import cnf_lib.cnf as cnf_module
from cnf_lib import CNF, Trainer
from cnf_lib.fields import ConcatSquashMLP
from cnf_lib.matching import (
    HIGH_DIM_MATCHING,
    TIME_SAMPLINGS,
    TOY_SETTINGS,
    FlowMatching,
    MatchingResult,
    conditional_path,
    field_at_times,
    gaussian_marginal_field,
    gaussian_minimum_loss,
    ot_pairing,
)
from cnf_lib.train import TrainConfig

torch.set_num_threads(1)

MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)


def gaussian_sampler(mean: torch.Tensor = MEAN, cov: torch.Tensor = COV):
    chol = torch.linalg.cholesky(cov)

    def sample(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn(n, mean.shape[0], generator=generator, dtype=torch.float64)
        return (mean + z @ chol.T).float()

    return sample


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor = MEAN, cov: torch.Tensor = COV) -> torch.Tensor:
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(x.double())


# -- the optimal-transport pairing ---------------------------------------------------------------

@pytest.mark.parametrize("n, dim", [(8, 1), (64, 2), (200, 3)])
def test_ot_pairing_is_pots_exact_plan(n: int, dim: int) -> None:
    g = torch.Generator().manual_seed(n)
    x0 = torch.randn(n, dim, generator=g, dtype=torch.float64)
    x1 = 2 * torch.randn(n, dim, generator=g, dtype=torch.float64) + 1
    j = ot_pairing(x0, x1)
    assert sorted(j.tolist()) == list(range(n))  # a permutation
    plan = np.zeros((n, n))
    plan[np.arange(n), j.numpy()] = 1.0 / n
    cost = ot.dist(x0.numpy(), x1.numpy())
    pot_plan = ot.emd(np.full(n, 1 / n), np.full(n, 1 / n), cost, numItermax=10_000_000)
    np.testing.assert_allclose(plan, pot_plan, atol=1e-12)
    # and it is optimal by an independent solver (Hungarian algorithm)
    rows, cols = linear_sum_assignment(cost)
    assert cost[np.arange(n), j.numpy()].sum() == pytest.approx(cost[rows, cols].sum(), rel=1e-10)


def test_ot_pairs_reorder_the_prior_draw() -> None:
    x1 = gaussian_sampler()(128, torch.Generator().manual_seed(1))
    x0_ind, _ = FlowMatching("independent").pair(x1, torch.Generator().manual_seed(5))
    x0_ot, x1_ot = FlowMatching("ot").pair(x1, torch.Generator().manual_seed(5))
    assert torch.equal(x1_ot, x1)
    # the same prior points, reordered so that row i goes with x1[i] optimally
    assert torch.equal(x0_ot[torch.argsort(x0_ot[:, 0])], x0_ind[torch.argsort(x0_ind[:, 0])])
    cost = ot.dist(x0_ind.double().numpy(), x1.double().numpy())
    rows, cols = linear_sum_assignment(cost)
    paired = (x0_ot - x1).double().pow(2).sum(1).sum().item()
    assert paired == pytest.approx(cost[rows, cols].sum(), rel=1e-6)
    assert paired < (x0_ind - x1).double().pow(2).sum().item()


# -- the conditional path and the marginal field of a Gaussian -------------------------------------

@pytest.mark.parametrize("t1", [1.0, 2.5])
def test_conditional_path_closed_form(t1: float) -> None:
    g = torch.Generator().manual_seed(0)
    x0, x1, eps = (torch.randn(5, 2, generator=g) for _ in range(3))
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]) * t1
    xt, ut = conditional_path(x0, x1, t, sigma=0.1, noise=eps, t1=t1)
    s = (t / t1)[:, None]
    torch.testing.assert_close(xt, (1 - s) * x0 + s * x1 + 0.1 * eps)
    torch.testing.assert_close(ut, (x1 - x0) / t1)
    xt0, _ = conditional_path(x0, x1, t, t1=t1)
    torch.testing.assert_close(xt0[0], x0[0])  # the prior at t = 0, the data at t1
    torch.testing.assert_close(xt0[-1], x1[-1])
    # the conditional field is the time derivative of the path
    h = 1e-3
    forward, _ = conditional_path(x0, x1, t + h, t1=t1)
    torch.testing.assert_close((forward - xt0) / h, ut, rtol=1e-3, atol=1e-3)


def test_gaussian_marginal_field_is_the_conditional_mean() -> None:
    """E[u | x_t = x], by regressing u on x_t over many Monte Carlo pairs, is the closed form."""
    g = torch.Generator().manual_seed(3)
    n, s = 400_000, 0.6
    x1 = gaussian_sampler()(n, g).double()
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    xt, ut = conditional_path(x0, x1, torch.full((n,), s, dtype=torch.float64))
    design = torch.cat([xt, torch.ones(n, 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(design, ut).solution  # (3, 2): E[u|x] is affine in x for Gaussians
    probe = torch.tensor([[0.0, 0.0], [1.0, -1.0], [-1.5, 0.5]], dtype=torch.float64)
    fitted = torch.cat([probe, torch.ones(3, 1, dtype=torch.float64)], 1) @ coef
    exact = gaussian_marginal_field(MEAN, COV)(s, probe)
    torch.testing.assert_close(fitted, exact, rtol=0, atol=0.02)


def test_gaussian_marginal_field_carries_the_prior_to_the_data() -> None:
    """The field of the closed form, used by CNF unchanged: log p_1 is N(m, Σ) (prior at 0, data at t1)."""
    for t1 in (1.0, 2.0):
        model = CNF(2, field=gaussian_marginal_field(MEAN, COV, t1=t1), t1=t1, rtol=1e-9, atol=1e-9).double()
        x = gaussian_sampler()(50, torch.Generator().manual_seed(4)).double()
        torch.testing.assert_close(model.log_prob(x), gaussian_log_prob(x), rtol=1e-6, atol=1e-6)
        samples = model.sample(20_000, generator=torch.Generator().manual_seed(5)).double()
        torch.testing.assert_close(samples.mean(0), MEAN, rtol=0, atol=0.03)
        torch.testing.assert_close(torch.cov(samples.T), COV, rtol=0, atol=0.03)


@pytest.mark.parametrize("lam", [0.1, 1.0, 4.0])
def test_gaussian_minimum_loss_closed_form_by_quadrature(lam: float) -> None:
    value, _ = quad(lambda s: lam / ((1 - s) ** 2 + s**2 * lam), 0, 1)
    cov = torch.tensor([[lam]], dtype=torch.float64)
    assert gaussian_minimum_loss(cov) == pytest.approx(value, rel=1e-10)
    assert gaussian_minimum_loss(cov, t1=2.0) == pytest.approx(value / 4, rel=1e-10)


@pytest.mark.parametrize("t1", [1.0, 2.0])
def test_loss_of_the_exact_marginal_field_is_the_known_minimum(t1: float) -> None:
    n = 200_000
    model = CNF(2, field=gaussian_marginal_field(MEAN, COV, t1=t1), t1=t1).double()
    fm = FlowMatching("independent")
    x1 = gaussian_sampler()(n, torch.Generator().manual_seed(6)).double()
    t, xt, ut = fm.regression_targets(x1, torch.Generator().manual_seed(7), t1=t1)
    per_point = (field_at_times(model.field, t, xt) - ut).pow(2).sum(1)
    minimum = gaussian_minimum_loss(COV, t1=t1)
    se = per_point.std().item() / math.sqrt(n)
    assert abs(per_point.mean().item() - minimum) < 4 * se, (per_point.mean().item(), minimum, se)
    # any other field does worse, by exactly its mean squared distance to the marginal field
    exact = field_at_times(model.field, t, xt)
    shifted = (exact + 0.3 - ut).pow(2).sum(1).mean().item()
    assert shifted == pytest.approx(per_point.mean().item() + 2 * 0.3**2, abs=0.01)
    zero = ut.pow(2).sum(1).mean().item()
    assert zero == pytest.approx(minimum + exact.pow(2).sum(1).mean().item(), rel=0.01)


def test_loss_through_the_objective_matches_the_minimum() -> None:
    model = CNF(2, field=gaussian_marginal_field(MEAN, COV)).double()
    fm = FlowMatching("independent")
    batch = gaussian_sampler()(100_000, torch.Generator().manual_seed(8)).double()
    loss, records, result = fm.loss(model, batch, TrainConfig(kinetic=0.0), torch.Generator().manual_seed(9))
    assert loss.item() == pytest.approx(gaussian_minimum_loss(COV), rel=0.02)
    assert math.isnan(records["nll"]) and records["nfe_forward"] == 0
    assert isinstance(result, MatchingResult) and result.nfe_backward == 0


# -- field evaluation with one time per point --------------------------------------------------------

class _SinField(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[0.5, -1.0], [2.0, 0.3]]))

    def forward(self, t, x):
        return torch.sin(3 * t) * (x @ self.w.T) + t


@pytest.mark.parametrize("field", [ConcatSquashMLP(2, (16, 16), "tanh"), ConcatSquashMLP(2, (8,), "softplus"),
                                   _SinField()])
def test_field_at_times_equals_pointwise_calls(field: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    t, x = torch.rand(7, generator=g), torch.randn(7, 2, generator=g)
    expected = torch.cat([field(t[i], x[i:i + 1]) for i in range(7)])
    torch.testing.assert_close(field_at_times(field, t, x), expected, rtol=1e-6, atol=1e-6)


# -- training through the Trainer ---------------------------------------------------------------------

def _fm_trainer(pairs: str, sigma: float = 0.0, iterations: int = 20, seed: int = 0, test=None, **kw) -> Trainer:
    torch.manual_seed(0)
    model = CNF(2, hidden=(16, 16))
    return Trainer(model, gaussian_sampler(), test, objective=FlowMatching(pairs, sigma), kinetic=0.0,
                   iterations=iterations, batch_size=64, lr=1e-2, eval_every=0, seed=seed, progress=False, **kw)


def test_the_loss_never_calls_the_solver(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the flow-matching loss called the ODE solver")

    monkeypatch.setattr(cnf_module, "odeint", refuse)
    monkeypatch.setattr(cnf_module, "odeint_adjoint", refuse)
    for pairs in ("independent", "ot"):
        trainer = _fm_trainer(pairs, sigma=0.05, iterations=5)
        history = trainer.fit()
        assert history["nfe_forward"] == [0] * 5 and history["nfe_backward"] == [0] * 5
        assert all(math.isnan(v) for v in history["nll"])
        assert all(math.isfinite(v) for v in history["loss"])


def test_training_is_seeded_and_resumes_exactly(tmp_path) -> None:
    for pairs, sigma in (("independent", 0.0), ("ot", 0.1)):
        whole = _fm_trainer(pairs, sigma)
        whole.fit()
        again = _fm_trainer(pairs, sigma)
        again.fit()
        assert again.history["loss"] == whole.history["loss"]
        other = _fm_trainer(pairs, sigma, seed=1)
        other.fit()
        assert other.history["loss"] != whole.history["loss"]

        path = tmp_path / f"{pairs}.pt"
        first = _fm_trainer(pairs, sigma, checkpoint_path=path)
        first.fit(until=9)
        first.save(path)
        resumed = _fm_trainer(pairs, sigma, checkpoint_path=path).resume()
        assert resumed.iteration == 9
        resumed.fit()
        assert resumed.history["loss"] == whole.history["loss"]
        for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
            assert torch.equal(a, b)


def test_resuming_with_maximum_likelihood_is_refused(tmp_path) -> None:
    path = tmp_path / "fm.pt"
    trainer = _fm_trainer("independent", iterations=3, checkpoint_path=path)
    trainer.fit()
    torch.manual_seed(0)
    ml = Trainer(CNF(2, hidden=(16, 16)), gaussian_sampler(), kinetic=0.0, iterations=3, batch_size=64, lr=1e-2,
                 eval_every=0, progress=False)
    with pytest.raises(ValueError, match="objective"):
        ml.resume(path)


def test_evaluate_is_the_maximum_likelihood_nll() -> None:
    test = gaussian_sampler()(300, torch.Generator().manual_seed(11))
    trainer = _fm_trainer("independent", iterations=5, test=test)
    trainer.fit()
    expected = -trainer.model.log_prob(test, **trainer.config.eval_settings).mean().item()
    assert trainer.history["test_nll"][-1] == pytest.approx(expected, rel=1e-6)
    assert trainer.history["eval_nfe"][-1] > 0  # the evaluation does solve the ODE


@pytest.mark.parametrize("pairs", ["independent", "ot"])
def test_short_training_learns_the_gaussian(pairs: str) -> None:
    """The trained field, used by CNF unchanged: exact log p close to N(m, Σ), samples moved to the data."""
    torch.manual_seed(0)
    model = CNF(2, hidden=(32, 32))
    Trainer(model, gaussian_sampler(), objective=FlowMatching(pairs), kinetic=0.0, iterations=1000,
            batch_size=256, lr=1e-2, lr_final=1e-4, grad_clip=None, eval_every=0, seed=0, progress=False).fit()
    test = gaussian_sampler()(2000, torch.Generator().manual_seed(12))
    with torch.no_grad():
        logp = model.log_prob(test, trace="exact", rtol=1e-5, atol=1e-5).double()
        hutch = model.log_prob(test, trace="hutchinson", generator=torch.Generator().manual_seed(1))
    truth = gaussian_log_prob(test)
    gap = (truth - logp).mean().item()  # an estimate of KL(data || model) >= 0
    assert -0.02 < gap < 0.03, gap  # measured: 0.013 (independent), 0.006 (OT)
    assert (logp - truth).abs().median() < 0.15  # measured: 0.10, 0.05
    assert abs(hutch.double().mean().item() - logp.mean().item()) < 0.1
    z = torch.randn(5000, 2, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        samples = model.decode(z).double()
        path = model.trajectory(z[:10], torch.linspace(0, 1, 5), rtol=1e-6, atol=1e-6)
        ends = model.decode(z[:10], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(samples.mean(0), MEAN, rtol=0, atol=0.05)
    torch.testing.assert_close(torch.cov(samples.T), COV, rtol=0, atol=0.08)  # measured: within 0.053
    torch.testing.assert_close(path[0], z[:10])
    torch.testing.assert_close(path[-1], ends, rtol=1e-4, atol=1e-4)


# -- bad arguments ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(pairs="sinkhorn"), "unknown pairs"),
    (dict(sigma=-0.1), "sigma"),
    (dict(sigma=float("nan")), "sigma"),
    (dict(sigma="0.1"), "sigma"),
    (dict(sigma=True), "sigma"),
])
def test_bad_objective_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        FlowMatching(**kwargs)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="equal size"):
        ot_pairing(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="columns"):
        ot_pairing(torch.randn(5, 2), torch.randn(5, 3))
    with pytest.raises(ValueError, match="non-finite"):
        ot_pairing(torch.full((3, 2), float("nan")), torch.randn(3, 2))
    with pytest.raises(ValueError, match="noise"):
        conditional_path(torch.randn(3, 2), torch.randn(3, 2), torch.rand(3), sigma=0.1)
    with pytest.raises(ValueError, match="kinetic"):
        Trainer(CNF(2, hidden=(8,)), gaussian_sampler(), objective=FlowMatching(), iterations=2, kinetic=0.05,
                progress=False).fit()  # maximum likelihood's kinetic weight means nothing here
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        FlowMatching.default_config(0)
    with pytest.raises(ValueError, match="unknown times 'early'"):
        FlowMatching(times="early")
    with pytest.raises(ValueError, match="trains a CNF"):
        Trainer(nn.Linear(2, 2), gaussian_sampler(), objective=FlowMatching(), kinetic=0.0, progress=False)
    with pytest.raises(ValueError, match="sampler"):
        Trainer(CNF(2, hidden=(8,)), gaussian_sampler(), gaussian_sampler(), objective=FlowMatching(),
                kinetic=0.0, progress=False)
    with pytest.raises(ValueError, match="positive definite"):
        gaussian_minimum_loss(torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="entries"):
        gaussian_marginal_field(torch.zeros(3), torch.eye(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_draws_the_same_batches_as_the_cpu() -> None:
    losses = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = CNF(2, hidden=(16, 16)).to(device)
        trainer = Trainer(model, gaussian_sampler(), objective=FlowMatching("ot", 0.05), kinetic=0.0,
                          iterations=3, batch_size=64, eval_every=0, progress=False)
        losses[device] = trainer.fit()["loss"]
    np.testing.assert_allclose(losses["cpu"], losses["cuda"], rtol=1e-4)


def test_times_are_uniform_in_two_dimensions_and_late_above_unless_chosen() -> None:
    """The fractions s = t / t1 of 20,000 regression points against the CDFs a and a² (Kolmogorov-
    Smirnov at the 1e-3 level, so a wrong distribution fails and a right one passes on these seeds);
    the prior points and the straight line are the same whatever the times."""
    from scipy import stats

    assert TIME_SAMPLINGS == ("uniform", "late")
    t1, n = 2.0, 20_000
    cdfs = {"uniform": lambda a: a, "late": lambda a: a**2}
    cases = [(2, None, "uniform"), (6, None, "late"), (6, "uniform", "uniform"), (1, "late", "late")]
    for dim, times, expected in cases:
        fm = FlowMatching(times=times)
        assert fm.time_sampling(dim) == expected
        x1 = torch.randn(n, dim, generator=torch.Generator().manual_seed(dim))
        t, xt, ut = fm.regression_targets(x1, torch.Generator().manual_seed(3), t1=t1)
        s = (t / t1).numpy()
        assert 0 <= s.min() and s.max() <= 1
        assert stats.kstest(s, cdfs[expected]).pvalue > 1e-3
        other = "late" if expected == "uniform" else "uniform"
        assert stats.kstest(s, cdfs[other]).pvalue < 1e-3
        x0 = x1 - ut * t1  # u_t = (x1 - x0) / t1 on the straight line x_t = (1 - s) x0 + s x1
        torch.testing.assert_close(xt, (1 - t / t1).unsqueeze(1) * x0 + (t / t1).unsqueeze(1) * x1)
    assert FlowMatching().config() == dict(pairs="independent", sigma=0.0, times=None)


def test_resuming_with_other_pairs_or_sigma_is_refused_by_name(tmp_path) -> None:
    path = tmp_path / "fm.pt"
    _fm_trainer("ot", sigma=0.1, iterations=3, checkpoint_path=path).fit()
    with pytest.raises(ValueError, match=r"pairs: saved 'ot', here 'independent'"):
        _fm_trainer("independent", sigma=0.1, iterations=3).resume(path)
    with pytest.raises(ValueError, match=r"sigma: saved 0.1, here 0.0"):
        _fm_trainer("ot", sigma=0.0, iterations=3).resume(path)


def test_flow_matching_takes_its_own_defaults_by_dimension_and_fields_override_them() -> None:
    x2 = gaussian_sampler()(64, torch.Generator().manual_seed(0))
    x6 = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    # chapter 8's toy settings in 2-D (not maximum likelihood's: no kinetic term, batch 256, 2,000 iterations)
    toy = Trainer(CNF(2, hidden=(8,)), x2, objective=FlowMatching(), progress=False).config
    assert toy == TrainConfig(**TOY_SETTINGS) and toy.kinetic == 0 and toy.iterations == 2000
    # above two dimensions more iterations of more points; a field passed wins
    high = Trainer(CNF(6, hidden=(8,)), x6, objective=FlowMatching(), iterations=3, progress=False)
    assert high.config == TrainConfig(**{**TOY_SETTINGS, **HIGH_DIM_MATCHING, "iterations": 3})
    assert high.config.batch_size == 1024 > TOY_SETTINGS["batch_size"]
    assert len(high.fit()["loss"]) == 3  # runs as is: no kinetic weight to refuse
    # an explicit config is used as given
    given = TrainConfig(iterations=2, batch_size=16, kinetic=0.0)
    assert Trainer(CNF(6, hidden=(8,)), x6, config=given, objective=FlowMatching(), progress=False).config is given


# -- warm_start: flow matching as the start of maximum likelihood ------------------------------------

def test_warm_start_is_the_flow_matching_trainer_of_its_settings_and_brings_a_gaussian_close() -> None:
    from cnf_lib.matching import warm_start

    sample = gaussian_sampler()
    x = sample(2048, torch.Generator().manual_seed(0))
    test = sample(2000, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = CNF(2, hidden=(16, 16))
    before = Trainer(model, x, test, progress=False).evaluate()
    fm = warm_start(model, x, iterations=300, batch_size=256, seed=4, progress=False)
    assert fm.iteration == 300 and all(math.isnan(v) for v in fm.history["nll"])
    torch.manual_seed(0)
    reference = Trainer(CNF(2, hidden=(16, 16)), x, objective=FlowMatching("independent"), progress=False,
                        config=TrainConfig(**{**TOY_SETTINGS, "iterations": 300, "batch_size": 256, "seed": 4}))
    assert reference.fit()["loss"] == fm.history["loss"]
    true_nll = 0.5 * torch.logdet(2 * math.pi * math.e * COV).item()  # the Gaussian's entropy
    after = Trainer(model, x, test, progress=False).evaluate()
    assert before - true_nll > 0.5 and after - true_nll < 0.1
    # maximum likelihood goes on from the warm-started field
    ml = Trainer(model, x, test, iterations=30, batch_size=256, lr=3e-3, eval_every=0, progress=False)
    ml.fit()
    assert ml.history["test_nll"][-1] - true_nll < 0.1


def test_flow_matching_and_warm_start_refuse_a_cnf_with_another_base() -> None:
    from cnf_lib.cnf import GaussianMixtureBase
    from cnf_lib.matching import warm_start

    base = GaussianMixtureBase(torch.ones(1), torch.zeros(1, 2), torch.eye(2).unsqueeze(0))
    x = gaussian_sampler()(64, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="transports N\\(0, I\\) .* another base density"):
        warm_start(CNF(2, hidden=(8,), base=base), x, iterations=2, progress=False)
    with pytest.raises(ValueError, match="another base density"):
        Trainer(CNF(2, hidden=(8,), base=base), x, objective=FlowMatching(), kinetic=0.0, progress=False)
    with pytest.raises(ValueError, match="at least|must be >= 0|iterations must be"):
        warm_start(CNF(2, hidden=(8,)), x, iterations=-1, progress=False)
