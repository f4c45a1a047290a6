"""Run configuration: dataclasses loaded from YAML (``configs/*.yaml``).

A run trains one VQ-VAE + prior per entry of ``models`` and per pixel leaf in
``leaves``, distills circuits with every strategy × N of that entry, and runs
the experiments switched on in ``experiments``. Unknown keys are an error
(a typo must not silently fall back to a default).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vq2pc.baselines.einet import SUM_PRODUCT_LAYERS
from vq2pc.baselines.regions import REGION_GRAPHS
from vq2pc.circuit.finetune import FineTuneConfig
from vq2pc.core.leaves import LEAF_KINDS
from vq2pc.core.validate import is_positive_number
from vq2pc.latents.selection import BEAM_SCORES, BEAM_SEARCHES, STRATEGIES, WEIGHTS
from vq2pc.models.train import TrainConfig
from vq2pc.pipeline.config_checks import (
    check_cm_recipe,
    check_counts,
    check_device_name,
    check_extra_N,
    check_ft_N,
    check_prior,
)
from vq2pc.pipeline.typed_yaml import build_dataclass, plain

__all__ = [
    "ModelSpec",
    "CircuitSpec",
    "BaselineSpec",
    "ExperimentSpec",
    "RunConfig",
    "load_config",
    "config_to_dict",
    "DEFAULT_CONFIG",
]


@dataclass
class ModelSpec:
    """One source VQ-VAE (+ its prior) and the circuits distilled from it."""

    name: str = "2x2"
    group: str | None = None  # series name in plots/tables (default: name); e.g. one "2x2" line over several K
    latent_hw: tuple[int, int] = (2, 2)
    K: int = 16
    D: int = 16
    hidden: int = 32
    res_blocks: int = 1
    beta: float = 0.25
    quantizer: str = "ema"  # vq (paper Eq. 6) | ema (codebook as moving cluster means)
    quantizer_opts: dict[str, Any] = field(default_factory=lambda: {"kmeans_init": True})
    vqvae_from: str | None = None  # reuse this model's trained VQ-VAE (its VQ-VAE keys must equal ours): compare priors
    prior: str = "pixelcnn"  # pixelcnn | transformer (vq2pc.models.priors)
    prior_hidden: int = 64  # PixelCNN channels / Transformer width
    prior_layers: int = 4  # gated PixelCNN layers / Transformer blocks
    prior_heads: int = 4  # Transformer attention heads (prior_hidden must be a multiple)
    strategies: list[str] = field(default_factory=lambda: ["exhaustive", "sample", "beam", "topk", "data"])
    N: list[int] = field(default_factory=lambda: [16, 64, 256, 1024])
    extra_N: dict[str, list[int]] = field(default_factory=dict)  # more N for one strategy, e.g. {sample: [16384]}
    weights: str = "uniform"  # mixture weights of the non-exhaustive strategies: uniform (Eq. 2) | prior
    starts: int = 10  # DMBS: starting tokens per class (s)
    beam_score: str = "class"  # DMBS: class c's searches rank by p(z_≤i | c) (Algorithm 1) | marginal: p(z_≤i)
    beam_search: str = (
        "deterministic"  # DMBS: keep the best B beams (Algorithm 2) | stochastic: sample them (Gumbel-top-k)
    )
    em_strategies: list[str] = field(
        default_factory=lambda: ["sample"]
    )  # also refine these strategies' circuits by EM (+EM rows)
    em_iterations: int = 5
    em_leaves: bool = True  # EM on the leaf parameters too, not only the weights
    em_prior_strength: float = 2.0  # Dirichlet pseudo-count (and decoder-leaf pseudo-observations), see refine.py
    em_train_limit: int | None = 10000  # training images used by EM
    std_floor: float | None = (
        None  # Gaussian leaves: raise decoded stds below this (every circuit and ExM of the model)
    )
    ft_strategies: list[str] = field(default_factory=list)  # also fine-tune these strategies' circuits (+FT rows)
    ft_N: dict[str, list[int]] = field(
        default_factory=dict
    )  # +FT rows only at these N of a strategy (one not named: every N)
    finetune: FineTuneConfig = field(
        default_factory=FineTuneConfig
    )  # settings of the +FT rows (device, seed: the run's)
    ft_std_max: list[float] = field(default_factory=list)  # more +FT rows of Gaussian leaves, stds capped below each
    ft_std_max_N: list[int] | None = None  # the N of those capped rows (None: every N of the +FT rows)
    ft_std_max_strategies: list[str] | None = None  # the selections given capped rows (None: every ft_strategies one)


VQVAE_KEYS = ("latent_hw", "K", "D", "hidden", "res_blocks", "beta", "quantizer", "quantizer_opts")
"""The ModelSpec keys that make its VQ-VAE (equal for a model and its ``vqvae_from``)."""


@dataclass
class CircuitSpec:
    """A libcirkit circuit baseline beside the EiNets: its region graph, layer kind and width."""

    region_graph: str = "quad-graph"  # quad-graph | quad-tree-2 | quad-tree-4 | chow-liu-tree (HCLT) | poon-domingos
    sum_product: str = "cp"  # cp | cp-t | tucker
    units: int = 64  # input units per pixel and sum units per layer

    def __post_init__(self) -> None:
        if self.region_graph not in REGION_GRAPHS:
            raise ValueError(f"region_graph must be one of {list(REGION_GRAPHS)}, got {self.region_graph!r}")
        if self.sum_product not in SUM_PRODUCT_LAYERS:
            raise ValueError(f"sum_product must be one of {list(SUM_PRODUCT_LAYERS)}, got {self.sum_product!r}")
        if isinstance(self.units, bool) or not isinstance(self.units, int) or self.units < 1:
            raise ValueError(f"units must be an integer >= 1, got {self.units!r}")


@dataclass
class BaselineSpec:
    """The paper's baselines, trained on the same data and splits."""

    einet: bool = True
    einet_pieces: list[int] = field(default_factory=lambda: [2, 4])
    einet_inputs: list[int] = field(default_factory=lambda: [5])
    circuits: list[CircuitSpec] = field(default_factory=list)  # the field's circuits: QuadGraph, HCLT, ...
    cm: bool = True
    cm_latent_dim: int = 16
    cm_hidden: int = 64
    cm_train_points: int = 512
    cm_points: int = 4096  # integration points of the compiled circuit (paper: 2^14)
    # The CM's training batch (None: baseline_train's). A CM step decodes its integration points once for
    # the whole batch, so a step's cost barely grows with the batch and larger batches make epochs cheaper.
    cm_batch_size: int | None = None
    # The CM's recipe (None: mlp). mlp: an MLP decoder (cm_hidden) on cm_train_points fresh points per step;
    # paper: the distillation paper's code: a convolutional decoder (cm_channels) over a fixed grid of
    # cm_points Sobol points, trained on each image's cm_top_k grid points by a posterior re-decoded every
    # cm_refresh steps (vq2pc.baselines.cm; docs/NOTES.md, "The CM's recipe"). None: CMConfig's defaults.
    cm_recipe: str | None = None
    cm_channels: int | None = None
    cm_refresh: int | None = None
    cm_top_k: int | None = None


