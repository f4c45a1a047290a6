"""Density estimation (paper Figs. 2 and 7): test BPD of a model, BPD versus model size.

``test_bpd`` averages the bits per dimension over the test images and over a few
uniform-dequantization draws (continuous leaves; one draw for discrete leaves,
whose BPD is deterministic). A Gaussian-leaf model with a ``discretized(L)`` twin (a
``MixtureCircuit``, the CM, the EiNet) also gets its exact discrete BPD ``−log2 P(v)/S``
(``test_bpd_discrete``: comparable with the field's discrete-MNIST numbers, never above the
dequantized BPD). The plots take result rows, one per model::

    {"name": "DMRS_2x2 N=1024", "family": "DMRS", "N": 1024, "num_params": 812032,
     "test_bpd": 1.62, "test_bpd_std": 0.004,            # std optional
     "group": "2x2", "K": 96, "source_params": 1.2e6,    # optional
     "trained": False}                                   # optional (EiNet defaults to trained)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from vq2pc.core.distributed import gather_rows, shard_range
from vq2pc.core.files import atomic_write
from vq2pc.data.datasets import bpd, to_model_space
from vq2pc.evaluate.common import (
    DensityModel,
    check_images,
    check_leaf_kind,
    model_device,
)
from vq2pc.evaluate.plots import family_style, new_figure, save_figure, styled

__all__ = [
    "test_bpd",
    "discrete_twin",
    "save_per_image",
    "paired_difference",
    "plot_bpd_tails",
    "bpd_quantiles",
    "bpd_fields",
    "BPD_FORMAT",
    "QUANTILE_LEVELS",
    "model_log_prob",
    "plot_bpd_vs_params",
    "plot_bpd_vs_N",
    "FAMILY_ORDER",
]

FAMILY_ORDER = (
    "ExM",
    "DMRS",
    "DMRS+EM",
    "DMRS+FT",
    "DMGS",
    "DMGS+FT",
    "DMBS",
    "DMBS+FT",
    "TopK",
    "TopK+FT",
    "DMData",
    "DMData+FT",
    "CM",
    "EiNet",
    "QuadGraph",
    "QuadTree",
    "HCLT",
    "PIC",
)


@torch.no_grad()
def model_log_prob(model: DensityModel, x: Tensor, mask: Tensor | None = None, batch_size: int = 500) -> Tensor:
    """``log p(x_o)`` in nats for ``x [B,S]`` (model space), in batches on the model's device -> ``[B]`` float64.

    A model that streams its components itself (``scores_whole_sets``, the exact model) gets all rows at
    once, so it decodes each latent once, not once per batch. Under ``torchrun`` (every rank calls this)
    the other models score each rank's slice of the rows, gathered on every rank.
    """
    device = model_device(model)
    if getattr(model, "scores_whole_sets", False):
        lp = model.log_prob(x.to(device), None if mask is None else mask.to(device), batch_size=batch_size).double()
    else:
        lo, hi = shard_range(x.shape[0])
        out = [torch.zeros(0, dtype=torch.float64, device=device)]
        for i in range(lo, hi, batch_size):
            xb = x[i : min(i + batch_size, hi)].to(device)
            mb = None if mask is None else mask[i : min(i + batch_size, hi)].to(device)
            out.append(model.log_prob(xb, mb).double())
        lp = gather_rows(torch.cat(out))
    if lp.shape != (x.shape[0],):
        raise ValueError(f"model.log_prob returned shape {tuple(lp.shape)}, expected ({x.shape[0]},)")
    return lp


def test_bpd(
    model: DensityModel,
    v_test: Tensor,
    leaf_kind: str,
    levels: int,
    draws: int = 3,
    batch_size: int = 500,
    generator: torch.Generator | None = None,
    discrete: bool = True,
) -> dict[str, Any]:
    """Mean test BPD of ``model`` on raw test images ``v_test`` (uint8 ``[n,C,H,W]``).

    ``discrete`` (Gaussian leaves): also score the model's :func:`discrete_twin`, when it has one, on
    the integer images: ``"discrete"`` and ``"discrete_median"`` hold its mean and median BPD.

    Each dequantization draw maps the images to model space with
    ``data.to_model_space`` and averages ``data.bpd`` over images; the draws are scored in one
    :func:`model_log_prob` call (``[draws·n, S]`` rows), so the exact model decodes each latent once
    for all draws; the result is
    ``{"mean", "std", "per_draw": [draws], "draws", "n_images", "per_image"}`` (std over draws, 0 for
    discrete leaves which use a single draw; ``per_image`` a float64 ``[n]`` tensor, each image's BPD
    averaged over the draws, for paired comparisons), plus the per-image quantiles.
    """
    check_images(v_test, "v_test")
    check_leaf_kind(leaf_kind, levels)
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if v_test.dtype.is_floating_point or int(v_test.max()) >= levels or int(v_test.min()) < 0:
        raise ValueError(f"v_test must hold integer pixel levels in [0, {levels - 1}]")
    draws = draws if leaf_kind == "gaussian" else 1
    n, s = v_test.shape[0], int(np.prod(v_test.shape[1:]))
    # all draws scored in one call: a model that streams its components (ExM) decodes each once in all
    x = torch.cat([to_model_space(v_test, leaf_kind, levels, generator).reshape(n, s) for _ in range(draws)])
    b = bpd(model_log_prob(model, x, batch_size=batch_size), s, levels, leaf_kind).double().cpu().reshape(draws, n)
    per_draw, per_image = b.mean(1).tolist(), b.mean(0)
    arr = np.array(per_draw)
    if not np.isfinite(arr).all():
        raise FloatingPointError(f"test BPD is not finite ({per_draw}); the model assigns zero density to test data")
    twin = discrete_twin(model, levels) if discrete and leaf_kind == "gaussian" else None
    extra: dict[str, float] = {}
    if twin is not None:  # every row in one call: a discretized circuit builds its tables once per call
        lp = model_log_prob(twin, v_test.reshape(n, s).float(), batch_size=n)
        d = bpd(lp, s, levels, "categorical").double().cpu()
        extra = {"discrete": float(d.mean()), "discrete_median": float(d.median())}
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "per_draw": per_draw,
        "draws": draws,
        "n_images": n,
        "per_image": per_image,
        **bpd_quantiles(per_image),
        **extra,
    }


def save_per_image(path: str | Path, per_image: Tensor) -> Path:
    """Write per-image BPDs ``[n]`` as a float64 ``.npy`` file, atomically (paired comparisons read it)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
            np.save(f, per_image.double().cpu().numpy())

    return atomic_write(path, write)


