r"""Continuous normalizing flows on single cells, from AnnData, the scanpy way.

Single-cell data lives in :class:`anndata.AnnData` objects. This module fits a CNF density to a
low-dimensional *representation* of the cells (the first principal components
``adata.obsm["X_pca"]``, another ``obsm`` entry, or a small ``.X``), scores cells with their
log-likelihood and samples new cells, with scanpy's conventions: ``use_rep`` names the
representation, ``key_added`` names what is written, ``copy=True`` works on a copy and returns
it (otherwise the object is modified in place and :py:`None` is returned).

Typical use::

    import scanpy as sc
    from cnf_lib.singlecell import fit_density, score_cells, sample_cells

    adata = sc.datasets.pbmc68k_reduced()
    fit_density(adata, use_rep="X_pca", n_comps=5)          # model in adata.uns["cnf"]
    score_cells(adata)                                       # adata.obs["cnf_log_likelihood"]
    new = sample_cells(adata, 500)                           # new.obsm["X_pca"], shape (500, 5)

What is written where:

========================================  =======================================================
``adata.uns[key_added]``                  the fitted density: settings, standardization, network
                                          weights, training history (plain dicts of NumPy arrays,
                                          so ``adata.write_h5ad`` saves it and reading it back
                                          scores again); :func:`get_density` rebuilds the
                                          :class:`CellDensity`
``adata.obs[key_added + "_split"]``       ``"train"`` or ``"validation"``: which cells fitted the
                                          network and which chose when to stop
``adata.obs["cnf_log_likelihood"]``       :math:`\log p(x)` of each cell in nats, in the units of
                                          the representation (:func:`score_cells`)
========================================  =======================================================

**Units.** The network is trained on standardized coordinates :math:`z = (x - m)/s`
(:class:`~cnf_lib.datasets.Standardizer`), but every likelihood this module reports is the
density of the representation itself,
:math:`\log p_x(x) = \log p_z(z) - \sum_d \log s_d`, so it can be set beside any other density
model of the same coordinates (a Gaussian mixture from scikit-learn, for example).

**Input errors** are :class:`ValueError`\ s that say what to do: a missing ``obsm`` key (the
message lists those that exist), too few cells for the dimension (:data:`MIN_CELLS_PER_DIM`),
NaN or infinite values (the message names the first bad cell), a ``.X`` with too many genes
(:data:`MAX_DIM`; reduce it with ``sc.pp.pca`` first) or holding raw counts.
:func:`get_representation` is the one place that reads a representation and applies these
checks; other single-cell code of ``cnf_lib`` reuses it.

References:
    Wolf, Angerer and Theis (2018). SCANPY: large-scale single-cell gene expression data
    analysis. Genome Biology 19, 15.
    Grathwohl et al. (2019). FFJORD: Free-form continuous dynamics for scalable reversible
    generative models. ICLR.
    Zheng et al. (2017). Massively parallel digital transcriptional profiling of single cells.
    Nature Communications 8, 14049 (the PBMC data of :func:`load_pbmc`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse
from scipy.spatial import cKDTree

from .checks import randn
from .cnf import CNF, GaussianMixtureBase
from .datasets import Standardizer
from .saving import plain_config
from .train import TrainConfig, Trainer

__all__ = [
    "MAX_DIM",
    "MIN_CELLS_PER_DIM",
    "EVAL_SETTINGS",
    "CellDensity",
    "get_representation",
    "check_enough_cells",
    "BASES",
    "fit_base",
    "fit_density",
    "get_density",
    "score_cells",
    "sample_cells",
    "map_to_reference",
    "load_pbmc",
    "split_cells",
]

#: The largest representation (number of columns) a CNF is fitted to. The exact trace costs one
#: vector-Jacobian product per dimension, so a CNF on thousands of genes is out of reach; reduce
#: the data first (``sc.pp.pca``) and fit a few to a few tens of components.
MAX_DIM: int = 64

#: The fewest *training* cells per dimension :func:`fit_density` accepts. Ten cells per
#: dimension is a floor, not a recommendation: a flexible density wants many more.
MIN_CELLS_PER_DIM: int = 10

#: Solver settings for reported log-likelihoods: the exact trace at a tight tolerance (training
#: may use Hutchinson's estimator and a loose tolerance; a reported number should not).
EVAL_SETTINGS: dict[str, Any] = dict(trace="exact", rtol=1e-5, atol=1e-5)

_FORMAT = "cnf_lib.singlecell.CellDensity"
_VERSION = 1

# --------------------------------------------------------------------------------------------
# Reading a representation
# --------------------------------------------------------------------------------------------


def _check_adata(adata: Any, name: str = "adata") -> AnnData:
    if not isinstance(adata, AnnData):
        raise ValueError(f"{name} must be an AnnData object; got {type(adata).__name__}")
    return adata


def _first_bad_cell(values: np.ndarray, obs_names: Sequence[str]) -> str:
    row = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
    return f"first: cell {obs_names[row]!r}, row {row}"


def _looks_like_counts(x: np.ndarray | sparse.spmatrix) -> bool:
    """Whether every stored value is a non-negative integer (raw UMI counts)."""
    values = x.data if sparse.issparse(x) else np.asarray(x)
    values = values.ravel()
    if values.size == 0:
        return False
    if values.dtype.kind in "iub":
        return bool(values.min() >= 0)
    if values.dtype.kind != "f":
        return False
    sample = values[:: max(1, values.size // 100_000)]  # a strided sample keeps this cheap
    finite = sample[np.isfinite(sample)]
    return bool(finite.size and (finite >= 0).all() and (finite == np.round(finite)).all()
                and finite.max() > 1)


def get_representation(
    adata: AnnData,
    use_rep: str = "X_pca",
    n_comps: int | None = None,
    *,
    max_dim: int = MAX_DIM,
) -> np.ndarray:
    r"""Reads and checks the representation of the cells that a density is fitted to.

    Arguments:
        adata: The cells, an :class:`~anndata.AnnData` with :math:`n` cells.
        use_rep: ``"X"`` for ``adata.X`` (dense or sparse; every variable is used), or a key of
            ``adata.obsm`` (``"X_pca"``, ``"X_scVI"``, ...). As in scanpy.
        n_comps: For an ``obsm`` representation, use its first ``n_comps`` columns (for
            ``"X_pca"``, the leading principal components); :py:`None` uses them all. Not
            allowed with ``use_rep="X"`` (subset the genes instead).
        max_dim: The largest number of columns accepted (:data:`MAX_DIM`).

    Returns:
        The representation, float64, shape :math:`(n, D)`, a copy (never a view into
        ``adata``).

    Raises:
        ValueError: If ``adata`` is not an AnnData; ``use_rep`` is not in ``adata.obsm`` (the
            message lists the keys that exist); ``n_comps`` is not a positive integer or is
            larger than the representation; ``.X`` is missing, holds raw counts, or has more
            than ``max_dim`` variables; the representation is not numeric, has more than
            ``max_dim`` columns, or holds NaN or infinite values (the message names the first
            bad cell).
    """
    adata = _check_adata(adata)
    if not isinstance(use_rep, str):
        raise ValueError(f"use_rep must be a string ('X' or a key of adata.obsm); got {use_rep!r}")
    if n_comps is not None and (isinstance(n_comps, bool)
                                or not isinstance(n_comps, (int, np.integer)) or n_comps < 1):
        raise ValueError(f"n_comps must be a positive integer or None; got {n_comps!r}")

    if use_rep == "X":
        where = "adata.X"
        if n_comps is not None:
            raise ValueError(
                "n_comps selects the leading columns of an obsm representation (such as principal "
                "components) and has no meaning for use_rep='X'; subset the genes instead "
                "(adata[:, genes]) or use use_rep='X_pca'"
            )
        x = adata.X
        if x is None:
            raise ValueError("adata.X is None: there is no expression matrix; pass use_rep= an "
                             f"obsm key instead (adata.obsm has: {_list_keys(adata.obsm)})")
        if x.ndim != 2:
            raise ValueError(f"adata.X must be 2-D (cells x genes); got shape {x.shape}")
        if x.shape[1] > max_dim:
            raise ValueError(
                f"adata.X has {x.shape[1]} variables (genes); a CNF density needs a "
                f"low-dimensional representation (at most max_dim={max_dim} columns). Reduce the "
                "data first, e.g. sc.pp.pca(adata), then use use_rep='X_pca' with n_comps=5 to 30"
            )
        if _looks_like_counts(x):
            raise ValueError(
                "adata.X looks like raw counts (non-negative integers): counts are discrete and "
                "have no density. Normalize and log-transform them (sc.pp.normalize_total, "
                "sc.pp.log1p), reduce them (sc.pp.pca), and use use_rep='X_pca'"
            )
        values = x.toarray() if sparse.issparse(x) else x
    else:
        where = f"adata.obsm[{use_rep!r}]"
        if use_rep not in adata.obsm:
            hint = " Run sc.pp.pca(adata) to compute it." if use_rep == "X_pca" else ""
            raise ValueError(
                f"adata.obsm has no key {use_rep!r}; the keys that exist are: "
                f"{_list_keys(adata.obsm)} (or use_rep='X' for adata.X).{hint}"
            )
        values = adata.obsm[use_rep]
        if isinstance(values, pd.DataFrame):
            values = values.to_numpy()
        elif sparse.issparse(values):
            values = values.toarray()
        if np.ndim(values) != 2:
            raise ValueError(
                f"{where} must be 2-D (cells x components); got shape {np.shape(values)}"
            )
        if n_comps is not None:
            if n_comps > values.shape[1]:
                raise ValueError(f"{where} has {values.shape[1]} columns; n_comps={n_comps} asks "
                                 "for more than there are")
            values = values[:, :n_comps]
        if values.shape[1] > max_dim:
            raise ValueError(
                f"{where} has {values.shape[1]} columns, more than max_dim={max_dim}: pass n_comps "
                "to keep the leading ones (a few to a few tens)"
            )

    values = np.asarray(values)
    if values.dtype.kind not in "iuf":
        raise ValueError(f"{where} must be numeric; got dtype {values.dtype}")
    values = np.array(values, dtype=np.float64)  # a copy
    if values.shape[0] == 0 or values.shape[1] == 0:
        raise ValueError(f"{where} is empty: shape {values.shape}")
    if not np.isfinite(values).all():
        n_nan = int(np.isnan(values).any(axis=1).sum())
        n_inf = int(np.isinf(values).any(axis=1).sum())
        raise ValueError(
            f"{where} has non-finite values: {n_nan} cell(s) with NaN and {n_inf} with inf, out "
            f"of {values.shape[0]} ({_first_bad_cell(values, adata.obs_names)}). Remove or fix "
            "those cells (e.g. adata = adata[np.isfinite(rep).all(1)].copy())"
        )
    return values


def _list_keys(mapping: Any) -> str:
    keys = list(mapping.keys())
    return ", ".join(repr(k) for k in keys) if keys else "(none)"


def check_enough_cells(n_cells: int, dim: int, what: str = "training cells") -> None:
    r"""Raises a :class:`ValueError` unless there are :data:`MIN_CELLS_PER_DIM` cells per dimension.

    Arguments:
        n_cells: The number of cells.
        dim: The dimension :math:`D` of the representation.
        what: How the cells are called in the message.
    """
    need = MIN_CELLS_PER_DIM * dim
    if n_cells < need:
        raise ValueError(
            f"only {n_cells} {what} for a {dim}-dimensional representation: a density needs many "
            f"more cells than dimensions (at least {MIN_CELLS_PER_DIM} per dimension, {need} "
            "here). "
            "Use fewer components (n_comps) or more cells"
        )


# --------------------------------------------------------------------------------------------
# The fitted density
# --------------------------------------------------------------------------------------------


def _from_h5(v: Any) -> Any:
    """NumPy scalars read back from .h5ad as Python scalars."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, Mapping):
        return {k: _from_h5(x) for k, x in v.items()}
    return v


