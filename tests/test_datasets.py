"""Tests for cnf_lib.datasets: each toy's true density against its sampler, closed forms and
independent numerical integration; the standardizer; input validation."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest
import torch
from scipy import integrate

from cnf_lib.datasets import (
    TOY_NAMES,
    Checkerboard,
    Circles,
    EightGaussians,
    Moons,
    NoisyCurves,
    Pinwheel,
    Spirals,
    Standardizer,
    Toy2D,
    check_points,
    make_toy,
)

F64 = torch.float64
BINS = 20  # histogram bins per side
N_HIST = 200_000
N_NLL = 10_000


def n_grid(name: str) -> int:
    """Cells per side of the integration grid: a multiple of BINS, and for the checkerboard one
    whose cells are aligned with the squares (so its midpoint sum is exact)."""
    return 180 if name == "checkerboard" else 120


@lru_cache(maxsize=None)
def toy(name: str) -> Toy2D:
    return make_toy(name)


@lru_cache(maxsize=None)
def grid(name: str) -> tuple[torch.Tensor, float]:
    """log p at the centres of an n x n grid over the toy's bounds ([i, j] <-> (x_i, y_j))."""
    lo, hi, n = *toy(name).bounds, n_grid(name)
    h = (hi - lo) / n
    c = lo + h * (torch.arange(n, dtype=F64) + 0.5)
    return toy(name).log_prob(torch.cartesian_prod(c, c)).reshape(n, n), h


@lru_cache(maxsize=None)
def samples(name: str) -> torch.Tensor:
    return toy(name).sample(N_HIST, torch.Generator().manual_seed(TOY_NAMES.index(name)))


def grid_entropy(name: str) -> float:
    logp, h = grid(name)
    p = logp.exp()
    return float(-torch.where(p > 0, p * logp, torch.zeros_like(p)).sum() * h * h)


def hist_tv(x: torch.Tensor, name: str) -> float:
    """Total-variation distance between a histogram of x and the density's mass in the bins."""
    lo, hi = toy(name).bounds
    hist = torch.histogramdd(x.double(), bins=[BINS, BINS], range=[lo, hi, lo, hi]).hist
    logp, h = grid(name)
    k = n_grid(name) // BINS
    mass = (logp.exp() * h * h).reshape(BINS, k, BINS, k).sum((1, 3))
    return 0.5 * float((hist / len(x) - mass).abs().sum())


# ---------------------------------------------------------------------------------------------
# Every toy: density vs sampler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOY_NAMES)
def test_density_integrates_to_one(name):
    logp, h = grid(name)
    mass = float(logp.exp().sum() * h * h)
    # The grid is aligned with the checkerboard's squares, so its midpoint sum is exact.
    assert mass == pytest.approx(1.0, abs=1e-12 if name == "checkerboard" else 1e-3)


@pytest.mark.parametrize("name", TOY_NAMES)
def test_histogram_of_samples_matches_density(name):
    # Sampling noise alone gives a TV distance of about 0.01 here.
    assert hist_tv(samples(name), name) < 0.03


def test_histogram_check_catches_a_mirrored_pinwheel():
    # FFJORD's code rotates the other way; that mirror image must fail the check above.
    x = samples("pinwheel") * torch.tensor([1.0, -1.0])
    assert hist_tv(x, "pinwheel") > 0.2


@pytest.mark.parametrize("name", TOY_NAMES)
def test_monte_carlo_nll_matches_grid_entropy(name):
    lp = toy(name).log_prob(samples(name)[:N_NLL])
    assert torch.isfinite(lp).all()
    nll, se = float(-lp.mean()), float(lp.std()) / math.sqrt(N_NLL)
    assert toy(name).nll(samples(name)[:N_NLL]) == pytest.approx(nll)
    assert abs(nll - grid_entropy(name)) < 4 * se + 2e-3


def test_entropies_match_the_values_quoted_in_the_design():
    assert grid_entropy("8gaussians") == pytest.approx(2.831, abs=0.005)
    assert grid_entropy("moons") == pytest.approx(1.135, abs=0.01)  # measured there on a sample


