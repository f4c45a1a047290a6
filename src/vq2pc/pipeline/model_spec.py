"""One source VQ-VAE (+ its prior) of a run and the circuits distilled from it (:class:`ModelSpec`): every
setting's type, range, choices and help declared once, and the rules between them in one validator."""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from vq2pc.circuit.finetune_config import FineTuneConfig
from vq2pc.core.settings import AsTuple, Count, Natural, NonNegative, Positive, settings
from vq2pc.latents.selection import BEAM_SCORES, BEAM_SEARCHES, STRATEGIES, WEIGHTS
from vq2pc.models.priors import PRIOR_NAMES, prior_config
from vq2pc.models.quantizers import QUANTIZER_NAMES

__all__ = ["ModelSpec", "VQVAE_KEYS", "Strategy"]

Strategy = Literal[STRATEGIES]  # type: ignore[valid-type]
Ns = list[Count]


@settings
class ModelSpec:
    """One source VQ-VAE (+ its prior) and the circuits distilled from it."""

    name: str = "2x2"
    group: str | None = Field(
        None, description='series name in plots/tables (default: name); e.g. one "2x2" line over several K'
    )
    latent_hw: Annotated[tuple[Count, Count], AsTuple] = Field((2, 2), description="latent grid")
    K: Count = Field(16, description="codebook size")
    D: Count = Field(16, description="codeword length")
    hidden: Count = Field(32, description="channels of the conv nets")
    res_blocks: Natural = Field(1, description="residual blocks at the latent level")
    beta: NonNegative = Field(
        0.25, description="commitment weight (vq, ema); KL weight (gumbel); latent-alignment weight (gmvq)"
    )
    quantizer: Literal[QUANTIZER_NAMES] = Field(  # type: ignore[valid-type]
        "ema", description="vq (paper Eq. 6), ema, gumbel or gmvq (GM-VQ with the ALBO); see README 'Quantizers'"
    )
    quantizer_opts: dict[str, Any] = field(default_factory=lambda: {"kmeans_init": True})
    vqvae_from: str | None = Field(
        None, description="reuse this model's trained VQ-VAE (its VQ-VAE keys must equal ours): compare priors"
    )
    prior: Literal[PRIOR_NAMES] = Field(  # type: ignore[valid-type]
        "pixelcnn", description="gated PixelCNN, or causal Transformer with a key/value cache"
    )
    prior_hidden: Count = Field(64, description="PixelCNN channels / Transformer width")
    prior_layers: Count = Field(4, description="gated PixelCNN layers / Transformer blocks")
    prior_heads: Count = Field(4, description="Transformer attention heads (the width must be a multiple)")
    strategies: list[Strategy] = field(default_factory=lambda: ["exhaustive", "sample", "beam", "topk", "data"])
    N: Ns = field(default_factory=lambda: [16, 64, 256, 1024])
    extra_N: dict[Strategy, Ns] = Field(
        default_factory=dict, description="more N for one strategy, e.g. {sample: [16384]}"
    )
    weights: Literal[WEIGHTS] = Field(  # type: ignore[valid-type]
        "uniform", description="mixture weights of the non-exhaustive strategies: uniform (Eq. 2) or prior"
    )
    starts: Count = Field(10, description="beam: starting tokens per class")
    beam_score: Literal[BEAM_SCORES] = Field(  # type: ignore[valid-type]
        "class", description="beam: rank a class's searches by p(z|c) (Algorithm 1) or by the class marginal p(z)"
    )
    beam_search: Literal[BEAM_SEARCHES] = Field(  # type: ignore[valid-type]
        "deterministic",
        description="beam: keep the best B beams per position (Algorithm 2) or sample them without "
        "replacement (Gumbel-top-k: more diverse latents within a class)",
    )
    em_strategies: list[Strategy] = Field(
        default_factory=lambda: ["sample"], description="also refine these strategies' circuits by EM (+EM rows)"
    )
    em_iterations: Natural = Field(5, description="maximum EM iterations")
    em_leaves: bool = Field(True, description="also refine the leaf parameters")
    em_prior_strength: float = Field(
        2.0,
        description="Dirichlet pseudo-count per component (1 = ML); the leaves get max(a - 1, 0) "
        "pseudo-observations of their initial (decoder) leaf",
    )
    em_train_limit: Count | None = Field(10000, description="training images used by EM")
    std_floor: Positive | None = Field(
        None,
        description="Gaussian leaves: raise decoded stds below this to it (bounds the cost of unseen strokes)",
    )
    ft_strategies: list[Strategy] = Field(
        default_factory=list, description="also fine-tune these strategies' circuits (+FT rows)"
    )
    ft_N: dict[Strategy, Ns] = Field(
        default_factory=dict, description="+FT rows only at these N of a strategy (one not named: every N)"
    )
    finetune: FineTuneConfig = Field(
        default_factory=FineTuneConfig, description="settings of the +FT rows (device, seed: the run's)"
    )
    ft_std_max: list[Positive] = Field(
        default_factory=list, description="more +FT rows of Gaussian leaves, stds capped below each"
    )
    ft_std_max_N: Ns | None = Field(None, description="the N of those capped rows (None: every N of the +FT rows)")
    ft_std_max_strategies: list[Strategy] | None = Field(
        None, description="the selections given capped rows (None: every ft_strategies one)"
    )

    @model_validator(mode="after")
    def _agree(self) -> ModelSpec:
        """The settings that must agree: extra and +FT N, capped rows, a prior these sizes make."""
        for strategy in self.extra_N:
            if strategy not in self.strategies or strategy == "exhaustive":
                raise ValueError(
                    f"extra_N names {strategy!r}, which is not one of the model's strategies "
                    f"{[s for s in self.strategies if s != 'exhaustive']}"
                )
        for strategy, ns in self.ft_N.items():
            if strategy not in self.ft_strategies:
                raise ValueError(f"ft_N names {strategy!r}, which is not one of ft_strategies {self.ft_strategies}")
            have = [*self.N, *self.extra_N.get(strategy, [])]
            if not ns or not set(ns) <= set(have):
                raise ValueError(f"ft_N[{strategy!r}] must be a non-empty list of {strategy}'s N {have}, got {ns!r}")
        if self.ft_std_max and not self.ft_strategies:
            raise ValueError("ft_std_max needs ft_strategies (the circuits to fine-tune)")
        which = self.ft_std_max_strategies
        if which is not None and not set(which) <= set(self.ft_strategies):
            raise ValueError(
                f"ft_std_max_strategies must be a list of ft_strategies ({self.ft_strategies}), got {which!r}"
            )
        prior_config(self.prior, self.K, self.latent_hw, 1, self.prior_hidden, self.prior_layers, self.prior_heads)
        return self


VQVAE_KEYS = ("latent_hw", "K", "D", "hidden", "res_blocks", "beta", "quantizer", "quantizer_opts")
"""The ModelSpec keys that make its VQ-VAE (equal for a model and its ``vqvae_from``)."""
