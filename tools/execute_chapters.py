"""Execute every chapter once, fail on the first error in each, and keep the outputs for the book.

Usage: python tools/execute_chapters.py [--jobs 2] [--cache _build/.jupyter_cache] [CHAPTER.md ...]

Each chapter (``book/NN_slug.md``, read exactly as the book's build reads it) runs top to bottom in
a fresh kernel in ``book/``, like ``pytest --nbval-lax``: a cell that raises — a hidden assert
above all — fails the chapter, and the failing cell and its traceback are printed. A chapter that
passes is stored in the jupyter-cache that ``make book`` reads (``execute_notebooks: cache``), so
the strict build renders these outputs instead of running every chapter a second time.

Chapters run ``--jobs`` at a time, longest first. Each kernel uses one torch thread
(``OMP_NUM_THREADS=1``, set by the Makefile), so two jobs on two cores do not slow each other down;
the chapters' timings are CPU times (``time.process_time``), not wall times.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# longest first (seconds measured on the 2-core CI machine), so the last job to finish is short
ORDER = ["08", "05", "07", "04", "06", "03", "02", "01"]


def read_chapter(path: Path):
    """The notebook the book's build reads from ``path`` (myst-nb's own reader, same hash)."""
    import yaml
    from myst_nb.core.config import NbParserConfig
    from myst_nb.core.read import create_nb_reader
    from myst_parser.config.main import MdParserConfig

    book = yaml.safe_load((ROOT / "_config.yml").read_text())
    extensions = book.get("parse", {}).get("myst_enable_extensions", [])
    text = path.read_text()
    reader = create_nb_reader(str(path), MdParserConfig(enable_extensions=set(extensions)), NbParserConfig(), text)
    if reader is None:
        raise SystemExit(f"{path} is not a MyST notebook (its jupytext header is missing)")
    return reader.read(text)


def execute(path: str, timeout: int):
    """Run one chapter in a fresh kernel in its folder; return (notebook, seconds, error text or None)."""
    from jupyter_cache.executors.utils import single_nb_execution

    chapter = Path(path)
    nb = read_chapter(chapter)
    result = single_nb_execution(nb, cwd=str(chapter.parent), timeout=timeout, allow_errors=False)
    error = None
    if result.err is not None:
        error = result.exc_string or repr(result.err)
    return nb, result.time, error


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("chapters", nargs="*", type=Path, help="default: every book/[0-9]*.md")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=900, help="seconds a cell may run")
    ap.add_argument("--cache", type=Path, default=ROOT / "_build" / ".jupyter_cache")
    args = ap.parse_args()

    chapters = args.chapters or sorted((ROOT / "book").glob("[0-9]*.md"))
    rank = {p: (ORDER.index(p.name[:2]) if p.name[:2] in ORDER else -1) for p in chapters}
    chapters = sorted(chapters, key=lambda p: rank[p])

    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    cache = get_cache(str(args.cache))
    failed = []
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(execute, str(p), args.timeout): p for p in chapters}
        for future in as_completed(futures):
            chapter = futures[future]
            nb, seconds, error = future.result()
            name = chapter.relative_to(ROOT) if chapter.is_relative_to(ROOT) else chapter
            if error is None:
                cache.cache_notebook_bundle(
                    CacheBundleIn(nb, str(chapter.resolve()), data={"execution_seconds": seconds}),
                    check_validity=False,
                    overwrite=True,
                )
                print(f"passed  {name}  {seconds:6.0f} s", flush=True)
            else:
                failed.append(str(name))
                print(f"FAILED  {name}  {seconds:6.0f} s\n{error}", flush=True)
    print(f"{len(chapters) - len(failed)} of {len(chapters)} chapters passed in {time.perf_counter() - start:.0f} s")
    if failed:
        print("failed: " + ", ".join(failed))
        return 1
    if not args.chapters:  # the whole book ran with this library: make book may render it as is
        (args.cache / "executed-by-make-test").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
