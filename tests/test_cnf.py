"""cnf_lib.cnf: log-densities against closed forms, round trips, settings, NFE, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from test_fields import Opaque  # a field without its own divergence methods
from torch import nn

import cnf_lib.cnf as cnf_module
from cnf_lib import CNF, SolverError
from cnf_lib.cnf import standard_normal_log_prob
from cnf_lib.fields import ConcatSquashMLP, LinearField

TIGHT = dict(rtol=1e-8, atol=1e-8)


def gaussian_log_prob(x: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    return torch.distributions.MultivariateNormal(torch.zeros(cov.shape[0], dtype=cov.dtype), cov).log_prob(x)


@pytest.fixture
def A() -> torch.Tensor:
    return 0.5 * torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_linear_cnf_density_is_the_pushforward_gaussian(A: torch.Tensor, trace: str) -> None:
    # z ~ N(0, I) at t = 0, x = exp(t1 A) z, so x ~ N(0, M Mᵀ) with M = exp(t1 A).
    t1 = 0.8
    model = CNF(3, field=LinearField(A), t1=t1, trace=trace, **TIGHT).double()
    x = torch.randn(64, 3, dtype=torch.float64)
    M = torch.linalg.matrix_exp(t1 * A)
    expected = gaussian_log_prob(x, M @ M.T)
    # Hutchinson is exact for this field only in expectation; with the exact trace it is exact.
    got = model.log_prob(x, trace="exact")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_delta_logp_of_linear_field_is_minus_t_trace(A: torch.Tensor) -> None:
    model = CNF(3, field=LinearField(A), **TIGHT).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    for t in (0.3, 1.0, 2.0):
        res = model.flow(x, t, 0.0)
        torch.testing.assert_close(res.delta_logp, torch.full((5,), -t * A.trace().item(), dtype=torch.float64))


def test_hutchinson_log_prob_is_unbiased_on_linear_field(A: torch.Tensor) -> None:
    model = CNF(3, field=LinearField(A), trace="hutchinson", probe="gaussian", **TIGHT).double()
    x = torch.randn(1, 3, dtype=torch.float64).expand(20_000, 3)
    exact = model.log_prob(x[:1], trace="exact")
    est = model.log_prob(x, generator=torch.Generator().manual_seed(0))
    se = est.std().item() / math.sqrt(est.numel())
    assert abs(est.mean().item() - exact.item()) < 4 * se
    assert est.std().item() > 0  # it is an estimate, not the exact value


def test_regularizers_on_scaled_identity_have_closed_forms() -> None:
    a, t, D = 0.7, 1.3, 2
    model = CNF(D, field=LinearField(a * torch.eye(D, dtype=torch.float64)), t1=t, **TIGHT).double()
    x = torch.randn(6, D, dtype=torch.float64)
    _, res = model.log_prob_result(x, regularize=True)
    # backwards from x at t: x(s) = exp(a (s - t)) x, so ∫_0^t ‖a x(s)‖² ds = a ‖x‖² (1 - e^{-2at}) / 2
    kinetic = a * x.pow(2).sum(1) * (1 - math.exp(-2 * a * t)) / 2
    torch.testing.assert_close(res.kinetic, kinetic, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(res.frobenius, torch.full((6,), a * a * D * t, dtype=torch.float64))


def test_hutchinson_frobenius_regularizer_is_unbiased(A: torch.Tensor) -> None:
    model = CNF(3, field=LinearField(A), trace="hutchinson", probe="rademacher", **TIGHT).double()
    x = torch.randn(1, 3, dtype=torch.float64).expand(20_000, 3)
    _, res = model.log_prob_result(x, regularize=True, generator=torch.Generator().manual_seed(1))
    exact = model.log_prob_result(x[:1], regularize=True, trace="exact")[1].frobenius
    se = res.frobenius.std().item() / math.sqrt(res.frobenius.numel())
    assert abs(res.frobenius.mean().item() - exact.item()) < 4 * se


def test_encode_decode_round_trip_shrinks_with_tolerance() -> None:
    torch.manual_seed(0)
    model = CNF(2, hidden=(32, 32), activation="tanh").double()
    x = torch.randn(200, 2, dtype=torch.float64)
    errors = []
    for tol in (1e-3, 1e-6, 1e-9):
        back = model.decode(model.encode(x, rtol=tol, atol=tol), rtol=tol, atol=tol)
        errors.append((back - x).abs().max().item())
    assert errors[-1] < 1e-6
    assert errors[0] > errors[1] > errors[2]


def test_probe_is_fixed_within_a_solve_and_redrawn_between(monkeypatch: pytest.MonkeyPatch) -> None:
    # the probe reaches either the field's own estimator (forward mode) or the VJP one (redraw_probe)
    seen: list[torch.Tensor] = []
    original = cnf_module.divergence_hutchinson
    original_field = ConcatSquashMLP.divergence_hutchinson

    def spy(f, x, probe, create_graph=True):
        seen.append(probe.clone())
        return original(f, x, probe, create_graph)

    def field_spy(self, t, x, probe, frobenius=True):
        seen.append(probe.clone())
        return original_field(self, t, x, probe, frobenius)

    monkeypatch.setattr(cnf_module, "divergence_hutchinson", spy)
    monkeypatch.setattr(ConcatSquashMLP, "divergence_hutchinson", field_spy)
    model = CNF(2, hidden=(16,), trace="hutchinson")
    x = torch.randn(10, 2)
    g = torch.Generator().manual_seed(0)
    model.log_prob(x, generator=g)
    first = list(seen)
    seen.clear()
    model.log_prob(x, generator=g)
    assert len(first) > 2 and all(torch.equal(p, first[0]) for p in first)
    assert all(torch.equal(p, seen[0]) for p in seen)
    assert not torch.equal(first[0], seen[0])
    seen.clear()
    model.log_prob(x, generator=g, redraw_probe=True)
    assert not all(torch.equal(p, seen[0]) for p in seen)


def test_per_call_overrides_do_not_change_the_model(A: torch.Tensor) -> None:
    model = CNF(3, field=LinearField(A), trace="hutchinson", rtol=1e-3, atol=1e-3).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    a = model.log_prob(x, trace="exact", rtol=1e-7, atol=1e-7)
    b = model.log_prob(x, trace="exact", rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(a, b)
    assert model.settings.trace == "hutchinson" and model.settings.rtol == 1e-3
    with pytest.raises(ValueError, match="unknown solver setting"):
        model.log_prob(x, tolerance=1e-3)
    with pytest.raises(ValueError, match="unknown trace"):
        model.log_prob(x, trace="approximate")


def test_sample_trajectory_and_decode_agree() -> None:
    torch.manual_seed(0)
    model = CNF(2, hidden=(16, 16))
    s1 = model.sample(50, generator=torch.Generator().manual_seed(4))
    s2 = model.sample(50, generator=torch.Generator().manual_seed(4))
    assert torch.equal(s1, s2)
    z = torch.randn(50, 2, generator=torch.Generator().manual_seed(4))
    traj = model.trajectory(z, torch.linspace(0, 1, 5))
    assert traj.shape == (5, 50, 2)
    torch.testing.assert_close(traj[0], z)
    torch.testing.assert_close(traj[-1], s1, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="monotone|increasing"):
        model.trajectory(z, [0.0, 0.5, 0.2])


def test_adjoint_gradients_equal_direct_gradients_and_count_backward_nfe() -> None:
    torch.manual_seed(0)
    model = CNF(2, hidden=(16, 16), rtol=1e-7, atol=1e-7).double()
    x = torch.randn(32, 2, dtype=torch.float64)
    grads, nfe_b = [], []
    for adjoint in (False, True):
        model.zero_grad()
        logp, res = model.log_prob_result(x, adjoint=adjoint)
        (-logp.mean()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        nfe_b.append(res.nfe_backward)
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-4, atol=1e-6)
    assert nfe_b[0] == 0 and nfe_b[1] > 0


def test_standard_normal_log_prob() -> None:
    z = torch.randn(10, 4, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(standard_normal_log_prob(z), expected)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.randn(5), "2-D|shape"),
        (torch.randn(2, 5, 2), "2-D|shape"),
        (torch.randn(0, 2), "empty"),
        (torch.tensor([[0.0, float("nan")]]), "NaN"),
        (torch.tensor([[0.0, float("inf")]]), "inf"),
        (torch.randn(4, 3), "dim|column|dimension"),
    ],
)
def test_bad_input_raises_a_clear_value_error(bad: torch.Tensor, match: str) -> None:
    model = CNF(2, hidden=(8,))
    with pytest.raises(ValueError, match=match):
        model.log_prob(bad)


def test_solver_failure_is_a_clear_error() -> None:
    class Exploding(nn.Module):
        def forward(self, t, x):
            return x.pow(2) * 1e3

    model = CNF(1, field=Exploding(), max_num_steps=50)
    with pytest.raises(SolverError, match="max_num_steps|underflow|not finite"):
        model.decode(torch.ones(3, 1))


# -- chapter 5: regularizers, error control, seminorm adjoint ------------------------------------


class PlainLinear(nn.Module):
    """``x Aᵀ`` without a ``divergence`` method, so the CNF uses the vector-Jacobian products."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(A.detach().clone())

    def forward(self, t, x):
        return x @ self.A.T


