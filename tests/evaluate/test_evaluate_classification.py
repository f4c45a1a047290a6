"""The classification experiment's numbers and figures on a tiny class-aware circuit."""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import torch

from vq2pc.circuit.classes import ClassMixture
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core.leaves import Gaussian
from vq2pc.evaluate import classification as ec
from vq2pc.evaluate.classifier import ClassifierConfig, SmallCNN

SHAPE = (1, 4, 4)


def _model() -> ClassMixture:
    g = torch.Generator().manual_seed(0)
    leaf = Gaussian(torch.rand(6, 16, generator=g), 0.1 + 0.1 * torch.rand(6, 16, generator=g))
    log_w = torch.full((6, 2), -6.0)
    log_w[:3, 0] = log_w[3:, 1] = 0.0
    return ClassMixture(MixtureCircuit(leaf, torch.zeros(6)), log_w)


def test_calibration_by_hand() -> None:
    post = torch.tensor([[0.95, 0.05], [0.55, 0.45], [0.15, 0.85], [0.75, 0.25]], dtype=torch.float64).log()
    labels = torch.tensor([0, 1, 1, 0])
    out = ec.calibration(post, labels, bins=10)
    assert out["accuracy"] == 0.75
    # one image per bin: 0.95 (correct), 0.55 (wrong), 0.85 (correct), 0.75 (correct)
    assert math.isclose(out["ece"], (0.05 + 0.55 + 0.15 + 0.25) / 4, abs_tol=1e-9)
    assert math.isclose(
        out["nll"], -(math.log(0.95) + math.log(0.45) + math.log(0.85) + math.log(0.75)) / 4, abs_tol=1e-9
    )
    assert sum(out["reliability"]["count"]) == 4


def test_metrics_agree_with_the_posterior_and_figures_are_written(tmp_path) -> None:
    model = _model()
    labels = torch.arange(40) % 2
    x = model.sample(40, c=labels, generator=torch.Generator().manual_seed(1)).clamp(0, 0.999)
    masks = ec.classification_masks(SHAPE, 40, (0.3, 0.9), ("left", "center"), torch.Generator().manual_seed(2))
    assert list(masks) == ["full", "random 30%", "random 90%", "left", "center"]
    cnn = SmallCNN(ClassifierConfig(SHAPE, 2))
    out, full = ec.classification_metrics({"DMRS": model}, x, labels, masks, "gaussian", 256, SHAPE, cnn)
    want = (model.class_posterior(x, masks["random 30%"]).argmax(1) == labels).float().mean().item()
    assert math.isclose(out["circuit"]["DMRS"]["random 30%"]["accuracy"], want, abs_tol=1e-9)
    assert out["circuit"]["DMRS"]["full"]["accuracy"] > 0.9  # the classes own separate components
    assert set(out["cnn_mean"]) == set(masks) and set(out["cnn_circuit"]["DMRS"]) == set(masks)
    assert 0.85 < out["hidden_fraction"]["random 90%"] < 0.95 and out["hidden_fraction"]["left"] == 0.5
    assert set(full) == {"DMRS", "CNN"} and full["DMRS"].shape == (40, 2)
    assert ec.plot_classification(out, tmp_path / "a.png").stat().st_size > 0
    keep = ("full", "random 30%", "random 90%")
    random_only = {
        "hidden_fraction": {k: out["hidden_fraction"][k] for k in keep},
        "cnn_mean": {k: out["cnn_mean"][k] for k in keep},
        **{part: {"DMRS": {k: out[part]["DMRS"][k] for k in keep}} for part in ("circuit", "cnn_circuit")},
    }
    one_panel = ec.plot_classification(random_only, tmp_path / "c.png")  # no regions: one panel, narrower
    assert 0 < mpimg.imread(one_panel).shape[1] < mpimg.imread(tmp_path / "a.png").shape[1]
    assert ec.plot_calibration(full, labels, tmp_path / "b.png").stat().st_size > 0
    panels = ec.class_panels(model, x[:2], masks["left"][:2], "gaussian", 256, SHAPE, per_class=3)
    assert len(panels) == 2 * (3 + 1 + 4)
    assert ec.plot_class_samples({"DMRS": panels}, 8, 2, tmp_path / "c.png").stat().st_size > 0
