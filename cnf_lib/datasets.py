r"""Two-dimensional toy data sets with their true log-densities, and data utilities.

Every toy is a :class:`Toy2D`: it samples points with a seedable :class:`torch.Generator` and
evaluates its *true* log-density, exactly where a closed form exists and by accurate numerical
integration otherwise, so a model's negative log-likelihood (NLL) can be put beside the best
achievable one, :math:`H(p) = -\mathbb{E}_p[\log p(x)]`.

=================  ================================================  ==========================
name               what                                              log-density
=================  ================================================  ==========================
``moons``          two interleaving half circles + Gaussian noise,   quadrature along the curves
                   standardized per coordinate
``8gaussians``     8 Gaussians on a circle (FFJORD)                  closed form
``circles``        two concentric noisy circles                      closed form (Bessel I0)
``checkerboard``   uniform on 8 squares of a 4x4 board (FFJORD)      closed form (piecewise)
``pinwheel``       5 curved arms (FFJORD)                            inverse map, root finding
``spirals``        two interleaved spirals + Gaussian noise          quadrature along the curves
=================  ================================================  ==========================

All toys are roughly standardized (mean 0, per-coordinate standard deviation between 1 and 2.4)
so that one model recipe fits them all. The module also holds :class:`Standardizer`, which keeps
a data set's standardization (and its log-Jacobian) with the data. (:func:`check_points`, the
input validation, lives in :mod:`cnf_lib.checks`; it is re-exported here.)

References:
    Grathwohl et al. (2019), FFJORD: Free-form continuous dynamics for scalable reversible
    generative models, ICLR (the 8 Gaussians, checkerboard, pinwheel and spirals toys).
    Abramowitz and Stegun (1964), Handbook of Mathematical Functions, 9.6.16 (the integral
    representation of the modified Bessel function :math:`I_0`).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .checks import categorical, check_points

__all__ = [
    "TOY_NAMES",
    "Toy2D",
    "NoisyCurves",
    "Moons",
    "EightGaussians",
    "Circles",
    "Checkerboard",
    "Pinwheel",
    "Spirals",
    "GaussianMixture",
    "make_toy",
    "Standardizer",
    "check_points",
]

TOY_NAMES: tuple[str, ...] = (
    "moons",
    "8gaussians",
    "circles",
    "checkerboard",
    "pinwheel",
    "spirals",
)

_LOG_2PI = math.log(2.0 * math.pi)
_F64 = torch.float64

def _check_count(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"the number of samples must be a non-negative integer; got {n!r}")
    return int(n)


def _round_up(x: float, step: float = 0.5) -> float:
    return step * math.ceil(x / step - 1e-9)


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------


class Toy2D(abc.ABC):
    r"""A two-dimensional toy distribution with a sampler and its true log-density.

    Attributes:
        name: The toy's name (one of :data:`TOY_NAMES` for the built-in toys).
        bounds: :math:`(lo, hi)` such that the square :math:`[lo, hi]^2` holds essentially all
            the probability mass (at most about :math:`10^{-5}` lies outside). For plots and
            grids.
    """

    name: str = "toy"
    bounds: tuple[float, float] = (-4.0, 4.0)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""Draws samples.

        Arguments:
            n: The number of samples.
            generator: The random number generator; :py:`None` uses torch's global one. Equal
                seeds give identical samples.

        Returns:
            The samples, float32, shape :math:`(n, 2)`, on the CPU.
        """
        n = _check_count(n)
        return self._sample(n, generator).to(torch.float32)

    def log_prob(self, x: Any) -> torch.Tensor:
        r"""Evaluates the true log-density.

        Arguments:
            x: The points, shape :math:`(n, 2)` (tensor or array). Not differentiable.

        Returns:
            :math:`\log p(x)`, float64, shape :math:`(n,)`, on the device of ``x``.
        """
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        pts = check_points(x, "x", dim=2, dtype=_F64).detach().cpu()
        return self._log_prob(pts).to(device)

    def nll(self, x: Any) -> float:
        r"""The true negative log-likelihood of a sample, :math:`-\frac{1}{n}\sum_i \log p(x_i)`.

        On a large sample of the toy itself this estimates the entropy :math:`H(p)`, the lowest
        NLL any model can reach on average.

        Arguments:
            x: The points, shape :math:`(n, 2)`.
        """
        return float(-self.log_prob(x).mean())

    @abc.abstractmethod
    def _sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """Returns `n` samples as a float64 tensor of shape (n, 2)."""

    @abc.abstractmethod
    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Returns log p(x), float64 (n,), for a float64 CPU tensor x of shape (n, 2)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, bounds={self.bounds})"


# --------------------------------------------------------------------------------------------
# Curves plus Gaussian noise (moons, spirals)
# --------------------------------------------------------------------------------------------

Curve = Callable[[np.ndarray], np.ndarray]