@dataclass
class ExperimentSpec:
    """Which experiments run, and their sizes."""

    analysis_model: str | None = None  # model of Fig. 1 (usage) and Fig. 6 (correlation); default: main_model
    usage: bool = True
    usage_seeds: list[int] = field(default_factory=list)  # extra training seeds: Fig. 1 as mean ± std over models
    inpainting: bool = True
    inpainting_images: int = 8
    inpainting_eval_images: int = 500
    samples: bool = True
    num_samples: int = 1000  # paper: 10,000
    classifier_epochs: int | None = None  # epochs of the sample classifier (None: baseline_train's)
    correlation: bool = True
    correlation_images: int = 297
    bpd_draws: int = 3  # dequantization draws for continuous test BPD
    bpd_discrete: bool = True  # Gaussian rows: also the exact discrete BPD of the discretized twin (test_bpd_discrete;
    #   one extra pass over the test set, its tables cost S·L·N tail evaluations: docs/NOTES.md "Discretized leaves")
    classification: bool = True  # class-aware circuits: accuracy, calibration with missing pixels (labeled data only)
    classification_images: int = 500  # test images it uses
    classification_fractions: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # random missing


def default_model() -> ModelSpec:
    """The default run's main model; beside its paper-faithful rows, DMRS+FT rows (fine-tuned distillation)
    with settings sized for digits: 3 cosine epochs at lr 3e-3, the top-1 picks refreshed every 10 steps."""
    return ModelSpec(ft_strategies=["sample"], finetune=FineTuneConfig(epochs=3, patience=3, lr=3e-3, refresh=10))


