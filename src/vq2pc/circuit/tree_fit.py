"""Building and fitting a :class:`~vq2pc.circuit.tree.TreeCircuit`: latent variable distillation and EM.

Latent variable distillation (LVD; Liu et al., ICLR 2023) with a VQ-VAE's codes as the latents: pairs
``(z, x)`` of code grids ``[n, h, w]`` and images — the training images with their encoded codes
(:func:`encoded_pairs`), or codes drawn from the prior with images drawn from the decoder
(:func:`prior_pairs`), or both concatenated — make the data *complete*, so maximum likelihood is closed
form (:func:`distill_tree`): the Chow-Liu tree on the codes' pairwise mutual information, and every
distribution from counts plus Dirichlet pseudo-counts (:class:`Smoothing`).

Fine-tuning is EM on the observed images alone (:func:`em_fit`): exact expected counts are the gradient of
``Σ log p(x)`` with respect to the normalized log-parameters (autograd runs the downward pass), accumulated
over the training set; the M-step normalizes them with the same pseudo-counts (MAP-EM, which never lowers
the smoothed training objective); each iteration is scored on validation BPD and the best is kept.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from vq2pc.circuit import tree_fit_gaussian as gauss
from vq2pc.circuit.tree import TreeCircuit
from vq2pc.circuit.tree_gaussian import GaussianTreeCircuit
from vq2pc.circuit.tree_io import TreeParams
from vq2pc.circuit.tree_structure import chow_liu, grid_shift, mutual_information, patch_owner
from vq2pc.core import validate
from vq2pc.core.random import categorical
from vq2pc.models.train import TrainConfig, TrainResult, fit
from vq2pc.models.vqvae import VQVAE, encode_images

__all__ = [
    "Smoothing",
    "TreeFitResult",
    "encoded_pairs",
    "prior_pairs",
    "SOURCES",
    "source_pairs",
    "smoothing",
    "complete_counts",
    "m_step",
    "distill_tree",
    "bpd",
    "image_bpd",
    "em_fit",
    "adam_fit",
]


@dataclass
class Smoothing:
    """Dirichlet pseudo-counts: ``leaf [S, L]`` added to every ``(variable, state)`` leaf's level counts;
    ``edge`` added to every entry of the root and edge tables. ``bins`` (optional) ties the leaves: each
    state keeps only the probabilities of ``bins`` equal-width bins of levels, and the split of a bin into
    its levels is one per variable, shared by all states."""

    leaf: Tensor
    edge: float
    bins: int | None = None


def smoothing(images: Tensor, levels: int, leaf: float = 1.0, edge: float = 0.1, bins: int | None = None) -> Smoothing:
    """Pseudo-counts ``leaf · L · m_i(l)`` with ``m_i`` variable ``i``'s Laplace-smoothed level histogram in
    ``images [n, S]`` (a prior centred on the pixel's marginal, not on uniform levels: MNIST's rare
    grey levels stay rare), and ``edge`` per root/edge entry."""
    v = _levels(images, levels)
    s = v.shape[1]
    hist = torch.zeros(s * levels, dtype=torch.float64).index_add_(
        0, (torch.arange(s) * levels + v).reshape(-1), torch.ones(v.numel(), dtype=torch.float64)
    )
    marginal = (hist.view(s, levels) + 1) / (v.shape[0] + levels)
    return Smoothing((leaf * levels * marginal).float(), float(edge), bins)


def encoded_pairs(vqvae: VQVAE, images: Tensor, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """``(codes [n, M], levels [n, S])`` of raw images ``uint8 [n, C, H, W]`` (the VQ-VAE's own codes)."""
    codes = encode_images(vqvae, images, batch_size=batch_size)
    return codes.reshape(codes.shape[0], -1), images.reshape(images.shape[0], -1).long()


@torch.no_grad()
def prior_pairs(
    vqvae: VQVAE, prior: Any, n: int, generator: torch.Generator | None = None, batch_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """``n`` pairs drawn from the generative model: class ``c ~ p(c)``, codes ``z ~ p(z | c)`` (the prior),
    an image ``x ~ p(x | z)`` (the decoder; a categorical-leaf VQ-VAE) -> ``(codes [n, M], levels [n, S])``."""
    if vqvae.cfg.leaf != "categorical":
        raise ValueError(f"prior_pairs needs a categorical-leaf VQ-VAE (integer levels), got {vqvae.cfg.leaf!r}")
    vqvae.eval()
    classes = categorical(prior.class_log_prior.exp().expand(n, -1), generator)
    codes, images = [], []
    for i in range(0, n, batch_size):
        z = prior.sample(classes[i : i + batch_size], generator=generator)
        codes.append(z.reshape(z.shape[0], -1).cpu())
        images.append(vqvae.decode(z.to(next(vqvae.parameters()).device)).sample(generator).long().cpu())
    return torch.cat(codes), torch.cat(images)


SOURCES = ("encoded", "prior", "mixed")


def source_pairs(
    source: str,
    vqvae: VQVAE,
    images: Tensor,
    prior: Any = None,
    prior_samples: int = 20000,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The complete data of a latent source (:data:`SOURCES`): ``encoded`` (``images`` with their codes),
    ``prior`` (``prior_samples`` pairs from the prior and the decoder) or ``mixed`` (both, concatenated)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
    if source != "encoded" and prior is None:
        raise ValueError(f"source {source!r} needs a prior")
    parts = [encoded_pairs(vqvae, images)] if source != "prior" else []
    if source != "encoded":
        parts.append(prior_pairs(vqvae, prior, prior_samples, generator))
    codes, pixels = zip(*parts)
    return torch.cat(codes), torch.cat(pixels)


def complete_counts(circuit: TreeCircuit, codes: Tensor, images: Tensor, chunk: int = 2048) -> TreeParams:
    """Counts of complete data (as float tensors shaped like :class:`TreeParams`): ``root [K]``,
    ``edges [E, K, K]`` (parent state, child state) and ``leaves [S, L, K]`` (variable, level, its
    position's code) from ``codes [n, M]`` and ``images [n, S]`` (levels); Gaussian leaves: their
    statistics ``[S, 3, K]`` (:func:`~vq2pc.circuit.tree_fit_gaussian.complete_stats`)."""
    t, K, L = circuit.tree, circuit.K, circuit.levels
    codes, v = codes.long().cpu(), _levels(images, L)
    s, e = v.shape[1], t.children.numel()
    root = torch.bincount(codes[:, t.root], minlength=K).float()
    pair = torch.arange(e) * K * K + codes[:, t.parent[t.children]] * K + codes[:, t.children]  # [n, E]
    edges = torch.bincount(pair.reshape(-1), minlength=e * K * K).float().view(e, K, K)
    if isinstance(circuit, GaussianTreeCircuit):  # leaves: statistics [S, 3, K] (tree_fit_gaussian)
        return TreeParams(root, edges, gauss.complete_stats(circuit, codes, v))
    leaves = torch.zeros(s * L * K)
    owner = circuit.owner.cpu()
    for i in range(0, v.shape[0], chunk):
        idx = ((torch.arange(s) * L + v[i : i + chunk]) * K + codes[i : i + chunk, owner]).reshape(-1)
        leaves.index_add_(0, idx, torch.ones(idx.numel()))
    return TreeParams(root, edges, leaves.view(s, L, K))


def m_step(counts: TreeParams, prior: Smoothing, std_min: float | None = None) -> TreeParams:
    """Normalized log-parameters from (expected) counts plus the pseudo-counts ``prior``; with ``std_min``
    (a Gaussian-leaf tree's) the leaves are Gaussian, from statistics ``[S, 3, K]``."""
    root = counts.root.double() + prior.edge
    edges = counts.edges.double() + prior.edge
    leaf_prior = prior.leaf.to(counts.leaves.device).double()
    if std_min is None:
        leaves = _leaf_log_probs(counts.leaves.double(), leaf_prior, prior.bins).float()
    else:
        leaves = gauss.gaussian_leaves(counts.leaves, leaf_prior, leaf_prior.shape[1], std_min)
    return TreeParams((root / root.sum()).log().float(), (edges / edges.sum(2, keepdim=True)).log().float(), leaves)


def _leaf_log_probs(counts: Tensor, prior: Tensor, bins: int | None) -> Tensor:
    """``log θ [S, L, K]`` from level counts ``[S, L, K]`` and pseudo-counts ``prior [S, L]``: one
    categorical per (variable, state), or with ``bins`` the tied form ``θ_{i,l,k} = β_{i,b(l),k} ·
    γ_{i,l}`` (bin ``b(l) = ⌊l·bins/L⌋`` per state, the split ``γ`` inside a bin per variable) — the exact
    M-step of that parameterization, since the complete-data likelihood factorizes over ``β`` and ``γ``."""
    s, levels, k = counts.shape
    leaves = counts + prior[:, :, None]
    if bins is None or bins >= levels:
        return (leaves / leaves.sum(1, keepdim=True)).log()
    bin_of = torch.arange(levels, device=counts.device) * bins // levels
    per_bin = leaves.new_zeros(s, bins, k).index_add_(1, bin_of, leaves)  # [S, bins, K]
    split = counts.sum(2) + prior  # [S, L]
    split_total = split.new_zeros(s, bins).index_add_(1, bin_of, split)
    log_beta = (per_bin / per_bin.sum(1, keepdim=True)).log()[:, bin_of]  # [S, L, K]
    return log_beta + (split / split_total[:, bin_of]).log()[:, :, None]


def distill_tree(
    codes: Tensor,
    images: Tensor,
    K: int,
    levels: int,
    image_shape: tuple[int, int, int],
    latent_hw: tuple[int, int],
    prior: Smoothing,
    meta: dict[str, Any] | None = None,
    shift: int | tuple[int, int] = 0,
    std_min: float | None = None,
    floor: float = 0.0,
) -> TreeCircuit:
    """Latent variable distillation: the Chow-Liu tree of ``codes [n, M]`` (``M = h·w``, row-major, on the
    grid shifted by ``shift`` pixels: :func:`~vq2pc.circuit.tree_structure.patch_owner`) and the
    closed-form (smoothed) maximum-likelihood parameters of the complete data ``(codes, images [n, S])``.
    ``std_min`` (a float): Gaussian leaves with that std floor and a uniform ``floor`` mixed in (a
    :class:`~vq2pc.circuit.tree_gaussian.GaussianTreeCircuit`)."""
    codes = codes.reshape(codes.shape[0], -1).long().cpu()
    if codes.shape[1] != latent_hw[0] * latent_hw[1] or codes.shape[0] != images.shape[0]:
        raise ValueError(f"codes {tuple(codes.shape)} do not match {images.shape[0]} images on a {latent_hw} grid")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= K):
        raise ValueError(f"codes must lie in [0, {K - 1}]")
    parent = chow_liu(mutual_information(codes, K))
    info = {"image_shape": list(image_shape), "latent_hw": list(latent_hw), "levels": levels}
    info["shift"] = list(grid_shift(shift))
    info.update(meta or {})
    owner = patch_owner(image_shape, latent_hw, shift)
    if std_min is None:
        info["leaf_bins"] = min(prior.bins or levels, levels)  # read by TreeCircuit.num_params
        circuit = TreeCircuit(parent, owner, K, levels, meta=info)
    else:
        circuit = GaussianTreeCircuit(parent, owner, K, levels, std_min=std_min, floor=floor, meta=info)
    circuit.set_log_params(m_step(complete_counts(circuit, codes, images), prior, circuit.std_min))
    return circuit


def bpd(circuit: TreeCircuit, images: Tensor, batch_size: int = 256) -> float:
    """Mean bits per variable of raw images ``[n, S]`` or ``[n, C, H, W]`` (levels): ``−log2 p(x) / S``;
    Gaussian leaves: on one fixed dequantization draw, ``+ log2 L`` (:func:`image_bpd`)."""
    return float(image_bpd(circuit, images, batch_size=batch_size).mean())


def image_bpd(circuit: TreeCircuit, images: Tensor, draws: int = 1, seed: int = 0, batch_size: int = 256) -> Tensor:
    """Each image's BPD ``[n]`` (float64) of raw images (levels): ``−log2 P(v) / S`` (categorical leaves),
    or the mean over ``draws`` uniform dequantization draws of ``−log2 p(x) / S + log2 L`` (Gaussian)."""
    v = _levels(images, circuit.levels)
    if not isinstance(circuit, GaussianTreeCircuit):
        return _bits(circuit, circuit.log_prob(v.float(), batch_size=batch_size).double())
    parts = [
        circuit.log_prob(gauss.dequantized(v, circuit.levels, seed, d), batch_size=batch_size) for d in range(draws)
    ]
    return _bits(circuit, torch.stack(parts).double()).mean(0)


def _bits(circuit: TreeCircuit, log_prob: Tensor) -> Tensor:
    """Bits per variable of log-likelihoods in nats (plus ``log2 L`` for a density on dequantized pixels)."""
    offset = math.log2(circuit.levels) if isinstance(circuit, GaussianTreeCircuit) else 0.0
    return -log_prob / (circuit.num_variables * math.log(2)) + offset


@dataclass
class TreeFitResult:
    """EM's record: per iteration ``{"iteration", "train_bpd", "val_bpd", "seconds"}`` (iteration 0 = the
    start), the iteration whose parameters were kept, and the wall time."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_iteration: int = 0
    seconds: float = 0.0

    @property
    def best_val_bpd(self) -> float:
        return self.history[self.best_iteration]["val_bpd"]


def _expected_counts(circuit: TreeCircuit, v: Tensor, batch_size: int) -> tuple[TreeParams, float]:
    """E-step over ``v [n, S]`` (long levels; Gaussian leaves: dequantized floats): expected counts (leaf
    statistics for Gaussian leaves) and the summed ``log p(x)`` (nats)."""
    base = TreeParams(*(t.detach() for t in circuit.log_params()))
    gaussian = isinstance(circuit, GaussianTreeCircuit)
    totals: list[Tensor] | None = None
    loglik = 0.0
    for i in range(0, v.shape[0], batch_size):
        params = TreeParams(*(t.detach().requires_grad_() for t in base))  # fresh leaves, shared storage
        x = v[i : i + batch_size].to(base.root.device)
        if gaussian:
            grads, ll = gauss.expected_stats(circuit, x, params)
        else:
            ll = circuit(x, None, params).sum()
            grads = torch.autograd.grad(ll, params)
        if totals is None:
            totals = [g.clone() for g in grads]
        else:
            for total, g in zip(totals, grads):
                total += g  # in place: a categorical leaf table is S·L·K
        loglik += float(ll.detach())
    return TreeParams(*totals), loglik


def em_fit(
    circuit: TreeCircuit,
    train: Tensor,
    val: Tensor,
    prior: Smoothing,
    iterations: int = 10,
    patience: int = 1,
    batch_size: int = 256,
    max_seconds: float | None = None,
    log: Callable[[dict[str, float]], None] | None = None,
    seed: int = 0,
) -> TreeFitResult:
    """Full-batch MAP-EM on ``train [n, S]`` levels, early-stopped on ``val`` BPD (stops after ``patience``
    iterations without a better one, or past ``max_seconds``); ``circuit`` ends with the best parameters.
    ``log`` (optional) receives each history row as it is made. Gaussian leaves: iteration ``t``'s E-step
    sees dequantization draw ``t`` of ``seed`` (fresh noise each iteration, the same on a rerun)."""
    if not (isinstance(iterations, int) and iterations >= 0 and isinstance(patience, int) and patience >= 1):
        raise ValueError(f"need iterations >= 0 and patience >= 1, got {iterations}, {patience}")
    if max_seconds is not None and not _positive(max_seconds):
        raise ValueError(f"max_seconds must be a positive number, got {max_seconds!r}")
    v = _levels(train, circuit.levels)
    gaussian = isinstance(circuit, GaussianTreeCircuit)

    def e_step(it: int) -> tuple[TreeParams, float]:
        return _expected_counts(circuit, gauss.dequantized(v, circuit.levels, seed, it) if gaussian else v, batch_size)

    start, result = time.perf_counter(), TreeFitResult()
    best = TreeParams(*(t.detach().clone() for t in circuit.log_params()))
    counts, loglik = e_step(0)
    result.history.append(_record(0, loglik, v, circuit, val, start))
    if log is not None:
        log(result.history[-1])
    for it in range(1, iterations + 1):
        if it - result.best_iteration > patience or (max_seconds and time.perf_counter() - start > max_seconds):
            break
        circuit.set_log_params(m_step(counts, prior, circuit.std_min))
        counts, loglik = e_step(it)
        result.history.append(_record(it, loglik, v, circuit, val, start))
        if log is not None:
            log(result.history[-1])
        if result.history[-1]["val_bpd"] < result.best_val_bpd:
            result.best_iteration = it
            best = TreeParams(*(t.detach().clone() for t in circuit.log_params()))
    circuit.set_log_params(best)
    result.seconds = time.perf_counter() - start
    return result


def adam_fit(
    circuit: TreeCircuit, train: Tensor, val: Tensor, cfg: TrainConfig, checkpoint: str | Path | None = None
) -> TrainResult:
    """The gradient route: Adam on the exact ``−log p(x) / S`` (nats per variable) over the stored logits
    (normalized by ``log_softmax``), by :func:`vq2pc.models.train.fit` (early stopping on ``val``,
    checkpoint and resume, DDP); plain maximum likelihood, no pseudo-counts. Categorical leaves only."""
    if isinstance(circuit, GaussianTreeCircuit):
        raise ValueError("adam_fit fits categorical leaves; fit a Gaussian-leaf tree with em_fit")
    s = circuit.num_variables

    def loss_fn(m: torch.nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        return -m(batch[0]).mean() / s

    data = (_levels(train, circuit.levels),), (_levels(val, circuit.levels),)
    meta = {"K": circuit.K, "levels": circuit.levels, "parent": circuit.tree.parent.tolist()}
    return fit(circuit, loss_fn, *data, cfg, checkpoint, kind="tree-circuit", meta=meta, desc="tree", score_start=True)


def _record(it: int, loglik: float, v: Tensor, circuit: TreeCircuit, val: Tensor, start: float) -> dict[str, float]:
    """One history row: the train BPD of the parameters that produced ``loglik``, their val BPD, wall time."""
    train_bpd = float(_bits(circuit, torch.tensor(loglik / v.shape[0], dtype=torch.float64)))
    return {
        "iteration": it,
        "train_bpd": train_bpd,
        "val_bpd": bpd(circuit, val),
        "seconds": time.perf_counter() - start,
    }


def _levels(images: Tensor, levels: int) -> Tensor:
    """Raw images ``[n, S]`` or ``[n, C, H, W]`` -> validated levels ``[n, S]`` (long, CPU)."""
    v = images.reshape(images.shape[0], -1).cpu()
    validate.check_levels(v, levels, "images")
    return v.long()


def _positive(value: object) -> bool:
    """A finite number > 0 (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
