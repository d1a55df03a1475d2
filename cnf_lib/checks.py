"""Input checks and the rule for randomness and devices, shared by every module of ``cnf_lib``.

Input checks: :func:`check_points` turns anything array-like into a float tensor of shape
(n, D), or raises a ``ValueError`` that names the problem (wrong shape, wrong width, NaN or inf,
non-numbers) and how to fix it, before any solver sees the data.

**Randomness and devices.** Every random number ``cnf_lib`` draws (Hutchinson probes, prior
samples, mini-batch indices) is drawn **on the generator's device and then moved** to where it is
used. The generators ``cnf_lib`` makes (:class:`~cnf_lib.train.Trainer`'s, the fit functions')
are CPU generators, so a seed gives the **same numbers on a CPU and on a GPU**: a CUDA run draws
the same batches and probes as a CPU run with the same seed (its floating-point results still
differ in the last bits, as GPU kernels round differently). A user's CUDA generator is honoured:
its numbers are drawn on the GPU. With ``generator=None`` torch's global CPU generator is used
(seed it with ``torch.manual_seed``). Results are returned on the device of the model that
computed them, unless a function's docstring says otherwise (the metrics and the single-cell
functions return CPU values).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["check_points", "randn", "uniform", "rademacher", "randperm", "categorical", "module_device",
           "user_stacklevel"]


def check_points(
    x: Any,
    name: str = "x",
    dim: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    r"""Validates a batch of points and returns it as a tensor of shape :math:`(n, D)`.

    Arguments:
        x: The points: a tensor, a NumPy array or anything :func:`numpy.asarray` accepts,
            with shape :math:`(n, D)` and a real (integer or floating) dtype.
        name: The name used for ``x`` in error messages.
        dim: The expected number of columns :math:`D`, or :py:`None` for any.
        dtype: The floating dtype of the result.

    Returns:
        A tensor of dtype ``dtype`` and shape :math:`(n, D)`, on the device of ``x`` if ``x`` is
        a tensor (on the CPU otherwise). Gradients flow through it.

    Raises:
        ValueError: If ``x`` is not numeric, not 2-D, empty (no rows or no columns), has the wrong
            number of columns, or holds NaN or infinite values; the message names the problem.
    """
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_complex():
            raise ValueError(f"{name} must be numeric (real numbers); got dtype {x.dtype}")
        t = x
    else:
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as e:  # e.g. ragged nested lists
            raise ValueError(f"{name} could not be read as a numeric 2-D array: {e}") from None
        if arr.dtype.kind == "O":
            try:
                arr = arr.astype(np.float64)
            except (ValueError, TypeError):
                raise ValueError(
                    f"{name} must be numeric (real numbers); got an object array "
                    "holding non-numbers"
                ) from None
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"{name} must be numeric (real numbers); got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))

    shape = tuple(t.shape)
    if t.ndim != 2:
        hint = ""
        if t.ndim == 1:
            hint = " (use x[None] for a single point or x[:, None] for one feature)"
        raise ValueError(
            f"{name} must be a 2-D array of shape (n, D); got {t.ndim}-D shape {shape}{hint}"
        )
    n, d = shape
    if n == 0:
        raise ValueError(f"{name} is empty: it has 0 rows (shape {shape})")
    if d == 0:
        raise ValueError(f"{name} is empty: it has 0 columns (shape {shape})")
    if dim is not None and d != dim:
        raise ValueError(f"{name} must have {dim} columns (expected D = {dim}); got {d}, "
                         f"shape {shape}")

    t = t.to(dtype)
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        nan_rows = int(torch.isnan(t).any(dim=1).sum())
        inf_rows = int(torch.isinf(t).any(dim=1).sum())
        bad = int((~finite.all(dim=1)).nonzero()[0, 0])
        raise ValueError(
            f"{name} has non-finite values: {nan_rows} row(s) with NaN and {inf_rows} row(s) "
            f"with inf, out of {n} (first bad row: {bad})"
        )
    return t


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def randn(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard-normal numbers drawn on the generator's device, then moved to ``device``.

    Arguments:
        shape: the shape of the result.
        generator: the generator (``None``: torch's global CPU generator).
        dtype, device: of the result (``device=None``: the generator's).

    Returns:
        A tensor of shape ``shape``.
    """
    x = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=_draw_device(generator))
    return x if device is None else x.to(device)


def uniform(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform numbers on [0, 1), drawn as :func:`randn` is (generator's device, then moved)."""
    x = torch.rand(tuple(shape), generator=generator, dtype=dtype, device=_draw_device(generator))
    return x if device is None else x.to(device)


def rademacher(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Entries ±1 with probability 1/2, drawn as :func:`randn` is (generator's device, then moved)."""
    bits = torch.randint(0, 2, tuple(shape), generator=generator, device=_draw_device(generator))
    x = bits.to(dtype) * 2 - 1
    return x if device is None else x.to(device)


def randperm(n: int, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
    """A random permutation of ``0..n-1`` drawn as :func:`randn` is. Shape (n,), int64."""
    idx = torch.randperm(int(n), generator=generator, device=_draw_device(generator))
    return idx if device is None else idx.to(device)


def categorical(weights: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` indices drawn with probabilities ``weights`` (non-negative, summing to 1), by inverting
    the cumulative distribution: any number of categories (``torch.multinomial`` stops at 2^24).

    Arguments:
        weights: shape (k,).
        n: the number of draws.
        generator: as for :func:`randn` (uniforms drawn in float64 on its device).

    Returns:
        Indices, shape (n,), int64, on the CPU.
    """
    u = torch.rand(int(n), generator=generator, dtype=torch.float64, device=_draw_device(generator)).cpu()
    cdf = torch.cumsum(torch.as_tensor(weights).detach().cpu().to(torch.float64), 0)
    return torch.searchsorted(cdf, u, right=True).clamp_max(len(cdf) - 1)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for a module without any)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first line outside ``cnf_lib``.

    Call it as ``warnings.warn(message, UserWarning, stacklevel=user_stacklevel())`` from any
    function of the package: however deep the call chain (a trainer that calls an objective that
    calls a check), the warning names the user's line, not a line of the library.
    """
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1  # the function that warns: warnings.warn's stacklevel 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
