"""``MixtureCircuit``: the distilled probabilistic circuit and its exact queries.

``p̂(x) = Σ_n w_n Π_i p(x_i | θ_n)`` over ``N`` components and ``S`` variables.
Every query reduces to the component log-likelihood matrix ``ℓ [B, N]``
(:mod:`vq2pc.circuit.kernels`: one matrix product for Gaussian and Bernoulli
leaves, an ``embedding_bag`` table sum for categorical leaves) followed by a
streaming reduction over ``N``. The batch is cut into row blocks and the
components into column blocks so that the temporaries of one block stay within
``memory_budget_mib``; reductions over component blocks are exact running
ones (log-sum-exp, rescaled weighted sums, running argmax), so results do not
depend on the block sizes beyond float round-off. No Python loop runs over
components, rows or pixels — only over blocks.

Marginals are exact: an unobserved variable contributes ``log 1 = 0`` to every
component. Conditionals ``p(x_u | x_o)`` are the mixture of the components'
leaves on ``x_u`` with the posterior ``p(n | x_o)`` as weights, so conditional
means, samples and conditional likelihoods are exact.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from vq2pc.circuit.io import (
    prepare_input,
    read_circuit,
    write_circuit,
)
from vq2pc.circuit.kernels import make_kernel, normalized_categorical
from vq2pc.circuit.queries import Block, Sampler, log_marginal, posterior_draw, posterior_mean
from vq2pc.circuit.streaming import RunningArgmax, Scratch, logsumexp_
from vq2pc.core.checkpoint import CheckpointError
from vq2pc.core.leaves import Categorical, Leaf, discretize, leaf_from_tensors
from vq2pc.core.random import uniform

__all__ = ["MixtureCircuit"]

_MIB = 1 << 20
Blocks = list[tuple[int, int]]
BlockFn = Callable[[Tensor, "Tensor | None", Blocks, Scratch], Tensor]


class MixtureCircuit(Sampler):
    """A mixture of ``N`` fully factorized components over ``S`` variables.

    Args:
        leaf: ``Gaussian(mean [N,S], std [N,S])``, ``Categorical(logits [N,S,L])``,
            ``Bernoulli(logits [N,S])`` or ``DiscretizedGaussian``/``DiscretizedLogistic(mean [N,S],
            scale [N,S], L)``: component ``n`` is row ``n`` of the leaf.
        log_weights: ``[N]`` log mixture weights (normalized here; ``-inf`` allowed).
        memory_budget_mib: bound on the extra memory of one query's temporaries.
        meta: JSON-serializable dict saved with the circuit (e.g. ``image_shape``, ``levels``).

    Data ``x`` is ``[B, S]`` or ``[B, C, H, W]``; masks are bool of the same shape
    (or ``[S]``), True = observed. Unobserved entries of ``x`` are ignored.
    """

    def __init__(
        self,
        leaf: Leaf,
        log_weights: Tensor,
        *,
        memory_budget_mib: float = 1024,
        meta: dict[str, Any] | None = None,
        _trusted: bool = False,
    ) -> None:
        # _trusted: leaf and weights come from vq2pc itself (ExactModel's chunks): skip the value checks,
        # whose host syncs would run once per chunk.
        if not _trusted:
            _check_leaf(leaf)
        n = int(leaf.batch_shape[0])
        log_weights = torch.as_tensor(log_weights)
        if tuple(log_weights.shape) != (n,):
            raise ValueError(f"log_weights has shape {tuple(log_weights.shape)}; expected [{n}] (one per component)")
        if not _trusted and (
            torch.isnan(log_weights).any() or (log_weights == math.inf).any() or (log_weights == -math.inf).all()
        ):
            raise ValueError("log_weights must be free of NaN and +inf and not all -inf")
        if not memory_budget_mib > 0:
            raise ValueError(f"memory_budget_mib must be > 0, got {memory_budget_mib}")
        self.meta = dict(meta or {})
        try:
            json.dumps(self.meta)
        except TypeError as exc:
            raise ValueError(f"meta must be JSON-serializable: {exc}") from None
        dtype = next(iter(leaf.tensors().values())).dtype
        # The weights as given are what `save` writes, so a loaded circuit renormalizes to the same bits.
        self._given_log_weights = log_weights.to(device=leaf.device, dtype=dtype)
        self.log_weights = torch.log_softmax(self._given_log_weights, 0)
        self.memory_budget_mib = float(memory_budget_mib)
        self.leaf, self._kernel = make_kernel(leaf, self.log_weights)
        self._means: Tensor | None = None
        self._mode_logp: Tensor | None = None

    # --- structure ------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.log_weights.shape[0])

    @property
    def num_variables(self) -> int:
        """``S``."""
        return self.leaf.num_variables

    @property
    def num_params(self) -> int:
        """Scalar parameters: leaf parameters plus the ``N`` weights."""
        return sum(t.numel() for t in self.leaf.tensors().values()) + len(self)

    @property
    def device(self) -> torch.device:
        return self.log_weights.device

    def to(self, device: str | torch.device) -> MixtureCircuit:
        """A copy of this circuit on ``device``."""
        return MixtureCircuit(
            self.leaf.to(device),
            self._given_log_weights.to(device),
            memory_budget_mib=self.memory_budget_mib,
            meta=self.meta,
        )

    def __repr__(self) -> str:
        return f"MixtureCircuit(kind={self.leaf.kind}, N={len(self)}, S={self.num_variables})"

    def discretized(self, levels: int) -> MixtureCircuit:
        """The exact ``levels``-level twin of a Gaussian-leaf circuit (same weights, leaves
        ``Gaussian.discretized``, sharing their tensors): its discrete BPD is never above this circuit's
        dequantized BPD. ``ValueError`` for other leaves."""
        return MixtureCircuit(
            discretize(self.leaf, levels),
            self._given_log_weights,
            memory_budget_mib=self.memory_budget_mib,
            meta={**self.meta, "levels": levels},
        )

    # --- blocking -------------------------------------------------------------------
    def _blocks(self, batch: int, extra_row_bytes: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Row blocks and component blocks whose temporaries fit the memory budget."""
        budget = self.memory_budget_mib * _MIB
        n, k = len(self), self._kernel
        cell, row, col = k.cell_bytes(), k.row_bytes() + extra_row_bytes, k.column_bytes()
        # A kernel with per-call column costs (discretized tables) gets every row per call when it can.
        ref = batch if col else min(batch, 64)
        n_blk = n
        if k.slices_components and ref * (n * cell + row) + n * col > budget:
            n_blk = max(1, int((budget - ref * row) // (ref * cell + col)))
        b_blk = max(1, min(batch, int((budget - n_blk * col) // (n_blk * cell + row))))
        return _ranges(batch, b_blk), _ranges(n, n_blk)

    def _scores(self, x: Tensor, mask: Tensor | None, n0: int, n1: int, scratch: Scratch) -> Tensor:
        """``[b, n1-n0]`` log w_n + log p(x_o | n), a view of ``scratch`` (may be overwritten)."""
        return self._kernel.loglik(x, mask, n0, n1, bias=self.log_weights[n0:n1], scratch=scratch)

    def _score_blocks(self, x: Tensor, mask: Tensor | None, cols: Blocks, scratch: Scratch) -> Iterator[Block]:
        """The component blocks ``cols`` of rows ``x`` as :mod:`~vq2pc.circuit.queries` reads them."""
        for n0, n1 in cols:
            yield n0, self._scores(x, mask, n0, n1, scratch), lambda n0=n0, n1=n1: self.component_means()[n0:n1]

    def _prepare(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return prepare_input(x, mask, self.leaf, self._kernel.fill_value())

    def _row_map(self, x: Tensor, mask: Tensor | None, fn: BlockFn, extra: int = 0) -> Tensor:
        """Apply ``fn(x_rows, mask_rows, component_blocks, scratch)`` to row blocks of prepared
        ``x``/``mask`` and concatenate the results (one :class:`Scratch` serves every block)."""
        rows, cols = self._blocks(x.shape[0], extra)
        scratch = Scratch()
        out: Tensor | None = None
        for b0, b1 in rows:
            part = fn(x[b0:b1], None if mask is None else mask[b0:b1], cols, scratch)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out[b0:b1] = part
        return out

    # --- likelihoods ----------------------------------------------------------------
    def log_likelihoods(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B, N]`` per-component log p(x_o | n) (no weights)."""
        return self.log_likelihoods_prepared(*self._prepare(x, mask))

    def log_likelihoods_prepared(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """:meth:`log_likelihoods` of ``x [B, S]`` / ``mask [B, S]`` already validated by ``prepare_input``
        (for callers that stream one input through many circuits: no per-circuit checks)."""

        def block(xb: Tensor, mb: Tensor | None, cols: Blocks, scratch: Scratch) -> Tensor:
            out = scratch.take("rows", (len(xb), len(self)), self.log_weights.dtype, xb.device)
            for n0, n1 in cols:
                out[:, n0:n1] = self._kernel.loglik(xb, mb, n0, n1, scratch=scratch)
            return out

        return self._row_map(x, mask, block, 4 * len(self))

    def score_blocks(
        self, x: Tensor, mask: Tensor | None, extra_row_bytes: int = 0
    ) -> Iterator[tuple[int, int, Tensor, Scratch]]:
        """``(b0, b1, s, scratch)`` per block of rows of ``x [B, S]`` / ``mask`` validated by ``prepare_input``:
        ``s [b1-b0, N] = log w_n + log p(x_o | n)``, a view of a reused buffer (valid until the next block; the
        block's ``scratch`` may serve the caller's own temporaries). The hook for queries built on this circuit
        (:class:`~vq2pc.circuit.classes.ClassMixture`): the likelihood matrix once, without a copy of it."""
        rows, cols = self._blocks(x.shape[0], extra_row_bytes + self.log_weights.element_size() * len(self))
        scratch = Scratch()
        for b0, b1 in rows:
            xb, mb = x[b0:b1], None if mask is None else mask[b0:b1]
            if len(cols) == 1:
                yield b0, b1, self._scores(xb, mb, 0, len(self), scratch), scratch
                continue
            out = scratch.take("rows", (b1 - b0, len(self)), self.log_weights.dtype, x.device)
            for n0, n1 in cols:
                out[:, n0:n1] = self._scores(xb, mb, n0, n1, scratch)
            yield b0, b1, out, scratch

    def log_prob(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B]`` log p̂(x), or the log marginal of the observed entries when ``mask`` is given."""
        x, mask = self._prepare(x, mask)
        return self._row_map(x, mask, lambda *args: log_marginal(self._score_blocks(*args)))

    def posterior(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B, N]`` log p(n | x_o); each row log-sum-exps to 0."""
        x, mask = self._prepare(x, mask)

        def block(xb: Tensor, mb: Tensor | None, cols: Blocks, scratch: Scratch) -> Tensor:
            out = scratch.take("rows", (len(xb), len(self)), self.log_weights.dtype, xb.device)
            lse = None
            for n0, n1 in cols:
                s = out[:, n0:n1] = self._scores(xb, mb, n0, n1, scratch)
                part = logsumexp_(s)
                lse = part if lse is None else torch.logaddexp(lse, part)
            return out.sub_(lse[:, None])

        return self._row_map(x, mask, block, 4 * len(self))

    # --- conditionals -----------------------------------------------------------------
    def component_means(self) -> Tensor:
        """``[N, S]`` mean of every component (levels for categorical leaves); cached."""
        if self._means is None:
            self._means = self._row_apply_leaf(torch.arange(len(self), device=self.device), lambda lf: lf.mean())
        return self._means

    def conditional_mean(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B, S]`` E[x | x_o] = Σ_n p(n | x_o) E[x | n]; observed entries are copied through
        (``mask=None``: everything is observed, so this is ``x`` itself)."""
        x, mask = self._prepare(x, mask)
        if mask is None:
            return x.clone()
        extra = 3 * self.component_means().element_size() * self.num_variables

        def block(xb: Tensor, mb: Tensor | None, cols: Blocks, scratch: Scratch) -> Tensor:
            cm = posterior_mean(self._score_blocks(xb, mb, cols, scratch))
            return cm if mb is None else torch.where(mb, xb, cm)

        return self._row_map(x, mask, block, extra)

    def _map_component(self, x: Tensor, mask: Tensor, hidden_bonus: Tensor) -> Tensor:
        """``[B]`` argmax_n of the scores plus ``Σ_{i unobserved} hidden_bonus[n, i]`` (``[N, S]``)."""

        def block(xb: Tensor, mb: Tensor, cols: Blocks, scratch: Scratch) -> Tensor:
            best = RunningArgmax()
            for n0, s, _ in self._score_blocks(xb, mb, cols, scratch):
                best.add(s.addmm_((~mb).to(s.dtype), hidden_bonus[n0 : n0 + s.shape[1]].T), n0)
            return best.result()

        return self._row_map(x, mask, block)

    def _row_apply_leaf(self, idx: Tensor, fn: Callable[[Leaf], Tensor]) -> Tensor:
        """``fn(leaf[idx])`` in row blocks (gathered parameters stay within the budget)."""
        per_row = sum(t[0].numel() * t.element_size() for t in self.leaf.tensors().values()) * 4
        step = max(1, int(self.memory_budget_mib * _MIB // per_row))
        return torch.cat([fn(self.leaf[idx[i : i + step]]) for i in range(0, len(idx), step)])

    def _draw(self, n: int, generator: torch.Generator | None) -> Tensor:
        """``[n, S]``: components by inverse CDF of the weights (float64), then the leaf."""
        cdf = torch.cumsum(self.log_weights.double().exp(), 0)
        u = uniform((n,), generator, self.device, torch.float64) * cdf[-1]
        idx = torch.searchsorted(cdf, u, right=True).clamp_max(len(self) - 1)
        return self._row_apply_leaf(idx, lambda lf: lf.sample(generator))

    def _draw_given(self, x: Tensor, mask: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """``[B, S]``: a component per row by Gumbel-max over the posterior scores, then its leaf."""

        def draw_component(xb: Tensor, mb: Tensor | None, cols: Blocks, scratch: Scratch) -> Tensor:
            return posterior_draw(self._score_blocks(xb, mb, cols, scratch), generator, scratch)

        return self._row_apply_leaf(self._row_map(x, mask, draw_component), lambda lf: lf.sample(generator))

    def map(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B, S]`` exact MAP of the joint over (component, x_u) given x_o; x_o kept.

        Returns the mode of component ``n* = argmax_n w_n p(x_o | n) max_{x_u} p(x_u | n)``
        on x_u, which is exactly ``argmax over (n, x_u) of p(n, x_o, x_u)`` (for fixed n the
        leaves factorize, so the best x_u is n's mode; densities for Gaussian leaves). It is
        NOT the exact marginal MAP ``argmax_{x_u} Σ_n p(n, x_o, x_u)`` (NP-hard in general).
        ``mask=None``: everything is observed, so this is ``x`` itself.
        """
        xp, mp = self._prepare(x, mask)
        if mp is None:
            return xp.clone()
        if self._mode_logp is None:
            self._mode_logp = self._row_apply_leaf(
                torch.arange(len(self), device=self.device), lambda lf: lf.log_prob(lf.mode())
            )
        idx = self._map_component(xp, mp, self._mode_logp)
        mode = self._row_apply_leaf(idx, lambda lf: lf.mode())
        return mode if mp is None else torch.where(mp, xp, mode)

    # --- persistence ----------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one ``.safetensors`` file (tensors + JSON metadata), atomically."""
        return write_circuit(path, self.leaf, self._given_log_weights, self.meta)

    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device | None = None, *, memory_budget_mib: float = 1024
    ) -> MixtureCircuit:
        """Load a circuit written by :meth:`save`; ``ValueError`` (:class:`CheckpointError`) for bad files."""
        kind, tensors, log_weights, meta, levels = read_circuit(path, device)
        try:
            if kind == "categorical":  # stored normalized: do not renormalize (bit-exact round trip)
                _check_normalized(tensors["logits"])  # [N, S, L]
                leaf: Leaf = normalized_categorical(tensors.pop("logits"))  # the file's copy is freed once laid out
            else:
                leaf = leaf_from_tensors(kind, tensors, levels)
            return cls(leaf, log_weights, memory_budget_mib=memory_budget_mib, meta=meta)
        except (ValueError, KeyError, IndexError) as exc:
            raise CheckpointError(f"{path}: invalid circuit contents: {exc}") from None


def _check_normalized(log_probs: Tensor) -> None:
    """``ValueError`` unless ``log_probs [N, ..., L]`` sum to 1 over the last dim (to float rounding).

    Checked in float64 over blocks of components of ~2**22 entries, so a circuit of several GB
    (N = 4096 MNIST: 3.3 GB) is not copied whole into float64."""
    block = max(1, (1 << 22) // max(1, log_probs[0].numel())) if log_probs.numel() else 1
    err = (
        max((float(torch.logsumexp(part.double(), -1).abs().max()) for part in log_probs.split(block)), default=0.0)
        if log_probs.numel()
        else 0.0
    )
    tol = 1e-4 if log_probs.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    if not err <= tol:  # NaN fails too
        raise ValueError(f"categorical leaves are not normalized: |log Σ_levels p - 0| reaches {err:.3g} (> {tol:g})")


def _ranges(total: int, step: int) -> list[tuple[int, int]]:
    return [(i, min(i + step, total)) for i in range(0, total, step)]


def _check_leaf(leaf: Leaf) -> None:
    """Shape and value checks of a circuit's leaf (``ValueError`` naming the problem)."""
    if not isinstance(leaf, Leaf):
        raise ValueError(
            f"leaf must be a vq2pc leaf (Gaussian, Categorical, Bernoulli, discretized), got {type(leaf).__name__}"
        )
    shape = leaf.batch_shape
    if len(shape) != 2:
        raise ValueError(f"leaf batch shape must be [N, S], got {tuple(shape)}")
    if shape[0] == 0:
        raise ValueError("a circuit needs N >= 1 components, got N = 0")
    if shape[1] == 0:
        raise ValueError("a circuit needs S >= 1 variables, got S = 0")
    leaf.check()
    if leaf.kind == "bernoulli" and not torch.isfinite(leaf.logits).all():
        raise ValueError("Bernoulli logits must be finite")
    if isinstance(leaf, Categorical) and torch.isposinf(leaf.logits).any():
        raise ValueError("categorical logits contain +inf")
