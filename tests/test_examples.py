"""The worked example ``examples/external_vq.py`` (docs/external-vq.md) runs, at tiny size, and its
circuit is a normalized, exact mixture of what the external decoder decodes."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

pytest.importorskip("vector_quantize_pytorch", reason="optional extra not installed: pip install -e '.[external]'")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "external_vq.py"


@pytest.fixture(scope="module")
def example():
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