class NoisyCurves(Toy2D):
    r"""Points on parametric curves plus isotropic Gaussian noise, optionally standardized.

    A sample is :math:`y = (x - m) / s` with :math:`x = c_j(t) + \sigma \epsilon`, where the
    curve :math:`j` is drawn with probability :math:`w_j`, the parameter :math:`t` from a
    distribution with CDF :math:`F` on :math:`[t_0, t_1]`, and
    :math:`\epsilon \sim \mathcal{N}(0, I_2)`. The density is

    .. math:: p(y) = \prod_d s_d \sum_j w_j \int \mathcal{N}(m + s \odot y; c_j(t), \sigma^2 I)
              \, dF(t),

    computed by quadrature: each curve is cut into cells of equal arc length
    :math:`\sigma / \text{resolution}`, each cell carries its exact probability
    :math:`F(\tau_{i+1}) - F(\tau_i)` and is represented by its arc-length midpoint, and the sum
    is taken with a log-sum-exp. The cells are much shorter than :math:`\sigma` and shrink
    geometrically towards the curves' ends, where the integrand is cut off; the log-density is
    then accurate to about :math:`5 \cdot 10^{-5}`, on and off the data. Blocks of nodes that
    cannot contribute more than :math:`e^{-30}` of the total are skipped.

    Arguments:
        curves: The curves :math:`c_j`, each mapping parameters of shape :math:`(m,)` to points
            of shape :math:`(m, 2)` (NumPy, float64).
        t_range: The parameter interval :math:`(t_0, t_1)`.
        cdf: The CDF :math:`F` of the parameter (vectorized, NumPy).
        icdf: Its inverse, used for sampling (vectorized, NumPy).
        noise: The noise standard deviation :math:`\sigma`, before standardization.
        weights: The curve probabilities :math:`w_j` (default: equal).
        standardize: Whether to standardize each coordinate by the exact population mean
            :math:`m` and standard deviation :math:`s` (computed by quadrature, not from a
            sample). Otherwise :math:`m = 0, s = 1`.
        resolution: The number of quadrature cells per noise standard deviation of arc length.
        name: The toy's name.
    """

    def __init__(
        self,
        curves: Sequence[Curve],
        t_range: tuple[float, float],
        cdf: Callable[[np.ndarray], np.ndarray],
        icdf: Callable[[np.ndarray], np.ndarray],
        noise: float,
        weights: Sequence[float] | None = None,
        standardize: bool = False,
        resolution: float = 10.0,
        name: str = "curves",
    ) -> None:
        if not noise > 0:
            raise ValueError(f"noise must be positive; got {noise}")
        if not resolution > 0:
            raise ValueError(f"resolution must be positive; got {resolution}")
        self.name = name
        self.curves = tuple(curves)
        self.t_range = (float(t_range[0]), float(t_range[1]))
        self.cdf, self.icdf = cdf, icdf
        self.noise = float(noise)
        w = np.ones(len(self.curves)) if weights is None else np.asarray(weights, dtype=float)
        if w.shape != (len(self.curves),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {len(self.curves)} non-negative numbers")
        self.weights = w / w.sum()

        t0, t1 = self.t_range
        # Population moments by a fine midpoint rule with exact cell probabilities.
        edges = np.linspace(t0, t1, 2**16 + 1)
        mass = np.diff(cdf(edges))
        mid = 0.5 * (edges[:-1] + edges[1:])
        m1, m2 = np.zeros(2), np.zeros(2)
        for wj, c in zip(self.weights, self.curves):
            pts = c(mid)
            m1 += wj * mass @ pts
            m2 += wj * mass @ pts**2
        total = mass.sum()
        m1, m2 = m1 / total, m2 / total + self.noise**2
        if standardize:
            self.shift, self.scale = m1, np.sqrt(m2 - m1**2)
        else:
            self.shift, self.scale = np.zeros(2), np.ones(2)

        # Quadrature nodes: equal arc-length cells along each curve.
        ref = np.linspace(t0, t1, 2**15 + 1)
        spacing = self.noise / resolution
        nodes, log_w = [], []
        for wj, c in zip(self.weights, self.curves):
            pts = c(ref)
            s = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(pts, axis=0).T))])
            s_edges = _graded_edges(s[-1], spacing)
            t_edges = np.interp(s_edges, s, ref)
            t_mid = np.interp(0.5 * (s_edges[:-1] + s_edges[1:]), s, ref)
            p = wj * np.diff(cdf(t_edges)) / total
            nodes.append(c(t_mid))
            with np.errstate(divide="ignore"):
                log_w.append(np.log(p))
        self._num_nodes = sum(len(w) for w in log_w)
        self._build_blocks(nodes, log_w)

        extent = np.abs((np.concatenate(nodes) - self.shift) / self.scale).max()
        extent += 5.0 * self.noise / self.scale.min()
        self.bounds = (-_round_up(extent), _round_up(extent))

    _BLOCK = 32  # quadrature nodes per block
    _SKIP = 30.0  # blocks whose bound is e^-30 below a known term are skipped

    def _build_blocks(self, nodes: list[np.ndarray], log_w: list[np.ndarray]) -> None:
        """Groups consecutive nodes of each curve into blocks, with a centre and a radius each.

        :meth:`_log_prob` bounds each block's contribution from these and skips the blocks that
        cannot matter, which makes it several times faster than summing over every node.
        """
        blk_nodes, blk_logw = [], []
        for c, w in zip(nodes, log_w):
            pad = -len(w) % self._BLOCK
            c = np.concatenate([c, np.repeat(c[-1:], pad, axis=0)])
            w = np.concatenate([w, np.full(pad, -np.inf)])
            blk_nodes.append(c.reshape(-1, self._BLOCK, 2))
            blk_logw.append(w.reshape(-1, self._BLOCK))
        self._blk_nodes = torch.from_numpy(np.concatenate(blk_nodes))  # (B, S, 2)
        self._blk_logw = torch.from_numpy(np.concatenate(blk_logw))  # (B, S)
        self._blk_x = self._blk_nodes[..., 0].contiguous()  # (B, S)
        self._blk_y = self._blk_nodes[..., 1].contiguous()
        self._blk_centre = self._blk_nodes.mean(dim=1)  # (B, 2)
        self._blk_radius = (self._blk_nodes - self._blk_centre[:, None]).norm(dim=-1).amax(1)
        self._blk_total = torch.logsumexp(self._blk_logw, dim=1)  # (B,)
        # One node per block (the heaviest) gives a lower bound of the whole sum.
        rep = self._blk_logw.argmax(dim=1)
        self._blk_rep = self._blk_nodes[torch.arange(len(rep)), rep]  # (B, 2)
        self._blk_rep_logw = self._blk_logw[torch.arange(len(rep)), rep]  # (B,)

    @property
    def num_nodes(self) -> int:
        """The number of quadrature nodes used by :meth:`log_prob`."""
        return self._num_nodes

    def _sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        u = torch.rand(n, generator=generator, dtype=_F64).numpy()
        j = categorical(torch.from_numpy(self.weights), n, generator).numpy()
        eps = torch.randn(n, 2, generator=generator, dtype=_F64).numpy()
        t = self.icdf(u)
        x = np.empty((n, 2))
        for k, c in enumerate(self.curves):
            mask = j == k
            if mask.any():
                x[mask] = c(t[mask])
        x += self.noise * eps
        return torch.from_numpy((x - self.shift) / self.scale)

    def _log_prob(self, y: torch.Tensor) -> torch.Tensor:
        scale, shift = torch.from_numpy(self.scale), torch.from_numpy(self.shift)
        x = y * scale + shift
        out = torch.empty(len(x), dtype=_F64)
        for i in range(0, len(x), 1024):
            out[i : i + 1024] = self._log_integral(x[i : i + 1024])
        return out - _LOG_2PI - 2.0 * math.log(self.noise) + float(np.log(self.scale).sum())

    def _log_integral(self, x: torch.Tensor) -> torch.Tensor:
        """log sum_j w_j exp(-|x - c_j|^2 / (2 sigma^2)) over the quadrature nodes, shape (n,)."""
        n, inv = len(x), 0.5 / self.noise**2
        # Bounds per (point, block): a lower bound of the whole sum from each block's heaviest
        # node, and an upper bound of each block's part from its total weight and nearest reach.
        lower = (self._blk_rep_logw - inv * torch.cdist(x, self._blk_rep) ** 2).amax(dim=1)
        reach = (torch.cdist(x, self._blk_centre) - self._blk_radius).clamp_min(0.0)
        upper = self._blk_total - inv * reach**2
        p, b = (upper > lower[:, None] - self._SKIP).nonzero(as_tuple=True)  # sorted by point
        dx = x[p, 0, None] - self._blk_x[b]  # (pairs, S)
        dy = x[p, 1, None] - self._blk_y[b]
        d2 = dx * dx + dy * dy
        part = torch.logsumexp(self._blk_logw[b] - inv * d2, dim=1)  # (pairs,)
        peak = torch.full((n,), -math.inf, dtype=_F64).scatter_reduce(0, p, part, "amax")
        total = torch.zeros(n, dtype=_F64).index_add_(0, p, (part - peak[p]).exp())
        return peak + total.log()


