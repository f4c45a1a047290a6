"""EM refinement of a distilled circuit (beyond the paper).

A distilled :class:`~vq2pc.circuit.MixtureCircuit` has uniform (paper Eq. 2) or
prior-renormalized weights and leaves decoded by the VQ-VAE. Expectation–maximization
on training data refines the weights (and optionally the leaves) while the model stays
an exact mixture, so every query stays exact.

One iteration, over ``n`` training rows ``x [n, S]`` in batches of ``batch_size``:

* **E-step**: responsibilities ``r = p(n | x) [B, N]`` (``log_likelihoods + log_weights``
  normalized per row, which also yields ``log p̂(x)``), and the sufficient statistics
  ``R = Σ_b r_bn [N]`` plus, for leaves, ``r^T @ [x, x²] [N, 2S]`` (Gaussian),
  ``r^T @ x [N, S]`` (Bernoulli) or the level counts ``Σ_b r_bn 1[x_bs = l]`` stored as
  ``[S·L, N]`` (categorical; one sparse one-hot ``[S·L, B]`` times ``r``). Everything is
  accumulated in float64; no ``[n, N]`` matrix is kept.
* **M-step**, the exact maximizer of the expected complete log-likelihood plus the log prior:

  - weights ``w_n ∝ max(R_n + a - 1, 0)`` with ``a = prior_strength``: the MAP under a
    symmetric Dirichlet(a) (``a = 1`` is maximum likelihood; ``a > 1`` keeps unused
    components alive; ``a < 1`` is a sparsifying heuristic that can prune components).
  - leaves: a prior of ``κ = max(a - 1, 0)`` pseudo-observations per component drawn from
    the component's *initial* (decoder) leaf ``θ⁰``, i.e. ``log prior = κ·E_{x~θ⁰_n}[log
    p(x | θ_n)]``, plus for categorical/Bernoulli leaves a symmetric Dirichlet with ``α =
    smoothing`` extra pseudo-counts per level (``α·Σ log p``). Closed forms:
    Gaussian ``μ = (Σ r x + κ μ⁰) / (R + κ)``, ``σ² = (Σ r x² + κ(σ⁰² + μ⁰²)) / (R + κ) - μ²``
    clamped to ``[min_std², max_std²]``; categorical ``p ∝ counts + κ p⁰ + α``; Bernoulli
    ``p = (Σ r x + κ p⁰ + α) / (R + κ + 2α)`` with logits clamped to ``±LOGIT_CLAMP``.
    Components with ``R_n < EMPTY_MASS`` keep their current leaf.

Because each clamped update is the exact maximizer over the clamped set (the per-entry
objectives are unimodal) and a kept component is a generalized-EM step, the penalized
objective ``mean log p̂(x) + log prior / n`` never decreases (for ``a >= 1``, starting
inside the clamps). With ``prior_strength = 1`` and ``smoothing = 0`` it is exactly the
training log-likelihood. ``em_refine`` reports both.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, replace

import torch
from pydantic import Field, model_validator
from torch import Tensor

from vq2pc.circuit.io import prepare_input
from vq2pc.circuit.kernels import categorical_table, categorical_view
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core.leaves import Bernoulli, Categorical, Discretized, Gaussian, Leaf
from vq2pc.core.settings import Count, Natural, NonNegative, Positive, settings

__all__ = [
    "EMPTY_MASS",
    "LOGIT_CLAMP",
    "EMConfig",
    "EStats",
    "e_step",
    "em_refine",
    "log_prior",
    "m_step",
    "weights_m_step",
]

EMPTY_MASS = 1e-8
"""Components whose total responsibility ``R_n`` is below this keep their leaf parameters."""

LOGIT_CLAMP = 30.0
"""Bernoulli logits are kept in ``[-LOGIT_CLAMP, LOGIT_CLAMP]`` (circuits need finite logits)."""


@settings
class EMConfig:
    """Settings of :func:`em_refine` (see the module docstring for the maths): ``prior_strength`` is the
    Dirichlet pseudo-count ``a`` per component for the weights, and the leaves get ``κ = max(a - 1, 0)``
    pseudo-observations from their initial (decoder) leaf; ``tol`` applies to the mean penalized objective
    (the mean train log-likelihood when ``prior_strength = 1`` and ``smoothing = 0``)."""

    iterations: Natural = Field(10, description="maximum number of EM updates")
    weights: bool = Field(True, description="M-step for the mixture weights")
    leaves: bool = Field(False, description="M-step for the leaf parameters too")
    prior_strength: NonNegative = Field(1.0, description="Dirichlet pseudo-count per component (1 = ML)")
    smoothing: NonNegative = Field(
        1e-2, description="pseudo-count per level of categorical/Bernoulli leaves (0 = ML, may give zeros)"
    )
    min_std: Positive = Field(1e-3, description="Gaussian std floor")
    max_std: Positive = Field(1.0, description="Gaussian std ceiling")
    batch_size: Count = Field(1024, description="rows per E-step batch")
    tol: NonNegative = Field(1e-6, description="stop when the mean objective improves by less")

    @model_validator(mode="after")
    def _agree(self) -> EMConfig:
        if not self.max_std >= self.min_std:
            raise ValueError(f"max_std must be >= min_std={self.min_std}, got {self.max_std}")
        return self


@dataclass
class EStats:
    """Sufficient statistics of one E-step (float64).

    Attributes:
        mean_ll: mean training log-likelihood ``(1/n) Σ_b log p̂(x_b)`` of the circuit.
        n: number of training rows.
        resp: ``R [N]``, ``Σ_b r_bn``.
        leaf: ``None`` (weights only), ``[N, 2S]`` = ``[Σ r x | Σ r x²]`` (Gaussian),
            ``[N, S]`` = ``Σ r x`` (Bernoulli) or ``[S·L, N]`` level counts (categorical).
    """

    mean_ll: float
    n: int
    resp: Tensor
    leaf: Tensor | None


# --- E-step -------------------------------------------------------------------------
def _accumulate_leaf(acc: Tensor | None, leaf: Leaf, r: Tensor, x: Tensor) -> Tensor:
    """Add one batch's leaf statistics (``r [B, N]``, ``x [B, S]``, both float64) to ``acc``."""
    if leaf.kind == "gaussian":
        part = r.T @ torch.cat([x, x * x], 1)
    elif leaf.kind == "bernoulli":
        part = r.T @ x
    else:
        b, s = x.shape
        levels = leaf.num_levels
        rows = (x.long() + torch.arange(s, device=x.device) * levels).reshape(-1)
        cols = torch.arange(b, device=x.device).repeat_interleave(s)
        onehot_t = torch.sparse_coo_tensor(
            torch.stack([rows, cols]),
            torch.ones(b * s, dtype=r.dtype, device=r.device),
            (s * levels, b),
            check_invariants=False,  # indices are in range: x was validated
        )
        if acc is None:
            acc = torch.zeros(s * levels, r.shape[1], dtype=r.dtype, device=r.device)
        return acc.addmm_(onehot_t, r)  # [S·L, N] += onehot^T @ r, no dense one-hot
    return part if acc is None else acc.add_(part)


