r"""Figures for 2-D flows: densities, samples, trajectories, vector fields and animations.

The functions take plain data (arrays or tensors) or plain callables, never a model object,
so they work with any flow:

* a log-density is a callable ``log_prob_fn(x) -> logp`` from an :math:`(m, 2)` tensor to an
  :math:`(m,)` tensor (for example ``cnf.log_prob``);
* a vector field is a callable ``field_fn(t, x) -> dx`` with the signature
  :func:`torchdiffeq.odeint` uses;
* a trajectory is an array of positions with shape :math:`(T, n, 2)`, time first.

Every plotting function takes an optional ``ax=`` (a new figure is made otherwise) and returns
what it drew on, so figures can be composed into panels. Axes are labelled
:math:`x_1, x_2` and have an equal aspect ratio, so distances read true.

Animations need no ffmpeg: :func:`animate_flow` builds a
:class:`~matplotlib.animation.FuncAnimation` and :func:`animation_html` turns it into a
self-contained JavaScript player (PNG frames embedded in the page), which shows in Jupyter and
in the rendered book. In a notebook, build and display it in one cell::

    from cnf_lib.plot import animate_flow, animation_html

    animation_html(animate_flow(traj))  # == IPython.display.HTML(anim.to_jshtml())

:func:`animation_html` closes the animation's figure, so no stray static copy of the first
frame appears below the player.
"""

from __future__ import annotations

__all__ = [
    "density_grid",
    "total_mass",
    "plot_density",
    "plot_samples",
    "plot_trajectories",
    "plot_vector_field",
    "animate_flow",
    "animation_html",
    "plot_embedding",
    "plot_gallery_row",
]

import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.animation import FuncAnimation
from matplotlib.axes import Axes
from numpy.typing import ArrayLike
from scipy.special import logsumexp

from .checks import module_device

if TYPE_CHECKING:
    from IPython.display import HTML

ArrayOrTensor = ArrayLike | torch.Tensor
Bounds = tuple[float, float] | tuple[tuple[float, float], tuple[float, float]]
Grid = tuple[np.ndarray, np.ndarray, np.ndarray, float]
LogProbFn = Callable[[torch.Tensor], torch.Tensor]
FieldFn = Callable[[Any, torch.Tensor], torch.Tensor]

#: Colours of the two ends of a flow: the prior (start) and the data (end).
PRIOR_COLOR = "0.55"
DATA_COLOR = "C0"


