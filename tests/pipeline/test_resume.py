"""Same seed, same numbers; a run killed with SIGKILL (during VQ-VAE training, then during prior training)
and re-run ends with the report.json of an uninterrupted run. Real `python -m vq2pc run` processes on a
tiny digits config (64 images per split, K=4 on a 2x2 grid, 8 channels, no baselines or figures)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import finish, kill_during, start_python

pytestmark = pytest.mark.slow

EPOCHS = 8
TINY = f"""\
dataset: digits
limit: 64
leaves: [gaussian]
models:
  - name: m
    K: 4
    D: 4
    hidden: 8
    res_blocks: 0
    prior_hidden: 8
    prior_layers: 1
    strategies: [topk, sample]
    N: [4]
    em_strategies: []
baselines: {{einet: false, cm: false}}
experiments: {{usage: false, inpainting: false, samples: false, correlation: false, bpd_draws: 1}}
vqvae_train: {{epochs: {EPOCHS}, patience: {EPOCHS}, lr: 0.002, batch_size: 16, progress: false}}
prior_train: {{epochs: {EPOCHS}, patience: {EPOCHS}, lr: 0.002, batch_size: 16, progress: false}}
"""


def start(root: Path, out: str) -> subprocess.Popen:
    return start_python(["-m", "vq2pc", "run", "--config", "tiny.yaml", "--out", out], cwd=root)


def numbers(root: Path, out: str) -> dict[str, Any]:
    """report.json without wall times, with the run folder's name replaced."""

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if "seconds" not in k}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v.replace(f"{out}/", "OUT/") if isinstance(v, str) else v

    return strip(json.loads((root / out / "report.json").read_text()))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("resume")
    (d / "tiny.yaml").write_text(TINY)
    return d


@pytest.fixture(scope="module")
def reference(root: Path) -> dict[str, Any]:
    """Two uninterrupted runs at once (the interrupted one needs a reference)."""
    procs = [start(root, "run-a"), start(root, "run-b")]
    for p in procs:
        finish(p)
    return numbers(root, "run-a")


def test_same_seed_same_numbers(root: Path, reference: dict[str, Any]) -> None:
    assert numbers(root, "run-b") == reference
    assert reference["models"] and all(r["test_bpd"] > 0 for r in reference["models"])


def test_killed_run_resumes_to_the_same_report(root: Path, reference: dict[str, Any]) -> None:
    ckpt = root / "run-killed" / "gaussian" / "m"
    epochs = kill_during(start(root, "run-killed"), ckpt / "vqvae.pt", "vqvae")
    assert 1 <= epochs < EPOCHS, "the kill did not land during VQ-VAE training"
    assert not (ckpt / "prior.pt").exists() and not (root / "run-killed" / "report.json").exists()
    epochs = kill_during(start(root, "run-killed"), ckpt / "prior.pt", "prior")
    assert 1 <= epochs < EPOCHS, "the kill did not land during prior training"
    assert not (root / "run-killed" / "report.json").exists()
    finish(start(root, "run-killed"))
    assert numbers(root, "run-killed") == reference