def _graded_edges(
    length: float, h: float, h_min_ratio: float = 1e-3, growth: float = 1.02
) -> np.ndarray:
    """Cell edges on [0, length]: cells of about `h`, shrinking geometrically towards both ends.

    Where a curve stops, the noise integrand is cut off and, for a point beyond the end, decays
    like exp(-d s / sigma^2) along the curve, faster than one cell of size `h` can resolve.
    Cells that shrink towards the ends (by `growth` per cell, down to `h * h_min_ratio`) keep
    the midpoint rule accurate there (to ~5e-5 in log p; the error grows like (growth - 1)^2)
    for points up to ~100 sigma away, at the cost of ~350 cells per end.
    """
    k = math.ceil(math.log(1.0 / h_min_ratio) / math.log(growth))
    sizes = h * h_min_ratio * growth ** np.arange(k)
    graded = np.concatenate([[0.0], np.cumsum(sizes)])  # ends at about h / (growth - 1)
    middle = length - 2.0 * graded[-1]
    if middle < 4.0 * h:  # a short curve: uniform cells, fine enough to resolve the ends
        return np.linspace(0.0, length, max(64, math.ceil(length / (h * 0.1))) + 1)
    inner = np.linspace(graded[-1], length - graded[-1], math.ceil(middle / h) + 1)
    return np.concatenate([graded[:-1], inner, length - graded[-2::-1]])


def _moon_outer(s: np.ndarray) -> np.ndarray:
    return np.stack([np.cos(s), np.sin(s)], axis=-1)


def _moon_inner(s: np.ndarray) -> np.ndarray:
    return np.stack([1.0 - np.cos(s), 0.5 - np.sin(s)], axis=-1)


class Moons(NoisyCurves):
    r"""Two interleaving half circles with Gaussian noise, standardized per coordinate.

    Outer moon :math:`(\cos s, \sin s)`, inner moon :math:`(1 - \cos s, 0.5 - \sin s)`,
    :math:`s \sim \mathcal{U}(0, \pi)`, each moon with probability 1/2, plus
    :math:`\mathcal{N}(0, \sigma^2 I)`; then each coordinate is standardized by the exact
    population mean :math:`(1/2, 1/4)` and standard deviation
    :math:`(\sqrt{3/4 + \sigma^2}, \sqrt{9/16 - 1/\pi + \sigma^2})`. Unlike
    :func:`sklearn.datasets.make_moons` (evenly spaced :math:`s`), :math:`s` is random.

    Arguments:
        noise: The noise standard deviation :math:`\sigma` (before standardization).
        resolution: Quadrature cells per :math:`\sigma` of arc length (see :class:`NoisyCurves`).
    """

    def __init__(self, noise: float = 0.05, resolution: float = 10.0) -> None:
        super().__init__(
            curves=(_moon_outer, _moon_inner),
            t_range=(0.0, math.pi),
            cdf=lambda s: s / math.pi,
            icdf=lambda u: math.pi * u,
            noise=noise,
            standardize=True,
            resolution=resolution,
            name="moons",
        )


_SPIRAL_END = 3.0 * math.pi


def _spiral_arm(t: np.ndarray) -> np.ndarray:
    return np.stack([-t * np.cos(t), t * np.sin(t)], axis=-1) / 3.0


def _spiral_arm_2(t: np.ndarray) -> np.ndarray:
    return -_spiral_arm(t)


