"""Pipeline stages that build models: VQ-VAE → prior → distilled circuits, one per selection."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vq2pc.circuit.distill import distill
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core.protocols import Prior
from vq2pc.data.datasets import DataSplits
from vq2pc.evaluate.density import BPD_FORMAT, bpd_fields, test_bpd
from vq2pc.latents.selection import Selection, select
from vq2pc.models.priors import prior_config, train_prior
from vq2pc.models.quantizers.vq import perplexity
from vq2pc.models.train_config import TrainResult
from vq2pc.models.vqvae import VQVAE, VQVAEConfig, encode_images, train_vqvae
from vq2pc.pipeline.config import ModelSpec, RunConfig
from vq2pc.pipeline.model_spec import VQVAE_KEYS
from vq2pc.pipeline.rows import ResultRow
from vq2pc.pipeline.rundir import RunDir

__all__ = [
    "SourceModel",
    "build_source_model",
    "circuit_row",
    "score_test",
    "refined_row",
    "FAMILY",
    "select_latents",
    "make_circuit",
]

# Report names of the selection strategies (paper: ExM, DMRS, DMBS).
FAMILY = {"exhaustive": "ExM", "sample": "DMRS", "gumbel": "DMGS", "beam": "DMBS", "topk": "TopK", "data": "DMData"}


@dataclass
class SourceModel:
    """A trained VQ-VAE + prior for one leaf kind and one ModelSpec."""

    leaf: str
    spec: ModelSpec
    vqvae: VQVAE
    prior: Prior
    train_codes: torch.Tensor  # [n, h, w] codes of the training set
    info: dict[str, Any] = field(default_factory=dict)
    files: tuple[Path, ...] = ()  # its checkpoints: results computed from it are stale when these change
    selections: dict[tuple[str, int | None], tuple[Selection, float]] = field(default_factory=dict, repr=False)
    """Selections made in this process by (strategy, N), with their seconds: the +FT rows reuse the distilled ones."""

    @property
    def tag(self) -> str:
        return f"{self.leaf}/{self.spec.name}"


def build_source_model(run: RunDir, cfg: RunConfig, splits: DataSplits, leaf: str, spec: ModelSpec) -> SourceModel:
    """Train (or resume, or load) the VQ-VAE and the prior of ``spec`` for ``leaf`` pixels; with
    ``spec.vqvae_from`` the VQ-VAE is that model's (trained here if it is not yet)."""
    train_cfg = replace(cfg.vqvae_train, seed=cfg.seed, device=cfg.device)
    vqvae_file = run.path(leaf, spec.vqvae_from or spec.name, "vqvae.pt")
    vqvae, vq_res = train_vqvae(
        splits,
        vqvae_config(splits, leaf, spec),
        train_cfg,
        checkpoint=run.checkpoint("vqvae", leaf, spec.vqvae_from or spec.name, "vqvae.pt"),
    )
    codes = {s: encode_images(vqvae, getattr(splits, f"{s}_x"), cfg.seed) for s in ("train", "val", "test")}
    labeled = splits.num_classes > 1
    prior_cfg = prior_config(
        spec.prior,
        spec.K,
        tuple(spec.latent_hw),
        splits.num_classes if labeled else 1,
        spec.prior_hidden,
        spec.prior_layers,
        spec.prior_heads,
    )
    prior_file = _prior_file(spec)
    prior, pr_res = train_prior(
        codes["train"],
        splits.train_y if labeled else None,
        prior_cfg,
        replace(cfg.prior_train, seed=cfg.seed, device=cfg.device),
        codes["val"],
        splits.val_y if labeled else None,
        checkpoint=run.checkpoint("prior", leaf, spec.name, prior_file, after=(vqvae_file,)),
    )
    info = _source_info(spec, vqvae, vq_res, prior, pr_res, codes)
    return SourceModel(
        leaf, spec, vqvae, prior, codes["train"], info, files=(vqvae_file, run.path(leaf, spec.name, prior_file))
    )


def vqvae_config(splits: DataSplits, leaf: str, spec: ModelSpec) -> VQVAEConfig:
    """The VQ-VAE of ``spec`` for ``leaf`` pixels of ``splits``' images (the run's and ``train-vqvae``'s)."""
    keys = {key: getattr(spec, key) for key in VQVAE_KEYS}
    keys.update(latent_hw=tuple(spec.latent_hw), quantizer_opts=dict(spec.quantizer_opts))
    return VQVAEConfig(image_shape=splits.image_shape, levels=splits.levels, leaf=leaf, **keys)


