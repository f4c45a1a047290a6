"""The documentation site builds without a warning, and the Python examples of its pages run.

Every ```python block of a page under docs/ runs, in order, in one namespace per page, unless the line
before its fence is ``<!-- docs-test: skip (REASON) -->`` (an excerpt, a signature sketch, or an example
that needs MNIST or long training). The README's blocks are run by tests/test_readme.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP = re.compile(r"^<!-- docs-test: skip \((?P<reason>[^)]+)\) -->$")
FENCE = re.compile(r"^```python[ \t]*$")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, body, skip reason or None)`` of every ```python block of a Markdown text, in order."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            start = i
            j = i + 1
            while j < len(lines) and not re.match(r"^```[ \t]*$", lines[j]):
                j += 1
            if j == len(lines):
                raise ValueError(f"unclosed ```python block at line {start + 1}")
            marker = SKIP.match(lines[start - 1].strip()) if start > 0 else None
            blocks.append((start + 1, "\n".join(lines[start + 1 : j]) + "\n", marker["reason"] if marker else None))
            i = j
        i += 1
    return blocks


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def runnable_pages() -> list[Path]:
    return [p for p in pages() if any(reason is None for _, _, reason in python_blocks(p.read_text()))]


def test_block_parser_reads_fences_and_skip_markers() -> None:
    text = "x\n```python\na = 1\n```\n<!-- docs-test: skip (needs MNIST) -->\n```python\nb = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(2, "a = 1\n", None), (6, "b = 2\n", "needs MNIST")]
    with pytest.raises(ValueError, match="unclosed"):
        python_blocks("```python\na = 1\n")


def test_every_skip_marker_precedes_a_python_block() -> None:
    """A marker that skips nothing (moved, or before another language) is a stale marker."""
    for page in pages():
        lines = page.read_text().splitlines()
        for n, line in enumerate(lines):
            if "docs-test:" in line:
                assert SKIP.match(line.strip()), f"{page}:{n + 1}: malformed marker {line!r}"
                assert n + 1 < len(lines) and FENCE.match(lines[n + 1]), f"{page}:{n + 1}: marker not before ```python"


def test_the_pages_have_runnable_examples() -> None:
    names = {p.relative_to(DOCS).as_posix() for p in runnable_pages()}
    assert {"getting-started.md", "concepts/finetune.md"} <= names, names


@pytest.mark.parametrize("page", runnable_pages(), ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples may write files
    namespace: dict[str, object] = {"__name__": "docs"}
    for line, body, reason in python_blocks(page.read_text()):
        if reason is None:
            # The file name given to compile() names the failing page and line in the traceback.
            code = compile(body, f"{page.relative_to(ROOT)} block at line {line}", "exec")
            exec(code, namespace)  # noqa: S102  (running the documentation is the point)


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # The API reference was generated from the docstrings, and the changelog was included.
    assert "MixtureCircuit" in (site / "reference" / "circuit" / "index.html").read_text()
    assert "Unreleased" in (site / "changelog" / "index.html").read_text()
