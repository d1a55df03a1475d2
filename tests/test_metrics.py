"""Tests for cnf_lib.metrics, against closed forms."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from cnf_lib.metrics import mmd, nll, ot_interpolate, wasserstein


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def sort_rows(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x[np.lexsort(x.T[::-1])]


# --------------------------------------------------------------------------- nll


def test_nll_is_minus_mean():
    lp = torch.tensor([-1.0, -2.0, -3.0])
    assert nll(lp) == pytest.approx(2.0)
    assert nll(np.array([[0.5], [1.5]])) == pytest.approx(-1.0)
    assert isinstance(nll(lp), float)


def test_nll_zero_density_is_inf():
    assert nll(torch.tensor([-1.0, -math.inf])) == math.inf


@pytest.mark.parametrize(
    "bad, msg",
    [(torch.tensor([]), "empty"), (torch.tensor([-1.0, float("nan")]), "NaN")],
)
def test_nll_bad_input(bad, msg):
    with pytest.raises(ValueError, match=msg):
        nll(bad)


# -------------------------------------------------------------------- wasserstein


@pytest.mark.parametrize("p", [1, 2, 3])
def test_wasserstein_translate_is_norm_of_shift(rng, p):
    x = rng.normal(size=(60, 3))
    v = np.array([0.3, -1.2, 2.0])
    assert wasserstein(x, x + v, p=p) == pytest.approx(np.linalg.norm(v), rel=1e-9)


def test_wasserstein_translate_torch_input():
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert wasserstein(x, x + v, p=1) == pytest.approx(5.0, rel=1e-9)
    assert wasserstein(x, x + v, p=2) == pytest.approx(5.0, rel=1e-9)


@pytest.mark.parametrize("p", [1, 2])
def test_wasserstein_identical_is_zero(rng, p):
    x = rng.normal(size=(40, 2))
    assert wasserstein(x, x.copy(), p=p) == pytest.approx(0.0, abs=1e-10)
    # the same cloud in another order
    assert wasserstein(x, x[rng.permutation(40)], p=p) == pytest.approx(0.0, abs=1e-10)


def test_wasserstein_1d_p1_matches_scipy(rng):
    x, y = rng.normal(size=37), rng.gamma(2.0, size=53)
    assert wasserstein(x, y, p=1) == pytest.approx(scipy.stats.wasserstein_distance(x, y))
    # (n, 1) points are the same as (n,)
    assert wasserstein(x[:, None], y[:, None]) == pytest.approx(wasserstein(x, y))


def test_wasserstein_1d_weighted_matches_scipy(rng):
    x, y = rng.normal(size=20), rng.normal(1.0, size=30)
    a, b = rng.uniform(size=20), rng.uniform(size=30)
    expected = scipy.stats.wasserstein_distance(x, y, u_weights=a, v_weights=b)
    assert wasserstein(x, y, a=a, b=b) == pytest.approx(expected)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_wasserstein_1d_sorted_formula(rng, p):
    # equal sizes, uniform weights: W_p^p = mean |x_(i) - y_(i)|^p
    x, y = rng.normal(size=45), rng.exponential(size=45)
    expected = np.mean(np.abs(np.sort(x) - np.sort(y)) ** p) ** (1 / p)
    assert wasserstein(x, y, p=p) == pytest.approx(expected, rel=1e-9)


def test_wasserstein_two_diracs():
    # all mass of x at 0, y split between -1 and 3 (weights 3/4, 1/4): W1 = 1.5, W2 = sqrt(3)
    x, y = np.zeros((1, 1)), np.array([[-1.0], [3.0]])
    b = np.array([3.0, 1.0])  # normalized to (3/4, 1/4)
    assert wasserstein(x, y, p=1, b=b) == pytest.approx(1.5)
    assert wasserstein(x, y, p=2, b=b) == pytest.approx(math.sqrt(3.0))


@pytest.mark.parametrize(
    "x, y, kwargs, msg",
    [
        (np.zeros((5, 2)), np.zeros((5, 3)), {}, "dimension mismatch"),
        (np.zeros((0, 2)), np.zeros((5, 2)), {}, "x is empty"),
        (np.zeros((5, 2)), np.zeros((0, 2)), {}, "y is empty"),
        (np.array([[0.0, np.nan]]), np.zeros((5, 2)), {}, "x has non-finite values: 1 row\\(s\\) with NaN"),
        (np.zeros((5, 2)), np.array([[np.inf, 0.0]]), {},
         "y has non-finite values: 0 row\\(s\\) with NaN and 1 row\\(s\\) with inf"),
        (np.zeros((5, 2, 1)), np.zeros((5, 2)), {}, "shape"),
        (np.zeros((5, 2)), np.zeros((5, 2)), {"p": 0}, "p must be"),
        (np.zeros((5, 2)), np.zeros((5, 2)), {"p": 1.5}, "p must be"),
        (np.zeros((5, 2)), np.zeros((5, 2)), {"a": np.ones(4)}, "a must have shape"),
        (np.zeros((5, 2)), np.zeros((5, 2)), {"b": -np.ones(5)}, "negative"),
    ],
)
def test_wasserstein_bad_input(x, y, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        wasserstein(x, y, **kwargs)


# ---------------------------------------------------------------------------- mmd


def test_mmd_same_distribution_is_near_zero(rng):
    x, y = rng.normal(size=(400, 2)), rng.normal(size=(400, 2))
    null = mmd(x, y)
    shifted = mmd(x, y + np.array([1.0, 0.0]))
    assert abs(null) < 0.01
    assert shifted > 0.1
    assert shifted > 20 * abs(null)


def test_mmd_matches_gaussian_closed_form(rng):
    # x ~ N(0, I), y ~ N(mu, I) in D dims, k = exp(-|u - v|^2 / 2h^2):
    # E k = c exp(-|mu|^2 / 2(h^2 + 2)) with c = (h^2 / (h^2 + 2))^(D/2), so
    # MMD^2 = 2c (1 - exp(-|mu|^2 / 2(h^2 + 2)))
    d, h, mu = 2, 1.0, np.array([1.0, 0.0])
    c = (h**2 / (h**2 + 2)) ** (d / 2)
    expected = 2 * c * (1 - math.exp(-mu @ mu / (2 * (h**2 + 2))))
    x, y = rng.normal(size=(1000, d)), rng.normal(size=(1000, d)) + mu
    assert mmd(x, y, bandwidths=[h]) == pytest.approx(expected, abs=0.025)


def test_mmd_sum_of_kernels_is_additive(rng):
    x, y = rng.normal(size=(30, 2)), rng.normal(size=(40, 2)) + 0.5
    both = mmd(x, y, bandwidths=[0.5, 2.0])
    assert both == pytest.approx(mmd(x, y, bandwidths=[0.5]) + mmd(x, y, bandwidths=[2.0]))


def test_mmd_unbiased_can_be_negative(rng):
    x = rng.normal(size=(50, 2))
    # with the diagonal excluded, a cloud against itself scores below 0
    assert mmd(x, x) < 0


@pytest.mark.parametrize(
    "x, y, kwargs, msg",
    [
        (np.zeros((5, 2)), np.zeros((5, 3)), {}, "dimension mismatch"),
        (np.zeros((1, 2)), np.zeros((5, 2)), {}, "at least 2"),
        (np.zeros((0, 2)), np.zeros((5, 2)), {}, "empty"),
        (np.full((5, 2), np.nan), np.zeros((5, 2)), {}, "NaN"),
        (np.zeros((5, 2)), np.zeros((5, 2)), {"bandwidths": [1.0, 0.0]}, "positive"),
        (np.zeros((5, 2)), np.zeros((5, 2)), {"bandwidths": []}, "empty"),
    ],
)
def test_mmd_bad_input(x, y, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        mmd(x, y, **kwargs)


# ----------------------------------------------------------------- ot_interpolate


def test_ot_interpolate_endpoints_equal_sizes(rng):
    x0, x1 = rng.normal(size=(12, 2)), rng.normal(3.0, size=(12, 2))
    z0, z1 = ot_interpolate(x0, x1, 0.0), ot_interpolate(x0, x1, 1.0)
    assert z0.shape == z1.shape == (12, 2)
    np.testing.assert_allclose(z0.numpy(), x0, rtol=1e-6, atol=1e-6)  # in x0's order
    np.testing.assert_allclose(sort_rows(z1), sort_rows(x1), rtol=1e-6, atol=1e-6)


def test_ot_interpolate_endpoints_unequal_sizes(rng):
    x0, x1 = rng.normal(size=(6, 2)), rng.normal(size=(9, 2))
    for s, x in ((0.0, x0), (1.0, x1)):
        z = ot_interpolate(torch.as_tensor(x0), torch.as_tensor(x1), s)
        assert z.dtype == torch.float64 and 9 <= len(z) <= 6 + 9 - 1
        np.testing.assert_allclose(sort_rows(np.unique(z.numpy(), axis=0)), sort_rows(x))


@pytest.mark.parametrize("s", [0.0, 0.25, 0.5, 1.0])
def test_ot_interpolate_translate(rng, s):
    x0 = rng.normal(size=(30, 2))
    v = np.array([2.0, -1.0])
    z = ot_interpolate(x0, x0 + v, s)
    np.testing.assert_allclose(z.numpy(), x0 + s * v, atol=1e-6)


def test_ot_interpolate_sampling(rng):
    x0 = rng.normal(size=(20, 2))
    v = np.array([1.0, 1.0])
    g = torch.Generator().manual_seed(1)
    z = ot_interpolate(x0, x0 + v, 0.5, generator=g)
    assert z.shape == (20, 2)
    # every sampled point is one of the support points
    support = x0 + 0.5 * v
    dist = np.linalg.norm(z.numpy()[:, None] - support[None], axis=-1).min(axis=1)
    assert dist.max() < 1e-6
    # reproducible with the same seed, and n_samples sets the count
    again = ot_interpolate(x0, x0 + v, 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z, again)
    assert ot_interpolate(x0, x0 + v, 0.5, generator=g, n_samples=7).shape == (7, 2)


def test_ot_interpolate_keeps_tensor_dtype():
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    assert ot_interpolate(x0, x0 + 1, 0.5).dtype == torch.float32


@pytest.mark.parametrize(
    "x0, x1, s, msg",
    [
        (np.zeros((5, 2)), np.zeros((5, 3)), 0.5, "dimension mismatch"),
        (np.zeros((0, 2)), np.zeros((5, 2)), 0.5, "x0 is empty"),
        (np.zeros((5, 2)), np.array([[np.nan, 0.0]]), 0.5, "x1 has non-finite values: 1 row\\(s\\) with NaN"),
        (np.zeros((5, 2)), np.zeros((5, 2)), 1.5, r"s must be in \[0, 1\]"),
        (np.zeros((5, 2)), np.zeros((5, 2)), -0.1, r"s must be in \[0, 1\]"),
    ],
)
def test_ot_interpolate_bad_input(x0, x1, s, msg):
    with pytest.raises(ValueError, match=msg):
        ot_interpolate(x0, x1, s)


def test_ot_interpolation_of_unequal_clouds_is_exact_and_deterministic_with_its_weights() -> None:
    from cnf_lib.metrics import ot_interpolate

    rng = np.random.default_rng(0)
    x0, x1 = rng.normal(size=(7, 2)), rng.normal(size=(4, 2)) + 3.0
    pts, w = ot_interpolate(x0, x1, 0.0, return_weights=True)
    assert float(w.sum()) == pytest.approx(1.0)
    # at s = 0 the weighted support is x0 itself (each point's mass 1/7 split among its partners)
    assert wasserstein(pts, x0, a=w) == pytest.approx(0.0, abs=1e-6)  # up to the simplex solver rounding
    pts1, w1 = ot_interpolate(x0, x1, 1.0, return_weights=True)
    assert wasserstein(pts1, x1, a=w1) == pytest.approx(0.0, abs=1e-6)
    again, w_again = ot_interpolate(x0, x1, 0.0, return_weights=True)
    assert torch.equal(again, pts) and torch.equal(w_again, w)


def test_drawing_from_a_plan_with_more_than_2_to_the_24_entries_works() -> None:
    from cnf_lib.checks import categorical

    weights = torch.zeros(2**24 + 10, dtype=torch.float64)
    weights[-1], weights[3] = 0.75, 0.25
    draws = categorical(weights, 4000, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {3, 2**24 + 9}
    assert (draws == 3).double().mean().item() == pytest.approx(0.25, abs=0.03)


# ------------------------------------------------------- clouds too large to solve exactly


def test_exact_problems_above_the_limit_are_refused_with_the_way_out(monkeypatch) -> None:
    import cnf_lib.metrics as metrics

    monkeypatch.setattr(metrics, "EXACT_MAX_PAIRS", 99)
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="too large for an exact transport problem.*wasserstein_quantized"):
        metrics.wasserstein(x, x)
    with pytest.raises(ValueError, match="quantize"):
        metrics.ot_interpolate(x, x, 0.5)
    assert metrics.wasserstein(x[:9], x[:11]) == 0.0  # 99 pairs: still exact


def test_quantize_keeps_mass_and_its_error_bounds_the_distance_to_the_centres(rng) -> None:
    from cnf_lib.metrics import quantize

    x = rng.normal(size=(400, 3)) * [3.0, 1.0, 0.5]
    a = rng.uniform(0.5, 2.0, size=400)
    q = quantize(x, 30, a=a, seed=0)
    assert len(q.centres) <= 30 and q.weights.sum() == pytest.approx(1.0)
    assert (q.weights > 0).all() and q.labels.max() == len(q.centres) - 1
    # each centre's weight is the mass of its points; distances are to the assigned centre
    np.testing.assert_allclose(q.weights, np.bincount(q.labels, weights=a / a.sum()))
    np.testing.assert_allclose(q.distances, np.linalg.norm(x - q.centres[q.labels], axis=1))
    for p in (1, 2):
        assert wasserstein(x, q.centres, p=p, a=a, b=q.weights) <= q.error(p) + 1e-9
    again = quantize(x, 30, a=a, seed=0)
    assert np.array_equal(again.centres, q.centres)  # seeded: deterministic
    small = quantize(x[:20], 30)
    assert np.array_equal(small.centres, x[:20]) and small.error(1) == 0.0
    with pytest.raises(ValueError, match="n_centres must be a positive integer"):
        quantize(x, 0)


@pytest.mark.parametrize("p", [1, 2])
def test_quantized_distance_brackets_the_exact_one(rng, p) -> None:
    from cnf_lib.metrics import wasserstein_quantized

    x = rng.normal(size=(300, 2)) * [2.0, 0.5]
    y = rng.normal(size=(250, 2)) + [1.0, 2.0]
    exact = wasserstein(x, y, p=p)
    q = wasserstein_quantized(x, y, p=p, n_centres=40)
    assert q.n_centres[0] <= 40 and q.n_centres[1] <= 40
    assert q.lower <= exact + 1e-9 and exact <= q.upper + 1e-9
    assert q.upper - q.lower < 0.5 * exact  # and the bracket is informative here
    whole = wasserstein_quantized(x, y, p=p, n_centres=300)  # no reduction: all three agree
    assert whole.value == pytest.approx(exact, rel=1e-9)
    assert whole.lower == pytest.approx(exact, rel=1e-6) and whole.upper == pytest.approx(exact, rel=1e-9)


def test_weighted_ot_interpolation_of_centres_carries_their_weights(rng) -> None:
    x0, x1 = rng.normal(size=(5, 2)), rng.normal(size=(6, 2)) + 2.0
    a, b = rng.uniform(size=5), rng.uniform(size=6)
    pts, w = ot_interpolate(x0, x1, 0.0, return_weights=True, a=a, b=b)
    assert wasserstein(pts, x0, a=w, b=a) == pytest.approx(0.0, abs=1e-6)
    pts1, w1 = ot_interpolate(x0, x1, 1.0, return_weights=True, a=a, b=b)
    assert wasserstein(pts1, x1, a=w1, b=b) == pytest.approx(0.0, abs=1e-6)
