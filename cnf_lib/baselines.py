r"""What a trajectory model is measured against: baselines for a held-out time point, OT paths.

* :func:`holdout_baselines` — the previous, next and a random snapshot, and the exact
  optimal-transport (McCann) interpolation between the two neighbours;
* :func:`ot_paths` — cell paths from chained exact OT matchings of consecutive snapshots;
* :func:`path_error` — the mean distance between predicted and true paths.

References:
    McCann (1997). A convexity principle for interacting gases. Advances in Mathematics 128.
    Schiebinger et al. (2019). Optimal-transport analysis of single-cell gene expression
    identifies developmental trajectories in reprogramming. Cell 176.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ot
import torch
from scipy.spatial.distance import cdist
from torch import Tensor

from .checks import check_points
from .metrics import ot_interpolate
from .timecourse import TimeCourse

__all__ = ["holdout_baselines", "ot_paths", "path_error"]



def holdout_baselines(
    course: TimeCourse, leave_out: float, generator: torch.Generator | None = None, *, return_weights: bool = False
) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, Tensor | None]]:
    """The four baseline guesses for a held-out intermediate time point.

    * ``"previous"``: the snapshot before it; ``"next"``: the one after it;
    * ``"random"``: another snapshot, drawn uniformly with ``generator``;
    * ``"OT interpolation"``: McCann's interpolation between the two neighbours along their
      exact W2 plan (:func:`cnf_lib.metrics.ot_interpolate`), at the held-out time's fraction
      of the interval: one point per pair of the plan's support, deterministic. Equal-sized
      neighbours give one point per cell with equal weights; otherwise the points carry the
      plan's (unequal) weights: ask for them with ``return_weights`` and pass them to
      :func:`cnf_lib.metrics.wasserstein` (``a=``).

    Arguments:
        course: the time course.
        leave_out: the held-out time point (not the first or last).
        generator: for the random snapshot; a fixed default if ``None``.
        return_weights: also return ``{name: weights (m,) or None for uniform}``.

    Returns:
        ``{name: points (m, D)}`` (and the weights with ``return_weights``).
    """
    k = course.index(leave_out)
    if k == 0 or k == len(course.times) - 1:
        raise ValueError(
            f"time point {leave_out!r} is the first or last one; the baselines need a neighbour on both sides"
        )
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    prev, nxt = course.snapshots[k - 1], course.snapshots[k + 1]
    others = [j for j in range(len(course.times)) if j != k]
    pick = others[int(torch.randint(len(others), (1,), generator=generator, device=generator.device))]
    s = (course.times[k] - course.times[k - 1]) / (course.times[k + 1] - course.times[k - 1])
    ot_points, ot_weights = ot_interpolate(prev, nxt, s, return_weights=True)
    guesses = {"previous": prev.clone(), "next": nxt.clone(), "random": course.snapshots[pick].clone(),
               "OT interpolation": ot_points.to(prev.dtype)}
    if not return_weights:
        return guesses
    uniform = prev.shape[0] == nxt.shape[0]
    return guesses, {"previous": None, "next": None, "random": None,
                     "OT interpolation": None if uniform else ot_weights}


def ot_paths(snapshots: Sequence[Tensor], times: Sequence[float], eval_times: Sequence[float]) -> Tensor:
    r"""Paths of the first snapshot's cells by chaining exact OT matchings of consecutive snapshots.

    The W2 plan :math:`\pi_k` between snapshots :math:`k` and :math:`k+1` (uniform weights) is
    turned into a transition matrix :math:`T_k = n_k \pi_k` (rows sum to one); a cell of the
    first snapshot sits at :math:`w_k X_k` at time :math:`t_k`, with :math:`w_0` its indicator and
    :math:`w_{k+1} = w_k T_k` (the barycentric projection; a permutation when the snapshots have
    equal sizes, so the path visits one cell per snapshot), and moves on straight lines between
    snapshot times: McCann's interpolation, chained.

    Arguments:
        snapshots: K point clouds, shapes (n_k, D).
        times: their K increasing times.
        eval_times: where to read the paths, within ``[times[0], times[-1]]``.

    Returns:
        Positions, shape (len(eval_times), n_0, D), float32.
    """
    if len(snapshots) != len(times) or len(times) < 2:
        raise ValueError(f"need at least 2 snapshots with one time each, got {len(snapshots)} and {len(times)}")
    t = np.asarray(times, dtype=np.float64)
    if not np.all(np.diff(t) > 0):
        raise ValueError(f"times must be strictly increasing, got {t.tolist()}")
    xs = [check_points(s, f"snapshot {k}", dtype=torch.float64).detach().cpu().numpy() for k, s in enumerate(snapshots)]
    te = np.asarray(eval_times, dtype=np.float64).reshape(-1)
    if te.size == 0 or te.min() < t[0] - 1e-9 or te.max() > t[-1] + 1e-9:
        raise ValueError(f"eval_times must lie in [{t[0]}, {t[-1]}], got {te.tolist()}")
    w = np.eye(len(xs[0]))
    at_snapshots = [xs[0]]
    for k in range(len(xs) - 1):
        n, m = len(xs[k]), len(xs[k + 1])
        plan = ot.emd(np.full(n, 1.0 / n), np.full(m, 1.0 / m), cdist(xs[k], xs[k + 1], "sqeuclidean"),
                      numItermax=10_000_000)
        w = w @ (plan * n)
        at_snapshots.append(w @ xs[k + 1])
    pos = np.stack(at_snapshots)  # (K, n0, D)
    seg = np.clip(np.searchsorted(t, te, side="right") - 1, 0, len(t) - 2)
    frac = ((te - t[seg]) / (t[seg + 1] - t[seg]))[:, None, None]
    out = (1 - frac) * pos[seg] + frac * pos[seg + 1]
    return torch.as_tensor(out, dtype=torch.float32)


def path_error(predicted: Tensor, true: Tensor) -> float:
    """Mean Euclidean distance between predicted and true paths over cells and times.

    Arguments:
        predicted, true: positions of the same cells at the same times, shape (T, n, D), on
            any devices (compared on the CPU).

    Returns:
        The mean distance, a Python float.
    """
    p, q = (torch.as_tensor(a).detach().cpu().double() for a in (predicted, true))
    if p.shape != q.shape or p.ndim != 3:
        raise ValueError(f"predicted and true must have the same shape (T, n, D), got {tuple(p.shape)} and "
                         f"{tuple(q.shape)}")
    if not (torch.isfinite(p).all() and torch.isfinite(q).all()):
        raise ValueError("paths contain NaN or infinite values")
    return float((p - q).norm(dim=-1).mean())