@pytest.mark.parametrize("name", TOY_NAMES)
def test_sampling_is_seeded_and_roughly_standardized(name):
    t = toy(name)
    a = t.sample(500, torch.Generator().manual_seed(7))
    b = t.sample(500, torch.Generator().manual_seed(7))
    c = t.sample(500, torch.Generator().manual_seed(8))
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    np_state = np.random.get_state()[1].copy()
    torch.manual_seed(1)
    d = t.sample(50)
    torch.manual_seed(1)
    assert torch.equal(d, t.sample(50))  # the global torch RNG when no generator is given
    assert np.array_equal(np.random.get_state()[1], np_state)  # numpy's global RNG is unused
    x = samples(name)
    assert x.mean(0).abs().max() < 0.05
    assert ((x.std(0) > 0.9) & (x.std(0) < 2.4)).all()
    lo, hi = t.bounds
    assert ((x > lo) & (x < hi)).all(1).float().mean() > 1 - 1e-4


def test_sample_count_is_checked():
    assert toy("moons").sample(0).shape == (0, 2)
    with pytest.raises(ValueError, match="non-negative integer"):
        toy("moons").sample(-1)
    with pytest.raises(ValueError, match="non-negative integer"):
        toy("moons").sample(2.5)


def test_make_toy_rejects_unknown_names_and_passes_kwargs():
    with pytest.raises(ValueError, match=r"unknown toy 'mons'.*moons, 8gaussians, circles"):
        make_toy("mons")
    assert make_toy("moons", noise=0.1).noise == 0.1


def test_log_prob_validates_and_keeps_device():
    with pytest.raises(ValueError, match="2 columns"):
        toy("circles").log_prob(np.zeros((3, 3)))
    out = toy("circles").log_prob(np.zeros((3, 2), dtype=np.float32))
    assert out.dtype == F64 and out.shape == (3,)


# ---------------------------------------------------------------------------------------------
# Closed forms and independent integration
# ---------------------------------------------------------------------------------------------


def test_moons_are_standardized_by_the_exact_population_moments():
    for noise in (0.05, 0.2):
        m = Moons(noise=noise)
        np.testing.assert_allclose(m.shift, [0.5, 0.25], atol=1e-9)
        expected = [math.sqrt(0.75 + noise**2), math.sqrt(9 / 16 - 1 / math.pi + noise**2)]
        np.testing.assert_allclose(m.scale, expected, rtol=1e-8)


def _log_curve_density(curves, pdf, t_range, noise, x):
    """log of sum_j (1/J) int N(x; c_j(t), noise^2 I) pdf(t) dt for points x of shape (m, 2), by
    Simpson's rule on a uniform grid of 100,001 parameter values (a brute-force reference)."""
    t = np.linspace(*t_range, 100_001)
    with np.errstate(divide="ignore"):
        log_pdf = np.log(pdf(t))
    logs = []
    for c in curves:
        ct = c(t)  # (T, 2)
        d2 = (x[:, :1] - ct[:, 0]) ** 2 + (x[:, 1:] - ct[:, 1]) ** 2  # (m, T)
        f = log_pdf - 0.5 * d2 / noise**2
        peak = f.max(1, keepdims=True)
        logs.append(peak[:, 0] + np.log(integrate.simpson(np.exp(f - peak), x=t, axis=1)))
    return np.logaddexp.reduce(logs, axis=0) - math.log(len(curves) * 2 * math.pi * noise**2)


@pytest.mark.parametrize("name", ["moons", "spirals"])
def test_curve_quadrature_against_brute_force_integration(name):
    t = toy(name)
    y = samples(name)[:6].double()
    y = torch.cat([y, 1.4 * y[:3], y[3:] + 0.5])  # on the data and well off it
    ends = np.array([c(np.array(t.t_range)) for c in t.curves]).reshape(-1, 2)
    near_ends = ends + np.random.default_rng(0).normal(scale=2 * t.noise, size=ends.shape)
    y = torch.cat([y, torch.from_numpy((near_ends - t.shift) / t.scale)])  # where curves stop
    pdf = {"moons": lambda s: np.full_like(s, 1 / math.pi),
           "spirals": lambda s: 2 * s / (3 * math.pi) ** 2}[name]
    ref = _log_curve_density(t.curves, pdf, t.t_range, t.noise, y.numpy() * t.scale + t.shift)
    ref = torch.from_numpy(ref) + float(np.log(t.scale).sum())
    torch.testing.assert_close(t.log_prob(y), ref, atol=2e-4, rtol=0)


