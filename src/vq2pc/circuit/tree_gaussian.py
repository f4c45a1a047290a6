"""``GaussianTreeCircuit``: a :class:`~vq2pc.circuit.tree.TreeCircuit` with Gaussian leaves on dequantized
pixels ``x ∈ [0, 1)`` (``x = (v + u) / L``).

Each (variable ``i``, state ``k``) has ``N(x_i; μ_{i,k}, σ_{i,k}²)``, ``σ ≥ std_min``, optionally mixed with a
uniform floor: ``(1 − ε) N(x_i; μ, σ²) + ε`` on ``[0, 1]`` (``floor = ε``; 0 by default, a pure Gaussian).
A Gaussian has no tails — a pixel that no state expects costs ``(Δ/σ)²/2`` nats — and the floor caps that
cost at ``−log ε`` while costing at most ``−log(1 − ε)`` anywhere else. The leaf table ``leaves [S, 2, K]``
holds ``(μ, log σ)``; per-variable terms ``[B, S, K]`` are summed into their patches by ``index_add``, and
everything above the leaves is the tree's. :meth:`GaussianTreeCircuit.discretized` is the exact discrete
twin: each leaf binned over the ``L`` levels (open end bins), a categorical ``TreeCircuit``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from vq2pc.circuit.tree import LEAF_CLASSES, TreeCircuit, detached
from vq2pc.circuit.tree_io import TreeFile, TreeParams
from vq2pc.core import validate
from vq2pc.core.discretized import level_log_prob
from vq2pc.core.leaves import LOG_2PI
from vq2pc.core.random import normal, uniform

__all__ = ["GaussianTreeCircuit"]


class GaussianTreeCircuit(TreeCircuit):
    """A tree circuit with Gaussian leaves (see the module docstring); ``std_min`` in ``(0, 1)``, ``floor``
    in ``[0, 1)``."""

    def __init__(
        self,
        parent: Tensor,
        owner: Tensor,
        K: int,
        levels: int,
        *,
        std_min: float = 1e-3,
        floor: float = 0.0,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if not 0 < std_min < 1 or not 0 <= floor < 1:
            raise ValueError(f"need std_min in (0, 1) and floor in [0, 1), got {std_min!r} and {floor!r}")
        leaf_meta = {"leaf": "gaussian", "std_min": float(std_min), "floor": float(floor), "levels": int(levels)}
        super().__init__(parent, owner, K, levels, meta={**(meta or {}), **leaf_meta})
        self.std_min, self.floor = float(std_min), float(floor)
        self.register_buffer("slot", self.tree.inverse[self.owner])  # [S] each variable's patch in level order
        with torch.no_grad():
            self.leaf_logits[:, 0] = 0.5

    @classmethod
    def from_meta(cls, parent: Tensor, owner: Tensor, K: int, f: TreeFile) -> GaussianTreeCircuit:
        m = f.meta
        return cls(
            parent, owner, K, int(m["levels"]), std_min=float(m["std_min"]), floor=float(m.get("floor", 0.0)), meta=m
        )

    def _leaf_rows(self) -> int:
        return 2

    @property
    def num_params(self) -> int:
        k, m = self.K, self.tree.num_nodes
        return (k - 1) + (m - 1) * k * (k - 1) + 2 * self.num_variables * k

    def _leaf_params(self) -> Tensor:
        mean, log_std = self.leaf_logits.unbind(1)
        return torch.stack((mean, log_std.clamp_min(math.log(self.std_min))), 1)

    def _check_data(self, x: Tensor, name: str) -> None:
        validate.check_finite(name, x)

    def _data(self, x: Tensor) -> Tensor:
        return x.to(self.leaf_logits.dtype)

    # --- leaf terms ----------------------------------------------------------------------------------
    def gaussian_log_terms(self, x: Tensor, leaves: Tensor) -> Tensor:
        """``log N(x_i; μ_{i,k}, σ_{i,k}²)`` ``[B, S, K]`` of ``x [B, S]``."""
        mean, log_std = leaves.unbind(1)  # [S, K] each
        z = (x[:, :, None] - mean) * torch.exp(-log_std)
        return -0.5 * z * z - log_std - 0.5 * LOG_2PI

    def floored(self, g: Tensor, x: Tensor) -> Tensor:
        """Gaussian terms ``g [B, S, K]`` of ``x [B, S]`` mixed with the uniform floor: ``log((1 − ε) e^g + ε·1[0 ≤ x ≤ 1])``."""
        if self.floor == 0:
            return g
        inside = ((x >= 0) & (x <= 1))[:, :, None]
        flat = torch.where(inside, g.new_tensor(math.log(self.floor)), g.new_tensor(-math.inf))
        return torch.logaddexp(g + math.log1p(-self.floor), flat)

    def variable_log_likelihoods(self, x: Tensor, leaves: Tensor) -> Tensor:
        """``log p(x_i | z_owner(i) = k)`` ``[B, S, K]`` of ``x [B, S]``."""
        return self.floored(self.gaussian_log_terms(x, leaves), x)

    def patch_sums(self, ll: Tensor, weights: Tensor | None) -> Tensor:
        """Per-variable terms ``ll [B, S, K]`` (times ``weights [B, S]``) summed over each patch ->
        ``[B, M, K]`` in level order."""
        if weights is not None:
            ll = ll * weights[:, :, None]
        return ll.new_zeros(ll.shape[0], self.tree.num_nodes, self.K).index_add_(1, self.slot, ll)

    def leaf_log_likelihoods(self, x: Tensor, weights: Tensor | None, leaves: Tensor) -> Tensor:
        return self.patch_sums(self.variable_log_likelihoods(x, leaves), weights)

    def _leaf_means(self, leaves: Tensor) -> Tensor:
        return (1 - self.floor) * leaves[:, 0] + self.floor * 0.5

    def _draw_leaves(self, states: Tensor, leaves: Tensor, generator: torch.Generator | None) -> Tensor:
        rows = torch.arange(self.num_variables, device=states.device)
        mean, std = leaves[:, 0][rows, states], leaves[:, 1].exp()[rows, states]  # [B, S]
        shape, device, dtype = tuple(mean.shape), mean.device, mean.dtype
        draw = mean + std * normal(shape, generator, device, dtype)
        if self.floor == 0:
            return draw
        flat = uniform(shape, generator, device, dtype) < self.floor
        return torch.where(flat, uniform(shape, generator, device, dtype), draw)

    # --- the discrete twin ---------------------------------------------------------------------------
    @torch.no_grad()
    def discretized(self) -> TreeCircuit:
        """The exact categorical twin over ``L`` levels: ``P(v_i | k) = (1 − ε)(Φ((v+1)/L) − Φ(v/L)) + ε/L``
        (open end bins; never a higher BPD than the dequantized one: Jensen). Same tree and latents."""
        p = detached(self.log_params())
        mean, log_std = p.leaves.unbind(1)
        v = torch.arange(self.levels, device=mean.device, dtype=mean.dtype)[:, None, None]  # [L, 1, 1]
        table = level_log_prob(v, mean, log_std.exp(), self.levels, "gaussian").permute(1, 0, 2)  # [S, L, K]
        if self.floor > 0:
            table = torch.logaddexp(
                table + math.log1p(-self.floor), table.new_tensor(math.log(self.floor / self.levels))
            )
        meta = {k: val for k, val in self.meta.items() if k not in ("leaf", "std_min", "floor")}
        twin = TreeCircuit(self.tree.parent, self.owner, self.K, self.levels, meta={**meta, "twin_of": "gaussian"})
        twin = twin.to(device=mean.device, dtype=mean.dtype)
        twin.set_log_params(TreeParams(p.root, p.edges, table.contiguous()))
        return twin


LEAF_CLASSES["gaussian"] = GaussianTreeCircuit
