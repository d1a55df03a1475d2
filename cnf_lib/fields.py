"""Time-conditioned vector fields ``f(t, x)`` for continuous normalizing flows.

A :class:`ConcatSquashMLP` is FFJORD's field: each layer is a linear map of ``x`` whose output is
gated and shifted by functions of ``t``::

    layer(t, h) = (W h + b) * sigmoid(a t + c) + d t

with smooth activations between layers (a CNF needs a field that is at least C¹ in ``x`` for
the solver to take large steps and for the divergence to exist everywhere).

References:
    Grathwohl et al. (2019). FFJORD. https://arxiv.org/abs/1810.01367
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "ConcatSquashLinear", "ConcatSquashMLP", "LinearField"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "silu": nn.SiLU,
}


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

    def forward(self, t: Tensor, h: Tensor) -> Tensor:
        """Arguments: ``t`` a scalar tensor, ``h`` shape (n, in). Returns shape (n, out)."""
        tt = t.reshape(1, 1).to(h)
        return self.linear(h) * torch.sigmoid(self.gate(tt)) + self.shift(tt)


class ConcatSquashMLP(nn.Module):
    """A time-dependent MLP vector field ``f(t, x)`` on R^D.

    Arguments:
        dim: the dimension D of the points.
        hidden: widths of the hidden layers, e.g. ``(64, 64, 64)``.
        activation: one of :data:`ACTIVATIONS` (smooth ones: ``tanh``, ``softplus``, ``elu``, ``silu``).
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 64, 64), activation: str = "tanh") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {tuple(ACTIVATIONS)}")
        if dim < 1 or any(int(w) < 1 for w in hidden):
            raise ValueError(f"dim and hidden widths must be positive, got dim={dim}, hidden={tuple(hidden)}")
        widths = [dim, *[int(w) for w in hidden], dim]
        self.dim = dim
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = ACTIVATIONS[activation]()

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        """Arguments: ``t`` a scalar (tensor or float), ``x`` shape (n, D). Returns f(t, x), shape (n, D)."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h


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
