"""``report.md`` (and ``report.json``) of a run directory.

The report dict the pipeline assembles (every key optional except as noted)::

    {"dataset": "digits", "leaf": "gaussian", "wall_time_s": 183.2, "device": "cpu",
     "settings": {...},                                   # flat or nested config values
     "results": [{"name", "family" | "selection", "N", "num_params", "test_bpd", "test_bpd_std", "selection_seconds"}],
     "figures": {"bpd_vs_N": "bpd_vs_N.png" | {"path": ..., "caption": ...}, ...},
     "latent_usage": latent_usage(...), "correlation": component_correlation(...),
     "inpainting": {model: inpainting_metrics(...)},
     "class_balance": {"classifier_accuracy": 0.97, "histograms": class_balance(...)},
     "classification": {"circuit": {model: {mask: {"accuracy", "ece", "nll"}}}, "cnn_mean": {mask: ...},
                        "cnn_circuit": {model: {mask: ...}}, "hidden_fraction": {mask: f}, "images": n},
     "notes": ["..."]}

Figures whose key is known (see :data:`CAPTIONS`) get a caption saying what they
show and what to look for; a section dict's own ``"figure"`` entry is picked up too.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from vq2pc.core.files import atomic_write, write_json
from vq2pc.evaluate.density import FAMILY_ORDER

__all__ = ["write_report", "write_report_json", "render_report", "CAPTIONS"]

CAPTIONS: dict[str, str] = {
    "latent_usage": "Latent-space usage (Fig. 1): cumulative prior mass over latents sorted by p(z), against the "
    "fraction of the latent space (log x). Look for how small a fraction holds 90% / 99% of the mass "
    "(red lines) compared with the uniform prior (dashed green curve, F = fraction).",
    "bpd_vs_params": "Density estimation (Fig. 2): test BPD versus number of parameters. Hollow markers are "
    "distilled circuits, filled ones trained models; dotted lines mark the source models' sizes. Look for "
    "how fast the distilled circuits approach the exact model (ExM) as they grow, and where they plateau.",
    "bpd_tails": "Per-image test BPD (quantile function, log y) of each family's largest model; dots mark the "
    "means. Look for curves that shoot up at the right: a tail of test images no component covers, which "
    "ruins the mean while the median stays fine.",
    "bpd_vs_N": "Test BPD versus the number of components N per selection strategy. Lower is better; look for "
    "which strategy reaches a given BPD with the fewest components.",
    "inpainting": "Inpainting (Fig. 3): per model (rows) and mask (columns): original, observed part (hidden "
    "pixels in red), exact conditional mean and a conditional sample. Look for plausible, sharp digits that "
    "agree with the observed part.",
    "samples": "Unconditional samples of each model (Fig. 4). Look for digit-like, diverse images.",
    "class_balance": "Class balance (Fig. 5): label distribution of the data, of the classifier on test data, "
    "and of each model's samples as classified (log y). Bars near the dashed uniform line (small KL) mean a "
    "balanced generator; a missing or dominant class reveals mode dropping or bias.",
    "correlation": "Latent correlation (Fig. 6): corner plots of the component log-likelihoods log p(x, z_n) "
    "on test images, randomly sampled components (left) versus top-p(z) components (right). Elongated "
    "diagonal contours and r near 1 mean redundant components.",
    "classification": "Classification with missing pixels: test accuracy of the class-aware circuits (exact "
    "p(c | x_o), solid) and of the CNN given the same images with hidden pixels set to the training mean (black "
    "dashed) or to the circuit's exact conditional mean (dotted), versus the fraction of random pixels missing "
    "(left) and per hidden region (right). Look for how slowly exact marginalization degrades.",
    "classification_calibration": "Calibration on full test images: reliability diagram (top; on the diagonal = "
    "calibrated, below = overconfident) and row-normalized confusion matrix (bottom) of each classifier.",
    "class_samples": "Class-aware circuits: per class (rows), samples of p(x | c), then two test images with the "
    "left half hidden (red) and their exact completions E[x_u | x_o, c] forced to that class. Look for samples "
    "of the right digit and completions that follow the class while agreeing with the observed half.",
}
_SECTIONS_WITH_FIGURES = ("latent_usage", "correlation", "class_balance", "classification")


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) < 10**12 else f"{v:.3e}"
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _results(results: list[dict]) -> list[str]:
    order = {f: i for i, f in enumerate(FAMILY_ORDER)}

    def key(r: dict) -> tuple:
        fam = r.get("family", r.get("selection", ""))
        return order.get(fam, len(order)), str(r.get("group", "")), r.get("N") or 0, str(r.get("name", ""))

    rows = []
    discrete = any(r.get("test_bpd_discrete") is not None for r in results)
    val = any(r.get("val_bpd") is not None for r in results)  # baselines: their sweeps are chosen on validation
    for r in sorted(results, key=key):
        bpd, std = r.get("test_bpd"), r.get("test_bpd_std")
        shown = f"{bpd:.4f} ± {std:.4f}" if isinstance(bpd, float) and isinstance(std, float) else _fmt(bpd)
        params = r.get("num_params")
        params = int(params) if isinstance(params, float) and params.is_integer() else params
        tail = " / ".join(_fmt(r.get(f"test_bpd_{k}"), 3) for k in ("median", "p90", "p99", "max"))
        secs = r.get("train_seconds", (r.get("finetune") or {}).get("seconds"))
        cost = None if secs is None else f"{secs:.0f}" + (" (capped)" if r.get("time_capped") else "")
        sel = r.get("selection_seconds")
        rows.append(
            [
                r.get("name"),
                r.get("selection", r.get("family")),
                r.get("N"),
                params,
                shown,
                tail,
                None if sel is None else f"{sel:.2f}",
                cost,
            ]
        )
        if discrete:
            rows[-1].insert(5, None if r.get("test_bpd_discrete") is None else f"{r['test_bpd_discrete']:.4f}")
        if val:
            rows[-1].insert(5, None if r.get("val_bpd") is None else f"{r['val_bpd']:.4f}")
    head = [
        "model",
        "selection",
        "N",
        "parameters",
        "test BPD ± std",
        "per-image BPD median / p90 / p99 / max",
        "selection time (s)",
        "training s",
    ]
    if discrete:  # Gaussian rows: the exact discrete BPD of the discretized twin (comparable with discrete MNIST)
        head.insert(5, "discrete BPD")
    if val:
        head.insert(5, "val BPD")
    return ["## Results", ""] + _table(head, rows)


def _figures(report: dict, run_dir: Path) -> list[tuple[str, str, str]]:
    """``(key, relative path, caption)`` of every figure, known keys first."""
    figs: dict[str, Any] = dict(report.get("figures") or {})
    for section in _SECTIONS_WITH_FIGURES:
        sec = report.get(section)
        if isinstance(sec, dict) and sec.get("figure") and section not in figs:
            figs[section] = sec["figure"]
    order = {k: i for i, k in enumerate(CAPTIONS)}
    out = []
    for k in sorted(figs, key=lambda k: (order.get(k, len(order)), k)):
        entry = figs[k] if isinstance(figs[k], dict) else {"path": figs[k]}
        path = Path(entry["path"])
        rel = os.path.relpath(path, run_dir) if path.is_absolute() else str(path)
        out.append((k, Path(rel).as_posix(), entry.get("caption") or CAPTIONS.get(k, k.replace("_", " "))))
    return out


def _usage(u: dict) -> list[str]:
    lines = ["## Latent-space usage", ""]
    model = f" of model {u['model']}" if u.get("model") else ""
    timing = f" Exact enumeration took {u['enumeration_seconds']:.1f} s." if u.get("enumeration_seconds") else ""
    lines.append(f"Latent space{model}: |Z| = {_fmt(u.get('space_size'))}, {u.get('seeds', 1)} prior(s).{timing}")
    for q in ("90", "99"):
        if f"fraction_{q}" in u:
            lines.append(
                f"- {q}% of the prior mass lies in {100 * u[f'fraction_{q}']:.3g}% of the space "
                f"(± {100 * u.get(f'fraction_{q}_std', 0.0):.2g}%; about {_fmt(u.get(f'count_{q}'))} latents)"
            )
    return lines + [""]


def _inpainting(inp: dict) -> list[str]:
    lines = [
        "## Inpainting (hidden pixels)",
        "",
        "Conditional BPD = −log2 p(x_u | x_o) per hidden variable; MSE of the exact conditional mean in "
        "[0,1] intensity units. Lower is better for both.",
        "",
    ]
    masks = sorted({m for per in inp.values() for m in per})
    rows = [
        [model] + [f"{_fmt(per[m]['cond_bpd'])} / {_fmt(per[m].get('mse'))}" if m in per else "—" for m in masks]
        for model, per in inp.items()
    ]
    return lines + _table(["model"] + [f"hidden {m}: BPD / MSE" for m in masks], rows)


def _balance(cb: dict) -> list[str]:
    lines = ["## Class balance of samples", ""]
    if cb.get("classifier_accuracy") is not None:
        lines += [f"Classifier test accuracy: {100 * cb['classifier_accuracy']:.2f}%.", ""]
    hists = cb.get("histograms") or {k: v for k, v in cb.items() if isinstance(v, dict) and "hist" in v}
    rows = [
        [name, h.get("n"), h.get("kl_from_uniform"), h.get("kl_std"), " ".join(str(c) for c in h.get("hist", []))]
        for name, h in hists.items()
    ]
    return lines + _table(["source", "images", "KL from uniform (nats)", "± std (bootstrap)", "counts per class"], rows)


def _classification(cl: dict) -> list[str]:
    if cl.get("skipped"):
        return ["## Classification with missing pixels", "", f"Skipped: {cl['skipped']}", ""]
    masks = list(cl.get("hidden_fraction") or {})
    rows = []
    for model, per in (cl.get("circuit") or {}).items():
        rows.append([f"{model}: exact p(c | x_o)"] + [100 * per[m]["accuracy"] if m in per else None for m in masks])
        imp = (cl.get("cnn_circuit") or {}).get(model) or {}
        if imp:
            rows.append([f"CNN, {model} imputation"] + [100 * imp[m]["accuracy"] if m in imp else None for m in masks])
    if cl.get("cnn_mean"):
        mean = cl["cnn_mean"]
        rows.append(["CNN, mean imputation"] + [100 * mean[m]["accuracy"] if m in mean else None for m in masks])
    lines = [
        "## Classification with missing pixels",
        "",
        f"Test accuracy (%) on {_fmt(cl.get('images'))} test images; missing pixels are marginalized exactly by "
        "the class-aware circuits and imputed for the CNN. Class weights: "
        f"{cl.get('class_weights', 'from the prior')}.",
        "",
    ]
    lines += _table(
        ["classifier"] + [m if m in ("full",) or m.startswith("random") else f"{m} hidden" for m in masks], rows
    )
    shown = [m for m in ("full", "random 50%", "center") if m in masks]
    calib = [
        [name] + [f"{_fmt(per[m]['ece'], 3)} / {_fmt(per[m]['nll'], 3)}" if m in per else "—" for m in shown]
        for name, per in [*(cl.get("circuit") or {}).items(), ("CNN, mean imputation", cl.get("cnn_mean") or {})]
    ]
    lines += ["Expected calibration error (15 bins) / label NLL (nats per image):", ""]
    lines += _table(["classifier"] + [f"{m}: ECE / NLL" for m in shown], calib)
    fits = [
        [name, f.get("alpha"), f.get("iterations"), f.get("train_images"), min(f["val_nll"].values())]
        for name, f in (cl.get("class_fit") or {}).items()
    ]
    if not fits:
        return lines
    lines += ["Class weights fitted to the training labels (pseudo-count chosen by validation label NLL):", ""]
    return lines + _table(["classifier", "alpha", "EM iterations", "training images", "validation NLL"], fits)


def _correlation(c: dict) -> list[str]:
    return [
        "## Latent correlation",
        "",
        f"Mean pairwise Pearson correlation of log p(x, z_n) over {_fmt(c.get('components'))} components and "
        f"{_fmt(c.get('images'))} test images: randomly sampled {_fmt(c.get('mean_pairwise_corr_random'))}, "
        f"top-p(z) {_fmt(c.get('mean_pairwise_corr_topk'))}.",
        "",
    ]


def _header(report: dict) -> list[str]:
    lines = [f"# vq2pc report — {report.get('dataset', 'unknown dataset')}", ""]
    facts = [
        ("dataset", report.get("dataset")),
        ("pixel model (leaf)", report.get("leaf")),
        ("device", report.get("device")),
    ]
    wall = report.get("wall_seconds", report.get("wall_time_s"))
    if wall is not None:
        facts.append(("wall time", f"{wall:.1f} s ({wall / 60:.1f} min)"))
    total = report.get("total_wall_seconds")
    if total is not None and wall is not None and total > wall + 1:
        facts.append(
            (
                "wall time of all invocations of this run directory",
                f"{total:.1f} s ({total / 60:.1f} min); later invocations reuse finished stages",
            )
        )
    lines += [f"- **{k}**: {_fmt(v)}" for k, v in facts if v is not None]
    settings = report.get("settings") or {}
    if settings:
        lines += ["", "<details><summary>Settings</summary>", ""]
        lines += [f"- `{k}`: {_fmt(v)}" for k, v in _flatten(settings)]
        lines += ["", "</details>"]
    return lines + [""]


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        name = f"{prefix}{k}"
        out += _flatten(v, name + ".") if isinstance(v, dict) else [(name, v)]
    return out


def _cost(training: dict | None) -> str | None:
    """``seconds (epochs)`` of a training record, marked when a wall-time cap ended it."""
    if not training:
        return None
    capped = ", capped" if training.get("time_capped") else ""
    return f"{training['train_seconds']:.0f} ({training['train_epochs']}{capped})"


def _sources(sources: list[dict]) -> list[str]:
    """The source VQ-VAEs: size, fit, codebook use (index collapse) and latent-space size."""
    rows = [
        [
            s.get("leaf"),
            s.get("model"),
            s.get("K"),
            s.get("vqvae_params"),
            s.get("vqvae_val_loss"),
            s.get("prior"),
            s.get("prior_params"),
            s.get("prior_val_nll_per_latent"),
            s.get("codebook_perplexity_test"),
            s.get("distinct_test_codes"),
            s.get("latent_space"),
            _cost(s.get("vqvae_training")),
            _cost(s.get("prior_training")),
        ]
        for s in sources
    ]
    head = [
        "leaf",
        "model",
        "K",
        "VQ-VAE params",
        "VQ-VAE val loss (nats)",
        "prior",
        "prior params",
        "prior val NLL (nats/latent)",
        "codebook perplexity (test)",
        "distinct test codes",
        "latent space K^HW",
        "VQ-VAE training s (epochs)",
        "prior training s (epochs)",
    ]
    return ["## Source models", ""] + _table(head, rows)


def _body(run_dir: Path, report: dict) -> list[str]:
    """Results table, experiment sections and figures of one (leaf) report section."""
    lines: list[str] = []
    if report.get("results"):
        lines += _results(list(report["results"]))
    sections = (
        ("latent_usage", _usage),
        ("inpainting", _inpainting),
        ("class_balance", _balance),
        ("correlation", _correlation),
        ("classification", _classification),
    )
    lines += [line for key, fn in sections if report.get(key) for line in fn(report[key])]
    figures = _figures(report, run_dir)
    if figures:
        lines += ["## Figures", ""]
        for key, rel, caption in figures:
            missing = "" if (run_dir / rel).is_file() else " *(file missing)*"
            lines += [f"### {key.replace('_', ' ')}", "", f"![{key}]({rel})", "", f"*{caption}*{missing}", ""]
    return lines


def render_report(run_dir: str | Path, report: dict) -> str:
    """The Markdown text of the report (see the module docstring for ``report``'s keys)."""
    if not isinstance(report, dict):
        raise ValueError(f"report must be a dict, got {type(report).__name__}")
    run_dir = Path(run_dir)
    lines = _header(report)
    if report.get("sources"):
        lines += _sources(report["sources"])
    per_leaf = report.get("experiments") or {}
    if per_leaf:  # a multi-leaf pipeline report: one part per pixel model
        for leaf, section in per_leaf.items():
            lines += [f"# {leaf.capitalize()} pixels", ""] + _body(run_dir, section)
    else:
        lines += _body(run_dir, report)
    lines += ["## Honest notes", ""]
    notes = report.get("notes") or []
    lines += [f"- {n}" for n in notes] if notes else ["- (none recorded)"]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, report: dict) -> Path:
    """Write ``run_dir/report.md`` atomically and return its path."""
    text = render_report(run_dir, report)
    return atomic_write(Path(run_dir) / "report.md", lambda p: p.write_text(text, encoding="utf-8"))


def write_report_json(run_dir: str | Path, report: dict) -> Path:
    """Write ``run_dir/report.json`` atomically (non-JSON values are stringified)."""
    return write_json(Path(run_dir) / "report.json", report)
