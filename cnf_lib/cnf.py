"""The continuous normalizing flow (CNF) on top of ``torchdiffeq``.

Conventions (the book's appendix "Conventions across CNF codes" compares them with other codes):

* time runs from the **prior at t = 0** to the **data at t = t1** (default 1);
* the field ``f(t, x)`` moves points forward in time, ``dx/dt = f(t, x)``;
* along a path, ``d log p(x(t))/dt = -tr(∂f/∂x)`` (Chen et al., 2018), so for a data point
  ``x`` at time ``t`` with ``z = x(0)``::

      log p_t(x) = log N(z; 0, I) - ∫_0^t tr(∂f/∂x(s)) ds

  which :meth:`CNF.log_prob` gets by integrating ``(x, Δ)`` from ``t`` back to 0 with
  ``dΔ/ds = tr(∂f/∂x)``: ``Δ(0) = -∫_0^t tr``, so ``log p_t(x) = log N(z) + Δ(0)``;
* the density at t = 0 (the *base*) is N(0, I) unless the CNF is given another one
  (``CNF(..., base=GaussianMixtureBase(...))``: a fixed Gaussian mixture, whose ``log_prob``
  then replaces ``log N(z; 0, I)`` above; the CNF refines the mixture).

Every direction is an argument (``t0``, ``t1`` of a call), never state kept on the model. The
solver, tolerances, adjoint, trace estimator, probe and error control are :class:`SolverSettings`,
and any of them can be overridden per call: ``model.log_prob(x, trace="exact", rtol=1e-5,
atol=1e-5)`` evaluates a model trained with Hutchinson's estimator with the exact trace.

With ``trace="exact"``, a field that has a method ``divergence(t, x, frobenius=True) -> (f, div,
frobenius)`` (shapes (n, D), (n,), (n,); ``frobenius`` may be ``None`` when not asked for)
computes its own divergence: :class:`~cnf_lib.fields.ConcatSquashMLP`
propagates its Jacobian forward through its layers, faster for small D than the D
vector-Jacobian products of :func:`~cnf_lib.trace.divergence_exact`, which any other field gets
(see the Performance appendix).

References:
    Chen et al. (2018). Neural ordinary differential equations. https://arxiv.org/abs/1806.07366
    Grathwohl et al. (2019). FFJORD. https://arxiv.org/abs/1810.01367
    Finlay et al. (2020). How to train your neural ODE (RNODE). https://arxiv.org/abs/2002.02798
    Kidger et al. (2021). "Hey, that's not an ODE": faster ODE adjoints via seminorms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from .checks import categorical, check_points, module_device, randn
from .fields import ConcatSquashMLP
from .trace import PROBES, divergence_exact, divergence_hutchinson, sample_probe

__all__ = ["SolverSettings", "SolverError", "FlowResult", "CNF", "GaussianMixtureBase",
           "standard_normal_log_prob"]

TRACES: tuple[str, ...] = ("exact", "hutchinson")
ERROR_CONTROLS: tuple[str, ...] = ("mixed", "state_only", "joint")
ADAPTIVE_METHODS: tuple[str, ...] = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "tsit5")


class SolverError(RuntimeError):
    """The ODE solver failed (step size underflow, too many steps, non-finite state)."""


@dataclass(frozen=True)
class SolverSettings:
    """How a CNF integrates; every field can be overridden per call.

    Attributes:
        method: a ``torchdiffeq`` solver: ``"dopri5"`` (adaptive), ``"rk4"``, ``"euler"``, ...
        rtol, atol: tolerances of an adaptive solver.
        step_size: the step of a fixed-step solver (``None`` for adaptive ones).
        max_num_steps: an adaptive solver gives up (with :class:`SolverError`) after this many steps.
        adjoint: backpropagate with the adjoint method (memory O(1) in the steps) instead of
            through the solver's operations.
        adjoint_seminorm: with the adjoint, leave the parameter-gradient states out of the
            backward solve's error control (Kidger et al., 2021): fewer backward steps.
        trace: ``"exact"`` divergence or ``"hutchinson"``'s estimator.
        probe: Hutchinson probe, ``"rademacher"`` or ``"gaussian"``.
        redraw_probe: draw a new probe at every function evaluation. Wrong (the ODE becomes
            random and the solver's steps collapse); kept only to show that in chapter 4.
        error_control: which states the adaptive step-size control watches: ``"mixed"`` (the
            larger RMS error of x and of log p, torchdiffeq's default), ``"state_only"`` (x
            alone; log p follows along) or ``"joint"`` (one RMS over x and log p together).
            Regularizer states never take part.
    """

    method: str = "dopri5"
    rtol: float = 1e-3
    atol: float = 1e-3
    step_size: float | None = None
    max_num_steps: int = 10_000
    adjoint: bool = False
    adjoint_seminorm: bool = False
    trace: str = "exact"
    probe: str = "rademacher"
    redraw_probe: bool = False
    error_control: str = "mixed"

    def __post_init__(self) -> None:
        if self.trace not in TRACES:
            raise ValueError(f"unknown trace {self.trace!r}; expected one of {TRACES}")
        if self.probe not in PROBES:
            raise ValueError(f"unknown probe {self.probe!r}; expected one of {PROBES}")
        if self.error_control not in ERROR_CONTROLS:
            raise ValueError(f"unknown error_control {self.error_control!r}; expected one of {ERROR_CONTROLS}")
        if not (self.rtol > 0 and self.atol > 0):
            raise ValueError(f"tolerances must be positive, got rtol={self.rtol}, atol={self.atol}")

    def update(self, **overrides: Any) -> "SolverSettings":
        """A copy with some fields changed; unknown names raise a ``ValueError``."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown solver setting(s) {sorted(unknown)}; known: {sorted(known)}")
        return replace(self, **overrides)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) of each row. Arguments: ``z`` shape (n, D). Returns shape (n,)."""
    return -0.5 * z.pow(2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


class GaussianMixtureBase(nn.Module):
    r"""A fixed Gaussian mixture in :math:`\mathbb{R}^D`, as a CNF's density at t = 0.

    :math:`p(z) = \sum_k w_k\, \mathcal{N}(z; \mu_k, \Sigma_k)`. The weights, means and
    Cholesky factors :math:`L_k` (:math:`\Sigma_k = L_k L_k^\top`) are buffers, not
    parameters: training the CNF leaves them as they are, while ``state_dict``, saving and
    ``.to(device)`` carry them. One component is a full-covariance Gaussian.

    Arguments:
        weights: mixture weights, shape (K,), positive (normalized here).
        means: shape (K, D).
        covariances: symmetric positive definite, shape (K, D, D).

    Raises:
        ValueError: on inconsistent shapes, non-positive weights or a covariance that is not
            positive definite.
    """

    def __init__(self, weights: Tensor, means: Tensor, covariances: Tensor) -> None:
        super().__init__()
        w = torch.as_tensor(weights, dtype=torch.float64)
        mu = torch.as_tensor(means, dtype=torch.float64)
        cov = torch.as_tensor(covariances, dtype=torch.float64)
        if mu.ndim != 2 or w.shape != (mu.shape[0],) or cov.shape != (*mu.shape, mu.shape[1]):
            raise ValueError(
                "a Gaussian mixture needs weights (K,), means (K, D) and covariances (K, D, D); got "
                f"{tuple(w.shape)}, {tuple(mu.shape)}, {tuple(cov.shape)}"
            )
        if not (torch.isfinite(w).all() and (w > 0).all()):
            raise ValueError(f"mixture weights must be positive and finite; got {w.tolist()}")
        chol, info = torch.linalg.cholesky_ex(0.5 * (cov + cov.transpose(1, 2)))
        if (info != 0).any() or not torch.isfinite(mu).all():
            raise ValueError("every covariance must be positive definite and every mean finite "
                             "(add a small ridge to the covariances, e.g. reg_covar in scikit-learn)")
        self.register_buffer("log_weights", (w / w.sum()).log().float())
        self.register_buffer("means", mu.float())
        self.register_buffer("cholesky", chol.float())

    @classmethod
    def placeholder(cls, components: int, dim: int) -> "GaussianMixtureBase":
        """A mixture of the right shapes (equal weights, zero means, identity covariances), to be
        filled by ``load_state_dict``."""
        return cls(torch.ones(components), torch.zeros(components, dim),
                   torch.eye(dim).expand(components, dim, dim))

    @property
    def dim(self) -> int:
        """The dimension D."""
        return int(self.means.shape[1])

    @property
    def components(self) -> int:
        """The number of components K."""
        return int(self.means.shape[0])

    def config(self) -> dict[str, Any]:
        """What rebuilds the shapes (the values are in the state dict)."""
        return {"kind": "gaussian_mixture", "components": self.components}

    def log_prob(self, z: Tensor) -> Tensor:
        """The log-density of each row: ``z`` shape (n, D), returns shape (n,)."""
        chol = self.cholesky.to(z.dtype)
        diff = (z.unsqueeze(0) - self.means.to(z.dtype).unsqueeze(1)).transpose(1, 2)  # (K, D, n)
        white = torch.linalg.solve_triangular(chol, diff, upper=False)               # (K, D, n)
        log_det = chol.diagonal(dim1=1, dim2=2).log().sum(1)                         # (K,)
        per_component = (self.log_weights.to(z.dtype).unsqueeze(1) - 0.5 * white.pow(2).sum(1)
                         - log_det.unsqueeze(1) - 0.5 * self.dim * math.log(2 * math.pi))
        return torch.logsumexp(per_component, 0)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws, shape (n, D), float64 on the CPU: the component and the standard normals
        come from ``generator`` (on its own device, so a seed gives the same draws anywhere)."""
        k = categorical(self.log_weights.double().exp().cpu(), int(n), generator)
        eps = randn((int(n), self.dim), generator, torch.float64, "cpu")
        chol, mu = self.cholesky.double().cpu(), self.means.double().cpu()
        return mu[k] + (chol[k] @ eps.unsqueeze(-1)).squeeze(-1)


