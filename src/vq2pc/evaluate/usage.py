"""Latent-space usage (paper Fig. 1): how much of the K^{HW} latent space holds the prior's mass.

Sort p(z) in decreasing order and plot the cumulative mass F(k) = Σ_{j≤k} p(z_(j))
against the fraction k/M of the space. For 96^4 ≈ 85M latents the sort runs in
float32 (an in-place numpy sort on CPU, which needs no index array; ``torch.sort``
on an accelerator) and the cumulative sum runs in float64 chunks, keeping only the
log-spaced points the plot needs and the 90% / 99% crossings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from vq2pc.evaluate.plots import new_figure, save_figure, styled

__all__ = ["latent_usage", "usage_curve", "QUANTILES"]

QUANTILES = (0.9, 0.99)
_CHUNK = 1 << 22


def _sorted_probs(log_pz: Tensor) -> tuple[np.ndarray | Tensor, float]:
    """``log_pz [M]`` -> (p sorted in decreasing order, float32; total mass before normalization)."""
    if not isinstance(log_pz, Tensor) or log_pz.dim() != 1 or log_pz.numel() < 2:
        raise ValueError("log_pz must be a 1-d tensor with at least 2 entries (one log p(z) per latent)")
    if torch.isnan(log_pz).any() or torch.isposinf(log_pz).any():
        raise ValueError("log_pz contains NaN or +inf")
    # float64 log-normalizer in chunks (no float64 copy of all M entries).
    log_total = torch.logsumexp(
        torch.stack([torch.logsumexp(log_pz[i : i + _CHUNK].double(), 0) for i in range(0, log_pz.numel(), _CHUNK)]), 0
    )
    if not torch.isfinite(log_total):
        raise ValueError("log_pz holds no probability mass (every entry is -inf)")
    p = torch.sub(log_pz.float(), log_total.float()).exp_()
    if p.device.type == "cpu":
        arr = p.numpy()
        arr.sort()  # ascending, in place; read back-to-front below
        return arr[::-1], float(log_total.exp())
    return torch.sort(p, descending=True).values, float(log_total.exp())


def usage_curve(log_pz: Tensor, points: int = 1500) -> dict:
    """The CDF of the sorted prior at log-spaced counts, and the 90% / 99% crossings.

    ``log_pz [M]``: log p(z) over the whole latent space (renormalized here).
    Returns ``counts [P]`` (1..M, log-spaced), ``cdf [P]``, ``space_size`` M,
    ``total_mass`` (Σ p before renormalization, ~1 for an exact enumeration) and for
    each quantile q the smallest count k with F(k) ≥ q and the fraction k/M.
    """
    p, total_mass = _sorted_probs(log_pz)
    m = int(p.shape[0])
    counts = np.unique(np.round(np.geomspace(1, m, points)).astype(np.int64))
    # Normalize by the float64 sum of the float32 values so F(M) = 1 exactly.
    total = float(
        sum(float(np.asarray(_to_np(p[i : i + _CHUNK]), dtype=np.float64).sum()) for i in range(0, m, _CHUNK))
    )
    cdf = np.empty(len(counts))
    crossing = {q: m for q in QUANTILES}
    carry = 0.0
    for start in range(0, m, _CHUNK):  # chunks of data, bounded memory
        c = np.cumsum(np.asarray(_to_np(p[start : start + _CHUNK]), dtype=np.float64)) + carry
        carry = float(c[-1])
        sel = (counts > start) & (counts <= start + len(c))
        cdf[sel] = c[counts[sel] - start - 1] / total
        for q in QUANTILES:
            if crossing[q] == m and carry / total >= q - 1e-12:
                crossing[q] = start + int(np.searchsorted(c / total, q - 1e-12)) + 1
    out: dict = {"counts": counts, "cdf": cdf, "space_size": m, "total_mass": total_mass}
    for q in QUANTILES:
        key = _qkey(q)
        out[f"count_{key}"] = int(crossing[q])
        out[f"fraction_{key}"] = crossing[q] / m
    return out


def _to_np(chunk: np.ndarray | Tensor) -> np.ndarray:
    return chunk.detach().cpu().numpy() if isinstance(chunk, Tensor) else chunk


def _qkey(q: float) -> str:
    return f"{round(q * 100):d}"


def latent_usage(log_pz: Tensor | Sequence[Tensor], out_png: str | Path, title: str | None = None) -> dict:
    """Fig. 1: cumulative prior mass versus the fraction of the latent space, over seeds.

    ``log_pz``: ``[M]`` log p(z) of every latent (``enumerate_log_prior``), or a list of
    such tensors (one per independently trained model, all of the same ``M``).
    Writes ``out_png`` (log-x CDF, mean ± std band over seeds, the uniform prior's
    CDF F(f) = f, red lines at the 90% / 99% points) and returns JSON-able numbers:
    ``space_size``, ``seeds``, ``fraction_90``/``fraction_99`` (mean over seeds),
    their ``_std``, ``count_90``/``count_99`` (mean, rounded), ``per_seed`` details
    and ``figure``.
    """
    curves = [usage_curve(t) for t in ([log_pz] if isinstance(log_pz, Tensor) else list(log_pz))]
    if not curves:
        raise ValueError("latent_usage needs at least one log_pz tensor")
    sizes = {c["space_size"] for c in curves}
    if len(sizes) != 1:
        raise ValueError(f"every seed's log_pz must cover the same latent space; got sizes {sorted(sizes)}")
    result: dict = {"space_size": curves[0]["space_size"], "seeds": len(curves)}
    for q in QUANTILES:
        key = _qkey(q)
        fr = np.array([c[f"fraction_{key}"] for c in curves])
        result[f"fraction_{key}"] = float(fr.mean())
        result[f"fraction_{key}_std"] = float(fr.std())
        result[f"count_{key}"] = round(float(np.mean([c[f"count_{key}"] for c in curves])))
    result["per_seed"] = [{k: v for k, v in c.items() if k not in ("counts", "cdf")} for c in curves]
    result["figure"] = str(_plot_usage(curves, result, Path(out_png), title))
    return result


@styled
def _plot_usage(curves: list[dict], result: dict, out_png: Path, title: str | None) -> Path:
    m = result["space_size"]
    frac = curves[0]["counts"] / m
    cdfs = np.stack([c["cdf"] for c in curves])
    mean, std = cdfs.mean(0), cdfs.std(0)
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    label = "prior p(z)" + (f" (mean ± std over {len(curves)} seeds)" if len(curves) > 1 else "")
    ax.plot(frac, mean, color="tab:blue", lw=2, label=label)
    if len(curves) > 1:
        ax.fill_between(frac, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color="tab:blue", alpha=0.25)
    ax.plot(frac, frac, color="tab:green", lw=1.5, ls="--", label="uniform prior")
    for q, ls in zip(QUANTILES, (":", "-.")):
        key = _qkey(q)
        f = result[f"fraction_{key}"]
        ax.axvline(
            f,
            color="tab:red",
            ls=ls,
            lw=1.2,
            label=f"{key}% of mass: {100 * f:.3g}% of space ({result[f'count_{key}']:,} latents)",
        )
    ax.set_xscale("log")
    ax.set_xlim(1.0 / m, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel(f"fraction of the latent space, sorted by p(z) (|Z| = {m:,})")
    ax.set_ylabel("cumulative probability mass F")
    ax.set_title(title or "Latent-space usage of the prior")
    ax.legend(loc="upper left")
    return save_figure(fig, out_png)
