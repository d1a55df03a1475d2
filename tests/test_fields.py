"""cnf_lib.fields: the forward-mode Jacobian of the ConcatSquash MLP against autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnf_lib import CNF
from cnf_lib.fields import ACTIVATIONS, ConcatSquashMLP, LinearField
from cnf_lib.trace import divergence_exact, divergence_hutchinson


def _field(dim: int, hidden: tuple[int, ...], activation: str, seed: int = 0) -> ConcatSquashMLP:
    torch.manual_seed(seed)
    field = ConcatSquashMLP(dim, hidden, activation).double()
    with torch.no_grad():  # non-trivial time terms, so that gates and shifts matter
        for p in field.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return field


class Opaque(nn.Module):
    """Hides a field's ``divergence`` methods, so that the CNF falls back to autograd."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, t, x):
        return self.inner(t, x)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize(("dim", "hidden"), [(1, (5,)), (2, (16, 16, 16)), (5, (8, 7)), (3, ())])
def test_forward_mode_divergence_matches_autograd(activation: str, dim: int, hidden: tuple[int, ...]) -> None:
    field = _field(dim, hidden, activation)
    x = 1.5 * torch.randn(33, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(0.37, dtype=torch.float64)
    f, div, frob = field.divergence(t, x)
    xg = x.clone().requires_grad_(True)
    f_ref = field(t, xg)
    div_ref, frob_ref = divergence_exact(f_ref, xg)
    torch.testing.assert_close(f, f_ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(div, div_ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(frob, frob_ref.detach(), rtol=1e-10, atol=1e-10)


def test_forward_with_jacobian_is_the_full_jacobian() -> None:
    field = _field(3, (12, 12), "tanh")
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor(0.8, dtype=torch.float64)
    f, J = field.forward_with_jacobian(t, x)
    assert J.shape == (4, 3, 3)
    for p in range(4):
        J_ref = torch.autograd.functional.jacobian(lambda v: field(t, v[None])[0], x[p])
        torch.testing.assert_close(J[p], J_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", ["tanh", "softplus"])
def test_forward_mode_parameter_gradients_match_autograd(activation: str) -> None:
    # training differentiates the divergence with respect to the parameters: both routes agree
    field = _field(2, (10, 10), activation, seed=3)
    x = torch.randn(17, 2, dtype=torch.float64)
    t = torch.tensor(0.2, dtype=torch.float64)
    f, div, frob = field.divergence(t, x)
    (f.sum() + div.sum() + 0.1 * frob.sum()).backward()
    fast = [p.grad.clone() for p in field.parameters()]
    field.zero_grad()
    xg = x.clone().requires_grad_(True)
    f_ref = field(t, xg)
    div_ref, frob_ref = divergence_exact(f_ref, xg)
    (f_ref.sum() + div_ref.sum() + 0.1 * frob_ref.sum()).backward()
    for a, b in zip(fast, (p.grad for p in field.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_cnf_uses_the_field_divergence_and_agrees_with_autograd() -> None:
    field = _field(2, (16, 16), "tanh", seed=5)
    fast = CNF(2, field=field, rtol=1e-9, atol=1e-9).double()
    slow = CNF(2, field=Opaque(field), rtol=1e-9, atol=1e-9).double()
    x = torch.randn(20, 2, dtype=torch.float64)
    lp_fast, res_fast = fast.log_prob_result(x, regularize=True)
    lp_slow, res_slow = slow.log_prob_result(x, regularize=True)
    torch.testing.assert_close(lp_fast, lp_slow, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res_fast.frobenius, res_slow.frobenius, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res_fast.kinetic, res_slow.kinetic, rtol=1e-10, atol=1e-10)
    assert res_fast.nfe_forward == res_slow.nfe_forward


def test_cnf_adjoint_with_forward_mode_divergence_matches_backprop() -> None:
    field = _field(2, (8, 8), "tanh", seed=7)
    model = CNF(2, field=field, rtol=1e-9, atol=1e-9).double()
    x = torch.randn(10, 2, dtype=torch.float64)
    grads = []
    for adjoint in (False, True):
        model.zero_grad()
        model.log_prob(x, adjoint=adjoint).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_linear_field_divergence_is_trace_and_frobenius() -> None:
    A = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = torch.randn(6, 4, dtype=torch.float64)
    f, div, frob = LinearField(A).divergence(0.0, x)
    assert LinearField(A).divergence(0.0, x, frobenius=False)[2] is None
    torch.testing.assert_close(f, x @ A.T)
    torch.testing.assert_close(div, torch.full((6,), A.trace().item(), dtype=torch.float64))
    torch.testing.assert_close(frob, torch.full((6,), A.pow(2).sum().item(), dtype=torch.float64))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize(("dim", "hidden"), [(2, (16, 16, 16)), (3, ())])
def test_divergence_without_frobenius_is_the_same_trace(activation: str, dim: int, hidden: tuple[int, ...]) -> None:
    field = _field(dim, hidden, activation, seed=2)
    x = torch.randn(9, dim, dtype=torch.float64)
    f, div, frob = field.divergence(0.6, x)
    f2, div2, none = field.divergence(0.6, x, frobenius=False)
    assert none is None
    torch.testing.assert_close(f2, f, rtol=0, atol=1e-12)
    torch.testing.assert_close(div2, div, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize(("dim", "hidden"), [(1, (5,)), (2, (16, 16, 16)), (10, (8, 7)), (3, ())])
def test_forward_mode_hutchinson_is_the_vjp_estimate(activation: str, dim: int, hidden: tuple[int, ...]) -> None:
    field = _field(dim, hidden, activation)
    g = torch.Generator().manual_seed(2)
    x = 1.5 * torch.randn(33, dim, dtype=torch.float64, generator=g)
    probe = torch.randn(33, dim, dtype=torch.float64, generator=g)
    t = torch.tensor(0.37, dtype=torch.float64)
    f, div, frob = field.divergence_hutchinson(t, x, probe)
    xg = x.clone().requires_grad_(True)
    f_ref = field(t, xg)
    div_ref, _ = divergence_hutchinson(f_ref, xg, probe)  # εᵀJε by a vector-Jacobian product
    _, J = field.forward_with_jacobian(t, x)  # (n, D, D)
    jvp = torch.einsum("nij,nj->ni", J, probe)
    torch.testing.assert_close(f, f_ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(div, div_ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(frob, jvp.pow(2).sum(1), rtol=1e-10, atol=1e-10)
    assert field.divergence_hutchinson(t, x, probe, frobenius=False)[2] is None


def test_forward_mode_hutchinson_parameter_gradients_match_autograd() -> None:
    field = _field(4, (10, 10), "tanh", seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(17, 4, dtype=torch.float64, generator=g)
    probe = torch.randn(17, 4, dtype=torch.float64, generator=g)
    t = torch.tensor(0.2, dtype=torch.float64)
    f, div, _ = field.divergence_hutchinson(t, x, probe)
    (f.sum() + div.sum()).backward()
    fast = [p.grad.clone() for p in field.parameters()]
    field.zero_grad()
    xg = x.clone().requires_grad_(True)
    f_ref = field(t, xg)
    div_ref, _ = divergence_hutchinson(f_ref, xg, probe)
    (f_ref.sum() + div_ref.sum()).backward()
    for a, b in zip(fast, (p.grad for p in field.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_cnf_hutchinson_uses_the_field_estimator_with_the_same_probe() -> None:
    field = _field(3, (16, 16), "tanh", seed=5)
    fast = CNF(3, field=field, trace="hutchinson", rtol=1e-9, atol=1e-9).double()
    slow = CNF(3, field=Opaque(field), trace="hutchinson", rtol=1e-9, atol=1e-9).double()
    x = torch.randn(20, 3, dtype=torch.float64)
    lp_fast = fast.log_prob(x, generator=torch.Generator().manual_seed(0))
    lp_slow = slow.log_prob(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lp_fast, lp_slow, rtol=1e-9, atol=1e-9)


def test_the_default_activation_is_tanh_up_to_two_dimensions_and_silu_above() -> None:
    from cnf_lib.fields import default_activation

    assert [default_activation(d) for d in (1, 2, 3, 12)] == ["tanh", "tanh", "silu", "silu"]
    for dim, expected in [(2, nn.Tanh), (6, nn.SiLU)]:
        model = CNF(dim, hidden=(8,))
        assert isinstance(model.field.act, expected)
        assert model.config()["activation"] == model.field.activation  # saved as resolved, not as None
        rebuilt = CNF.from_config(model.config())
        assert isinstance(rebuilt.field.act, expected)
    # an activation given is used in any dimension, and the config records it
    assert CNF(6, hidden=(8,), activation="tanh").config()["activation"] == "tanh"
    assert ConcatSquashMLP(2, (8,), "silu").activation == "silu"
