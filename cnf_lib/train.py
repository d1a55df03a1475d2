"""The one training loop of ``cnf_lib``: seeded, resumable anywhere, guarded, with progress.

One :class:`Trainer` owns the model, the optimizer, a CPU random generator (mini-batches and
Hutchinson probes; see :mod:`cnf_lib.checks` for the rule on devices) and the history; an
objective (:mod:`cnf_lib.objectives`; by default maximum likelihood with RNODE regularizers)
says what one iteration minimizes. The learning rate follows a cosine from ``lr`` to
``lr_final`` over ``iterations``, computed from the iteration number; beyond ``lr_period``
iterations (600 by default) the cosine restarts from lower peaks (:meth:`TrainConfig.lr_at`), so
that a longer run is the shorter run continued, never a longer stretch at a high learning rate.

**Exact resume, wherever the interrupt lands.** A checkpoint holds everything that decides the
next iteration (parameters, Adam's moments, the generator's state, the iteration, the history).
An iteration is a transaction: if it is interrupted (``KeyboardInterrupt``) before its optimizer
step, the generator is rewound to the iteration's start, so the checkpoint written on the
interrupt is the state between two iterations; the optimizer step and the bookkeeping that
follows it run with ``SIGINT`` deferred to their end. Held-out evaluations draw from a generator
of their own, seeded by the iteration, and an evaluation cut short is redone on resume. So
``N`` iterations, an interrupt anywhere, resume, finish gives the same parameters and losses as
an uninterrupted run, on a CPU exactly.

A non-finite loss, a non-finite gradient or a solver failure (forward, or the adjoint's
backward) stops training with :class:`TrainingError`, which says what happened and what to try;
the parameters are those of the last good iteration, and the history and (with
``checkpoint_path``) a checkpoint of that state are kept.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .checks import user_stacklevel
from .cnf import SolverError
from .objectives import MaximumLikelihood, Objective

__all__ = ["TrainConfig", "Trainer", "TrainingError", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION",
           "config_differences", "FIXED_STEP_METHODS", "GRID_GAP_WARNING", "MAX_GRID_REFINEMENTS",
           "GRID_CHECK_POINTS", "HIGH_DIM_DEFAULTS"]

CHECKPOINT_FORMAT = "cnf_lib.trainer-checkpoint"
CHECKPOINT_VERSION = 2

# Fields of TrainConfig that may change between a checkpoint and its resume (they decide no number).
_BOOKKEEPING = ("checkpoint_every",)

#: torchdiffeq's fixed-step solvers: a model trained with one of them can learn its grid.
FIXED_STEP_METHODS: tuple[str, ...] = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams",
                                       "implicit_adams")

#: Nats between the held-out NLL on the training grid and the adaptive one above which the trainer
#: warns that the model has begun to fit its grid (with ``refine_grid``, halves the training step).
GRID_GAP_WARNING = 0.01

#: How many times the trainer may halve the training grid's step (4 RK4 steps become at most 32).
MAX_GRID_REFINEMENTS = 3

#: Training points on which the grid is checked when there is no ``test_data`` (maximum likelihood).
GRID_CHECK_POINTS = 256


#: What :meth:`TrainConfig.for_dim` changes from the (2-D) defaults for data of more than two
#: dimensions: Hutchinson's estimator in the training solves (one probe tangent per evaluation
#: where the exact trace needs D) and four times the points per iteration, for about the CPU time
#: of the exact trace at D = 10. Chosen on two tuning sets, an elongated Gaussian mixture in 8-D
#: and a warped mixture in 10-D (benchmarks/tune_heldout.py, seed 0): test NLL gaps 0.280 -> 0.207
#: and 0.565 -> 0.456 nats at the same CPU time; benchmarks/bench_heldout.py reports it on 6-D and
#: 12-D sets that played no part. Held-out NLLs are still computed with the exact trace. (Those gaps
#: are on a tanh field; on the SiLU field ``CNF(D)`` now builds above two dimensions,
#: :func:`cnf_lib.fields.default_activation`, the same defaults read 0.119 and 0.311.)
HIGH_DIM_DEFAULTS: dict[str, Any] = dict(
    batch_size=512, train_settings=dict(method="rk4", step_size=0.25, trace="hutchinson"))

#: Peaks of the restarted cosines beyond ``lr_period``, as fractions of ``lr`` (a tenth, then a
#: third of the previous each time; the last repeats): 3e-3, 1e-3, 3.3e-4, 1.1e-4 for the default lr.
RESTART_PEAKS = (1 / 10, 1 / 30, 1 / 90, 1 / 270)


class TrainingError(RuntimeError):
    """Training stopped: a non-finite loss or a solver failure. The message says what to try."""


@dataclass
class TrainConfig:
    """Settings of a training run.

    Attributes:
        iterations: total number of optimizer steps (the learning-rate schedule ends with them).
        batch_size: points per step (capped at the training-set size).
        lr, lr_final: learning rate at the start and at the end of the cosine decay.
        lr_period: the length of the first cosine (``None``: one cosine over all ``iterations``).
            A run of more iterations first runs that cosine, exactly as the shorter run would,
            then restarts it in periods of the same length (the last one shorter if need be),
            each from a lower peak (:data:`RESTART_PEAKS`) down to ``lr_final``. Why: one cosine
            over 3x the iterations ended 0.18 nats from the truth on a user's curved 2-D density
            (0.014 at the default budget): long stretches at a high learning rate stiffen the
            field until it fits its training grid. On banana-2d (seed 0, the tuning set of this
            switch) restarts from a constant peak of lr/10 did the same at 4x (0.23 nats; 1.98
            nats between the grid's NLL and the adaptive one); the falling peaks ended at 0.011
            (0.015 at 1x). benchmarks/bench_heldout.py measures it on three other densities.
        kinetic, frobenius: weights of the RNODE regularizers (0 turns them off).
        eval_every: held-out NLL every this many iterations (0: only at the end).
        eval_settings: solver settings for held-out evaluation (exact trace, adaptive dopri5 at a
            tight tolerance, whatever solver the model trains with: a fixed-step model can learn its grid).
        checkpoint_every: save a checkpoint every this many iterations (needs a path; 0: never).
        seed: seeds the trainer's generator (batches, probes) and, when the trainer builds
            nothing else, makes the run reproducible.
        grad_clip: clip the gradient norm to this value (``None``: no clipping).
        train_settings: solver settings for the training solves (override the model's; ``{}``:
            the model's own, e.g. its adaptive dopri5).
        keep_best: remember the parameters of the best held-out NLL (:attr:`Trainer.best`), e.g.
            to keep them at the end (early stopping without losing the schedule's end).
        patience: stop after this many evaluations without a better held-out NLL (``None``:
            never; needs ``keep_best``).
        refine_grid: when a check finds the NLL on the fixed training grid more than
            :data:`GRID_GAP_WARNING` nats from the adaptive one (the model has begun to fit its
            grid), halve the training ``step_size`` from then on, at most
            :data:`MAX_GRID_REFINEMENTS` times (``False``, the default: warn once). The check
            runs at every evaluation: on ``test_data``, or without it (maximum likelihood) on
            :data:`GRID_CHECK_POINTS` fixed training points. Off by default because, measured on
            a curved 2-D density at twice the default iterations, refining cost 7x the CPU time
            and did not bring the held-out NLL back to that of the default budget (the field
            kept stiffening: even 32 RK4 steps read 0.06 nats off the adaptive value).
    """

    # The defaults are the 2-D recipe measured in benchmarks/ (bench_recipe.py, RECIPE.md): about
    # 15-20 s of one CPU core on a 2-D toy. Training solves use RK4 on a fixed grid of 4 steps
    # (16 evaluations, no step-size control); the kinetic penalty keeps the field smooth enough
    # for that grid, and every held-out NLL is still computed adaptively (``eval_settings``).
    iterations: int = 600
    batch_size: int = 128
    lr: float = 3e-2
    lr_final: float = 1e-4
    lr_period: int | None = 600
    kinetic: float = 0.05
    frobenius: float = 0.0
    eval_every: int = 100
    eval_settings: dict[str, Any] = field(
        default_factory=lambda: dict(trace="exact", method="dopri5", rtol=1e-5, atol=1e-5)
    )
    checkpoint_every: int = 0
    seed: int = 0
    grad_clip: float | None = 1.0
    train_settings: dict[str, Any] = field(default_factory=lambda: dict(method="rk4", step_size=0.25))
    keep_best: bool = False
    patience: int | None = None
    refine_grid: bool = False

    def __post_init__(self) -> None:
        bad_patience = int(self.patience) != self.patience or self.patience < 1 if self.patience is not None else False
        if bad_patience or (self.patience is not None and not self.keep_best):
            raise ValueError(f"patience must be a positive integer with keep_best=True, got {self.patience!r}")
        if self.lr_period is not None and (isinstance(self.lr_period, bool) or int(self.lr_period) != self.lr_period
                                           or self.lr_period < 1):
            raise ValueError(f"lr_period must be a positive integer or None, got {self.lr_period!r}")
        if self.iterations < 0 or self.batch_size < 1:
            raise ValueError(f"iterations must be >= 0 and batch_size >= 1, got {self.iterations}, {self.batch_size}")
        if not (self.lr > 0 and self.lr_final > 0):
            raise ValueError(f"learning rates must be positive, got lr={self.lr}, lr_final={self.lr_final}")

    @classmethod
    def for_dim(cls, dim: int, **fields: Any) -> "TrainConfig":
        """The defaults for maximum likelihood on ``dim``-dimensional data, ``fields`` overriding them.

        ``dim`` <= 2: the class defaults (the 2-D recipe). Above: :data:`HIGH_DIM_DEFAULTS` as well
        (Hutchinson's estimator in training, 512 points per iteration). A ``train_settings`` passed
        here replaces the default one whole. :class:`Trainer` uses this when it is given fields
        rather than a ``config`` and trains by maximum likelihood.
        """
        if int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        base = copy.deepcopy(HIGH_DIM_DEFAULTS) if dim > 2 else {}  # a config never shares the constant's dicts
        return cls(**{**base, **fields})

    def lr_at(self, iteration: int) -> float:
        """The learning rate of (0-based) ``iteration``: a cosine from ``lr`` to ``lr_final`` over
        ``min(iterations, lr_period)``, then cosines from the lower peaks of :data:`RESTART_PEAKS`
        over periods of ``lr_period`` iterations (the last period ends with ``iterations``)."""
        period = self.iterations if self.lr_period is None else min(self.iterations, self.lr_period)
        if iteration < period or period >= self.iterations:
            start, length, peak = 0, period, self.lr
        else:
            k = (iteration - period) // period
            start = period * (k + 1)
            length = min(period, self.iterations - start)
            peak = max(self.lr * RESTART_PEAKS[min(k, len(RESTART_PEAKS) - 1)], self.lr_final)
        frac = min((iteration - start) / max(length, 1), 1.0)
        return self.lr_final + 0.5 * (peak - self.lr_final) * (1 + math.cos(math.pi * frac))


def config_differences(saved: Mapping[str, Any], mine: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The names (dotted for nested dictionaries) of the entries that differ between two configs,
    each with both values, e.g. ``["activation: saved 'softplus', here 'tanh'"]``."""
    out = []
    for key in sorted(set(saved) | set(mine), key=str):
        a, b = saved.get(key, "<missing>"), mine.get(key, "<missing>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif _plain(a) != _plain(b):
            out.append(f"{prefix}{key}: saved {a!r}, here {b!r}")
    return out


def _plain(v: Any) -> Any:
    """Tuples and lists compare equal; tensors and NumPy scalars compare by value."""
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Run a block with SIGINT held back: a Ctrl-C during it raises ``KeyboardInterrupt`` at its end.

    Only in the main thread and when Python's default SIGINT handler is installed (elsewhere the
    block runs as is)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class Trainer:
    """Trains a model (a :class:`~cnf_lib.cnf.CNF` by default) by minimizing an objective.

    Arguments:
        model: the model: a :class:`~cnf_lib.cnf.CNF`, or any module the objective knows (the
            time-course model of :mod:`cnf_lib.timecourse`). It must have a ``config()``.
        train_data: what the objective draws batches from; for maximum likelihood a tensor of
            training points (n, D) on any device, or a sampler ``(n, generator) -> (n, D)``
            that draws fresh points (the 2-D toys' ``sample``).
        test_data: held-out data for the NLL at intervals (points (m, D) for maximum
            likelihood), or ``None``.
        config: a :class:`TrainConfig` (or pass its fields as keyword arguments: for maximum
            likelihood on a model of more than two dimensions, the fields not passed then take
            the defaults of :meth:`TrainConfig.for_dim`, not the class's 2-D ones; for an
            objective with a ``default_config(dim, **fields)`` method, such as
            :class:`~cnf_lib.matching.FlowMatching`, that method's).
        objective: what one iteration minimizes (default :class:`~cnf_lib.objectives.MaximumLikelihood`).
            Above two dimensions :class:`~cnf_lib.matching.FlowMatching` ended closer to the truth at
            the same CPU time on every set measured (benchmarks/RECIPE.md; the Performance appendix).
        checkpoint_path: where checkpoints are written (and read by :meth:`resume`).
        progress: show a tqdm bar with the loss, the NFE and the last held-out NLL.

    Attributes:
        history: lists per iteration (``iteration``, ``loss``, ``nll``, ``nfe_forward``,
            ``nfe_backward`` (the adjoint's backward solve; 0 without the adjoint), ``time`` and
            ``cpu_time`` (cumulative wall-clock and CPU seconds of the training steps), ``lr``,
            and the objective's ``records``) and per evaluation (``eval_iteration``, ``test_nll``,
            ``eval_nfe``, and ``test_nll_grid``: the held-out NLL on the training grid, exact trace,
            NaN unless the objective solves on a fixed-step grid in training) and per grid check
            (``grid_check_iteration``, ``grid_gap``: the NLL on the training grid minus the
            adaptive one, on the test data or on training points, and ``grid_step``: the training
            step size in force up to that check; when ``|grid_gap|`` exceeds
            :data:`GRID_GAP_WARNING` nats the model has begun to fit its grid, and the trainer
            halves the step (``config.refine_grid``) or warns; a gap at the last iteration,
            with no training left, is recorded only).
        iteration: iterations done.
        generator: the CPU generator of batches and probes (seeded by ``config.seed``).
        best: with ``config.keep_best``, ``{"iteration", "nll", "state"}`` of the best held-out
            NLL so far (``state``: a copy of the model's state dict), else ``None``.
        stopped_early: ``True`` once ``config.patience`` evaluations in a row did not improve.
        grid_step: the training solver's ``step_size`` now (halved by ``refine_grid``), or ``None``.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Any,
        test_data: Any = None,
        config: TrainConfig | None = None,
        *,
        objective: Objective | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        progress: bool = True,
        **config_fields: Any,
    ) -> None:
        if config is not None and config_fields:
            raise ValueError("pass either config= or its fields as keyword arguments, not both")
        if config is None:
            known = set(TrainConfig.__dataclass_fields__)
            unknown = sorted(set(config_fields) - known)
            if unknown:
                raise ValueError(f"unknown training setting(s) {unknown}; TrainConfig has: {sorted(known)}")
        self.objective = objective if objective is not None else MaximumLikelihood()
        if config is None:  # defaults by dimension: TrainConfig.for_dim, or the objective's own
            dim = getattr(model, "dim", None)
            if not isinstance(dim, int):
                config = TrainConfig(**config_fields)
            elif isinstance(self.objective, MaximumLikelihood):
                config = TrainConfig.for_dim(dim, **config_fields)
            elif hasattr(self.objective, "default_config"):
                config = self.objective.default_config(dim, **config_fields)
            else:
                config = TrainConfig(**config_fields)
        self.config = config
        self.model = model
        self.train_data = self.objective.check_data(model, train_data, "train_data")
        self.test_data = None if test_data is None else self.objective.check_data(model, test_data, "test_data")
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.progress = progress
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=self.config.lr)
        self.iteration = 0
        self.best: dict[str, Any] | None = None
        self._since_best = 0
        self.stopped_early = False
        self._saved_at: int | None = None
        self.history: dict[str, list[float]] = {
            k: [] for k in ("iteration", "loss", "nll", "nfe_forward", "nfe_backward", "time", "cpu_time", "lr",
                            *self.objective.records, "eval_iteration", "test_nll", "eval_nfe", "test_nll_grid",
                            "grid_check_iteration", "grid_gap", "grid_step")
        }
        self._warned_grid = False
        self._check_points: Any = None
        self._grid_gap_found: tuple[float, float, str] | None = None
        self.grid_step: float | None = self.config.train_settings.get("step_size")

    # -- one step -------------------------------------------------------------------------------
    def _gradient(self) -> dict[str, float]:
        """Everything of one iteration before the optimizer step: the batch, the loss, its
        gradient (checked finite, clipped). Draws from the generator; changes no parameter."""
        cfg = self._solve_config()
        lr = cfg.lr_at(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.objective.batch(self.train_data, cfg.batch_size, self.generator)
        self.model.train()
        try:
            loss, records, result = self.objective.loss(self.model, batch, cfg, self.generator)
        except SolverError as err:
            raise TrainingError(f"iteration {self.iteration}: {err}") from err
        if not torch.isfinite(loss):
            raise TrainingError(
                f"iteration {self.iteration}: the loss is {loss.item()} (not finite). The parameters are "
                "those of the last good iteration. Try a smaller lr, a smaller grad_clip, kinetic/frobenius "
                "regularization, or check the data for huge values (standardize it)."
            )
        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss.backward()
        except AssertionError as err:  # the adjoint's backward solve failed inside torchdiffeq
            raise TrainingError(
                f"iteration {self.iteration}: the adjoint's backward solve failed ({err}). The parameters "
                "are those of the last good iteration. Try a smaller lr, kinetic/frobenius regularization, "
                "or adjoint=False."
            ) from err
        # one norm over all gradients: finite exactly when every gradient is (one check, not one per tensor)
        params = [p for p in self.model.parameters() if p.grad is not None]
        total_norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        if not torch.isfinite(total_norm):
            # one optimizer step with a NaN/inf gradient would make every parameter NaN (Adam
            # mixes it into its moments), and the next solve would fail with "underflow in dt nan"
            bad = [name for name, p in self.model.named_parameters()
                   if p.grad is not None and not torch.isfinite(p.grad).all()]
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"iteration {self.iteration}: the gradient is not finite (NaN or inf) in {bad[:3]}"
                f"{' ...' if len(bad) > 3 else ''}, although the loss ({loss.item():.4g}) is finite. "
                "The step was not taken: the parameters are those of the last good iteration. Try a "
                "smaller lr, a smaller grad_clip, kinetic/frobenius regularization, or standardize the data."
            )
        if cfg.grad_clip is not None and params:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, total_norm)
        return dict(loss=loss.item(), lr=lr, nfe_backward=result.nfe_backward, **records)

    def _solve_config(self) -> TrainConfig:
        """The config with the training grid's step as refined so far (``config`` itself if never)."""
        train = self.config.train_settings
        if self.grid_step is None or train.get("step_size") == self.grid_step:
            return self.config
        return replace(self.config, train_settings={**train, "step_size": self.grid_step})

    def step(self) -> dict[str, float]:
        """One optimizer step; returns its loss, NLL, NFE and learning rate (not recorded in the
        history: :meth:`fit` records its iterations)."""
        rec = self._gradient()
        self.optimizer.step()
        return rec

    def _iterate(self) -> dict[str, float]:
        """One iteration as a transaction: if anything before the optimizer step raises
        (an interrupt, a TrainingError), the generator is rewound and nothing has changed."""
        gen_state = self.generator.get_state()
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            rec = self._gradient()
        except BaseException:
            self.generator.set_state(gen_state)
            self.optimizer.zero_grad(set_to_none=True)
            raise
        with _interrupts_deferred():
            self.optimizer.step()
            h = self.history
            h.setdefault("cpu_time", [])  # (absent from older checkpoints)
            h["time"].append((h["time"][-1] if h["time"] else 0.0) + time.perf_counter() - start)
            h["cpu_time"].append((h["cpu_time"][-1] if h["cpu_time"] else 0.0) + time.process_time() - cpu_start)
            self.iteration += 1
            h["iteration"].append(self.iteration)
            for k in ("loss", "nll", "nfe_forward", "nfe_backward", "lr", *self.objective.records):
                h.setdefault(k, []).append(rec[k])
        return rec

    def _finish_iteration(self) -> None:
        """The evaluation and checkpoint due at the current iteration, unless already done
        (they are redone on resume when an interrupt cut them short)."""
        cfg, h = self.config, self.history
        if self.iteration == 0:
            return
        last = self.iteration == cfg.iterations
        due = (cfg.eval_every and self.iteration % cfg.eval_every == 0) or last
        evaluated = bool(h["eval_iteration"]) and h["eval_iteration"][-1] == self.iteration
        if self.test_data is not None and due and not evaluated:
            self.track_best(self.evaluate())
        elif self.test_data is None and due and self._grid_checked_at() != self.iteration:
            self._check_grid_on_training_points()
        gap, self._grid_gap_found = self._grid_gap_found, None
        # at the last iteration there is no training left to refine: the gap is recorded only
        if gap is not None and not last:
            self._on_grid_gap(*gap)
        due = (cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0) or last
        if self.checkpoint_path is not None and due and self._saved_at != self.iteration:
            self.save(self.checkpoint_path)

    def track_best(self, value: float) -> None:
        """Offers ``value``, a held-out NLL of the current parameters, to ``keep_best``.

        The trainer calls it after each evaluation; call it yourself (with :meth:`evaluate`) to make
        the parameters before training a candidate (``fit_density`` does so for a fitted base). It
        does nothing unless ``config.keep_best``; a value that does not beat the best so far counts
        towards ``config.patience``.
        """
        if not self.config.keep_best:
            return
        if self.best is None or value < self.best["nll"]:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best, self._since_best = dict(iteration=self.iteration, nll=value, state=state), 0
        else:
            self._since_best += 1
            self.stopped_early = self.config.patience is not None and self._since_best >= self.config.patience

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> dict[str, list[float]]:
        """Train until iteration ``until`` (default: ``config.iterations``); returns the history.

        Raises:
            TrainingError: on a non-finite loss or gradient or a solver failure: the parameters
                are those of the last good iteration; history and checkpoint are kept.
            KeyboardInterrupt: re-raised after saving a checkpoint (when a path is set) of the
                state between the last complete iteration and the next.

        With ``config.patience``, training also stops once that many evaluations in a row did not
        improve the best held-out NLL (:attr:`stopped_early`).
        """
        cfg = self.config
        until = cfg.iterations if until is None else min(int(until), cfg.iterations)
        bar = tqdm(total=until, initial=self.iteration, disable=not self.progress,
                   desc="training", mininterval=1.0, leave=True)
        try:
            while True:
                self._finish_iteration()
                if self.iteration >= until or self.stopped_early:
                    break
                try:
                    rec = self._iterate()
                except TrainingError:
                    if self.checkpoint_path is not None:
                        self.save(self.checkpoint_path)
                    raise
                bar.update(1)
                post = dict(loss=f"{rec['loss']:.3f}", nfe=f"{rec['nfe_forward']}+{rec['nfe_backward']}")
                if self.history["test_nll"]:
                    post["held_out_nll"] = f"{self.history['test_nll'][-1]:.3f}"
                bar.set_postfix(post, refresh=False)
        except KeyboardInterrupt:
            if self.checkpoint_path is not None:
                self.save(self.checkpoint_path)
            raise
        finally:
            bar.close()
        return self.history

    @torch.no_grad()
    def evaluate(self, data: Any = None) -> float:
        """Held-out NLL with ``config.eval_settings`` (recorded in the history when ``data`` is None).

        A Hutchinson estimate here draws its probe from a generator of its own, seeded by
        ``config.seed`` and the iteration, so evaluating never changes the training run.
        """
        record = data is None
        data = self.test_data if data is None else self.objective.check_data(self.model, data, "data")
        if data is None:
            raise ValueError("no test_data was given to the Trainer and none passed to evaluate()")
        self.model.eval()
        generator = torch.Generator().manual_seed(self.config.seed + 1_000_003 * (self.iteration + 1))
        value, nfe = self.objective.evaluate(self.model, data, self.config, generator)
        if record:
            grid_value = self._grid_nll(data)
            self.history["eval_iteration"].append(self.iteration)
            self.history["test_nll"].append(value)
            self.history["eval_nfe"].append(nfe)
            self.history["test_nll_grid"].append(grid_value)
            self._record_grid_check(grid_value - value, value, "the test data")
        return value

    def _grid_checked_at(self) -> int | None:
        checks = self.history.get("grid_check_iteration")
        return checks[-1] if checks else None

    def _record_grid_check(self, gap: float, value: float, where: str) -> None:
        """Record a grid check (``gap`` = NLL of ``where`` on the training grid − adaptive NLL
        ``value``; NaN when there is no grid); a gap above :data:`GRID_GAP_WARNING` is acted on
        when the iteration finishes."""
        if math.isnan(gap):
            return
        h = self.history
        for key, v in (("grid_check_iteration", self.iteration), ("grid_gap", gap), ("grid_step", self.grid_step)):
            h.setdefault(key, []).append(v)
        if abs(gap) > GRID_GAP_WARNING:
            self._grid_gap_found = (value + gap, value, where)

    def _check_grid_on_training_points(self) -> None:
        """Without test data: the grid check on :data:`GRID_CHECK_POINTS` training points drawn
        once by a generator of their own (maximum likelihood only; training is not changed)."""
        if not isinstance(self.objective, MaximumLikelihood) or not self._has_training_grid():
            return
        if self._check_points is None:
            generator = torch.Generator().manual_seed(self.config.seed + 7_000_003)
            self._check_points = self.objective.batch(self.train_data, GRID_CHECK_POINTS, generator)
        self.model.eval()
        generator = torch.Generator().manual_seed(self.config.seed + 1_000_003 * (self.iteration + 1))
        with torch.no_grad():
            value, _ = self.objective.evaluate(self.model, self._check_points, self.config, generator)
            gap = self._grid_nll(self._check_points) - value
        self._record_grid_check(gap, value, f"{len(self._check_points)} training points")

    def _on_grid_gap(self, grid_value: float, value: float, where: str) -> None:
        """The model has begun to fit its training grid: halve the step (``refine_grid``, within
        :data:`MAX_GRID_REFINEMENTS`) and say so, or warn once. Called by ``_finish_iteration``
        only (the warnings point at the caller of :meth:`fit`)."""
        method, step = self.config.train_settings.get("method"), self.grid_step
        refinements = 0 if step is None else round(math.log2(self.config.train_settings["step_size"] / step))
        found = (f"at iteration {self.iteration} the NLL of {where} on the training grid ({method}, step "
                 f"{step}) is {grid_value:.3f} nats and {value:.3f} adaptively: the model has begun to fit its "
                 "grid, a training device only (the adaptive value is the model's)")
        if self.config.refine_grid and step is not None and refinements < MAX_GRID_REFINEMENTS:
            self.grid_step = step / 2
            warnings.warn(f"{found}; training goes on with step {self.grid_step} (refine_grid=True, "
                          f"refinement {refinements + 1} of at most {MAX_GRID_REFINEMENTS}).",
                          UserWarning, stacklevel=user_stacklevel())
        elif not self._warned_grid:
            self._warned_grid = True
            advice = ("the grid was refined as far as refine_grid goes" if self.config.refine_grid and step
                      else f"a finer training grid (train_settings step_size {step / 2 if step else 'smaller'})")
            warnings.warn(f"{found}. {advice[0].upper() + advice[1:]}; a larger kinetic weight or fewer "
                          "iterations keep the two together.", UserWarning, stacklevel=user_stacklevel())

    def _has_training_grid(self) -> bool:
        """Whether the objective solves in training on a fixed-step grid (one a model can learn)."""
        return (getattr(self.objective, "solves_in_training", True)
                and self.config.train_settings.get("method") in FIXED_STEP_METHODS)

    def _grid_nll(self, data: Any) -> float:
        """NLL of ``data`` on the training solver's fixed grid (exact trace as in ``eval_settings``),
        or NaN when there is no training grid (:meth:`_has_training_grid`)."""
        if not self._has_training_grid():
            return math.nan
        keep = ("method", "step_size")
        grid = {**self.config.eval_settings, **{k: v for k, v in self._solve_config().train_settings.items()
                                                if k in keep}}
        generator = torch.Generator().manual_seed(self.config.seed + 1_000_003 * (self.iteration + 1) + 1)
        value, _ = self.objective.evaluate(self.model, data, replace(self.config, eval_settings=grid), generator)
        return value

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the next iteration, as plain values and tensors."""
        return dict(
            format=CHECKPOINT_FORMAT,
            version=CHECKPOINT_VERSION,
            iteration=self.iteration,
            config=asdict(self.config),
            objective=type(self.objective).__name__,
            objective_config=self._objective_config(),
            model_config=self.model.config(),
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            generator=self.generator.get_state(),
            history=self.history,
            best=self.best,
            since_best=self._since_best,
            grid_step=self.grid_step,
        )

    def _objective_config(self) -> dict[str, Any]:
        """The objective's settings (its ``config()``, if it has one), for checkpoints."""
        config = getattr(self.objective, "config", None)
        return dict(config()) if callable(config) else {}

    def save(self, path: str | os.PathLike) -> Path:
        """Write a checkpoint atomically (a killed process never leaves a half-written file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        self._saved_at = self.iteration
        return path

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`. A checkpoint of another model (any field of
        ``model.config()``), another objective or another training configuration is refused with
        a ``ValueError`` that names what differs (only ``checkpoint_every`` may change)."""
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a cnf_lib trainer checkpoint (its 'format' field is missing or different)")
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"checkpoint format version {state.get('version')} is not supported (this cnf_lib reads "
                f"version {CHECKPOINT_VERSION})"
            )
        diff = config_differences(state["model_config"], self.model.config())
        if diff:
            raise ValueError("the checkpoint is of a different model; " + "; ".join(diff))
        if state.get("objective") != type(self.objective).__name__:
            raise ValueError(f"the checkpoint trained objective {state.get('objective')!r}, this trainer "
                             f"{type(self.objective).__name__!r}")
        diff = config_differences(state.get("objective_config", {}), self._objective_config())
        if diff:
            raise ValueError("the checkpoint trained another objective configuration; " + "; ".join(diff))
        # a checkpoint from before ``refine_grid`` existed trained without refinement
        saved_cfg = {k: v for k, v in {"refine_grid": False, **state["config"]}.items() if k not in _BOOKKEEPING}
        my_cfg = {k: v for k, v in asdict(self.config).items() if k not in _BOOKKEEPING}
        diff = config_differences(saved_cfg, my_cfg)
        if diff:
            raise ValueError(
                "the checkpoint was trained with another TrainConfig (resuming would change the run, e.g. "
                "the learning-rate schedule spans `iterations`); " + "; ".join(diff)
                + ". Build the Trainer with the checkpoint's settings (state['config'])."
            )
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise ValueError(f"checkpoint parameters do not fit this model: {err}") from err
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.iteration = int(state["iteration"])
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.history.setdefault("test_nll_grid", [math.nan] * len(self.history["test_nll"]))
        for key in ("grid_check_iteration", "grid_gap", "grid_step"):
            self.history.setdefault(key, [])
        self.grid_step = state.get("grid_step", self.config.train_settings.get("step_size"))
        self.best, self._since_best = state.get("best"), int(state.get("since_best", 0))
        self.stopped_early = self.config.patience is not None and self._since_best >= self.config.patience
        self._saved_at = self.iteration

    def resume(self, path: str | os.PathLike | None = None) -> "Trainer":
        """Load a checkpoint (default: ``checkpoint_path``) written by :meth:`save`; returns self.

        The checkpoint is read with ``weights_only=True``: loading never executes code. Tensors
        are mapped to the model's device.
        """
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("no checkpoint path: pass one or set checkpoint_path")
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or foreign files fail in many ways inside torch
            raise ValueError(f"cannot read checkpoint {path}: it is truncated or not a torch checkpoint "
                             f"({err})") from err
        self.load_state_dict(state)
        return self
