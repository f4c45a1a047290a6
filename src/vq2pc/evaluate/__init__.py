"""Every experiment of the paper as a function that returns numbers and writes a figure.

* :func:`latent_usage` — Fig. 1, prior mass versus fraction of the latent space;
* :func:`test_bpd`, :func:`plot_bpd_vs_params`, :func:`plot_bpd_vs_N` — Figs. 2 / 7;
* :func:`inpainting_metrics`, :func:`plot_inpainting` — Fig. 3, with conditional BPD and MSE;
* :func:`train_classifier`, :func:`draw_samples`, :func:`class_balance`, :func:`plot_samples` — Figs. 4–5;
* :func:`component_correlation` — Fig. 6;
* :func:`write_report`, :func:`write_report_json` — ``report.md`` / ``report.json``.

Functions take any :class:`DensityModel` (``log_prob``, ``sample``, ``num_params``),
so distilled circuits and baselines are evaluated by the same code. Numbers are
returned as JSON-able dicts; figures are PNGs written atomically.

Stage 6 of the flow. May import: every stage up to :mod:`vq2pc.baselines`.
"""

from __future__ import annotations

from vq2pc.evaluate.classifier import (
    ClassifierConfig,
    SmallCNN,
    accuracy,
    classify,
    load_classifier,
    train_classifier,
)
from vq2pc.evaluate.common import (
    ComponentModel,
    DensityModel,
    InpaintingModel,
    images_to_unit,
    to_unit,
)
from vq2pc.evaluate.correlation import (
    component_correlation,
    joint_log_likelihoods,
    mean_pairwise_correlation,
)
from vq2pc.evaluate.density import (
    model_log_prob,
    plot_bpd_vs_N,
    plot_bpd_vs_params,
    test_bpd,
)
from vq2pc.evaluate.inpainting import (
    conditional_bpd,
    inpainting_metrics,
    inpainting_panels,
    plot_inpainting,
    plot_inpainting_panels,
)
from vq2pc.evaluate.report import (
    CAPTIONS,
    render_report,
    write_report,
    write_report_json,
)
from vq2pc.evaluate.samples import (
    class_balance,
    draw_samples,
    kl_from_uniform,
    kl_std,
    label_histogram,
    plot_samples,
)
from vq2pc.evaluate.usage import latent_usage, usage_curve

__all__ = [
    "DensityModel",
    "InpaintingModel",
    "ComponentModel",
    "to_unit",
    "images_to_unit",
    "latent_usage",
    "usage_curve",
    "test_bpd",
    "model_log_prob",
    "plot_bpd_vs_params",
    "plot_bpd_vs_N",
    "inpainting_metrics",
    "conditional_bpd",
    "inpainting_panels",
    "plot_inpainting",
    "plot_inpainting_panels",
    "ClassifierConfig",
    "SmallCNN",
    "train_classifier",
    "classify",
    "accuracy",
    "load_classifier",
    "draw_samples",
    "kl_from_uniform",
    "kl_std",
    "label_histogram",
    "class_balance",
    "plot_samples",
    "component_correlation",
    "joint_log_likelihoods",
    "mean_pairwise_correlation",
    "write_report",
    "write_report_json",
    "render_report",
    "CAPTIONS",
]
