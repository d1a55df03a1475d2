"""Several independent trainings, one worker process each (chapter 5's sweeps).

A small CNF gains nothing from more torch threads, but independent runs use separate cores
perfectly well. A :class:`TrainJob` describes one run by plain values, so that another process
can build and run it; :func:`fit_jobs` runs a list of them and returns trained
:class:`~cnf_lib.train.Trainer` s, with exactly the parameters and history they would have had here.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .cnf import CNF
from .datasets import make_toy
from .train import Trainer

__all__ = ["TrainJob", "fit_jobs"]


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
        objective: the :class:`~cnf_lib.train.Trainer`'s objective (``None``: maximum
            likelihood), e.g. a :class:`~cnf_lib.matching.FlowMatching`; it must pickle.
    """

    data: str | Tensor
    test_data: Tensor | None = None
    model: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0
    name: str = ""
    objective: Any = None

    def build(self) -> Trainer:
        """The :class:`Trainer` of this job, with a freshly initialized model, not yet trained."""
        sampler_or_data = make_toy(self.data).sample if isinstance(self.data, str) else self.data
        dim = 2 if isinstance(self.data, str) else int(self.data.shape[1])
        torch.manual_seed(self.init_seed)
        model = CNF(dim, **self.model)
        return Trainer(model, sampler_or_data, self.test_data, progress=False, objective=self.objective,
                       **self.config)


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
        TrainingError: as :meth:`cnf_lib.train.Trainer.fit`, from the first job that failed.
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
