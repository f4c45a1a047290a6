"""Run configuration: settings classes loaded from YAML (``configs/*.yaml``).

A run trains one VQ-VAE + prior per entry of ``models`` (:class:`~vq2pc.pipeline.model_spec.ModelSpec`)
and per pixel leaf in ``leaves``, distills circuits with every strategy × N of that entry, and runs
the experiments switched on in ``experiments``. Every setting is declared once, on its field (type,
range, choices, help text; :mod:`vq2pc.core.settings`); the YAML loader, the error messages and the
command line's flags are read from these declarations. Unknown keys are an error (a typo must not
silently fall back to a default).
"""

from __future__ import annotations

from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, model_validator

from vq2pc.baselines.cm import CM_RECIPES
from vq2pc.baselines.einet_config import SumProduct
from vq2pc.baselines.regions import RegionGraph
from vq2pc.circuit.finetune_config import FineTuneConfig
from vq2pc.core.leaves import LEAF_KINDS
from vq2pc.core.settings import Count, Device, Natural, Positive, dump, parse, settings
from vq2pc.data.datasets import DATASET_NAMES
from vq2pc.models.train import TrainConfig
from vq2pc.pipeline.model_spec import VQVAE_KEYS, ModelSpec

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

Fraction = Annotated[float, Field(gt=0, lt=1)]


@settings
class CircuitSpec:
    """A libcirkit circuit baseline beside the EiNets: its region graph, layer kind and width."""

    region_graph: RegionGraph = Field(
        "quad-graph",
        description="structure: quad-graph / quad-tree-N (libcirkit's image templates), chow-liu-tree (HCLT, "
        "learned from the training images), poon-domingos (EiNet)",
    )
    sum_product: SumProduct = Field("cp", description="sum-product layer kind")
    units: Count = Field(64, description="input units per pixel and sum units per layer")
    pic_net_dim: Count | None = Field(
        None,
        description="a probabilistic integral circuit: every parameter tensor made by a net of this width "
        "(libcirkit's pc2qpc, trapezoidal quadrature; CP layers)",
    )


@settings
class BaselineSpec:
    """The paper's baselines, trained on the same data and splits.

    The CM's recipe (``cm_recipe``, None: mlp): mlp, an MLP decoder (``cm_hidden``) on ``cm_train_points``
    fresh points per step; paper, the distillation paper's code: a convolutional decoder (``cm_channels``)
    over a fixed grid of ``cm_points`` Sobol points, trained on each image's ``cm_top_k`` grid points by a
    posterior re-decoded every ``cm_refresh`` steps (:mod:`vq2pc.baselines.cm`; docs/NOTES.md, "The CM's
    recipe"). The paper recipe's settings left None take ``CMConfig``'s defaults."""

    einet: bool = True
    einet_pieces: list[Count] = field(default_factory=lambda: [2, 4])
    einet_inputs: list[Count] = field(default_factory=lambda: [5])
    circuits: list[CircuitSpec] = Field(default_factory=list, description="the field's circuits: QuadGraph, HCLT, ...")
    cm: bool = True
    cm_latent_dim: Count = 16
    cm_hidden: Count = 64
    cm_train_points: Count = 512
    cm_points: Count = Field(4096, description="integration points of the compiled circuit (paper: 2^14)")
    cm_batch_size: Count | None = Field(
        None,
        description="the CM's training batch (None: baseline_train's); a CM step decodes its integration points "
        "once for the whole batch, so larger batches make epochs cheaper",
    )
    cm_recipe: Literal[CM_RECIPES] | None = None  # type: ignore[valid-type]
    cm_channels: Count | None = None
    cm_refresh: Count | None = None
    cm_top_k: Count | None = None

    @model_validator(mode="after")
    def _agree(self) -> BaselineSpec:
        """The paper recipe's settings are given only with it; its grid is a power of 2 of at least top-k points."""
        paper_only = [k for k in ("cm_channels", "cm_refresh", "cm_top_k") if getattr(self, k) is not None]
        if self.cm_recipe != "paper" and paper_only:
            raise ValueError(f"{paper_only} apply to cm_recipe: paper only (cm_recipe is {self.cm_recipe or 'mlp'!r})")
        if self.cm_recipe == "paper" and self.cm_points & (self.cm_points - 1):
            raise ValueError(f"cm_points is the paper recipe's Sobol grid, a power of 2; got {self.cm_points}")
        if self.cm_recipe == "paper" and self.cm_top_k is not None and self.cm_top_k > self.cm_points:
            raise ValueError(f"cm_top_k must be <= cm_points ({self.cm_points}), got {self.cm_top_k}")
        return self


