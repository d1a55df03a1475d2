"""Reliability across the public API: bad input, killed runs, determinism.

Property-based tests (hypothesis) throw varied arrays — wrong rank, wrong width, empty,
NaN/inf, non-numeric — at the public entry points and check that the only outcomes are a
correct result or a ``ValueError`` whose message names the problem.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cnf_lib import CNF, Trainer
from cnf_lib.datasets import Standardizer, check_points, make_toy
from cnf_lib.metrics import mmd, wasserstein

PROBLEM_WORDS = ("shape", "2-D", "empty", "NaN", "inf", "non-finite", "columns", "numeric", "dim")

torch.set_num_threads(1)
MODEL = CNF(2, hidden=(8,), rtol=1e-3, atol=1e-3)

shapes = st.one_of(
    hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4),
    st.tuples(st.integers(1, 5), st.just(2)),  # well-formed shapes too
)
floats = st.floats(-10, 10, width=32) | st.sampled_from([np.nan, np.inf, -np.inf])
arrays = st.one_of(
    hnp.arrays(np.float32, shapes, elements=floats),
    hnp.arrays(np.float64, shapes, elements=st.floats(-10, 10) | st.sampled_from([np.nan, np.inf, -np.inf])),
    hnp.arrays(np.int64, shapes, elements=st.integers(-5, 5)),
    hnp.arrays(np.bool_, shapes),
    hnp.arrays(np.dtype("U3"), shapes),
)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def well_formed(a: np.ndarray, dim: int | None = 2) -> bool:
    return (a.ndim == 2 and a.shape[0] > 0 and a.shape[1] > 0 and dim in (None, a.shape[1])
            and a.dtype.kind in "iuf"
            and bool(np.isfinite(a.astype(np.float64)).all()))


def assert_clear(err: ValueError) -> None:
    msg = str(err)
    assert any(w in msg for w in PROBLEM_WORDS), f"unclear error message: {msg!r}"


@SETTINGS
@given(arrays)
def test_check_points_returns_or_names_the_problem(a: np.ndarray) -> None:
    try:
        out = check_points(a, "x", dim=2)
    except ValueError as err:
        assert not well_formed(a)
        assert_clear(err)
    else:
        assert well_formed(a) and out.shape == a.shape and out.dtype == torch.float32


@SETTINGS
@given(arrays)
def test_cnf_log_prob_returns_finite_values_or_names_the_problem(a: np.ndarray) -> None:
    try:
        with torch.no_grad():
            out = MODEL.log_prob(a)
    except ValueError as err:
        assert not well_formed(a)
        assert_clear(err)
    else:
        assert well_formed(a) and out.shape == (a.shape[0],) and torch.isfinite(out).all()


@SETTINGS
@given(arrays)
def test_encode_and_trajectory_return_or_name_the_problem(a: np.ndarray) -> None:
    for call in (lambda: MODEL.encode(a), lambda: MODEL.trajectory(a, [0.0, 0.5, 1.0])):
        try:
            with torch.no_grad():
                out = call()
        except ValueError as err:
            assert not well_formed(a)
            assert_clear(err)
        else:
            assert well_formed(a) and torch.isfinite(out).all()


@SETTINGS
@given(arrays)
def test_toy_log_prob_and_standardizer_return_or_name_the_problem(a: np.ndarray) -> None:
    toy = make_toy("8gaussians")
    try:
        lp = toy.log_prob(a)
    except ValueError as err:
        assert not well_formed(a)
        assert_clear(err)
    else:
        assert well_formed(a) and lp.shape == (a.shape[0],)
    try:
        st_ = Standardizer.fit(a)
    except ValueError as err:
        constant = well_formed(a, None) and bool((np.ptp(a.astype(np.float64), axis=0) == 0).any())
        assert not well_formed(a, None) or constant, str(err)
        assert constant or any(w in str(err) for w in PROBLEM_WORDS)
    else:
        back = st_.inverse(st_.transform(torch.as_tensor(a, dtype=torch.float32)))
        torch.testing.assert_close(back, torch.as_tensor(a, dtype=torch.float32), rtol=1e-4, atol=1e-4)


@SETTINGS
@given(arrays)
def test_metrics_return_or_name_the_problem(a: np.ndarray) -> None:
    y = np.random.default_rng(0).normal(size=(6, 2))
    try:
        w = wasserstein(a, y)
        m = mmd(a, y) if well_formed(a) and a.shape[0] > 1 else None
    except ValueError:
        assert not well_formed(a)
    else:
        assert well_formed(a) and w >= 0 and np.isfinite(w)
        assert m is None or np.isfinite(m)


@pytest.mark.parametrize(
    "bad, words",
    [
        (lambda: CNF(0), "dim"),
        (lambda: CNF(2, trace="approximate"), "unknown trace"),
        (lambda: CNF(2, probe="uniform"), "unknown probe"),
        (lambda: CNF(2, rtol=-1.0), "tolerances must be positive"),
        (lambda: CNF(2, activation="relu6"), "unknown activation"),
        (lambda: MODEL.sample(0), "positive integer"),
        (lambda: MODEL.sample(2.5), "positive integer"),
        (lambda: MODEL.trajectory(torch.zeros(3, 2), [0.0]), "at least 2"),
        (lambda: Trainer(MODEL, torch.zeros(4, 2), iterations=-1, progress=False), "iterations"),
        (lambda: Trainer(MODEL, torch.zeros(4, 2), lr=0.0, progress=False), "learning rates"),
        (lambda: Trainer(MODEL, torch.zeros(4, 2), progress=False).evaluate(), "no test_data"),
        (lambda: make_toy("banana"), "banana"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_the_problem(bad, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        bad()


def test_solver_failure_during_training_stops_with_advice_and_keeps_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CNF(2, hidden=(8,))
    trainer = Trainer(model, torch.randn(64, 2), iterations=10, eval_every=0, progress=False,
                      checkpoint_path=tmp_path / "ck.pt", seed=0)
    trainer.fit(until=2)
    trainer.config.train_settings = dict(max_num_steps=1)
    from cnf_lib import TrainingError
    with pytest.raises(TrainingError, match="max_num_steps.*Try"):
        trainer.fit()
    assert trainer.iteration == 2 and len(trainer.history["loss"]) == 2
    assert (tmp_path / "ck.pt").exists()


def test_same_seed_same_numbers() -> None:
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        model = CNF(2, hidden=(16,), trace="hutchinson")
        held_out = make_toy("moons").sample(200, torch.Generator().manual_seed(1))
        trainer = Trainer(model, make_toy("moons").sample, held_out,
                          iterations=6, batch_size=64, eval_every=3, seed=11, progress=False)
        trainer.fit()
        runs.append((trainer.history["loss"], trainer.history["test_nll"],
                     model.sample(5, generator=torch.Generator().manual_seed(0))))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert torch.equal(runs[0][2], runs[1][2])


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(1)
    from cnf_lib import CNF, Trainer
    torch.manual_seed(0)
    data = torch.randn(256, 2, generator=torch.Generator().manual_seed(0)) * 0.7 + 0.3
    model = CNF(2, hidden=(16, 16), trace="hutchinson")
    t = Trainer(model, data, iterations=int(sys.argv[2]), batch_size=64, eval_every=0, seed=4,
                checkpoint_path=sys.argv[1], checkpoint_every=3, progress=False)
    if len(sys.argv) > 3:
        t.resume()
    slow = len(sys.argv) == 3
    while t.iteration < t.config.iterations:
        t.fit(until=t.iteration + 1)
        if slow:
            time.sleep(0.05)   # gives the test time to kill us between checkpoints
    torch.save({"params": [p.detach() for p in model.parameters()], "loss": t.history["loss"]}, sys.argv[1] + ".final")
    """
)


def test_a_killed_process_resumes_from_its_last_checkpoint_to_the_same_run(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the reference: one uninterrupted run
    ref = tmp_path / "ref.pt"
    subprocess.run([sys.executable, str(script), str(ref), "24"], check=True, env=env, timeout=300)
    # a run killed with SIGKILL (no chance to save) somewhere after its second checkpoint
    ck = tmp_path / "killed.pt"
    proc = subprocess.Popen([sys.executable, str(script), str(ck), "24"], env=env)
    deadline = time.time() + 240
    while time.time() < deadline:
        if ck.exists():
            state = torch.load(ck, weights_only=True)
            if state["iteration"] >= 6:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not Path(str(ck) + ".final").exists(), "the run finished before it could be killed"
    subprocess.run([sys.executable, str(script), str(ck), "24", "resume"], check=True, env=env, timeout=300)
    a = torch.load(str(ref) + ".final", weights_only=True)
    b = torch.load(str(ck) + ".final", weights_only=True)
    assert a["loss"] == b["loss"]
    for p, q in zip(a["params"], b["params"]):
        assert torch.equal(p, q)