class Spirals(NoisyCurves):
    r"""Two interleaved spirals with Gaussian noise (after FFJORD's ``2spirals``).

    Arm 1 has centre :math:`c(t) = (-t \cos t, t \sin t) / 3` with
    :math:`t = 3\pi \sqrt{U}`, :math:`U \sim \mathcal{U}(0, 1)` (so :math:`p(t) = 2t / (3\pi)^2`
    on :math:`[0, 3\pi]`); arm 2 is :math:`-c(t)`; each arm with probability 1/2, plus
    :math:`\mathcal{N}(0, \sigma^2 I)`. The mean is 0 and the per-coordinate standard deviation
    about 1.6. (FFJORD adds uniform noise too; here the noise is Gaussian only, so the density is
    a clean curve integral.)

    Arguments:
        noise: The noise standard deviation :math:`\sigma`.
        resolution: Quadrature cells per :math:`\sigma` of arc length (see :class:`NoisyCurves`).
    """

    def __init__(self, noise: float = 0.1, resolution: float = 10.0) -> None:
        super().__init__(
            curves=(_spiral_arm, _spiral_arm_2),
            t_range=(0.0, _SPIRAL_END),
            cdf=lambda t: (t / _SPIRAL_END) ** 2,
            icdf=lambda u: _SPIRAL_END * np.sqrt(u),
            noise=noise,
            standardize=False,
            resolution=resolution,
            name="spirals",
        )


# --------------------------------------------------------------------------------------------
# Closed-form toys
# --------------------------------------------------------------------------------------------


class EightGaussians(Toy2D):
    r"""An equal-weight mixture of Gaussians with centres on a circle (FFJORD's 8 Gaussians).

    Centres :math:`r (\cos \frac{2\pi k}{K}, \sin \frac{2\pi k}{K})`, :math:`k = 0, \dots, K-1`,
    isotropic standard deviation :math:`\sigma`. The log-density is the closed-form mixture.

    Arguments:
        radius: The radius :math:`r` of the circle of centres.
        std: The standard deviation :math:`\sigma` of each component.
        n_components: The number of components :math:`K`.
    """

    def __init__(
        self,
        radius: float = 4.0 / math.sqrt(2.0),
        std: float = 0.5 / math.sqrt(2.0),
        n_components: int = 8,
    ) -> None:
        if not (radius >= 0 and std > 0 and n_components >= 1):
            raise ValueError("need radius >= 0, std > 0 and n_components >= 1")
        self.name = "8gaussians"
        self.radius, self.std, self.n_components = float(radius), float(std), int(n_components)
        angle = 2.0 * math.pi * torch.arange(n_components, dtype=_F64) / n_components
        self.centres = self.radius * torch.stack([angle.cos(), angle.sin()], dim=1)  # (K, 2)
        b = _round_up(self.radius + 5.0 * self.std)
        self.bounds = (-b, b)

    def _sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        k = torch.randint(self.n_components, (n,), generator=generator)
        eps = torch.randn(n, 2, generator=generator, dtype=_F64)
        return self.centres[k] + self.std * eps

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        d2 = ((x[:, None, :] - self.centres) ** 2).sum(-1)  # (n, K)
        return (
            torch.logsumexp(-0.5 * d2 / self.std**2, dim=1)
            - math.log(self.n_components)
            - _LOG_2PI
            - 2.0 * math.log(self.std)
        )


class Circles(Toy2D):
    r"""Concentric circles with Gaussian noise.

    A radius :math:`r_j` is drawn with probability :math:`w_j`, an angle
    :math:`\theta \sim \mathcal{U}(0, 2\pi)`, and :math:`x = r_j (\cos\theta, \sin\theta) +
    \sigma\epsilon`. Integrating over the angle gives the closed form

    .. math:: p(x) = \sum_j \frac{w_j}{2\pi\sigma^2}
              \exp\Big(-\frac{(|x| - r_j)^2}{2\sigma^2}\Big)\,
              \tilde I_0\Big(\frac{|x| r_j}{\sigma^2}\Big),

    with :math:`\tilde I_0(z) = e^{-z} I_0(z)` the exponentially scaled Bessel function, which
    stays finite for any :math:`x`. With the default radii 1 and 2 the per-coordinate standard
    deviation is about 1.1.

    Arguments:
        radii: The radii :math:`r_j`.
        noise: The noise standard deviation :math:`\sigma`.
        weights: The circle probabilities :math:`w_j` (default: equal).
    """

    def __init__(
        self,
        radii: Sequence[float] = (1.0, 2.0),
        noise: float = 0.1,
        weights: Sequence[float] | None = None,
    ) -> None:
        self.name = "circles"
        self.radii = torch.as_tensor(radii, dtype=_F64).reshape(-1)
        if not noise > 0 or (self.radii < 0).any():
            raise ValueError("need noise > 0 and non-negative radii")
        self.noise = float(noise)
        w = torch.ones(len(self.radii), dtype=_F64) if weights is None else torch.as_tensor(
            weights, dtype=_F64
        )
        if w.shape != self.radii.shape or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {len(self.radii)} non-negative numbers")
        self.weights = w / w.sum()
        b = _round_up(float(self.radii.max()) + 5.0 * self.noise)
        self.bounds = (-b, b)

    def _sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        j = categorical(self.weights, n, generator)
        theta = 2.0 * math.pi * torch.rand(n, generator=generator, dtype=_F64)
        eps = torch.randn(n, 2, generator=generator, dtype=_F64)
        r = self.radii[j, None]
        return r * torch.stack([theta.cos(), theta.sin()], dim=1) + self.noise * eps

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        rho = x.norm(dim=1, keepdim=True)  # (n, 1)
        s2 = self.noise**2
        terms = (
            self.weights.log()
            - 0.5 * (rho - self.radii) ** 2 / s2
            + torch.special.i0e(rho * self.radii / s2).log()
        )
        return torch.logsumexp(terms, dim=1) - _LOG_2PI - math.log(s2)


