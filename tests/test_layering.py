"""The import graph of cnf_lib reads like DESIGN.md's layers: the core imports no data set,
single-cell, time-course, metrics or plotting module, and the simulator stays apart from the model."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cnf_lib"
CORE = {"checks", "trace", "fields", "cnf", "objectives", "train"}


def imports(module: str) -> set[str]:
    """The cnf_lib modules ``module`` imports (at any depth of its code, lazy imports included)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cnf_lib."):
            found.add(node.module.split(".")[1])
    return found


def test_the_core_imports_only_the_core() -> None:
    for module in CORE:
        assert imports(module) <= CORE, (module, imports(module) - CORE)


def test_the_simulator_and_the_baselines_stay_apart_from_the_trajectory_model() -> None:
    assert "timecourse" not in imports("simulation") and "baselines" not in imports("simulation")
    assert not {"simulation", "baselines"} & imports("timecourse")


def test_no_module_imports_the_book_or_the_benchmarks() -> None:
    for path in PACKAGE.glob("*.py"):
        text = path.read_text()
        assert "import benchmarks" not in text and "from benchmarks" not in text, path.name
