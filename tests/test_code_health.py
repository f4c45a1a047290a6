"""Code-health limits of the project's Python: no function over 60 lines, no file over 400 lines.

Read with ``ast`` from every ``.py`` file under ``src/``, ``benchmarks/``, ``tests/`` and ``examples/``; a function's
length runs from its ``def`` line to its last line (decorators not counted), nested functions and
methods included. A failure lists every function and file over its limit.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("src", "benchmarks", "tests", "examples")
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400


def _files(root: Path = ROOT) -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (root / folder).rglob("*.py"))


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """``(name, lines)`` of every function or method in ``path`` longer than ``limit`` lines."""
    tree = ast.parse(path.read_text(), str(path))
    functions = (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return [(f.name, n) for f in functions if (n := f.end_lineno - f.lineno + 1) > limit]


def _report(over: list[str], what: str, limit: int) -> str:
    return f"{len(over)} {what} over {limit} lines (split them into helpers with one job each):\n" + "\n".join(over)


def test_no_function_over_60_lines() -> None:
    over = [
        f"{path.relative_to(ROOT).as_posix()}: {name} ({n} lines)"
        for path in _files()
        for name, n in long_functions(path)
    ]
    assert not over, _report(over, "functions", MAX_FUNCTION_LINES)


def test_no_file_over_400_lines() -> None:
    over = [
        f"{path.relative_to(ROOT).as_posix()} ({n} lines)"
        for path in _files()
        if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES
    ]
    assert not over, _report(over, "files", MAX_FILE_LINES)


def test_the_checker_measures_from_def_to_last_line(tmp_path: Path) -> None:
    """The rule itself can fail: a 61-line function and a 61-line method are flagged; a 60-line function
    is not, its decorator not counted."""
    body = "    x = 1\n"
    method = textwrap.indent("def method(self):\n" + body * 60, "    ")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "@staticmethod\ndef fits():\n" + body * 59 + "def too_long():\n" + body * 60 + "class A:\n" + method
    )
    assert long_functions(probe) == [("too_long", 61), ("method", 61)]
