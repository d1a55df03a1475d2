"""``fit_density`` at 20,000 cells in 10 and 30 columns, against the truth and a BIC-chosen mixture.

A "PCA" with a known density: ``bench_heldout.warped_mixture`` (three elongated Gaussians pushed
through y = x + 0.6 sin x coordinate-wise) in D = 10 and 30 columns, 20,000 cells to fit (of
which ``fit_density`` keeps 20% for validation) and 5,000 test cells drawn with another seed.
Methods:

* ``fit_density`` with its defaults (a scanpy user's one line, ``n_comps=D``);
* a full-covariance Gaussian mixture (scikit-learn) with its number of components chosen by BIC
  on the fitting cells among 1–8.

The table gives the test NLL (nats per cell) beside the true one, and the CPU seconds of the fit.
Nothing was tuned on these sets. One torch thread.

    .venv/bin/python benchmarks/bench_cells.py [--dims 10,30] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import anndata as ad  # noqa: E402
import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_heldout import warped_mixture  # noqa: E402
from sklearn.mixture import GaussianMixture  # noqa: E402

from cnf_lib.singlecell import fit_density, get_density  # noqa: E402


def bic_mixture(x: np.ndarray, max_k: int = 8, seed: int = 0) -> GaussianMixture:
    """The full-covariance mixture with the lowest BIC among 1..max_k components."""
    fits = [GaussianMixture(k, covariance_type="full", random_state=seed, n_init=2).fit(x) for k in range(1, max_k + 1)]
    return min(fits, key=lambda g: g.bic(x))


def fit_both(dim: int, n_cells: int, n_test: int) -> list[dict[str, Any]]:
    """``fit_density`` (defaults) and the BIC mixture on one set: two result rows."""
    x, _ = warped_mixture(n_cells, np.random.default_rng(1), dim)
    x_test, logp_test = warped_mixture(n_test, np.random.default_rng(2), dim)
    true_nll = float(-logp_test.mean())
    adata = ad.AnnData(np.zeros((n_cells, 1), dtype=np.float32))
    adata.obsm["X_pca"] = x.astype(np.float32)
    with common.Timer() as t, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_density(adata, n_comps=dim, progress=False)
    with torch.no_grad():
        cnf_nll = -get_density(adata).log_prob(x_test.astype(np.float32)).double().mean().item()
    said = "; ".join(str(w.message).removeprefix("fit_density: ").split(" (")[0].replace(" was at", " at")
                     for w in caught if str(w.message).startswith("fit_density"))
    rows = [dict(dim=dim, cells=n_cells, method="fit_density (defaults)", test_nll=cnf_nll, true_nll=true_nll,
                 cpu=t.cpu, wall=t.wall, warnings=said or "none")]
    with common.Timer() as t:
        gmm = bic_mixture(x)
    rows.append(dict(dim=dim, cells=n_cells, method=f"Gaussian mixture, BIC ({gmm.n_components} components)",
                     test_nll=float(-gmm.score(x_test)), true_nll=true_nll, cpu=t.cpu, wall=t.wall, warnings="–"))
    for r in rows[-2:]:
        print(f"  D={dim}: {r['method']}: gap {r['test_nll'] - r['true_nll']:.3f} nats, {r['cpu']:.0f} CPU s",
              flush=True)
    return rows


def run(quick: bool = False, dims: tuple[int, ...] = (10, 30), cells: int = 20_000) -> dict[str, Any]:
    n_cells, n_test = (2000, 500) if quick else (cells, 5000)
    return dict(rows=[r for dim in dims for r in fit_both(dim, n_cells, n_test)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="10,30")
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="2,000 cells: check that the script runs")
    args = parser.parse_args(argv)
    common.setup_threads(1)
    out = run(args.quick, tuple(int(d) for d in args.dims.split(",")), args.cells)
    from report import _cells

    print("\n".join(_cells(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
