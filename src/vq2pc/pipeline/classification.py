"""Pipeline stage: the classification experiment — class-aware versions of the run's circuits.

For the largest DMRS, DMBS and ExM circuit of the main model and their +FT twins (where present),
the class weights come from the prior over the same latents (``w_{n,c} = w_n · p(c | z_n)``, so each
row keeps its own ``p̂(x)`` and only gains the class; for ExM that is exactly ``p(c) p(z | c)``), and
:mod:`vq2pc.evaluate.classification` measures them beside the report's CNN. Each circuit is measured a
second time with ``p(c | n)`` fitted to the training labels (:mod:`vq2pc.circuit.class_fit`, ``w_n`` kept;
the Dirichlet pseudo-count and EM iterations chosen by validation label NLL): the row ``"<label>, fitted
p(c|n)"``.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vq2pc.circuit.class_fit import ClassFit, choose_class_fit
from vq2pc.circuit.class_weights import class_weights
from vq2pc.circuit.classes import ClassMixture
from vq2pc.circuit.distill import decode_leaf
from vq2pc.data.datasets import DataSplits, to_model_space
from vq2pc.evaluate import classification as ec
from vq2pc.evaluate.classifier import train_classifier
from vq2pc.evaluate.common import to_unit
from vq2pc.latents.enumerate import index_to_codes
from vq2pc.latents.selection import Selection
from vq2pc.pipeline.config import RunConfig
from vq2pc.pipeline.models import FAMILY, SourceModel, make_selection
from vq2pc.pipeline.rundir import Models, RunDir

__all__ = ["FITTED", "class_rows", "classification_experiment", "shared_classifier"]

FITTED = ", fitted p(c|n)"
"""Suffix of the rows whose class weights are fitted to the training labels."""

STRATEGIES = ("sample", "beam", "exhaustive")
_KEY = re.compile(r"^(?P<strategy>[a-z]+)(?:-N(?P<N>\d+))?(?:-floor[^-]+)?(?P<ft>-ft)?$")


def class_rows(circuits: Models) -> dict[str, tuple[str, str, int | None]]:
    """``label -> (circuit key, strategy, N)``: the largest circuit of each of DMRS, DMBS, ExM and their +FT
    twins (std-capped +FT circuits are left out: they are made for samples)."""
    best: dict[str, tuple[int, str, str, int | None]] = {}
    for key, size in circuits.sizes.items():
        m = _KEY.match(key)
        if m is None or m["strategy"] not in STRATEGIES:
            continue
        family = FAMILY[m["strategy"]] + ("+FT" if m["ft"] else "")
        n = None if m["N"] is None else int(m["N"])
        if family not in best or size > best[family][0]:
            best[family] = (size, key, m["strategy"], n)
    return {f"{family} (N={size})": (key, strategy, n) for family, (size, key, strategy, n) in best.items()}


def shared_classifier(run: RunDir, cfg: RunConfig, splits: DataSplits) -> tuple[Any, float]:
    """The report's CNN (the samples experiment's checkpoint: trained once, reused by both)."""
    E = cfg.experiments
    train_cfg = dataclasses.replace(cfg.baseline_train, seed=cfg.seed, device=cfg.device)
    if E.classifier_epochs is not None:
        train_cfg = dataclasses.replace(train_cfg, epochs=E.classifier_epochs, max_seconds=None)
    return train_classifier(splits, train_cfg, checkpoint=run.checkpoint("samples", "classifier.pt"))


def _class_models(src: SourceModel, cfg: RunConfig, circuits: Models) -> dict[str, Callable[[], ClassMixture]]:
    """Loaders of the class-aware circuits by label (each built when an experiment step reads it)."""

    def loader(key: str, strategy: str, n: int | None) -> Callable[[], ClassMixture]:
        def load() -> ClassMixture:
            circuit = circuits[key]
            if strategy == "exhaustive":  # every latent in lexicographic order: no search (nor second enumeration)
                codes = index_to_codes(torch.arange(len(circuit)), src.prior.K, *src.prior.latent_hw)
                selection = Selection(codes, circuit.log_weights.float().cpu(), strategy)
            else:
                selection = make_selection(src, cfg, strategy, n)
            if len(selection) != len(circuit) or not (key.endswith("-ft") or _same_components(src, selection, circuit)):
                raise ValueError(
                    f"circuit {key} does not hold the latents its selection {strategy} N={n} makes now "
                    "(made by other code or settings): redo it with --force distill"
                )
            return ClassMixture(circuit, class_weights(src.prior, selection, base_log_weights=circuit.log_weights))

        return load

    return {label: loader(*spec) for label, spec in class_rows(circuits).items()}


@dataclass(frozen=True)
class _Labeled:
    """Labeled images in model space the fitted class weights are chosen with: ``train`` and ``val``,
    each ``(x [B, S], y [B])``."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]


