"""Class weights fitted to labeled images: ``p(c | n)`` by EM, the circuit's own ``w_n`` kept.

A class-aware circuit ``p̂(x, c) = Σ_n w_n p(c | n) Π_i p(x_i | z_n)`` (:class:`~vq2pc.circuit.classes.ClassMixture`)
whose ``[N, C]`` table ``p(c | n)`` maximizes the joint log-likelihood ``Σ_i log p̂(x_i, c_i)`` of labeled
images plus a symmetric Dirichlet prior (pseudo-count ``α`` per row, ``α / C`` per class: MAP), by EM from
uniform ``p(c | n)``:

* E-step: ``r_in ∝ w_n p(x_i | z_n) p(c_i | n)``, the exact posterior over components, from the circuit's
  ``[B, N]`` log-likelihood matrix (chunks of images, float64);
* M-step: ``p(c | n) = (Σ_i r_in [c_i = c] + α / C) / (Σ_i r_in + α)``.

``w_n`` is untouched, so ``p̂(x)``, every BPD and every query without a class are exactly the circuit's.
The prior's ``p(c | z_n)`` (:func:`~vq2pc.circuit.class_weights.class_weights`) is sharper than what each
component attracts (``p(n | x)`` is nearly one-hot), which makes the class posterior overconfident; the
fitted table is calibrated to it (docs/NOTES.md, "Class-aware circuits").

Several ``α`` (and iteration counts) are fitted together, one pass over the images per iteration, as a
stacked ``[A, N, C]`` table; :func:`choose_class_fit` picks the one of least validation label NLL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vq2pc.circuit.class_weights import normalize_joint
from vq2pc.circuit.mixture import MixtureCircuit

__all__ = ["ALPHAS", "ClassFit", "choose_class_fit", "fit_class_weights"]

ALPHAS = (0.01, 0.1, 0.3, 1.0)
"""Dirichlet pseudo-counts :func:`choose_class_fit` tries by default."""
_BLOCK_BYTES = 1 << 27
"""Bound on a chunk's ``[A, b, N]`` float64 responsibilities."""


@dataclass(frozen=True)
class ClassFit:
    """A fitted class table: ``log_weights [N, C]`` (float64 ``log w_n + log p(c | n)``, jointly normalized),
    its ``alpha`` and ``iterations``, and the validation label NLL (nats per image) of every candidate,
    ``{(alpha, iterations): nll}``."""

    log_weights: Tensor
    alpha: float
    iterations: int
    val_nll: dict[tuple[float, int], float]


