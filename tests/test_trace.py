"""cnf_lib.trace against closed forms on linear fields f(x) = A x."""

from __future__ import annotations

import pytest
import torch

from cnf_lib.trace import divergence_exact, divergence_hutchinson, sample_probe


def linear(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x @ A.T


@pytest.fixture
def A() -> torch.Tensor:
    return torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_exact_divergence_of_linear_field_is_trace(A: torch.Tensor) -> None:
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    div, frob = divergence_exact(linear(A, x), x)
    torch.testing.assert_close(div, torch.full((7,), A.trace().item(), dtype=torch.float64))
    torch.testing.assert_close(frob, torch.full((7,), A.pow(2).sum().item(), dtype=torch.float64))


def test_exact_divergence_of_nonlinear_field_matches_jacobian() -> None:
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    f = torch.tanh(x.roll(1, dims=1)) * x + x.pow(3)
    div, _ = divergence_exact(f, x)
    for i in range(4):
        J = torch.autograd.functional.jacobian(
            lambda v: torch.tanh(v.roll(1, dims=0)) * v + v.pow(3), x[i].detach()
        )
        assert div[i].item() == pytest.approx(J.trace().item(), rel=1e-12)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_hutchinson_unbiased_with_closed_form_variance(A: torch.Tensor, kind: str) -> None:
    n = 200_000
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 5, dtype=torch.float64).expand(n, 5).clone().requires_grad_(True)
    probe = sample_probe(x, kind, g)
    est, _ = divergence_hutchinson(linear(A, x), x, probe)
    est = est.detach()
    S = (A + A.T) / 2
    fro2 = S.pow(2).sum().item()
    var_true = 2 * fro2 if kind == "gaussian" else 2 * (fro2 - S.diagonal().pow(2).sum().item())
    se = (var_true / n) ** 0.5
    assert abs(est.mean().item() - A.trace().item()) < 4 * se
    assert est.var().item() == pytest.approx(var_true, rel=0.05)


def test_rademacher_probe_has_unit_entries_and_gaussian_unit_variance() -> None:
    like = torch.zeros(50_000, 3)
    r = sample_probe(like, "rademacher", torch.Generator().manual_seed(0))
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    gauss = sample_probe(like, "gaussian", torch.Generator().manual_seed(0))
    cov = gauss.T @ gauss / gauss.shape[0]
    torch.testing.assert_close(cov, torch.eye(3), atol=0.03, rtol=0)


def test_hutchinson_frobenius_estimate_is_unbiased(A: torch.Tensor) -> None:
    n = 100_000
    x = torch.randn(n, 5, dtype=torch.float64, requires_grad=True)
    probe = sample_probe(x, "gaussian", torch.Generator().manual_seed(2))
    _, frob = divergence_hutchinson(linear(A, x), x, probe)
    assert frob.mean().item() == pytest.approx(A.pow(2).sum().item(), rel=0.02)


def test_same_generator_same_probe_and_unknown_probe_rejected() -> None:
    like = torch.zeros(10, 4)
    a = sample_probe(like, "rademacher", torch.Generator().manual_seed(3))
    b = sample_probe(like, "rademacher", torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown probe"):
        sample_probe(like, "uniform")
