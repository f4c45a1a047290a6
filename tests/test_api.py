"""The public API: every name in ``vq2pc.__all__`` imports, ``dir(vq2pc)`` lists them, the version is the
project's, and the typing marker ships."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import vq2pc

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = [
    "train_vqvae",
    "train_prior",
    "finetune_distill",
    "distill",
    "select",
    "MixtureCircuit",
    "ExactModel",
    "load_dataset",
    "VQVAE",
    "PixelCNNPrior",
    "TransformerPrior",
    "em_refine",
    "export_cirkit",
    "export_npz",
    "RunConfig",
    "load_config",
    "run_pipeline",
]


@pytest.mark.parametrize("name", vq2pc.__all__)
def test_every_public_name_imports(name: str) -> None:
    value = getattr(vq2pc, name)
    assert value is not None and name in dir(vq2pc)
    if name != "__version__":  # the object is the one of its home module
        assert getattr(importlib.import_module(vq2pc._EXPORTS[name]), name) is value


def test_the_entry_points_are_public() -> None:
    assert set(ENTRY_POINTS) <= set(vq2pc.__all__)
    assert len(set(vq2pc.__all__)) == len(vq2pc.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        vq2pc.nonexistent  # noqa: B018


def test_import_stays_lazy() -> None:
    """``import vq2pc`` loads no model code (the exports are imported on first use)."""
    code = "import sys, vq2pc; print(any(m.startswith('vq2pc.models') or m == 'torch' for m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONPATH": str(ROOT / "src")}
    )
    assert out.stdout.strip() == "False"


def test_version_is_the_projects_and_py_typed_ships() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert vq2pc.__version__ == project["project"]["version"]
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["vq2pc"]
    assert (Path(vq2pc.__file__).parent / "py.typed").is_file()
