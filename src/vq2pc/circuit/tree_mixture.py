"""``TreeMixture``: a sum node over tree circuits, ``p(x) = Σ_c π_c p_c(x)``.

The components are :class:`~vq2pc.circuit.tree.TreeCircuit` s over the same ``S`` variables and ``L``
levels, each with its own tree, grid, ``K`` and leaves (trees fitted from different k-means seeds, say).
A sum over smooth, decomposable circuits with the same scope is one again, so every query stays exact:
marginals are the mixture of the components' marginals, ``p(c | x_obs) ∝ π_c p_c(x_obs)``, and a
conditional draw picks ``c`` from that posterior, then draws from component ``c`` given ``x_obs``. The
loops below run over the ``C`` components (a handful of differently shaped trees), never over rows.

Weights are uniform unless given; :func:`fit_weights` fits them by EM on held-out images with the
components fixed (a concave problem in ``π``: the maximum is global). One ``.safetensors`` file holds the
mixture (:mod:`vq2pc.circuit.tree_io`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from vq2pc.circuit.queries import Sampler
from vq2pc.circuit.tree import TreeCircuit
from vq2pc.circuit.tree_io import read_tree_mixture, write_tree_mixture
from vq2pc.core.checkpoint import CheckpointError
from vq2pc.core.random import categorical

__all__ = ["TreeMixture", "fit_weights"]


class TreeMixture(nn.Module, Sampler):
    """A mixture of ``C`` tree circuits (see the module docstring).

    Args:
        components: the trees (same number of variables and levels).
        log_weights: ``[C]`` log mixture weights (normalized here); None: uniform.
    """

    def __init__(self, components: Sequence[TreeCircuit], log_weights: Tensor | None = None) -> None:
        super().__init__()
        if not components:
            raise ValueError("a tree mixture needs at least one component")
        shapes = {(c.num_variables, c.levels) for c in components}
        if len(shapes) != 1:
            raise ValueError(f"components must share the variables and levels (S, L); got {sorted(shapes)}")
        if len({c.std_min is None for c in components}) != 1:
            raise ValueError("components must share the leaf kind: categorical and Gaussian-leaf trees do not mix")
        self.components = nn.ModuleList(components)
        weights = torch.zeros(len(components)) if log_weights is None else torch.as_tensor(log_weights)
        weights = weights if weights.is_floating_point() else weights.float()
        if weights.shape != (len(components),) or not torch.isfinite(weights).all():
            raise ValueError(f"log_weights must be {len(components)} finite numbers, got {weights.tolist()}")
        self.register_buffer("log_weights", torch.log_softmax(weights, 0))

    @property
    def num_components(self) -> int:
        return len(self.components)

    @property
    def num_variables(self) -> int:
        return self.components[0].num_variables

    @property
    def levels(self) -> int:
        return self.components[0].levels

    @property
    def num_params(self) -> int:
        """The components' free parameters and ``C − 1`` weights."""
        return sum(c.num_params for c in self.components) + self.num_components - 1

    def prepare(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Validated levels ``[B, S]`` and weights ``[B, S]`` or None (:meth:`TreeCircuit.prepare`)."""
        return self.components[0].prepare(x, mask)

    _prepare = prepare

    def component_log_probs(self, x: Tensor, mask: Tensor | None = None, batch_size: int = 256) -> Tensor:
        """``log p_c(x_obs)`` ``[C, B]`` (nats) of every component."""
        return torch.stack([c.log_prob(x, mask, batch_size) for c in self.components])

    @torch.no_grad()
    def log_prob(self, x: Tensor, mask: Tensor | None = None, batch_size: int = 256) -> Tensor:
        """``log p(x_obs)`` ``[B]`` (nats): the exact marginal over unobserved variables (``mask``)."""
        return torch.logsumexp(self.log_weights[:, None] + self.component_log_probs(x, mask, batch_size), 0)

    @torch.no_grad()
    def component_posterior(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``p(c | x_obs)`` ``[B, C]``."""
        return (self.log_weights[:, None] + self.component_log_probs(x, mask)).softmax(0).T

    @torch.no_grad()
    def conditional_mean(self, x: Tensor, mask: Tensor) -> Tensor:
        """``E[x_i | x_obs]`` ``[B, S]``: the components' conditional means weighted by ``p(c | x_obs)``."""
        means = torch.stack([c.conditional_mean(x, mask) for c in self.components])  # [C, B, S]
        return torch.einsum("bc,cbs->bs", self.component_posterior(x, mask), means)

    @torch.no_grad()
    def _draw(self, n: int, generator: torch.Generator | None) -> Tensor:
        """``[n, S]``: a component per row from ``π``, then that component's draws for its rows."""
        which = categorical(self.log_weights.exp().expand(n, -1), generator)
        return self._by_component(which, lambda c, rows: c._draw(int(rows.sum()), generator))

    @torch.no_grad()
    def _draw_given(self, x: Tensor, mask: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """``[B, S]``: a component per row from ``p(c | x_obs)``, then that component's conditional draws."""
        logp = torch.stack([c(x, mask) for c in self.components])  # [C, B]
        which = categorical((self.log_weights[:, None] + logp).softmax(0).T, generator)
        return self._by_component(
            which, lambda c, rows: c._draw_given(x[rows], None if mask is None else mask[rows], generator)
        )

    def _by_component(self, which: Tensor, draw: Callable[[TreeCircuit, Tensor], Tensor]) -> Tensor:
        """``[B, S]``: rows ``which == c`` filled by ``draw(component c, those rows' mask)``."""
        out = torch.empty(which.numel(), self.num_variables, dtype=self.log_weights.dtype, device=which.device)
        for k, c in enumerate(self.components):
            rows = which == k
            if rows.any():
                out[rows] = draw(c, rows).to(out.dtype)
        return out

    def save(self, path: str | Path) -> Path:
        """Write one ``.safetensors`` file (:func:`~vq2pc.circuit.tree_io.write_tree_mixture`), atomically."""
        return write_tree_mixture(path, self.log_weights.detach(), [c.to_file() for c in self.components])

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> TreeMixture:
        """Load a mixture written by :meth:`save`; :class:`~vq2pc.core.checkpoint.CheckpointError` for bad files."""
        log_weights, files = read_tree_mixture(path)
        try:
            return cls([TreeCircuit.from_file(f) for f in files], log_weights).to(device or "cpu")
        except ValueError as exc:
            raise CheckpointError(f"{path}: invalid tree mixture contents: {exc}") from None

    def extra_repr(self) -> str:
        return f"C={self.num_components}, S={self.num_variables}, L={self.levels}"


def fit_weights(log_probs: Tensor, iterations: int = 100, tol: float = 1e-7) -> Tensor:
    """Log weights ``[C]`` maximizing ``Σ_n log Σ_c π_c p_c(x_n)`` given the components' log-likelihoods
    ``log_probs [C, n]`` of held-out images (:meth:`TreeMixture.component_log_probs`), the components
    fixed: EM on ``π`` alone (``π ← mean_n p(c | x_n)``) from uniform, until the mean log-likelihood gains
    less than ``tol`` nats."""
    if log_probs.dim() != 2 or log_probs.shape[1] == 0:
        raise ValueError(f"log_probs must be [C, n] with n >= 1, got shape {tuple(log_probs.shape)}")
    logp = log_probs.double()
    c, n = logp.shape
    log_w = torch.full((c,), -math.log(c), dtype=torch.float64, device=logp.device)
    last = -math.inf
    for _ in range(iterations):
        joint = log_w[:, None] + logp
        total = float(torch.logsumexp(joint, 0).mean())
        if total - last < tol:
            break
        last, log_w = total, torch.logsumexp(joint.log_softmax(0), 1) - math.log(n)
    return log_w.float()