def _fit_summary(fit: ClassFit, images: int) -> dict[str, Any]:
    """The report's record of a fit: the chosen pseudo-count and iterations, the training images, and the
    validation label NLL of every candidate."""
    nll = {f"alpha={a:g}, iterations={i}": round(v, 5) for (a, i), v in fit.val_nll.items()}
    return {"alpha": fit.alpha, "iterations": fit.iterations, "train_images": images, "val_nll": nll}


def _fitted_models(
    cfg: RunConfig, circuits: Models, data: _Labeled, num_classes: int, fits: dict[str, Any]
) -> dict[str, Callable[[], ClassMixture]]:
    """Loaders of the circuits with ``p(c | n)`` fitted to ``data`` (by the prior rows' label; each fit's
    summary lands in ``fits`` when it is made)."""
    E = cfg.experiments

    def loader(label: str, key: str) -> Callable[[], ClassMixture]:
        def load() -> ClassMixture:
            circuit = circuits[key]
            fit = choose_class_fit(
                circuit, data.train, data.val, num_classes, E.classification_fit_alphas, E.classification_fit_iterations
            )
            fits[label + FITTED] = _fit_summary(fit, len(data.train[1]))
            return ClassMixture(circuit, fit.log_weights)

        return load

    return {label: loader(label, key) for label, (key, _, _) in class_rows(circuits).items()}


def _same_components(src: SourceModel, selection: Selection, circuit: Any, k: int = 8) -> bool:
    """Whether the first ``k`` selected latents decode to the circuit's first ``k`` components (a distilled,
    not fine-tuned, circuit), so the class weights of ``selection`` belong to this circuit."""
    leaf = decode_leaf(src.vqvae, selection.codes[:k], std_floor=src.spec.std_floor)
    mine = circuit.leaf[torch.arange(min(k, len(circuit)))].tensors()
    return all(
        torch.allclose(t.float().cpu(), mine[name].float().cpu(), atol=1e-4, rtol=1e-4)
        for name, t in leaf.tensors().items()
    )