def _rms(x: Tensor) -> Tensor:
    return x.pow(2).mean().sqrt()


class _Dynamics(nn.Module):
    """The augmented ODE of one solve: (x, Δlog p, kinetic, Frobenius).

    Created anew for each solve, so that its probe and its call counter belong to that solve.
    """

    def __init__(
        self,
        field: nn.Module,
        settings: SolverSettings,
        probe: Tensor | None,
        n_extra: int,
        generator: torch.Generator | None,
    ) -> None:
        super().__init__()
        self.field = field
        self.settings = settings
        self.probe = probe
        self.n_extra = n_extra  # 0: x only; 1: + log p; 3: + kinetic + Frobenius
        self.generator = generator
        self.calls = 0

    def forward(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        self.calls += 1
        x = state[0]
        if self.n_extra == 0:
            return (self.field(t, x),)
        f, div, frob = self._divergence(t, x, frobenius=self.n_extra == 3)
        if self.n_extra == 3:
            return f, div, f.pow(2).sum(1), frob
        return f, div

    def _divergence(self, t: Tensor, x: Tensor, frobenius: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(f, div, Frobenius)``: by the field's own forward-mode methods where it has them (one
        graph, no vector-Jacobian products), else by autograd (:mod:`cnf_lib.trace`)."""
        s = self.settings
        exact_method = getattr(self.field, "divergence", None)
        if s.trace == "exact" and callable(exact_method):
            return exact_method(t, x, frobenius=frobenius)
        hutchinson_method = getattr(self.field, "divergence_hutchinson", None)
        if s.trace == "hutchinson" and not s.redraw_probe and callable(hutchinson_method):
            return hutchinson_method(t, x, self.probe, frobenius=frobenius)
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            f = self.field(t, x)
            if s.trace == "exact":
                div, frob = divergence_exact(f, x, create_graph=create_graph)
            else:
                probe = sample_probe(x, s.probe, self.generator) if s.redraw_probe else self.probe
                div, frob = divergence_hutchinson(f, x, probe, create_graph=create_graph)
        if not create_graph:
            f, div, frob = f.detach(), div.detach(), frob.detach()
        return f, div, frob


@dataclass
class FlowResult:
    """What one solve of a CNF returns.

    Attributes:
        x: the end points, shape (n, D).
        delta_logp: ``∫_{t_start}^{t_end} tr(∂f/∂x) dt`` along each path, shape (n,) (``None``
            when the log-density was not integrated).
        kinetic: ``∫ ‖f‖² dt`` along each path over the time span, shape (n,) or ``None``.
        frobenius: ``∫ ‖∂f/∂x‖²_F dt`` (exact or Hutchinson estimate), shape (n,) or ``None``.
        nfe_forward: function evaluations of the forward solve.
    """

    x: Tensor
    delta_logp: Tensor | None
    kinetic: Tensor | None
    frobenius: Tensor | None
    nfe_forward: int
    _dynamics: _Dynamics

    @property
    def nfe_backward(self) -> int:
        """Function evaluations made by the backward pass so far (adjoint only; 0 otherwise)."""
        return self._dynamics.calls - self.nfe_forward


class CNF(nn.Module):
    """A continuous normalizing flow with a standard-normal prior at t = 0 (or another base).

    Arguments:
        dim: dimension D of the data.
        field: the vector field ``f(t, x)``; by default a :class:`ConcatSquashMLP`.
        hidden, activation: widths and activation of the default field (``activation=None``:
            tanh for one- or two-dimensional data, silu above; :func:`~cnf_lib.fields.default_activation`).
        t1: the time at which the model's density is the data density.
        base: the density at t = 0: ``None`` for N(0, I), or a :class:`GaussianMixtureBase`
            (any module with ``dim``, ``config()``, ``log_prob(z)`` (n, D) → (n,) and
            ``sample(n, generator)`` → (n, D) works, but only the mixture is rebuilt by
            :meth:`from_config`). Its tensors are buffers: they are saved and moved with the
            model and not trained.
        **settings: :class:`SolverSettings` fields (``method``, ``rtol``, ``trace``, ...).

    Example:
        >>> model = CNF(2, hidden=(64, 64, 64), trace="exact", rtol=1e-3, atol=1e-3)
        >>> logp = model.log_prob(x)                                   # (n,)
        >>> logp = model.log_prob(x, rtol=1e-5, atol=1e-5)             # tighter, this call only
        >>> samples = model.sample(1000, generator=torch.Generator().manual_seed(0))
    """

    def __init__(
        self,
        dim: int,
        field: nn.Module | None = None,
        hidden: Sequence[int] = (64, 64, 64),
        activation: str | None = None,
        t1: float = 1.0,
        base: nn.Module | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        if int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if base is not None and getattr(base, "dim", None) != int(dim):
            raise ValueError(f"the base density has dim={getattr(base, 'dim', None)!r}; the CNF has "
                             f"dim={int(dim)}: build the base in the same dimension")
        self.dim = int(dim)
        self.field = field if field is not None else ConcatSquashMLP(self.dim, hidden, activation)
        self.t1 = float(t1)
        self.settings = SolverSettings().update(**settings)
        if field is None:
            self._config = dict(dim=self.dim, field="ConcatSquashMLP", hidden=tuple(int(h) for h in hidden),
                                activation=self.field.activation, t1=self.t1)
        else:  # a custom field: its class names it; hidden/activation were not used
            self._config = dict(dim=self.dim, field=type(field).__qualname__, t1=self.t1)
        # N(0, I) is no module and no config entry: models without a base save as they always did
        self.base = base
        if base is not None:
            self._config["base"] = dict(base.config())

    def config(self) -> dict[str, Any]:
        """What rebuilds this model, as plain values: ``dim``, ``field`` (the field's class name),
        ``hidden`` and ``activation`` (the default field only), ``t1``, ``settings`` and, for a
        model with a base density other than N(0, I), ``base`` (its kind and shapes)."""
        return {**self._config, "settings": asdict(self.settings)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CNF":
        """A new model (fresh parameters; a mixture base of the right shapes, to be filled by
        ``load_state_dict``) from :meth:`config` of a model with the default field."""
        if config.get("field", "ConcatSquashMLP") != "ConcatSquashMLP":
            raise ValueError(
                f"this CNF was built with a custom field ({config['field']}); build it the same way "
                "and load its parameters with cnf_lib.saving.load_model(path, model=...)"
            )
        base = None
        if config.get("base") is not None:
            kind = config["base"].get("kind")
            if kind != "gaussian_mixture":
                raise ValueError(f"unknown base density kind {kind!r}; this cnf_lib rebuilds "
                                 "'gaussian_mixture' only (build the model yourself and load its state)")
            base = GaussianMixtureBase.placeholder(int(config["base"]["components"]), int(config["dim"]))
        return cls(int(config["dim"]), hidden=tuple(int(h) for h in config["hidden"]),
                   activation=str(config["activation"]), t1=float(config["t1"]), base=base,
                   **config["settings"])

    def base_log_prob(self, z: Tensor) -> Tensor:
        """The log-density at t = 0 of each row of ``z`` (n, D): N(0, I) or the base's. Shape (n,)."""
        return standard_normal_log_prob(z) if self.base is None else self.base.log_prob(z)

    def sample_base(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of the density at t = 0, shape (n, D), in the model's dtype and on its device
        (drawn from ``generator`` on its own device: :mod:`cnf_lib.checks`)."""
        param = next(self.parameters())
        if self.base is None:
            return randn((int(n), self.dim), generator, param.dtype, param.device)
        return self.base.sample(int(n), generator).to(dtype=param.dtype, device=param.device)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters (where it computes, and where results are returned)."""
        return module_device(self)

    def _points(self, x: Tensor, name: str) -> Tensor:
        """Validate points (shape (n, D), finite) and move them to the model's dtype and device."""
        param = next(self.parameters(), None)
        if param is None:
            return check_points(x, name, dim=self.dim)
        return check_points(x, name, dim=self.dim, dtype=param.dtype).to(param.device)

    # -- the one integrator everything goes through -------------------------------------------
    def flow(
        self,
        x: Tensor,
        t_start: float,
        t_end: float,
        *,
        logdet: bool = True,
        regularize: bool = False,
        generator: torch.Generator | None = None,
        **overrides: Any,
    ) -> FlowResult:
        """Integrate points from ``t_start`` to ``t_end`` (either direction).

        Arguments:
            x: the points at ``t_start``, shape (n, D).
            t_start, t_end: the time span.
            logdet: also integrate the divergence (``delta_logp``).
            regularize: also integrate the kinetic energy and the Jacobian Frobenius norm.
            generator: for the Hutchinson probe.
            **overrides: :class:`SolverSettings` fields for this call only.

        Returns:
            A :class:`FlowResult`.
        """
        x = self._points(x, "x")
        s = self.settings.update(**overrides) if overrides else self.settings
        n_extra = 3 if regularize else (1 if logdet else 0)
        probe = None
        if n_extra and s.trace == "hutchinson":
            probe = sample_probe(x, s.probe, generator)
        dyn = _Dynamics(self.field, s, probe, n_extra, generator)

        zeros = x.new_zeros(x.shape[0])
        if float(t_start) == float(t_end):  # an empty span: the identity map, no solve
            return FlowResult(x=x, delta_logp=zeros if n_extra else None,
                              kinetic=zeros if n_extra == 3 else None,
                              frobenius=zeros if n_extra == 3 else None, nfe_forward=0, _dynamics=dyn)
        state = (x,) + (zeros,) * n_extra
        times = torch.tensor([t_start, t_end], dtype=x.dtype, device=x.device)
        sign = 1.0 if t_end >= t_start else -1.0

        options = _solver_options(s)
        if n_extra and s.method in ADAPTIVE_METHODS:
            options["norm"] = _norm_for(s.error_control)
        kwargs: dict[str, Any] = dict(rtol=s.rtol, atol=s.atol, method=s.method, options=options)
        try:
            if s.adjoint:
                # torchdiffeq takes the backward options from `options` only when none are given:
                # keep max_num_steps when asking for the seminorm
                adj_opts = None
                if s.adjoint_seminorm and s.method in ADAPTIVE_METHODS:
                    adj_opts = {**_solver_options(s), "norm": "seminorm"}
                out = odeint_adjoint(dyn, state, times, adjoint_options=adj_opts,
                                     adjoint_params=tuple(self.field.parameters()), **kwargs)
            else:
                out = odeint(dyn, state, times, **kwargs)
        except AssertionError as err:  # torchdiffeq signals failures with assert
            raise SolverError(_explain_solver_failure(str(err), s)) from err
        end = tuple(o[-1] for o in out)
        if not torch.isfinite(end[0]).all():
            raise SolverError(
                "the ODE solution is not finite (NaN or inf); the field has blown up. "
                "Try a smaller learning rate, gradient clipping, or kinetic/Frobenius regularization."
            )
        return FlowResult(
            x=end[0],
            delta_logp=end[1] if n_extra else None,
            kinetic=sign * end[2] if n_extra == 3 else None,
            frobenius=sign * end[3] if n_extra == 3 else None,
            nfe_forward=dyn.calls,
            _dynamics=dyn,
        )

    # -- densities ------------------------------------------------------------------------------
    def log_prob(
        self, x: Tensor, t: float | None = None, *, generator: torch.Generator | None = None, **overrides: Any
    ) -> Tensor:
        """Log-density of the model at time ``t`` (default ``t1``), shape (n,).

        Arguments:
            x: points, shape (n, D).
            t: the time whose marginal density is evaluated (the data's is ``t1``; at ``t=0`` it
                is the prior's, with no solve).
            generator: for the Hutchinson probe.
            **overrides: solver settings for this call (e.g. ``trace="exact", rtol=1e-5``).
        """
        return self.log_prob_result(x, t, generator=generator, **overrides)[0]

    def log_prob_result(
        self,
        x: Tensor,
        t: float | None = None,
        *,
        regularize: bool = False,
        generator: torch.Generator | None = None,
        **overrides: Any,
    ) -> tuple[Tensor, FlowResult]:
        """Like :meth:`log_prob`, also returning the :class:`FlowResult` (NFE, regularizers)."""
        t = self.t1 if t is None else float(t)
        res = self.flow(x, t, 0.0, logdet=True, regularize=regularize, generator=generator, **overrides)
        return self.base_log_prob(res.x) + res.delta_logp, res

    # -- maps -----------------------------------------------------------------------------------
    def encode(self, x: Tensor, t: float | None = None, **overrides: Any) -> Tensor:
        """Map data at time ``t`` (default ``t1``) to the prior at 0. Shape (n, D) → (n, D)."""
        t = self.t1 if t is None else float(t)
        return self.flow(x, t, 0.0, logdet=False, **overrides).x

    def decode(self, z: Tensor, t: float | None = None, **overrides: Any) -> Tensor:
        """Map prior points at 0 to time ``t`` (default ``t1``). Shape (n, D) → (n, D)."""
        t = self.t1 if t is None else float(t)
        return self.flow(z, 0.0, t, logdet=False, **overrides).x

    def sample(
        self, n: int, t: float | None = None, *, generator: torch.Generator | None = None, **overrides: Any
    ) -> Tensor:
        """Draw ``n`` samples of the model at time ``t`` (default ``t1``), shape (n, D).

        The prior draws come from ``generator`` on its own device (a CPU generator gives the same
        draws for a model on any device; :mod:`cnf_lib.checks`); the samples are on the model's device.
        """
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        return self.decode(self.sample_base(int(n), generator), t, **overrides)

    def trajectory(self, points: Tensor, times: Sequence[float] | Tensor, **overrides: Any) -> Tensor:
        """Positions of ``points`` (given at ``times[0]``) at each of ``times``.

        Arguments:
            points: shape (n, D), the positions at ``times[0]``.
            times: shape (T,), strictly monotone (increasing: towards the data; decreasing:
                towards the prior).

        Returns:
            Positions, shape (T, n, D).
        """
        x = self._points(points, "points")
        times = torch.as_tensor(times, dtype=x.dtype).flatten().to(x.device)
        if times.numel() < 2:
            raise ValueError(f"times needs at least 2 values, got {times.numel()}")
        steps = times[1:] - times[:-1]
        if not ((steps > 0).all() or (steps < 0).all()):
            raise ValueError("times must be strictly increasing or strictly decreasing")
        s = self.settings.update(**overrides) if overrides else self.settings
        dyn = _Dynamics(self.field, s, None, 0, None)
        try:
            out = odeint(dyn, (x,), times, rtol=s.rtol, atol=s.atol, method=s.method, options=_solver_options(s))
        except AssertionError as err:
            raise SolverError(_explain_solver_failure(str(err), s)) from err
        return out[0]


def _solver_options(s: SolverSettings) -> dict[str, Any]:
    if s.method in ADAPTIVE_METHODS:
        return {"max_num_steps": s.max_num_steps}
    return {"step_size": s.step_size} if s.step_size is not None else {}


def _norm_for(error_control: str):
    """The norm the adaptive solver applies to the (scaled) error of the state tuple.

    Its value is detached: the step sizes it chooses are not differentiated, so backpropagation
    treats the accepted step grid as fixed (as an adaptive checkpoint adjoint does) and skips the
    error estimates and the rejected steps, about 10% of an iteration (benchmarks/). The
    gradient loses only the tiny term of the step sizes' dependence on the parameters.
    """
    if error_control == "state_only":
        return lambda state: _rms(state[0]).detach()
    if error_control == "joint":
        return lambda state: torch.cat([state[0].flatten(), state[1].flatten()]).pow(2).mean().sqrt().detach()
    return lambda state: torch.maximum(_rms(state[0]), _rms(state[1])).detach()


def _explain_solver_failure(message: str, s: SolverSettings) -> str:
    if "underflow" in message:
        return (
            f"ODE solver failed: {message}. The adaptive step size shrank to zero: the dynamics are "
            f"stiff or not finite (rtol={s.rtol}, atol={s.atol}, method={s.method}). Try a smaller "
            "learning rate, kinetic/Frobenius regularization, looser tolerances, or check the data "
            "for NaN/huge values (standardize it)."
        )
    if "max_num_steps" in message:
        return (
            f"ODE solver failed: {message}. The field needs more than max_num_steps={s.max_num_steps} "
            "steps: it has become stiff or very fast. Try kinetic/Frobenius regularization, a smaller "
            "learning rate, looser tolerances, or a larger max_num_steps."
        )
    return f"ODE solver failed: {message}"
