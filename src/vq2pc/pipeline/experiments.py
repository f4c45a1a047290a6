"""Pipeline stage: the paper's experiments on the main source model of one leaf kind.

Fig. 1 latent usage, Fig. 2 BPD vs size, Fig. 3 inpainting (pictures + numbers),
Figs. 4–5 samples and their class balance, Fig. 6 latent correlation. Each writes
a PNG under ``figures/`` and its numbers under ``results/<leaf>/``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import replace
from typing import Any

import torch

from vq2pc import evaluate as ev
from vq2pc.circuit.finetune import CAP_MARK
from vq2pc.data.datasets import DataSplits, to_model_space
from vq2pc.data.masks import MASK_KINDS, make_mask
from vq2pc.evaluate.density import plot_bpd_tails
from vq2pc.latents.enumerate import enumerate_log_prior
from vq2pc.pipeline.classification import classification_experiment, shared_classifier
from vq2pc.pipeline.config import RunConfig
from vq2pc.pipeline.models import FAMILY, SourceModel, build_source_model, make_circuit
from vq2pc.pipeline.rundir import Models, RunDir

__all__ = ["run_experiments", "showcase_models"]


def showcase_models(circuits: Models, baselines: dict[str, Any]) -> Models:
    """The models shown in the figures: the largest circuit of each strategy, then the baselines
    (each circuit is loaded when an experiment reads it)."""
    best: dict[str, tuple[int, str]] = {}
    for key, n in circuits.sizes.items():
        strategy, *parts = key.split("-")  # strategy[-N<n>][-floor<f>][-ft[-cap<c>]]
        family = (
            FAMILY[strategy]
            + ("+FT" if "ft" in parts else "")
            + "".join(CAP_MARK + p[3:] for p in parts if p.startswith("cap"))
        )
        if family not in best or n > best[family][0]:
            best[family] = (n, key)
    shown = Models(circuits.device)
    for family, (n, key) in best.items():
        shown.loaders[f"{family} (N={n})"] = circuits.loaders[key]
    einets = [k for k in baselines if k.startswith("EiNet")]
    for name, model in baselines.items():
        if not name.startswith("EiNet"):
            shown.add_model(name, model)
    if einets:  # the largest EiNet stands for all of them in the pictures
        name = max(einets, key=lambda k: baselines[k].num_params)
        shown.add_model(name, baselines[name])
    return shown


def _gen(cfg: RunConfig, offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed + offset)


def run_experiments(
    run: RunDir,
    cfg: RunConfig,
    splits: DataSplits,
    leaf: str,
    built: dict[str, tuple[SourceModel, Models]],
    baselines: dict[str, Any],
    report: dict[str, Any],
) -> dict[str, Any]:
    """Every enabled experiment for ``leaf``; returns the report section of this leaf.

    ``built``: model name -> (source model, its circuit files by selection key).
    """
    E = cfg.experiments
    (main, circuits), analysis = built[cfg.main.name], built[cfg.analysis.name][0]
    inputs = (
        main.files
        + tuple(run.root.glob(f"{leaf}/{main.spec.name}/circuits/*"))
        + tuple(run.root.glob(f"{leaf}/baselines/*"))
    )  # an experiment is redone when one of these changes
    rows = [r for r in report["models"] if r.get("leaf") == leaf]
    fig = lambda name: run.figure(f"{leaf}-{name}.png")  # noqa: E731
    section: dict[str, Any] = {"leaf": leaf, "results": rows, "figures": {}}
    section["figures"]["bpd_vs_params"] = str(
        ev.plot_bpd_vs_params(rows, fig("bpd_vs_params"), title=f"{cfg.dataset}, {leaf} pixels")
    )
    section["figures"]["bpd_vs_N"] = str(ev.plot_bpd_vs_N(rows, fig("bpd_vs_N"), title=f"{cfg.dataset}, {leaf} pixels"))
    if any(r.get("test_bpd_quantiles") for r in rows):
        section["figures"]["bpd_tails"] = str(
            plot_bpd_tails(rows, fig("bpd_tails"), title=f"{cfg.dataset}, {leaf} pixels")
        )
    models = showcase_models(circuits, baselines)
    # the classification keys are read by the classification stage alone: results cached before them stay valid
    own = {k: v for k, v in dataclasses.asdict(E).items() if not k.startswith("classification")}
    params = {
        "experiments": own,
        "seed": cfg.seed,
        "main": cfg.main.name,
        "analysis": cfg.analysis.name,
        "max_usage_space": cfg.max_usage_space,
    }  # a change redoes the experiments
    if E.usage and analysis.info["latent_space"] <= cfg.max_usage_space:
        section["latent_usage"] = run.cached(
            "usage",
            f"{leaf}/latent_usage",
            lambda: _usage(run, cfg, splits, analysis, fig("latent_usage")),
            outputs=(fig("latent_usage"),),
            depends=analysis.files,
            params=params,
        )
    x_test = to_model_space(splits.test_x, leaf, splits.levels, _gen(cfg)).flatten(1)
    if E.inpainting:
        section["inpainting"] = run.cached(
            "inpainting",
            f"{leaf}/inpainting",
            lambda: _inpainting(cfg, splits, leaf, models, x_test, fig("inpainting")),
            outputs=(fig("inpainting"),),
            depends=inputs,
            params=params,
        )
        section["figures"]["inpainting"] = str(fig("inpainting"))
    if E.samples:
        section["class_balance"] = run.cached(
            "samples",
            f"{leaf}/class_balance",
            lambda: _samples(run, cfg, splits, leaf, models, fig),
            outputs=(fig("samples"), fig("class_balance")),
            depends=inputs,
            params=params,
        )
        section["figures"]["samples"] = str(fig("samples"))
    if E.correlation:
        section["correlation"] = run.cached(
            "correlation",
            f"{leaf}/correlation",
            lambda: {
                **ev.component_correlation(
                    make_circuit(analysis, cfg, "sample", 4),
                    make_circuit(analysis, cfg, "topk", 4),
                    x_test[: E.correlation_images],
                    fig("correlation"),
                ),
                "model": analysis.spec.name,
            },
            outputs=(fig("correlation"),),
            depends=analysis.files,
            params=params,
        )
    if E.classification and splits.num_classes > 1 and main.prior.num_classes > 1:
        outputs = tuple(fig(k) for k in ("classification", "classification_calibration", "class_samples"))
        section["classification"] = run.cached(
            "classification",
            f"{leaf}/classification",
            lambda: classification_experiment(run, cfg, splits, leaf, main, circuits, fig),
            outputs=outputs,
            depends=inputs,
            params={**params, "classification": dataclasses.asdict(E)},
        )
        if "skipped" not in section["classification"]:
            section["figures"].update({k: str(fig(k)) for k in ("classification_calibration", "class_samples")})
    # relative to the run folder: report.json stays true when the folder is moved or copied
    section["figures"] = {k: os.path.relpath(v, run.root) for k, v in section["figures"].items()}
    for part in section.values():
        if isinstance(part, dict) and isinstance(part.get("figure"), str):
            part["figure"] = os.path.relpath(part["figure"], run.root)
    return section


def _usage(run: RunDir, cfg: RunConfig, splits: DataSplits, src: SourceModel, png) -> dict[str, Any]:
    """Fig. 1 for ``src``: exact p(z) over the whole latent space (timed), sorted CDF.

    With ``experiments.usage_seeds`` the same model is trained again with each extra seed and the
    figure shows mean ± std over all of them.
    """
    seeded = [
        (s, replace(src.spec, name=f"{src.spec.name}-seed{s}", vqvae_from=None))  # each trains its own VQ-VAE
        for s in cfg.experiments.usage_seeds
        if s != cfg.seed
    ]
    priors = [src.prior] + [
        build_source_model(run, replace(cfg, seed=s), splits, src.leaf, spec).prior for s, spec in seeded
    ]
    start = time.perf_counter()
    log_pzs = [enumerate_log_prior(p, device=cfg.device, max_space=cfg.max_usage_space) for p in priors]
    seconds = (time.perf_counter() - start) / len(priors)
    title = f"{cfg.dataset} {src.spec.name}: K={src.spec.K}, {src.prior.num_classes} classes"
    usage = ev.latent_usage(log_pzs if len(log_pzs) > 1 else log_pzs[0], png, title=title)
    return {
        **usage,
        "model": src.spec.name,
        "enumeration_seconds": seconds,
        "seeds_used": [cfg.seed] + [s for s in cfg.experiments.usage_seeds if s != cfg.seed],
    }


def _inpainting(cfg: RunConfig, splits: DataSplits, leaf: str, models: Models, x_test: torch.Tensor, png) -> dict:
    E = cfg.experiments
    x = x_test[: E.inpainting_eval_images]
    masks = {k: make_mask(k, tuple(splits.image_shape), len(x), generator=_gen(cfg, 1)) for k in MASK_KINDS}
    pictures = {k: v[: E.inpainting_images] for k, v in masks.items()}
    metrics, panels, gen = {}, {}, _gen(cfg, 2)
    for name in models:  # each model loaded once (a file-backed circuit is read when accessed)
        model = models[name]
        metrics[name] = ev.inpainting_metrics(model, x, masks, leaf, splits.levels)
        panels[name] = ev.inpainting_panels(
            model, x[: E.inpainting_images], pictures, tuple(splits.image_shape), leaf, splits.levels, gen
        )
    ev.plot_inpainting_panels(panels, png)
    return metrics


def _samples(run: RunDir, cfg: RunConfig, splits: DataSplits, leaf: str, models: Models, fig) -> dict:
    E = cfg.experiments
    classifier, acc = shared_classifier(run, cfg, splits)
    samples = {
        name: ev.draw_samples(
            m, E.num_samples, leaf, splits.levels, tuple(splits.image_shape), batch_size=250, generator=_gen(cfg, 3)
        )
        for name, m in models.items()
    }
    ev.plot_samples(samples, tuple(splits.image_shape), fig("samples"))
    hist = ev.class_balance(
        classifier, samples, splits.train_y, fig("class_balance"), test_images=splits.test_x, levels=splits.levels
    )
    return {
        "classifier_accuracy": acc,
        "histograms": hist,
        "figure": str(fig("class_balance")),
        "samples_per_model": E.num_samples,
    }