class Checkerboard(Toy2D):
    r"""Uniform on the 8 "black" squares of a 4 x 4 board (FFJORD's checkerboard).

    With ``scale = 1`` the board is :math:`[-4, 4]^2`, the squares have side 2, and the black
    squares are those whose lower-left corner :math:`2(i, j)` has :math:`i + j` even. The density
    is :math:`1 / (32\,\text{scale}^2)` on the (closed) black squares and 0 elsewhere, so
    :meth:`log_prob` returns ``-inf`` outside them (and :meth:`nll` can be ``inf`` for points
    outside). The per-coordinate standard deviation is :math:`2.31\,\text{scale}`.

    Arguments:
        scale: A factor applied to the whole board.
    """

    def __init__(self, scale: float = 1.0) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be positive; got {scale}")
        self.name = "checkerboard"
        self.scale = float(scale)
        ij = [(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0]
        self._cells = torch.tensor(ij, dtype=_F64)  # (8, 2) lower-left corners in units of 2
        self._log_density = -math.log(len(ij) * (2.0 * self.scale) ** 2)
        b = 4.0 * self.scale + 0.5
        self.bounds = (-b, b)

    def _sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        k = torch.randint(len(self._cells), (n,), generator=generator)
        u = torch.rand(n, 2, generator=generator, dtype=_F64)
        return 2.0 * self.scale * (self._cells[k] + u)

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        u = x / (2.0 * self.scale)  # the board in units of squares: [-2, 2]^2
        on_board = (u.abs() <= 2.0).all(dim=1)
        # A point on an edge belongs to every square that touches it (closed squares), so that
        # float32 rounding of a sample onto an edge never gives it zero density.
        lo = u.floor().clamp(-2, 1)
        hi = (u.ceil() - 1).clamp(-2, 1)
        black = torch.zeros(len(x), dtype=torch.bool)
        for i in (lo[:, 0], hi[:, 0]):
            for j in (lo[:, 1], hi[:, 1]):
                black |= (i + j).remainder(2) == 0
        out = torch.full((len(x),), -math.inf, dtype=_F64)
        out[on_board & black] = self._log_density
        return out


class Pinwheel(Toy2D):
    r"""FFJORD's pinwheel: curved arms made by rotating a Gaussian blob by a radius-dependent angle.

    Draw an arm :math:`k \in \{0, \dots, K-1\}` uniformly and :math:`u = (a, b)` with
    :math:`a \sim \mathcal{N}(\mu, \sigma_a^2)`, :math:`b \sim \mathcal{N}(0, \sigma_b^2)`; then
    :math:`y = \text{scale} \cdot R(\theta_k + \text{rate}\, e^{a})\, u` with
    :math:`\theta_k = 2\pi k / K` and :math:`R` the counter-clockwise rotation.

    **Density.** In polar coordinates :math:`u = \rho(\cos\psi, \sin\psi)` the map keeps
    :math:`\rho` and sends :math:`\psi` to :math:`h(\psi) + \theta_k` with
    :math:`h(\psi) = \psi + \text{rate}\, e^{\rho\cos\psi}`, so its Jacobian determinant is
    :math:`h'(\psi) = 1 - \text{rate}\,\rho\, e^{\rho\cos\psi}\sin\psi` and, for
    :math:`x = y / \text{scale} = \rho(\cos\varphi, \sin\varphi)`,

    .. math:: p(y) = \frac{1}{\text{scale}^2} \sum_k \frac{1}{K}
              \sum_{\psi:\, h(\psi) \equiv \varphi - \theta_k \ (2\pi)}
              \frac{\mathcal{N}_2(\rho\cos\psi, \rho\sin\psi)}{|h'(\psi)|}.

    Since the :math:`\theta_k` are equally spaced, the roots over all arms are those of
    :math:`h(\psi) = \varphi + 2\pi j / K` for integers :math:`j`. :math:`h'` is at least 1 on
    :math:`[-\pi, 0]` and unimodal on :math:`(0, \pi)`, so :math:`h` has at most two folds
    (zeros of :math:`h'`, found by bisection). They are added to a coarse :math:`\psi` grid,
    which makes :math:`h` monotone on every grid cell; the roots in each cell are then counted
    exactly from its end values (a cell can hold several) and found by Newton steps safeguarded
    by bisection. Where the arms overlap, every branch is counted. Far out (:math:`\rho > 6`,
    i.e. :math:`|y| > 6\,\text{scale}`, where the log-density is below about -130 and the true
    density oscillates ever faster with the angle) the angular average
    :math:`\mathcal{N}(\rho; \mu, \sigma_a^2) / (2\pi\rho)` is returned instead. With the
    defaults the per-coordinate standard deviation is about 1.5.

    Arguments:
        n_arms: The number of arms :math:`K`.
        radial_std: :math:`\sigma_a`.
        tangential_std: :math:`\sigma_b`.
        rate: The twist rate.
        scale: The overall scale.
        radial_mean: :math:`\mu`.
    """

    _RHO_FAR = 6.0
    _GRID = 32  # cells of the psi grid; any size is exact, this one is fastest
    _CHUNK = 1024

    def __init__(
        self,
        n_arms: int = 5,
        radial_std: float = 0.3,
        tangential_std: float = 0.1,
        rate: float = 0.25,
        scale: float = 2.0,
        radial_mean: float = 1.0,
    ) -> None:
        if not (n_arms >= 1 and radial_std > 0 and tangential_std > 0 and scale > 0 and rate >= 0):
            raise ValueError(
                "need n_arms >= 1, rate >= 0 and positive radial_std, tangential_std and scale"
            )
        self.name = "pinwheel"
        self.n_arms = int(n_arms)
        self.radial_std, self.tangential_std = float(radial_std), float(tangential_std)
        self.rate, self.scale, self.radial_mean = float(rate), float(scale), float(radial_mean)
        # Root-bracketing grid over psi in [-pi, pi]; each point's folds are added to it.
        self._psi = np.linspace(-math.pi, math.pi, self._GRID + 1)
        self._cos_psi = np.cos(self._psi)
        b = _round_up(self.scale * (self.radial_mean + 5.0 * self.radial_std))
        self.bounds = (-b, b)

    def _sample(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        k = torch.randint(self.n_arms, (n,), generator=generator).to(_F64)
        eps = torch.randn(n, 2, generator=generator, dtype=_F64)
        a = self.radial_mean + self.radial_std * eps[:, 0]
        b = self.tangential_std * eps[:, 1]
        angle = 2.0 * math.pi * k / self.n_arms + self.rate * a.exp()
        c, s = angle.cos(), angle.sin()
        return self.scale * torch.stack([c * a - s * b, s * a + c * b], dim=1)

    def _log_n2(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        za = (a - self.radial_mean) / self.radial_std
        zb = b / self.tangential_std
        return -0.5 * (za**2 + zb**2) - _LOG_2PI - math.log(self.radial_std * self.tangential_std)

    def _log_prob(self, y: torch.Tensor) -> torch.Tensor:
        x = y.numpy() / self.scale
        rho = np.hypot(x[:, 0], x[:, 1])
        phi = np.arctan2(x[:, 1], x[:, 0])
        out = np.empty(len(x))
        far = rho > self._RHO_FAR
        if far.any():
            r = rho[far]
            za = (r - self.radial_mean) / self.radial_std
            out[far] = -0.5 * za**2 - 0.5 * _LOG_2PI - math.log(self.radial_std)
            out[far] -= _LOG_2PI + np.log(r)
        near = np.flatnonzero(~far)
        for i in range(0, len(near), self._CHUNK):
            idx = near[i : i + self._CHUNK]
            out[idx] = self._log_prob_polar(rho[idx], phi[idx])
        return torch.from_numpy(out - 2.0 * math.log(self.scale))

    def _dh(self, rho: np.ndarray, psi: np.ndarray) -> np.ndarray:
        return 1.0 - self.rate * rho * np.exp(rho * np.cos(psi)) * np.sin(psi)

    def _folds(self, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The folds psi_1 <= psi_2 of h (zeros of h'), or twice the argmin of h' if h' > 0."""
        # On (0, pi), h' is smallest where cos(psi) = rho sin^2(psi).
        psi_m = np.arccos(2.0 * rho / (np.sqrt(1.0 + 4.0 * rho**2) + 1.0))
        fold = self._dh(rho, psi_m) < 0
        bisect = []
        for lo, hi in ((np.zeros_like(rho), psi_m), (psi_m, np.full_like(rho, math.pi))):
            # h' goes from positive (at lo) to negative (at hi), or the reverse.
            pos_at_lo = self._dh(rho, lo) > 0
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                same = (self._dh(rho, mid) > 0) == pos_at_lo
                lo, hi = np.where(same, mid, lo), np.where(same, hi, mid)
            bisect.append(np.where(fold, 0.5 * (lo + hi), psi_m))
        return bisect[0], bisect[1]

    def _log_prob_polar(self, rho: np.ndarray, phi: np.ndarray) -> np.ndarray:
        """log p_x at polar coordinates (rho, phi) of x = y / scale, for rho <= _RHO_FAR."""
        rate, step = self.rate, 2.0 * math.pi / self.n_arms
        m, g = len(rho), len(self._psi)

        # Each point's grid: the common one with the two folds inserted (so h is monotone on
        # every cell).
        psi1, psi2 = self._folds(rho)
        k1 = np.searchsorted(self._psi, psi1)[:, None]
        k2 = np.searchsorted(self._psi, psi2)[:, None] + 1
        col = np.arange(g + 2)[None, :]
        src = col - (col > k1) - (col > k2)
        psi = self._psi[src]
        cos = self._cos_psi[src]
        at1, at2 = col == k1, col == k2
        psi[at1], cos[at1] = psi1, np.cos(psi1)
        psi[at2], cos[at2] = psi2, np.cos(psi2)
        h = psi + rate * np.exp(rho[:, None] * cos)  # (m, g + 2)

        # Roots solve h(psi) = phi + step * j. On a cell with end values h0, h1 (either order)
        # these are the integers j with min <= (h - phi) / step < max.
        z = np.ceil((h - phi[:, None]) / step)
        z0, z1 = z[:, :-1], z[:, 1:]
        count = np.abs(z1 - z0).astype(np.int64)
        p_idx, c_idx = np.nonzero(count)  # sorted by point
        reps = count[p_idx, c_idx]
        p = np.repeat(p_idx, reps)
        c = np.repeat(c_idx, reps)
        offset = np.arange(len(p)) - np.repeat(np.cumsum(reps) - reps, reps)
        target = phi[p] + step * (np.minimum(z0, z1)[p_idx, c_idx].repeat(reps) + offset)

        # Newton steps safeguarded by bisection, inside each root's bracketing cell.
        r = rho[p]
        lo, hi = psi[p, c], psi[p, c + 1]  # lo: the end where h < target
        h_lo, h_hi = h[p, c], h[p, c + 1]
        swap = h_lo > h_hi
        lo, hi = np.where(swap, hi, lo), np.where(swap, lo, hi)
        h_lo, h_hi = np.minimum(h_lo, h_hi), np.maximum(h_lo, h_hi)
        root = lo + (target - h_lo) / (h_hi - h_lo) * (hi - lo)
        todo = np.arange(len(root))
        for _ in range(60):  # on the roots not yet converged
            x, rr, t = root[todo], r[todo], target[todo]
            e = rate * np.exp(rr * np.cos(x))
            res = x + e - t
            below = res < 0
            lo[todo] = np.where(below, x, lo[todo])
            hi[todo] = np.where(below, hi[todo], x)
            with np.errstate(divide="ignore", invalid="ignore"):
                new = x - res / (1.0 - e * rr * np.sin(x))
            inside = (new - lo[todo]) * (new - hi[todo]) < 0
            done = np.abs(res) <= 1e-13 * (1.0 + np.abs(t))
            done |= np.abs(hi[todo] - lo[todo]) < 1e-15
            root[todo] = np.where(done, x, np.where(inside, new, 0.5 * (lo[todo] + hi[todo])))
            todo = todo[~done]
            if len(todo) == 0:
                break

        a, b = r * np.cos(root), r * np.sin(root)
        dh = np.abs(1.0 - rate * np.exp(a) * b)
        terms = self._log_n2(a, b) - np.log(np.maximum(dh, 1e-300)) - math.log(self.n_arms)
        starts = np.searchsorted(p, np.arange(m))  # every point has >= n_arms roots
        peak = np.maximum.reduceat(terms, starts)
        total = np.add.reduceat(np.exp(terms - peak[p]), starts)
        return peak + np.log(total)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_TOYS: dict[str, Callable[..., Toy2D]] = {
    "moons": Moons,
    "8gaussians": EightGaussians,
    "circles": Circles,
    "checkerboard": Checkerboard,
    "pinwheel": Pinwheel,
    "spirals": Spirals,
}


def make_toy(name: str, **kwargs: Any) -> Toy2D:
    r"""Builds a toy by name.

    Arguments:
        name: One of :data:`TOY_NAMES`.
        kwargs: Keyword arguments of the toy's class (e.g. ``noise`` for ``moons``).

    Returns:
        The toy.

    Raises:
        ValueError: If the name is unknown.

    Example:
        >>> toy = make_toy("moons", noise=0.05)
        >>> x = toy.sample(512, generator=torch.Generator().manual_seed(0))
        >>> toy.nll(x)  # the true NLL, about 1.14
    """
    if name not in _TOYS:
        raise ValueError(f"unknown toy {name!r}; choose one of: {', '.join(TOY_NAMES)}")
    return _TOYS[name](**kwargs)


# --------------------------------------------------------------------------------------------
# Standardization
# --------------------------------------------------------------------------------------------


class Standardizer:
    r"""Per-coordinate standardization :math:`z = (x - m) / s` that travels with the data.

    Because the map is affine, densities transform as
    :math:`\log p_x(x) = \log p_z(z) + \log|\det \partial z / \partial x|` with
    :math:`\log|\det| = -\sum_d \log s_d` (:meth:`log_abs_det`), so a model fitted to ``z``
    gives log-likelihoods of the original ``x``.

    Arguments:
        mean: The mean :math:`m`, shape :math:`(D,)`.
        std: The standard deviation :math:`s`, shape :math:`(D,)`, positive.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        mean = torch.as_tensor(mean, dtype=_F64).detach().cpu().clone()
        std = torch.as_tensor(std, dtype=_F64).detach().cpu().clone()
        if mean.ndim != 1 or mean.shape != std.shape:
            raise ValueError(
                f"mean and std must be 1-D of equal length; got shapes {tuple(mean.shape)} "
                f"and {tuple(std.shape)}"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("mean must be finite and std finite and positive")
        self.mean, self.std = mean, std

    @classmethod
    def fit(cls, x: Any) -> Standardizer:
        r"""Fits the mean and (population) standard deviation of each column.

        Arguments:
            x: The data, shape :math:`(n, D)`.

        Raises:
            ValueError: If ``x`` is invalid (see :func:`check_points`) or a column is constant.
        """
        x = check_points(x, "x", dtype=_F64).detach().cpu()
        std = x.std(dim=0, correction=0)
        constant = (std == 0).nonzero().flatten().tolist()
        if constant:
            raise ValueError(f"cannot standardize: column(s) {constant} of x are constant")
        return cls(x.mean(dim=0), std)

    @property
    def dim(self) -> int:
        """The number of coordinates :math:`D`."""
        return len(self.mean)

    def _check(self, x: Any, name: str) -> torch.Tensor:
        floating = isinstance(x, torch.Tensor) and x.is_floating_point()
        return check_points(x, name, dim=self.dim, dtype=x.dtype if floating else torch.float32)

    def transform(self, x: Any) -> torch.Tensor:
        r"""Standardizes: :math:`z = (x - m) / s`.

        Arguments:
            x: The data, shape :math:`(n, D)`; tensors keep their floating dtype and device,
                anything else becomes float32. (The arithmetic is done in float64.)

        Returns:
            :math:`z`, shape :math:`(n, D)`.
        """
        x = self._check(x, "x")
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return ((x.to(_F64) - mean) / std).to(x.dtype)

    def inverse(self, z: Any) -> torch.Tensor:
        r"""Undoes the standardization: :math:`x = m + s z`.

        Arguments:
            z: Standardized data, shape :math:`(n, D)`, as in :meth:`transform`.

        Returns:
            :math:`x`, shape :math:`(n, D)`.
        """
        z = self._check(z, "z")
        mean, std = self.mean.to(z.device), self.std.to(z.device)
        return (z.to(_F64) * std + mean).to(z.dtype)

    def log_abs_det(self) -> float:
        r"""The log-Jacobian of :meth:`transform`, :math:`-\sum_d \log s_d`."""
        return float(-self.std.log().sum())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The mean and std, for saving with a checkpoint."""
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Standardizer:
        """Rebuilds a standardizer saved with :meth:`state_dict`."""
        return cls(state["mean"], state["std"])

    def __repr__(self) -> str:
        return f"Standardizer(dim={self.dim})"


# --------------------------------------------------------------------------------------------
# A D-dimensional toy with a closed-form density
# --------------------------------------------------------------------------------------------


class GaussianMixture:
    r"""A mixture of isotropic Gaussians in :math:`D` dimensions, with its closed-form density.

    .. math:: p(x) = \sum_{k=1}^K w_k\, \mathcal{N}\big(x;\ \mu_k,\ \sigma_k^2 I_D\big)

    The means are drawn once, reproducibly from ``seed``, as :math:`\mu_k \sim
    \mathcal{N}(0, s^2 I_D)` with :math:`s` = ``spread`` (or given as ``means``). It has the same
    interface as the 2-D toys (:meth:`sample`, :meth:`log_prob`, :meth:`nll`) in any dimension,
    so a model's NLL can be put beside the truth where the exact trace of a CNF is expensive.
    Its mean and covariance are closed forms too (:meth:`mean`, :meth:`covariance`): the
    best single Gaussian, a baseline, has exactly those moments.

    Arguments:
        dim: The dimension :math:`D`.
        n_components: The number of components :math:`K`.
        spread: The standard deviation :math:`s` of the random means (ignored with ``means``).
        std: The standard deviation :math:`\sigma_k` of each component: one number for all, or
            :math:`K` numbers.
        weights: The component probabilities :math:`w_k` (default: equal); normalized.
        seed: Seeds the random means.
        means: Explicit means, shape :math:`(K, D)`, instead of random ones.

    Raises:
        ValueError: If a dimension, count, standard deviation or weight is invalid, naming it.

    Example:
        >>> mix = GaussianMixture(16, n_components=4, seed=0)
        >>> x = mix.sample(1000, generator=torch.Generator().manual_seed(1))  # (1000, 16)
        >>> mix.nll(x)  # the true NLL of the sample
    """

    def __init__(
        self,
        dim: int,
        n_components: int = 4,
        spread: float = 1.0,
        std: float | Sequence[float] = 0.5,
        weights: Sequence[float] | None = None,
        seed: int = 0,
        means: Any = None,
    ) -> None:
        for label, value in (("dim", dim), ("n_components", n_components)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{label} must be a positive integer; got {value!r}")
        self.dim, self.n_components = int(dim), int(n_components)
        self.name = "gaussian_mixture"
        if means is None:
            if not (math.isfinite(spread) and spread >= 0):
                raise ValueError(f"spread must be finite and >= 0; got {spread!r}")
            g = torch.Generator().manual_seed(int(seed))
            shape = (self.n_components, self.dim)
            means = float(spread) * torch.randn(shape, generator=g, dtype=_F64)
        self.means = check_points(means, "means", dim=self.dim, dtype=_F64).detach().cpu().clone()
        if self.means.shape[0] != self.n_components:
            raise ValueError(
                f"means must have n_components = {self.n_components} rows; got shape "
                f"{tuple(self.means.shape)}"
            )
        stds = torch.as_tensor(std, dtype=_F64).flatten()
        if stds.numel() == 1:
            stds = stds.expand(self.n_components)
        valid = bool(torch.isfinite(stds).all() and (stds > 0).all())
        if stds.numel() != self.n_components or not valid:
            raise ValueError(
                f"std must be one or {self.n_components} finite positive numbers; got {std!r}"
            )
        self.stds = stds.clone()
        if weights is None:
            w = torch.ones(self.n_components, dtype=_F64)
        else:
            w = torch.as_tensor(weights, dtype=_F64).flatten()
        valid = bool(torch.isfinite(w).all() and (w >= 0).all() and w.sum() > 0)
        if w.numel() != self.n_components or not valid:
            raise ValueError(
                f"weights must be {self.n_components} non-negative numbers, not all zero; "
                f"got {weights!r}"
            )
        self.weights = w / w.sum()
        b = _round_up(float(self.means.abs().max()) + 5.0 * float(self.stds.max()))
        self.bounds: tuple[float, float] = (-b, b)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""Draws samples: a component :math:`k` with probability :math:`w_k`, then
        :math:`\mu_k + \sigma_k \epsilon` with :math:`\epsilon \sim \mathcal{N}(0, I_D)`.

        Arguments:
            n: The number of samples.
            generator: The random number generator; :py:`None` uses torch's global one.

        Returns:
            The samples, float32, shape :math:`(n, D)`, on the CPU.
        """
        n = _check_count(n)
        k = categorical(self.weights, n, generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=_F64)
        return (self.means[k] + self.stds[k, None] * eps).to(torch.float32)

    def log_prob(self, x: Any) -> torch.Tensor:
        r"""Evaluates the true log-density (a log-sum-exp over the components).

        Arguments:
            x: The points, shape :math:`(n, D)` (tensor or array). Not differentiable.

        Returns:
            :math:`\log p(x)`, float64, shape :math:`(n,)`, on the device of ``x``.
        """
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        pts = check_points(x, "x", dim=self.dim, dtype=_F64).detach().cpu()
        d2 = (pts[:, None, :] - self.means).pow(2).sum(-1)  # (n, K)
        terms = (
            self.weights.log()
            - 0.5 * d2 / self.stds.pow(2)
            - self.dim * self.stds.log()
            - 0.5 * self.dim * _LOG_2PI
        )
        return torch.logsumexp(terms, dim=1).to(device)

    def nll(self, x: Any) -> float:
        r"""The true negative log-likelihood of a sample, :math:`-\frac{1}{n}\sum_i \log p(x_i)`.

        Arguments:
            x: The points, shape :math:`(n, D)`.
        """
        return float(-self.log_prob(x).mean())

    def mean(self) -> torch.Tensor:
        r"""The mixture's mean :math:`\sum_k w_k \mu_k`, float64, shape :math:`(D,)`."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        r"""The mixture's covariance
        :math:`\sum_k w_k (\sigma_k^2 I + \mu_k \mu_k^\top) - \bar\mu \bar\mu^\top`,
        float64, shape :math:`(D, D)`."""
        m = self.mean()
        second = (self.means.T * self.weights) @ self.means
        eye = torch.eye(self.dim, dtype=_F64)
        return second + float(self.weights @ self.stds.pow(2)) * eye - torch.outer(m, m)

    def __repr__(self) -> str:
        return f"GaussianMixture(dim={self.dim}, n_components={self.n_components})"
