"""Time-conditioned vector fields ``f(t, x)`` for continuous normalizing flows.

A :class:`ConcatSquashMLP` is FFJORD's field: each layer is a linear map of ``x`` whose output is
gated and shifted by functions of ``t``::

    layer(t, h) = (W h + b) * sigmoid(a t + c) + d t

with activations that are at least C¹ between layers (a CNF needs a field that is C¹ in ``x`` for
the flow map to be differentiable and the divergence to exist everywhere): ``tanh``, ``softplus``
and ``silu`` are smooth (C^∞); ``elu`` is C¹ but not C² (its second derivative jumps at 0).

References:
    Grathwohl et al. (2019). FFJORD. https://arxiv.org/abs/1810.01367
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "default_activation", "ConcatSquashLinear", "ConcatSquashMLP", "LinearField"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "silu": nn.SiLU,
}


def default_activation(dim: int) -> str:
    """The activation of a :class:`ConcatSquashMLP` built without one: ``"tanh"`` (FFJORD's) for
    one- or two-dimensional data, ``"silu"`` above.

    Why: on the tuning sets of benchmarks/tune_heldout.py (an elongated Gaussian mixture in 8-D and a
    warped one in 10-D) a SiLU field ended nearer the truth than a tanh one for the same training,
    by maximum likelihood (0.119 against 0.207 nats, 0.311 against 0.456 at the trainer's
    defaults) and by flow matching (RECIPE.md, eighth sweep). A flow's field grows about linearly far
    from the data (straight paths from a Gaussian), which SiLU does and a saturating tanh does not.
    The 2-D recipes of chapters 3-8 were chosen with tanh and keep it.
    """
    return "tanh" if dim <= 2 else "silu"


def _times_activation_derivative(name: str, tangents: Tensor, z: Tensor, a: Tensor) -> Tensor:
    """``tangents ⊙ act'(z)`` for the activations of :data:`ACTIVATIONS` (default parameters), given
    ``a = act(z)``; ``tangents`` has shape (D, n, width) or (D, 1, width), ``z`` and ``a`` (n, width)."""
    if name == "tanh":  # T ⊙ (1 - a²) in one (twice differentiable) operation
        return torch.ops.aten.tanh_backward(tangents, a)
    if name == "softplus":  # nn.Softplus(beta=1, threshold=20) is the identity above 20
        return tangents * torch.where(z > 20, torch.ones_like(z), torch.sigmoid(z))
    if name == "elu":  # alpha = 1: exp(z) = a + 1 below zero
        return tangents * torch.where(z > 0, torch.ones_like(z), a + 1)
    if name == "silu":
        s = torch.sigmoid(z)
        return tangents * (s * (1 + z * (1 - s)))
    raise ValueError(f"no derivative for activation {name!r}")


class ConcatSquashLinear(nn.Module):
    """A linear layer whose output is gated and shifted by the time ``t``.

    Arguments:
        in_features: input width.
        out_features: output width.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(1, out_features)
        self.shift = nn.Linear(1, out_features, bias=False)

    def gate_and_shift(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """The time terms ``sigmoid(a t + c)`` and ``d t``: each shape (1, out) for a scalar ``t``,
        (n, out) for one time per point (``t`` of shape (n,))."""
        tt = t.reshape(-1, 1).to(like)
        return torch.sigmoid(self.gate(tt)), self.shift(tt)

    def forward(self, t: Tensor, h: Tensor) -> Tensor:
        """Arguments: ``t`` a scalar tensor or one time per point, shape (n,); ``h`` shape (n, in).
        Returns shape (n, out)."""
        gate, shift = self.gate_and_shift(t, h)
        return self.linear(h) * gate + shift


class ConcatSquashMLP(nn.Module):
    """A time-dependent MLP vector field ``f(t, x)`` on R^D.

    Arguments:
        dim: the dimension D of the points.
        hidden: widths of the hidden layers, e.g. ``(64, 64, 64)``.
        activation: one of :data:`ACTIVATIONS`: ``tanh``, ``softplus``, ``silu`` (smooth) or ``elu`` (C¹);
            ``None``: :func:`default_activation` of ``dim`` (tanh in one or two dimensions, silu above).
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 64, 64), activation: str | None = None) -> None:
        super().__init__()
        if activation is None:
            activation = default_activation(dim)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {tuple(ACTIVATIONS)}")
        if dim < 1 or any(int(w) < 1 for w in hidden):
            raise ValueError(f"dim and hidden widths must be positive, got dim={dim}, hidden={tuple(hidden)}")
        widths = [dim, *[int(w) for w in hidden], dim]
        self.dim = dim
        self.activation = activation
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = ACTIVATIONS[activation]()

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        """Arguments: ``t`` a scalar (tensor or float) or one time per point, shape (n,) (flow
        matching needs that); ``x`` shape (n, D). Returns f(t, x), shape (n, D)."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h

    def _hidden_tangents(
        self, t: Tensor | float, x: Tensor, direction: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """Run every layer but the last on the points and their tangents.

        Each ConcatSquash layer is applied as one affine map whose weight and bias already carry
        the time gate and shift (``(W h + b) ⊙ g + s = (g ⊙ W) h + (g ⊙ b + s)``), so that the
        gate multiplies a (out, in) matrix instead of every point's activations.

        Arguments:
            direction: ``None`` for the D coordinate directions (the full Jacobian), or one
                direction per point, shape (n, D) (a Jacobian-vector product).

        Returns:
            ``(h, T, W_L, b_L)``: the last hidden activations (n, width), their tangents
            ``T[k] = ∂h/∂x_k`` shape (D, n, width) (with a ``direction`` ε: shape (1, n, width),
            ``T[0] = (∂h/∂x) ε``; ``None`` when there is no hidden layer), and the last layer's
            gated weight (D, width) and bias (D,).
        """
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        h, tangents = x, None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            gate, shift = layer.gate_and_shift(t, h)  # (1, out) each
            weight = layer.linear.weight * gate.T  # (out, in)
            bias = (layer.linear.bias * gate + shift).reshape(-1)
            if i == last:
                return h, tangents, weight, bias
            z = F.linear(h, weight, bias)
            # ∂z/∂x_k: at the first layer the same for every point; after it, one batched matmul
            if tangents is None:
                tangents = weight.T.unsqueeze(1) if direction is None else F.linear(direction, weight).unsqueeze(0)
            else:
                tangents = F.linear(tangents, weight)
            h = self.act(z)
            tangents = _times_activation_derivative(self.activation, tangents, z, h)
        raise AssertionError("unreachable: the MLP has at least one layer")

    def forward_with_tangents(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        """``f(t, x)`` and its Jacobian, propagated forward through the layers in one pass.

        Each layer maps the tangents ``T_k = ∂h/∂x_k`` of all D input directions at once:
        ``T ← (g ⊙ W) T`` through a ConcatSquash layer with gate ``g`` and ``T ← act'(z) ⊙ T``
        through an activation. That is D Jacobian-vector products batched into one graph,
        instead of the D separate vector-Jacobian products (D backward passes) of
        :func:`cnf_lib.trace.divergence_exact`; for small D it is faster, and training
        backpropagates through one ordinary graph (no double backward).

        Arguments:
            t: a scalar (tensor or float).
            x: the points, shape (n, D).

        Returns:
            ``(f, T)``: ``f`` shape (n, D) and the tangents ``T`` shape (D, n, D) with
            ``T[k, :, i] = ∂f_i/∂x_k``.
        """
        h, tangents, weight, bias = self._hidden_tangents(t, x)
        out = weight.T.unsqueeze(1) if tangents is None else F.linear(tangents, weight)
        return F.linear(h, weight, bias), out.expand(self.dim, x.shape[0], self.dim)

    def forward_with_jacobian(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        """``f(t, x)`` and the Jacobian ``∂f/∂x`` of each point, shapes (n, D) and (n, D, D).

        ``J[p, i, k] = ∂f_i/∂x_k`` at point ``p``; see :meth:`forward_with_tangents`.
        """
        f, tangents = self.forward_with_tangents(t, x)
        return f, tangents.permute(1, 2, 0)

    def divergence(
        self, t: Tensor | float, x: Tensor, frobenius: bool = True
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``f(t, x)``, its exact divergence and the squared Frobenius norm of its Jacobian.

        The :class:`~cnf_lib.cnf.CNF` calls this for ``trace="exact"`` instead of
        :func:`cnf_lib.trace.divergence_exact` (the same values from far fewer autograd
        operations; see :meth:`forward_with_tangents`).

        Arguments:
            t: a scalar (tensor or float).
            x: the points, shape (n, D).
            frobenius: also return ``‖∂f/∂x‖²_F`` (else ``None``; the trace alone skips the
                last layer's full Jacobian: ``tr J = Σ_k W_L[k] · T[k]``).

        Returns:
            ``(f, div, frobenius)``, shapes (n, D), (n,), (n,).
        """
        if frobenius:
            f, tangents = self.forward_with_tangents(t, x)
            return f, tangents.diagonal(dim1=0, dim2=2).sum(-1), tangents.pow(2).sum((0, 2))
        h, tangents, weight, bias = self._hidden_tangents(t, x)
        if tangents is None:  # no hidden layer: f is affine in x
            div = weight.diagonal().sum().expand(x.shape[0])
        else:
            div = (tangents * weight.unsqueeze(1)).sum((0, 2))
        return F.linear(h, weight, bias), div, None

    def divergence_hutchinson(
        self, t: Tensor | float, x: Tensor, probe: Tensor, frobenius: bool = True
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``f(t, x)``, Hutchinson's estimate ``εᵀ (∂f/∂x) ε`` and ``‖(∂f/∂x) ε‖²``, in one forward pass.

        The probe ``ε`` travels through the layers as a tangent (a Jacobian-vector product,
        :meth:`_hidden_tangents` with one direction), so training backpropagates through one
        ordinary graph instead of differentiating :func:`cnf_lib.trace.divergence_hutchinson`'s
        vector-Jacobian product a second time. The trace estimate is the same number; the
        Frobenius estimate uses ``Jε`` where the VJP route uses ``εᵀJ`` (both unbiased).

        Arguments:
            t: a scalar (tensor or float).
            x: the points, shape (n, D).
            probe: one probe per point, shape (n, D) (zero mean, identity covariance).
            frobenius: also return the Frobenius estimate (else ``None``).

        Returns:
            ``(f, div, frobenius)``, shapes (n, D), (n,), (n,).
        """
        h, tangents, weight, bias = self._hidden_tangents(t, x, direction=probe)
        jvp = F.linear(probe, weight) if tangents is None else F.linear(tangents[0], weight)  # (n, D)
        frob = jvp.pow(2).sum(1) if frobenius else None
        return F.linear(h, weight, bias), (probe * jvp).sum(1), frob


class LinearField(nn.Module):
    """The linear field ``f(t, x) = A x``, whose flow map is ``exp(tA)`` (a closed form to test against).

    Arguments:
        A: the matrix, shape (D, D); it becomes a trainable parameter.
    """

    def __init__(self, A: Tensor) -> None:
        super().__init__()
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"A must be a square matrix, got shape {tuple(A.shape)}")
        self.A = nn.Parameter(A.detach().clone())

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        """Arguments: ``t`` (unused), ``x`` shape (n, D). Returns ``x Aᵀ``, shape (n, D)."""
        return x @ self.A.T

    def divergence(
        self, t: Tensor | float, x: Tensor, frobenius: bool = True
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(f, tr A, ‖A‖²_F)`` for each point, shapes (n, D), (n,), (n,) (see :meth:`ConcatSquashMLP.divergence`)."""
        n = x.shape[0]
        frob = self.A.pow(2).sum().expand(n) if frobenius else None
        return self.forward(t, x), self.A.diagonal().sum().expand(n), frob
