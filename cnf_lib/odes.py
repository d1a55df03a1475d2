r"""Tools for studying neural ODEs with ``torchdiffeq``: counting, test problems, memory.

* :class:`CountNFE` wraps any vector field ``f(t, y)`` and counts its evaluations (the
  *number of function evaluations*, NFE, the cost unit of an ODE solver). It is an
  ``nn.Module``, so it also works with :func:`torchdiffeq.odeint_adjoint`.
* :func:`fixed_grid` gives a fixed-step solver (``euler``, ``midpoint``, ``rk4``) exactly
  ``n`` equal steps, in either time direction.
* Test problems with closed-form solutions, to measure a solver's error against the truth:
  :class:`LinearODE` (``dy/dt = A y``, solution ``exp(tA) y0``) and :class:`LimitCycle`
  (a nonlinear 2-D oscillator whose points spiral onto the unit circle).
* :class:`SavedTensorMemory` measures the activation memory autograd keeps for the backward
  pass, by watching what is saved (``torch.autograd.graph.saved_tensors_hooks``). It is exact
  and deterministic on any device, unlike process-level memory on a CPU.

References:
    Chen et al. (2018). Neural ordinary differential equations. https://arxiv.org/abs/1806.07366
    Hairer, Nørsett & Wanner (1993). Solving Ordinary Differential Equations I, 2nd ed. Springer.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .fields import LinearField

__all__ = ["CountNFE", "fixed_grid", "LinearODE", "LimitCycle", "SavedTensorMemory"]


class CountNFE(nn.Module):
    """A vector field that counts its own evaluations.

    Arguments:
        func: the field ``func(t, y)``: an ``nn.Module`` (its parameters become this module's,
            so :func:`torchdiffeq.odeint_adjoint` finds them) or any callable.

    Example:
        >>> f = CountNFE(field)
        >>> y = odeint(f, y0, t, method="dopri5", rtol=1e-6, atol=1e-6)
        >>> f.nfe          # evaluations made by that solve
        >>> f.reset()
    """

    def __init__(self, func: Callable[[Tensor, Any], Any]) -> None:
        super().__init__()
        if not callable(func):
            raise ValueError(f"func must be callable as func(t, y), got {type(func).__name__}")
        self.func = func
        self.nfe = 0

    def forward(self, t: Tensor, y: Any) -> Any:
        """Evaluate ``func(t, y)`` and count one evaluation."""
        self.nfe += 1
        return self.func(t, y)

    def reset(self) -> None:
        """Set the count back to 0."""
        self.nfe = 0


def fixed_grid(n_steps: int) -> dict[str, Any]:
    """``options`` for a ``torchdiffeq`` fixed-step solver: exactly ``n_steps`` equal steps.

    ``options=dict(step_size=h)`` builds its grid with a ceiling of ``(t1 - t0) / h``, which
    rounding can turn into one extra, tiny step; this grid is ``linspace(t[0], t[-1], n + 1)``,
    in either time direction. Output times between ``t[0]`` and ``t[-1]`` are interpolated by
    the solver. With :func:`torchdiffeq.odeint_adjoint` the same options (and so the same
    number of steps) are used by the backward solve.

    Arguments:
        n_steps: the number of steps, at least 1.

    Returns:
        ``{"grid_constructor": ...}``, to pass as ``odeint(..., options=fixed_grid(n))``.
    """
    if isinstance(n_steps, bool) or int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    n = int(n_steps)

    def grid(func: Any, y0: Tensor, t: Tensor) -> Tensor:
        return torch.linspace(float(t[0]), float(t[-1]), n + 1, dtype=t.dtype, device=t.device)

    return {"grid_constructor": grid}


def _times(t: float | Tensor, like: Tensor) -> tuple[Tensor, bool]:
    tt = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if tt.ndim > 1:
        raise ValueError(f"t must be a scalar or 1-D, got shape {tuple(tt.shape)}")
    return tt.reshape(-1), tt.ndim == 0


def _states(y0: Tensor, dim: int | None) -> Tensor:
    y0 = torch.as_tensor(y0)
    if y0.ndim != 2 or (dim is not None and y0.shape[1] != dim):
        want = f"(n, {dim})" if dim is not None else "(n, D)"
        raise ValueError(f"y0 must have shape {want}, got {tuple(y0.shape)}")
    if not y0.is_floating_point():
        y0 = y0.to(torch.get_default_dtype())
    return y0


class LinearODE(LinearField):
    r"""``dy/dt = A y``, with the closed-form solution :math:`y(t) = e^{tA} y_0`.

    A :class:`cnf_lib.fields.LinearField` (so ``forward(t, y) = y Aᵀ``) that also knows its
    solution. With ``A = [[-a, -ω], [ω, -a]]`` it is a damped rotation; with a random ``A``,
    a generic linear system.

    Arguments:
        A: the matrix, shape (D, D).
    """

    def solution(self, t: float | Tensor, y0: Tensor) -> Tensor:
        """The exact state at time(s) ``t`` from ``y0`` at time 0.

        Arguments:
            t: a scalar, or a 1-D tensor of T times (any sign).
            y0: initial states, shape (n, D).

        Returns:
            Shape (n, D) for a scalar ``t``, (T, n, D) for T times (``odeint``'s layout).
        """
        y0 = _states(y0, self.A.shape[0])
        times, scalar = _times(t, y0)
        A = self.A.to(y0)
        out = torch.stack([y0 @ torch.linalg.matrix_exp(ti * A).T for ti in times])
        return out[0] if scalar else out


class LimitCycle(nn.Module):
    r"""A nonlinear 2-D oscillator with a stable limit cycle, solved in closed form.

    In polar coordinates :math:`dr/dt = r(1 - r^2)` and :math:`d\theta/dt = \omega` (the normal
    form of a Hopf bifurcation); in Cartesian coordinates

    .. math:: \dot y_1 = y_1 (1 - r^2) - \omega y_2, \qquad \dot y_2 = y_2 (1 - r^2) + \omega y_1 .

    Points spiral onto the unit circle: :math:`r(t)^2 = r_0^2 / (r_0^2 + (1 - r_0^2) e^{-2t})`
    and :math:`\theta(t) = \theta_0 + \omega t`. Near the circle the flow contracts (its
    divergence is :math:`2 - 4r^2`, −2 on the circle), so integrating *backwards* expands.
    Backwards from :math:`r_0 > 1` the solution blows up in finite time.

    Arguments:
        omega: the angular velocity ω.
    """

    def __init__(self, omega: float = 1.0) -> None:
        super().__init__()
        if not math.isfinite(omega):
            raise ValueError(f"omega must be finite, got {omega}")
        self.omega = float(omega)

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        """The field at points ``y``, shape (n, 2); returns shape (n, 2)."""
        g = 1 - y.pow(2).sum(-1, keepdim=True)
        y1, y2 = y[..., :1], y[..., 1:]
        return torch.cat([y1 * g - self.omega * y2, y2 * g + self.omega * y1], dim=-1)

    def solution(self, t: float | Tensor, y0: Tensor) -> Tensor:
        """The exact state at time(s) ``t`` from ``y0`` at time 0.

        Arguments:
            t: a scalar, or a 1-D tensor of T times (negative times integrate backwards).
            y0: initial states, shape (n, 2).

        Returns:
            Shape (n, 2) for a scalar ``t``, (T, n, 2) for T times.

        Raises:
            ValueError: if a point with ``r0 > 1`` is asked for at a time before its blow-up.
        """
        y0 = _states(y0, 2)
        times, scalar = _times(t, y0)
        r0sq = y0.pow(2).sum(1, keepdim=True)
        out = []
        for ti in times:
            denom = r0sq + (1 - r0sq) * torch.exp(-2 * ti)
            if not bool((denom > 0).all()):
                raise ValueError(f"some points have blown up (r = ∞) before t = {ti.item():g}")
            c, s = torch.cos(self.omega * ti), torch.sin(self.omega * ti)
            rotated = torch.stack([c * y0[:, 0] - s * y0[:, 1], s * y0[:, 0] + c * y0[:, 1]], dim=1)
            out.append(rotated / denom.sqrt())
        result = torch.stack(out)
        return result[0] if scalar else result


class SavedTensorMemory:
    """Measures the memory autograd holds for the backward pass (activation memory).

    Inside the ``with`` block every tensor autograd saves for the backward pass goes through a
    ``saved_tensors_hooks`` pack hook. The meter records each one's storage, counting a storage
    once however many views of it are saved, and leaves out the storages of ``exclude`` (the
    parameters, which exist whether or not anything is saved). It keeps only weak references,
    so it changes nothing about what is freed.

    :attr:`bytes` is the total size of the recorded storages *still alive* when it is read:
    read it after the forward pass and before ``backward()`` (which frees them). This is the
    memory that backpropagation through a solver adds and that the adjoint method saves; it is
    deterministic, the same on every device, and unaffected by the allocator (process-level
    measures on a CPU, like the resident set size, are neither).

    Arguments:
        exclude: tensors not to count (typically ``model.parameters()``).

    Example:
        >>> with SavedTensorMemory(exclude=field.parameters()) as mem:
        ...     loss = odeint(field, y0, t)[-1].pow(2).sum()
        >>> mem.bytes, mem.count
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self._saved: dict[int, list[tuple[weakref.ref, int]]] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def _pack(self, tensor: Tensor) -> Tensor:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. sparse)
            return tensor
        ptr = storage.data_ptr()
        if ptr in self._exclude:
            return tensor
        # Save a new tensor object on the same storage: returning ``tensor`` itself would tie an
        # op's output to its own graph in a reference cycle, and keep it alive after ``del``.
        alias = tensor.detach()
        self._saved.setdefault(ptr, []).append((weakref.ref(alias), storage.nbytes()))
        return alias

    @staticmethod
    def _unpack(tensor: Tensor) -> Tensor:
        return tensor

    def __enter__(self) -> "SavedTensorMemory":
        if self._hooks is not None:
            raise RuntimeError("this SavedTensorMemory is already in use")
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)

    def _alive(self) -> list[int]:
        sizes = []
        for entries in self._saved.values():
            alive = [n for ref, n in entries if ref() is not None]
            if alive:
                sizes.append(max(alive))
        return sizes

    @property
    def bytes(self) -> int:
        """Bytes of the distinct saved storages that are still alive."""
        return sum(self._alive())

    @property
    def count(self) -> int:
        """Number of distinct saved storages that are still alive."""
        return len(self._alive())
