"""Class weights of a class-aware circuit, and the exact reduction ``log Σ_n exp(L[b, n] + r[n, c])``.

A class-aware mixture keeps the class of the prior ``p(z) = Σ_c p(c) p(z|c)``::

    p̂(x, c) = Σ_n w_{n,c} Π_i p(x_i | z_n),      Σ_{n,c} w_{n,c} = 1.

It is still smooth and decomposable (a class indicator under the sum); its class marginal
``w_n = Σ_c w_{n,c}`` is an ordinary :class:`~vq2pc.circuit.MixtureCircuit`'s weights and
``r[n, c] = log w_{n,c} - log w_n = log p(c | n)`` is what the class adds.

Queries need ``log p̂(x_o, c) = log Σ_n exp(L[b, n] + r[n, c])`` with ``L = log w_n + log p(x_o | n)``
(``[B, N]``, the circuit's scores) for every class: a log-semiring product of ``[B, N]`` and ``[N, C]``.
:func:`class_joint` computes it at matrix-multiply speed and exactly: ``E = exp(L - max_n L)`` in
float64 times ``R = exp(r)`` (one ``[b, N] × [N, C]`` product); a row whose class sum comes out below
``e^-600`` relative to the row's top term (where float64 underflow could matter: a class posterior
below ~e^-600) is recomputed by an explicit per-class log-sum-exp (``[b, C, N]``, each class shifted
by its own maximum), so every entry is exact to float round-off, however unlikely the class.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vq2pc.circuit.streaming import Scratch, logsumexp_
from vq2pc.core.protocols import Prior
from vq2pc.latents.enumerate import enumerate_log_prior, latent_space_size
from vq2pc.latents.selection import Selection

__all__ = ["CLASS_WEIGHTS", "class_joint", "class_weights", "normalize_joint", "whole_space_joint"]

CLASS_WEIGHTS = ("prior", "uniform")

_RELIABLE = -600.0
"""Class sums of the float64 product below ``e^_RELIABLE`` (relative to the row's top term) are recomputed."""
_FLOOR = math.log(torch.finfo(torch.float64).tiny) + 1.0
"""``exp`` arguments are clamped here (no subnormals): a term changes by at most e^-707, far below ``e^_RELIABLE``."""


def normalize_joint(log_w: Tensor) -> Tensor:
    """``[N, C]`` log weights normalized jointly over ``(n, c)`` (in float64; ``ValueError`` for bad values)."""
    log_w = torch.as_tensor(log_w)
    if log_w.dim() != 2 or log_w.shape[0] < 1 or log_w.shape[1] < 1:
        raise ValueError(f"class log-weights must have shape [N, C] with N, C >= 1, got {tuple(log_w.shape)}")
    if torch.isnan(log_w).any() or torch.isposinf(log_w).any() or torch.isneginf(log_w).all():
        raise ValueError("class log-weights must be free of NaN and +inf and not all -inf")
    flat = log_w.double().flatten()
    return (flat - torch.logsumexp(flat, 0)).view_as(log_w)


def whole_space_joint(prior: Prior) -> Tensor:
    """``[K^{HW}, C]`` float32 ``log p(c) + log p(z | c)`` of every latent in lexicographic order (the
    enumeration's prefix tree: ~``C·K^{HW-1}`` prior rows instead of ``C·K^{HW}``)."""
    h, w = prior.latent_hw
    return enumerate_log_prior(prior, progress=False, max_space=latent_space_size(prior.K, h, w), per_class=True)


@torch.no_grad()
def _prior_joint(prior: Prior, codes: Tensor, batch_size: int = 8192) -> Tensor:
    """``[N, C]`` float64 ``log p(c) + log p(z_n | c)`` of codes ``[N, h, w]`` (by the enumeration when
    ``codes`` is the whole latent space in lexicographic order, as an exhaustive selection lists it)."""
    h, w = prior.latent_hw
    if codes.shape[0] == latent_space_size(prior.K, h, w) and codes.shape[0] > 1:
        step = torch.tensor([prior.K ** (h * w - 1 - i) for i in range(h * w)], device=codes.device)
        if bool(((codes.flatten(1) * step).sum(1) == torch.arange(codes.shape[0], device=codes.device)).all()):
            return whole_space_joint(prior).double().to(codes.device)
    was_training = prior.training
    prior.eval()
    try:
        dev = prior.class_log_prior.device
        log_zc = prior.log_prob_all_classes(codes.to(dev), batch_size)
    finally:
        prior.train(was_training)
    return log_zc.double() + prior.class_log_prior.double()


def class_weights(
    prior: Prior | None,
    selection: Selection,
    weights: str = "prior",
    base_log_weights: Tensor | None = None,
) -> Tensor:
    """``[N, C]`` normalized log class weights ``log w_{n,c}`` of the selected latents (float64).

    * ``weights="prior"``: ``w_{n,c} ∝ p(c) p(z_n | c)`` over the selected set (exact, from the prior's
      class-conditional log-probabilities; the selection's own ``class_log_joint`` when it holds one).
    * ``weights="uniform"`` (the paper's uniform weights, per class): ``w_{n,c} = p(c) · 1[n drawn for c] / N_c``
      when the selection records the class each latent was drawn for (``selection.classes``, DMRS and DMBS),
      else ``p(c) / N`` (then the class tells nothing about ``n``).
    * ``base_log_weights [N]``: keep this class marginal (e.g. a fine-tuned or EM-refined circuit's own
      weights, whose components are the same ``z_n``): ``w_{n,c} = w_n · p(c | z_n)`` with ``p(c | z_n)``
      from the prior, so the circuit's ``p̂(x)`` is unchanged and only the class is added.

    Class weights fitted to labeled images (``w_n`` kept, ``p(c | n)`` by EM: calibrated class posteriors)
    come from :func:`~vq2pc.circuit.class_fit.fit_class_weights` instead.
    """
    if weights == "labels":
        raise ValueError(
            "class weights 'labels' are fitted to labeled images: use vq2pc.circuit.class_fit.fit_class_weights"
        )
    if weights not in CLASS_WEIGHTS:
        raise ValueError(f"class weights must be one of {CLASS_WEIGHTS}, got {weights!r}")
    n = len(selection)
    known = selection.class_log_joint
    if known is None and prior is None:
        raise ValueError("class_weights needs the prior (or a selection made with classes=True)")
    if known is not None and (known.dim() != 2 or known.shape[0] != n):
        raise ValueError(f"selection.class_log_joint has shape {tuple(known.shape)}; expected [{n}, C]")
    joint = known.double() if known is not None else _prior_joint(prior, selection.codes)
    log_pc = torch.logsumexp(joint, 0) if prior is None else prior.class_log_prior.double().to(joint.device)
    if base_log_weights is not None:
        base = torch.as_tensor(base_log_weights).double().to(joint.device)
        if tuple(base.shape) != (n,):
            raise ValueError(f"base_log_weights has shape {tuple(base.shape)}; expected [{n}]")
        cond = joint - torch.logsumexp(joint, 1, keepdim=True)  # log p(c | z_n)
        return normalize_joint(torch.log_softmax(base, 0)[:, None] + cond)
    if weights == "prior":
        return normalize_joint(joint)
    drawn = selection.classes
    if drawn is None or bool((drawn < 0).any()):
        return normalize_joint(log_pc[None, :].expand(n, -1) - math.log(n))
    onehot = torch.nn.functional.one_hot(drawn.to(joint.device).long(), joint.shape[1]).double()  # [N, C]
    counts = onehot.sum(0)  # N_c
    log_w = torch.where(onehot > 0, (log_pc - counts.clamp_min(1).log())[None, :].expand(n, -1), -math.inf)
    return normalize_joint(log_w)


def class_joint(
    L: Tensor, r: Tensor, R: Tensor, scratch_bytes: int = 1 << 28, scratch: Scratch | None = None
) -> Tensor:
    """``[b, C]`` float64 ``log Σ_n exp(L[b, n] + r[n, c])``, exact (see the module docstring).

    ``L [b, n]`` (any float dtype; ``-inf`` allowed), ``r [n, C]`` in ``L``'s dtype and ``R = exp(r)``
    ``[n, C]`` float64. ``scratch_bytes`` bounds the ``[rows, C, n]`` block of the exact recomputation;
    ``scratch``: reused buffers (a fresh ``[b, n]`` float64 block costs more in page faults than its ``exp``).
    """
    scratch = scratch or Scratch()
    top = L.amax(1)
    finite = torch.isfinite(top)
    shift = torch.where(finite, top, torch.zeros_like(top)).double()
    E = scratch.take("class_E", tuple(L.shape), torch.float64, L.device).copy_(L)
    E.sub_(shift[:, None]).clamp_min_(_FLOOR).exp_()
    out = (E @ R).log_().add_(shift[:, None])
    bad = (out - shift.double()[:, None] < _RELIABLE).any(1) | ~finite
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        out[rows] = _explicit(L[rows], r, scratch_bytes, scratch)
    return out


def _explicit(L: Tensor, r: Tensor, scratch_bytes: int, scratch: Scratch) -> Tensor:
    """``[u, C]`` float64 per-class log-sum-exp of ``L [u, n] + r [n, C]``, ``[rows, C, n]`` blocks."""
    u, n = L.shape
    C = r.shape[1]
    step = max(1, int(scratch_bytes // max(1, C * n * L.element_size())))
    rt = r.T.contiguous()  # [C, n]
    out = torch.empty((u, C), dtype=torch.float64, device=L.device)
    for a in range(0, u, step):
        rows = L[a : a + step]
        block = scratch.take("class_explicit", (rows.shape[0], C, n), L.dtype, L.device)
        torch.add(rows[:, None, :], rt[None], out=block)
        block = block.view(-1, n)  # [rows·C, n]
        out[a : a + step] = logsumexp_(block).view(-1, C).double()
    return out