@pytest.mark.parametrize("cls", [Moons, Spirals])
def test_curve_quadrature_is_converged(cls):
    coarse, fine = cls(), cls(resolution=30)
    y = coarse.sample(200, torch.Generator().manual_seed(0))
    y = torch.cat([y, 1.5 * y, y + 0.3, 5 * y])
    torch.testing.assert_close(coarse.log_prob(y), fine.log_prob(y), atol=2e-4, rtol=0)


def test_circles_bessel_form_against_quadrature_over_the_angle():
    t = Circles(radii=(1.0, 2.0), noise=0.1)
    pts = np.array([[0.0, 0.0], [1.0, 0.0], [0.7, 0.7], [1.5, 0.2], [2.3, -0.4], [0.1, 1.05],
                    [3.5, 1.0]])
    s2 = t.noise**2
    ref = []
    for x in pts:
        phi = math.atan2(x[1], x[0]) % (2 * math.pi)
        dens = 0.0
        for r in (1.0, 2.0):
            # Gaussian factor relative to its peak (at theta = phi), which is exp(-(|x|-r)^2/2s2).
            def g(th, x=x, r=r, phi=phi):
                return math.exp(-np.linalg.norm(x) * r * (1 - math.cos(th - phi)) / s2)

            val, _ = integrate.quad(g, 0, 2 * math.pi, points=[phi], limit=200, epsrel=1e-12)
            dens += 0.5 * math.exp(-((np.linalg.norm(x) - r) ** 2) / (2 * s2)) * val / (2 * math.pi)
        ref.append(math.log(dens / (2 * math.pi * s2)))
    torch.testing.assert_close(t.log_prob(pts), torch.tensor(ref, dtype=F64), atol=1e-9, rtol=0)

    # The generic curve quadrature on the same circles agrees with the closed form too.
    curves = [lambda th, r=r: r * np.stack([np.cos(th), np.sin(th)], -1) for r in (1.0, 2.0)]
    generic = NoisyCurves(curves, (0.0, 2 * math.pi), lambda th: th / (2 * math.pi),
                          lambda u: 2 * math.pi * u, noise=0.1)
    y = torch.cat([samples("circles")[:500].double(), torch.from_numpy(pts)])
    torch.testing.assert_close(generic.log_prob(y), t.log_prob(y), atol=2e-4, rtol=0)


def test_eight_gaussians_against_torch_distributions():
    t = EightGaussians()
    ang = torch.arange(8, dtype=F64) * math.pi / 4
    centres = 2 * math.sqrt(2) * torch.stack([ang.cos(), ang.sin()], 1)
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(8, dtype=F64)),
        torch.distributions.Independent(
            torch.distributions.Normal(centres, torch.full_like(centres, 0.5 / math.sqrt(2))), 1
        ),
    )
    y = torch.cat([samples("8gaussians")[:1000].double(), torch.tensor([[0.0, 0.0], [9.0, 9.0]])])
    torch.testing.assert_close(t.log_prob(y), mix.log_prob(y), atol=1e-10, rtol=0)


def test_checkerboard_closed_form():
    t = Checkerboard()
    black = torch.tensor([[-3.0, -3.0], [-1.0, -1.0], [1.0, 1.0], [3.0, 3.0], [-3.0, 1.0],
                          [3.0, -1.0]])
    white = torch.tensor([[-1.0, -3.0], [1.0, -1.0], [3.0, 1.0], [-3.0, -1.0]])
    outside = torch.tensor([[4.5, 0.0], [0.0, -4.01], [10.0, 10.0]])
    edges = torch.tensor([[-2.0, -3.0], [0.0, 0.5], [4.0, 3.0], [-4.0, -4.0], [2.0, 2.0]])
    assert (t.log_prob(black) == -math.log(32)).all()
    assert (t.log_prob(white) == -math.inf).all()
    assert (t.log_prob(outside) == -math.inf).all()
    assert (t.log_prob(edges) == -math.log(32)).all()  # closed squares
    assert (Checkerboard(scale=0.5).log_prob(black * 0.5) == -math.log(8)).all()
    assert t.nll(white) == math.inf


