"""cnf_lib.discrete against closed forms: Gaussian pushforwards, sinh-arcsinh density, Jacobians."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate

from cnf_lib.cnf import standard_normal_log_prob
from cnf_lib.discrete import (
    AffineCoupling,
    Compose,
    LinearMap,
    SinhArcsinh,
    jacobian_logabsdet,
    pushforward_log_prob,
)

F64 = torch.float64


def mvn_log_prob(y: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(y)


def jones_pewsey_log_density(y: torch.Tensor, skew: float, tail: float) -> torch.Tensor:
    """The sinh-arcsinh density as published (Jones & Pewsey 2009, eq. 2), not via the flow."""
    s = torch.sinh(tail * torch.asinh(y) - skew)
    c = torch.sqrt(1 + s * s)
    return torch.log(tail * c) - 0.5 * torch.log(2 * math.pi * (1 + y * y)) - 0.5 * s * s


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def invertible(d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.eye(d, dtype=F64) + 0.4 * torch.randn(d, d, generator=gen, dtype=F64)


@pytest.mark.parametrize("skew,tail", [(0.0, 1.0), (0.8, 0.6), (-0.5, 1.7)])
def test_sinh_arcsinh_pushforward_is_the_jones_pewsey_density(skew: float, tail: float) -> None:
    flow = SinhArcsinh(torch.tensor(skew, dtype=F64), torch.tensor(tail, dtype=F64))
    y = torch.linspace(-8, 8, 401, dtype=F64)[:, None]
    got = pushforward_log_prob(flow, standard_normal_log_prob, y)
    torch.testing.assert_close(got, jones_pewsey_log_density(y[:, 0], skew, tail))


def test_sinh_arcsinh_density_integrates_to_one() -> None:
    flow = SinhArcsinh(0.8, 0.6).double()

    def density(v: float) -> float:
        point = torch.tensor([[v]], dtype=F64)
        return pushforward_log_prob(flow, standard_normal_log_prob, point).exp().item()

    mass, err = integrate.quad(density, -math.inf, math.inf, limit=200)
    assert mass == pytest.approx(1.0, abs=1e-8)


def test_sinh_arcsinh_identity_and_round_trip(gen: torch.Generator) -> None:
    x = torch.randn(50, 3, generator=gen, dtype=F64)
    y, logdet = SinhArcsinh().double()(x)
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(logdet, torch.zeros(50, dtype=F64))
    flow = SinhArcsinh(torch.tensor([0.5, -0.3, 1.0]), torch.tensor([0.7, 1.2, 2.0])).double()
    y, logdet = flow(x)
    back, logdet_inv = flow.inverse(y)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(logdet_inv, -logdet)
    torch.testing.assert_close(logdet, jacobian_logabsdet(lambda v: flow(v)[0], x))


def test_sinh_arcsinh_is_increasing_and_stable_far_out() -> None:
    flow = SinhArcsinh(1.0, 0.5).double()
    x = torch.linspace(-30, 30, 1001, dtype=F64)[:, None]
    y, logdet = flow(x)
    assert (y[1:] > y[:-1]).all()
    assert torch.isfinite(logdet).all()


def test_linear_map_pushes_a_gaussian_to_a_gaussian(gen: torch.Generator) -> None:
    W, b = invertible(4, gen), torch.randn(4, generator=gen, dtype=F64)
    flow = LinearMap(W, b)
    y = torch.randn(30, 4, generator=gen, dtype=F64)
    got = pushforward_log_prob(flow, standard_normal_log_prob, y)
    torch.testing.assert_close(got, mvn_log_prob(y, b, W @ W.T))
    x = torch.randn(30, 4, generator=gen, dtype=F64)
    out, logdet = flow(x)
    torch.testing.assert_close(out, x @ W.T + b)
    expected = torch.full((30,), torch.linalg.det(W).abs().log().item(), dtype=F64)
    torch.testing.assert_close(logdet, expected)
    back, _ = flow.inverse(out)
    torch.testing.assert_close(back, x)


def test_affine_coupling_with_constant_scale_has_closed_form_logdet(gen: torch.Generator) -> None:
    mask = torch.tensor([True, False, False, True, False])

    def conditioner(x_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x_a.shape[0]
        return torch.full((n, 3), 0.3, dtype=x_a.dtype), x_a.sum(1, keepdim=True).expand(n, 3)

    flow = AffineCoupling(mask, conditioner)
    x = torch.randn(20, 5, generator=gen, dtype=F64)
    y, logdet = flow(x)
    torch.testing.assert_close(logdet, torch.full((20,), 0.9, dtype=F64))
    torch.testing.assert_close(y[:, mask], x[:, mask])
    expected = x[:, ~mask] * math.exp(0.3) + x[:, mask].sum(1, keepdim=True)
    torch.testing.assert_close(y[:, ~mask], expected)


def test_affine_coupling_logdet_matches_full_jacobian_and_inverts(gen: torch.Generator) -> None:
    torch.manual_seed(0)
    flow = AffineCoupling(torch.tensor([False, True, True, False]), hidden=16).double()
    with torch.no_grad():  # make the default MLP's scales clearly non-zero
        for p in flow.parameters():
            p.mul_(3)
    x = torch.randn(10, 4, generator=gen, dtype=F64)
    y, logdet = flow(x)
    assert logdet.abs().max() > 0.1
    torch.testing.assert_close(logdet, jacobian_logabsdet(lambda v: flow(v)[0], x))
    back, logdet_inv = flow.inverse(y)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(logdet_inv, -logdet)


def test_compose_adds_logdets_and_inverts_in_reverse(gen: torch.Generator) -> None:
    torch.manual_seed(1)
    maps = [SinhArcsinh(0.4, 0.8).double(), LinearMap(invertible(3, gen)),
            AffineCoupling(torch.tensor([True, False, True])).double()]
    flow = Compose(*maps)
    x = torch.randn(12, 3, generator=gen, dtype=F64)
    y, logdet = flow(x)
    total, h = torch.zeros(12, dtype=F64), x
    for m in maps:
        h, ld = m(h)
        total = total + ld
    torch.testing.assert_close(y, h)
    torch.testing.assert_close(logdet, total)
    torch.testing.assert_close(logdet, jacobian_logabsdet(lambda v: flow(v)[0], x))
    back, logdet_inv = flow.inverse(y)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(logdet_inv, -logdet)
    steps = flow.intermediates(x)
    assert len(steps) == 4 and torch.equal(steps[-1], y)


def test_two_linear_maps_compose_to_their_product(gen: torch.Generator) -> None:
    W1, W2 = invertible(3, gen), invertible(3, gen)
    flow = Compose(LinearMap(W1), LinearMap(W2))
    y = torch.randn(25, 3, generator=gen, dtype=F64)
    M = W2 @ W1
    got = pushforward_log_prob(flow, standard_normal_log_prob, y)
    torch.testing.assert_close(got, mvn_log_prob(y, torch.zeros(3, dtype=F64), M @ M.T))


def test_jacobian_logabsdet_of_a_scaling() -> None:
    x = torch.randn(4, 3, dtype=F64)
    expected = torch.full((4,), 3 * math.log(2), dtype=F64)
    torch.testing.assert_close(jacobian_logabsdet(lambda v: 2 * v, x), expected)


def test_bad_input_raises_clear_errors() -> None:
    with pytest.raises(ValueError, match="tail must be positive"):
        SinhArcsinh(0.0, -1.0)
    with pytest.raises(ValueError, match="different lengths"):
        SinhArcsinh(torch.zeros(2), torch.ones(3))
    with pytest.raises(ValueError, match="singular"):
        LinearMap(torch.tensor([[1.0, 2.0], [2.0, 4.0]]))
    with pytest.raises(ValueError, match="square"):
        LinearMap(torch.ones(2, 3))
    with pytest.raises(ValueError, match="at least one"):
        AffineCoupling(torch.tensor([True, True]))
    with pytest.raises(ValueError, match="different dimensions"):
        Compose(LinearMap(torch.eye(2)), LinearMap(torch.eye(3)))
    with pytest.raises(ValueError, match="2 columns"):
        LinearMap(torch.eye(2))(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="2-D"):
        SinhArcsinh()(torch.zeros(5))
    bad = AffineCoupling(torch.tensor([True, False]), lambda x_a: (x_a, x_a.repeat(1, 2)))
    with pytest.raises(ValueError, match="conditioner must return"):
        bad(torch.zeros(4, 2))
