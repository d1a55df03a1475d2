"""Tests for cnf_lib.plot: grids against closed forms, figures on small inputs."""

import math

import matplotlib

matplotlib.use("Agg")  # this test module only; never set MPLBACKEND in the project

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.animation import FuncAnimation  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.quiver import Quiver  # noqa: E402

from cnf_lib.plot import (  # noqa: E402
    animate_flow,
    animation_html,
    density_grid,
    plot_density,
    plot_embedding,
    plot_gallery_row,
    plot_samples,
    plot_trajectories,
    plot_vector_field,
    total_mass,
)


def normal_log_prob(sigma: float = 1.0):
    def log_prob(x: torch.Tensor) -> torch.Tensor:
        return -0.5 * (x / sigma).square().sum(-1) - 2 * math.log(sigma) - math.log(2 * math.pi)

    return log_prob


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def traj() -> np.ndarray:
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(30, 2))
    t = np.linspace(0, 1, 6)[:, None, None]
    return x0 * (1 - t) + (x0 + np.array([2.0, 1.0])) * t  # (T=6, n=30, 2)


# ------------------------------------------------------------------ density grid


@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_total_mass_of_normal_is_one(sigma):
    X, Y, logp, area = density_grid(normal_log_prob(sigma), bounds=(-6, 6), n=200)
    assert X.shape == Y.shape == logp.shape == (200, 200)
    assert area == pytest.approx((12 / 200) ** 2)
    assert total_mass(logp, area) == pytest.approx(1.0, abs=1e-3)


def test_density_grid_values_and_layout():
    f = normal_log_prob()
    X, Y, logp, area = density_grid(f, bounds=((-1, 3), (0, 2)), n=8)
    # cell centres, rows follow x2
    np.testing.assert_allclose(X[0], -1 + 0.5 * (np.arange(8) + 0.5))
    np.testing.assert_allclose(Y[:, 0], 0 + 0.25 * (np.arange(8) + 0.5))
    assert area == pytest.approx(0.5 * 0.25)
    expected = f(torch.as_tensor(np.stack((X, Y), -1))).numpy()
    np.testing.assert_allclose(logp, expected, rtol=1e-5)


