"""The package layout is the data flow: no module imports from a stage later in the flow.

Imports are read with ``ast`` from every module under ``src/vq2pc`` (top-level imports and
imports inside functions alike), so a new arrow against the flow fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vq2pc"
# The stages in flow order; a module may import from its own stage and from earlier ones.
FLOW = ["core", "data", "models", "latents", "circuit", "baselines", "evaluate", "pipeline", "cli"]
TOP_LEVEL = {"__init__.py", "__main__.py"}  # the package's front door may import any stage


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "vq2pc" and parts[1] in FLOW else None


def _imports(path: Path, root: Path = SRC) -> list[tuple[int, str]]:
    """(line, absolute module) of every ``import``/``from ... import`` in ``path`` (a module under ``root``)."""
    package = ".".join(("vq2pc",) + path.relative_to(root).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append((node.lineno, base))
            out += [
                (node.lineno, f"{base}.{a.name}") for a in node.names if _stage(f"{base}.{a.name}") and not _stage(base)
            ]
    return out


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.relative_to(SRC).as_posix() not in TOP_LEVEL)


def test_every_module_lives_in_a_stage() -> None:
    strays = [p.relative_to(SRC).as_posix() for p in _modules() if p.relative_to(SRC).parts[0] not in FLOW]
    assert not strays, f"modules outside the stage folders {FLOW}: {strays}"


def _late_imports(path: Path, root: Path = SRC) -> list[tuple[int, str]]:
    own = FLOW.index(path.relative_to(root).parts[0])
    return [(line, mod) for line, mod in _imports(path, root) if (s := _stage(mod)) and FLOW.index(s) > own]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.relative_to(SRC).as_posix())
def test_no_import_against_the_flow(path: Path) -> None:
    late = _late_imports(path)
    assert not late, f"{path.relative_to(SRC)} imports from later stages: {late}"


def test_the_checker_catches_late_imports(tmp_path: Path) -> None:
    """The rule itself can fail: absolute, relative and in-function imports of a later stage are flagged."""
    fake = tmp_path / "circuit" / "probe.py"
    fake.parent.mkdir()
    fake.write_text(
        "from vq2pc.pipeline import run_pipeline\nfrom ..evaluate import report\n"
        "from vq2pc import cli\ndef f():\n    import vq2pc.baselines.cm\nfrom .mixture import X\n"
    )
    late = [m for _, m in _late_imports(fake, tmp_path)]
    assert late == ["vq2pc.pipeline", "vq2pc.evaluate", "vq2pc.cli", "vq2pc.baselines.cm"]