@dataclass
class CellDensity:
    r"""A CNF density of cells in a representation, with the standardization kept beside it.

    :math:`\log p(x) = \log p_{\text{CNF}}\big((x - m)/s\big) - \sum_d \log s_d` for a cell
    :math:`x` of the representation ``use_rep`` (its first ``n_comps`` columns).

    Attributes:
        model: The CNF, fitted to standardized coordinates.
        standardizer: The standardization :math:`(m, s)` of the training cells.
        use_rep: The representation (``"X"`` or an ``obsm`` key).
        n_comps: The number of leading columns used (:py:`None`: all; always :py:`None` for
            ``"X"``).
        var_names: For ``use_rep="X"``, the variable names (to label sampled cells).
        history: The training history (see :func:`fit_density`).
        best_iteration: The iteration whose parameters were kept.
        train_config: The :class:`~cnf_lib.train.TrainConfig` fields and fit options, as plain
            values.
    """

    model: CNF
    standardizer: Standardizer
    use_rep: str = "X_pca"
    n_comps: int | None = None
    var_names: list[str] | None = None
    history: dict[str, list[float]] = field(default_factory=dict)
    best_iteration: int | None = None
    train_config: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        """The dimension :math:`D` of the representation."""
        return self.model.dim

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def representation(self, adata: AnnData) -> np.ndarray:
        """This density's representation of ``adata``, shape (n, D) (:func:`get_representation`)."""
        x = get_representation(adata, self.use_rep, self.n_comps, max_dim=max(MAX_DIM, self.dim))
        if x.shape[1] != self.dim:
            raise ValueError(
                f"the density was fitted to {self.dim} columns of {self.use_rep!r}; this AnnData "
                f"gives {x.shape[1]}"
            )
        genes = self.var_names
        if self.use_rep == "X" and genes is not None and list(adata.var_names) != genes:
            raise ValueError("adata.var_names differ from the variables the density was fitted to")
        return x

    @torch.no_grad()
    def log_prob(self, x: Any, *, batch_size: int = 2048, generator: torch.Generator | None = None,
                 **overrides: Any) -> torch.Tensor:
        r"""The log-density of cells in the units of the representation.

        Arguments:
            x: Cells in the representation, shape :math:`(n, D)` (array or tensor).
            batch_size: Cells per solve (bounds the memory).
            generator: For a Hutchinson probe, if ``overrides`` ask for one.
            **overrides: Solver settings for this call; the defaults are :data:`EVAL_SETTINGS`
                (exact trace, tolerance :math:`10^{-5}`).

        Returns:
            :math:`\log p(x)`, float64, shape :math:`(n,)`, on the CPU.
        """
        settings = {**EVAL_SETTINGS, **overrides}
        if not isinstance(x, torch.Tensor):
            x = np.asarray(x, dtype=np.float64)
        z = self.standardizer.transform(torch.as_tensor(x, dtype=torch.float64))
        self.model.eval()
        dtype = next(self.model.parameters()).dtype
        out = []
        for start in range(0, len(z), batch_size):
            chunk = z[start:start + batch_size].to(dtype=dtype, device=self._device())
            out.append(self.model.log_prob(chunk, generator=generator, **settings).double().cpu())
        return torch.cat(out) + self.standardizer.log_abs_det()

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None,
               **overrides: Any) -> torch.Tensor:
        r"""Draws new cells in the units of the representation.

        Arguments:
            n: The number of cells.
            generator: Seeds the prior draws (on the CPU); equal seeds give equal cells.
            **overrides: Solver settings for the decoding solve (default: tolerance
                :math:`10^{-5}`).

        Returns:
            The cells, float64, shape :math:`(n, D)`, on the CPU.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"the number of cells must be a positive integer; got {n!r}")
        settings = {"rtol": EVAL_SETTINGS["rtol"], "atol": EVAL_SETTINGS["atol"], **overrides}
        param = next(self.model.parameters())
        if self.model.base is None:
            z = randn((int(n), self.dim), generator, torch.float64, "cpu")
        else:
            z = self.model.base.sample(int(n), generator)
        self.model.eval()
        x = self.model.decode(z.to(dtype=param.dtype, device=param.device), **settings)
        return self.standardizer.inverse(x.double().cpu())

    # -- saving -----------------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> CellDensity:
        """Move the model to ``device`` (results stay on the CPU); returns self."""
        self.model.to(device)
        return self

    def eval(self) -> CellDensity:
        """Put the model in evaluation mode; returns self."""
        self.model.eval()
        return self

    def save_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(config, tensors)`` for :func:`cnf_lib.saving.save_model`: the :meth:`to_uns` content
        with the CNF's parameters and the standardization as tensors."""
        uns = self.to_uns()
        config = {k: v for k, v in uns.items() if k not in ("state_dict", "standardizer", "history")}
        config["params"] = dict(config["params"], hidden=[int(h) for h in config["params"]["hidden"]])
        config["history"] = {k: [float(x) for x in v] for k, v in uns["history"].items()}
        if "var_names" in config:
            config["var_names"] = [str(v) for v in config["var_names"]]
        tensors = {f"model.{k}": v.detach().cpu() for k, v in self.model.state_dict().items()}
        tensors.update({f"standardizer.{k}": v for k, v in self.standardizer.state_dict().items()})
        return config, tensors

    @classmethod
    def from_saved(cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> CellDensity:
        """Rebuild a density from :meth:`save_state`'s ``(config, tensors)``."""
        uns = dict(config)
        uns["state_dict"] = {k[len("model."):]: v.numpy() for k, v in tensors.items() if k.startswith("model.")}
        uns["standardizer"] = {k[len("standardizer."):]: v.numpy() for k, v in tensors.items()
                               if k.startswith("standardizer.")}
        return cls.from_uns(uns)

    # -- storage in adata.uns ---------------------------------------------------------------------
    def to_uns(self) -> dict[str, Any]:
        """The density as plain values and NumPy arrays (what :func:`fit_density` stores).

        It can be written with ``adata.write_h5ad`` and rebuilt with :meth:`from_uns`.
        """
        cfg = self.model.config()
        params: dict[str, Any] = {
            "use_rep": self.use_rep,
            "dim": self.dim,
            "hidden": np.asarray(cfg["hidden"], dtype=np.int64),
            "activation": cfg["activation"],
            "t1": cfg["t1"],
            "solver": plain_config(cfg["settings"]),
            "train": plain_config(dict(self.train_config)),
        }
        if "base" in cfg:
            params["base"] = {"kind": str(cfg["base"]["kind"]),
                              "components": int(cfg["base"]["components"])}
        if self.n_comps is not None:
            params["n_comps"] = int(self.n_comps)
        out: dict[str, Any] = {
            "format": _FORMAT,
            "version": _VERSION,
            "params": params,
            "standardizer": {k: v.numpy() for k, v in self.standardizer.state_dict().items()},
            "state_dict": {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()},
            "history": {k: np.asarray(v, dtype=np.float64) for k, v in self.history.items()},
        }
        if self.best_iteration is not None:
            out["best_iteration"] = int(self.best_iteration)
        if self.var_names is not None:
            out["var_names"] = np.asarray(self.var_names, dtype=object)
        return out

    @classmethod
    def from_uns(cls, uns: Mapping[str, Any]) -> CellDensity:
        """Rebuilds a density stored with :meth:`to_uns` (also after a round trip through .h5ad)."""
        if not isinstance(uns, Mapping) or uns.get("format") != _FORMAT:
            raise ValueError(
                "not a cnf_lib cell density (its 'format' entry is missing or different)"
            )
        if int(uns.get("version", -1)) != _VERSION:
            raise ValueError(f"cell density format version {uns.get('version')} is not supported "
                             f"(this cnf_lib reads version {_VERSION})")
        p = _from_h5(dict(uns["params"]))
        base = None
        if "base" in p:  # a Gaussian-mixture base; its values are in the state dict
            base = GaussianMixtureBase.placeholder(int(p["base"]["components"]), int(p["dim"]))
        model = CNF(int(p["dim"]), hidden=tuple(int(h) for h in np.asarray(p["hidden"])),
                    activation=p["activation"], t1=float(p["t1"]), base=base, **p["solver"])
        state = {k: torch.as_tensor(np.asarray(v)) for k, v in uns["state_dict"].items()}
        model.load_state_dict(state)
        std = Standardizer.from_state_dict(
            {k: torch.as_tensor(np.asarray(v)) for k, v in uns["standardizer"].items()}
        )
        var_names = uns.get("var_names")
        return cls(
            model=model,
            standardizer=std,
            use_rep=str(p["use_rep"]),
            n_comps=int(p["n_comps"]) if "n_comps" in p else None,
            var_names=None if var_names is None else [str(v) for v in var_names],
            history={k: np.asarray(v).tolist() for k, v in uns.get("history", {}).items()},
            best_iteration=int(uns["best_iteration"]) if "best_iteration" in uns else None,
            train_config=dict(p.get("train", {})),
        )

    def __repr__(self) -> str:
        rep = self.use_rep if self.n_comps is None else f"{self.use_rep}[:, :{self.n_comps}]"
        return f"CellDensity(rep={rep!r}, dim={self.dim}, best_iteration={self.best_iteration})"


# --------------------------------------------------------------------------------------------
# Fit, score, sample
# --------------------------------------------------------------------------------------------

#: The densities at t = 0 :func:`fit_density` offers: ``"normal"`` N(0, I) (the classic CNF),
#: ``"gaussian"`` one full-covariance Gaussian and ``"mixture"`` a full-covariance Gaussian
#: mixture, both fitted to the training cells, the mixture's number of components chosen by the
#: validation cells' NLL (:func:`fit_base`).
BASES: tuple[str, ...] = ("normal", "gaussian", "mixture")


def fit_base(z: np.ndarray, base: str = "mixture", max_components: int = 64, seed: int = 0,
             z_val: np.ndarray | None = None) -> GaussianMixtureBase | None:
    r"""Fits the density at t = 0 of a CNF to (standardized) training points.

    Arguments:
        z: The training points, shape :math:`(n, D)`.
        base: ``"normal"`` (returns :py:`None`: the CNF keeps N(0, I)), ``"gaussian"`` (one
            full-covariance Gaussian) or ``"mixture"``: full-covariance Gaussian mixtures
            (scikit-learn's EM) of 1, 2, 4, 8, ... components, at most ``max_components`` and at
            most :math:`n / (10 D)`; the one with the lowest NLL on ``z_val`` is kept (the
            doubling stops at the first mixture that is worse than the best so far), or, without
            ``z_val``, the one with the lowest BIC.
        max_components: The largest number of components tried.
        seed: Seeds the EM's initialization.
        z_val: Validation points, shape :math:`(m, D)`, that choose the number of components.

    Returns:
        A :class:`~cnf_lib.cnf.GaussianMixtureBase`, or :py:`None` for ``"normal"``.
    """
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}; got {base!r}")
    if base == "normal":
        return None
    from sklearn.mixture import GaussianMixture  # only this function needs scikit-learn

    n, dim = z.shape
    top = 1 if base == "gaussian" else max(1, min(int(max_components), n // (MIN_CELLS_PER_DIM * dim)))
    best, best_score, k = None, np.inf, 1
    while k <= top:
        gmm = GaussianMixture(k, covariance_type="full", random_state=seed).fit(z)
        score = -gmm.score(z_val) if z_val is not None else gmm.bic(z)
        if score >= best_score and z_val is not None:
            break
        if score < best_score:
            best, best_score = gmm, score
        k *= 2
    return GaussianMixtureBase(torch.as_tensor(best.weights_), torch.as_tensor(best.means_),
                               torch.as_tensor(best.covariances_))


def _zero_last_layer(field: torch.nn.Module) -> None:
    """Sets the output layer of a :class:`~cnf_lib.fields.ConcatSquashMLP` to zero: f = 0, so the
    flow is the identity and the CNF's density is its base until training moves it."""
    last = field.layers[-1]
    with torch.no_grad():
        for p in (last.linear.weight, last.linear.bias, last.shift.weight):
            p.zero_()


def fit_density(
    adata: AnnData,
    use_rep: str = "X_pca",
    n_comps: int | None = 5,
    *,
    key_added: str = "cnf",
    validation_fraction: float = 0.2,
    patience: int | None = 4,
    base: str = "mixture",
    max_components: int = 64,
    hidden: Sequence[int] = (64, 64),
    activation: str = "tanh",
    solver: Mapping[str, Any] | None = None,
    iterations: int = 400,
    batch_size: int = 512,
    lr: float = 1e-2,
    lr_final: float = 1e-3,
    kinetic: float = 0.0,
    eval_every: int = 25,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    copy: bool = False,
    **train_kwargs: Any,
) -> AnnData | None:
    r"""Fits a CNF density to a representation of the cells: by default, a CNF on a
    Gaussian-mixture base.

    The cells are split at random (seeded) into training cells, which fit the model, and
    validation cells, whose NLL is evaluated every ``eval_every`` iterations with the exact
    trace: the parameters of the best validation NLL are kept, and training stops after
    ``patience`` evaluations without improvement (a warning says so when the best one is the
    last: the model may be undertrained). The standardization is fitted on the training cells.

    **The base.** With ``base="mixture"`` (the default) the density at t = 0 is a
    full-covariance Gaussian mixture fitted by EM to the training cells, with 1, 2, 4, ...
    components, the number chosen by the validation cells' NLL (:func:`fit_base`), and the
    field starts at zero, so the flow starts as the identity and the model as the mixture;
    that mixture is the first candidate of the keep-best rule, and the CNF's training can only
    replace it by something better on the validation cells. On 20,000 cells of a known density
    in 10 to 30 dimensions, most of the gain over a BIC-chosen mixture came from this choice of
    the base, and the flow added little (benchmarks/bench_cells.py; the Performance appendix).
    ``base="normal"`` is the classic CNF from N(0, I) (chapter 6 uses it).

    Arguments:
        adata: The cells.
        use_rep: The representation: an ``obsm`` key or ``"X"`` (see
            :func:`get_representation`).
        n_comps: The leading columns of an ``obsm`` representation to use (:py:`None`: all).
            Ignored for ``use_rep="X"``, which uses every variable (as scanpy ignores ``n_pcs``
            there).
        key_added: Where the density is stored: ``adata.uns[key_added]``, and the split in
            ``adata.obs[key_added + "_split"]``.
        validation_fraction: The fraction of cells held out for early stopping, in
            :math:`[0, 0.5]`; 0 trains on every cell and keeps the last iteration.
        patience: Stop after this many evaluations without a better validation NLL
            (:py:`None`: train all ``iterations``, keep the best).
        base: The density at t = 0, one of :data:`BASES`: ``"mixture"``, ``"gaussian"`` (one
            full-covariance Gaussian, fitted to the training cells) or ``"normal"`` (N(0, I)).
        max_components: The most components of a ``"mixture"`` base.
        hidden, activation: The vector field (a ConcatSquash MLP).
        solver: :class:`~cnf_lib.cnf.SolverSettings` fields for training; default
            ``dict(trace="hutchinson", rtol=1e-3, atol=1e-3)`` (validation always uses
            :data:`EVAL_SETTINGS`).
        iterations, batch_size, lr, lr_final, kinetic, eval_every, seed: Training settings, as in
            :class:`~cnf_lib.train.TrainConfig` (the seed also draws the split and the initial
            weights). Chosen on tuning sets (benchmarks/tune_cells.py): 20,000 cells in 30
            columns take about a minute of one CPU core; with ``batch_size`` at least the number
            of training cells every iteration sees all of them.
        device: Where the network trains (``"cuda"`` for a GPU).
        progress: Show the trainer's progress bar (one bar for the whole fit, with the last
            validation NLL, on the standardized coordinates: the history's values minus the
            standardization's log-Jacobian; the base is fitted before the bar starts).
        copy: Work on a copy of ``adata`` and return it.
        **train_kwargs: Other :class:`~cnf_lib.train.TrainConfig` fields (``frobenius``,
            ``grad_clip``: no clipping unless given). Training solves use ``solver`` (not the
            trainer's default fixed grid, which was measured on 2-D toys only).

    Returns:
        :py:`None`, or the modified copy if ``copy=True``. ``adata.uns[key_added]`` holds the
        density (:meth:`CellDensity.to_uns`; :func:`get_density` rebuilds it), including the
        history: per iteration ``iteration``, ``loss`` (the training objective on standardized
        coordinates), ``nll`` (training batch NLL), ``nfe_forward``, ``time``, ``lr``; per
        evaluation ``eval_iteration``, ``validation_nll``, ``eval_nfe``. NLLs are in nats per
        cell in the units of the representation.

    Raises:
        ValueError: For a bad representation (see :func:`get_representation`), too few cells
            (:func:`check_enough_cells`), or bad settings.
        cnf_lib.train.TrainingError: If training diverges.
    """
    adata = _check_adata(adata)
    if not 0.0 <= validation_fraction <= 0.5:
        raise ValueError(f"validation_fraction must be in [0, 0.5]; got {validation_fraction}")
    if patience is not None and (int(patience) != patience or patience < 1):
        raise ValueError(f"patience must be a positive integer or None; got {patience!r}")
    if int(eval_every) != eval_every or eval_every < 1:
        raise ValueError(f"eval_every must be a positive integer; got {eval_every!r}")
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES} (the density at t = 0); got {base!r}")
    if isinstance(max_components, bool) or not isinstance(max_components, (int, np.integer)) \
            or max_components < 1:
        raise ValueError(f"max_components must be a positive integer; got {max_components!r}")
    for name in ("eval_settings", "test_data", "checkpoint_path", "keep_best"):
        if name in train_kwargs:
            raise ValueError(f"{name} cannot be set through fit_density")
    if copy:
        adata = adata.copy()

    if use_rep == "X":
        n_comps = None
    x = get_representation(adata, use_rep, n_comps)
    n, dim = x.shape
    n_val = int(round(validation_fraction * n))
    if validation_fraction > 0 and n_val < 2:
        raise ValueError(f"validation_fraction={validation_fraction} of {n} cells leaves fewer "
                         "than 2 "
                         "validation cells; use more cells or validation_fraction=0")
    check_enough_cells(n - n_val, dim)

    perm = np.random.default_rng(seed).permutation(n)
    is_val = np.zeros(n, dtype=bool)
    is_val[perm[:n_val]] = True
    standardizer = Standardizer.fit(x[~is_val])
    z_train = standardizer.transform(torch.as_tensor(x[~is_val])).float().to(device)
    z_val = standardizer.transform(torch.as_tensor(x[is_val])).float().to(device) if n_val else None
    log_jac = standardizer.log_abs_det()

    settings = dict(trace="hutchinson", rtol=1e-3, atol=1e-3)
    settings.update(solver or {})
    base_density = fit_base(z_train.cpu().double().numpy(), base, max_components, seed,
                            None if z_val is None else z_val.cpu().double().numpy())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CNF(dim, hidden=tuple(hidden), activation=activation, base=base_density,
                    **settings).to(device)
    if base_density is not None:  # the flow starts as the identity: the model starts as the base
        _zero_last_layer(model.field)
    # the model's own solver (`solver`) and no clipping, unless train_kwargs say otherwise
    train_kwargs = {"train_settings": {}, "grad_clip": None, **train_kwargs}
    config = TrainConfig(iterations=iterations, batch_size=batch_size, lr=lr, lr_final=lr_final,
                         kinetic=kinetic, eval_every=eval_every, eval_settings=dict(EVAL_SETTINGS), seed=seed,
                         keep_best=z_val is not None, patience=patience if z_val is not None else None,
                         **train_kwargs)
    trainer = Trainer(model, z_train, z_val, config, progress=progress)
    if base_density is not None and z_val is not None:
        # the base alone is the first candidate: keep-best can only improve on it
        trainer.track_best(trainer.evaluate())
    trainer.fit()
    best_it = trainer.iteration
    if trainer.best is not None:  # the parameters of the best validation NLL
        model.load_state_dict(trainer.best["state"])
        best_it = trainer.best["iteration"]
        if best_it == trainer.iteration and len(trainer.history["test_nll"]) > 1:
            warnings.warn(
                f"fit_density: the best validation NLL was at the last iteration ({best_it}): the model may be "
                f"undertrained. Try more iterations (iterations={2 * iterations}) and patience to stop early.",
                UserWarning, stacklevel=2,
            )

    h = trainer.history
    kept = ("iteration", "loss", "nfe_forward", "time", "lr", "eval_iteration", "eval_nfe")
    history = {k: list(h[k]) for k in kept}
    history["nll"] = [v - log_jac for v in h["nll"]]
    history["validation_nll"] = [v - log_jac for v in h["test_nll"]]
    density = CellDensity(
        model=model.cpu(),
        standardizer=standardizer,
        use_rep=use_rep,
        n_comps=n_comps,
        var_names=[str(v) for v in adata.var_names] if use_rep == "X" else None,
        history=history,
        best_iteration=best_it,
        train_config={**asdict(config), "validation_fraction": float(validation_fraction),
                      "patience": patience, "base": base, "max_components": int(max_components),
                      "base_components": 0 if base_density is None else base_density.components,
                      "n_train": int(n - n_val), "n_validation": int(n_val)},
    )
    adata.uns[key_added] = density.to_uns()
    adata.obs[f"{key_added}_split"] = pd.Categorical(np.where(is_val, "validation", "train"),
                                                     categories=["train", "validation"])
    return adata if copy else None


def get_density(adata: AnnData, key: str = "cnf") -> CellDensity:
    """Rebuilds the :class:`CellDensity` that :func:`fit_density` stored in ``adata.uns[key]``.

    Raises:
        ValueError: If there is none (the message lists the ``uns`` keys that exist).
    """
    adata = _check_adata(adata)
    if key not in adata.uns:
        raise ValueError(f"adata.uns has no {key!r}: fit a density first (fit_density(adata, "
                         f"key_added={key!r})); adata.uns has: {_list_keys(adata.uns)}")
    return CellDensity.from_uns(adata.uns[key])


def score_cells(
    adata: AnnData,
    key: str = "cnf",
    *,
    density: CellDensity | None = None,
    key_added: str | None = None,
    copy: bool = False,
    **overrides: Any,
) -> AnnData | None:
    r"""Writes each cell's log-likelihood under a fitted density into ``adata.obs``.

    The value is :math:`\log p(x)` in nats, in the units of the representation the density was
    fitted to (the standardization's log-Jacobian included), evaluated with
    :data:`EVAL_SETTINGS` (exact trace, tolerance :math:`10^{-5}`). Low values mark cells in
    sparsely populated states: rare types, transitional or unusual cells, doublets, debris.

    Arguments:
        adata: The cells to score (they must have the density's representation).
        key: The ``adata.uns`` key of a density fitted on ``adata`` (ignored if ``density`` is
            given).
        density: A density fitted elsewhere, e.g. on other cells (:func:`get_density`).
        key_added: The ``obs`` column written; default ``f"{key}_log_likelihood"``, i.e.
            ``"cnf_log_likelihood"``.
        copy: Work on a copy and return it.
        **overrides: Solver settings for this call.

    Returns:
        :py:`None`, or the modified copy if ``copy=True``.
    """
    adata = _check_adata(adata)
    if density is None:
        density = get_density(adata, key)
    if copy:
        adata = adata.copy()
    x = density.representation(adata)
    logp = density.log_prob(x, **overrides).numpy()
    adata.obs[key_added or f"{key}_log_likelihood"] = logp
    return adata if copy else None


def sample_cells(
    adata: AnnData | CellDensity,
    n_cells: int,
    key: str = "cnf",
    *,
    seed: int = 0,
    **overrides: Any,
) -> AnnData:
    r"""Draws new cells from a fitted density, in the representation it was fitted to.

    Arguments:
        adata: An AnnData holding the density in ``adata.uns[key]``, or a :class:`CellDensity`.
        n_cells: The number of cells.
        key: The ``adata.uns`` key of the density.
        seed: Seeds the draw (equal seeds give equal cells).
        **overrides: Solver settings for the decoding solve.

    Returns:
        A new AnnData with ``n_cells`` cells named ``"sample-0"``, ... : the cells in
        ``.obsm[use_rep]`` (shape ``(n_cells, D)``), or in ``.X`` when the density was fitted to
        ``"X"`` (with the same ``var_names``); ``.uns[key]`` holds the density.
    """
    density = adata if isinstance(adata, CellDensity) else get_density(adata, key)
    x = density.sample(n_cells, generator=torch.Generator().manual_seed(seed), **overrides).numpy()
    obs = pd.DataFrame(index=[f"sample-{i}" for i in range(n_cells)])
    if density.use_rep == "X":
        var = pd.DataFrame(index=density.var_names) if density.var_names else None
        out = AnnData(X=x.astype(np.float32), obs=obs, var=var)
    else:
        out = AnnData(obs=obs, obsm={density.use_rep: x.astype(np.float32)})
    out.uns[key] = density.to_uns()
    return out


def map_to_reference(
    query: AnnData,
    reference: AnnData,
    use_rep: str = "X_pca",
    n_comps: int | None = None,
    *,
    obs: Sequence[str] = (),
    obsm: Sequence[str] = (),
    n_neighbors: int = 15,
    copy: bool = False,
) -> AnnData | None:
    r"""Places query cells (e.g. sampled ones) in a reference's embeddings, by nearest neighbours.

    Each query cell gets, for each ``obsm`` key (``"X_umap"``, ...), the mean embedding of its
    ``n_neighbors`` nearest reference cells, and for each ``obs`` column the most common label
    among them (with the share of neighbours that carry it in ``obs[col + "_agreement"]``).
    Distances are Euclidean in the representation ``use_rep`` (first ``n_comps`` columns) of
    both objects. Like ``sc.tl.ingest`` for cells that have no genes, only a representation;
    a UMAP has no inverse, so this is where a sampled cell *would* sit.

    Arguments:
        query: The cells to place.
        reference: The cells with the embeddings and labels.
        use_rep, n_comps: The shared representation (see :func:`get_representation`).
        obs: ``reference.obs`` columns to transfer.
        obsm: ``reference.obsm`` keys to transfer.
        n_neighbors: The number of neighbours :math:`k`.
        copy: Work on a copy of ``query`` and return it.

    Returns:
        :py:`None`, or the modified copy if ``copy=True``.
    """
    query, reference = _check_adata(query, "query"), _check_adata(reference, "reference")
    for col in obs:
        if col not in reference.obs:
            raise ValueError(
                f"reference.obs has no column {col!r}; it has: {_list_keys(reference.obs)}"
            )
    for key in obsm:
        if key not in reference.obsm:
            raise ValueError(
                f"reference.obsm has no key {key!r}; it has: {_list_keys(reference.obsm)}"
            )
    ref = get_representation(reference, use_rep, n_comps)
    qry = get_representation(query, use_rep, n_comps)
    if qry.shape[1] != ref.shape[1]:
        raise ValueError(f"query and reference representations differ: {qry.shape[1]} vs "
                         f"{ref.shape[1]} columns")
    if not 1 <= n_neighbors <= len(ref):
        raise ValueError(f"n_neighbors must be in [1, {len(ref)}] (the reference's cells); "
                         f"got {n_neighbors}")
    if copy:
        query = query.copy()
    _, idx = cKDTree(ref).query(qry, k=n_neighbors)
    idx = idx.reshape(len(qry), n_neighbors)
    for key in obsm:
        emb = np.asarray(reference.obsm[key], dtype=np.float64)
        query.obsm[key] = emb[idx].mean(axis=1)
    for col in obs:
        labels = reference.obs[col].to_numpy()[idx]  # (m, k)
        winners, shares = [], []
        for row in labels:
            values, counts = np.unique(row.astype(str), return_counts=True)
            best = int(np.argmax(counts))
            winners.append(values[best])
            shares.append(counts[best] / n_neighbors)
        categories = reference.obs[col].cat.categories.astype(str) if isinstance(
            reference.obs[col].dtype, pd.CategoricalDtype) else None
        query.obs[col] = pd.Categorical(winners, categories=categories)
        query.obs[f"{col}_agreement"] = np.asarray(shares)
    return query if copy else None


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_pbmc() -> AnnData:
    r"""The 700 peripheral blood mononuclear cells (PBMCs) that ship inside scanpy.

    ``scanpy.datasets.pbmc68k_reduced()``: a subsample of 10x Genomics' 68k PBMCs
    (Zheng et al., 2017), 765 highly variable genes, log-normalized and scaled in ``.X`` (the
    log-normalized values in ``.raw``), with 50 principal components in ``.obsm["X_pca"]``, a
    UMAP in ``.obsm["X_umap"]``, and cell-type labels in ``.obs["bulk_labels"]``. Nothing is
    downloaded.

    Returns:
        A fresh AnnData (700 cells x 765 genes).
    """
    import scanpy as sc  # imported here: scanpy is slow to import and only this function needs it

    return sc.datasets.pbmc68k_reduced()


def split_cells(
    adata: AnnData, test_fraction: float = 0.2, seed: int = 0
) -> tuple[AnnData, AnnData]:
    r"""Splits the cells at random into two AnnData objects (train, test), each a copy.

    Arguments:
        adata: The cells.
        test_fraction: The fraction of cells in the second object, in :math:`(0, 1)`.
        seed: Seeds the split.

    Returns:
        ``(train, test)``, with :math:`n - m` and :math:`m = \mathrm{round}(f n)` cells, in the
        original order within each.
    """
    adata = _check_adata(adata)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    n = adata.n_obs
    m = int(round(test_fraction * n))
    if m < 1 or m > n - 1:
        raise ValueError(f"test_fraction={test_fraction} of {n} cells leaves an empty side")
    is_test = np.zeros(n, dtype=bool)
    is_test[np.random.default_rng(seed).permutation(n)[:m]] = True
    return adata[~is_test].copy(), adata[is_test].copy()
