"""The examples run: the notebooks (executed with nbclient, tiny settings) and the worked example
``examples/external_vq.py`` (docs/external-vq.md), whose circuit is a normalized, exact mixture of what the
external decoder decodes."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import MNIST_DIR

pytestmark = pytest.mark.slow


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE = EXAMPLES / "external_vq.py"
NOTEBOOK_TIMEOUT = 300  # seconds per cell; each notebook takes well under a minute on an idle 2-core machine


def _run_notebook(name: str, monkeypatch: pytest.MonkeyPatch) -> object:
    nbclient = pytest.importorskip("nbclient", reason="optional extra not installed: pip install -e '.[notebooks]'")
    import nbformat

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it: tiny models run fastest on one thread
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        f"{name} is committed with outputs"
    )
    nbclient.NotebookClient(
        notebook, timeout=NOTEBOOK_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
    ).execute()
    return notebook


def _images_shown(notebook: object) -> int:
    return sum("image/png" in out.get("data", {}) for cell in notebook.cells for out in cell.get("outputs", []))


def test_quickstart_notebook_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trains, distills, fine-tunes and queries on digits; its own asserts check +FT < DMRS < uniform BPD."""
    notebook = _run_notebook("quickstart.ipynb", monkeypatch)
    assert _images_shown(notebook) == 1


def test_mnist_queries_notebook_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without VQ2PC_CIRCUIT the notebook trains a tiny model on 500 MNIST images, found as users find them."""
    if MNIST_DIR is None:
        pytest.skip("real MNIST not found: set $VQ2PC_DATA or put it in ../shared/data/mnist beside the repository")
    monkeypatch.setenv("VQ2PC_DATA", str(MNIST_DIR))
    monkeypatch.delenv("VQ2PC_CIRCUIT", raising=False)
    notebook = _run_notebook("mnist_queries.ipynb", monkeypatch)
    assert _images_shown(notebook) == 3


@pytest.fixture(scope="module")
def example():
    pytest.importorskip("vector_quantize_pytorch", reason="optional extra not installed: pip install -e '.[external]'")
    spec = importlib.util.spec_from_file_location("external_vq", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    cfg = module.ExampleConfig(vq_steps=150, prior_epochs=3, N=64)
    return module, module.build(cfg)


def test_queries_are_exact_and_beat_uniform(example) -> None:
    module, d = example
    out = module.queries(d)
    assert out["N"] == 64
    assert math.isfinite(out["test_bpd"]) and out["test_bpd"] < math.log2(17) == out["uniform_bpd"]
    assert out["completion_keeps_observed"]
    assert torch.isfinite(d.circuit.log_prob(d.x_test)).all()


def test_circuit_is_the_mixture_of_the_external_decoder(example) -> None:
    module, d = example
    with torch.no_grad():
        leaf = d.vq.decode(d.selection.codes)  # [N,S] Gaussians straight from the external model
    x, top = d.x_test[:16], module.top_half_mask()
    per = leaf.log_prob(x[:, None, :])  # [B,N,S]
    log_w = -math.log(len(d.selection))  # uniform weights (paper Eq. 2)
    joint = torch.logsumexp(per.sum(-1) + log_w, 1)
    marginal = torch.logsumexp(per[..., top].sum(-1) + log_w, 1)  # hidden pixels integrate to 1
    torch.testing.assert_close(d.circuit.log_prob(x), joint, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(d.circuit.log_prob(x, top), marginal, rtol=1e-4, atol=1e-3)


def test_marginals_normalize(example) -> None:
    _, d = example
    S = d.circuit.num_variables
    none = d.circuit.log_prob(d.x_test[:3], torch.zeros(S, dtype=torch.bool))
    torch.testing.assert_close(none, torch.zeros(3))  # the marginal over no pixel is log 1
    mean, std = d.circuit.leaf.tensors()["mean"], d.circuit.leaf.tensors()["std"]  # [N,S]
    for pixel in (0, 27):  # a corner and a central pixel: ∫ p(x_i) dx_i = 1 (grid: 10 stds out, 20 points per std)
        m, s = mean[:, pixel], std[:, pixel]
        lo, hi = float((m - 10 * s).min()), float((m + 10 * s).max())
        grid = torch.linspace(lo, hi, int((hi - lo) / float(s.min()) * 20) + 1)
        x = torch.zeros(len(grid), S)
        x[:, pixel] = grid
        only = torch.zeros(S, dtype=torch.bool)
        only[pixel] = True
        density = d.circuit.log_prob(x, only).double().exp()
        assert float(torch.trapezoid(density, grid.double())) == pytest.approx(1.0, abs=1e-3)