def transformer_twin() -> ModelSpec:
    """The default run's second model: the first one's VQ-VAE with a Transformer prior (PixelCNN vs Transformer)."""
    return ModelSpec(
        name="2x2-tf",
        vqvae_from="2x2",
        prior="transformer",
        strategies=["exhaustive", "sample", "beam"],
        em_strategies=[],
    )


@dataclass
class RunConfig:
    """Everything a ``vq2pc run`` needs; see ``configs/`` for annotated examples."""

    description: str = (
        "Quick default: digits, 2x2 latent grid (K=16), every experiment at toy scale, "
        "paper-faithful and fine-tuned (+FT) distillation."
    )
    dataset: str = "digits"
    data_dir: str | None = None
    limit: int | None = None  # cap every split (quick experiments)
    test_limit: int | None = None  # cap the test split for expensive evaluations (e.g. ExM K=96)
    seed: int = 0
    device: str = "cpu"
    leaves: list[str] = field(default_factory=lambda: ["gaussian", "categorical"])
    models: list[ModelSpec] = field(default_factory=lambda: [default_model(), transformer_twin()])
    main_model: str | None = None  # model used for the experiments; default: the first
    max_exhaustive: int = 2**22  # largest latent space distilled exhaustively (ExM)
    max_usage_space: int = 2**27  # largest latent space enumerated for Fig. 1 (96^4 ≈ 2^26.3)
    max_materialize: int = 2**27  # ExM with more leaf parameters than this is streamed (ExactModel), not stored
    exact_test_limit: int | None = None  # test images for a streamed ExM (its BPD costs K^{HW} decodes per draw)
    vqvae_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=60, patience=10, lr=2e-3, batch_size=64)
    )
    prior_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40, patience=8, lr=2e-3, batch_size=64))
    baseline_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=40, patience=8, lr=5e-3, batch_size=64)
    )
    baselines: BaselineSpec = field(default_factory=BaselineSpec)
    experiments: ExperimentSpec = field(default_factory=ExperimentSpec)

    def validate(self) -> RunConfig:
        check_device_name(self.device)
        check_counts(
            self,
            ("limit", "test_limit", "exact_test_limit", "max_exhaustive", "max_usage_space", "max_materialize"),
            "config",
        )
        check_counts(self, ("seed",), "config", low=0)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.experiments.usage_seeds):
            raise ValueError(
                f"config: experiments.usage_seeds must be integers >= 0, got {self.experiments.usage_seeds}"
            )
        check_counts(
            self.experiments,
            (
                "inpainting_images",
                "inpainting_eval_images",
                "num_samples",
                "correlation_images",
                "bpd_draws",
                "classification_images",
            ),
            "config.experiments",
        )
        if not all(0.0 < f < 1.0 for f in self.experiments.classification_fractions):
            raise ValueError(
                "config.experiments: classification_fractions must lie in (0, 1), got "
                f"{self.experiments.classification_fractions}"
            )
        check_counts(
            self.baselines,
            ("cm_latent_dim", "cm_hidden", "cm_train_points", "cm_points", "cm_batch_size"),
            "config.baselines",
        )
        check_cm_recipe(self.baselines)
        for leaf in self.leaves:
            if leaf not in LEAF_KINDS:
                raise ValueError(f"config: unknown leaf {leaf!r}; expected one of {list(LEAF_KINDS)}")
        names = [m.name for m in self.models]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"config: models need distinct names, got {names}")
        for m in self.models:
            bad = [s for s in m.strategies if s not in STRATEGIES]
            if bad:
                raise ValueError(f"config: model {m.name!r} has unknown strategies {bad}; expected {list(STRATEGIES)}")
            if m.K < 1 or any(n < 1 for n in m.N):
                raise ValueError(f"config: model {m.name!r} needs K >= 1 and every N >= 1")
            check_extra_N(m)
            check_counts(
                m,
                ("D", "hidden", "prior_hidden", "prior_layers", "starts", "em_train_limit"),
                f"config: model {m.name!r}",
            )
            check_counts(m, ("res_blocks", "em_iterations"), f"config: model {m.name!r}", low=0)
            if min(m.latent_hw) < 1 or m.beta < 0:
                raise ValueError(f"config: model {m.name!r} needs a positive latent_hw and beta >= 0")
            for key in ("em_strategies", "ft_strategies"):
                bad = [s for s in getattr(m, key) if s not in STRATEGIES]
                if bad:
                    raise ValueError(f"config: model {m.name!r} has unknown {key} {bad}; expected {list(STRATEGIES)}")
            if m.weights not in WEIGHTS:
                raise ValueError(f"config: model {m.name!r} weights must be one of {list(WEIGHTS)}, got {m.weights!r}")
            for key, allowed in (("beam_score", BEAM_SCORES), ("beam_search", BEAM_SEARCHES)):
                if getattr(m, key) not in allowed:
                    raise ValueError(
                        f"config: model {m.name!r} {key} must be one of {list(allowed)}, got {getattr(m, key)!r}"
                    )
            check_prior(m)
            self._check_vqvae_from(m)
            if m.std_floor is not None and not (isinstance(m.std_floor, (int, float)) and 0 < m.std_floor < math.inf):
                raise ValueError(f"config: model {m.name!r} std_floor must be a positive number, got {m.std_floor!r}")
            check_ft_N(m)
            self._check_ft_std_max(m)
        for key in ("main_model", "analysis_model"):
            value = getattr(self, key) if key == "main_model" else self.experiments.analysis_model
            if value is not None and value not in names:
                raise ValueError(f"config: {key} {value!r} is not one of {names}")
        return self

    def _check_ft_std_max(self, m: ModelSpec) -> None:
        caps = m.ft_std_max
        if not isinstance(caps, list) or not all(map(is_positive_number, caps)):
            raise ValueError(f"config: model {m.name!r} ft_std_max must be a list of positive numbers, got {caps!r}")
        if caps and not m.ft_strategies:
            raise ValueError(f"config: model {m.name!r} ft_std_max needs ft_strategies (the circuits to fine-tune)")
        only = m.ft_std_max_N
        if only is not None and not (isinstance(only, list) and all(isinstance(n, int) and n > 0 for n in only)):
            raise ValueError(f"config: model {m.name!r} ft_std_max_N must be a list of positive integers, got {only!r}")
        which = m.ft_std_max_strategies
        if which is not None and not (isinstance(which, list) and set(map(str, which)) <= set(m.ft_strategies)):
            raise ValueError(
                f"config: model {m.name!r} ft_std_max_strategies must be a list of ft_strategies "
                f"({m.ft_strategies}), got {which!r}"
            )
        if caps and "gaussian" not in self.leaves:
            raise ValueError(f"config: model {m.name!r} ft_std_max caps Gaussian stds; leaves are {self.leaves}")

    def _check_vqvae_from(self, m: ModelSpec) -> None:
        if m.vqvae_from is None:
            return
        source = next((s for s in self.models if s.name == m.vqvae_from and s is not m), None)
        if source is None or source.vqvae_from is not None:
            raise ValueError(
                f"config: model {m.name!r} vqvae_from {m.vqvae_from!r} must name another model that "
                "trains its own VQ-VAE"
            )
        differ = [k for k in VQVAE_KEYS if plain(getattr(m, k)) != plain(getattr(source, k))]
        if differ:
            raise ValueError(f"config: model {m.name!r} shares the VQ-VAE of {source.name!r} but differs in {differ}")

    @property
    def main(self) -> ModelSpec:
        """The model of the inpainting and sample experiments."""
        return next(m for m in self.models if m.name == (self.main_model or self.models[0].name))

    @property
    def analysis(self) -> ModelSpec:
        """The model of the latent-usage and correlation experiments."""
        return next(m for m in self.models if m.name == (self.experiments.analysis_model or self.main.name))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply top-level ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config {path} is not valid YAML: {exc}") from None
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_dataclass(RunConfig, data, "config").validate()


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """A plain dict (YAML/JSON-able) of ``cfg``."""
    return plain(asdict(cfg))


DEFAULT_CONFIG = RunConfig()