def e_step(circuit: MixtureCircuit, x: Tensor, batch_size: int, leaves: bool) -> EStats:
    """Responsibilities and sufficient statistics of ``circuit`` on prepared ``x [n, S]``.

    ``leaves`` selects whether the leaf statistics are accumulated. Raises ``ValueError``
    when a row has zero probability under the circuit (responsibilities undefined).
    """
    n = int(x.shape[0])
    resp = torch.zeros(len(circuit), dtype=torch.float64, device=circuit.device)
    acc: Tensor | None = None
    total = torch.zeros((), dtype=torch.float64, device=circuit.device)
    for b0 in range(0, n, batch_size):
        xb = x[b0 : b0 + batch_size]
        scores = (circuit.log_likelihoods(xb) + circuit.log_weights).double()  # [B, N]
        lp = torch.logsumexp(scores, 1)  # [B]
        if not torch.isfinite(lp).all():
            bad = b0 + int((~torch.isfinite(lp)).nonzero()[0])
            raise ValueError(f"training row {bad} has zero probability (or NaN) under the circuit; EM is undefined")
        r = torch.exp(scores - lp[:, None])
        total += lp.sum()
        resp += r.sum(0)
        if leaves:
            acc = _accumulate_leaf(acc, circuit.leaf, r, xb.double())
    return EStats(mean_ll=float(total) / n, n=n, resp=resp, leaf=acc)


# --- M-step -------------------------------------------------------------------------
def weights_m_step(resp: Tensor, prior_strength: float) -> Tensor:
    """MAP log weights ``[N]`` (float64) from ``R [N]`` under a symmetric Dirichlet(prior_strength)."""
    w = (resp.double() + (prior_strength - 1.0)).clamp_min(0.0)
    total = w.sum()
    if not total > 0:
        raise ValueError(f"prior_strength={prior_strength} removes every component (all MAP weights are 0); use >= 1")
    return torch.log(w / total)


