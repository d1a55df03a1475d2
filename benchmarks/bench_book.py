"""How long the book takes to execute: every chapter's time in the last ``make book``.

``make book`` executes every notebook page (every chapter trains its models live) and myst-nb
records each page's execution time in its cache, ``_build/.jupyter_cache``. This reads those
times; it does not execute the book again (that would double the benchmark's time). Run
``make book`` first for fresh numbers: the record's date is reported beside each time. To read
the build of another checkout (for example the clean clone a CI run built), set
``BENCH_BOOK_ROOT`` to that checkout's root.
"""

from __future__ import annotations

import os
from typing import Any

from common import ROOT


def run(quick: bool = False) -> dict[str, Any]:
    root = os.path.abspath(os.environ.get("BENCH_BOOK_ROOT", ROOT))
    cache = os.path.join(root, "_build", ".jupyter_cache")
    if not os.path.isdir(cache):
        print("  no _build/.jupyter_cache: run `make book` first", flush=True)
        return dict(pages=[], total_seconds=None, note="no book build found: run `make book` first")
    from jupyter_cache import get_cache

    pages = []
    for record in get_cache(cache).list_cache_records():
        seconds = (record.data or {}).get("execution_seconds")
        if seconds is None or not os.path.exists(record.uri):
            continue
        pages.append(dict(page=os.path.relpath(record.uri, root), seconds=float(seconds),
                          executed=record.created.strftime("%Y-%m-%d %H:%M")))
    pages.sort(key=lambda p: p["page"])
    total = sum(p["seconds"] for p in pages)
    print(f"  {len(pages)} pages, {total:.0f} s in all", flush=True)
    return dict(pages=pages, total_seconds=total, note="from the last `make book` (myst-nb's cache)")