@pytest.mark.parametrize("field_cls", [LinearField, PlainLinear])
def test_regularizers_on_a_general_linear_field_have_closed_forms(A: torch.Tensor, field_cls) -> None:
    t = 0.9
    model = CNF(3, field=field_cls(A), t1=t, **TIGHT).double()
    x = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _, res = model.log_prob_result(x, regularize=True, trace="exact")
    # ‖∂f/∂x‖²_F = ‖A‖²_F at every point and time
    torch.testing.assert_close(res.frobenius, torch.full((7,), t * A.pow(2).sum().item(), dtype=torch.float64))
    # x(s) = exp(-(t - s) A) x, so ∫_0^t ‖A x(s)‖² ds, by Simpson's rule on the closed-form path
    s = torch.linspace(0.0, t, 401, dtype=torch.float64)
    paths = torch.stack([x @ torch.linalg.matrix_exp(-(t - si) * A).T @ A.T for si in s])  # (S, n, D)
    speed2 = paths.pow(2).sum(-1)
    w = torch.ones(401, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    kinetic = (w[:, None] * speed2).sum(0) * (t / 400) / 3
    torch.testing.assert_close(res.kinetic, kinetic, rtol=1e-7, atol=1e-9)


def test_hutchinson_frobenius_reuses_the_trace_vjp(monkeypatch: pytest.MonkeyPatch) -> None:
    # the Frobenius estimate must not cost a second backward pass per function evaluation
    calls = {"n": 0}
    original = torch.autograd.grad

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    torch.manual_seed(0)
    model = CNF(2, hidden=(16, 16), trace="hutchinson")
    model.field = Opaque(model.field)  # the VJP route (the field's own estimator needs no autograd.grad)
    x = torch.randn(32, 2)
    per_eval = []
    for regularize in (False, True):
        calls["n"] = 0
        _, res = model.log_prob_result(x, regularize=regularize, generator=torch.Generator().manual_seed(0))
        per_eval.append(calls["n"] / res.nfe_forward)
    assert per_eval[0] == per_eval[1] <= 1


class FixedPointField(nn.Module):
    """``f(t, x) = c sin(ωt) x``: points at 0 never move, but the divergence ``2 c sin(ωt)`` oscillates."""

    def __init__(self, c: float = 20.0, omega: float = 15.0) -> None:
        super().__init__()
        self.c, self.omega = c, omega

    def forward(self, t, x):
        return self.c * torch.sin(self.omega * t) * x


def test_error_control_decides_whether_log_p_sets_the_step_size() -> None:
    field = FixedPointField()
    model = CNF(2, field=field, rtol=1e-6, atol=1e-6).double()
    x = torch.zeros(4, 2, dtype=torch.float64)
    # Δ(0) = -∫_0^1 2 c sin(ω s) ds = -2 c (1 - cos ω) / ω
    exact = -2 * field.c * (1 - math.cos(field.omega)) / field.omega
    nfe, err = {}, {}
    for control in ("mixed", "state_only", "joint"):
        res = model.flow(x, 1.0, 0.0, error_control=control)
        nfe[control] = res.nfe_forward
        err[control] = (res.delta_logp - exact).abs().max().item()
    # x never moves, so x alone lets the solver take the largest steps and log p comes out wrong
    assert nfe["state_only"] < nfe["mixed"] and err["state_only"] > 100 * err["mixed"]
    assert err["mixed"] < 1e-4 and err["joint"] < 1e-4
    assert nfe["joint"] <= nfe["mixed"]  # the joint RMS dilutes log p's error over D + 1 entries


class OscillatingBias(nn.Module):
    """``f(t, x) = A x + b sin(ωt)`` with a tiny ``b``: x barely feels ``b``, but the adjoint of ``b``,
    ``∫ aᵀ sin(ωt) dt``, oscillates, so only the parameter states need small backward steps."""

    def __init__(self, omega: float = 50.0) -> None:
        super().__init__()
        self.A = nn.Parameter(0.3 * torch.randn(2, 2, generator=torch.Generator().manual_seed(0)))
        self.b = nn.Parameter(torch.full((2,), 1e-6))
        self.omega = omega

    def forward(self, t, x):
        return x @ self.A.T + self.b * torch.sin(self.omega * t)


def test_seminorm_adjoint_leaves_the_parameter_states_out_of_step_control() -> None:
    model = CNF(2, field=OscillatingBias(), rtol=1e-5, atol=1e-5).double()
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def gradient(**overrides):
        model.zero_grad()
        logp, res = model.log_prob_result(x, **overrides)
        (-logp.mean()).backward()
        return model.field.A.grad.clone(), res.nfe_backward

    reference, _ = gradient(rtol=1e-9, atol=1e-9)
    grad_full, nfe_full = gradient(adjoint=True)
    grad_semi, nfe_semi = gradient(adjoint=True, adjoint_seminorm=True)
    # the default adjoint norm follows the oscillating parameter adjoint; the seminorm ignores it
    assert nfe_semi < nfe_full / 2
    # the gradient of A (a smooth integrand) is as accurate either way
    torch.testing.assert_close(grad_full, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_semi, reference, rtol=1e-4, atol=1e-4)


def test_seminorm_adjoint_keeps_the_solver_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    original = cnf_module.odeint_adjoint

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(cnf_module, "odeint_adjoint", spy)
    model = CNF(2, hidden=(8,), adjoint=True, adjoint_seminorm=True, max_num_steps=123)
    model.log_prob(torch.randn(5, 2))
    assert seen["adjoint_options"] == {"max_num_steps": 123, "norm": "seminorm"}


def test_hutchinson_with_the_adjoint_gives_backprops_gradients_for_the_same_probe() -> None:
    torch.manual_seed(0)
    model = CNF(2, hidden=(8, 8), trace="hutchinson", rtol=1e-9, atol=1e-9).double()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = []
    for adjoint in (False, True):
        model.zero_grad()
        logp = model.log_prob(x, adjoint=adjoint, generator=torch.Generator().manual_seed(2))
        logp.mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


# -- a Gaussian-mixture base ------------------------------------------------------------------


def _mixture(dim: int = 3, k: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    w = torch.tensor([0.7, 0.3][:k], dtype=torch.float64)
    mu = 2.0 * torch.randn(k, dim, generator=g, dtype=torch.float64)
    a = torch.randn(k, dim, dim, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(1, 2) + 0.3 * torch.eye(dim, dtype=torch.float64)
    return w, mu, cov


def _mixture_log_prob(x: torch.Tensor, w: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    comps = [torch.distributions.MultivariateNormal(mu[i], cov[i]).log_prob(x) + w[i].log() for i in range(len(w))]
    return torch.logsumexp(torch.stack(comps), 0)


def test_mixture_base_log_prob_is_the_mixture_density() -> None:
    w, mu, cov = _mixture()
    base = cnf_module.GaussianMixtureBase(w, mu, cov).double()
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    torch.testing.assert_close(base.log_prob(x), _mixture_log_prob(x, w, mu, cov), rtol=1e-5, atol=1e-5)
    assert base.components == 2 and base.dim == 3
    assert not list(base.parameters()) and {n for n, _ in base.named_buffers()} == {"log_weights", "means", "cholesky"}


def test_a_zero_field_cnf_on_a_mixture_base_has_the_mixture_density() -> None:
    w, mu, cov = _mixture()
    field = LinearField(torch.zeros(3, 3, dtype=torch.float64))
    model = CNF(3, field=field, base=cnf_module.GaussianMixtureBase(w, mu, cov)).double()
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    torch.testing.assert_close(model.log_prob(x, trace="exact"), _mixture_log_prob(x, w, mu, cov),
                               rtol=1e-5, atol=1e-5)


def test_a_linear_flow_of_a_gaussian_base_is_the_pushed_gaussian() -> None:
    """Base N(mu, S), field x -> A x: at t = 1 the density is N(e^A mu, e^A S e^A^T)."""
    _, mu, cov = _mixture(k=1)
    A = 0.3 * torch.randn(3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model = CNF(3, field=LinearField(A), base=cnf_module.GaussianMixtureBase(torch.ones(1), mu, cov), **TIGHT)
    model = model.double()
    M = torch.linalg.matrix_exp(A)
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = torch.distributions.MultivariateNormal(M @ mu[0], M @ cov[0] @ M.T).log_prob(x)
    torch.testing.assert_close(model.log_prob(x, trace="exact"), want, rtol=1e-5, atol=1e-5)


def test_mixture_base_samples_have_the_mixture_moments() -> None:
    w, mu, cov = _mixture()
    base = cnf_module.GaussianMixtureBase(w, mu, cov)
    z = base.sample(200_000, torch.Generator().manual_seed(6))
    mean = (w[:, None] * mu).sum(0)
    second = sum(w[i] * (cov[i] + torch.outer(mu[i], mu[i])) for i in range(2))
    torch.testing.assert_close(z.mean(0), mean, atol=0.03, rtol=0.0)
    torch.testing.assert_close(z.T @ z / len(z), second, atol=0.1, rtol=0.02)
    again = base.sample(100, torch.Generator().manual_seed(7))
    assert torch.equal(again, base.sample(100, torch.Generator().manual_seed(7)))
    model = CNF(3, hidden=(8,), base=base)
    assert model.sample(10, generator=torch.Generator().manual_seed(0)).shape == (10, 3)


def test_the_default_cnf_has_no_base_state_and_an_unchanged_config() -> None:
    model = CNF(2, hidden=(8,))
    assert model.base is None and "base" not in model.config()
    assert not any(k.startswith("base.") for k in model.state_dict())
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(0))
    res = model.flow(x, 1.0, 0.0)
    assert torch.equal(model.log_prob(x), standard_normal_log_prob(res.x) + res.delta_logp)


def test_a_mixture_base_round_trips_through_config_and_state_dict() -> None:
    w, mu, cov = _mixture()
    model = CNF(3, hidden=(8,), base=cnf_module.GaussianMixtureBase(w, mu, cov))
    assert model.config()["base"] == {"kind": "gaussian_mixture", "components": 2}
    assert {"base.log_weights", "base.means", "base.cholesky"} <= set(model.state_dict())
    again = CNF.from_config(model.config())
    again.load_state_dict(model.state_dict())
    x = torch.randn(9, 3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(again.log_prob(x), model.log_prob(x))


def test_bad_mixture_bases_are_refused_clearly() -> None:
    w, mu, cov = _mixture()
    with pytest.raises(ValueError, match="dim=3.*dim=2"):
        CNF(2, base=cnf_module.GaussianMixtureBase(w, mu, cov))
    with pytest.raises(ValueError, match="positive definite"):
        cnf_module.GaussianMixtureBase(w, mu, -cov)
    with pytest.raises(ValueError, match=r"weights \(K,\), means \(K, D\)"):
        cnf_module.GaussianMixtureBase(w[:1], mu, cov)
    with pytest.raises(ValueError, match="positive"):
        cnf_module.GaussianMixtureBase(torch.tensor([1.0, 0.0]), mu, cov)
    with pytest.raises(ValueError, match="unknown base density kind"):
        CNF.from_config({**CNF(3, hidden=(8,)).config(), "base": {"kind": "flow", "components": 1}})