def _check(circuit: MixtureCircuit, x: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """``y`` as a long tensor on the circuit's device (``ValueError`` naming a bad input)."""
    if not isinstance(circuit, MixtureCircuit):
        raise ValueError(f"fitting class weights needs a MixtureCircuit, got {type(circuit).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    y = torch.as_tensor(y)
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels must be integers [{x.shape[0]}] (one per image), got {y.dtype} {tuple(y.shape)}")
    if y.numel() == 0:
        raise ValueError("fitting class weights needs at least one labeled image")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}")
    return y.long().to(circuit.device)


@torch.no_grad()
def _pass(circuit: MixtureCircuit, x: Tensor, y: Tensor, log_cond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One pass over ``x [B, S]`` with labels ``y [B]`` for every table ``log_cond [A, N, C]`` (float64):
    ``(counts [A, N, C] Σ_i r_in [c_i = c], joint [A, B] log p̂(x_i, c_i), marginal [B] log p̂(x_i))``."""
    A, N, C = log_cond.shape
    log_w = torch.log_softmax(circuit.log_weights.double(), 0)  # [N]
    step = max(1, _BLOCK_BYTES // (8 * N * (A + 1)))
    counts = torch.zeros((A, N, C), dtype=torch.float64, device=circuit.device)
    joint = torch.empty((A, x.shape[0]), dtype=torch.float64, device=circuit.device)
    marginal = torch.empty(x.shape[0], dtype=torch.float64, device=circuit.device)
    by_class = log_cond.transpose(1, 2)  # [A, C, N]
    for a in range(0, x.shape[0], step):
        yb = y[a : a + step]
        L = circuit.log_likelihoods(x[a : a + step].to(circuit.device)).double().add_(log_w)  # [b, N]
        marginal[a : a + step] = torch.logsumexp(L, 1)
        scores = L[None] + by_class[:, yb]  # [A, b, N]
        lse = torch.logsumexp(scores, 2)  # [A, b]
        joint[:, a : a + step] = lse
        r = (scores - lse[..., None]).exp_().nan_to_num_(0.0)  # impossible rows attract nothing
        onehot = torch.nn.functional.one_hot(yb, C).double()  # [b, C]
        counts += r.transpose(1, 2) @ onehot
    return counts, joint, marginal


def _m_step(counts: Tensor, alphas: Tensor) -> Tensor:
    """``[A, N, C]`` log p(c | n) = log (counts + α/C) - log (Σ_c counts + α), ``alphas [A]`` > 0."""
    a = alphas.double().to(counts.device)[:, None, None]
    C = counts.shape[2]
    return (counts + a / C).log() - (counts.sum(2, keepdim=True) + a).log()


def _em(circuit: MixtureCircuit, x: Tensor, y: Tensor, C: int, alphas: Sequence[float], keep: Sequence[int]) -> Tensor:
    """``[len(keep), A, N, C]`` log p(c | n) after each iteration count in ``keep`` (EM from uniform)."""
    if not alphas or any(not (float(a) > 0 and math.isfinite(float(a))) for a in alphas):
        raise ValueError(f"the Dirichlet pseudo-counts alpha must be positive and finite, got {list(alphas)}")
    if not keep or min(keep) < 1:
        raise ValueError(f"iterations must be >= 1, got {list(keep)}")
    alpha = torch.tensor([float(a) for a in alphas], dtype=torch.float64)
    log_cond = torch.full((len(alphas), len(circuit), C), -math.log(C), dtype=torch.float64, device=circuit.device)
    kept = {}
    for it in range(1, max(keep) + 1):
        log_cond = _m_step(_pass(circuit, x, y, log_cond)[0], alpha)
        if it in keep:
            kept[it] = log_cond
    return torch.stack([kept[k] for k in keep])


def _joint(circuit: MixtureCircuit, log_cond: Tensor) -> Tensor:
    """``[N, C]`` normalized float64 log w_{n,c} = log w_n + log p(c | n)."""
    return normalize_joint(torch.log_softmax(circuit.log_weights.double(), 0)[:, None] + log_cond)


def fit_class_weights(
    circuit: MixtureCircuit, x: Tensor, y: Tensor, num_classes: int, alpha: float = 0.3, iterations: int = 1
) -> Tensor:
    """``[N, C]`` float64 log w_{n,c} = log w_n + log p(c | n), ``p(c | n)`` fitted to images ``x [B, S]``
    (the circuit's input space) with labels ``y [B]`` in ``0..num_classes-1`` by ``iterations`` EM steps
    from uniform with Dirichlet pseudo-count ``alpha`` (module docstring). For
    :class:`~vq2pc.circuit.classes.ClassMixture` (``ClassMixture(circuit, fit_class_weights(...))``)."""
    y = _check(circuit, x, y, num_classes)
    return _joint(circuit, _em(circuit, x, y, num_classes, [alpha], [iterations])[0, 0])


def choose_class_fit(
    circuit: MixtureCircuit,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    num_classes: int,
    alphas: Sequence[float] = ALPHAS,
    iterations: Sequence[int] = (1,),
) -> ClassFit:
    """The fit (every ``alpha`` × ``iterations``, on ``train = (x [B, S], y [B])``) of least label NLL
    ``-log p̂(y | x)`` on ``val = (x [V, S], y [V])``; ties go to the earlier candidate."""
    y_train, y_val = _check(circuit, train[0], train[1], num_classes), _check(circuit, val[0], val[1], num_classes)
    its = sorted(set(int(i) for i in iterations))
    tables = _em(circuit, train[0], y_train, num_classes, alphas, its)  # [I, A, N, C]
    flat = tables.flatten(0, 1)  # [I·A, N, C], iterations outer
    _, joint, marginal = _pass(circuit, val[0], y_val, flat)
    nll = (marginal[None] - joint).mean(1).tolist()  # p̂(x) is the same for every table
    keys = [(float(a), i) for i in its for a in alphas]
    best = min(range(len(keys)), key=lambda k: nll[k])
    return ClassFit(_joint(circuit, flat[best]), keys[best][0], keys[best][1], dict(zip(keys, nll)))