@settings
class ExperimentSpec:
    """Which experiments run, and their sizes."""

    analysis_model: str | None = Field(
        None, description="model of Fig. 1 (usage) and Fig. 6 (correlation); default: main_model"
    )
    usage: bool = True
    usage_seeds: list[Natural] = Field(
        default_factory=list, description="extra training seeds: Fig. 1 as mean ± std over models"
    )
    inpainting: bool = True
    inpainting_images: Count = 8
    inpainting_eval_images: Count = 500
    samples: bool = True
    num_samples: Count = Field(1000, description="samples drawn from each model (paper: 10,000)")
    classifier_epochs: Count | None = Field(
        None, description="epochs of the sample classifier (None: baseline_train's)"
    )
    correlation: bool = True
    correlation_images: Count = 297
    bpd_draws: Count = Field(3, description="dequantization draws (continuous leaves)")
    bpd_discrete: bool = Field(
        True,
        description="Gaussian rows: also the exact discrete BPD of the discretized twin (one extra pass over "
        'the test set, its tables cost S·L·N tail evaluations: docs/NOTES.md "Discretized leaves")',
    )
    classification: bool = Field(
        True, description="class-aware circuits: accuracy, calibration with missing pixels (labeled data only)"
    )
    classification_images: Count = Field(500, description="test images the classification experiment uses")
    classification_fractions: list[Fraction] = Field(
        default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9], description="fractions of random missing pixels"
    )
    classification_fit: bool = Field(
        False,
        description="also measure each circuit with its class weights p(c | n) fitted to the training labels "
        "(EM, pseudo-count chosen on validation; costs a pass over the training images per circuit)",
    )
    classification_fit_images: Count | None = Field(
        None,
        description="training images the label-fitted class weights p(c | n) are fitted to (None: all); "
        'each circuit is also measured with them (docs/NOTES.md "Class-aware circuits")',
    )
    classification_fit_alphas: Annotated[list[Positive], Field(min_length=1)] = Field(
        default_factory=lambda: [0.01, 0.1, 0.3, 1.0],
        description="Dirichlet pseudo-counts tried for the fitted p(c | n); the least validation label NLL wins",
    )
    classification_fit_iterations: Annotated[list[Count], Field(min_length=1)] = Field(
        default_factory=lambda: [1], description="EM iteration counts tried for the fitted p(c | n) (from uniform)"
    )


def default_model() -> ModelSpec:
    """The default run's main model; beside its paper-faithful rows, DMRS+FT rows (fine-tuned distillation)
    with settings sized for digits: 3 cosine epochs at lr 3e-3, the top-1 picks refreshed every 10 steps."""
    return ModelSpec(ft_strategies=["sample"], finetune=FineTuneConfig(epochs=3, patience=3, lr=3e-3, refresh=10))