def paired_difference(a: Tensor, b: Tensor) -> dict[str, float]:
    """Paired per-image comparison of two models' BPDs ``a [n]`` and ``b [n]`` on the same images:
    the mean difference ``a − b`` with its 95% interval (normal approximation, ``1.96·sd/√n``; fine for
    thousands of images) and the fraction of images where ``a`` is lower."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    if a.shape != b.shape or a.numel() < 2:
        raise ValueError(f"need two equal-length sets of at least 2 per-image BPDs, got {a.numel()} and {b.numel()}")
    d = a - b
    half = 1.96 * float(d.std()) / math.sqrt(d.numel())
    mean = float(d.mean())
    return {
        "n": d.numel(),
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "difference": mean,
        "ci95": [mean - half, mean + half],
        "a_lower_fraction": float((d < 0).double().mean()),
    }


def discrete_twin(model: Any, levels: int) -> DensityModel | None:
    """The exact ``levels``-level twin of a Gaussian-leaf model (its ``discretized(levels)``: a Gaussian
    ``MixtureCircuit`` and so the CM, the EiNet), reading integer levels; None for a model without one."""
    make = getattr(model, "discretized", None)
    if not callable(make):
        return None
    leaf = getattr(model, "leaf", None)
    if leaf is not None and leaf.kind != "gaussian":
        return None
    return make(levels)


def bpd_fields(bpd: dict[str, Any]) -> dict[str, Any]:
    """The result-row fields of a :func:`test_bpd` result: mean ± std over draws and per-image quantiles."""
    return {
        "test_bpd": bpd["mean"],
        "test_bpd_std": bpd.get("std", 0.0),
        **{f"test_bpd_{k}": bpd[k] for k in ("median", "p90", "p99", "max", "discrete", "discrete_median") if k in bpd},
        "test_bpd_quantiles": bpd.get("quantile_curve"),
    }


BPD_FORMAT = 2
"""Version of the fields :func:`bpd_fields` writes: a cached result row of another version is recomputed."""

QUANTILE_LEVELS = tuple(i / 100 for i in range(100)) + (0.995, 0.999, 1.0)
"""Levels of the per-image BPD quantile curve kept with every result (the tail is in the last ones)."""


def bpd_quantiles(per_image: Tensor) -> dict[str, Any]:
    """Quantiles of per-image BPD ``[n]``: ``median``, ``p90``, ``p99``, ``max`` and the curve at
    :data:`QUANTILE_LEVELS` (``quantile_curve``), so a tail of badly covered images is seen, not guessed."""
    q = torch.quantile(per_image.double(), torch.tensor(QUANTILE_LEVELS, dtype=torch.float64)).tolist()
    at = dict(zip(QUANTILE_LEVELS, q))
    return {"median": at[0.5], "p90": at[0.9], "p99": at[0.99], "max": at[1.0], "quantile_curve": q}


test_bpd.__test__ = False  # a library function, not a pytest test, when imported into test modules


def _check_rows(rows: Sequence[dict], need: Sequence[str]) -> list[dict]:
    rows = list(rows)
    if not rows:
        raise ValueError("no result rows to plot")
    for i, r in enumerate(rows):
        missing = [k for k in need if k not in r]
        if missing:
            raise ValueError(f"result row {i} ({r.get('name', '?')}) lacks keys {missing}")
        if not math.isfinite(float(r["test_bpd"])):
            raise ValueError(f"result row {i} ({r.get('name', '?')}) has a non-finite test_bpd")
    return rows


def _series(rows: list[dict], x_key: str) -> dict[tuple[str, str], list[dict]]:
    """Rows grouped into lines, families in FAMILY_ORDER, each line sorted by ``x_key``.

    A line is a (family, group): ExM's line runs over the codebook sizes K of its group (Fig. 2). Where a
    group holds several models of another family (DMRS of a 2x2 VQ-VAE at K = 16 and at K = 32), each model
    gets its own line, named by the model."""
    models: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        models.setdefault((r["family"], str(r.get("group", ""))), set()).add(str(r.get("model", "")))

    def line(r: dict) -> tuple[str, str]:
        family, group = r["family"], str(r.get("group", ""))
        return (family, str(r["model"])) if family != "ExM" and len(models[family, group]) > 1 else (family, group)

    order = {f: i for i, f in enumerate(FAMILY_ORDER)}
    keys = sorted({line(r) for r in rows}, key=lambda k: (order.get(k[0], 99), k))
    return {k: sorted([r for r in rows if line(r) == k], key=lambda r: r[x_key]) for k in keys}


def _draw_series(ax, series: dict[tuple[str, str], list[dict]], x_key: str, annotate_k: bool) -> None:
    seen: dict[str, int] = {}  # lines drawn per family: a family's second model is dashed, its third dotted
    for (family, group), rs in series.items():
        color, marker, trained = family_style(family)
        dash = ("-", "--", ":", "-.")[min(seen.setdefault(family, 0), 3)]
        seen[family] += 1
        trained = bool(rs[0].get("trained", trained))
        xs = np.array([float(r[x_key]) for r in rs])
        ys = np.array([float(r["test_bpd"]) for r in rs])
        err = np.array([float(r.get("test_bpd_std", 0.0)) for r in rs])
        label = f"{family}{'$_{' + group + '}$' if group else ''}" + (" (trained)" if trained else "")
        ax.errorbar(
            xs,
            ys,
            yerr=err if err.any() else None,
            color=color,
            marker=marker,
            ms=6,
            lw=1.2,
            ls=dash if len(rs) > 1 else "none",
            mfc=color if trained else "none",
            mew=1.5,
            capsize=2,
            label=label,
        )
        if annotate_k:
            for r, x, y in zip(rs, xs, ys):
                if "K" in r and family == "ExM":
                    ax.annotate(
                        f"K={r['K']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color
                    )


def _y_scale(ax, values: list[float]) -> None:
    """Log y when the BPDs span more than a factor 20 (a few catastrophic models would flatten the rest)."""
    finite = [v for v in values if np.isfinite(v) and v > 0]
    log = bool(finite) and max(finite) / min(finite) > 20
    if log:
        ax.set_yscale("log")
    ax.set_ylabel("test bits per dimension" + (" (log scale)" if log else "") + " — lower is better")


@styled
def plot_bpd_vs_params(rows: Sequence[dict], out_png: str | Path, title: str | None = None) -> Path:
    """Fig. 2 / 7: test BPD versus number of parameters (log x), one style per family.

    Hollow markers for distilled models, filled for trained ones (``trained`` key,
    EiNet by default); ExM points labelled with their codebook size ``K``; dotted
    vertical lines at each distinct ``source_params`` (the source VQ-VAE's size, or
    the CM's decoder size). Returns the PNG path.
    """
    rows = _check_rows(rows, ("name", "family", "num_params", "test_bpd"))
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    series = _series(rows, "num_params")
    _draw_series(ax, series, "num_params", annotate_k=True)
    sources: dict[float, tuple[str, str]] = {}
    for r in rows:
        if r.get("source_params"):
            who = "CM decoder" if r["family"] == "CM" else f"VQ-VAE {r.get('group', '')}".strip()
            sources.setdefault(float(r["source_params"]), (r["family"], who))
    for x, (family, who) in sorted(sources.items()):
        color = family_style(family)[0]
        ax.axvline(x, color=color, ls=":", lw=1.2)
        ax.annotate(
            who,
            (x, 0.98),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
            color=color,
        )
    ax.set_xscale("log")
    ax.set_xlabel("number of parameters (log scale)")
    _y_scale(ax, [float(r["test_bpd"]) for r in rows])
    ax.set_title(title or "Density estimation: test BPD vs model size")
    ax.legend(loc="best", ncols=2)
    return save_figure(fig, out_png)


@styled
def plot_bpd_vs_N(rows: Sequence[dict], out_png: str | Path, title: str | None = None) -> Path:
    """Test BPD versus the number of mixture components ``N`` (log x), one line per selection strategy.

    Rows whose ``N`` is missing or None (models that are not finite mixtures, e.g. EiNet) are left out.
    """
    rows = _check_rows([r for r in rows if r.get("N") is not None], ("name", "family", "N", "test_bpd"))
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    _draw_series(ax, _series(rows, "N"), "N", annotate_k=False)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of mixture components N (log scale)")
    _y_scale(ax, [float(r["test_bpd"]) for r in rows])
    ax.set_title(title or "Distilled circuits: test BPD vs number of components")
    ax.legend(loc="best")
    return save_figure(fig, out_png)


def tail_rows(rows: Sequence[dict]) -> list[dict]:
    """The row of each family with the most components (the best-supplied model of each kind), with quantiles."""
    best: dict[str, dict] = {}
    for r in rows:
        if r.get("test_bpd_quantiles") and (
            r["family"] not in best or (r.get("N") or 0) > (best[r["family"]].get("N") or 0)
        ):
            best[r["family"]] = r
    order = {f: i for i, f in enumerate(FAMILY_ORDER)}
    return sorted(best.values(), key=lambda r: order.get(r["family"], 99))


@styled
def plot_bpd_tails(rows: Sequence[dict], out_png: str | Path, title: str | None = None) -> Path:
    """Per-image test BPD distributions: the quantile function of each family's largest model (log y).

    x is the fraction of test images with a BPD at most y; a model whose curve shoots up at the
    right has a tail of badly covered images that dominates its mean (marked by a dot on each curve)."""
    shown = tail_rows(_check_rows(rows, ("name", "family", "test_bpd")))
    if not shown:
        raise ValueError("no result row carries per-image BPD quantiles (test_bpd_quantiles)")
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    levels = np.array(QUANTILE_LEVELS)
    for r in shown:
        color, _, trained = family_style(r["family"])
        ys = np.array(r["test_bpd_quantiles"], dtype=float)
        ax.plot(levels, ys, color=color, lw=1.6, ls="-" if trained else "--", label=f"{r['name']} (N={r.get('N')})")
        ax.plot([float(np.interp(r["test_bpd"], ys, levels))], [r["test_bpd"]], "o", color=color, ms=4)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of test images (sorted by their BPD)")
    ax.set_ylabel("per-image test BPD (log scale) — lower is better")
    ax.set_title(title or "Per-image BPD: where the mean comes from")
    ax.legend(loc="upper left", fontsize=7)
    return save_figure(fig, out_png)
