"""cnf_lib.train: learning, exact resume, interruption, NaN stop, checkpoint safety."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import warnings
from pathlib import Path

import pytest
import torch

from cnf_lib import CNF, Trainer, TrainingError
from cnf_lib.train import CHECKPOINT_VERSION

MU = torch.tensor([1.0, -0.5])
SIGMA = torch.tensor([0.6, 1.3])


def gaussian_data(n: int, seed: int) -> torch.Tensor:
    return MU + SIGMA * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


def small_model(seed: int = 0, **settings) -> CNF:
    torch.manual_seed(seed)
    return CNF(2, hidden=(16, 16), **settings)


def make_trainer(tmp_path: Path | None = None, **kw) -> Trainer:
    cfg = dict(iterations=12, batch_size=64, lr=1e-2, lr_final=1e-3, eval_every=0, seed=3)
    cfg.update(kw)
    model = small_model(trace="hutchinson")
    return Trainer(model, gaussian_data(256, 0), gaussian_data(64, 1), progress=False,
                   checkpoint_path=None if tmp_path is None else tmp_path / "ckpt.pt", **cfg)


def test_training_approaches_the_true_nll_of_a_gaussian() -> None:
    model = small_model()
    trainer = Trainer(model, gaussian_data(2048, 0), gaussian_data(2000, 1), iterations=150,
                      batch_size=256, lr=2e-2, lr_final=1e-3, eval_every=0, progress=False)
    before = trainer.evaluate(gaussian_data(2000, 1))
    trainer.fit()
    true_nll = (torch.log(SIGMA).sum() + math.log(2 * math.pi) + 1).item()  # Gaussian entropy, D = 2
    after = trainer.history["test_nll"][-1]
    assert before - true_nll > 0.5
    assert after - true_nll < 0.05
    assert len(trainer.history["loss"]) == 150 and trainer.history["nfe_forward"][0] > 0


def test_n_plus_m_iterations_equal_n_save_load_m(tmp_path: Path) -> None:
    full = make_trainer()
    full.fit()
    first = make_trainer(tmp_path)
    first.fit(until=5)
    first.save(tmp_path / "ckpt.pt")
    second = make_trainer(tmp_path).resume()
    assert second.iteration == 5
    second.fit()
    assert second.history["loss"] == full.history["loss"]
    for p, q in zip(second.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)


def _interrupt_inside(trainer: Trainer, where: str, at_iteration: int) -> None:
    """Make ``trainer`` raise KeyboardInterrupt inside iteration ``at_iteration`` (0-based), at ``where``."""
    objective = trainer.objective

    def active() -> bool:
        return trainer.iteration == at_iteration

    if where == "batch draw":  # after the batch has been drawn from the generator
        draw = objective.batch

        def batch(*args):
            out = draw(*args)
            if active():
                raise KeyboardInterrupt
            return out

        objective.batch = batch
    elif where == "solve":  # at the third field evaluation, after the probe was drawn
        calls = {"n": 0}

        def hook(module, args, output):
            if active():
                calls["n"] += 1
                if calls["n"] == 3:
                    raise KeyboardInterrupt

        trainer.model.field.layers[0].gate.register_forward_hook(hook)
    elif where == "backward pass":
        compute = objective.loss

        def loss(*args):
            value, records, result = compute(*args)
            if active():
                def stop(grad):
                    raise KeyboardInterrupt
                value.register_hook(stop)
            return value, records, result

        objective.loss = loss
    elif where == "evaluation":  # after the step: the evaluation due at this iteration is cut short
        evaluate = objective.evaluate

        def interrupted_evaluate(*args):
            if trainer.iteration == at_iteration + 1:
                raise KeyboardInterrupt
            return evaluate(*args)

        objective.evaluate = interrupted_evaluate
    elif where == "optimizer step":  # a real SIGINT while Adam updates the parameters
        # Python's own SIGINT handler (a job started in the background by a shell ignores SIGINT)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        step = trainer.optimizer.step

        def signalled_step(*args, **kwargs):
            if active():
                os.kill(os.getpid(), signal.SIGINT)
            return step(*args, **kwargs)

        trainer.optimizer.step = signalled_step
    else:
        raise ValueError(where)


@pytest.mark.parametrize("where", ["batch draw", "solve", "backward pass", "evaluation", "optimizer step"])
def test_an_interrupt_anywhere_resumes_to_the_same_run(tmp_path: Path, where: str) -> None:
    handler = signal.getsignal(signal.SIGINT)
    try:
        _interrupted_run_resumes(tmp_path, where)
    finally:
        signal.signal(signal.SIGINT, handler)


def _interrupted_run_resumes(tmp_path: Path, where: str) -> None:
    full = make_trainer(eval_every=4)
    full.fit()
    interrupted = make_trainer(tmp_path, checkpoint_every=4, eval_every=4)
    _interrupt_inside(interrupted, where, at_iteration=7)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    # the checkpoint written on the interrupt is the state between two iterations
    committed = 8 if where in ("evaluation", "optimizer step") else 7
    assert interrupted.iteration == committed
    resumed = make_trainer(tmp_path, eval_every=4).resume()
    assert resumed.iteration == committed
    resumed.fit()
    assert resumed.history["loss"] == full.history["loss"]
    assert resumed.history["test_nll"] == full.history["test_nll"]
    assert resumed.history["eval_iteration"] == full.history["eval_iteration"] == [4, 8, 12]
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_good_state(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path)
    trainer.fit(until=3)
    good = [p.detach().clone() for p in trainer.model.parameters()]
    original = trainer.model.log_prob_result

    def poisoned(*args, **kwargs):
        logp, res = original(*args, **kwargs)
        return logp * float("nan"), res

    trainer.model.log_prob_result = poisoned
    with pytest.raises(TrainingError, match="not finite"):
        trainer.fit()
    assert trainer.iteration == 3 and len(trainer.history["loss"]) == 3
    for p, q in zip(trainer.model.parameters(), good):
        assert torch.equal(p, q)
    restored = make_trainer(tmp_path).resume()
    assert restored.iteration == 3


def test_checkpoint_errors_are_clear(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path)
    trainer.fit(until=2)
    path = trainer.save(tmp_path / "ok.pt")

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated|cannot read"):
        make_trainer().resume(truncated)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="not a cnf_lib trainer checkpoint"):
        make_trainer().resume(foreign)

    state = torch.load(path, weights_only=True)
    state["version"] = CHECKPOINT_VERSION + 1
    newer = tmp_path / "newer.pt"
    torch.save(state, newer)
    with pytest.raises(ValueError, match="version"):
        make_trainer().resume(newer)

    other = Trainer(CNF(2, hidden=(8,)), gaussian_data(64, 0), progress=False)
    with pytest.raises(ValueError, match="hidden"):
        other.resume(path)

    with pytest.raises(FileNotFoundError):
        make_trainer().resume(tmp_path / "missing.pt")


def test_bad_training_data_is_rejected() -> None:
    model = small_model()
    with pytest.raises(ValueError, match="NaN"):
        Trainer(model, torch.tensor([[0.0, float("nan")]] * 4), progress=False)
    with pytest.raises(ValueError, match="dim|column|dimension"):
        Trainer(model, torch.randn(10, 3), progress=False)
    with pytest.raises(ValueError, match="either config"):
        from cnf_lib import TrainConfig
        Trainer(model, torch.randn(10, 2), config=TrainConfig(), iterations=3, progress=False)


def test_history_records_forward_and_backward_nfe() -> None:
    direct = make_trainer(iterations=3)
    direct.fit()
    assert all(n > 0 for n in direct.history["nfe_forward"])
    assert direct.history["nfe_backward"] == [0, 0, 0]  # backprop through the solver: no backward solve
    adjoint = make_trainer(iterations=3, train_settings=dict(adjoint=True, adjoint_seminorm=True))
    adjoint.fit()
    assert len(adjoint.history["nfe_backward"]) == 3 and all(n > 0 for n in adjoint.history["nfe_backward"])


def test_regularized_training_runs_and_its_loss_includes_the_regularizers() -> None:
    plain = make_trainer(iterations=1)
    plain.fit()
    reg = make_trainer(iterations=1, kinetic=1.0, frobenius=1.0)
    reg.fit()
    # same seed, same batch, same first model: the regularized loss adds positive integrals
    assert reg.history["nll"][0] == pytest.approx(plain.history["nll"][0], rel=1e-6)
    assert reg.history["loss"][0] > reg.history["nll"][0]


def test_non_finite_gradient_stops_before_the_step(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path)
    trainer.fit(until=2)
    good = [p.detach().clone() for p in trainer.model.parameters()]
    original = trainer.model.log_prob_result
    first = next(trainer.model.parameters())

    def poisoned(*args, **kwargs):
        logp, res = original(*args, **kwargs)
        # finite value (0), NaN gradient: d sqrt(u)/du at u = 0 is inf, times 0
        return logp + 0.0 * torch.sqrt(0.0 * first.sum()), res

    trainer.model.log_prob_result = poisoned
    with pytest.raises(TrainingError, match="gradient is not finite"):
        trainer.fit()
    assert trainer.iteration == 2
    for p, q in zip(trainer.model.parameters(), good):
        assert torch.equal(p, q)


def test_adjoint_backward_failure_is_a_training_error() -> None:
    trainer = make_trainer(train_settings=dict(adjoint=True))
    field = trainer.model.field
    original_forward = field.forward
    state = {"poison": False}

    def forward(t, x):
        out = original_forward(t, x)
        return out * float("nan") if state["poison"] else out

    original_hutchinson = field.divergence_hutchinson  # the route the CNF takes for this field

    def hutchinson(t, x, probe, frobenius=True):
        f, div, frob = original_hutchinson(t, x, probe, frobenius)
        return (f * float("nan") if state["poison"] else f), div, frob

    field.forward = forward
    field.divergence_hutchinson = hutchinson
    original = trainer.model.log_prob_result

    def poison_on_backward(*args, **kwargs):
        logp, res = original(*args, **kwargs)
        logp.register_hook(lambda g: state.update(poison=True))  # runs before the backward solve
        return logp, res

    trainer.model.log_prob_result = poison_on_backward
    with pytest.raises(TrainingError, match="backward solve failed"):
        trainer.fit()
    assert trainer.iteration == 0


def test_fit_jobs_in_workers_equals_training_here() -> None:
    from cnf_lib.jobs import TrainJob, fit_jobs
    from cnf_lib.matching import FlowMatching

    data = gaussian_data(256, 0)
    jobs = [TrainJob(data=data, test_data=gaussian_data(64, 1), model=dict(hidden=(8,), rtol=1e-3, atol=1e-3),
                     config=dict(iterations=4, batch_size=64, eval_every=0, seed=s), init_seed=s, name=f"run{s}")
            for s in (0, 1)]
    jobs.append(TrainJob(data="moons", model=dict(hidden=(8,)), config=dict(iterations=2, batch_size=32, seed=2)))
    jobs.append(TrainJob(data="moons", model=dict(hidden=(8,)), objective=FlowMatching(pairs="ot"),
                         config=dict(iterations=3, batch_size=32, seed=3, kinetic=0.0)))
    here = fit_jobs(jobs, processes=1)
    there = fit_jobs(jobs, processes=2)
    for (a, wall, cpu), (b, _, _) in zip(here, there):
        assert a.iteration == b.iteration and a.history["loss"] == b.history["loss"]
        for p, q in zip(a.model.parameters(), b.model.parameters()):
            assert torch.equal(p, q)
        assert wall > 0 and cpu > 0
    assert here[0][0].history["loss"] != here[1][0].history["loss"]  # different seeds, different runs
    assert len(here[0][0].history["test_nll"]) == 1  # evaluated at the end
    assert isinstance(there[3][0].objective, FlowMatching) and here[3][0].history["nfe_forward"] == [0, 0, 0]
    with pytest.raises(ValueError, match="at least one"):
        fit_jobs([])
    with pytest.raises(ValueError, match="processes"):
        fit_jobs(jobs, processes=0)


def test_history_times_are_cumulative_and_resume_from_old_checkpoints(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, iterations=4)
    trainer.fit(until=2)
    h = trainer.history
    assert len(h["time"]) == len(h["cpu_time"]) == 2
    assert 0 < h["cpu_time"][0] <= h["cpu_time"][1] and 0 < h["time"][0] <= h["time"][1]
    state = trainer.state_dict()
    del state["history"]["cpu_time"]  # a checkpoint written before cpu_time existed
    resumed = make_trainer(tmp_path, iterations=4)
    resumed.load_state_dict(state)
    resumed.fit()
    assert len(resumed.history["cpu_time"]) == 2 and len(resumed.history["time"]) == 4


def test_held_out_evaluation_is_adaptive_even_for_a_fixed_step_model() -> None:
    # a model trained on a fixed grid must not be evaluated on that grid (it can learn the grid)
    torch.manual_seed(0)
    model = CNF(2, hidden=(8,), method="rk4", step_size=0.5)
    trainer = Trainer(model, gaussian_data(64, 0), gaussian_data(64, 1), iterations=1, progress=False)
    adaptive = -model.log_prob(gaussian_data(64, 1), trace="exact", method="dopri5", rtol=1e-5, atol=1e-5).mean().item()
    assert trainer.evaluate(gaussian_data(64, 1)) == pytest.approx(adaptive, rel=1e-6)


def test_the_defaults_are_the_benchmarked_recipe() -> None:
    # the defaults must be what benchmarks/bench_recipe.py measured (RECIPE in benchmarks/common.py)
    import importlib.util
    import sys

    from cnf_lib.train import TrainConfig

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "common.py"
    spec = importlib.util.spec_from_file_location("bench_common", path)
    common = importlib.util.module_from_spec(spec)
    sys.modules["bench_common"] = common  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(common)
    finally:
        del sys.modules["bench_common"]
    defaults = TrainConfig()
    for name in ("iterations", "batch_size", "lr", "lr_final", "kinetic", "frobenius", "grad_clip", "train_settings"):
        assert getattr(defaults, name) == common.RECIPE[name], name
    # the earlier, adaptive recipes train with the CNF's own default solver
    model_defaults = CNF(2).settings
    for name, value in common.CHAPTER_RECIPE["train_settings"].items():
        assert getattr(model_defaults, name) == value, name


def test_defaults_by_dimension_change_only_above_two_and_yield_to_what_is_passed() -> None:
    from cnf_lib.train import HIGH_DIM_DEFAULTS, TrainConfig

    assert TrainConfig.for_dim(1) == TrainConfig.for_dim(2) == TrainConfig()
    high = TrainConfig.for_dim(6)
    assert high.batch_size == HIGH_DIM_DEFAULTS["batch_size"] == 512
    assert high.train_settings == dict(method="rk4", step_size=0.25, trace="hutchinson")
    assert high.lr == TrainConfig().lr and high.iterations == TrainConfig().iterations
    assert TrainConfig.for_dim(6, batch_size=64, train_settings={}).batch_size == 64
    assert TrainConfig.for_dim(6, train_settings={}).train_settings == {}
    TrainConfig.for_dim(6).train_settings["step_size"] = 0.1  # a user edits one config ...
    assert HIGH_DIM_DEFAULTS["train_settings"]["step_size"] == 0.25  # ... and the defaults stay
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        TrainConfig.for_dim(0)
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    trainer = Trainer(CNF(6, hidden=(8,)), x, iterations=2, eval_every=0, progress=False)
    assert trainer.config == dataclasses.replace(high, iterations=2, eval_every=0)
    history = trainer.fit()
    assert history["nfe_forward"] == [16, 16]  # the same four-step grid, now with a probe
    # an explicit config keeps the class defaults; flow matching takes its own (cnf_lib.matching)
    assert Trainer(CNF(6, hidden=(8,)), x, config=TrainConfig(), progress=False).config.batch_size == 128
    from cnf_lib.matching import FlowMatching

    matching = Trainer(CNF(6, hidden=(8,)), x, objective=FlowMatching(), progress=False)
    assert matching.config == FlowMatching.default_config(6) and matching.config.kinetic == 0


def test_the_high_dim_training_grid_with_a_probe_differs_from_exact_and_evaluation_stays_exact() -> None:
    # the model says exact; the 6-D defaults train with one probe (a different loss than the exact
    # trace on the same batch), and the held-out NLL is the exact one
    from cnf_lib.train import TrainConfig

    x = torch.randn(512, 6, generator=torch.Generator().manual_seed(1)) * 0.7
    losses = {}
    for trace in ("hutchinson", "exact"):
        torch.manual_seed(0)
        model = CNF(6, hidden=(8,))
        settings = dict(TrainConfig.for_dim(6).train_settings, trace=trace)
        trainer = Trainer(model, x, x[:100], iterations=1, eval_every=1, progress=False, lr=1e-9,
                          lr_final=1e-9, train_settings=settings, kinetic=0.0)
        trainer.fit()
        losses[trace] = trainer.history["loss"][0]
        exact = -model.log_prob(x[:100], trace="exact", method="dopri5", rtol=1e-5, atol=1e-5).mean().item()
        assert trainer.history["test_nll"][-1] == pytest.approx(exact, abs=1e-4)
    assert losses["hutchinson"] != pytest.approx(losses["exact"], abs=1e-6)


def test_the_default_training_solve_is_four_rk4_steps_and_evaluation_stays_adaptive() -> None:
    trainer = Trainer(small_model(), gaussian_data(256, 0), gaussian_data(64, 1), iterations=2, eval_every=0,
                      progress=False)
    history = trainer.fit()
    assert history["nfe_forward"] == [16, 16]  # 4 steps x 4 stages, whatever the field
    assert history["eval_nfe"][-1] > 16 and (history["eval_nfe"][-1] - 2) % 6 == 0  # dopri5's count


def test_gradient_clipping_bounds_the_gradient_norm() -> None:
    norms = {}
    for clip in (None, 1e-3):
        trainer = make_trainer(grad_clip=clip)
        trainer.step()
        norms[clip] = torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters()]).item()
    assert norms[None] > 1e-2  # unclipped, the first gradient is far larger than the bound
    assert norms[1e-3] == pytest.approx(1e-3, rel=1e-4)


def test_a_checkpoint_is_refused_by_another_model_or_config_naming_what_differs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = Trainer(CNF(2, hidden=(8,), activation="softplus", t1=1.0), gaussian_data(64, 0), iterations=4,
                    progress=False)
    saved.fit(until=1)
    path = saved.save(tmp_path / "c.pt")
    other_model = Trainer(CNF(2, hidden=(8,), activation="tanh", t1=3.0), gaussian_data(64, 0), iterations=4,
                          progress=False)
    with pytest.raises(ValueError, match=r"activation: saved 'softplus', here 'tanh'.*t1: saved 1.0, here 3.0"):
        other_model.resume(path)
    torch.manual_seed(0)
    other_config = Trainer(CNF(2, hidden=(8,), activation="softplus"), gaussian_data(64, 0), iterations=8,
                           progress=False)
    with pytest.raises(ValueError, match=r"TrainConfig.*iterations: saved 4, here 8"):
        other_config.resume(path)
    # checkpoint_every decides no number: it may change
    same = Trainer(CNF(2, hidden=(8,), activation="softplus"), gaussian_data(64, 0), iterations=4,
                   checkpoint_every=2, progress=False)
    assert same.resume(path).iteration == 1


def test_a_mistyped_training_setting_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown training setting\(s\) \['iteratons'\]"):
        Trainer(small_model(), gaussian_data(64, 0), iteratons=3)


def test_config_of_a_custom_field_names_the_field_not_unused_defaults() -> None:
    from cnf_lib import LinearField

    config = CNF(2, field=LinearField(torch.eye(2))).config()
    assert config["field"] == "LinearField" and "hidden" not in config and "activation" not in config


def test_log_prob_at_time_zero_is_the_prior() -> None:
    from cnf_lib import standard_normal_log_prob

    x = gaussian_data(5, 0)
    assert torch.equal(small_model().log_prob(x, t=0.0), standard_normal_log_prob(x))


def test_keep_best_and_patience_stop_early_and_resume_exactly(tmp_path: Path) -> None:
    kw = dict(iterations=40, eval_every=2, keep_best=True, patience=2, lr=0.3, lr_final=0.3)
    full = make_trainer(**kw)
    full.fit()
    assert full.stopped_early and full.iteration < 40  # a learning rate this large stops improving
    evals = full.history["test_nll"]
    assert full.best["nll"] == min(evals)
    assert full.best["iteration"] == full.history["eval_iteration"][evals.index(min(evals))]
    part = make_trainer(tmp_path, **kw)
    part.fit(until=3)
    part.save(tmp_path / "ckpt.pt")
    resumed = make_trainer(tmp_path, **kw).resume()
    resumed.fit()
    assert resumed.iteration == full.iteration and resumed.history["test_nll"] == evals
    for k, v in full.best["state"].items():
        assert torch.equal(resumed.best["state"][k], v)
    with pytest.raises(ValueError, match="keep_best"):
        make_trainer(patience=2)

def test_track_best_makes_the_starting_parameters_a_candidate_and_counts_towards_patience() -> None:
    kw = dict(iterations=6, eval_every=2, keep_best=True, lr=0.3, lr_final=0.3)
    trainer = make_trainer(**kw)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.track_best(-1e9)  # a value no evaluation beats: the parameters before training stay the best
    trainer.fit()
    assert trainer.best["iteration"] == 0 and trainer.best["nll"] == -1e9
    assert all(torch.equal(trainer.best["state"][k], v) for k, v in start.items())
    patient = make_trainer(**{**kw, "patience": 2})
    patient.track_best(-1e9)
    patient.fit()
    assert patient.stopped_early and patient.iteration == 4  # two evaluations without improvement
    unkept = make_trainer(iterations=2)
    unkept.track_best(-1e9)
    assert unkept.best is None  # without keep_best nothing is kept


def test_data_far_from_unit_scale_gets_a_warning_that_says_what_to_do_at_the_users_line() -> None:
    from cnf_lib.matching import FlowMatching

    for objective in (None, FlowMatching()):  # the check is one call deeper for flow matching
        with pytest.warns(UserWarning, match="Standardizer") as record:
            Trainer(small_model(), gaussian_data(64, 0) * 100 + 1000, progress=False, objective=objective)
        assert [w.filename for w in record] == [__file__]  # this line, not a line of cnf_lib


# ------------------------------------------------------------------ a model that learns its grid


def test_the_trainer_measures_the_training_grid_and_warns_when_the_model_departs_from_it() -> None:
    """A linear field A = 2I: the likelihood solves from the data back to the prior, and one RK4
    step of size -1 maps x to (1 - 2 + 2 - 4/3 + 2/3) x = x/3 instead of e⁻² x, so the NLL on that
    grid differs from the adaptive one by a closed form."""

    from cnf_lib import LinearField

    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(0))
    model = CNF(2, field=LinearField(2 * torch.eye(2)))
    trainer = Trainer(model, x, x, iterations=2, lr=1e-12, lr_final=1e-12, kinetic=0.0, eval_every=1,
                      train_settings=dict(method="rk4", step_size=1.0), progress=False, refine_grid=False)
    with pytest.warns(UserWarning, match="begun to fit its grid") as record:
        h = trainer.fit()
    assert {w.filename for w in record} == {__file__}  # the warning names the user's line
    # log p(x) = log N(M^-1 x) - log det M, M = c I: NLL(c) = mean|x|²/(2c²) + log(2π) + 2 log c
    sq = x.double().pow(2).sum(1).mean().item()
    nll = lambda c: sq / (2 * c**2) + math.log(2 * math.pi) + 2 * math.log(c)  # noqa: E731
    assert h["test_nll"][-1] == pytest.approx(nll(math.e**2), abs=1e-4)
    # on the grid the map is x/3 while the log-det is still the integral of tr A = 4 (a constant)
    assert h["test_nll_grid"][-1] == pytest.approx(sq / (2 * 9) + math.log(2 * math.pi) + 4, abs=1e-4)
    # an adaptive training solver has no grid: NaN, no warning
    adaptive = Trainer(CNF(2, field=LinearField(2 * torch.eye(2))), x, x, iterations=1, lr=1e-12, lr_final=1e-12,
                       kinetic=0.0, eval_every=1, train_settings=dict(method="dopri5"), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h2 = adaptive.fit()
    assert math.isnan(h2["test_nll_grid"][-1])


def test_the_trainer_halves_its_grid_step_when_the_model_departs_from_the_grid() -> None:
    """A stiff linear field A = 24 I: one RK4 step of size -h multiplies x by the Taylor polynomial
    P of e^z at z = -24 h, so on a grid of step h the map is x P^(1/h), far from e^-24 x until h is
    small. Every evaluation finds a gap above GRID_GAP_WARNING: the step halves three times and
    stops there."""
    from cnf_lib import LinearField
    from cnf_lib.train import MAX_GRID_REFINEMENTS

    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(0))
    sq = x.double().pow(2).sum(1).mean().item()
    kw = dict(iterations=5, lr=1e-12, lr_final=1e-12, kinetic=0.0, eval_every=1,
              train_settings=dict(method="rk4", step_size=1.0), progress=False, refine_grid=True)
    trainer = Trainer(CNF(2, field=LinearField(24 * torch.eye(2))), x, x, **kw)
    with pytest.warns(UserWarning, match="training goes on with step 0.5"):
        h = trainer.fit()
    assert MAX_GRID_REFINEMENTS == 3 and h["grid_step"] == [1.0, 0.5, 0.25, 0.125, 0.125]
    for step, grid_nll in zip(h["grid_step"], h["test_nll_grid"]):
        z = -24 * step
        c = (1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24) ** (1 / step)
        # NLL = -log N(c x) + the integral of tr A = 48 (the same on any grid: tr A is constant)
        assert grid_nll == pytest.approx(sq * c**2 / 2 + math.log(2 * math.pi) + 48, rel=1e-4)
    # the training solves used the refined grid: four evaluations per RK4 step
    assert h["nfe_forward"] == [4, 8, 16, 32, 32]
    assert trainer.grid_step == 0.125
    # a checkpoint carries the refined step: stop after two iterations, resume, finish, same run
    part = Trainer(CNF(2, field=LinearField(24 * torch.eye(2))), x, x, **kw)
    with pytest.warns(UserWarning, match="fit its grid"):
        part.fit(until=2)
    state = part.state_dict()
    resumed = Trainer(CNF(2, field=LinearField(24 * torch.eye(2))), x, x, **kw)
    resumed.load_state_dict(state)
    assert resumed.grid_step == 0.25
    with pytest.warns(UserWarning, match="fit its grid"):
        assert resumed.fit()["grid_step"] == h["grid_step"]
    assert resumed.history["nfe_forward"] == h["nfe_forward"]
    # refine_grid=False: the grid stays, one warning
    fixed = Trainer(CNF(2, field=LinearField(24 * torch.eye(2))), x, x, **{**kw, "refine_grid": False})
    with pytest.warns(UserWarning, match="A finer training grid"):
        assert fixed.fit()["grid_step"] == [1.0] * 5
    # a gap found at the last iteration is recorded, not acted on (no training is left)
    last = Trainer(CNF(2, field=LinearField(24 * torch.eye(2))), x, x, **{**kw, "iterations": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h1 = last.fit()
    assert h1["grid_step"] == [1.0] and h1["grid_gap"][0] > 1e3 and last.grid_step == 1.0


def test_without_test_data_the_grid_is_checked_on_fixed_training_points() -> None:
    """No test data: the same closed form on the trainer's GRID_CHECK_POINTS training points."""
    from cnf_lib import LinearField
    from cnf_lib.train import GRID_CHECK_POINTS

    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    trainer = Trainer(CNF(2, field=LinearField(24 * torch.eye(2))), x, iterations=3, lr=1e-12, lr_final=1e-12,
                      kinetic=0.0, eval_every=1, train_settings=dict(method="rk4", step_size=1.0), progress=False,
                      refine_grid=True)
    with pytest.warns(UserWarning, match="training goes on with step 0.25"):
        h = trainer.fit()
    points = trainer._check_points
    assert points.shape == (GRID_CHECK_POINTS, 2) and h["test_nll"] == []
    sq = points.double().pow(2).sum(1).mean().item()
    assert h["grid_check_iteration"] == [1, 2, 3] and h["grid_step"] == [1.0, 0.5, 0.25]
    for step, gap in zip(h["grid_step"], h["grid_gap"]):
        z = -24 * step
        c = (1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24) ** (1 / step)
        assert gap == pytest.approx(sq * (c**2 - math.exp(-48)) / 2, rel=1e-4)
    # a trainer with an adaptive training solver has no grid to check
    adaptive = Trainer(CNF(2, field=LinearField(24 * torch.eye(2))), x, iterations=1, lr=1e-12, lr_final=1e-12,
                       kinetic=0.0, eval_every=1, train_settings=dict(method="dopri5"), progress=False)
    assert adaptive.fit()["grid_gap"] == []