def _pinwheel_forward(u: torch.Tensor, k: int, t: Pinwheel) -> torch.Tensor:
    angle = 2 * math.pi * k / t.n_arms + t.rate * u[0].exp()
    rot = torch.stack([torch.stack([angle.cos(), -angle.sin()]),
                       torch.stack([angle.sin(), angle.cos()])])
    return t.scale * rot @ u


def test_pinwheel_against_change_of_variables_through_the_forward_map():
    t = toy("pinwheel")
    g = torch.Generator().manual_seed(0)
    n = 40
    a = 0.8 + 0.7 * torch.rand(n, generator=g, dtype=F64)  # where one arm alone holds the mass
    b = 0.3 * torch.rand(n, generator=g, dtype=F64) - 0.15
    k = torch.randint(5, (n,), generator=g)
    ys, ref = [], []
    for ai, bi, ki in zip(a, b, k.tolist()):
        u = torch.stack([ai, bi])
        jac = torch.autograd.functional.jacobian(lambda v: _pinwheel_forward(v, ki, t), u)  # noqa: B023 (used at once)
        log_n = torch.distributions.Normal(torch.tensor([1.0, 0.0], dtype=F64),
                                           torch.tensor([0.3, 0.1], dtype=F64)).log_prob(u).sum()
        ys.append(_pinwheel_forward(u, ki, t))
        ref.append(log_n - math.log(5) - torch.linalg.det(jac).abs().log())
    torch.testing.assert_close(t.log_prob(torch.stack(ys)), torch.stack(ref), atol=1e-8, rtol=0)


def test_pinwheel_roots_do_not_depend_on_the_grid():
    class FineGrid(Pinwheel):
        _GRID = 512

    y = samples("pinwheel")[:1000].double()
    y = torch.cat([y, 1.5 * y, 2.5 * y])  # out to |y| ~ 11, where h has folds and many roots
    torch.testing.assert_close(toy("pinwheel").log_prob(y), FineGrid().log_prob(y),
                               atol=1e-6, rtol=0)
    far = torch.tensor([[13.0, 0.0], [0.0, -100.0], [1e6, 1e6]])
    assert torch.isfinite(toy("pinwheel").log_prob(far)).all()


# ---------------------------------------------------------------------------------------------
# Standardizer
# ---------------------------------------------------------------------------------------------


def test_standardizer_round_trip_and_moments():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 3, generator=g) * torch.tensor([0.1, 5.0, 2.0]) + torch.tensor(
        [10.0, -3.0, 0.0]
    )
    st = Standardizer.fit(x)
    z = st.transform(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, correction=0), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(st.inverse(z), x, atol=1e-5, rtol=1e-6)
    assert st.transform(x.double()).dtype == F64
    assert st.transform(x.numpy()).dtype == torch.float32
    st2 = Standardizer.from_state_dict(st.state_dict())
    assert torch.equal(st2.transform(x), z)
    with pytest.raises(ValueError, match="3 columns"):
        st.transform(x[:, :2])


def test_standardizer_log_density_identity_for_a_gaussian():
    g = torch.Generator().manual_seed(1)
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    a = torch.randn(3, 3, generator=g, dtype=F64)
    cov = a @ a.T + 0.5 * torch.eye(3, dtype=F64)
    px = torch.distributions.MultivariateNormal(mu, cov)
    x = px.sample((2000,))
    st = Standardizer.fit(x)
    s = st.std
    pz = torch.distributions.MultivariateNormal((mu - st.mean) / s, cov / s[:, None] / s[None, :])
    assert st.log_abs_det() == pytest.approx(-float(s.log().sum()))
    torch.testing.assert_close(px.log_prob(x), pz.log_prob(st.transform(x)) + st.log_abs_det())