def _gaussian_m_step(leaf: Gaussian, init: Gaussian, st: EStats, cfg: EMConfig, kappa: float) -> Leaf:
    s = leaf.num_variables
    mu0, sd0 = init.loc.double(), init.scale.double()
    den = st.resp[:, None] + kappa  # [N, 1]
    mean = (st.leaf[:, :s] + kappa * mu0) / den
    ex2 = (st.leaf[:, s:] + kappa * (sd0 * sd0 + mu0 * mu0)) / den
    std = (ex2 - mean * mean).clamp(cfg.min_std**2, cfg.max_std**2).sqrt()
    keep = (st.resp < EMPTY_MASS)[:, None]
    dt = leaf.loc.dtype
    return Gaussian(torch.where(keep, leaf.loc, mean.to(dt)), torch.where(keep, leaf.scale, std.to(dt)))


def _bernoulli_m_step(leaf: Bernoulli, init: Bernoulli, st: EStats, cfg: EMConfig, kappa: float) -> Leaf:
    a = cfg.smoothing
    num = st.leaf + kappa * torch.sigmoid(init.logits.double()) + a
    den = st.resp[:, None] + kappa + 2 * a  # [N, 1]
    p = num / den
    logits = (torch.log(p) - torch.log1p(-p)).clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
    keep = (st.resp < EMPTY_MASS)[:, None]
    return Bernoulli(torch.where(keep, leaf.logits, logits.to(leaf.logits.dtype)))


def _categorical_m_step(leaf: Categorical, init: Categorical, st: EStats, cfg: EMConfig, kappa: float) -> Leaf:
    n, s, levels = leaf.logits.shape
    counts = st.leaf  # [S·L, N] float64, updated in place (it is not used again)
    counts.add_(cfg.smoothing)
    if kappa:
        counts.add_(categorical_table(init.logits).double().exp(), alpha=kappa)
    view = counts.view(s, levels, n)
    view.div_(view.sum(1, keepdim=True)).log_()  # normalized log-probabilities (exact 0 -> -inf)
    keep = st.resp < EMPTY_MASS  # [N]
    table = torch.where(keep, categorical_table(leaf.logits), counts.to(leaf.logits.dtype)).contiguous()
    return categorical_view(table, levels)


def m_step(circuit: MixtureCircuit, stats: EStats, cfg: EMConfig, init: Leaf) -> MixtureCircuit:
    """The circuit after one M-step from ``stats`` (``init``: the initial leaf, centre of the leaf prior)."""
    log_w = weights_m_step(stats.resp, cfg.prior_strength) if cfg.weights else circuit.log_weights
    leaf = circuit.leaf
    if cfg.leaves:
        if stats.leaf is None:
            raise ValueError("m_step with leaves=True needs leaf statistics (e_step(..., leaves=True))")
        kappa = max(cfg.prior_strength - 1.0, 0.0)
        step = {"gaussian": _gaussian_m_step, "bernoulli": _bernoulli_m_step, "categorical": _categorical_m_step}
        leaf = step[leaf.kind](leaf, init, stats, cfg, kappa)
    log_w = log_w.to(device=circuit.device, dtype=circuit.log_weights.dtype)
    return MixtureCircuit(leaf, log_w, memory_budget_mib=circuit.memory_budget_mib, meta=circuit.meta)


# --- objective ----------------------------------------------------------------------
def _leaf_log_prior(leaf: Leaf, init: Leaf, kappa: float, alpha: float) -> Tensor:
    """``κ Σ_n E_{x~θ⁰_n}[log p(x | θ_n)] + α Σ log p`` (float64 scalar; Gaussian: κ term only)."""
    if leaf.kind == "gaussian":
        mu, sd = leaf.loc.double(), leaf.scale.double()
        mu0, sd0 = init.loc.double(), init.scale.double()
        cross = -torch.log(sd) - (sd0 * sd0 + (mu - mu0) ** 2) / (2 * sd * sd) - 0.5 * math.log(2 * math.pi)
        return kappa * cross.sum()
    if leaf.kind == "bernoulli":
        lp1, lp0 = (
            torch.nn.functional.logsigmoid(leaf.logits.double()),
            torch.nn.functional.logsigmoid(-leaf.logits.double()),
        )
        p0 = torch.sigmoid(init.logits.double())
        return kappa * (p0 * lp1 + (1 - p0) * lp0).sum() + alpha * (lp1 + lp0).sum()
    logp = leaf.logits.double()
    out = kappa * torch.xlogy(init.logits.double().exp(), logp.exp()).sum() if kappa else logp.new_zeros(())
    return out + alpha * logp.sum() if alpha else out


