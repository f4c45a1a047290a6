"""report.md: every figure link, every result row, every section; atomic writes; report.json."""

from __future__ import annotations

import json

import pytest

from vq2pc.evaluate import CAPTIONS, write_report, write_report_json


def _report(run_dir) -> dict:
    for name in ("bpd_vs_N.png", "inpainting.png", "usage.png"):
        (run_dir / name).write_bytes(b"\x89PNG fake")
    return {
        "dataset": "digits",
        "leaf": "gaussian",
        "wall_time_s": 125.0,
        "device": "cpu",
        "settings": {"vqvae": {"K": 16, "latent_hw": [2, 2]}, "seed": 0},
        "results": [
            {
                "name": "EiNet I=5",
                "family": "EiNet",
                "N": 1,
                "num_params": 5000,
                "test_bpd": 3.71,
                "test_bpd_std": 0.01,
                "val_bpd": 3.75,
            },
            {"name": "DMRS N=64", "family": "DMRS", "N": 64, "num_params": 8256, "test_bpd": 4.2, "test_bpd_std": 0.02},
            {"name": "ExM K=16", "family": "ExM", "N": 65536, "num_params": 8.4e6, "test_bpd": 3.9},
            {"name": "DMRS N=16", "family": "DMRS", "N": 16, "num_params": 2064, "test_bpd": 4.6, "test_bpd_std": 0.02},
        ],
        "figures": {
            "bpd_vs_N": "bpd_vs_N.png",
            "inpainting": str(run_dir / "inpainting.png"),
            "extra_plot": {"path": "extra.png", "caption": "A custom figure."},
        },
        "latent_usage": {
            "space_size": 65536,
            "seeds": 1,
            "fraction_90": 0.05,
            "fraction_90_std": 0.0,
            "count_90": 3277,
            "fraction_99": 0.25,
            "count_99": 16384,
            "figure": str(run_dir / "usage.png"),
        },
        "inpainting": {"DMRS N=64": {"left": {"cond_bpd": 4.5, "mse": 0.03}, "top": {"cond_bpd": 4.7, "mse": None}}},
        "class_balance": {
            "classifier_accuracy": 0.975,
            "histograms": {
                "data labels": {"hist": [10] * 10, "kl_from_uniform": 0.0, "n": 100},
                "DMRS N=64": {"hist": [50, 0, 0, 0, 0, 0, 0, 0, 0, 50], "kl_from_uniform": 1.609, "n": 100},
            },
        },
        "correlation": {
            "mean_pairwise_corr_random": 0.31,
            "mean_pairwise_corr_topk": 0.93,
            "components": 4,
            "images": 500,
        },
        "notes": ["ExM evaluated on a 1000-image test subset."],
    }


def test_report_lists_figures_rows_and_sections(tmp_path) -> None:
    report = _report(tmp_path)
    text = write_report(tmp_path, report).read_text()
    for link in ("](bpd_vs_N.png)", "](inpainting.png)", "](usage.png)", "](extra.png)"):
        assert link in text
    assert CAPTIONS["bpd_vs_N"] in text and "A custom figure." in text
    assert text.count("*(file missing)*") == 1  # extra.png does not exist
    for row in report["results"]:
        assert f"| {row['name']} |" in text
    # sorted by family (ExM, DMRS, ..., EiNet) then N
    order = [text.index(f"| {n} |") for n in ("ExM K=16", "DMRS N=16", "DMRS N=64", "EiNet I=5")]
    assert order == sorted(order)
    assert "4.2000 ± 0.0200" in text and "97.50%" in text and "1.609" in text
    assert "| val BPD |" in text and "| 3.7100 ± 0.0100 | 3.7500 |" in text  # a baseline's validation BPD
    assert "0.93" in text and "0.31" in text and "5% of the space" in text
    assert "| DMRS N=64 | 4.5 / 0.03 | 4.7 / — |" in text
    assert "ExM evaluated on a 1000-image test subset." in text
    assert "`vqvae.K`: 16" in text and "125.0 s" in text
    assert not list(tmp_path.glob("*.tmp"))


def test_minimal_report_and_json(tmp_path) -> None:
    text = write_report(tmp_path, {"dataset": "mnist"}).read_text()
    assert text.startswith("# vq2pc report — mnist") and "(none recorded)" in text
    path = write_report_json(tmp_path, _report(tmp_path))
    assert json.loads(path.read_text())["results"][0]["name"] == "EiNet I=5"
    with pytest.raises(ValueError, match="dict"):
        write_report(tmp_path, ["not", "a", "dict"])  # type: ignore[arg-type]
