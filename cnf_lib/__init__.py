"""cnf_lib: continuous normalizing flows for the ScNormFlows book.

Modules (one idea each):

* :mod:`cnf_lib.trace` — exact divergence and Hutchinson's estimator;
* :mod:`cnf_lib.fields` — time-conditioned vector fields (ConcatSquash MLP);
* :mod:`cnf_lib.cnf` — the :class:`CNF` (log-density, sampling, encode/decode, trajectories);
* :mod:`cnf_lib.train` — the seeded, resumable :class:`Trainer`;
* :mod:`cnf_lib.datasets` — 2-D toys with their true densities, standardization, input checks;
* :mod:`cnf_lib.metrics` — NLL, Wasserstein distances, MMD, OT interpolation;
* :mod:`cnf_lib.plot` — densities, samples, trajectories, vector fields, animations;
* :mod:`cnf_lib.discrete` — invertible maps with log-determinants (chapter 1);
* :mod:`cnf_lib.odes` — NFE counting, ODE test problems with closed forms, activation memory (chapter 2);
* :mod:`cnf_lib.singlecell` — AnnData entry points: fit a CNF density to cells, score them, sample (chapter 6);
* :mod:`cnf_lib.timecourse` — a CNF through all snapshots of a time course of cells (chapter 7);
* :mod:`cnf_lib.simulation` — a simulated time course with true cell paths (chapter 7);
* :mod:`cnf_lib.baselines` — OT interpolation and other baselines, path errors (chapter 7);
* :mod:`cnf_lib.checks` — input checks and the rule for randomness and devices;
* :mod:`cnf_lib.objectives` — what the trainer minimizes (maximum likelihood by default);
* :mod:`cnf_lib.jobs` — independent trainings in worker processes (chapter 5);
* :mod:`cnf_lib.saving` — one way to save and load a trained model;
* :mod:`cnf_lib.glue` — numbers in the book's prose, recorded for the determinism check.
"""

from .cnf import CNF, FlowResult, SolverError, SolverSettings, standard_normal_log_prob
from .fields import ConcatSquashMLP, LinearField
from .train import TrainConfig, Trainer, TrainingError

__all__ = [
    "CNF",
    "ConcatSquashMLP",
    "FlowResult",
    "LinearField",
    "SolverError",
    "SolverSettings",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "standard_normal_log_prob",
]
__version__ = "0.1.0"
