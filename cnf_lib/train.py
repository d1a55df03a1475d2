"""Training a CNF by maximum likelihood: seeded, resumable, with progress and a history.

One :class:`Trainer` owns the model, the optimizer, a random generator (mini-batches and
Hutchinson probes) and the history. The learning rate follows a cosine from ``lr`` to
``lr_final`` over ``iterations``, computed from the iteration number, so a run can stop and
resume anywhere. A checkpoint holds everything that decides the next iteration (parameters,
Adam's moments, the generator's state, the iteration, the history): ``N`` iterations, save,
load, ``M`` more gives the same parameters and losses as ``N + M`` in one run, on a CPU exactly.

The loss of one iteration on a batch ``x`` is::

    -mean log p(x) + kinetic * mean ∫‖f‖² dt + frobenius * mean ∫‖∂f/∂x‖²_F dt

(the regularizers of RNODE, Finlay et al. 2020, integrated as extra ODE states).

A non-finite loss, a non-finite gradient or a solver failure (forward, or the adjoint's
backward) stops training with :class:`TrainingError`, which says what happened and what to try;
the parameters are those of the last good iteration, and the history and (with
``checkpoint_path``) a checkpoint of that state are kept.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .cnf import CNF, SolverError
from .datasets import check_points, make_toy

__all__ = ["TrainConfig", "Trainer", "TrainingError", "TrainJob", "fit_jobs", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "cnf_lib.trainer-checkpoint"
CHECKPOINT_VERSION = 1

Sampler = Callable[[int, torch.Generator], Tensor]


class TrainingError(RuntimeError):
    """Training stopped: a non-finite loss or a solver failure. The message says what to try."""


@dataclass
class TrainConfig:
    """Settings of a training run.

    Attributes:
        iterations: total number of optimizer steps (the cosine schedule spans them).
        batch_size: points per step (capped at the training-set size).
        lr, lr_final: learning rate at the start and at the end of the cosine decay.
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
    """

    # The defaults are the 2-D recipe measured in benchmarks/ (bench_recipe.py, RECIPE.md): about
    # 15-20 s of one CPU core on a 2-D toy. Training solves use RK4 on a fixed grid of 4 steps
    # (16 evaluations, no step-size control); the kinetic penalty keeps the field smooth enough
    # for that grid, and every held-out NLL is still computed adaptively (``eval_settings``).
    iterations: int = 600
    batch_size: int = 128
    lr: float = 3e-2
    lr_final: float = 1e-4
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

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.batch_size < 1:
            raise ValueError(f"iterations must be >= 0 and batch_size >= 1, got {self.iterations}, {self.batch_size}")
        if not (self.lr > 0 and self.lr_final > 0):
            raise ValueError(f"learning rates must be positive, got lr={self.lr}, lr_final={self.lr_final}")

    def lr_at(self, iteration: int) -> float:
        """The cosine-decayed learning rate of (0-based) ``iteration``."""
        frac = min(iteration / max(self.iterations, 1), 1.0)
        return self.lr_final + 0.5 * (self.lr - self.lr_final) * (1 + math.cos(math.pi * frac))


class Trainer:
    """Trains a :class:`~cnf_lib.cnf.CNF` by maximum likelihood.

    Arguments:
        model: the CNF.
        train_data: a tensor of training points (n, D), or a sampler ``(n, generator) -> (n, D)``
            that draws fresh points (the 2-D toys' ``sample``).
        test_data: held-out points (m, D) for the NLL at intervals, or ``None``.
        config: a :class:`TrainConfig` (or pass its fields as keyword arguments).
        checkpoint_path: where checkpoints are written (and read by :meth:`resume`).
        progress: show a tqdm bar with the loss and the NFE.

    Attributes:
        history: lists per iteration (``iteration``, ``loss``, ``nll``, ``nfe_forward``,
            ``nfe_backward`` (the adjoint's backward solve; 0 without the adjoint), ``time`` and
            ``cpu_time`` (cumulative wall-clock and CPU seconds of the training steps), ``lr``)
            and per evaluation (``eval_iteration``, ``test_nll``, ``eval_nfe``).
        iteration: iterations done.
    """

    def __init__(
        self,
        model: CNF,
        train_data: Tensor | Sampler,
        test_data: Tensor | None = None,
        config: TrainConfig | None = None,
        *,
        checkpoint_path: str | os.PathLike | None = None,
        progress: bool = True,
        **config_fields: Any,
    ) -> None:
        if config is not None and config_fields:
            raise ValueError("pass either config= or its fields as keyword arguments, not both")
        self.config = config if config is not None else TrainConfig(**config_fields)
        self.model = model
        if callable(train_data) and not isinstance(train_data, Tensor):
            self.sampler: Sampler | None = train_data
            self.train_data: Tensor | None = None
        else:
            self.sampler = None
            self.train_data = check_points(train_data, "train_data", dim=model.dim)
        self.test_data = None if test_data is None else check_points(test_data, "test_data", dim=model.dim)
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.progress = progress
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=self.config.lr)
        self.iteration = 0
        self.history: dict[str, list[float]] = {
            k: [] for k in ("iteration", "loss", "nll", "nfe_forward", "nfe_backward", "time", "cpu_time",
                            "lr", "eval_iteration", "test_nll", "eval_nfe")
        }

    # -- one step -------------------------------------------------------------------------------
    def _batch(self) -> Tensor:
        b = self.config.batch_size
        if self.sampler is not None:
            return check_points(self.sampler(b, self.generator), "sampled batch", dim=self.model.dim)
        n = self.train_data.shape[0]
        if b >= n:
            return self.train_data
        idx = torch.randperm(n, generator=self.generator)[:b]
        return self.train_data[idx]

    def step(self) -> dict[str, float]:
        """One optimizer step; returns its loss, NLL and NFE."""
        cfg = self.config
        lr = cfg.lr_at(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = self._batch()
        regularize = cfg.kinetic > 0 or cfg.frobenius > 0
        self.model.train()
        try:
            logp, res = self.model.log_prob_result(
                x, regularize=regularize, generator=self.generator, **cfg.train_settings
            )
        except SolverError as err:
            raise TrainingError(f"iteration {self.iteration}: {err}") from err
        nll = -logp.mean()
        loss = nll
        if regularize:
            loss = loss + cfg.kinetic * res.kinetic.mean() + cfg.frobenius * res.frobenius.mean()
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
        self.optimizer.step()
        return dict(loss=loss.item(), nll=nll.item(), nfe_forward=res.nfe_forward,
                    nfe_backward=res.nfe_backward, lr=lr)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> dict[str, list[float]]:
        """Train until iteration ``until`` (default: ``config.iterations``); returns the history.

        Raises:
            TrainingError: on a non-finite loss or a solver failure (history and checkpoint kept).
            KeyboardInterrupt: re-raised after saving a checkpoint (when a path is set).
        """
        cfg = self.config
        until = cfg.iterations if until is None else min(int(until), cfg.iterations)
        elapsed = self.history["time"][-1] if self.history["time"] else 0.0
        cpu_times = self.history.setdefault("cpu_time", [])  # (absent from older checkpoints)
        elapsed_cpu = cpu_times[-1] if cpu_times else 0.0
        bar = tqdm(total=until, initial=self.iteration, disable=not self.progress,
                   desc="training", mininterval=1.0, leave=True)
        try:
            while self.iteration < until:
                start, cpu_start = time.perf_counter(), time.process_time()
                try:
                    rec = self.step()
                except TrainingError:
                    if self.checkpoint_path is not None:
                        self.save(self.checkpoint_path)
                    raise
                elapsed += time.perf_counter() - start
                elapsed_cpu += time.process_time() - cpu_start
                self.iteration += 1
                h = self.history
                h["iteration"].append(self.iteration)
                h["time"].append(elapsed)
                h["cpu_time"].append(elapsed_cpu)
                for k in ("loss", "nll", "nfe_forward", "nfe_backward", "lr"):
                    h[k].append(rec[k])
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", nfe=f"{rec['nfe_forward']}+{rec['nfe_backward']}",
                                refresh=False)
                last = self.iteration == cfg.iterations
                if self.test_data is not None and (
                    (cfg.eval_every and self.iteration % cfg.eval_every == 0) or last
                ):
                    self.evaluate()
                if self.checkpoint_path is not None and (
                    (cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0) or last
                ):
                    self.save(self.checkpoint_path)
        except KeyboardInterrupt:
            if self.checkpoint_path is not None:
                self.save(self.checkpoint_path)
            raise
        finally:
            bar.close()
        return self.history

    @torch.no_grad()
    def evaluate(self, data: Tensor | None = None) -> float:
        """Held-out NLL with ``config.eval_settings`` (recorded in the history when ``data`` is None)."""
        record = data is None
        data = self.test_data if data is None else check_points(data, "data", dim=self.model.dim)
        if data is None:
            raise ValueError("no test_data was given to the Trainer and none passed to evaluate()")
        self.model.eval()
        logp, res = self.model.log_prob_result(data, generator=self.generator, **self.config.eval_settings)
        value = -logp.mean().item()
        if record:
            self.history["eval_iteration"].append(self.iteration)
            self.history["test_nll"].append(value)
            self.history["eval_nfe"].append(res.nfe_forward)
        return value

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the next iteration, as plain values and tensors."""
        return dict(
            format=CHECKPOINT_FORMAT,
            version=CHECKPOINT_VERSION,
            iteration=self.iteration,
            config=asdict(self.config),
            model_config=self.model.config(),
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            generator=self.generator.get_state(),
            history=self.history,
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write a checkpoint atomically (a killed process never leaves a half-written file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; a checkpoint of another model or run fails clearly."""
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a cnf_lib trainer checkpoint (its 'format' field is missing or different)")
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"checkpoint format version {state.get('version')} is not supported (this cnf_lib reads "
                f"version {CHECKPOINT_VERSION})"
            )
        mine, theirs = self.model.config(), state["model_config"]
        if theirs["dim"] != mine["dim"] or tuple(theirs["hidden"]) != tuple(mine["hidden"]):
            raise ValueError(
                f"checkpoint is for a model with dim={theirs['dim']}, hidden={tuple(theirs['hidden'])}; "
                f"this model has dim={mine['dim']}, hidden={tuple(mine['hidden'])}"
            )
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise ValueError(f"checkpoint parameters do not fit this model: {err}") from err
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.iteration = int(state["iteration"])
        self.history = {k: list(v) for k, v in state["history"].items()}

    def resume(self, path: str | os.PathLike | None = None) -> "Trainer":
        """Load a checkpoint (default: ``checkpoint_path``) written by :meth:`save`; returns self.

        The checkpoint is read with ``weights_only=True``: loading never executes code.
        """
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("no checkpoint path: pass one or set checkpoint_path")
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or foreign files fail in many ways inside torch
            raise ValueError(f"cannot read checkpoint {path}: it is truncated or not a torch checkpoint ({err})") from err
        self.load_state_dict(state)
        return self


# -- several independent trainings, one process each ---------------------------------------------


@dataclass(frozen=True)
class TrainJob:
    """One training run described by plain values, so that another process can run it.

    Attributes:
        data: the name of a 2-D toy of :mod:`cnf_lib.datasets` (a fresh batch is sampled at every
            iteration), or a tensor of training points (n, D).
        test_data: held-out points (m, D), or ``None``.
        model: keyword arguments of :class:`~cnf_lib.cnf.CNF` besides ``dim`` (``hidden``,
            ``activation``, ``t1`` and solver settings such as ``rtol``).
        config: :class:`TrainConfig` fields (``iterations``, ``kinetic``, ``seed``, ...).
        init_seed: ``torch.manual_seed`` before the model is built (its initial parameters).
        name: a label for the caller (not used for training).
    """

    data: str | Tensor
    test_data: Tensor | None = None
    model: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0
    name: str = ""

    def build(self) -> Trainer:
        """The :class:`Trainer` of this job, with a freshly initialized model, not yet trained."""
        sampler_or_data = make_toy(self.data).sample if isinstance(self.data, str) else self.data
        dim = 2 if isinstance(self.data, str) else int(self.data.shape[1])
        torch.manual_seed(self.init_seed)
        model = CNF(dim, **self.model)
        return Trainer(model, sampler_or_data, self.test_data, progress=False, **self.config)


def _run_job(job: TrainJob) -> tuple[bytes, float, float]:
    """Train one job (in a worker process); returns the trainer's state as bytes, wall and CPU s."""
    torch.set_num_threads(1)
    trainer = job.build()
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    return buffer.getvalue(), wall, cpu


def fit_jobs(jobs: Sequence[TrainJob], processes: int = 1) -> list[tuple[Trainer, float, float]]:
    """Train several independent CNFs, in parallel worker processes when ``processes > 1``.

    A small CNF gains nothing from more torch threads (it loses, on a busy machine: see the
    Performance appendix), but independent runs use separate cores perfectly well. Each job
    runs with one torch thread; a job gives exactly the same parameters and history whether it
    ran here or in a worker (the same seeds, the same operations).

    Arguments:
        jobs: the runs, as :class:`TrainJob` s.
        processes: worker processes (``1``: train one after another in this process).

    Returns:
        For each job, in order: its trained :class:`Trainer` (in this process, history and
        parameters loaded), the wall-clock seconds of its training and its CPU seconds.

    Raises:
        ValueError: on an empty job list or ``processes < 1``.
        TrainingError: as :meth:`Trainer.fit`, from the first job that failed.
    """
    jobs = list(jobs)
    if not jobs:
        raise ValueError("fit_jobs needs at least one TrainJob")
    if int(processes) != processes or processes < 1:
        raise ValueError(f"processes must be a positive integer, got {processes!r}")
    if not all(isinstance(j, TrainJob) for j in jobs):
        raise ValueError("every job must be a TrainJob")
    if processes == 1:
        results = [_run_job(job) for job in jobs]
    else:
        # "spawn": a fresh interpreter per worker (safe with torch, and the same on every OS)
        context = torch.multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(int(processes), len(jobs)), mp_context=context) as pool:
            results = list(pool.map(_run_job, jobs))
    out = []
    for job, (state, wall, cpu) in zip(jobs, results):
        trainer = job.build()
        trainer.load_state_dict(torch.load(io.BytesIO(state), map_location="cpu", weights_only=True))
        out.append((trainer, wall, cpu))
    return out