def test_standardizer_rejects_constant_columns():
    with pytest.raises(ValueError, match=r"column\(s\) \[1\].*constant"):
        Standardizer.fit(np.array([[0.0, 1.0], [2.0, 1.0], [3.0, 1.0]]))


# ---------------------------------------------------------------------------------------------
# check_points
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, dim, match",
    [
        (np.zeros(5), None, r"2-D .*shape \(5,\)"),
        (np.zeros((2, 3, 4)), None, r"2-D .*shape \(2, 3, 4\)"),
        (np.zeros((0, 2)), None, "empty: it has 0 rows"),
        (np.zeros((3, 0)), None, "empty: it has 0 columns"),
        (np.array([[0.0, np.nan], [1.0, 2.0], [np.nan, np.nan]]), None, r"2 row\(s\) with NaN"),
        (np.array([[0.0, np.inf], [1.0, -np.inf], [1.0, 2.0]]), None, r"2 row\(s\) with inf"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 2.0]]), None, r"1 row\(s\) with NaN"),
        (np.zeros((4, 3)), 2, "must have 2 columns .*got 3"),
        (np.array([["a", "b"], ["c", "d"]]), None, "numeric"),
        (np.array([[1, "b"]], dtype=object), None, "numeric"),
        (torch.zeros(3, 2, dtype=torch.complex64), None, "numeric"),
        ([[1.0, 2.0], [3.0]], None, "could not be read"),
    ],
)
def test_check_points_names_the_problem(bad, dim, match):
    with pytest.raises(ValueError, match=match):
        check_points(bad, dim=dim)


def test_check_points_uses_the_name_and_converts():
    with pytest.raises(ValueError, match="cells must be a 2-D"):
        check_points(np.zeros(3), name="cells")
    out = check_points(np.arange(6).reshape(3, 2))
    assert out.dtype == torch.float32 and out.shape == (3, 2)
    assert check_points([[1.0, 2.0]], dim=2).tolist() == [[1.0, 2.0]]
    assert check_points(torch.ones(2, 2, dtype=F64), dtype=F64).dtype == F64


# --------------------------------------------------------------------------------------------
# GaussianMixture: the D-dimensional toy of chapter 4
# --------------------------------------------------------------------------------------------

from scipy.stats import multivariate_normal  # noqa: E402

from cnf_lib.datasets import GaussianMixture  # noqa: E402


def scipy_mixture_log_prob(mix: GaussianMixture, x: np.ndarray) -> np.ndarray:
    """log Σ_k w_k N(x; μ_k, σ_k² I) with scipy, component by component."""
    logs = [
        math.log(w) + multivariate_normal(mean=mu, cov=s**2 * np.eye(mix.dim)).logpdf(x)
        for w, mu, s in zip(mix.weights.numpy(), mix.means.numpy(), mix.stds.numpy())
    ]
    return np.logaddexp.reduce(np.stack(logs, axis=1), axis=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dim=5, n_components=3, spread=1.5, std=[0.4, 0.7, 1.1], weights=[0.2, 0.5, 0.3],
             seed=3),
        dict(dim=16, n_components=4, seed=0),
        dict(dim=1, n_components=2, means=[[-1.0], [2.0]], std=0.3),
    ],
)
def test_gaussian_mixture_log_prob_matches_scipy(kwargs):
    mix = GaussianMixture(**kwargs)
    g = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(200, mix.dim, generator=g, dtype=F64)
    logp = mix.log_prob(x)
    assert logp.dtype == F64 and logp.shape == (200,)
    expected = scipy_mixture_log_prob(mix, x.numpy())
    np.testing.assert_allclose(logp.numpy(), expected, rtol=1e-10, atol=1e-10)
    assert mix.nll(x) == pytest.approx(-logp.mean().item(), rel=1e-12)


