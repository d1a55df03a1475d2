"""The book's notebooks: every chapter's .md and .ipynb are in sync, and no .ipynb carries outputs.

The pairing check regenerates each .ipynb from its .md with jupytext in a scratch copy of the book
and compares bytes with the committed file (`jupytext --sync` trusts file times and `--diff`
exits 0 on differences, so neither is used).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CHAPTERS = sorted(p for p in BOOK.glob("*.md") if p.read_text().startswith("---\njupytext:"))
PAGES = sorted(BOOK.glob("*.md"))
JUPYTEXT = Path(sys.executable).with_name("jupytext")


def test_there_are_chapters() -> None:
    assert CHAPTERS, "no chapter book/NN_*.md found"


@pytest.mark.parametrize("md", CHAPTERS, ids=lambda p: p.name)
def test_chapter_has_paired_notebook(md: Path) -> None:
    assert md.with_suffix(".ipynb").exists(), f"{md.name} has no paired .ipynb"


@pytest.mark.parametrize("nb", sorted(BOOK.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_has_no_outputs(nb: Path) -> None:
    cells = json.loads(nb.read_text())["cells"]
    dirty = [i for i, c in enumerate(cells)
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{nb.name} is committed with outputs in cells {dirty}: clear them"


def test_pairs_are_in_sync(tmp_path: Path) -> None:
    shutil.copytree(BOOK, tmp_path / "book")
    shutil.copy(ROOT / "jupytext.toml", tmp_path / "jupytext.toml")
    mds = [str(p.relative_to(ROOT)) for p in CHAPTERS]
    subprocess.run([str(JUPYTEXT), "--to", "ipynb", "--update", "-q", *mds], cwd=tmp_path, check=True,
                   capture_output=True)
    stale = [md for md in mds if (tmp_path / md).with_suffix(".ipynb").read_bytes()
             != (ROOT / md).with_suffix(".ipynb").read_bytes()]
    assert not stale, f"out of sync with their .md (run `jupytext --to ipynb --update` on them): {stale}"


def test_numbered_chapters_are_notebooks() -> None:
    plain = [p.name for p in BOOK.glob("[0-9]*.md") if p not in CHAPTERS]
    assert not plain, f"chapters without a jupytext header (not executed, not tested): {plain}"


def test_every_page_is_in_the_toc() -> None:
    toc = (ROOT / "_toc.yml").read_text()
    missing = [p.stem for p in PAGES if p.stem != "index" and f"book/{p.stem}" not in toc]
    assert not missing, f"chapters missing from _toc.yml: {missing}"


def test_no_page_is_listed_twice_in_the_toc() -> None:
    import re

    files = re.findall(r"file:\s*(\S+)", (ROOT / "_toc.yml").read_text())
    twice = sorted({f for f in files if files.count(f) > 1})
    assert not twice, f"pages listed more than once in _toc.yml: {twice}"
