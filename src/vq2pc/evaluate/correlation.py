"""Latent correlation (paper App. F, Fig. 6): are the selected components redundant?

For a few components ``z_n`` of a circuit and ~500 test images, the joint
log-likelihoods ``log p(x, z_n) = log p(x | z_n) + log p(z_n)`` are compared
pairwise. ``log p(z_n)`` is the selection's prior value when given
(``Selection.log_prior``), else the circuit's mixture weight — a constant shift per
component either way, which changes neither the shape of the corner plot nor the
correlations.
Components picked by highest p(z) are expected to be strongly correlated (elongated
diagonal contours); randomly sampled ones less so. Corner plots are drawn with
matplotlib only: histograms on the diagonal, scatter + KDE contours below it, the
Pearson r above it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.stats import gaussian_kde
from torch import Tensor

from vq2pc.evaluate.common import ComponentModel, check_model_batch, model_device
from vq2pc.evaluate.plots import new_figure, save_figure, styled

__all__ = ["component_correlation", "joint_log_likelihoods", "mean_pairwise_correlation"]


@torch.no_grad()
def joint_log_likelihoods(
    circuit: ComponentModel, x: Tensor, components: int = 4, log_prior: Tensor | None = None
) -> Tensor:
    """``log p(x | z_n) + log p(z_n)`` for the first ``components`` components: ``[B, components]`` float64 (CPU).

    ``log_prior [N]`` (optional) is log p(z_n) of the circuit's components; the
    circuit's ``log_weights`` are used when it is None.
    """
    check_model_batch(x, "x_test")
    n = int(circuit.log_weights.shape[0])
    if n < 2:
        raise ValueError(f"correlation needs a circuit with at least 2 components, got {n}")
    k = min(components, n)
    ll = circuit.log_likelihoods(x.to(model_device(circuit)))
    if ll.dim() != 2 or ll.shape[0] != x.shape[0]:
        raise ValueError(f"log_likelihoods returned shape {tuple(ll.shape)}, expected ({x.shape[0]}, N)")
    offset = circuit.log_weights if log_prior is None else torch.as_tensor(log_prior)
    if tuple(offset.shape) != (n,):
        raise ValueError(f"log_prior has shape {tuple(offset.shape)}, expected ({n},) (one per component)")
    return (ll[:, :k].double() + offset[:k].to(ll.device).double()).cpu()


def mean_pairwise_correlation(values: Tensor) -> float | None:
    """Mean Pearson correlation over all pairs of columns of ``values [B,k]`` (None if a column is constant)."""
    r = np.corrcoef(values.numpy().T)
    iu = np.triu_indices(values.shape[1], 1)
    m = float(r[iu].mean())
    return m if np.isfinite(m) else None


def component_correlation(
    circuit_random: ComponentModel,
    circuit_topk: ComponentModel,
    x_test: Tensor,
    out_png: str | Path,
    components: int = 4,
    names: tuple[str, str] = ("random z ~ p(z|c) (DMRS)", "top-p(z) (topk)"),
    log_priors: tuple[Tensor | None, Tensor | None] = (None, None),
) -> dict[str, float | None]:
    """Fig. 6: corner plots of the joint component log-likelihoods of two circuits, side by side.

    ``x_test [B,S]`` model space (the paper uses B = 500); ``log_priors``: optional
    ``log p(z_n) [N]`` of each circuit's components (e.g. ``Selection.log_prior``). Returns
    ``mean_pairwise_corr_random``, ``mean_pairwise_corr_topk``, ``components``,
    ``images`` and ``figure``.
    """
    ll_random = joint_log_likelihoods(circuit_random, x_test, components, log_priors[0])
    ll_topk = joint_log_likelihoods(circuit_topk, x_test, components, log_priors[1])
    out_png = _plot_corners((ll_random, ll_topk), names, Path(out_png))
    return {
        "mean_pairwise_corr_random": mean_pairwise_correlation(ll_random),
        "mean_pairwise_corr_topk": mean_pairwise_correlation(ll_topk),
        "components": int(ll_random.shape[1]),
        "images": int(x_test.shape[0]),
        "figure": str(out_png),
    }


def _contours(ax, x: np.ndarray, y: np.ndarray, color: str) -> None:
    """KDE density contours of the points (skipped when the points are collinear)."""
    try:
        kde = gaussian_kde(np.vstack([x, y]))
    except (np.linalg.LinAlgError, ValueError):
        return
    gx, gy = np.meshgrid(np.linspace(x.min(), x.max(), 40), np.linspace(y.min(), y.max(), 40))
    density = kde(np.vstack([gx.ravel(), gy.ravel()])).reshape(gx.shape)
    ax.contour(gx, gy, density, levels=4, colors=color, linewidths=0.8)


def _corner(subfig, values: np.ndarray, title: str, color: str) -> None:
    k = values.shape[1]
    axes = subfig.subplots(k, k, squeeze=False)
    r = np.corrcoef(values.T)
    for i in range(k):  # k ≤ 4 panels per side: drawing, not computation
        for j in range(k):
            ax = axes[i][j]
            if i == j:
                ax.hist(values[:, i], bins=30, color=color, alpha=0.7)
                ax.set_yticks([])
            elif i > j:
                ax.scatter(values[:, j], values[:, i], s=2, alpha=0.3, color=color)
                _contours(ax, values[:, j], values[:, i], "black")
            else:
                ax.axis("off")
                ax.text(0.5, 0.5, f"r = {r[i, j]:.2f}", ha="center", va="center", transform=ax.transAxes)
            if i == k - 1:
                ax.set_xlabel(f"log p(x, z{j + 1})")
            else:
                ax.set_xticklabels([])
            if j == 0 and i > 0:
                ax.set_ylabel(f"log p(x, z{i + 1})")
            elif i != j:
                ax.set_yticklabels([])
            ax.tick_params(labelsize=6)
    subfig.suptitle(title, fontsize=10)


@styled
def _plot_corners(values: tuple[Tensor, Tensor], names: tuple[str, str], out_png: Path) -> Path:
    k = values[0].shape[1]
    fig = new_figure(2 * 2.0 * k + 0.5, 2.0 * k + 0.6)
    subfigs = fig.subfigures(1, 2, wspace=0.05)
    for sf, v, name, color in zip(subfigs, values, names, ("tab:purple", "tab:orange")):
        r = mean_pairwise_correlation(v)
        _corner(sf, v.numpy(), f"{name}\nmean pairwise r = {r:.3f}" if r is not None else name, color)
    fig.suptitle("Correlation of component log-likelihoods on test images", fontsize=11)
    return save_figure(fig, out_png)
