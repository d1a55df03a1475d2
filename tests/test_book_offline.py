"""The built book needs no network: no page loads a script or a stylesheet from another host.

Formulas are typeset by MathJax, which `sphinx-mathjax-offline` copies into
``_build/html/_static/mathjax``; a page that loaded MathJax (or anything else) from a CDN would
show raw TeX to a reader without a network. This test reads every page of ``_build/html`` (it
runs after ``make book``; without a build it is skipped) and fails on any ``<script src=...>`` or
``<link href=...>`` that points to another host.
"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest

HTML = Path(__file__).resolve().parents[1] / "_build" / "html"
REMOTE = ("http://", "https://", "//")


class _Loads(HTMLParser):
    """Collects the addresses a page loads: ``<script src>`` and ``<link href>``."""

    def __init__(self) -> None:
        super().__init__()
        self.addresses: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href"}.get(tag)
        for name, value in attrs:
            if name == wanted and value:
                self.addresses.append((tag, value.strip()))

    handle_startendtag = handle_starttag


def remote_loads(page: Path) -> list[str]:
    """The ``<script src>`` / ``<link href>`` addresses of ``page`` that name another host."""
    parser = _Loads()
    parser.feed(page.read_text(encoding="utf-8", errors="replace"))
    return [f"<{tag}> {url}" for tag, url in parser.addresses if url.lower().startswith(REMOTE)]


def test_remote_loads_detects_hosts(tmp_path: Path) -> None:
    page = tmp_path / "p.html"
    page.write_text(
        '<script src="_static/mathjax/tex-chtml.js"></script>'
        '<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>'
        '<link rel="stylesheet" href="//fonts.example.org/x.css"/>'
        '<link rel="stylesheet" href="_static/styles.css">'
        '<a href="https://example.org">a link is not a load</a>'
    )
    assert remote_loads(page) == [
        "<script> https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js",
        "<link> //fonts.example.org/x.css",
    ]


def _pages() -> list[Path]:
    return sorted(HTML.rglob("*.html")) if HTML.is_dir() else []


@pytest.mark.skipif(not (HTML / "index.html").is_file(),
                    reason="_build/html is missing: run `make book` first to check the built pages")
def test_built_pages_load_nothing_from_other_hosts() -> None:
    pages = _pages()
    assert pages, f"no .html pages under {HTML}"
    offenders = {str(p.relative_to(HTML)): bad for p in pages if (bad := remote_loads(p))}
    assert not offenders, f"pages that load from another host (they break offline): {offenders}"


@pytest.mark.skipif(not (HTML / "index.html").is_file(),
                    reason="_build/html is missing: run `make book` first to check the built pages")
def test_mathjax_is_served_locally() -> None:
    assert (HTML / "_static" / "mathjax" / "tex-chtml.js").is_file(), \
        "no local MathJax in _build/html/_static/mathjax (is sphinx-mathjax-offline enabled?)"
