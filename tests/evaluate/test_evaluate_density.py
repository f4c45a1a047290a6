"""Test BPD against hand-computed values; the BPD plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vq2pc.circuit import MixtureCircuit
from vq2pc.core.leaves import Categorical, Gaussian
from vq2pc.data import to_model_space
from vq2pc.evaluate import density, plot_bpd_vs_N, plot_bpd_vs_params

L = 17


def _images(n: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, L, (n, 1, 3, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_single_gaussian_matches_hand_computation() -> None:
    """One component N(0.4, 0.3²) per pixel: BPD = mean over images of -Σ log N / (S ln 2) + log2 L."""
    v = _images()
    c = MixtureCircuit(Gaussian(torch.full((1, 9), 0.4), torch.full((1, 9), 0.3)), torch.zeros(1))
    res = density.test_bpd(c, v, "gaussian", L, draws=2, batch_size=7, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    expected = []
    for _ in range(2):
        x = to_model_space(v, "gaussian", L, g).reshape(-1, 9).double()
        nll = (0.5 * ((x - 0.4) / 0.3) ** 2 + math.log(0.3) + 0.5 * math.log(2 * math.pi)).sum(1)
        expected.append(float((nll / (9 * math.log(2)) + math.log2(L)).mean()))
    assert res["per_draw"] == pytest.approx(expected, rel=1e-5)
    assert res["mean"] == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert res["std"] == pytest.approx(abs(expected[0] - expected[1]) / 2, rel=1e-3, abs=1e-7)
    assert res["draws"] == 2 and res["n_images"] == 40
    assert float(res["per_image"].mean()) == pytest.approx(res["mean"], rel=1e-9) and res["per_image"].shape == (40,)


def test_paired_difference_and_per_image_files(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(8)
    b = 1 + torch.rand(5000, generator=g, dtype=torch.float64)
    a = b - 0.01 + 0.05 * torch.randn(5000, generator=g, dtype=torch.float64)  # A is 0.01 lower on average
    row = density.paired_difference(a, b)
    d = a - b
    half = 1.96 * float(d.std()) / math.sqrt(5000)
    assert row["difference"] == pytest.approx(float(d.mean())) and row["ci95"][1] - row["ci95"][0] == pytest.approx(
        2 * half
    )
    assert row["ci95"][0] < -0.01 < row["ci95"][1] < 0 and row["a_lower_fraction"] == float((d < 0).double().mean())
    with pytest.raises(ValueError, match="equal-length"):
        density.paired_difference(a, b[:10])
    path = density.save_per_image(tmp_path / "a.test_bpd.npy", a)
    assert path.name == "a.test_bpd.npy" and sorted(p.name for p in tmp_path.iterdir()) == ["a.test_bpd.npy"]
    assert torch.equal(torch.from_numpy(np.load(path)), a)


def test_per_image_quantiles_equal_a_direct_computation() -> None:
    """Median / p90 / p99 / max and the curve are quantiles of the per-image BPD averaged over the draws."""
    g = torch.Generator().manual_seed(3)
    v = _images(n=101, seed=4)
    c = MixtureCircuit(
        Gaussian(torch.rand(3, 9, generator=g), torch.rand(3, 9, generator=g) * 0.2 + 0.02), torch.zeros(3)
    )
    res = density.test_bpd(c, v, "gaussian", L, draws=2, batch_size=13, generator=torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    per_image = (
        sum(
            (
                -c.log_prob(to_model_space(v, "gaussian", L, gen).reshape(-1, 9)).double() / (9 * math.log(2))
                + math.log2(L)
            )
            for _ in range(2)
        )
        / 2
    )
    ordered = per_image.sort().values.numpy()
    assert res["max"] == pytest.approx(ordered[-1], rel=1e-6)
    assert res["median"] == pytest.approx(ordered[50], rel=1e-6)  # 101 images: the 51st is the median
    assert res["p90"] == pytest.approx(ordered[90], rel=1e-6)  # linear interpolation lands on index 90
    assert res["quantile_curve"][0] == pytest.approx(ordered[0], rel=1e-6)
    assert len(res["quantile_curve"]) == len(density.QUANTILE_LEVELS)
    assert res["mean"] == pytest.approx(float(per_image.mean()), rel=1e-6)
    fields = density.bpd_fields(res)
    assert fields["test_bpd_p99"] == res["p99"] and fields["test_bpd_quantiles"] == res["quantile_curve"]


def test_tail_figure_draws_the_largest_model_of_each_family(tmp_path) -> None:
    curve = list(range(len(density.QUANTILE_LEVELS)))
    rows = [
        {"name": f"DMRS N={n}", "family": "DMRS", "N": n, "test_bpd": 5.0, "test_bpd_quantiles": curve}
        for n in (16, 64)
    ] + [
        {"name": "CM", "family": "CM", "N": 8, "test_bpd": 3.0, "test_bpd_quantiles": curve},
        {"name": "EiNet", "family": "EiNet", "N": 5, "test_bpd": 3.0},
    ]
    assert [r["name"] for r in density.tail_rows(rows)] == ["DMRS N=64", "CM"]
    assert density.plot_bpd_tails(rows, tmp_path / "t.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="quantiles"):
        density.plot_bpd_tails(rows[3:], tmp_path / "u.png")


def test_uniform_categorical_is_log2_levels_with_one_draw() -> None:
    c = MixtureCircuit(Categorical(torch.zeros(3, 9, L)), torch.zeros(3))
    res = density.test_bpd(c, _images(), "categorical", L, draws=5)
    assert res["mean"] == pytest.approx(math.log2(L), rel=1e-6)
    assert res["draws"] == 1 and res["std"] == 0.0


def test_bad_test_images_raise() -> None:
    c = MixtureCircuit(Categorical(torch.zeros(1, 9, L)), torch.zeros(1))
    with pytest.raises(ValueError, match="levels"):
        density.test_bpd(c, _images() + 20, "categorical", L)
    with pytest.raises(ValueError, match=r"\[n,C,H,W\]"):
        density.test_bpd(c, _images().reshape(40, 9), "categorical", L)
    with pytest.raises(ValueError, match="leaf kind"):
        density.test_bpd(c, _images(), "poisson", L)


ROWS = [
    {"name": "ExM K=4", "family": "ExM", "K": 4, "N": 256, "num_params": 30_000, "test_bpd": 4.1, "test_bpd_std": 0.02},
    {
        "name": "ExM K=8",
        "family": "ExM",
        "K": 8,
        "N": 4096,
        "num_params": 500_000,
        "test_bpd": 3.9,
        "test_bpd_std": 0.03,
    },
    {
        "name": "DMRS N=16",
        "family": "DMRS",
        "group": "2x2",
        "N": 16,
        "num_params": 2000,
        "test_bpd": 5.0,
        "source_params": 80_000,
    },
    {
        "name": "DMRS N=64",
        "family": "DMRS",
        "group": "2x2",
        "N": 64,
        "num_params": 8000,
        "test_bpd": 4.5,
        "source_params": 80_000,
    },
    {"name": "DMBS N=64", "family": "DMBS", "N": 64, "num_params": 8000, "test_bpd": 4.6},
    {"name": "EiNet I=5", "family": "EiNet", "N": 1, "num_params": 50_000, "test_bpd": 3.7},
]


def test_plots_write_pngs(tmp_path) -> None:
    for fn, name in ((plot_bpd_vs_params, "params.png"), (plot_bpd_vs_N, "n.png")):
        out = fn(ROWS, tmp_path / name)
        assert out.is_file() and out.stat().st_size > 1000
    assert not list(tmp_path.glob("*.tmp"))


def test_lines_split_the_models_of_a_group_except_the_exact_model() -> None:
    """Two VQ-VAEs of one group (2x2 at K = 16 and 32): DMRS gets a line per model, ExM one line over K."""
    rows = [
        {"family": f, "group": "2x2", "model": f"2x2-K{k}", "K": k, "N": n, "test_bpd": 4.0}
        for f, n in (("ExM", None), ("DMRS", 256), ("DMRS", 1024))
        for k in (16, 32)
    ]
    for r in rows[:2]:
        r["N"] = r["K"] ** 4
    series = density._series(rows, "N")
    assert list(series) == [("ExM", "2x2"), ("DMRS", "2x2-K16"), ("DMRS", "2x2-K32")]
    assert [r["N"] for r in series["ExM", "2x2"]] == [16**4, 32**4]
    assert all(r["model"] == "2x2-K32" for r in series["DMRS", "2x2-K32"])
    one_model = [r for r in rows if r["model"] == "2x2-K16"]
    assert list(density._series(one_model, "N")) == [("ExM", "2x2"), ("DMRS", "2x2")]


def test_plot_rows_are_validated(tmp_path) -> None:
    with pytest.raises(ValueError, match="lacks keys"):
        plot_bpd_vs_params([{"name": "x", "family": "DMRS", "test_bpd": 1.0}], tmp_path / "a.png")
    with pytest.raises(ValueError, match="no result rows"):
        plot_bpd_vs_N([{"name": "EiNet", "family": "EiNet", "N": None, "test_bpd": 3.0}], tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"\.png"):
        plot_bpd_vs_N(ROWS, tmp_path / "b.jpg")


def test_gaussian_rows_get_the_discrete_bpd_of_their_twin() -> None:
    """A single Gaussian per pixel: the discrete BPD is −Σ log2(Φ(b) − Φ(a))/S, below the dequantized BPD."""
    v = _images()
    mean, std = torch.full((1, 9), 0.4, dtype=torch.float64), torch.full((1, 9), 0.3, dtype=torch.float64)
    c = MixtureCircuit(Gaussian(mean, std), torch.zeros(1, dtype=torch.float64))
    res = density.test_bpd(c, v, "gaussian", L, draws=2, generator=torch.Generator().manual_seed(5))
    lo = (v.reshape(-1, 9).double() / L - 0.4) / 0.3
    hi = ((v.reshape(-1, 9).double() + 1) / L - 0.4) / 0.3
    cdf = torch.special.ndtr
    p = torch.where(v.reshape(-1, 9) == L - 1, 1.0, cdf(hi)) - torch.where(v.reshape(-1, 9) == 0, 0.0, cdf(lo))
    expected = float((-p.log2().sum(1) / 9).mean())
    assert res["discrete"] == pytest.approx(expected, rel=1e-9)
    assert res["discrete"] < res["mean"]
    fields = density.bpd_fields(res)
    assert fields["test_bpd_discrete"] == res["discrete"] and "test_bpd_discrete_median" in fields
    assert "discrete" not in density.test_bpd(c, v, "gaussian", L, draws=1, discrete=False)
    cat = MixtureCircuit(Categorical(torch.zeros(1, 9, L)), torch.zeros(1))
    assert "discrete" not in density.test_bpd(cat, v, "categorical", L)  # discrete already