def log_prior(circuit: MixtureCircuit, init: Leaf, cfg: EMConfig) -> float:
    """Log prior (up to a constant) of the parameters that ``cfg`` refines.

    Weights: ``(a - 1) Σ_n log w_n`` over components with ``w_n > 0``; leaves (when
    ``cfg.leaves``): see :func:`_leaf_log_prior`. ``0`` for maximum-likelihood settings.
    """
    total = 0.0
    a = cfg.prior_strength
    if cfg.weights and a != 1.0:
        lw = circuit.log_weights.double()
        total += (a - 1.0) * float(lw[torch.isfinite(lw)].sum())
    if cfg.leaves:
        kappa = max(a - 1.0, 0.0)
        alpha = 0.0 if circuit.leaf.kind == "gaussian" else cfg.smoothing
        if kappa or alpha:
            total += float(_leaf_log_prior(circuit.leaf, init, kappa, alpha))
    return total


# --- driver -------------------------------------------------------------------------
def _comparable(circuit: MixtureCircuit, cfg: EMConfig, objective: float) -> float:
    """``objective`` on the whole simplex: a Dirichlet prior with ``a > 1`` gives a zero weight log-density
    ``-inf`` (:func:`log_prior` sums over the support only), so reviving a component is an improvement."""
    if cfg.weights and cfg.prior_strength > 1.0 and bool(torch.isneginf(circuit.log_weights).any()):
        return -math.inf
    return objective if math.isfinite(objective) else -math.inf


def em_refine(
    circuit: MixtureCircuit, x: Tensor, cfg: EMConfig | None = None, *, progress: bool = False
) -> tuple[MixtureCircuit, list[float]]:
    """Refine ``circuit`` by EM on training data ``x [n, S]`` (or ``[n, C, H, W]``, model space).

    Returns a NEW circuit, the iterate of highest penalized objective (never worse than the input;
    the input is untouched; its meta plus ``meta["em"]`` with the settings, ``history``, the penalized
    ``objective`` per iteration and the ``returned_iteration``) and ``history``:
    the mean training log-likelihood per iteration, ``history[0]`` before any update and
    ``history[k]`` after ``k`` updates. Stops early when the penalized objective improves
    by less than ``cfg.tol``. Raises ``ValueError`` for bad settings or data (wrong ``S``,
    values outside the leaf's support, NaN, rows with zero probability). ``cfg=None`` means ``EMConfig()``.
    """
    cfg = EMConfig() if cfg is None else replace(cfg)  # checked again: a settings object can be changed
    if cfg.leaves and isinstance(circuit.leaf, Discretized):
        raise ValueError(
            f"EM has no closed-form update of {circuit.leaf.kind} leaves: refine the weights only "
            "(leaves=False; the CLI without --leaves)"
        )
    fill = torch.zeros(circuit.num_variables, dtype=circuit.log_weights.dtype, device=circuit.device)
    x, _ = prepare_input(x, None, circuit.leaf, fill)
    init = circuit.leaf
    history: list[float] = []
    objective: list[float] = []
    current, best, best_it, best_score = circuit, circuit, 0, -math.inf
    for it in range(cfg.iterations + 1):
        last = it == cfg.iterations
        stats = e_step(current, x, cfg.batch_size, leaves=cfg.leaves and not last)
        history.append(stats.mean_ll)
        objective.append(stats.mean_ll + log_prior(current, init, cfg) / stats.n)
        score = _comparable(current, cfg, objective[-1])
        if it == 0 or score > best_score:  # rounding can make a step worse: keep the best iterate
            best, best_it, best_score = current, it, score
        if progress:
            print(f"em iteration {it}: mean train log-likelihood {stats.mean_ll:.6f}", file=sys.stderr)
        if last or (it > 0 and objective[-1] - objective[-2] < cfg.tol) or not (cfg.weights or cfg.leaves):
            break
        current = m_step(current, stats, cfg, init)
    meta = {
        **circuit.meta,
        "em": {
            **asdict(cfg),
            "updates": len(history) - 1,
            "n_train": int(x.shape[0]),
            "history": history,
            "objective": objective,
            "returned_iteration": best_it,
        },
    }
    out = MixtureCircuit(best.leaf, best.log_weights, memory_budget_mib=circuit.memory_budget_mib, meta=meta)
    return out, history
