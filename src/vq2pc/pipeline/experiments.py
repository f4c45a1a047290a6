"""Pipeline stage: the paper's experiments on the main source model of one leaf kind.

Fig. 1 latent usage, Fig. 2 BPD vs size, Fig. 3 inpainting (pictures + numbers),
Figs. 4–5 samples and their class balance, Fig. 6 latent correlation. Each writes
a PNG under ``figures/`` and its numbers under ``results/<leaf>/``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
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


@dataclass
class _Leaf:
    """What the experiments of one leaf kind read: the run, the main and analysis models, the models shown
    in the figures, and the files (``inputs``) and settings (``params``) whose change redoes an experiment.

    ``params`` leave out the classification keys: the classification stage alone reads them, so results
    cached before they existed stay valid.
    """

    run: RunDir
    cfg: RunConfig
    splits: DataSplits
    leaf: str
    main: SourceModel
    circuits: Models
    analysis: SourceModel
    models: Models
    inputs: tuple[Path, ...] = field(init=False)
    params: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        cfg, folder = self.cfg, self.run.root
        self.inputs = (
            self.main.files
            + tuple(folder.glob(f"{self.leaf}/{self.main.spec.name}/circuits/*"))
            + tuple(folder.glob(f"{self.leaf}/baselines/*"))
        )
        own = {k: v for k, v in dataclasses.asdict(cfg.experiments).items() if not k.startswith("classification")}
        self.params = {
            "experiments": own,
            "seed": cfg.seed,
            "main": cfg.main.name,
            "analysis": cfg.analysis.name,
            "max_usage_space": cfg.max_usage_space,
        }

    def fig(self, name: str) -> Path:
        return self.run.figure(f"{self.leaf}-{name}.png")

    @functools.cached_property
    def x_test(self) -> torch.Tensor:
        """The test images in model space, flattened: ``[n, S]``."""
        return to_model_space(self.splits.test_x, self.leaf, self.splits.levels, _gen(self.cfg)).flatten(1)

    def cached(
        self,
        stage: str,
        compute: Callable[[], dict[str, Any]],
        outputs: tuple[str, ...],
        depends: tuple[Path, ...],
        name: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``results/<leaf>/<name>.json`` (``name`` defaults to ``stage``), recomputed when its figures
        ``outputs``, ``depends`` or the experiment settings changed (see :meth:`RunDir.cached`)."""
        return self.run.cached(
            stage,
            f"{self.leaf}/{name or stage}",
            compute,
            outputs=tuple(self.fig(k) for k in outputs),
            depends=depends,
            params=self.params if params is None else params,
        )


def _bpd_figures(c: _Leaf, rows: list[dict[str, Any]]) -> dict[str, str]:
    """BPD against parameters and against N, and the test BPD tails where the rows have quantiles."""
    title = f"{c.cfg.dataset}, {c.leaf} pixels"
    figures = {
        "bpd_vs_params": str(ev.plot_bpd_vs_params(rows, c.fig("bpd_vs_params"), title=title)),
        "bpd_vs_N": str(ev.plot_bpd_vs_N(rows, c.fig("bpd_vs_N"), title=title)),
    }
    if any(r.get("test_bpd_quantiles") for r in rows):
        figures["bpd_tails"] = str(plot_bpd_tails(rows, c.fig("bpd_tails"), title=title))
    return figures


def _usage_section(c: _Leaf, section: dict[str, Any]) -> None:
    """Fig. 1 for the analysis model, when its latent space can be enumerated."""
    if c.cfg.experiments.usage and c.analysis.info["latent_space"] <= c.cfg.max_usage_space:
        compute = functools.partial(_usage, c.run, c.cfg, c.splits, c.analysis, c.fig("latent_usage"))
        section["latent_usage"] = c.cached("usage", compute, ("latent_usage",), c.analysis.files, "latent_usage")


def _inpainting_section(c: _Leaf, section: dict[str, Any]) -> None:
    """Fig. 3: inpainting pictures and numbers of the shown models."""
    if c.cfg.experiments.inpainting:
        section["inpainting"] = c.cached(
            "inpainting",
            lambda: _inpainting(c.cfg, c.splits, c.leaf, c.models, c.x_test, c.fig("inpainting")),
            ("inpainting",),
            c.inputs,
        )
        section["figures"]["inpainting"] = str(c.fig("inpainting"))


def _samples_section(c: _Leaf, section: dict[str, Any]) -> None:
    """Figs. 4–5: samples of the shown models and their class balance."""
    if c.cfg.experiments.samples:
        compute = functools.partial(_samples, c.run, c.cfg, c.splits, c.leaf, c.models, c.fig)
        section["class_balance"] = c.cached("samples", compute, ("samples", "class_balance"), c.inputs, "class_balance")
        section["figures"]["samples"] = str(c.fig("samples"))


def _correlation_section(c: _Leaf, section: dict[str, Any]) -> None:
    """Fig. 6: latent correlation of the analysis model's sampled and top-k components."""
    E = c.cfg.experiments
    if E.correlation:
        section["correlation"] = c.cached(
            "correlation",
            lambda: {
                **ev.component_correlation(
                    make_circuit(c.analysis, c.cfg, "sample", 4),
                    make_circuit(c.analysis, c.cfg, "topk", 4),
                    c.x_test[: E.correlation_images],
                    c.fig("correlation"),
                ),
                "model": c.analysis.spec.name,
            },
            ("correlation",),
            c.analysis.files,
        )


def _classification_section(c: _Leaf, section: dict[str, Any]) -> None:
    """The class-aware circuits of the main model (labelled data and a class-conditional prior only)."""
    E = c.cfg.experiments
    if E.classification and c.splits.num_classes > 1 and c.main.prior.num_classes > 1:
        section["classification"] = c.cached(
            "classification",
            lambda: classification_experiment(c.run, c.cfg, c.splits, c.leaf, c.main, c.circuits, c.fig),
            ("classification", "classification_calibration", "class_samples"),
            c.inputs,
            params={**c.params, "classification": dataclasses.asdict(E)},
        )
        if "skipped" not in section["classification"]:
            section["figures"].update({k: str(c.fig(k)) for k in ("classification_calibration", "class_samples")})


# The experiments in report order; each writes its part of the section when it is enabled.
_EXPERIMENTS: tuple[Callable[[_Leaf, dict[str, Any]], None], ...] = (
    _usage_section,
    _inpainting_section,
    _samples_section,
    _correlation_section,
    _classification_section,
)


def _relative_figures(section: dict[str, Any], root: Path) -> None:
    """Figure paths relative to the run folder: report.json stays true when the folder is moved or copied."""
    section["figures"] = {k: os.path.relpath(v, root) for k, v in section["figures"].items()}
    for part in section.values():
        if isinstance(part, dict) and isinstance(part.get("figure"), str):
            part["figure"] = os.path.relpath(part["figure"], root)


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
    (main, circuits), analysis = built[cfg.main.name], built[cfg.analysis.name][0]
    context = _Leaf(run, cfg, splits, leaf, main, circuits, analysis, showcase_models(circuits, baselines))
    rows = [r for r in report["models"] if r.get("leaf") == leaf]
    section: dict[str, Any] = {"leaf": leaf, "results": rows, "figures": _bpd_figures(context, rows)}
    for experiment in _EXPERIMENTS:
        experiment(context, section)
    _relative_figures(section, run.root)
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
