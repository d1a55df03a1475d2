"""Numbers in the book's prose: ``myst_nb.glue`` plus a record for the determinism check.

Chapters glue every number they state (``{glue:text}`name:.3f``` in the prose). This wrapper
also appends each value to a JSON-lines file when the environment variable ``CNF_LIB_GLUE_LOG``
names a folder (the Makefile sets it whenever it executes the chapters), so that
``tools/compare_glue.py`` can check that two executions of the book (``make reproduce``)
glued the same numbers: the same seed must give the same numbers. Values that
legitimately vary between runs (wall-clock times and speed ratios) are marked ``varies=True``
and are recorded but not compared.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["glue", "GLUE_LOG_ENV"]

GLUE_LOG_ENV = "CNF_LIB_GLUE_LOG"


def _plain(value: Any) -> Any:
    """A JSON-able version of ``value`` (numbers, strings, lists of them); None if not possible."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)[:200]


def glue(name: str, value: Any, display: bool = False, varies: bool = False) -> None:
    """Glue ``value`` under ``name`` for the book, and record it for the determinism check.

    Arguments:
        name: the glue key, used in the prose as ``{glue:text}`name```.
        value: the value (a number, a string, a figure, a table...).
        display: show the value in the cell output as well.
        varies: the value changes from run to run by nature (a wall-clock time, a speed ratio);
            it is recorded but not compared between runs.
    """
    from myst_nb import glue as myst_glue

    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()  # NumPy / torch scalars: myst-nb formats only plain Python numbers
    myst_glue(name, value, display=display)
    folder = os.environ.get(GLUE_LOG_ENV)
    if folder:
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        record = {"name": name, "value": _plain(value), "varies": bool(varies), "pid": os.getpid()}
        with open(path / "glue.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