@settings
class RunConfig:
    """Everything a ``vq2pc run`` needs; see ``configs/`` for annotated examples."""

    description: str = (
        "Quick default: digits, 2x2 latent grid (K=16), every experiment at toy scale, "
        "paper-faithful and fine-tuned (+FT) distillation."
    )
    dataset: Literal[DATASET_NAMES] = Field("digits", description="dataset")  # type: ignore[valid-type]
    data_dir: str | None = Field(
        None, description="directory with the dataset files (default: $VQ2PC_DATA, else ~/.cache/vq2pc)"
    )
    limit: Count | None = Field(None, description="cap every split at this many images")
    test_limit: Count | None = Field(None, description="cap the test split for expensive evaluations (e.g. ExM K=96)")
    seed: Natural = Field(0, description="random seed")
    device: Device = Field("cpu", description="torch device, e.g. cpu or cuda")
    leaves: list[Literal[tuple(LEAF_KINDS)]] = field(  # type: ignore[misc]
        default_factory=lambda: ["gaussian", "categorical"]
    )
    models: Annotated[list[ModelSpec], Field(min_length=1)] = field(default_factory=lambda: [default_model()])
    main_model: str | None = Field(None, description="model used for the experiments; default: the first")
    max_exhaustive: Count = Field(2**22, description="largest latent space distilled exhaustively (ExM)")
    max_usage_space: Count = Field(2**27, description="largest latent space enumerated for Fig. 1 (96^4 ≈ 2^26.3)")
    max_materialize: Count = Field(
        2**27, description="ExM with more leaf parameters than this is streamed (ExactModel), not stored"
    )
    exact_test_limit: Count | None = Field(
        None, description="test images for a streamed ExM (its BPD costs K^{HW} decodes per draw)"
    )
    vqvae_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=60, patience=10, lr=2e-3, batch_size=64)
    )
    prior_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40, patience=8, lr=2e-3, batch_size=64))
    baseline_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=40, patience=8, lr=5e-3, batch_size=64)
    )
    baselines: BaselineSpec = field(default_factory=BaselineSpec)
    experiments: ExperimentSpec = field(default_factory=ExperimentSpec)

    @model_validator(mode="after")
    def _agree(self) -> RunConfig:
        """Model names are distinct and every name given exists; shared VQ-VAEs agree; caps need Gaussian leaves."""
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models need distinct names, got {names}")
        for key, value in (("main_model", self.main_model), ("analysis_model", self.experiments.analysis_model)):
            if value is not None and value not in names:
                raise ValueError(f"{key} {value!r} is not one of {names}")
        for m in self.models:
            self._check_vqvae_from(m)
            if m.ft_std_max and "gaussian" not in self.leaves:
                raise ValueError(f"model {m.name!r} ft_std_max caps Gaussian stds; leaves are {self.leaves}")
        return self

    def _check_vqvae_from(self, m: ModelSpec) -> None:
        if m.vqvae_from is None:
            return
        source = next((s for s in self.models if s.name == m.vqvae_from and s is not m), None)
        if source is None or source.vqvae_from is not None:
            raise ValueError(
                f"model {m.name!r} vqvae_from {m.vqvae_from!r} must name another model that trains its own VQ-VAE"
            )
        differ = [k for k in VQVAE_KEYS if getattr(m, k) != getattr(source, k)]
        if differ:
            raise ValueError(f"model {m.name!r} shares the VQ-VAE of {source.name!r} but differs in {differ}")

    @property
    def main(self) -> ModelSpec:
        """The model of the inpainting and sample experiments."""
        return next(m for m in self.models if m.name == (self.main_model or self.models[0].name))

    @property
    def analysis(self) -> ModelSpec:
        """The model of the latent-usage and correlation experiments."""
        return next(m for m in self.models if m.name == (self.experiments.analysis_model or self.main.name))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply top-level ``overrides``; each
    invalid setting is one line of the :class:`~vq2pc.core.settings.ConfigError` raised."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a mapping of settings, got {type(data).__name__}")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse(RunConfig, data, "config")


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """A plain dict (YAML/JSON-able) of ``cfg``."""
    return dump(cfg)


DEFAULT_CONFIG = RunConfig()
