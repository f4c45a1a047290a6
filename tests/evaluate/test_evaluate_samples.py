"""KL from uniform, the digits classifier, class balance and sample grids."""

from __future__ import annotations

import math

import pytest
import torch

from vq2pc.circuit import MixtureCircuit
from vq2pc.core.leaves import Categorical, Gaussian
from vq2pc.data import load_dataset
from vq2pc.evaluate import (
    class_balance,
    classify,
    draw_samples,
    kl_from_uniform,
    kl_std,
    label_histogram,
    load_classifier,
    plot_samples,
    train_classifier,
)
from vq2pc.evaluate.samples import DATA_KEY, TEST_KEY
from vq2pc.models.train import TrainConfig


def test_kl_from_uniform_extremes() -> None:
    assert kl_from_uniform([5, 5, 5, 5]) == pytest.approx(0.0, abs=1e-12)
    assert kl_from_uniform([0, 0, 7, 0, 0]) == pytest.approx(math.log(5))
    assert kl_from_uniform(torch.tensor([1.0, 3.0])) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    with pytest.raises(ValueError):
        kl_from_uniform([0, 0])
    with pytest.raises(ValueError):
        kl_from_uniform([1, -1, 3])


def test_kl_std_matches_the_delta_method_and_the_uniform_chi_square() -> None:
    # skewed histogram, large n: the estimate is ~normal with std sqrt(Var_p[log p] / n)
    p = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.5], dtype=torch.float64)
    n = 20_000
    delta = math.sqrt(float((p * p.log() ** 2).sum() - (p * p.log()).sum() ** 2) / n)
    assert kl_std((p * n).round().tolist()) == pytest.approx(delta, rel=0.1)
    # uniform histogram: n·2·KL ~ chi-square with C-1 degrees of freedom, std sqrt(2 (C-1)) / (2 n)
    assert kl_std([1000] * 10) == pytest.approx(math.sqrt(18) / 20_000, rel=0.15)
    assert kl_std([5, 0, 0]) == 0.0  # one class: every resampled histogram is the same
    with pytest.raises(ValueError):
        kl_std([0, 0])


def test_label_histogram_carries_counts_kl_and_its_noise() -> None:
    h = label_histogram(torch.tensor([0, 1, 1, 2, 2, 2]), 4)
    assert h["hist"] == [1, 2, 3, 0] and h["n"] == 6
    assert h["kl_from_uniform"] == pytest.approx(kl_from_uniform([1, 2, 3, 0]))
    assert h["kl_std"] == pytest.approx(kl_std([1, 2, 3, 0])) and h["kl_std"] > 0


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    splits = load_dataset("digits")
    path = tmp_path_factory.mktemp("clf") / "classifier.pt"
    cfg = TrainConfig(epochs=10, lr=1e-2, batch_size=128, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is ~10x faster on a loaded shared machine
    try:
        model, acc = train_classifier(splits, cfg, checkpoint=path)
    finally:
        torch.set_num_threads(threads)
    return splits, model, acc, path


def test_classifier_learns_digits_and_reloads(digits_classifier) -> None:
    splits, model, acc, path = digits_classifier
    assert acc > 0.8
    again = load_classifier(path)
    assert torch.equal(classify(again, splits.test_x, splits.levels), classify(model, splits.test_x, splits.levels))
    with pytest.raises(ValueError, match="do not match"):
        classify(model, torch.zeros(3, 1, 28, 28))


def test_class_balance_and_plots(digits_classifier, tmp_path) -> None:
    splits, model, _, _ = digits_classifier
    g = torch.Generator().manual_seed(0)
    mu = (splits.train_x[:200].float().reshape(200, 64) + 0.5) / splits.levels
    kde = MixtureCircuit(Gaussian(mu, torch.full_like(mu, 0.05)), torch.zeros(200))
    only_zeros = splits.train_x[splits.train_y == 0][:50]
    cat = MixtureCircuit(Categorical(torch.randn(3, 64, splits.levels, generator=g)), torch.zeros(3))
    samples = {
        "KDE": draw_samples(kde, 300, "gaussian", splits.levels, splits.image_shape, batch_size=128, generator=g),
        "zeros": only_zeros,  # uint8 levels
        "categorical": draw_samples(cat, 40, "categorical", splits.levels, splits.image_shape, generator=g),
    }
    assert samples["KDE"].shape == (300, 1, 8, 8) and 0 <= samples["KDE"].min() and samples["KDE"].max() <= 1
    assert samples["categorical"].max() <= 1 and samples["categorical"].dtype == torch.float32
    res = class_balance(
        model, samples, splits.train_y, tmp_path / "balance.png", test_images=splits.test_x, levels=splits.levels
    )
    assert set(res) == {DATA_KEY, TEST_KEY, "KDE", "zeros", "categorical"}
    assert sum(res["KDE"]["hist"]) == 300 and len(res["KDE"]["hist"]) == 10
    assert res[DATA_KEY]["kl_from_uniform"] < 0.01
    assert res["KDE"]["kl_from_uniform"] < 0.2  # samples of a data KDE are roughly balanced
    assert res["zeros"]["kl_from_uniform"] > 1.5  # (nearly) a point mass: close to log 10 = 2.30
    out = plot_samples(samples, splits.image_shape, tmp_path / "samples.png", levels=splits.levels)
    for png in (tmp_path / "balance.png", out):
        assert png.is_file() and png.stat().st_size > 1000
