"""cnf_lib.odes against closed forms: Euler (1 + h)^n, exp(tA), a limit cycle, memory, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from cnf_lib.fields import ConcatSquashMLP
from cnf_lib.odes import CountNFE, LimitCycle, LinearODE, SavedTensorMemory, fixed_grid

F64 = torch.float64
TIGHT = dict(rtol=1e-11, atol=1e-11)


def span(t0: float, t1: float) -> torch.Tensor:
    return torch.tensor([t0, t1], dtype=F64)


@pytest.mark.parametrize("method,per_step", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
@pytest.mark.parametrize("t0,t1", [(0.0, 1.0), (1.0, -0.7)])
def test_fixed_grid_takes_exactly_n_steps(method: str, per_step: int, t0: float, t1: float) -> None:
    f = CountNFE(lambda t, y: -y)
    for n in (1, 7, 10, 30):  # 0.1 / 0.3 step sizes are where step_size= rounds up
        f.reset()
        odeint(f, torch.ones(1, dtype=F64), span(t0, t1), method=method, options=fixed_grid(n))
        assert f.nfe == per_step * n


def test_euler_on_exponential_growth_is_one_plus_h_to_the_n() -> None:
    for n in (1, 5, 64):
        y = odeint(lambda t, y: y, torch.ones(1, dtype=F64), span(0.0, 1.0), method="euler",
                   options=fixed_grid(n))
        assert y[-1].item() == pytest.approx((1 + 1 / n) ** n, rel=1e-13)


def test_fixed_grid_rejects_bad_counts() -> None:
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            fixed_grid(bad)


def test_count_nfe_counts_adaptive_and_adjoint_evaluations() -> None:
    field = CountNFE(ConcatSquashMLP(2, (8,)).double())
    y0 = torch.randn(5, 2, dtype=F64)
    calls = []
    original = field.func.forward

    def spy(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return original(t, y)

    field.func.forward = spy
    y = odeint_adjoint(field, y0, span(0.0, 1.0), rtol=1e-6, atol=1e-6)
    forward = field.nfe
    assert forward == len(calls) > 0
    y[-1].sum().backward()
    assert field.nfe > forward  # the adjoint's backward solve evaluates the field again
    assert all(p.grad is not None for p in field.parameters())
    with pytest.raises(ValueError, match="callable"):
        CountNFE(3)


def test_linear_ode_solution_is_a_damped_rotation() -> None:
    a, w = 0.3, 2.0
    ode = LinearODE(torch.tensor([[-a, -w], [w, -a]], dtype=F64))
    y0 = torch.randn(6, 2, dtype=F64)
    t = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    got = ode.solution(t, y0)
    for k, tk in enumerate(t.tolist()):
        R = math.exp(-a * tk) * torch.tensor([[math.cos(w * tk), -math.sin(w * tk)],
                                              [math.sin(w * tk), math.cos(w * tk)]], dtype=F64)
        torch.testing.assert_close(got[k], y0 @ R.T)
    torch.testing.assert_close(ode.solution(0.5, y0), got[1])
    torch.testing.assert_close(odeint(ode, y0, t, **TIGHT), got, rtol=1e-9, atol=1e-9)


def test_limit_cycle_solution_solves_the_ode() -> None:
    lc = LimitCycle(omega=1.5)
    y0 = torch.tensor([[0.1, 0.0], [0.5, -0.5], [1.0, 0.0], [1.5, 1.0], [0.0, 0.0]], dtype=F64)
    t = torch.tensor(0.7, dtype=F64, requires_grad=True)
    y = lc.solution(t, y0)
    dy = torch.stack([torch.autograd.grad(y[:, i].sum(), t, retain_graph=True)[0]
                      for i in range(2)])
    # d/dt of the column sums is the sum of the rows' derivatives; check each row too
    for k in range(y0.shape[0]):
        yk = lc.solution(t, y0[k:k + 1])[0]
        dyk = torch.stack([torch.autograd.grad(yk[i], t, retain_graph=True)[0] for i in range(2)])
        torch.testing.assert_close(dyk, lc(t, yk[None])[0].detach())
    torch.testing.assert_close(dy, lc(t, y.detach()).sum(0))
    torch.testing.assert_close(lc.solution(0.0, y0), y0)


def test_limit_cycle_attracts_to_the_unit_circle_and_matches_odeint() -> None:
    lc = LimitCycle()
    y0 = torch.randn(20, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    r = lc.solution(12.0, y0).norm(dim=1)
    torch.testing.assert_close(r, torch.ones(20, dtype=F64), rtol=0, atol=1e-9)
    t = torch.linspace(0, 3, 5, dtype=F64)
    torch.testing.assert_close(odeint(lc, y0, t, **TIGHT), lc.solution(t, y0), rtol=1e-8, atol=1e-8)
    assert lc.solution(t, y0).shape == (5, 20, 2)


def test_limit_cycle_backwards_blows_up_outside_the_circle() -> None:
    lc = LimitCycle()
    y0 = torch.tensor([[2.0, 0.0]], dtype=F64)
    blow_up = -0.5 * math.log(4 / 3)  # 1/r² = 1 - (3/4) e^{-2t} reaches 0
    assert torch.isfinite(lc.solution(blow_up / 2, y0)).all()
    with pytest.raises(ValueError, match="blown up"):
        lc.solution(1.01 * blow_up, y0)
    with pytest.raises(ValueError, match="shape"):
        lc.solution(1.0, torch.zeros(3, 3))


def test_saved_tensor_memory_counts_what_backward_needs() -> None:
    x = torch.randn(100, 10, dtype=F64, requires_grad=True)
    with SavedTensorMemory() as mem:
        y = torch.exp(x)  # exp saves its output: 100 * 10 * 8 bytes
    assert (mem.bytes, mem.count) == (8000, 1)
    del y
    assert mem.bytes == 0  # the graph is gone, so is the memory

    layer = nn.Linear(10, 3).double()
    inputs = torch.randn(100, 10, dtype=F64)
    with SavedTensorMemory(exclude=layer.parameters()) as mem:
        out = layer(inputs).sum()  # saves the input (and the weight, excluded)
    assert mem.bytes == inputs.nbytes
    out.backward()
    with torch.no_grad(), SavedTensorMemory() as mem:
        torch.exp(x)
    assert mem.bytes == 0


def test_backprop_memory_grows_with_steps_and_adjoint_memory_does_not() -> None:
    torch.manual_seed(0)
    field = ConcatSquashMLP(2, (16, 16))
    y0 = torch.randn(64, 2)

    def measure(solve, n: int) -> int:
        with SavedTensorMemory(exclude=field.parameters()) as mem:
            y = solve(field, y0, torch.tensor([0.0, 1.0]), method="rk4", options=fixed_grid(n))
        size = mem.bytes
        y[-1].sum().backward()
        return size

    direct = [measure(odeint, n) for n in (4, 8, 12)]
    adjoint = [measure(odeint_adjoint, n) for n in (4, 8, 12)]
    assert direct[1] - direct[0] == direct[2] - direct[1] > 0  # exactly linear in the steps
    assert adjoint[0] == adjoint[1] == adjoint[2] < direct[0]


def test_adjoint_and_backprop_give_the_closed_form_gradient() -> None:
    A = torch.tensor([[-0.2, -1.0, 0.3], [1.0, -0.1, 0.0], [0.2, 0.4, -0.5]], dtype=F64)
    y0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    T = 1.5

    exact_ode = LinearODE(A)
    (exact_ode.solution(T, y0) * w).sum().backward()  # through matrix_exp: the exact gradient
    expected = exact_ode.A.grad
    for solve in (odeint, odeint_adjoint):
        ode = LinearODE(A)
        y = solve(ode, y0, span(0.0, T), method="dopri5", **TIGHT)
        (y[-1] * w).sum().backward()
        torch.testing.assert_close(ode.A.grad, expected, rtol=1e-7, atol=1e-8)


def test_saved_tensor_memory_changes_no_gradient() -> None:
    x = torch.randn(7, 3, dtype=F64, requires_grad=True)

    def f(v: torch.Tensor) -> torch.Tensor:
        return (torch.exp(v) * torch.tanh(v)).sum()

    (g_plain,) = torch.autograd.grad(f(x), x, create_graph=True)
    (h_plain,) = torch.autograd.grad(g_plain.sum(), x)
    with SavedTensorMemory() as mem:
        out = f(x)
    assert mem.bytes > 0
    (g,) = torch.autograd.grad(out, x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(g, g_plain)
    torch.testing.assert_close(h, h_plain)  # second derivatives too
