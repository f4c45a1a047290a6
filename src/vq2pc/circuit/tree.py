"""``TreeCircuit``: a deep distilled circuit — a tree over a VQ-VAE's code grid with patch-local leaves.

``M = h·w`` latent positions, each a discrete latent ``z_j ∈ {0..K-1}``; every observed variable ``i`` (of
``S``, integer levels ``0..L-1``) belongs to one position ``owner(i)`` (its patch). The model is

    p(x) = Σ_z p(z_root) Π_{j ≠ root} p(z_j | z_parent(j)) Π_i Cat(x_i; θ_{i, z_owner(i)})

over all ``K^M`` latent grids. It is a smooth, decomposable probabilistic circuit: per node ``j`` and
state ``k`` a product unit joins the leaves of patch ``j`` (disjoint scopes) with one sum unit per child
edge (``Σ_c p(z_c = c | z_j = k) · ...``, all children over the same scope), and the root is a sum over
``z_root`` — so every query below is exact. Log-likelihoods come from one upward pass: leaf
log-likelihoods ``[B, M, K]`` (an ``embedding_bag`` sum over each patch's rows of the ``[S·L, K]`` table),
then per tree level one batched log-space matrix product ``[B, n, K] × [n, K, K]`` — loops run over the
tree's levels only, never over ``K`` or rows. Unobserved variables contribute ``log 1 = 0``, so
marginals are the same pass. Posteriors over each ``z_j`` are the gradient of ``log p(x)`` with respect to
the leaf log-likelihoods (autograd is the downward pass); samples, conditional on observed pixels or not,
are drawn top-down (ancestral) from the exact conditionals ``p(z_c | z_parent, x_obs)``.

Parameters (``nn.Parameter`` log-probabilities, normalized by ``log_softmax`` where used): ``root [K]``,
``edges [E, K, K]`` (``E = M − 1``, edge ``e`` from ``parent(children[e])`` to ``children[e]``, row =
parent state) and ``leaves [S, L, K]`` (``log θ_{i, l, k}``, normalized over ``l``). Built by latent
variable distillation and fitted by :mod:`vq2pc.circuit.tree_fit`; files by :mod:`vq2pc.circuit.tree_io`.

:class:`~vq2pc.circuit.tree_gaussian.GaussianTreeCircuit` is the same tree with Gaussian leaves; a file's
``meta["leaf"]`` names its class in :data:`LEAF_CLASSES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vq2pc.circuit.queries import Sampler
from vq2pc.circuit.tree_io import TreeFile, TreeParams, read_tree, write_tree
from vq2pc.circuit.tree_structure import LatentTree
from vq2pc.core import validate
from vq2pc.core.checkpoint import CheckpointError
from vq2pc.core.random import categorical

__all__ = ["TreeCircuit", "TreeParams", "LEAF_CLASSES", "detached"]


class TreeCircuit(nn.Module, Sampler):
    """Tree circuit over ``M`` latent positions (see the module docstring).

    Args:
        parent: ``[M]`` the tree (``-1`` at the root).
        owner: ``[S]`` the latent position of each variable.
        K: states per latent. levels: ``L``, the pixel levels.
        meta: JSON-serializable dict saved with the circuit (e.g. ``image_shape``, ``latent_hw``).

    Parameters start uniform; :meth:`set_log_params` sets them. Data ``x`` is ``[B, S]`` or
    ``[B, C, H, W]`` integer levels; masks are bool of the same shape (or ``[S]``), True = observed.
    """

    std_min: float | None = None  # None: categorical leaves (a Gaussian-leaf tree's std floor otherwise)

    def __init__(
        self, parent: Tensor, owner: Tensor, K: int, levels: int, *, meta: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.tree = LatentTree.from_parent(parent)
        owner = torch.as_tensor(owner, dtype=torch.long).reshape(-1)
        m = self.tree.num_nodes
        if owner.numel() == 0 or int(owner.min()) < 0 or int(owner.max()) >= m:
            raise ValueError(f"owner must map every variable to a position in [0, {m - 1}]")
        if K < 1 or levels < 2:
            raise ValueError(f"need K >= 1 and levels >= 2, got K={K}, levels={levels}")
        self.K, self.levels, self.meta = int(K), int(levels), dict(meta or {})
        slot = self.tree.inverse[owner]  # each variable's patch in level order
        perm = torch.argsort(slot, stable=True)
        sizes = torch.bincount(slot, minlength=m)
        self.register_buffer("owner", owner)
        self.register_buffer("perm", perm)  # variables in patch order, patches in level order
        self.register_buffer("starts", torch.cumsum(sizes, 0) - sizes)  # [M] first entry of each patch
        self.root_logits = nn.Parameter(torch.zeros(K))
        self.edge_logits = nn.Parameter(torch.zeros(m - 1, K, K))
        self.leaf_logits = nn.Parameter(torch.zeros(owner.numel(), self._leaf_rows(), K))

    def _leaf_rows(self) -> int:
        """Rows per (variable, state) in the leaf table: the ``L`` level log-probabilities."""
        return self.levels

    # --- parameters ----------------------------------------------------------------------------------
    @property
    def num_variables(self) -> int:
        return int(self.owner.numel())

    @property
    def num_params(self) -> int:
        """Free parameters (each distribution's ``n`` probabilities count ``n − 1``); with tied leaves
        (``meta["leaf_bins"]``, see :func:`vq2pc.circuit.tree_fit.m_step`) ``bins − 1`` per (variable,
        state) plus ``L − bins`` per variable."""
        s, m, k, lv = self.num_variables, self.tree.num_nodes, self.K, self.levels
        bins = int(self.meta.get("leaf_bins") or lv)
        leaves = s * k * (lv - 1) if bins >= lv else s * k * (bins - 1) + s * (lv - bins)
        return (k - 1) + (m - 1) * k * (k - 1) + leaves

    def log_params(self) -> TreeParams:
        """The normalized log-parameters (differentiable functions of the stored logits)."""
        return TreeParams(
            torch.log_softmax(self.root_logits, 0),
            torch.log_softmax(self.edge_logits, 2),
            self._leaf_params(),
        )

    def _leaf_params(self) -> Tensor:
        return torch.log_softmax(self.leaf_logits, 1)

    @torch.no_grad()
    def set_log_params(self, params: TreeParams) -> None:
        """Set the parameters to ``params`` (log-probabilities of the shapes of :class:`TreeParams`)."""
        for name, value in zip(("root_logits", "edge_logits", "leaf_logits"), params):
            own = getattr(self, name)
            if tuple(value.shape) != tuple(own.shape):
                raise ValueError(f"{name}: expected shape {tuple(own.shape)}, got {tuple(value.shape)}")
            validate.check_finite(name, value)
            own.copy_(value)

    def _apply(self, fn: Any, recurse: bool = True) -> TreeCircuit:  # keep the tree's indices with the buffers
        super()._apply(fn, recurse)
        self.tree = self.tree.to(self.owner.device)
        return self

    # --- passes --------------------------------------------------------------------------------------
    def leaf_log_likelihoods(self, x: Tensor, weights: Tensor | None, leaves: Tensor) -> Tensor:
        """``log p(x_patch(j) | z_j = k)`` ``[B, M, K]`` of levels ``x [B, S]`` (long), positions ``j`` in
        level order (``tree.order``: what :meth:`upward` takes); ``weights [B, S]`` (0 for unobserved
        variables, else 1; None: all observed)."""
        b, s = x.shape
        m, lv = self.tree.num_nodes, self.levels
        rows = (self.perm * lv + x[:, self.perm]).reshape(-1)  # [B·S] rows of the [S·L, K] table
        offsets = (torch.arange(b, device=x.device)[:, None] * s + self.starts).reshape(-1)
        w = None if weights is None else weights[:, self.perm].reshape(-1).to(leaves.dtype)
        out = F.embedding_bag(rows, leaves.reshape(s * lv, self.K), offsets, mode="sum", per_sample_weights=w)
        return out.view(b, m, self.K)

    def upward(self, ll: Tensor, params: TreeParams, with_up: bool = False) -> tuple[Tensor, Tensor | None]:
        """Upward pass over leaf terms ``ll [B, M, K]`` in level order: ``(log p(x) [B], up)``; with
        ``with_up``, ``up [B, M, K]`` (node order) holds ``log p(x_subtree(j) | z_j = k)``, else None.

        The leaf terms are split by level (views: they come in level order), each level's incoming messages
        are summed into a tensor of its own size, and the edges are split by level: no step touches the
        whole ``[B, M, K]`` tensor, so a deep tree costs what its nodes cost."""
        t = self.tree
        ups: list[Tensor] = list(ll.split(t.level_sizes, dim=1))  # [B, n_d, K] per level
        edges = params.edges.exp().split(t.level_sizes[1:], dim=0)  # [n_d, K, K] into each level d >= 1
        for d in range(len(ups) - 1, 0, -1):
            u = ups[d]  # [B, n, K]: its children's messages already added
            top = u.amax(-1, keepdim=True)
            msg = torch.einsum("bnc,npc->bnp", (u - top).exp(), edges[d - 1]).log() + top
            ups[d - 1] = ups[d - 1].index_add(1, t.parent_slots[d], msg)  # out of place: a new level tensor
        up = torch.cat(ups, 1)[:, t.inverse] if with_up else None
        return torch.logsumexp(params.root + ups[0][:, 0], -1), up

    def forward(self, x: Tensor, weights: Tensor | None = None, params: TreeParams | None = None) -> Tensor:
        """``log p(x)`` ``[B]`` of validated levels ``x [B, S]`` (long), differentiable (training)."""
        params = self.log_params() if params is None else params
        return self.upward(self.leaf_log_likelihoods(x, weights, params.leaves), params)[0]

    # --- queries -------------------------------------------------------------------------------------
    def prepare(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Validate ``x`` and ``mask`` -> levels ``[B, S]`` (long; unobserved entries 0) and weights
        ``[B, S]`` (float, 0 = unobserved) or None."""
        x = validate.rows(x, self.num_variables).to(self.owner.device)
        if mask is None:
            self._check_data(x, "x")
            return self._data(x), None
        mask = validate.observed_mask(mask, x.shape[0], self.num_variables).to(x.device)
        self._check_data(x[mask], "x (observed entries)")
        return self._data(torch.where(mask, x, torch.zeros_like(x))), mask.to(self.leaf_logits.dtype)

    def _check_data(self, x: Tensor, name: str) -> None:
        validate.check_levels(x, self.levels, name)

    def _data(self, x: Tensor) -> Tensor:
        return x.long()

    @torch.no_grad()
    def log_prob(self, x: Tensor, mask: Tensor | None = None, batch_size: int = 256) -> Tensor:
        """``log p(x_obs)`` ``[B]`` (nats): the exact marginal over unobserved variables (``mask``)."""
        x, w = self.prepare(x, mask)
        params = self.log_params()
        parts = [
            self(x[i : i + batch_size], None if w is None else w[i : i + batch_size], params)
            for i in range(0, x.shape[0], batch_size)
        ]
        return torch.cat(parts)

    def posterior(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``p(z_j = k | x_obs)`` ``[B, M, K]``: the exact posterior marginal of every latent."""
        x, w = self.prepare(x, mask)
        return self._posterior(x, w, detached(self.log_params()))

    def _posterior(self, x: Tensor, w: Tensor | None, params: TreeParams) -> Tensor:
        with torch.enable_grad():
            ll = self.leaf_log_likelihoods(x, w, params.leaves).detach().requires_grad_()
            (grad,) = torch.autograd.grad(self.upward(ll, params)[0].sum(), ll)
        return grad[:, self.tree.inverse]

    @torch.no_grad()
    def conditional_mean(self, x: Tensor, mask: Tensor) -> Tensor:
        """``E[x_i | x_obs]`` ``[B, S]`` for unobserved variables; observed ones keep their values."""
        xl, w = self.prepare(x, mask)
        params = detached(self.log_params())
        q = self._posterior(xl, w, params)  # [B, M, K]
        cond = (q[:, self.owner] * self._leaf_means(params.leaves)).sum(-1)
        return torch.where(w.bool(), xl.to(cond.dtype), cond) if w is not None else xl.to(cond.dtype)

    def _leaf_means(self, leaves: Tensor) -> Tensor:
        """``E[x_i | z_owner(i) = k]`` ``[S, K]``."""
        levels = torch.arange(self.levels, device=leaves.device, dtype=leaves.dtype)
        return torch.einsum("slk,l->sk", leaves.exp(), levels)

    _prepare = prepare

    @torch.no_grad()
    def _draw(self, n: int, generator: torch.Generator | None) -> Tensor:
        """``[n, S]`` (float levels): top-down ancestral sampling of ``z``, then every variable from its patch's
        leaf."""
        params = detached(self.log_params())
        up = torch.zeros(n, self.tree.num_nodes, self.K, device=self.owner.device, dtype=params.root.dtype)
        return self._draw_from(up, params, generator)

    @torch.no_grad()
    def _draw_given(self, x: Tensor, mask: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """``[B, S]`` (float levels) given the prepared levels ``x`` and weights ``mask``: top-down sampling of
        ``z`` from ``p(z | x_obs)``, then every variable from its patch's leaf."""
        params = detached(self.log_params())
        up = self.upward(self.leaf_log_likelihoods(x, mask, params.leaves), params, with_up=True)[1]
        return self._draw_from(up, params, generator)

    def _draw_from(self, up: Tensor, params: TreeParams, generator: torch.Generator | None) -> Tensor:
        """``[B, S]``: ``z`` drawn given the upward values ``up [B, M, K]``, then each variable from its leaf."""
        z = self._draw_latents(up, params, generator)  # [B, M]
        return self._draw_leaves(z[:, self.owner], params.leaves, generator).to(params.root.dtype)

    def _draw_leaves(self, states: Tensor, leaves: Tensor, generator: torch.Generator | None) -> Tensor:
        """``[B, S]``: each variable drawn from its leaf given its position's state ``states [B, S]``."""
        probs = leaves.exp().transpose(1, 2)[torch.arange(self.num_variables), states]  # [B, S, L]
        return categorical(probs, generator)

    def _draw_latents(self, up: Tensor, params: TreeParams, generator: torch.Generator | None) -> Tensor:
        """Top-down draw of ``z [B, M]`` from ``p(z | x_obs)`` given the upward values ``up [B, M, K]``."""
        t = self.tree
        z = torch.empty(up.shape[:2], dtype=torch.long, device=up.device)
        z[:, t.root] = categorical((params.root + up[:, t.root]).softmax(-1), generator)
        for d in range(1, len(t.levels)):
            nodes, parents, (a, b) = t.levels[d], t.level_parents[d], t.edge_slices[d]
            rows = params.edges[a:b][torch.arange(b - a, device=up.device), z[:, parents]]  # [B, n, K]
            z[:, nodes] = categorical((rows + up[:, nodes]).softmax(-1), generator)
        return z

    # --- files ---------------------------------------------------------------------------------------
    def to_file(self) -> TreeFile:
        """The structure, parameters and meta as a :class:`~vq2pc.circuit.tree_io.TreeFile`."""
        return TreeFile(self.tree.parent, self.owner, detached(self.log_params()), self.meta)

    @classmethod
    def from_file(cls, f: TreeFile) -> TreeCircuit:
        """A circuit on the CPU from a :class:`~vq2pc.circuit.tree_io.TreeFile` (ValueError if inconsistent)."""
        try:
            kind = f.meta.get("leaf", "categorical")
            if kind not in LEAF_CLASSES:
                raise ValueError(f"unknown leaf kind {kind!r} (known: {sorted(LEAF_CLASSES)})")
            circuit = LEAF_CLASSES[kind].from_meta(f.parent, f.owner, int(f.params.root.numel()), f)
        except (IndexError, KeyError, TypeError) as exc:
            raise ValueError(f"{type(exc).__name__}: {exc}") from None
        circuit.set_log_params(f.params)
        return circuit

    @classmethod
    def from_meta(cls, parent: Tensor, owner: Tensor, K: int, f: TreeFile) -> TreeCircuit:
        """An empty circuit of the shape a file describes (its leaf settings read from ``f.meta``)."""
        return cls(parent, owner, K, int(f.params.leaves.shape[1]), meta=f.meta)

    def save(self, path: str | Path) -> Path:
        """Write one ``.safetensors`` file (:mod:`vq2pc.circuit.tree_io`), atomically."""
        return write_tree(path, self.to_file())

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> TreeCircuit:
        """Load a circuit written by :meth:`save`; :class:`~vq2pc.core.checkpoint.CheckpointError` for bad files."""
        f = read_tree(path)
        try:
            circuit = cls.from_file(f)
        except ValueError as exc:
            raise CheckpointError(f"{path}: invalid tree circuit contents: {exc}") from None
        return circuit.to(device or "cpu")

    def extra_repr(self) -> str:
        return f"M={self.tree.num_nodes}, K={self.K}, S={self.num_variables}, L={self.levels}"


def detached(params: TreeParams) -> TreeParams:
    """``params`` without their autograd history."""
    return TreeParams(*(t.detach() for t in params))


LEAF_CLASSES: dict[str, type[TreeCircuit]] = {"categorical": TreeCircuit}  # meta["leaf"] -> class (files)