def test_density_grid_batches_without_grad():
    calls = []

    def f(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        assert not torch.is_grad_enabled()
        return -x.square().sum(-1, keepdim=True)  # (m, 1) is accepted too

    _, _, logp, _ = density_grid(f, n=50, batch=1000)
    assert calls == [1000, 1000, 500]
    assert logp.shape == (50, 50)


def test_total_mass_is_riemann_sum():
    logp = np.random.default_rng(0).normal(-3.0, 1.0, size=(10, 10))
    assert total_mass(logp, 0.1) == pytest.approx(np.exp(logp).sum() * 0.1)
    assert total_mass(torch.full((4,), -math.inf), 1.0) == 0.0  # zero density is fine


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"bounds": (4, -4)}, "lo < hi"),
        ({"bounds": ((-1, 1), (2, 2))}, "lo < hi"),
        ({"bounds": (0, 1, 2)}, "bounds must be"),
        ({"bounds": (-np.inf, 1)}, "finite"),
        ({"n": 1}, "n must be"),
        ({"batch": 0}, "batch must be"),
    ],
)
def test_density_grid_bad_input(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        density_grid(normal_log_prob(), **kwargs)


def test_density_grid_bad_log_prob():
    with pytest.raises(ValueError, match="shape"):
        density_grid(lambda x: x, n=4)
    with pytest.raises(ValueError, match="NaN"):
        density_grid(lambda x: torch.full((len(x),), float("nan")), n=4)


@pytest.mark.parametrize(
    "logp, area, msg",
    [
        (np.array([]), 1.0, "empty"),
        (np.array([0.0, np.nan]), 1.0, "NaN"),
        (np.zeros(3), 0.0, "cell_area"),
    ],
)
def test_total_mass_bad_input(logp, area, msg):
    with pytest.raises(ValueError, match=msg):
        total_mass(logp, area)


# ------------------------------------------------------------------------- plots


def test_plot_density_from_callable_and_grid():
    ax = plot_density(normal_log_prob(), bounds=(-3, 3), n=20, title="N(0, I)")
    assert isinstance(ax, Axes)
    (image,) = ax.get_images()
    assert isinstance(image, AxesImage)
    assert image.get_array().shape == (20, 20)
    assert image.get_extent() == pytest.approx([-3, 3, -3, 3])
    assert ax.get_title() == "N(0, I)" and ax.get_xlabel() and ax.get_ylabel()
    assert ax.get_aspect() == 1.0

    grid = density_grid(normal_log_prob(), bounds=(-3, 3), n=20)
    _, ax2 = plt.subplots()
    assert plot_density(grid, ax=ax2, log=True, colorbar=True) is ax2
    np.testing.assert_allclose(ax2.get_images()[0].get_extent(), [-3, 3, -3, 3])


def test_plot_density_bad_input():
    with pytest.raises(ValueError, match="lo < hi"):
        plot_density(normal_log_prob(), bounds=(4, -4), n=10)
    with pytest.raises(ValueError, match="grid"):
        plot_density(np.zeros((3, 3)))


def test_plot_samples():
    x = torch.randn(50, 2)
    ax = plot_samples(x, title="samples", bounds=(-5, 5))
    (points,) = ax.collections
    assert points.get_offsets().shape == (50, 2)
    assert ax.get_xlim() == (-5, 5) and ax.get_aspect() == 1.0
    # draws on a given axes
    assert plot_samples(x + 1, ax=ax, color="C1") is ax and len(ax.collections) == 2


@pytest.mark.parametrize(
    "x, kwargs, msg",
    [
        (np.zeros((5, 3)), {}, r"shape \(n, 2\)"),
        (np.zeros((0, 2)), {}, "empty"),
        (np.array([[0.0, np.nan]]), {}, "NaN"),
        (np.zeros((5, 2)), {"bounds": (4, -4)}, "lo < hi"),
    ],
)
def test_plot_samples_bad_input(x, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        plot_samples(x, **kwargs)


def test_plot_trajectories_draws_n_paths(traj):
    ax = plot_trajectories(traj, n_paths=12)
    assert len(ax.lines) == 12
    assert len(ax.collections) == 2  # start (prior) and end (data) dots
    start, end = ax.collections
    assert start.get_offsets().shape == end.get_offsets().shape == (12, 2)
    # each line runs from the start to the end of its path
    line = ax.lines[0]
    np.testing.assert_allclose(line.get_xydata(), traj[:, 0])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["prior", "data"]


def test_plot_trajectories_more_paths_than_points(traj):
    ax = plot_trajectories(torch.as_tensor(traj), n_paths=200, labels=None)
    assert len(ax.lines) == traj.shape[1]
    assert ax.get_legend() is None


@pytest.mark.parametrize(
    "bad, kwargs, msg",
    [
        (np.zeros((6, 30)), {}, r"\(T, n, 2\)"),
        (np.zeros((6, 30, 3)), {}, r"\(T, n, 2\)"),
        (np.zeros((0, 30, 2)), {}, "empty"),
        (np.full((2, 3, 2), np.nan), {}, "NaN"),
        (np.zeros((2, 3, 2)), {"bounds": (1, -1)}, "lo < hi"),
        (np.zeros((2, 3, 2)), {"n_paths": 0}, "n_paths"),
    ],
)
def test_plot_trajectories_bad_input(bad, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        plot_trajectories(bad, **kwargs)


@pytest.mark.parametrize("kind", ["quiver", "stream"])
def test_plot_vector_field(kind):
    seen = []

    def rotation(t, x):
        seen.append(float(t))
        return torch.stack((-x[:, 1], x[:, 0]), dim=-1) * (1 + t)

    ax = plot_vector_field(rotation, t=0.5, n=7, kind=kind)
    assert seen == [0.5]
    assert ax.get_title() == "$t = 0.5$" and ax.get_aspect() == 1.0
    if kind == "quiver":
        (q,) = [c for c in ax.collections if isinstance(c, Quiver)]
        assert q.N == 49
    else:
        assert len(ax.collections) >= 1


def test_plot_vector_field_bad_input():
    with pytest.raises(ValueError, match="shape"):
        plot_vector_field(lambda t, x: x[:, :1], t=0.0, n=5)
    with pytest.raises(ValueError, match="lo < hi"):
        plot_vector_field(lambda t, x: x, t=0.0, bounds=(3, -3))
    with pytest.raises(ValueError, match="kind"):
        plot_vector_field(lambda t, x: x, t=0.0, kind="arrows")


def test_plot_embedding_categories_and_values():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 2))
    labels = np.array(["B", "T", "NK", "T"] * 10)
    ax = plot_embedding(emb, labels, title="PBMC")
    assert len(ax.collections) == 3
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["B", "NK", "T"]
    assert ax.get_xlabel() == "PC 1"

    ax = plot_embedding(emb, rng.normal(size=40))  # continuous: one scatter, a colorbar
    assert len(ax.collections) == 1
    with pytest.raises(ValueError, match="labels must have shape"):
        plot_embedding(emb, labels[:5])


# --------------------------------------------------------------------- animation


def test_animation_html_has_one_png_per_frame(traj):
    T = traj.shape[0]
    anim = animate_flow(traj, times=np.linspace(0, 1, T), figsize=(2, 2), dpi=40)
    assert isinstance(anim, FuncAnimation)
    html = animation_html(anim)
    assert plt.get_fignums() == []  # the figure is closed: no stray static copy
    text = html.data
    assert "<img" in text
    assert text.count("data:image/png") == T
    assert "font-awesome" not in text and "https://" not in text  # nothing loaded from another host


def test_animate_flow_with_density_frames(traj):
    T = traj.shape[0]
    dens = np.stack([density_grid(normal_log_prob(), bounds=(-4, 4), n=10)[2]] * T)
    anim = animate_flow(traj, bounds=(-4, 4), density_frames=dens, figsize=(2, 2), dpi=30)
    ax = anim._fig.axes[0]
    assert len(ax.get_images()) == 1 and ax.get_xlim() == (-4, 4)
    assert animation_html(anim).data.count("data:image/png") == T


@pytest.mark.parametrize(
    "bad, kwargs, msg",
    [
        (np.zeros((6, 30)), {}, r"\(T, n, 2\)"),
        (np.zeros((6, 30, 2)), {"bounds": (2, -2)}, "lo < hi"),
        (np.zeros((6, 30, 2)), {"times": np.zeros(5)}, "times has 5"),
        (np.zeros((6, 30, 2)), {"density_frames": np.zeros((6, 4, 4))}, "bounds"),
        (np.zeros((6, 30, 2)), {"bounds": (-1, 1), "density_frames": np.zeros((5, 4, 4))}, "T=6"),
    ],
)
def test_animate_flow_bad_input(bad, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        animate_flow(bad, **kwargs)
    assert plt.get_fignums() == []  # no figure is left behind by a rejected call


def test_animation_html_warns_when_frames_are_dropped(traj):
    anim = animate_flow(traj, figsize=(2, 2), dpi=40)
    with pytest.warns(UserWarning, match="frames fit"):
        html = animation_html(anim, embed_limit_mb=0.005)
    assert html.data.count("data:image/png") < traj.shape[0]


# ------------------------------------------------------------------------ gallery


def test_gallery_row_draws_four_panels_on_shared_bounds():
    grid = density_grid(normal_log_prob(0.5), bounds=(-3, 3), n=30)
    samples = 0.5 * np.random.default_rng(0).normal(size=(200, 2))
    axes = plot_gallery_row(normal_log_prob(), grid, samples, lambda t, x: -x * t, t=0.5,
                            bounds=(-3, 3), n=30, n_field=6, row_label="gaussian")
    assert axes.shape == (4,)
    assert len(axes[0].images) == 1 and len(axes[1].images) == 1
    # the model panel shows the grid it was given: its peak is the N(0, 0.5²) peak
    assert axes[1].images[0].get_array().max() == pytest.approx(1 / (2 * math.pi * 0.25), rel=0.05)
    assert len(axes[2].collections) == 1
    assert any(isinstance(c, Quiver) for c in axes[3].collections)
    assert axes[3].get_title() == "$t = 0.5$"
    assert axes[0].get_ylabel() == "gaussian"
    for ax in axes:
        assert ax.get_xlim() == pytest.approx((-3, 3)) and ax.get_ylim() == pytest.approx((-3, 3))


def test_gallery_row_uses_given_axes_and_checks_them():
    fig, axes = plt.subplots(2, 4)
    out = plot_gallery_row(normal_log_prob(), normal_log_prob(), np.zeros((5, 2)), lambda t, x: x, t=0.0,
                           axes=axes[1], n=10, n_field=4, titles=None)
    assert all(a is b for a, b in zip(out, axes[1]))
    assert len(axes[0, 0].images) == 0 and out[0].get_title() == ""
    with pytest.raises(ValueError, match="4 axes"):
        plot_gallery_row(normal_log_prob(), normal_log_prob(), np.zeros((5, 2)), lambda t, x: x, t=0.0,
                         axes=axes[0, :3], n=10)
    with pytest.raises(ValueError, match="4 entries"):
        plot_gallery_row(normal_log_prob(), normal_log_prob(), np.zeros((5, 2)), lambda t, x: x, t=0.0,
                         n=10, titles=("a", "b"))