# ------------------------------------------------------------------------- checks


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Converts an array or tensor to a float64 NumPy array."""

    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()

    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric array or tensor ({e})") from None


def _device_of(fn: Any) -> torch.device:
    """Where a callable computes: the device of a module, or of the module a bound method
    belongs to (``model.log_prob``); the CPU for anything else."""
    owner = getattr(fn, "__self__", fn)
    return module_device(owner) if isinstance(owner, torch.nn.Module) else torch.device("cpu")


def _check_finite(x: np.ndarray, name: str) -> None:
    if not np.isfinite(x).all():
        what = "NaN" if np.isnan(x).any() else "infinite"
        raise ValueError(f"{name} contains {what} values")


def _points2d(x: Any, name: str = "x") -> np.ndarray:
    """Checks 2-D points and returns them as a float64 array of shape (n, 2)."""

    x = _to_numpy(x, name)

    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"{name} must have shape (n, 2), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")

    _check_finite(x, name)

    return x


def _trajectory(traj: Any) -> np.ndarray:
    """Checks a trajectory and returns it as a float64 array of shape (T, n, 2)."""

    traj = _to_numpy(traj, "traj")

    if traj.ndim != 3 or traj.shape[2] != 2:
        raise ValueError(f"traj must have shape (T, n, 2), got shape {tuple(traj.shape)}")
    if traj.shape[0] < 1 or traj.shape[1] < 1:
        raise ValueError(f"traj is empty (shape {tuple(traj.shape)})")

    _check_finite(traj, "traj")

    return traj


def _bounds(bounds: Any) -> tuple[float, float, float, float]:
    """Reads ``(lo, hi)`` or ``((xlo, xhi), (ylo, yhi))`` as ``(xlo, xhi, ylo, yhi)``."""

    try:
        b = np.asarray(bounds, dtype=np.float64)
    except (TypeError, ValueError):
        b = None

    if b is None or b.shape not in ((2,), (2, 2)):
        raise ValueError(f"bounds must be (lo, hi) or ((xlo, xhi), (ylo, yhi)), got {bounds!r}")

    b = np.broadcast_to(b, (2, 2))

    if not np.isfinite(b).all():
        raise ValueError(f"bounds must be finite, got {bounds!r}")
    if not (b[:, 0] < b[:, 1]).all():
        raise ValueError(f"bounds must satisfy lo < hi on each axis, got {bounds!r}")

    return float(b[0, 0]), float(b[0, 1]), float(b[1, 0]), float(b[1, 1])


def _data_bounds(x: np.ndarray, margin: float = 0.05) -> tuple[float, float, float, float]:
    """Square bounds around points of shape (..., 2), with a relative margin."""

    lo, hi = x.reshape(-1, 2).min(axis=0), x.reshape(-1, 2).max(axis=0)
    center, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-6) * (1 + margin)

    return center[0] - half, center[0] + half, center[1] - half, center[1] + half


def _new_ax(ax: Axes | None, figsize: tuple[float, float] = (4.0, 4.0)) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _style(
    ax: Axes,
    bounds: tuple[float, float, float, float] | None = None,
    title: str | None = None,
    labels: tuple[str, str] = ("$x_1$", "$x_2$"),
) -> None:
    """Labels, limits and an equal aspect ratio."""

    if bounds is not None:
        ax.set_xlim(bounds[0], bounds[1])
        ax.set_ylim(bounds[2], bounds[3])
    ax.set_aspect("equal")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    if title is not None:
        ax.set_title(title)


# ------------------------------------------------------------------------ density


def density_grid(
    log_prob_fn: LogProbFn,
    bounds: Bounds = (-4, 4),
    n: int = 200,
    batch: int = 10_000,
    device: torch.device | str | None = None,
) -> Grid:
    r"""Evaluates a 2-D log-density on a regular grid.

    The grid has :math:`n \times n` cells covering ``bounds``; the density is evaluated at the
    cell centres, so ``total_mass(logp, cell_area)`` is the midpoint rule for
    :math:`\int p(x) \, dx` over the box (close to 1 when the box holds the mass).
    ``log_prob_fn`` is called under :func:`torch.no_grad` on at most ``batch`` points at a time
    (a log-density that differentiates inside, like a CNF's exact trace, must re-enable
    gradients itself with :func:`torch.enable_grad`, as :class:`cnf_lib.CNF` does).

    Arguments:
        log_prob_fn: A callable from points, an :math:`(m, 2)` tensor of the default dtype, to
            their log-densities, an :math:`(m,)` (or :math:`(m, 1)`) tensor.
        bounds: The box, ``(lo, hi)`` for both axes or ``((xlo, xhi), (ylo, yhi))``.
        n: The number of cells per axis.
        batch: The largest number of points per call.
        device: The device of the points given to ``log_prob_fn`` (:py:`None`: the device of
            the module it is, or is a method of, e.g. ``model.log_prob``; else the CPU).

    Returns:
        ``(X, Y, logp, cell_area)``: the cell centres ``X`` and ``Y`` as
        :func:`numpy.meshgrid` arrays with shape :math:`(n, n)` (rows follow :math:`x_2`),
        the log-density ``logp`` at them, with shape :math:`(n, n)`, and the area of one cell.

    Raises:
        ValueError: On bad bounds, sizes, or if ``log_prob_fn`` returns the wrong shape or NaN.
    """

    xlo, xhi, ylo, yhi = _bounds(bounds)

    if int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    if int(batch) != batch or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")

    n, batch = int(n), int(batch)
    hx, hy = (xhi - xlo) / n, (yhi - ylo) / n
    xs = xlo + hx * (np.arange(n) + 0.5)
    ys = ylo + hy * (np.arange(n) + 0.5)
    X, Y = np.meshgrid(xs, ys)

    points = torch.as_tensor(np.stack((X.ravel(), Y.ravel()), axis=-1))
    device = _device_of(log_prob_fn) if device is None else device
    points = points.to(dtype=torch.get_default_dtype(), device=device)
    chunks = []

    with torch.no_grad():
        for chunk in points.split(batch):
            out = log_prob_fn(chunk)
            if not isinstance(out, torch.Tensor):
                out = torch.as_tensor(np.asarray(out))
            if out.shape not in ((len(chunk),), (len(chunk), 1)):
                raise ValueError(
                    f"log_prob_fn must map ({len(chunk)}, 2) points to shape ({len(chunk)},), "
                    f"got shape {tuple(out.shape)}"
                )
            chunks.append(out.detach().reshape(-1).cpu().to(torch.float64))

    logp = torch.cat(chunks).numpy().reshape(n, n)

    if np.isnan(logp).any():
        raise ValueError(
            f"log_prob_fn returned NaN at {int(np.isnan(logp).sum())} of {n * n} grid points"
        )

    return X, Y, logp, hx * hy


def total_mass(logp: ArrayOrTensor, cell_area: float) -> float:
    r"""Returns the probability mass on a grid, :math:`\sum_{ij} e^{\log p_{ij}} \, \Delta A`.

    Computed with a log-sum-exp, so very negative log-densities do not underflow.

    Arguments:
        logp: The log-density on the grid cells, any shape, as from :func:`density_grid`.
        cell_area: The area :math:`\Delta A > 0` of one cell.

    Returns:
        The mass; close to 1 for a normalized density whose mass lies inside the grid.

    Raises:
        ValueError: If ``logp`` is empty or has NaN or :math:`+\infty`, or the area is not
            positive.
    """

    logp = _to_numpy(logp, "logp").reshape(-1)
    cell_area = float(cell_area)

    if logp.size == 0:
        raise ValueError("logp is empty")
    if np.isnan(logp).any() or np.isposinf(logp).any():
        raise ValueError("logp contains NaN or +inf values")
    if not (math.isfinite(cell_area) and cell_area > 0):
        raise ValueError(f"cell_area must be positive and finite, got {cell_area}")

    return float(np.exp(logsumexp(logp) + math.log(cell_area)))


def _grid_extent(X: np.ndarray, Y: np.ndarray) -> tuple[float, float, float, float]:
    """The box covered by a grid of cell centres."""

    hx = (X[0, -1] - X[0, 0]) / (X.shape[1] - 1)
    hy = (Y[-1, 0] - Y[0, 0]) / (Y.shape[0] - 1)

    return X[0, 0] - hx / 2, X[0, -1] + hx / 2, Y[0, 0] - hy / 2, Y[-1, 0] + hy / 2


def plot_density(
    log_prob_fn_or_grid: LogProbFn | Grid,
    bounds: Bounds = (-4, 4),
    n: int = 200,
    ax: Axes | None = None,
    cmap: str = "viridis",
    title: str | None = None,
    log: bool = False,
    colorbar: bool = False,
) -> Axes:
    r"""Draws a 2-D density as an image.

    Arguments:
        log_prob_fn_or_grid: A log-density callable (see :func:`density_grid`) or a grid
            ``(X, Y, logp, cell_area)`` already returned by :func:`density_grid` (then
            ``bounds`` and ``n`` are ignored).
        bounds: The box, ``(lo, hi)`` or ``((xlo, xhi), (ylo, yhi))``.
        n: The number of cells per axis.
        ax: The axes to draw on. If :py:`None`, a new figure.
        cmap: The colormap.
        title: The title.
        log: Whether to draw :math:`\log p` (clipped 12 nats below its maximum) rather than
            :math:`p`. The log scale shows the tails; the linear scale shows where the mass is.
        colorbar: Whether to add a colorbar.

    Returns:
        The axes, holding one image.
    """

    if callable(log_prob_fn_or_grid):
        X, Y, logp, _ = density_grid(log_prob_fn_or_grid, bounds=bounds, n=n)
    else:
        try:
            X, Y, logp, _ = log_prob_fn_or_grid
        except (TypeError, ValueError):
            raise ValueError(
                "plot_density needs a log-density callable or a grid (X, Y, logp, cell_area) "
                "from density_grid"
            ) from None
        X, Y, logp = (_to_numpy(a, name) for a, name in ((X, "X"), (Y, "Y"), (logp, "logp")))
        if not (X.shape == Y.shape == logp.shape and logp.ndim == 2 and min(logp.shape) >= 2):
            raise ValueError(
                f"grid arrays must share one 2-d shape, got X {X.shape}, Y {Y.shape}, "
                f"logp {logp.shape}"
            )
        if np.isnan(logp).any():
            raise ValueError("logp contains NaN values")

    extent = _grid_extent(X, Y)

    if log:
        top = np.max(logp)
        values, label = np.clip(logp, top - 12, None), r"$\log p(x)$"
    else:
        values, label = np.exp(logp), r"$p(x)$"

    ax = _new_ax(ax)
    image = ax.imshow(
        values,
        origin="lower",
        extent=extent,
        cmap=cmap,
        interpolation="nearest",
        aspect="equal",
    )
    _style(ax, extent, title)

    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=label, shrink=0.8)

    return ax


# ------------------------------------------------------------------------- points


def plot_samples(
    x: ArrayOrTensor,
    ax: Axes | None = None,
    s: float = 2,
    alpha: float = 0.5,
    color: Any = None,
    title: str | None = None,
    bounds: Bounds | None = None,
    label: str | None = None,
) -> Axes:
    r"""Draws 2-D points as a scatter plot.

    Arguments:
        x: The points, with shape :math:`(n, 2)`.
        ax: The axes to draw on. If :py:`None`, a new figure.
        s: The marker size (points²).
        alpha: The opacity.
        color: The colour (``"C0"`` if :py:`None`).
        title: The title.
        bounds: The axis limits, ``(lo, hi)`` or ``((xlo, xhi), (ylo, yhi))``. If :py:`None`,
            fitted to the data.
        label: A legend label.

    Returns:
        The axes, with one more collection (the scatter).
    """

    x = _points2d(x, "x")
    box = None if bounds is None else _bounds(bounds)

    ax = _new_ax(ax)
    ax.scatter(
        x[:, 0],
        x[:, 1],
        s=s,
        alpha=alpha,
        color=DATA_COLOR if color is None else color,
        linewidths=0,
        label=label,
        rasterized=len(x) > 5000,
    )
    _style(ax, box, title)

    return ax


def _path_indices(n: int, n_paths: int) -> np.ndarray:
    """``n_paths`` indices spread evenly over ``range(n)``."""

    return np.unique(np.linspace(0, n - 1, min(n_paths, n)).round().astype(int))


def plot_trajectories(
    traj: ArrayOrTensor,
    ax: Axes | None = None,
    n_paths: int = 200,
    color: Any = None,
    line_color: Any = "k",
    lw: float = 0.4,
    line_alpha: float = 0.3,
    s: float = 4,
    title: str | None = None,
    bounds: Bounds | None = None,
    labels: tuple[str, str] | None = ("prior", "data"),
) -> Axes:
    r"""Draws paths of points moving through a flow.

    Each path is a thin line from its start ``traj[0]`` (grey dots, the prior) to its end
    ``traj[-1]`` (coloured dots, the data). If your trajectory runs the other way (data to
    prior, the direction of :math:`\log p` evaluation), flip it or swap ``labels``.

    Arguments:
        traj: The positions over time, with shape :math:`(T, n, 2)`, time first.
        ax: The axes to draw on. If :py:`None`, a new figure.
        n_paths: The number of paths drawn, spread evenly over the :math:`n` points (all of
            them if :math:`n \leq` ``n_paths``).
        color: The colour of the end dots (``"C0"`` if :py:`None`).
        line_color: The colour of the paths.
        lw: The width of the paths.
        line_alpha: The opacity of the paths.
        s: The size of the dots.
        title: The title.
        bounds: The axis limits. If :py:`None`, fitted to the data.
        labels: Legend labels of the start and end dots; :py:`None` for no legend.

    Returns:
        The axes, with ``min(n_paths, n)`` lines and two collections (start and end dots).
    """

    traj = _trajectory(traj)
    box = None if bounds is None else _bounds(bounds)

    if int(n_paths) != n_paths or n_paths < 1:
        raise ValueError(f"n_paths must be a positive integer, got {n_paths!r}")

    idx = _path_indices(traj.shape[1], int(n_paths))
    paths = traj[:, idx]
    start_label, end_label = (None, None) if labels is None else labels

    ax = _new_ax(ax)
    ax.plot(paths[..., 0], paths[..., 1], color=line_color, lw=lw, alpha=line_alpha, zorder=1)
    ax.scatter(
        paths[0, :, 0], paths[0, :, 1], s=s, color=PRIOR_COLOR, linewidths=0,
        zorder=2, label=start_label,
    )  # fmt: skip
    ax.scatter(
        paths[-1, :, 0], paths[-1, :, 1], s=s, color=DATA_COLOR if color is None else color,
        linewidths=0, zorder=3, label=end_label,
    )  # fmt: skip
    _style(ax, box, title)

    if labels is not None:
        ax.legend(loc="upper right", markerscale=2, frameon=True, fontsize="small")

    return ax


# ------------------------------------------------------------------- vector field


def plot_vector_field(
    field_fn: FieldFn,
    t: float,
    bounds: Bounds = (-4, 4),
    n: int = 20,
    ax: Axes | None = None,
    kind: str = "quiver",
    cmap: str = "viridis",
    title: str | None = None,
) -> Axes:
    r"""Draws a time-dependent 2-D vector field at one time.

    Arguments:
        field_fn: The field, a callable ``field_fn(t, x)`` from a time and :math:`(m, 2)`
            points to :math:`(m, 2)` velocities. ``t`` is passed as a 0-d tensor, as
            :func:`torchdiffeq.odeint` does (it behaves like a float in arithmetic). Called once,
            under :func:`torch.no_grad`, with points on the field's device (that of the module
            it is or belongs to; else the CPU).
        t: The time.
        bounds: The box, ``(lo, hi)`` or ``((xlo, xhi), (ylo, yhi))``.
        n: The number of grid points per axis.
        ax: The axes to draw on. If :py:`None`, a new figure.
        kind: ``"quiver"`` (arrows) or ``"stream"`` (streamlines).
        cmap: The colormap of the speed :math:`\|f(t, x)\|`.
        title: The title (``"t = ..."`` if :py:`None`).

    Returns:
        The axes, with one quiver (``kind="quiver"``) or one stream plot.
    """

    box = _bounds(bounds)

    if int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    if kind not in ("quiver", "stream"):
        raise ValueError(f"kind must be 'quiver' or 'stream', got {kind!r}")

    n = int(n)
    xs, ys = np.linspace(box[0], box[1], n), np.linspace(box[2], box[3], n)
    X, Y = np.meshgrid(xs, ys)
    points = torch.as_tensor(np.stack((X.ravel(), Y.ravel()), axis=-1))
    points = points.to(torch.get_default_dtype()).to(_device_of(field_fn))

    with torch.no_grad():
        v = field_fn(torch.as_tensor(float(t), dtype=points.dtype, device=points.device), points)

    v = _to_numpy(v, "field_fn output")

    if v.shape != (n * n, 2):
        raise ValueError(f"field_fn must return shape ({n * n}, 2), got {tuple(v.shape)}")

    _check_finite(v, "field_fn output")

    U, V = v[:, 0].reshape(n, n), v[:, 1].reshape(n, n)
    speed = np.hypot(U, V)

    ax = _new_ax(ax)
    if kind == "quiver":
        ax.quiver(X, Y, U, V, speed, cmap=cmap, angles="xy", pivot="mid")
    else:
        ax.streamplot(xs, ys, U, V, color=speed, cmap=cmap, linewidth=0.8, density=1.2)
    _style(ax, box, f"$t = {float(t):.3g}$" if title is None else title)

    return ax


# ---------------------------------------------------------------------- animation


def animate_flow(
    traj: ArrayOrTensor,
    times: ArrayOrTensor | None = None,
    bounds: Bounds | None = None,
    interval: int = 80,
    density_frames: ArrayOrTensor | None = None,
    s: float = 3,
    color: Any = None,
    cmap: str = "Greys",
    figsize: tuple[float, float] = (4.0, 4.0),
    dpi: float | None = None,
    title: str | None = None,
) -> FuncAnimation:
    r"""Animates points moving along a flow.

    Frame :math:`k` shows the points ``traj[k]`` (coloured from grey at the first frame to
    ``color`` at the last), with the time in the title and, optionally, a density image behind
    them. Display it without ffmpeg with :func:`animation_html` (or
    ``IPython.display.HTML(anim.to_jshtml())``) in the same notebook cell.

    Arguments:
        traj: The positions over time, with shape :math:`(T, n, 2)`, time first.
        times: The :math:`T` times of the frames, shown in the title. If :py:`None`, the title
            shows the frame number.
        bounds: The axis limits (and the box of ``density_frames``). If :py:`None`, a square
            around all the positions.
        interval: The delay between frames, in milliseconds.
        density_frames: Log-densities on the grid of :func:`density_grid` over ``bounds``, one
            per frame, with shape :math:`(T, n_y, n_x)`; drawn as :math:`p` behind the points.
            Requires ``bounds``.
        s: The marker size.
        color: The colour of the points at the last frame (``"C0"`` if :py:`None`).
        cmap: The colormap of the density (a light one, so the points stay visible; its
            darkest shade is kept for 1.5 times the largest density).
        figsize: The figure size, in inches.
        dpi: The resolution of the frames (Matplotlib's default, 100, if :py:`None`).
            The embedded player grows with ``figsize × dpi``.
        title: A title prefix.

    Returns:
        The animation, with :math:`T` frames, on a new figure.
    """

    traj = _trajectory(traj)
    T = traj.shape[0]

    if int(interval) != interval or interval < 1:
        raise ValueError(f"interval must be a positive integer (ms), got {interval!r}")

    if times is not None:
        times = _to_numpy(times, "times").reshape(-1)
        if len(times) != T:
            raise ValueError(f"times has {len(times)} entries but traj has T={T} frames")

    if density_frames is not None:
        if bounds is None:
            raise ValueError("density_frames needs the bounds of its grid")
        density_frames = _to_numpy(density_frames, "density_frames")
        if density_frames.ndim != 3 or len(density_frames) != T:
            raise ValueError(
                f"density_frames must have shape (T={T}, ny, nx), "
                f"got {tuple(density_frames.shape)}"
            )
        if np.isnan(density_frames).any():
            raise ValueError("density_frames contains NaN values")

    box = _data_bounds(traj) if bounds is None else _bounds(bounds)

    fig, ax = plt.subplots(figsize=figsize, dpi=dpi, layout="constrained")

    image = None
    if density_frames is not None:
        dens = np.exp(density_frames)
        image = ax.imshow(
            dens[0], origin="lower", extent=box, cmap=cmap, interpolation="nearest",
            vmin=0.0, vmax=1.5 * float(dens.max()), aspect="equal",
        )  # fmt: skip

    # colour goes from the prior's grey to the data's colour over the frames
    start_rgb = np.array(mcolors.to_rgb(PRIOR_COLOR))
    end_rgb = np.array(mcolors.to_rgb(DATA_COLOR if color is None else color))
    scatter = ax.scatter(traj[0, :, 0], traj[0, :, 1], s=s, color=start_rgb, linewidths=0)
    _style(ax, box)

    def label(k: int) -> str:
        when = f"$t = {times[k]:.3g}$" if times is not None else f"frame {k + 1}/{T}"
        return when if title is None else f"{title}, {when}"

    text = ax.set_title(label(0))

    def update(k: int) -> tuple[Any, ...]:
        w = k / (T - 1) if T > 1 else 1.0
        scatter.set_offsets(traj[k])
        scatter.set_color((1 - w) * start_rgb + w * end_rgb)
        text.set_text(label(k))
        if image is not None:
            image.set_data(dens[k])
            return scatter, text, image
        return scatter, text

    return FuncAnimation(fig, update, frames=T, interval=int(interval), blit=False)


def animation_html(anim: FuncAnimation, embed_limit_mb: float = 20) -> HTML:
    r"""Renders an animation as a self-contained HTML/JavaScript player (no ffmpeg needed).

    Equivalent to ``IPython.display.HTML(anim.to_jshtml())`` with a larger embedding limit and
    without Matplotlib's link to Font Awesome on a CDN (the page loads nothing from another host),
    and closes the animation's figure so that Jupyter does not also show a static copy.
    Every frame is a PNG embedded in base64, so the page grows with the number of frames and
    their pixels (about 1 MB for 40 frames of 4 × 4 inches at 100 dpi).

    Arguments:
        anim: The animation, for example from :func:`animate_flow`.
        embed_limit_mb: The largest size of the embedded frames, in MB. Frames beyond it are
            dropped by Matplotlib, with a warning.

    Returns:
        The player, displayed when it is the last expression of a cell.
    """

    try:
        from IPython.display import HTML
    except ImportError as e:  # pragma: no cover
        raise ImportError("animation_html needs IPython (pip install ipython)") from e

    if not hasattr(anim, "to_jshtml"):
        raise ValueError(f"anim must be a matplotlib Animation, got {type(anim).__name__}")
    if not (embed_limit_mb > 0):
        raise ValueError(f"embed_limit_mb must be positive, got {embed_limit_mb!r}")

    fig = getattr(anim, "_fig", None)

    try:
        with plt.rc_context({"animation.embed_limit": float(embed_limit_mb)}):
            html = anim.to_jshtml()
    finally:
        if fig is not None:
            plt.close(fig)

    # Matplotlib's player links Font Awesome from a CDN for its button icons; the book's pages
    # load nothing from another host (the theme ships Font Awesome, and Jupyter has it too)
    html = re.sub(r"<link[^>]*font-awesome[^>]*>\s*", "", html)

    expected = getattr(anim, "_save_count", None)
    found = html.count("data:image/png;base64")

    if isinstance(expected, int) and found < expected:
        warnings.warn(
            f"only {found} of {expected} frames fit in embed_limit_mb={embed_limit_mb}; "
            "raise it, or lower the dpi, figure size or number of frames",
            stacklevel=2,
        )

    return HTML(html)


# ---------------------------------------------------------------------- embedding


def plot_embedding(
    emb: ArrayOrTensor,
    labels: Sequence[Any] | ArrayOrTensor | None = None,
    ax: Axes | None = None,
    s: float = 4,
    alpha: float = 0.8,
    cmap: str | None = None,
    title: str | None = None,
    axis_labels: tuple[str, str] = ("PC 1", "PC 2"),
    legend: bool = True,
) -> Axes:
    r"""Draws a 2-D embedding of cells (PCA, UMAP, ...) coloured by a label.

    Categorical labels (strings, integers, booleans) get one scatter per category, in a
    qualitative palette, with a legend; numeric labels with non-integer values (a score, a
    log-likelihood, pseudotime) get a continuous colormap and a colorbar.

    Arguments:
        emb: The embedding, with shape :math:`(n, 2)`.
        labels: One label per cell, with length :math:`n`, or :py:`None` for one colour.
        ax: The axes to draw on. If :py:`None`, a new figure.
        s: The marker size.
        alpha: The opacity.
        cmap: The colormap (``"tab10"``/``"tab20"`` for categories, ``"viridis"`` for values,
            if :py:`None`).
        title: The title.
        axis_labels: The axis labels.
        legend: Whether to draw the legend (categories) or colorbar (values).

    Returns:
        The axes, with one collection per category (or one for values).
    """

    emb = _points2d(emb, "emb")
    ax = _new_ax(ax, figsize=(5.0, 4.0))

    if labels is None:
        ax.scatter(emb[:, 0], emb[:, 1], s=s, alpha=alpha, color=DATA_COLOR, linewidths=0)
    else:
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
        lab = np.asarray(labels)

        if lab.ndim != 1 or len(lab) != len(emb):
            raise ValueError(
                f"labels must have shape ({len(emb)},) to match emb, got {tuple(lab.shape)}"
            )

        continuous = lab.dtype.kind == "f" and not np.all(np.mod(lab[np.isfinite(lab)], 1) == 0)

        if continuous:
            points = ax.scatter(
                emb[:, 0], emb[:, 1], c=lab, s=s, alpha=alpha,
                cmap=cmap or "viridis", linewidths=0,
            )  # fmt: skip
            if legend:
                ax.figure.colorbar(points, ax=ax, shrink=0.8)
        else:
            categories = list(dict.fromkeys(lab.tolist()))  # in order of appearance
            try:
                categories = sorted(categories)
            except TypeError:
                pass
            palette = plt.get_cmap(cmap or ("tab10" if len(categories) <= 10 else "tab20"))
            for k, cat in enumerate(categories):
                mask = lab == cat
                ax.scatter(
                    emb[mask, 0], emb[mask, 1], s=s, alpha=alpha, linewidths=0,
                    color=palette(k % palette.N), label=str(cat),
                )  # fmt: skip
            if legend:
                ax.legend(
                    loc="center left", bbox_to_anchor=(1.02, 0.5), markerscale=3,
                    frameon=False, fontsize="small",
                )  # fmt: skip

    _style(ax, None, title, labels=axis_labels)

    return ax


# ------------------------------------------------------------------------ gallery


def plot_gallery_row(
    target: LogProbFn | Grid,
    model: LogProbFn | Grid,
    samples: ArrayOrTensor,
    field_fn: FieldFn,
    t: float,
    bounds: Bounds = (-4, 4),
    axes: Sequence[Axes] | None = None,
    n: int = 100,
    n_field: int = 15,
    titles: Sequence[str] | None = ("target density", "model density", "model samples", None),
    row_label: str | None = None,
) -> np.ndarray:
    r"""Draws one row of a gallery: target density, model density, samples, vector field.

    The four panels share ``bounds``, so the model can be read against the target column by
    column. Like the other functions here it takes data and callables, not a model: for a
    :class:`cnf_lib.CNF` pass ``model.log_prob`` (or a grid from :func:`density_grid`),
    ``model.sample(...)`` and ``model.field``.

    Arguments:
        target: The target's log-density, a callable or a grid from :func:`density_grid`.
        model: The model's log-density, a callable or a grid.
        samples: Samples of the model, shape :math:`(m, 2)`.
        field_fn: The vector field ``field_fn(t, x)`` (see :func:`plot_vector_field`).
        t: The time at which the field is drawn.
        bounds: The box of every panel.
        axes: Four axes to draw on; if :py:`None`, a new figure with one row of four.
        n: Cells per axis of the density panels given as callables.
        n_field: Arrows per axis of the field panel.
        titles: The four panel titles (:py:`None` for a panel's default; the field's is
            ``"t = ..."``), or :py:`None` for no titles.
        row_label: Written as the y-axis label of the first panel (for example the data set).

    Returns:
        The four axes, as an array of shape :math:`(4,)`.

    Raises:
        ValueError: If ``axes`` does not hold four axes or ``titles`` four entries.
    """

    if axes is None:
        fig, axes = plt.subplots(1, 4, figsize=(13.0, 3.4))
    axes = np.asarray(axes, dtype=object).reshape(-1)
    if axes.shape != (4,):
        raise ValueError(f"axes must hold 4 axes (target, model, samples, field), got {axes.shape[0]}")
    if titles is None:
        titles = ("", "", "", "")
    titles = tuple(titles)
    if len(titles) != 4:
        raise ValueError(f"titles must have 4 entries, got {len(titles)}")

    plot_density(target, bounds=bounds, n=n, ax=axes[0], title=titles[0])
    plot_density(model, bounds=bounds, n=n, ax=axes[1], title=titles[1])
    plot_samples(samples, ax=axes[2], s=1.5, alpha=0.4, bounds=bounds, title=titles[2])
    plot_vector_field(field_fn, t, bounds=bounds, n=n_field, ax=axes[3], title=titles[3])
    if row_label is not None:
        axes[0].set_ylabel(row_label)

    return axes
