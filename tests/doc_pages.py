"""The documentation's pages and their code blocks, for the tests that run them: the README (the
front page) and every page of the site under docs/ (built by ``mkdocs build``, see mkdocs.yml)."""
from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def pages() -> list[str]:
    """The README and every Markdown page of the site, as paths relative to the repository root."""
    return ["README.md"] + sorted(p.relative_to(ROOT).as_posix() for p in DOCS.rglob("*.md"))


def page(path: str) -> str:
    """One page's text (``"docs/layout.md"``, ``"README.md"``)."""
    return (ROOT / path).read_text()


def code_blocks(text: str, lang: str = r"\w*") -> list[str]:
    """The fenced code blocks of a page in the language ``lang`` (a regular expression; any
    language or none by default), in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, re.S | re.M)


def file_block(path: str) -> str:
    """The one code block on the site that starts with the comment ``# <path>`` (a file a page shows
    whole, such as ``mypkg/layers.py``)."""
    found = [b for p in pages() for b in code_blocks(page(p)) if b.startswith(f"# {path}\n")]
    (block,) = found
    return block