def test_gaussian_mixture_in_2d_is_eight_gaussians():
    eight = EightGaussians()
    mix = GaussianMixture(2, n_components=8, means=eight.centres, std=eight.std)
    x = eight.sample(300, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(mix.log_prob(x), eight.log_prob(x), rtol=1e-12, atol=1e-12)


def test_gaussian_mixture_samples_have_the_closed_form_moments():
    mix = GaussianMixture(4, n_components=3, spread=1.0, std=[0.3, 0.6, 0.9],
                          weights=[0.5, 0.3, 0.2], seed=2)
    n = 200_000
    x = mix.sample(n, generator=torch.Generator().manual_seed(4)).double()
    cov = mix.covariance()
    se_mean = (cov.diagonal() / n).sqrt()
    assert ((x.mean(0) - mix.mean()).abs() < 5 * se_mean).all()
    # sample covariance: entries within a few standard errors (Gaussian-like bound, loose factor)
    scale = torch.outer(cov.diagonal().sqrt(), cov.diagonal().sqrt())
    assert ((torch.cov(x.T) - cov).abs() < 8 * scale * (2.0 / n) ** 0.5).all()


def test_gaussian_mixture_sampler_agrees_with_density():
    """E_p[w_k N_k(x) / p(x)] = w_k exactly: responsibilities (from log_prob) over samples."""
    mix = GaussianMixture(6, n_components=3, spread=0.6, std=[0.5, 0.8, 1.0],
                          weights=[0.6, 0.3, 0.1], seed=5)
    n = 100_000
    x = mix.sample(n, generator=torch.Generator().manual_seed(6)).double()
    logp = mix.log_prob(x)
    resp = []
    for k in range(3):
        single = GaussianMixture(6, n_components=1, means=mix.means[k : k + 1],
                                 std=float(mix.stds[k]))
        resp.append((mix.weights[k].log() + single.log_prob(x) - logp).exp())
    resp = torch.stack(resp, 1)
    torch.testing.assert_close(resp.sum(1), torch.ones(n, dtype=F64))
    se = resp.std(0) / n**0.5
    assert ((resp.mean(0) - mix.weights).abs() < 5 * se).all(), (resp.mean(0), mix.weights)


def test_gaussian_mixture_density_is_normalized():
    """Importance sampling from a broad Gaussian q: E_q[p / q] = 1."""
    mix = GaussianMixture(3, n_components=4, spread=1.0, std=0.6, seed=7)
    q = torch.distributions.MultivariateNormal(mix.mean(), 2.0 * mix.covariance())
    torch.manual_seed(8)
    z = q.sample((200_000,))
    ratio = (mix.log_prob(z) - q.log_prob(z)).exp()
    assert ratio.mean().item() == pytest.approx(1.0, abs=5 * ratio.std().item() / 200_000**0.5)


def test_gaussian_mixture_is_reproducible():
    a, b, c = GaussianMixture(8, seed=1), GaussianMixture(8, seed=1), GaussianMixture(8, seed=2)
    torch.testing.assert_close(a.means, b.means)
    assert not torch.equal(a.means, c.means)
    s1 = a.sample(50, generator=torch.Generator().manual_seed(0))
    s2 = a.sample(50, generator=torch.Generator().manual_seed(0))
    assert s1.dtype == torch.float32 and s1.shape == (50, 8)
    torch.testing.assert_close(s1, s2)
    lo, hi = a.bounds
    big = a.sample(20_000, generator=torch.Generator().manual_seed(1))
    assert lo < big.min() and big.max() < hi


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=0), "dim"),
        (dict(dim=2.5), "dim"),
        (dict(dim=3, n_components=0), "n_components"),
        (dict(dim=3, spread=-1.0), "spread"),
        (dict(dim=3, n_components=2, std=[0.5, -0.1]), "std"),
        (dict(dim=3, n_components=2, std=[0.5, 0.5, 0.5]), "std"),
        (dict(dim=3, n_components=2, weights=[1.0]), "weights"),
        (dict(dim=3, n_components=2, weights=[0.0, 0.0]), "weights"),
        (dict(dim=3, n_components=2, means=np.zeros((2, 4))), "means"),
        (dict(dim=3, n_components=2, means=np.zeros((3, 3))), "means"),
    ],
)
def test_gaussian_mixture_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**kwargs)


def test_gaussian_mixture_bad_points_raise():
    mix = GaussianMixture(3)
    with pytest.raises(ValueError, match="3 columns"):
        mix.log_prob(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="non-finite"):
        mix.log_prob(torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="non-negative integer"):
        mix.sample(-1)