def test_the_schedule_is_one_cosine_up_to_lr_period_then_restarts_from_lower_peaks() -> None:
    from cnf_lib.train import RESTART_PEAKS, TrainConfig

    short = TrainConfig(iterations=600)
    cos = [0.5 * (1 + math.cos(math.pi * i / 600)) for i in (0, 150, 300, 599)]
    assert [short.lr_at(i) for i in (0, 150, 300, 599)] == pytest.approx([1e-4 + (3e-2 - 1e-4) * c for c in cos])
    long = TrainConfig(iterations=1500)  # 600, then restarts of 600 and 300
    assert [long.lr_at(i) for i in range(600)] == [short.lr_at(i) for i in range(600)]  # the shorter run, exactly
    assert long.lr_at(600) == pytest.approx(3e-2 * RESTART_PEAKS[0])
    assert long.lr_at(1200) == pytest.approx(3e-2 * RESTART_PEAKS[1])
    assert long.lr_at(1499) == pytest.approx(1e-4, rel=1e-3)  # the last, shorter period still ends at lr_final
    assert long.lr_at(1199) == pytest.approx(1e-4, rel=1e-3)
    assert max(long.lr_at(i) for i in range(600, 1500)) <= 3e-2 * RESTART_PEAKS[0] + 1e-12
    one = TrainConfig(iterations=1500, lr_period=None)  # the old single cosine, on request
    assert one.lr_at(750) == pytest.approx(1e-4 + (3e-2 - 1e-4) * 0.5)
    with pytest.raises(ValueError, match="lr_period must be a positive integer or None"):
        TrainConfig(lr_period=0)


def test_a_longer_run_passes_through_the_shorter_runs_end_bit_for_bit() -> None:
    def run(iterations: int) -> Trainer:
        trainer = make_trainer(iterations=iterations, lr_period=12)
        trainer.fit(until=12)
        return trainer

    short, long = run(12), run(30)
    for a, b in zip(short.model.parameters(), long.model.parameters()):
        assert torch.equal(a, b)
    assert short.history["loss"] == long.history["loss"]
    long.fit()
    assert long.history["lr"][12] == pytest.approx(1e-2 * 0.1) and long.history["lr"][-1] < 2e-3
