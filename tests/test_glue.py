"""cnf_lib.glue records values for tools/compare_glue.py, which catches runs that disagree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cnf_lib.glue import GLUE_LOG_ENV, glue

ROOT = Path(__file__).resolve().parents[1]


def record(folder: Path, monkeypatch: pytest.MonkeyPatch, values: dict, varies: frozenset[str] = frozenset()) -> None:
    monkeypatch.setenv(GLUE_LOG_ENV, str(folder))
    for name, value in values.items():
        glue(name, value, varies=name in varies)


def compare(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "compare_glue.py"), str(a), str(b)],
                          capture_output=True, text=True)


def test_glue_writes_a_record_per_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record(tmp_path, monkeypatch, {"nll": 1.234, "n": 3})
    lines = [json.loads(s) for s in (tmp_path / "glue.jsonl").read_text().splitlines()]
    assert [(r["name"], r["value"]) for r in lines] == [("nll", 1.234), ("n", 3)]


def test_identical_runs_pass_and_different_runs_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record(tmp_path / "a", monkeypatch, {"nll": 1.5, "secs": 10.0}, varies={"secs"})
    record(tmp_path / "b", monkeypatch, {"nll": 1.5, "secs": 12.0}, varies={"secs"})
    record(tmp_path / "c", monkeypatch, {"nll": 1.6, "secs": 10.0}, varies={"secs"})
    ok = compare(tmp_path / "a", tmp_path / "b")
    assert ok.returncode == 0 and "1 glued values identical" in ok.stdout
    bad = compare(tmp_path / "a", tmp_path / "c")
    assert bad.returncode == 1 and "nll" in bad.stdout


def test_a_name_missing_from_one_run_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record(tmp_path / "a", monkeypatch, {"x": 1.0, "y": 2.0})
    record(tmp_path / "b", monkeypatch, {"x": 1.0})
    res = compare(tmp_path / "a", tmp_path / "b")
    assert res.returncode == 1 and "only one run" in res.stdout


def test_missing_logs_mean_nothing_to_compare(tmp_path: Path) -> None:
    res = compare(tmp_path / "none", tmp_path / "neither")
    assert res.returncode == 0 and "nothing to compare" in res.stdout


def test_numpy_and_torch_scalars_are_recorded_as_plain_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    import torch

    record(tmp_path, monkeypatch, {"a": np.float64(0.5), "b": torch.tensor(2.0), "c": np.int64(3)})
    values = [json.loads(s)["value"] for s in (tmp_path / "glue.jsonl").read_text().splitlines()]
    assert values == [0.5, 2.0, 3] and all(type(v) in (float, int) for v in values)