def _source_info(
    spec: ModelSpec, vqvae: VQVAE, vq_res: TrainResult, prior: Prior, pr_res: TrainResult, codes: dict[str, Tensor]
) -> dict[str, Any]:
    """The report's ``sources`` entry of a source model: sizes, training summaries and code statistics
    (``codes``: the ``[n, h, w]`` codes of each split)."""
    return {
        "prior": spec.prior,
        "prior_params": prior.num_params,
        "prior_seconds": round(pr_res.seconds, 2),
        "vqvae_params": vqvae.num_params,
        "vqvae_val_loss": vq_res.best_val_loss,
        "vqvae_epochs": vq_res.epochs_run,
        "prior_val_nll_per_latent": pr_res.best_val_loss,
        "prior_epochs": pr_res.epochs_run,
        "vqvae_training": vq_res.summary(),
        "prior_training": pr_res.summary(),
        "codebook_perplexity_test": float(perplexity(codes["test"], spec.K)),
        "distinct_test_codes": int(torch.unique(codes["test"].flatten(1), dim=0).shape[0]),
        "distinct_train_codes": int(torch.unique(codes["train"].flatten(1), dim=0).shape[0]),
        "latent_space": spec.K ** (spec.latent_hw[0] * spec.latent_hw[1]),
    }


def _prior_file(spec: ModelSpec) -> str:
    """The prior's checkpoint: ``prior.pt`` for the PixelCNN, ``prior-<name>.pt`` for another prior."""
    return "prior.pt" if spec.prior == "pixelcnn" else f"prior-{spec.prior}.pt"


