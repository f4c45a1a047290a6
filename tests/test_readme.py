"""The README's examples are tests: its Python blocks run, and its commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def fenced_blocks(text: str, language: str) -> list[str]:
    """The bodies of the ```<language> fenced blocks of a Markdown text, in order."""
    return re.findall(rf"^```{language}[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.DOTALL | re.MULTILINE)


def pytest_command(line: str) -> str | None:
    """``python -m pytest ...`` in a shell line (``python3`` counts as ``python``), whitespace-normalized."""
    match = re.search(r"\bpython3?\s+-m\s+pytest\b[^&;|\n]*", line)
    return None if match is None else " ".join(match.group(0).replace("python3", "python", 1).split())


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the examples write files (a saved circuit) into the working directory
    blocks = fenced_blocks(README, "python")
    assert blocks, "README.md has no ```python example"
    namespace: dict[str, object] = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        # The file name given to compile() names the failing block in the traceback.
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102  (running the README is the point)


def test_readme_shows_run_and_test_commands() -> None:
    shell = "\n".join(fenced_blocks(README, "bash"))
    assert re.search(r"^\s*(.*&&\s*)?vq2pc run\b", shell, flags=re.MULTILINE), "README shows no `vq2pc run`"
    commands = [c for c in map(pytest_command, shell.splitlines()) if c]
    assert commands, "README shows no `python -m pytest` test command"


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme_cmds = {c for c in map(pytest_command, "\n".join(fenced_blocks(README, "bash")).splitlines()) if c}
    ci_cmds = {
        c for c in map(pytest_command, (line for line in ci.splitlines() if not line.lstrip().startswith("#"))) if c
    }
    assert ci_cmds, ".ci/run runs no `python -m pytest`"
    assert ci_cmds == readme_cmds, (ci_cmds, readme_cmds)
