r"""Discrete normalizing flows: invertible maps that carry their log-determinant.

A normalizing flow pushes a simple density :math:`p_X` through an invertible map
:math:`y = g(x)`. The density of :math:`y` follows from the change of variables,

.. math::

    \log p_Y(y) = \log p_X\big(g^{-1}(y)\big) + \log\left|\det \frac{\partial g^{-1}}{\partial y}(y)\right|
               = \log p_X(x) - \log\left|\det \frac{\partial g}{\partial x}(x)\right|,

so every map here returns its log-determinant beside its value:

* ``forward(x) -> (y, logabsdet)`` with ``logabsdet = log|det ∂g/∂x (x)|``, shape (n,);
* ``inverse(y) -> (x, logabsdet)`` with ``logabsdet = log|det ∂g⁻¹/∂y (y)|``, shape (n,),
  which is minus the forward log-determinant at ``x = g⁻¹(y)``.

The maps (all :class:`Bijection` modules, acting on the rows of an (n, D) tensor):

* :class:`SinhArcsinh` — elementwise and monotone (Jones & Pewsey's skew / tail-weight map):
  a diagonal Jacobian, log-determinant in O(D);
* :class:`LinearMap` — ``y = x Wᵀ + b`` for any invertible ``W``: a dense Jacobian whose
  log-determinant costs an O(D³) factorization;
* :class:`AffineCoupling` — RealNVP's coupling layer: a triangular Jacobian, log-determinant the
  sum of D log-scales, O(D);
* :class:`Compose` — a chain of maps; the log-determinants of a composition add.

:func:`pushforward_log_prob` evaluates the density of the pushed variable, and
:func:`jacobian_logabsdet` computes a log-determinant the brute-force way (the full Jacobian by
automatic differentiation, then a determinant), to check the structured ones against.

References:
    Rezende & Mohamed (2015). Variational inference with normalizing flows.
    Dinh, Sohl-Dickstein & Bengio (2017). Density estimation using Real NVP.
        https://arxiv.org/abs/1605.08803
    Jones & Pewsey (2009). Sinh-arcsinh distributions. Biometrika 96(4), 761–780.
    Papamakarios et al. (2021). Normalizing flows for probabilistic modeling and inference.
        JMLR 22(57).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .checks import check_points

__all__ = [
    "Bijection",
    "SinhArcsinh",
    "LinearMap",
    "AffineCoupling",
    "Compose",
    "pushforward_log_prob",
    "jacobian_logabsdet",
]

Conditioner = Callable[[Tensor], tuple[Tensor, Tensor]]


def _points(x: Tensor, name: str, dim: int | None) -> Tensor:
    """Validate an (n, D) batch, keeping a floating dtype (float32 for integer input)."""
    dtype = x.dtype if isinstance(x, Tensor) and x.is_floating_point() else torch.float32
    return check_points(x, name, dim=dim, dtype=dtype)


def _log_cosh(u: Tensor) -> Tensor:
    """``log cosh(u)`` without overflow for large ``|u|``."""
    a = u.abs()
    return a + torch.log1p(torch.exp(-2 * a)) - math.log(2.0)


class Bijection(nn.Module, abc.ABC):
    """An invertible map of R^D that returns its log-determinant.

    Subclasses implement :meth:`forward` and :meth:`inverse`; both take and return (n, D) points
    and an (n,) log-determinant. ``dim`` is D, or ``None`` when the map works in any dimension.
    """

    dim: int | None = None

    @abc.abstractmethod
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(g(x), log|det ∂g/∂x (x)|)``; shapes (n, D) and (n,)."""

    @abc.abstractmethod
    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(g⁻¹(y), log|det ∂g⁻¹/∂y (y)|)``; shapes (n, D) and (n,)."""


class SinhArcsinh(Bijection):
    r"""The sinh-arcsinh map, elementwise: ``y = sinh((asinh(x) + skew) / tail)``.

    Pushed through it, a standard normal becomes Jones & Pewsey's sinh-arcsinh distribution:
    ``skew`` > 0 skews it to the right, ``tail`` < 1 gives heavier tails and ``tail`` > 1 lighter
    ones; ``skew = 0, tail = 1`` is the identity. The map is strictly increasing, with a
    closed-form inverse ``x = sinh(tail · asinh(y) − skew)`` and derivative

    .. math:: g'(x) = \frac{\cosh\big((\operatorname{asinh} x + \epsilon)/\delta\big)}{\delta \sqrt{1 + x^2}} .

    Arguments:
        skew: ε, a float or a tensor of shape (D,) (one value per coordinate).
        tail: δ > 0, a float or a tensor of shape (D,). The parameters keep the floating dtype
            of tensor arguments (python floats give the default dtype).

    Raises:
        ValueError: if ``tail`` is not positive or a parameter is not finite.
    """

    def __init__(self, skew: float | Tensor = 0.0, tail: float | Tensor = 1.0) -> None:
        super().__init__()
        skew_t, tail_t = (torch.as_tensor(p).detach().clone() for p in (skew, tail))
        dtype = torch.promote_types(skew_t.dtype, tail_t.dtype)
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        skew_t, tail_t = skew_t.to(dtype), tail_t.to(dtype)
        if skew_t.ndim > 1 or tail_t.ndim > 1:
            raise ValueError("skew and tail must be scalars or 1-D, got shapes "
                             f"{tuple(skew_t.shape)} and {tuple(tail_t.shape)}")
        if not (torch.isfinite(skew_t).all() and torch.isfinite(tail_t).all()):
            raise ValueError("skew and tail must be finite")
        if not (tail_t > 0).all():
            raise ValueError(f"tail must be positive, got {tail_t.tolist()}")
        sizes = {p.numel() for p in (skew_t, tail_t) if p.ndim == 1}
        if len(sizes) > 1:
            raise ValueError(f"skew and tail have different lengths {sorted(sizes)}")
        self.dim = sizes.pop() if sizes else None
        self.skew = nn.Parameter(skew_t)
        self.tail = nn.Parameter(tail_t)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = _points(x, "x", self.dim)
        u = (torch.asinh(x) + self.skew) / self.tail
        log_deriv = _log_cosh(u) - torch.log(self.tail) - 0.5 * torch.log1p(x * x)
        return torch.sinh(u), log_deriv.sum(1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y = _points(y, "y", self.dim)
        v = self.tail * torch.asinh(y) - self.skew
        log_deriv = _log_cosh(v) + torch.log(self.tail) - 0.5 * torch.log1p(y * y)
        return torch.sinh(v), log_deriv.sum(1)


class LinearMap(Bijection):
    """The affine map ``y = x Wᵀ + b`` for an invertible D × D matrix ``W``.

    Its Jacobian is ``W`` everywhere, so ``log|det J| = log|det W|`` — in general an LU
    factorization, O(D³) operations, which is what structured flows avoid.

    Arguments:
        weight: ``W``, shape (D, D), invertible.
        bias: ``b``, shape (D,); zeros by default.

    Raises:
        ValueError: if ``W`` is not square, ``b`` has the wrong shape, or ``W`` is singular.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        weight = torch.as_tensor(weight)
        if weight.ndim != 2 or weight.shape[0] != weight.shape[1]:
            raise ValueError(f"weight must be a square matrix, got shape {tuple(weight.shape)}")
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
        bias = torch.as_tensor(bias, dtype=weight.dtype)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        sign, logabsdet = torch.linalg.slogdet(weight.detach())
        if sign == 0 or not torch.isfinite(logabsdet):
            raise ValueError("weight is singular: the map is not invertible")
        self.dim = weight.shape[0]
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())

    def logabsdet(self) -> Tensor:
        """``log|det W|``, a scalar (the same at every point)."""
        return torch.linalg.slogdet(self.weight)[1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = _points(x, "x", self.dim)
        return x @ self.weight.T + self.bias, self.logabsdet().expand(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y = _points(y, "y", self.dim)
        x = torch.linalg.solve(self.weight, (y - self.bias).T).T
        return x, -self.logabsdet().expand(y.shape[0])


class _MLPConditioner(nn.Module):
    """The default conditioner of :class:`AffineCoupling`: a tanh MLP, log-scales soft-clipped."""

    def __init__(self, d_in: int, d_out: int, hidden: int, max_log_scale: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, 2 * d_out),
        )
        self.max_log_scale = max_log_scale

    def forward(self, x_a: Tensor) -> tuple[Tensor, Tensor]:
        raw_scale, shift = self.net(x_a).chunk(2, dim=1)
        return self.max_log_scale * torch.tanh(raw_scale / self.max_log_scale), shift


class AffineCoupling(Bijection):
    r"""RealNVP's affine coupling layer.

    The coordinates are split by a boolean ``mask`` into a kept part :math:`x_A` (``mask`` True)
    and a transformed part :math:`x_B`:

    .. math:: y_A = x_A, \qquad y_B = x_B \odot e^{s(x_A)} + t(x_A).

    The Jacobian is block-triangular with diagonal ``(1, …, 1, e^{s(x_A)})``, so
    ``log|det J| = Σ s(x_A)``: D operations, whatever ``s`` and ``t`` are, and the inverse is
    ``x_B = (y_B − t(y_A)) e^{−s(y_A)}``.

    Arguments:
        mask: boolean, shape (D,): True for the coordinates passed through unchanged. At least
            one True and one False.
        conditioner: a callable (an ``nn.Module`` to train it) from ``x_A``, shape (n, |A|), to
            ``(s, t)``, each shape (n, |B|). By default a tanh MLP with ``hidden`` units whose
            log-scales are soft-clipped to ``±max_log_scale``.
        hidden, max_log_scale: of the default conditioner.

    Raises:
        ValueError: on a mask that is not 1-D, or that keeps all or none of the coordinates.
    """

    def __init__(
        self,
        mask: Tensor,
        conditioner: Conditioner | None = None,
        hidden: int = 32,
        max_log_scale: float = 3.0,
    ) -> None:
        super().__init__()
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.ndim != 1:
            raise ValueError(f"mask must be 1-D, got shape {tuple(mask.shape)}")
        if mask.all() or not mask.any():
            raise ValueError("mask must keep at least one coordinate and transform at least one")
        self.dim = mask.numel()
        self.register_buffer("mask", mask)
        d_a, d_b = int(mask.sum()), int((~mask).sum())
        if conditioner is None:
            conditioner = _MLPConditioner(d_a, d_b, hidden, max_log_scale)
        self.conditioner = conditioner

    def _scale_shift(self, x_a: Tensor, n: int, d_b: int) -> tuple[Tensor, Tensor]:
        s, t = self.conditioner(x_a)
        if s.shape != (n, d_b) or t.shape != (n, d_b):
            raise ValueError(f"the conditioner must return (s, t) of shape ({n}, {d_b}) each, "
                             f"got {tuple(s.shape)} and {tuple(t.shape)}")
        return s, t

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = _points(x, "x", self.dim)
        x_a, x_b = x[:, self.mask], x[:, ~self.mask]
        s, t = self._scale_shift(x_a, *x_b.shape)
        y = x.clone()
        y[:, ~self.mask] = x_b * torch.exp(s) + t
        return y, s.sum(1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y = _points(y, "y", self.dim)
        y_a, y_b = y[:, self.mask], y[:, ~self.mask]
        s, t = self._scale_shift(y_a, *y_b.shape)
        x = y.clone()
        x[:, ~self.mask] = (y_b - t) * torch.exp(-s)
        return x, -s.sum(1)


class Compose(Bijection):
    r"""The composition ``g = g_K ∘ … ∘ g_1`` of bijections (applied left to right).

    By the chain rule the Jacobian is the product of the Jacobians, and the determinant of a
    product is the product of the determinants, so

    .. math:: \log\lvert\det J_g(x)\rvert = \sum_{k=1}^K \log\lvert\det J_{g_k}(x_{k-1})\rvert,
              \qquad x_0 = x,\; x_k = g_k(x_{k-1}).

    Arguments:
        *maps: the bijections, in the order they are applied; at least one.
    """

    def __init__(self, *maps: Bijection) -> None:
        super().__init__()
        if not maps:
            raise ValueError("Compose needs at least one map")
        dims = {m.dim for m in maps if m.dim is not None}
        if len(dims) > 1:
            raise ValueError(f"the maps act in different dimensions {sorted(dims)}")
        self.dim = dims.pop() if dims else None
        self.maps = nn.ModuleList(maps)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = _points(x, "x", self.dim)
        total = x.new_zeros(x.shape[0])
        for m in self.maps:
            x, logdet = m(x)
            total = total + logdet
        return x, total

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y = _points(y, "y", self.dim)
        total = y.new_zeros(y.shape[0])
        for m in reversed(self.maps):
            y, logdet = m.inverse(y)
            total = total + logdet
        return y, total

    def intermediates(self, x: Tensor) -> list[Tensor]:
        """The points after each map: ``[x, g_1(x), g_2(g_1(x)), …]``, K + 1 tensors (n, D)."""
        out = [_points(x, "x", self.dim)]
        for m in self.maps:
            out.append(m(out[-1])[0])
        return out


def pushforward_log_prob(
    flow: Bijection, base_log_prob: Callable[[Tensor], Tensor], y: Tensor
) -> Tensor:
    r"""``log p_Y(y)`` for ``Y = flow(X)``, ``X ~ p_X``: the change of variables.

    .. math:: \log p_Y(y) = \log p_X\big(g^{-1}(y)\big) + \log\lvert\det J_{g^{-1}}(y)\rvert .

    Arguments:
        flow: the map ``g``.
        base_log_prob: ``log p_X``, a callable from (n, D) points to (n,) log-densities (for a
            standard normal, :func:`cnf_lib.cnf.standard_normal_log_prob`).
        y: points, shape (n, D).

    Returns:
        The log-density of ``Y`` at ``y``, shape (n,).
    """
    x, logdet_inverse = flow.inverse(y)
    return base_log_prob(x) + logdet_inverse


def jacobian_logabsdet(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``log|det ∂fn/∂x|`` at each row of ``x``, the expensive way.

    Builds the full D × D Jacobian of each point by automatic differentiation (D
    vector-Jacobian products) and factorizes it (O(D³)). Use it to check a structured
    log-determinant, not inside a model.

    Arguments:
        fn: a map from (n, D) points to (n, D) points that treats rows independently (e.g.
            ``lambda v: flow(v)[0]``).
        x: points, shape (n, D).

    Returns:
        The log-absolute-determinants, shape (n,).
    """
    x = _points(x, "x", None)

    def one(v: Tensor) -> Tensor:
        return fn(v[None])[0]

    rows = [torch.autograd.functional.jacobian(one, xi) for xi in x]
    jac = torch.stack(rows)
    if jac.shape != (x.shape[0], x.shape[1], x.shape[1]):
        raise ValueError("fn must map (n, D) points to (n, D) points; its Jacobian has shape "
                         f"{tuple(jac.shape[1:])}")
    return torch.linalg.slogdet(jac)[1]