def score_test(cfg: RunConfig, model: Any, test_x: Tensor, leaf: str, levels: int) -> dict[str, Any]:
    """:func:`~vq2pc.evaluate.density.test_bpd` of ``model`` with the run's settings (draws, discrete BPD, seed)."""
    return test_bpd(
        model,
        test_x,
        leaf,
        levels,
        draws=cfg.experiments.bpd_draws,
        discrete=cfg.experiments.bpd_discrete,
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def score_val(cfg: RunConfig, model: Any, val_x: Tensor, leaf: str, levels: int) -> float:
    """Mean validation BPD of ``model`` with the run's draws and seed (no quantiles, no discrete twin)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return test_bpd(model, val_x, leaf, levels, draws=cfg.experiments.bpd_draws, discrete=False, generator=gen)["mean"]


def circuit_row(name: str, family: str, circuit: MixtureCircuit, bpd: dict[str, float], **fields: Any) -> ResultRow:
    """One entry of report.json's ``models`` list: ``circuit``'s size, its :func:`test_bpd` and ``fields``."""
    return ResultRow.build(
        name=name, family=family, N=len(circuit), num_params=circuit.num_params, **bpd_fields(bpd), **fields
    )


def refined_row(row: ResultRow, tag: str, circuit: MixtureCircuit, bpd: dict[str, float], **fields: Any) -> ResultRow:
    """The row of ``circuit``, made from the circuit of ``row`` (by EM, fine-tuning): name and family + ``tag``."""
    return row.replace(
        name=row.name + tag,
        family=row.family + tag,
        N=len(circuit),
        num_params=circuit.num_params,
        **bpd_fields(bpd),
        **fields,
    )


def selections(src: SourceModel, cfg: RunConfig, notes: list[str]) -> list[tuple[str, int | None]]:
    """(strategy, N) pairs of a source model; exhaustive has no N (it takes the whole space).
    A beam N below the number of classes cannot be searched: a line in ``notes`` says so."""
    pairs: list[tuple[str, int | None]] = []
    for strategy in src.spec.strategies:
        if strategy == "exhaustive":
            if src.info["latent_space"] <= cfg.max_exhaustive:
                pairs.append((strategy, None))
            continue
        limit = src.info["distinct_train_codes"] if strategy == "data" else src.info["latent_space"]
        floor = src.prior.num_classes if strategy == "beam" else 1  # DMBS needs a width N // (s·C) >= 1
        ns = sorted({*src.spec.N, *src.spec.extra_N.get(strategy, [])})
        pairs += [(strategy, n) for n in ns if floor <= n <= limit]
        notes += [
            f"{FAMILY[strategy]} {src.spec.name} N={n} ({src.leaf} pixels) was skipped: a beam width "
            f"N // (s·C) >= 1 needs N >= C = {floor}"
            for n in ns
            if n < floor
        ]
        if strategy == "data" and any(n > limit for n in ns):
            pairs.append((strategy, limit))  # every distinct training code
    return pairs


def beam_starts(src: SourceModel, N: int) -> int:
    """DMBS starting tokens per class: the configured s, lowered so that the width N / (s·C) is at least 1."""
    return max(1, min(src.spec.starts, N // src.prior.num_classes))


def select_latents(src: SourceModel, cfg: RunConfig, strategy: str, N: int | None) -> tuple[Selection, float]:
    """The selection of ``strategy`` with ``N`` latents (the run's seed: the same on every call), and the
    seconds it took (wall time); made once per source model and process."""
    if (strategy, N) not in src.selections:
        gen = torch.Generator().manual_seed(cfg.seed)
        start = time.perf_counter()
        selection = select(
            src.prior,
            strategy,
            N or 0,
            starts=beam_starts(src, N or 0),
            beam_score=src.spec.beam_score,
            beam_search=src.spec.beam_search,
            generator=gen,
            max_space=cfg.max_exhaustive,
            device=cfg.device,
            codes_from_data=src.train_codes if strategy == "data" else None,
        )
        src.selections[strategy, N] = (selection, time.perf_counter() - start)
    return src.selections[strategy, N]


def make_selection(src: SourceModel, cfg: RunConfig, strategy: str, N: int | None) -> Selection:
    """The latents ``strategy`` selects from ``src``'s prior."""
    return select_latents(src, cfg, strategy, N)[0]


def selection_weights(src: SourceModel, strategy: str) -> str:
    """Mixture weights of a selection: p(z) for exhaustive (the exact model) and data (code counts)."""
    return "prior" if strategy in ("exhaustive", "data") else src.spec.weights


def circuit_meta(src: SourceModel) -> dict[str, Any]:
    return {"model": src.spec.name, "leaf": src.leaf, "K": src.spec.K, "latent_hw": list(src.spec.latent_hw)}


def make_circuit(
    src: SourceModel, cfg: RunConfig, strategy: str, N: int | None, selection: Selection | None = None
) -> MixtureCircuit:
    """Distill ``selection`` (default: select latents with ``strategy`` now); exhaustive uses prior weights:
    the exact model."""
    selection = selection if selection is not None else make_selection(src, cfg, strategy, N)
    return distill(
        src.vqvae,
        selection,
        weights=selection_weights(src, strategy),
        meta=circuit_meta(src),
        std_floor=src.spec.std_floor,
    )


def floor_tags(spec: ModelSpec) -> tuple[str, str]:
    """(file/cache-key suffix, label suffix) of the model's std floor: circuits with another floor are other files."""
    if spec.std_floor is None:
        return "", ""
    return f"-floor{spec.std_floor:g}", f" σ≥{spec.std_floor:g}"


def distill_params(cfg: RunConfig, spec: ModelSpec, *extra: str, strategy: str | None = None) -> dict[str, Any]:
    """The settings a distilled row of ``strategy`` depends on besides its files (a change recomputes the row);
    the beam score and search only for DMBS rows."""
    keys = ("weights", "starts", "std_floor", "prior", *extra) + (
        ("beam_score", "beam_search") if strategy == "beam" else ()
    )
    return {
        **{k: getattr(spec, k) for k in keys},
        "seed": cfg.seed,
        "bpd_format": BPD_FORMAT,
        "test_limit": cfg.test_limit,
        "exact_test_limit": cfg.exact_test_limit,
        "bpd_draws": cfg.experiments.bpd_draws,
        "max_exhaustive": cfg.max_exhaustive,
        "max_materialize": cfg.max_materialize,
        "bpd_discrete": cfg.experiments.bpd_discrete,
    }


def leaf_params(leaf: str, S: int, levels: int) -> int:
    """Parameters of one component's leaves."""
    return {"gaussian": 2 * S, "categorical": S * levels, "bernoulli": S}[leaf]
