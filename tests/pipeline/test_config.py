"""Run configs: a bad key or value is one clear error naming it; every shipped config loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from vq2pc.models.quantizers import make_quantizer
from vq2pc.pipeline.config import config_to_dict, load_config


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"bogus_key": 1}, "bogus_key"),
        ({"models": [{"name": "m", "Kay": 4}]}, "Kay"),
        ({"experiments": {"num_sample": 5}}, "num_sample"),
        ({"models": [{"name": "m", "strategies": ["beam", "bogus_strategy"]}]}, "bogus_strategy"),
        ({"leaves": ["gaussian", "poisson"]}, "poisson"),
        ({"models": [{"name": "m", "prior": "lstm"}]}, "lstm"),
        (
            {"models": [{"name": "m", "prior": "transformer", "prior_hidden": 30, "prior_heads": 4}]},
            "multiple of heads",
        ),
        (
            {"models": [{"name": "a"}, {"name": "b", "vqvae_from": "a", "K": 8}]},
            r"'b' shares the VQ-VAE of 'a' but differs in \['K'\]",
        ),
        ({"models": [{"name": "b", "vqvae_from": "b"}]}, "vqvae_from 'b' must name another model"),
        ({"models": [{"name": "m", "strategies": ["sample"], "extra_N": {"beam": [64]}}]}, "extra_N names 'beam'"),
        (
            {"models": [{"name": "m", "strategies": ["sample"], "extra_N": {"sample": [0]}}]},
            r"config\.models\[0\]\.extra_N\.sample\[0\] must be >= 1, got 0",
        ),
        ({"models": [{"name": "m", "extra_N": [64]}]}, "extra_N must be a mapping"),
        ({"baselines": {"cm_batch_size": 0}}, "cm_batch_size"),
        ({"baselines": {"cm_recipe": "conv"}}, r"config\.baselines\.cm_recipe must be 'mlp' or 'paper', got 'conv'"),
        ({"baselines": {"cm_channels": 16}}, r"\['cm_channels'\] apply to cm_recipe: paper only"),
        ({"baselines": {"cm_recipe": "paper", "cm_refresh": 0}}, r"config\.baselines\.cm_refresh must be >= 1, got 0"),
        ({"baselines": {"cm_recipe": "paper", "cm_points": 1000}}, "cm_points is the paper recipe's Sobol grid"),
        ({"baselines": {"cm_recipe": "paper", "cm_points": 64, "cm_top_k": 65}}, r"cm_top_k must be <= cm_points"),
        (
            {"models": [{"name": "m", "ft_strategies": ["sample"], "ft_std_max": [0.1, -1]}]},
            r"config\.models\[0\]\.ft_std_max\[1\] must be > 0, got -1",
        ),
        ({"models": [{"name": "m", "ft_std_max": [0.1]}]}, "ft_std_max needs ft_strategies"),
        (
            {"models": [{"name": "m", "ft_strategies": ["sample"], "ft_std_max": [0.1], "ft_std_max_N": 64}]},
            "ft_std_max_N must be a list",
        ),
        (
            {
                "models": [
                    {"name": "m", "ft_strategies": ["sample"], "ft_std_max": [0.1], "ft_std_max_strategies": ["beam"]}
                ]
            },
            "ft_std_max_strategies must be a list",
        ),
        (
            {
                "models": [
                    {"name": "m", "ft_strategies": ["sample"], "ft_std_max": [0.1], "ft_std_max_strategies": "sample"}
                ]
            },
            "ft_std_max_strategies must be a list",
        ),
        ({"models": [{"name": "m", "ft_strategies": ["sample"], "ft_N": [64]}]}, "ft_N must be a mapping"),
        ({"models": [{"name": "m", "ft_strategies": ["sample"], "ft_N": {"beam": [64]}}]}, "ft_N names 'beam'"),
        (
            {"models": [{"name": "m", "N": [64], "ft_strategies": ["sample"], "ft_N": {"sample": [128]}}]},
            r"ft_N\['sample'\] must be a non-empty list of sample's N \[64\]",
        ),
        (
            {"models": [{"name": "m", "N": [64], "ft_strategies": ["sample"], "ft_N": {"sample": []}}]},
            r"ft_N\['sample'\]",
        ),
        (
            {"leaves": ["categorical"], "models": [{"name": "m", "ft_strategies": ["sample"], "ft_std_max": [0.1]}]},
            "ft_std_max caps Gaussian stds",
        ),
        ({"experiments": {"bpd_discrete": "yes"}}, "bpd_discrete"),
    ],
)
def test_bad_config_raises_naming_the_key(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        load_config(None, overrides)


def test_bad_yaml_file_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: digits\nmodels:\n  - name: m\n    K: 4\n    stratgies: [beam]\n")
    with pytest.raises(ValueError, match="stratgies"):
        load_config(path)


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_config_loads_and_builds_its_quantizers(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    assert cfg.models
    saved = tmp_path / "config.yaml"  # what a run folder keeps: it loads back to the same settings
    saved.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    assert load_config(saved) == cfg
    for spec in cfg.models:  # unknown quantizer options fail here, not an hour into a run
        quantizer = make_quantizer(spec.quantizer, spec.K, spec.D, spec.beta, **spec.quantizer_opts)
        assert quantizer.codebook.shape == (spec.K, spec.D)


def test_bpd_discrete_is_on_by_default_and_can_be_switched_off() -> None:
    assert load_config(None, {}).experiments.bpd_discrete is True
    assert load_config(None, {"experiments": {"bpd_discrete": False}}).experiments.bpd_discrete is False


def test_the_quick_config_is_the_default_run_and_fine_tunes() -> None:
    """configs/digits-quick.yaml spells out `vq2pc run` without --config; its main model has +FT rows at every N."""
    quick = load_config(Path(__file__).resolve().parents[2] / "configs" / "digits-quick.yaml")
    default = load_config(None)
    assert config_to_dict(quick) == config_to_dict(default)
    assert default.main.ft_strategies == ["sample"] and not default.main.ft_N and "sample" in default.main.strategies
    assert default.main.finetune.epochs <= 5  # sized for the quick run, not the MNIST recipe


def test_classification_fractions_must_lie_strictly_between_0_and_1() -> None:
    with pytest.raises(ValueError, match="classification_fractions"):
        load_config(None, {"experiments": {"classification_fractions": [0.5, 1.0]}})
    assert load_config(None).experiments.classification


def test_every_problem_of_a_config_is_one_line_naming_its_path() -> None:
    with pytest.raises(ValueError) as info:
        load_config(None, {"seed": -1, "models": [{"name": "m", "K": 0, "N": [16, "x"]}], "prior_train": {"lr": 0}})
    assert str(info.value).splitlines() == [
        "config.seed must be >= 0, got -1",
        "config.models[0].K must be >= 1, got 0",
        "config.models[0].N[1] must be an integer, got 'x'",
        "config.prior_train.lr must be > 0, got 0",
    ]