@dataclass(frozen=True)
class _TestImages:
    """The first ``n`` test images in model space ``x`` ``[n, S]``, their ``labels`` ``[n]`` and the hiding
    ``masks`` by kind (each ``[n, S]``, True = observed)."""

    x: torch.Tensor
    labels: torch.Tensor
    masks: dict[str, torch.Tensor]

    @property
    def shown(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and their left-hidden masks drawn in the class-sample figure: the first two."""
        return self.x[:2], self.masks["left"][:2]


def _measure(
    loaders: dict[str, Callable[[], ClassMixture]],
    test: _TestImages,
    splits: DataSplits,
    leaf: str,
    classifier: Any,
    train_mean: torch.Tensor,
    seed: int,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, list]]:
    """Each class-aware circuit's metrics beside the CNN's, one circuit in memory at a time: (results, the
    class posteriors by label and mask for the calibration figure, the class-sample panels by label)."""
    results: dict[str, Any] = {"circuit": {}, "cnn_mean": {}, "cnn_circuit": {}}
    full: dict[str, torch.Tensor] = {}
    panels: dict[str, list] = {}
    shape = tuple(splits.image_shape)
    for label, load in loaders.items():
        model = load()
        fitted = label.endswith(FITTED)  # its prior row's p̂(x): the same imputation; class samples shown once
        part, posts = ec.classification_metrics(
            {label: model},
            test.x,
            test.labels,
            test.masks,
            leaf,
            splits.levels,
            shape,
            None if fitted else classifier,
            train_mean,
        )
        results["circuit"].update(part["circuit"])
        full.update(posts)
        if fitted:
            continue
        results["cnn_circuit"].update(part["cnn_circuit"])
        results["cnn_mean"], results["hidden_fraction"] = part["cnn_mean"], part["hidden_fraction"]
        panels[label] = ec.class_panels(
            model,
            *test.shown,
            leaf,
            splits.levels,
            shape,
            generator=torch.Generator().manual_seed(seed + 6),
        )
        del model
    return results, full, panels


def classification_experiment(
    run: RunDir,
    cfg: RunConfig,
    splits: DataSplits,
    leaf: str,
    src: SourceModel,
    circuits: Models,
    fig: Callable[[str], Any],
) -> dict[str, Any]:
    """Numbers (and three figures) of the classification experiment for ``leaf``."""
    E, start, cpu = cfg.experiments, time.perf_counter(), time.process_time()
    n = min(E.classification_images, len(splits.test_x))
    x = to_model_space(splits.test_x[:n], leaf, splits.levels, torch.Generator().manual_seed(cfg.seed)).flatten(1)
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    masks = ec.classification_masks(tuple(splits.image_shape), n, tuple(E.classification_fractions), generator=gen)
    test = _TestImages(x, splits.test_y[:n], masks)
    classifier, cnn_accuracy = shared_classifier(run, cfg, splits)
    train = to_model_space(splits.train_x, leaf, splits.levels, gen).flatten(1)
    train_unit = to_unit(train, leaf, splits.levels)
    prior_rows = _class_models(src, cfg, circuits)
    if not prior_rows:
        return {"skipped": "no DMRS, DMBS or ExM circuit to classify with"}
    fit_n = min(E.classification_fit_images or len(train), len(train))
    val = to_model_space(splits.val_x, leaf, splits.levels, gen).flatten(1)
    data = _Labeled((train[:fit_n], splits.train_y[:fit_n]), (val, splits.val_y))
    fits: dict[str, Any] = {}
    loaders = dict(prior_rows)
    if E.classification_fit:
        fitted = _fitted_models(cfg, circuits, data, src.prior.num_classes, fits)
        loaders = {
            k: v for label in prior_rows for k, v in ((label, prior_rows[label]), (label + FITTED, fitted[label]))
        }
    results, full, panels = _measure(loaders, test, splits, leaf, classifier, train_unit.mean(0), cfg.seed)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    ec.plot_classification(results, fig("classification"), title=f"{cfg.dataset}, {leaf} pixels, {n} test images")
    ec.plot_calibration(full, test.labels, fig("classification_calibration"))
    ec.plot_class_samples(panels, 6 + 1 + 2 * len(test.shown[0]), src.prior.num_classes, fig("class_samples"))
    for per in results["circuit"].values():
        for metrics in per.values():
            metrics.pop("reliability", None)
    return {
        **results,
        "images": n,
        "cnn_test_accuracy": cnn_accuracy,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "class_weights": "w_{n,c} = w_n p(c | z_n) from the prior (each row's own p(x) kept); rows "
        f"'{FITTED.lstrip(', ')}': p(c | n) fitted by EM to {fit_n} training labels, w_n kept (same p(x)), "
        "the Dirichlet pseudo-count alpha chosen by validation label NLL",
        "class_fit": fits,
        "figure": str(fig("classification")),
    }
